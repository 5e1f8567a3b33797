"""The precision policy, the stall exit of every solver, and host synchronisations per solver iteration.

TF32 is emulated on the CPU (:func:`emulate_reduced_precision` rounds the inputs of every float32 product and
convolution to 10 mantissa bits, as the hardware does), so these tests need no GPU.
"""

import math
import warnings

import pytest
import torch

import monoflow_core.solvers as solvers
from monoflow_core import MonotoneBlock, ResidualBlock
from monoflow_core.blocks import ActNorm
from monoflow_core.config import TrainConfig
from monoflow_core.image_layers import ActNorm2d
from monoflow_core.precision import (
    arithmetic,
    arithmetic_floor,
    emulate_reduced_precision,
    full_precision,
    resolve_precision,
    round_mantissa,
    tf32_enabled,
    tf32_mode,
    tolerance_floor,
)
from monoflow_core.solvers import STALL_WINDOW, SolverWarning, effective_tolerance, solve
from monoflow_core.syncs import SyncCounter

F32_FLOOR = 10 * torch.finfo(torch.float32).eps
TF32_FLOOR = 2.0**-10
METHODS = ("picard", "anderson", "newton")


# -- the policy ------------------------------------------------------------------------------------------------


def test_policy_per_device_and_dtype():
    cuda32 = resolve_precision("auto", "cuda", torch.float32)
    assert (cuda32.mode, cuda32.tf32) == ("highest", False)  # the default on GPUs: TF32 off
    assert cuda32.tolerance_floor == pytest.approx(F32_FLOOR)
    assert resolve_precision("auto", "cpu", torch.float32).tolerance_floor == pytest.approx(F32_FLOOR)
    assert resolve_precision("auto", "cuda", torch.float64).tolerance_floor == pytest.approx(
        10 * torch.finfo(torch.float64).eps
    )
    tf32 = resolve_precision("TF32", "cuda:1", torch.float32)  # the override
    assert (tf32.mode, tf32.tf32, tf32.requested) == ("tf32", True, "tf32")
    assert tf32.tolerance_floor == pytest.approx(TF32_FLOOR)
    assert tf32.evaluation_floor == pytest.approx(F32_FLOOR)  # evaluations: full precision
    # Where TF32 does not exist, the request resolves to full precision and says why.
    for device, dtype in (("cpu", torch.float32), ("cuda", torch.float64)):
        p = resolve_precision("tf32", device, dtype)
        assert (p.mode, p.tf32) == ("highest", False) and "TF32 requested, but" in p.reason
    assert "precision tf32 (requested tf32)" in tf32.describe()
    assert tf32.to_dict()["tolerance_floor"] == pytest.approx(TF32_FLOOR)


def test_precision_is_a_validated_training_setting():
    assert TrainConfig().precision == "auto"
    assert TrainConfig(precision="Highest").precision == "highest"
    choices = r"\['auto', 'highest', 'tf32'\]"
    with pytest.raises(ValueError, match=rf"precision: unknown value 'fp8'; choose one of {choices}"):
        TrainConfig(precision="fp8")


def test_floors_of_each_arithmetic():
    assert tolerance_floor("float32") == pytest.approx(F32_FLOOR)
    assert tolerance_floor("tf32") == pytest.approx(2.0**-10)
    assert tolerance_floor("bfloat16") == pytest.approx(2.0**-7)
    with pytest.raises(ValueError, match="arithmetic"):
        tolerance_floor("fp8")


def test_flags_decide_the_floor_and_scopes_restore_them():
    before = tf32_enabled()
    with tf32_mode(True):
        assert tf32_enabled() == (True, True)
        # On CUDA the solve now aims at TF32's floor; the CPU and float64 are unaffected.
        assert arithmetic(torch.float32, "cuda") == "tf32"
        assert effective_tolerance(1e-12, torch.float32, "cuda") == pytest.approx(TF32_FLOOR)
        assert effective_tolerance(1e-12, torch.float32, "cpu") == pytest.approx(F32_FLOOR)
        assert arithmetic_floor(torch.float64, "cuda") == pytest.approx(10 * torch.finfo(torch.float64).eps)
        with full_precision():
            assert tf32_enabled() == (False, False)
            assert effective_tolerance(1e-12, torch.float32, "cuda") == pytest.approx(F32_FLOOR)
        assert tf32_enabled() == (True, True)
    assert tf32_enabled() == before


