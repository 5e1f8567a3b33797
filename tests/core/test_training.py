"""The training loop: it learns, it refuses NaN steps without side effects, its live controls and schedules work."""

import copy
import math

import pytest
import torch

from monoflow_core import FlowConfig
from monoflow_core.nn import DenseNetG
from monoflow_core.training import (
    EvalMetrics,
    TrainConfig,
    Trainer,
    TrainingError,
    lr_factor,
    paper_protocol_nll,
    paper_protocol_value,
)

torch.set_num_threads(1)

SMALL = FlowConfig(blocks=2, growth=8)


def small_trainer(model=SMALL, **changes):
    settings = {"batch_size": 64, "eval_size": 500, "test_size": 1000, "concat_learnable_from": None}
    settings.update(changes)
    return Trainer(model, TrainConfig(**settings))


def snapshot(trainer):
    params = {k: v.detach().clone() for k, v in trainer.flow.state_dict().items()}
    return params, copy.deepcopy(trainer.optimizer.state_dict())


def assert_same_state(trainer, snap):
    params, opt = snap
    for k, v in trainer.flow.state_dict().items():
        assert torch.equal(v, params[k]), k
    now = trainer.optimizer.state_dict()
    assert now["state"].keys() == opt["state"].keys()
    for i, entry in opt["state"].items():
        for key, value in entry.items():
            assert torch.equal(now["state"][i][key], value), (i, key)


# -- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("data", "imagenet1k"),
        ("data_dir", 3),
        ("grad_accumulation", 0),
        ("eval_split", "train"),
        ("iterations", 0),
        ("batch_size", 2.5),
        ("lr", -1.0),
        ("betas", (0.9, 1.0)),
        ("weight_decay", -1e-5),
        ("schedule", "cosine"),
        ("lr_milestones", [10, 5]),
        ("lr_gamma", 0.0),
        ("concat_learnable_from", -1),
        ("grad_clip", 0.0),
        ("ema", 1.0),
        ("seed", -3),
        ("dtype", "float16"),
        ("device", "not-a-device"),
        ("max_rejected_steps", 0),
    ],
)
def test_train_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig(**{field: value})


def test_image_data_needs_a_folder_except_the_built_in_digits():
    with pytest.raises(ValueError, match=r"^data_dir: --data mnist needs --data-dir"):
        TrainConfig(data="mnist")
    assert TrainConfig(data="digits").task == "image"
    with pytest.raises(ValueError, match=r"^grad_accumulation: must be <= batch_size"):
        TrainConfig(batch_size=4, grad_accumulation=5)


def test_train_config_round_trip_and_unknown_keys():
    cfg = TrainConfig(data="STAIRCASE", schedule="step", lr_milestones=[5000, 10000], lr_gamma=0.2, betas=[0.8, 0.9])
    assert cfg.data == "staircase" and cfg.task == "regression" and cfg.betas == (0.8, 0.9)
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="valid fields"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ValueError, match="warmup_iterations"):
        TrainConfig(schedule="warmup")


