"""Steps whose update overflows the parameters are undone like a non-finite loss; spectral norms of non-finite
weights fail with a clear error."""

import pytest
import torch

from monoflow_core import FlowConfig
from monoflow_core.nn.conv import SpectralConv2d
from monoflow_core.nn.lipschitz import SpectralLinear
from monoflow_core.training import TrainingError

torch.set_num_threads(1)

# The small trainer and the state comparison are test_training's own (one copy of each).
from test_training import assert_same_state, small_trainer, snapshot  # noqa: E402


def count_backups(trainer, monkeypatch):
    calls = []
    original = trainer._guard.backup

    def counting():
        calls.append(trainer.step_count)
        return original()

    monkeypatch.setattr(trainer._guard, "backup", counting)
    return calls


def test_a_huge_learning_rate_is_undone_bit_identically_then_diverges_clearly():
    trainer = small_trainer(max_rejected_steps=3)
    trainer.step()
    trainer.step()
    snap = snapshot(trainer)
    ema_before = [p.detach().clone() for p in trainer.eval_flow.parameters()]
    trainer.set_lr(1e39)  # a float32 update of lr * O(1) overflows to inf
    m = trainer.step()
    assert m.rejected and "non-finite" in m.message and "step 2" in m.message
    assert_same_state(trainer, snap)  # parameters, power-iteration vectors and Adam's moments and step counts
    assert all(p.grad is None for p in trainer.flow.parameters())
    assert all(torch.equal(a, b) for a, b in zip(trainer.eval_flow.parameters(), ema_before, strict=True))
    assert trainer.step().rejected
    with pytest.raises(TrainingError, match=r"3 consecutive iterations were rejected.*non-finite"):
        trainer.step()  # not a linear-algebra error from the next pass
    assert_same_state(trainer, snap)
    assert trainer.rejected_total == 3

    trainer.set_lr(1e-3)  # training resumes from the last good step
    assert not trainer.step().rejected
    assert all(torch.isfinite(p).all() for p in trainer.flow.parameters())


def test_a_huge_learning_rate_on_the_first_step_leaves_no_optimizer_state():
    trainer = small_trainer(lr=1e39, max_rejected_steps=5)
    snap = snapshot(trainer)
    m = trainer.step()
    assert m.rejected and "non-finite" in m.message
    assert_same_state(trainer, snap)
    assert len(trainer.optimizer.state) == 0  # the entries the undone step created are gone


def test_a_huge_learning_rate_on_the_first_step_also_undoes_actnorm_init():
    model = FlowConfig(blocks=1, growth=8, actnorm=True, actnorm_input=True)
    trainer = small_trainer(model, lr=1e39)
    snap = snapshot(trainer)
    assert trainer.step().rejected
    assert_same_state(trainer, snap)


def test_float64_training_survives_a_learning_rate_float32_cannot_hold():
    # 1e39 overflows float32 but not float64: there the step is taken (no false rejection).
    trainer = small_trainer(dtype="float64", lr=1e39, max_rejected_steps=1)
    assert not trainer.step().rejected


def test_ordinary_steps_take_no_backup_but_risky_or_changed_ones_do(monkeypatch):
    trainer = small_trainer(max_rejected_steps=5)
    calls = count_backups(trainer, monkeypatch)
    for _ in range(4):
        assert not trainer.step().rejected
    assert calls == [0]  # the first step: no measured peak yet
    with torch.no_grad():  # parameters changed outside the optimizer: the measured peak is stale
        next(trainer.flow.parameters()).mul_(2.0)
    trainer.step()
    trainer.step()
    assert calls == [0, 4]
    trainer.set_lr(1e37)  # 1e37 * Adam's bound on |m_hat| / sqrt(v_hat) could reach float32's range
    trainer.step()
    assert calls == [0, 4, 6]


def test_adam_step_bound_covers_the_actual_moves():
    trainer = small_trainer(lr=0.05, max_rejected_steps=5)
    worst = 0.0
    for _ in range(6):
        before = [p.detach().clone() for p in trainer.flow.parameters()]
        bound = trainer._guard.step_bound()
        trainer.step()
        moves = [(p.detach() - b).abs().max() for p, b in zip(trainer.flow.parameters(), before, strict=True)]
        worst = max(worst, float(max(moves)))
        assert float(max(moves)) <= bound / 4  # (the factor 4 is a margin for rounding only)
    assert worst > 0


def test_an_overflow_the_bound_did_not_foresee_is_a_clear_training_error(monkeypatch):
    trainer = small_trainer(max_rejected_steps=5)
    trainer.step()
    monkeypatch.setattr(trainer._guard, "step_bound", lambda: 0.0)  # as if the bound were wrong
    trainer.set_lr(1e39)
    with pytest.raises(TrainingError, match=r"non-finite parameters .* no backup"):
        trainer.step()


# -- spectral norms of non-finite weights ------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_exact_spectral_norm_of_a_non_finite_weight_is_a_clear_error(bad):
    layer = SpectralLinear(3, 4, mode="exact")
    with torch.no_grad():
        layer.weight.fill_(bad)
    with pytest.raises(ValueError, match=r"^SpectralLinear\(in_features=3.*weight \(4, 3\) contains non-finite"):
        layer(torch.randn(2, 3))


def test_other_linear_algebra_failures_pass_through(monkeypatch):
    layer = SpectralLinear(3, 4, mode="exact")

    def fail():
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(layer, "sigma", fail)
    with pytest.raises(torch.linalg.LinAlgError, match="simulated"):
        layer(torch.randn(2, 3))


def test_conv_layers_share_the_check():
    conv = SpectralConv2d(2, 3, 3, (4, 4), mode="exact")

    def fail():
        raise torch.linalg.LinAlgError("simulated")

    conv.sigma = fail
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^SpectralConv2d\(.*contains non-finite"):
        conv(torch.randn(1, 2, 4, 4))