def test_round_mantissa_is_tf32_rounding():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 100
    y = round_mantissa(x, 10)
    assert torch.all((y.view(torch.int32) & 0x1FFF) == 0)  # 13 low mantissa bits cleared: 10 remain
    rel = ((y - x).abs() / x.abs()).max()
    assert 2.0**-12 < float(rel) <= 2.0**-11  # round to nearest: at most half a TF32 unit
    one_and_half_ulp = torch.tensor([1.0 + 2.0**-11], dtype=torch.float32)  # a tie: away from zero
    assert float(round_mantissa(one_and_half_ulp, 10)) == 1.0 + 2.0**-10
    assert float(round_mantissa(-one_and_half_ulp, 10)) == -(1.0 + 2.0**-10)
    assert torch.equal(round_mantissa(x.double(), 10), x.double())  # only float32 is rounded
    inf = torch.tensor([math.inf, -math.inf])
    assert torch.equal(round_mantissa(inf, 10), inf)


def test_emulation_rounds_products_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 3, 3, 3, generator=g)
    x = torch.randn(2, 3, 5, 5, generator=g, requires_grad=True)
    exact = torch.nn.functional.conv2d(x, w)
    (gx_exact,) = torch.autograd.grad(exact.square().sum(), x)
    with emulate_reduced_precision("tf32") as mode:
        rounded = torch.nn.functional.conv2d(x, w)
        (gx,) = torch.autograd.grad(rounded.square().sum(), x)
        assert arithmetic(torch.float32, "cpu") == "tf32"
    assert mode.rounded >= 2
    expected = torch.nn.functional.conv2d(round_mantissa(x.detach(), 10), round_mantissa(w, 10))
    assert torch.allclose(rounded, expected, rtol=0, atol=1e-5)
    assert 1e-5 < float((rounded - exact).detach().abs().max()) < 2e-2
    assert not torch.equal(gx, gx_exact)
    assert arithmetic(torch.float32, "cpu") == "float32"  # the declaration ends with the block


# -- the stall exit ----------------------------------------------------------------------------------------------


def constant_residual(n=3, b=5):
    """f(w) = w + c: the residual is c whatever w, so no sample can ever converge or progress."""
    c = torch.linspace(0.1, 1.0, n * b, dtype=torch.float64).reshape(b, n)

    def f(w, idx):
        return w + c[idx]

    def newton_map(w, idx):
        return w + c[idx], torch.zeros(w.shape[0], n, n, dtype=w.dtype)  # A = I - I: singular

    return f, newton_map, torch.zeros(b, n, dtype=torch.float64)