def test_lr_factor_schedules():
    step = TrainConfig(schedule="step", lr_milestones=[5000, 10000], lr_gamma=0.2)
    factors = [lr_factor(step, s) for s in (0, 4999, 5000, 9999, 10000, 14999)]
    assert factors == pytest.approx([1.0, 1.0, 0.2, 0.2, 0.04, 0.04])
    warm = TrainConfig(schedule="warmup", warmup_iterations=4)
    assert [lr_factor(warm, s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert lr_factor(TrainConfig(), 123456) == 1.0


def test_trainer_checks_the_flow_matches_the_task():
    with pytest.raises(ValueError, match="1-D"):
        Trainer(SMALL, TrainConfig(data="staircase"))


# -- learning -----------------------------------------------------------------------------------------------


def test_short_density_run_lowers_the_test_nll_and_reports_the_paper_protocol():
    trainer = Trainer(
        FlowConfig(blocks=3, growth=8),
        TrainConfig(batch_size=128, lr=1e-2, eval_every=25, eval_size=1000, test_size=4000, seed=1),
    )
    before = trainer.evaluate()
    assert before.fixed and before.exact and before.n_test == 4000 and before.step == 0
    summary = trainer.run(100)
    after = trainer.evaluate()
    assert summary.steps_run == 100 and summary.step == 100 and trainer.step_count == 100
    assert summary.rejected_steps == 0
    # A clear margin (nats): the untrained flow sits near 5.1, 100 steps reach about 3.1 (entropy: 2.84).
    assert after.nll_nats < before.nll_nats - 1.5
    assert after.nll_nats < 4.2
    fresh = [e for e in trainer.eval_history if not e.fixed]
    assert [e.step for e in fresh] == [25, 50, 75, 100]
    assert summary.paper_protocol == pytest.approx(sum(e.nll_nats for e in fresh) / 4)
    assert summary.paper_protocol_tests == 4 and "nats" in summary.describe()
    assert "nats" in after.describe()
    m = trainer.history[-1]
    assert m.step == 99 and math.isfinite(m.loss) and m.exact and m.solver_failed == 0
    assert m.solver_iterations_mean > 0 and m.solver_iterations_max >= 1 and m.seconds > 0


def test_short_staircase_run_lowers_the_test_mse():
    model = FlowConfig(
        dim=1,
        blocks=2,
        depth=2,
        growth=16,
        activation="crelu",
        lipschitz=0.99,
        concat_lipschitz=0.99,
        actnorm=True,
        actnorm_input=True,
    )
    trainer = Trainer(
        model, TrainConfig(data="staircase", batch_size=500, lr=1e-2, eval_size=2000, concat_learnable_from=None)
    )
    before = trainer.evaluate()
    assert before.mse is not None and before.nll_nats is None and before.n_test == 2000
    trainer.run(60)
    after = trainer.evaluate()
    assert after.mse < 0.5 * before.mse
    fresh = trainer.evaluate(n=500, fixed=False)
    assert not fresh.fixed and fresh.n_test == 500 and fresh.mse < before.mse


# -- NaN guard ----------------------------------------------------------------------------------------------


def test_non_finite_loss_is_rejected_with_parameters_and_optimizer_bit_identical():
    trainer = small_trainer(max_rejected_steps=3)
    trainer.step()
    trainer.step()
    snap = snapshot(trainer)
    trainer.loss_transform = lambda loss: loss * float("nan")
    m = trainer.step()
    assert m.rejected and "non-finite loss" in m.message and m.step == 2
    assert_same_state(trainer, snap)
    assert all(p.grad is None for p in trainer.flow.parameters())

    # A finite loss with a NaN gradient (d sqrt(u)/du = inf at u = 0, times 0) is rejected the same way.
    p0 = next(trainer.flow.parameters())
    trainer.loss_transform = lambda loss: loss + 0.0 * torch.sqrt(0.0 * p0.sum())
    m = trainer.step()
    assert m.rejected and "non-finite gradient" in m.message and math.isfinite(m.loss)
    assert_same_state(trainer, snap)

    trainer.loss_transform = lambda loss: loss * float("inf")
    with pytest.raises(TrainingError, match="3 consecutive"):
        trainer.step()
    assert_same_state(trainer, snap)
    assert trainer.rejected_total == 3

    # A good step resets the count.
    trainer.loss_transform = None
    assert not trainer.step().rejected


def test_rejected_first_step_undoes_actnorm_data_init():
    model = FlowConfig(blocks=1, growth=8, actnorm=True, actnorm_input=True)
    trainer = small_trainer(model)
    before = {k: v.clone() for k, v in trainer.flow.state_dict().items()}
    trainer.loss_transform = lambda loss: loss * float("nan")
    assert trainer.step().rejected
    for k, v in trainer.flow.state_dict().items():
        assert torch.equal(v, before[k]), k


# -- live controls and schedules ----------------------------------------------------------------------------


def test_set_lr_and_set_solver_apply_live():
    trainer = small_trainer(lr=1e-3)
    opt = trainer.optimizer
    trainer.step()
    trainer.set_lr(3e-4)
    assert trainer.optimizer is opt
    assert all(g["lr"] == pytest.approx(3e-4) for g in opt.param_groups)
    assert trainer.step().lr == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="lr"):
        trainer.set_lr(0.0)
    trainer.set_solver(tol=1e-4, max_iter=50, solver="anderson")
    for block in trainer.flow.implicit_blocks():
        assert (block.tol, block.max_iter, block.solver) == (1e-4, 50, "anderson")
    assert not trainer.step().rejected


def test_step_schedule_changes_the_lr_at_the_milestone():
    trainer = small_trainer(lr=1e-2, schedule="step", lr_milestones=[2], lr_gamma=0.5)
    lrs = [trainer.step().lr for _ in range(4)]
    assert lrs == pytest.approx([1e-2, 1e-2, 5e-3, 5e-3])


def test_learnable_concatenation_is_released_at_the_configured_step():
    trainer = small_trainer(concat_learnable_from=2, lr=1e-2)
    gs = [m for m in trainer.flow.modules() if isinstance(m, DenseNetG)]
    assert len(gs) == 2
    k0 = [g.concat_k.detach().clone() for g in gs]
    for _ in range(2):
        trainer.step()
        assert all(not g.concat_k.requires_grad for g in gs)
        assert all(torch.equal(g.concat_k, k) for g, k in zip(gs, k0, strict=True))
    trainer.step()  # step index 2: trainable from here on
    assert all(g.concat_k.requires_grad for g in gs)
    assert any(not torch.equal(g.concat_k, k) for g, k in zip(gs, k0, strict=True))


def test_lipschitz_constant_of_every_g_stays_below_its_bound_after_steps():
    trainer = small_trainer(lr=5e-2, concat_learnable_from=0)
    for _ in range(5):
        trainer.step()
    torch.manual_seed(0)
    for g in (m for m in trainer.flow.modules() if isinstance(m, DenseNetG)):
        g64 = copy.deepcopy(g).double()
        x = torch.randn(256, 2, dtype=torch.float64) * 3.0
        jac = torch.func.vmap(torch.func.jacrev(lambda v, g64=g64: g64(v.unsqueeze(0))[0]))(x)
        measured = float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())
        assert measured <= g.lipschitz_bound() * (1 + 1e-9)
        assert measured > 0.1 * g.lipschitz_bound()  # the measurement is not vacuous


def test_ema_weights_are_an_exponential_average_and_are_used_for_evaluation():
    trainer = small_trainer(ema=0.5, lr=1e-2)
    trainer.step()
    p_ema = next(trainer.eval_flow.parameters())
    p = next(trainer.flow.parameters())
    assert torch.equal(p_ema, p)  # first update copies
    before_ema = p_ema.detach().clone()
    trainer.step()
    assert torch.allclose(p_ema, 0.5 * before_ema + 0.5 * p, atol=1e-7)
    assert not torch.equal(p_ema, p)
    ema_nll = trainer.evaluate(n=200).nll_nats
    trainer._ema_flow = None  # evaluate the live weights instead
    assert trainer.evaluate(n=200).nll_nats != ema_nll


def test_ema_averages_every_parameter_and_copies_every_buffer():
    trainer = small_trainer(ema=0.75, lr=1e-2)
    trainer.step()
    ema_state = {k: v.detach().clone() for k, v in trainer.eval_flow.named_parameters()}
    trainer.step()
    live = dict(trainer.flow.named_parameters())
    assert len(ema_state) == len(live) > 10
    for name, p_ema in trainer.eval_flow.named_parameters():
        expected = 0.75 * ema_state[name] + 0.25 * live[name].detach()
        assert torch.allclose(p_ema, expected, atol=1e-6), name
    buffers = dict(trainer.flow.named_buffers())
    assert buffers, "the toy flow has buffers (spectral-norm vectors)"
    for name, b_ema in trainer.eval_flow.named_buffers():
        assert torch.equal(b_ema, buffers[name]), name