@pytest.mark.parametrize("fixed_shape", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_stall_exit_stops_a_solve_that_cannot_progress(method, fixed_shape):
    f, newton_map, x0 = constant_residual()
    with pytest.warns(SolverWarning, match=r"5 of 5 samples did not converge \(\w+\): 5 stalled"):
        _, stats, _ = solve(
            f, x0, method=method, tol=1e-10, max_iter=1000, newton_map=newton_map, fixed_shape=fixed_shape
        )
    # The first iteration sets the reference; STALL_WINDOW more without a 10% decrease stop the sample.
    assert stats.iterations.tolist() == [STALL_WINDOW + 1] * 5
    assert stats.n_stalled == 5 and stats.n_failed == 5 and stats.summary()["n_stalled"] == 5


def test_out_of_budget_and_stalled_are_told_apart():
    rhs = torch.ones(4, 2, dtype=torch.float64)

    def expanding(w, idx):
        return 2.0 * w + 1.0  # the residual grows: no stall within 25 iterations, the cap is reached

    with pytest.warns(SolverWarning, match="4 reached max_iter = 25") as record:
        _, stats, _ = solve(expanding, rhs, method="picard", tol=1e-8, max_iter=25)
    assert "stalled" not in str(record[0].message)
    assert stats.n_stalled == 0 and stats.n_failed == 4


def tf32_dense_g(n=24, lip=0.95, seed=0):
    """A dense G = L tanh(W w + b) (|W|_2 = 1); under emulation its products carry TF32 rounding noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, n, generator=g)
    w = w / torch.linalg.matrix_norm(w, ord=2)
    b = 0.3 * torch.randn(n, generator=g)
    return lambda v: lip * torch.tanh(torch.nn.functional.linear(v, w, b))


@pytest.mark.parametrize("method", METHODS)
def test_tf32_noise_converges_at_its_floor_or_stops_on_stall(method):
    """A G with TF32 rounding noise either converges (at TF32's floor) or stops on stall, never at max_iter."""
    net = tf32_dense_g()
    x = 2 * torch.randn(64, 24, generator=torch.Generator().manual_seed(1))
    blocks = {}
    for declare in (False, True):
        block = MonotoneBlock(net, solver=method, max_iter=1000, implicit_grad="backward_solve")
        with warnings.catch_warnings(record=True) as record, emulate_reduced_precision("tf32", declare=declare):
            warnings.simplefilter("always")
            xr = x.clone().requires_grad_(True)
            y, _ = block(xr)
            y.square().sum().backward()  # the backward solve too (vector-Jacobian products, rounded as well)
            block.inverse(y.detach())
        blocks[declare] = (block, [str(w.message) for w in record if issubclass(w.category, SolverWarning)])
    # Aiming at float32's floor (as before the policy): the noise is far above it, so samples stall, and every
    # solve (forward, backward, inverse) ends long before max_iter.
    block, warned = blocks[False]
    for stats in (block.forward_stats, block.backward_stats, block.inverse_stats):
        assert stats is not None and stats.tol == pytest.approx(F32_FLOOR)
        assert int(stats.iterations.max()) <= 4 * STALL_WINDOW
        assert not bool(((stats.iterations == stats.max_iter) & ~stats.converged).any())  # none spun to the cap
        assert stats.n_stalled + int(stats.converged.sum()) == stats.batch_size
    assert block.forward_stats.n_stalled > 0 and any("stalled" in w for w in warned)
    # Aiming at TF32's floor (the arithmetic declared, as the flags declare it on a GPU): every sample converges.
    block, warned = blocks[True]
    for stats in (block.forward_stats, block.backward_stats, block.inverse_stats):
        assert stats.tol == pytest.approx(TF32_FLOOR)
        assert stats.all_converged and int(stats.iterations.max()) <= 60
    assert warned == []


@pytest.mark.parametrize("fixed_shape", [False, True])
def test_stall_exit_in_the_blocks_forward_inverse_and_backward(monkeypatch, fixed_shape):
    """Forward, inverse and backward solves of the blocks all stop on stall."""
    monkeypatch.setattr(solvers, "default_fixed_shape", lambda device: fixed_shape)
    shift = torch.linspace(0.5, 1.5, 20)

    def g_forward(w):
        return shift - w  # w + G(w) = shift whatever w: the residual never changes; J_G = -I, so neither the
        # backward one (a = g - a J_G = g + a)

    def g_inverse(w):
        return w + shift  # w - G(w) = -shift whatever w

    x = torch.randn(3, 20)
    cases = [
        (MonotoneBlock(g_forward, solver="anderson", implicit_grad="backward_solve"), "forward"),
        (MonotoneBlock(g_inverse, solver="newton", implicit_grad="backward_solve"), "inverse"),
        (ResidualBlock(g_forward, solver="picard", implicit_grad="backward_solve"), "inverse"),
    ]
    for block, direction in cases:
        xr = x.clone().requires_grad_(True)
        with pytest.warns(SolverWarning, match="3 stalled"):
            y = block(xr)[0] if direction == "forward" else block.inverse(xr)
            y.sum().backward()
        for stats in (getattr(block, f"{direction}_stats"), block.backward_stats):
            assert stats.n_stalled == 3 and stats.iterations.tolist() == [STALL_WINDOW + 1] * 3


def test_stall_exit_leaves_slow_but_real_progress_alone():
    """Plain iteration at L = 0.99 needs ~10.5 iterations per 10% decrease: it must converge, not stall."""
    a = torch.eye(4, dtype=torch.float64)
    rhs = torch.full((3, 4), 3.0, dtype=torch.float64)
    _, stats, _ = solve(lambda w, idx: rhs[idx] - 0.99 * (w @ a), rhs, method="picard", tol=1e-10, max_iter=5000)
    assert stats.all_converged and stats.n_stalled == 0 and int(stats.iterations.max()) > 1000


# -- host synchronisations -----------------------------------------------------------------------------------------


def contraction_map(n=6, b=32):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    a = a / torch.linalg.matrix_norm(a, ord=2)
    rhs = torch.randn(b, n, generator=g, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)

    def f(w, idx):
        return rhs[idx] - 0.9 * torch.tanh(w @ a.T)

    def newton_map(w, idx):
        t = torch.tanh(w @ a.T)
        return f(w, idx), eye + 0.9 * (1 - t * t).unsqueeze(-1) * a

    return f, newton_map, rhs


@pytest.mark.parametrize("check_every", [1, 4])
@pytest.mark.parametrize("method", METHODS)
def test_fixed_shape_solves_sync_once_per_check(method, check_every):
    f, newton_map, x0 = constant_residual()  # never converges, and stalls only after STALL_WINDOW iterations
    counts = {}
    for max_iter in (8, 40):
        with SyncCounter() as syncs, warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            _, stats, _ = solve(
                f,
                x0,
                method=method,
                tol=1e-10,
                max_iter=max_iter,
                newton_map=newton_map,
                fixed_shape=True,
                check_every=check_every,
            )
        assert stats.evaluations == max_iter and stats.n_stalled == 0
        counts[max_iter] = syncs.count
    per_iteration = (counts[40] - counts[8]) / 32
    assert per_iteration <= 1 / check_every
    assert counts[8] <= 8 // check_every + 3  # the checks, and a constant per solve (the warning's count)


def test_fixed_shape_and_compaction_give_the_same_results():
    f, newton_map, rhs = contraction_map()
    for method in METHODS:
        w0, s0, a0 = solve(f, rhs, method=method, newton_map=newton_map, fixed_shape=False)
        w1, s1, a1 = solve(f, rhs, method=method, newton_map=newton_map, fixed_shape=True, check_every=3)
        assert torch.equal(s0.iterations, s1.iterations) and torch.equal(s0.converged, s1.converged)
        assert torch.allclose(w0, w1, rtol=0, atol=1e-14)
        assert s1.evaluations < s0.evaluations + 3  # at most check_every - 1 evaluations past the last sample
        if method == "newton":
            assert torch.allclose(a0, a1, rtol=0, atol=1e-14)


def test_a_block_pass_syncs_once_per_iteration_on_fixed_shapes(monkeypatch):
    """A whole forward pass and backward of an image block (conv DenseNet G): syncs grow by one per iteration."""
    from monoflow_core.nn.conv import ConvDenseNetG

    monkeypatch.setattr(solvers, "default_fixed_shape", lambda device: True)
    torch.manual_seed(0)
    net = ConvDenseNetG(2, (4, 4), depth=2, growth=8).double()  # float64: the cap comes before convergence
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    counts = {}
    for max_iter in (2, 6):
        block = MonotoneBlock(net, solver="anderson", tol=1e-300, max_iter=max_iter, logdet="exact")
        with SyncCounter() as syncs, warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            y, logdet = block(x.clone().requires_grad_(True))
            (y.sum() + logdet.sum()).backward()
        assert block.forward_stats.evaluations == max_iter and block.backward_stats.evaluations == max_iter
        counts[max_iter] = syncs.count
    # 4 more forward and 4 more backward iterations: at most one synchronisation each.
    assert counts[6] - counts[2] <= 8


def test_actnorm_reads_its_flag_without_a_sync_once_known():
    for layer, x in ((ActNorm(3), torch.randn(8, 3)), (ActNorm2d(3), torch.randn(8, 3, 4, 4))):
        layer.train()
        layer(x)  # the data-dependent initialisation
        with SyncCounter() as syncs:
            for _ in range(5):
                layer(x)
        assert syncs.count == 0 and layer.is_initialized
        bias = layer.bias.detach().clone()
        # Any change of the buffer is noticed: a state with the flag off initialises again, from the next batch.
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        state["initialized"] = torch.tensor(False)
        layer.load_state_dict(state)
        assert not layer.is_initialized
        layer(x + 5.0)
        assert layer.is_initialized and not torch.allclose(layer.bias.detach(), bias)


# -- where the choice is applied and stated ----------------------------------------------------------------------------


def test_training_steps_use_the_policy_and_evaluations_full_precision(monkeypatch):
    import dataclasses

    from monoflow_core import FlowConfig, evaluation
    from monoflow_core.training import Trainer

    trainer = Trainer(
        FlowConfig(blocks=2, depth=2, growth=8),
        TrainConfig(batch_size=32, eval_size=50, test_size=50, concat_learnable_from=None),
    )
    assert trainer.precision.requested == "auto" and not trainer.precision.tf32
    seen = []
    trainer.loss_transform = lambda loss: seen.append(("step", tf32_enabled())) or loss
    log_prob = evaluation.log_prob

    def watched_log_prob(*args, **kwargs):
        seen.append(("eval", tf32_enabled()))
        return log_prob(*args, **kwargs)

    monkeypatch.setattr(evaluation, "log_prob", watched_log_prob)
    with tf32_mode(True):  # flags left on by someone else: a step of the default policy turns them off
        trainer.step()
        trainer.evaluate(n=20)
        assert tf32_enabled() == (True, True)  # and restores them
    # A policy with TF32 (a CUDA run's "tf32"): on in the step, off in the evaluation.
    trainer.precision = dataclasses.replace(trainer.precision, tf32=True)
    trainer.step()
    trainer.evaluate(n=20)
    assert seen == [
        ("step", (False, False)),
        ("eval", (False, False)),
        ("step", (True, True)),
        ("eval", (False, False)),
    ]
    trainer.set_precision("HIGHEST")
    assert trainer.train_config.precision == "highest" and not trainer.precision.tf32


def test_the_choice_is_stated_in_config_json_the_log_and_eval_json(tmp_path):
    import json

    from cli_helpers import run

    out = tmp_path / "run"
    code, _, err = run(
        [
            "train",
            "--data",
            "8gaussians",
            "--blocks",
            "1",
            "--batch-size",
            "32",
            "--test-size",
            "50",
            "--iterations",
            "2",
            "--eval-every",
            "0",
            "--no-progress",
            "--precision",
            "TF32",
            "--cudnn-benchmark",
            "on",
            "--out",
            out,
        ]
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["precision"] == "tf32"
    assert config["training"]["cudnn_benchmark"] == "on"  # the request is kept; the CPU has no cuDNN to tune
    stated = config["precision"]
    # On the CPU a TF32 request runs in full precision, and says so.
    assert (stated["requested"], stated["mode"], stated["tf32"], stated["device"]) == ("tf32", "highest", False, "cpu")
    assert stated["tolerance_floor"] == pytest.approx(F32_FLOOR) and "no TF32" in stated["reason"]
    assert stated["cudnn_benchmark"] is False and "no cuDNN" in stated["cudnn_benchmark_reason"]
    assert "precision highest (requested tf32)" in err
    assert "cuDNN benchmark off: requested on, but the cpu has no cuDNN" in err
    code, stdout, err = run(["eval", out / "checkpoint.safetensors", "--json", "--test-size", "50"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["precision"] == {
        "arithmetic": "float64",
        "tf32": False,
        "device": "cpu",
        "dtype": "float64",
        "tolerance_floor": pytest.approx(10 * torch.finfo(torch.float64).eps),
        "cudnn_benchmark": False,
    }
    code, _, err = run(["train", "--data", "8gaussians", "--precision", "fp8", "--out", tmp_path / "x"])
    assert code == 2 and "--precision" in err and "fp8" in err
    code, _, err = run(["train", "--data", "8gaussians", "--cudnn-benchmark", "always", "--out", tmp_path / "y"])
    assert code == 2 and "--cudnn-benchmark" in err and "always" in err