def test_evaluation_does_not_change_the_training_trajectory():
    a, b = small_trainer(), small_trainer()
    for _ in range(3):
        a.step()
        b.step()
        b.evaluate(n=300, fixed=False)
        b.evaluate(n=300)
    for (k, va), vb in zip(a.flow.state_dict().items(), b.flow.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert a.flow.layers[0].net.layers[0].weight.dtype == torch.float32  # evaluated in float64 on a copy


def test_paper_protocol_averages_the_last_twenty_fresh_tests():
    evals = [
        EvalMetrics(step=i, nll_nats=float(i), mse=None, n_test=1, seconds=0.0, exact=True, fixed=False)
        for i in range(30)
    ]
    evals.append(EvalMetrics(step=30, nll_nats=100.0, mse=None, n_test=1, seconds=0.0, exact=True, fixed=True))
    assert paper_protocol_nll(evals) == pytest.approx(sum(range(10, 30)) / 20)
    assert paper_protocol_value([]) is None


@pytest.mark.parametrize("name", ["paper-mnist", "paper-cifar10", "paper-imagenet32", "paper-imagenet64", "digits-cpu"])
def test_image_presets_are_valid_configurations(name):
    from monoflow_core.presets import load_preset

    preset = load_preset(name)
    model = preset.model_config()
    training = preset.train_config(**({"data_dir": "/data"} if name != "digits-cpu" else {}))
    assert model.is_image and training.task == "image"
    c, h, w = model.image_shape
    assert model.dim == c * h * w
    assert h % 2 ** (len(model.blocks_per_scale) - 1) == 0
    # The iteration cap of image training: 10x the most any block needed in the measurements of docs/solvers.md.
    assert model.max_iter == 100
    if name.startswith("paper-"):
        # docs/algorithm.md section 9.3: growth 172 (3x3 convs to 86 channels, CPila), 4 FC blocks, Poisson roulette,
        # 10 / 20 exact terms, warm-up 1,000, clipping 1, EMA 0.999.
        assert (model.growth, model.depth, model.fc_blocks) == (172, 3, 4)
        assert (model.roulette, model.n_exact_terms, model.n_exact_terms_eval) == ("poisson", 10, 20)
        assert (training.warmup_iterations, training.grad_clip, training.ema) == (1000, 1.0, 0.999)


def test_a_step_puts_every_module_back_in_training_mode():
    """The step checks the modules' modes (listed once) and restores training mode wherever it was switched off."""
    trainer = small_trainer()
    trainer.flow.layers[1].net.layers[0].eval()
    trainer.step()
    assert all(m.training for m in trainer.flow.modules())


def test_step_metrics_summarise_every_blocks_forward_solve():
    """The step's solver summary (one stacked reduction) equals the per-block sums it replaces."""
    trainer = small_trainer(model=FlowConfig(blocks=3, growth=8))
    metrics = trainer.step()
    forward = [s["forward"] for s in trainer.flow.solver_stats()]
    assert metrics.solver_iterations_mean == pytest.approx(sum(float(f.iterations.double().mean()) for f in forward))
    assert metrics.solver_iterations_max == max(int(f.iterations.max()) for f in forward)
    assert metrics.solver_failed == sum(f.n_failed for f in forward)


def test_trainers_built_at_once_in_two_threads_get_their_seeds_weights():
    """The studio's compare mode builds two trainers at once: each must still get exactly its seed's weights."""
    import threading

    config = FlowConfig(blocks=6, growth=16)

    def weights(seed: int) -> list[torch.Tensor]:
        t = Trainer(config, TrainConfig(batch_size=8, seed=seed, eval_every=0, test_size=10))
        return [p.detach().clone() for p in t.flow.parameters()]

    expected = {3: weights(3), 5: weights(5)}
    got: dict[int, list[list[torch.Tensor]]] = {3: [], 5: []}

    def build(seed: int) -> None:
        for _ in range(4):
            got[seed].append(weights(seed))

    threads = [threading.Thread(target=build, args=(s,)) for s in (3, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, runs in got.items():
        assert len(runs) == 4
        for run in runs:
            assert all(torch.equal(a, b) for a, b in zip(run, expected[seed], strict=True)), seed
