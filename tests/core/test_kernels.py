"""The compiled kernels (monoflow_core.fused.kernels) against the PyTorch kernels of the fused path, in float64.

tests/core/test_fast.py runs its agreement tests (values, log-dets, parameter and input gradients against the
generic autograd path, gradcheck, solver statistics) on both kernel sets; here: the pieces the compiled kernels
add (their exp2, their Newton solve per sample, the buffers the backward reads) and how the engine chooses them.
"""

import threading
import warnings

import numpy as np
import pytest
import torch

from monoflow_core import FlowConfig, build_flow, fused
from monoflow_core.fused import (
    COMPILER,
    KERNEL_SETS,
    SETTINGS,
    dispatch,
    fold,
    fold_compiled,
    kernels,
    kernels_fold,
    newton,
    plan,
    run,
    warm,
    workspace,
)
from monoflow_core.solvers import STALL_WINDOW, SolverWarning

DT = torch.float64

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")


@pytest.fixture(autouse=True)
def _compiled():
    assert fused.kernels_ready(DT, wait=True) and fused.kernels_ready(torch.float32, wait=True)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 4e-7), (np.float64, 4e-16)])
def test_exp2_matches_numpy_to_a_few_ulps(dtype, tol):
    y = -np.concatenate([np.linspace(0.0, 30.0, 20001), np.geomspace(1e-12, 120.0, 5000)]).astype(dtype)
    out, ptmp = np.empty_like(y), np.empty_like(y)
    ibuf = np.empty(y.shape, kernels.exp2_bits(dtype))
    kernels._exp2(
        y, out, ptmp, ibuf, ibuf.view(dtype), kernels.exp2_coefficients(dtype), kernels.constants(dtype), y.shape[0]
    )
    want = np.exp2(y.astype(np.float64))
    assert np.max(np.abs(out / want - 1.0)) < tol
    assert out[0] == 1.0  # 2^0 exactly: Pila's linear branch must be untouched


#: The fused activations: CPila (Monotone Flows) and CLipSwish (the i-DenseNet baseline, learnable beta).
ACTIVATIONS = ["cpila", "clipswish"]


def _spread_betas(flow):
    """Move every CLipSwish beta off its initial value (one shared value would hide a mix-up of layers or blocks)."""
    with torch.no_grad():
        for module in flow.modules():
            if hasattr(module, "beta_raw"):
                module.beta_raw.add_(torch.randn(()) * 1.5)
    return flow


def _solve_pair(sign, activation="cpila"):
    """The kernel's and the PyTorch freezing Newton solve of one block on a wide spread of right-hand sides."""
    torch.manual_seed(4)
    flow = _spread_betas(build_flow(FlowConfig(blocks=1, depth=2, growth=8, activation=activation)).double())
    block = flow.layers[0]
    block.tol, block.max_iter = 1e-12, 50
    folded = fused.fold_nets([block.net])
    weights = folded.block(0)
    rhs = (torch.randn(2, 300, dtype=DT) * torch.logspace(-3, 1.3, 300, dtype=DT)).detach()
    views = workspace.Workspace(weights, 1, 300, rhs).block(0)
    w_torch, stats_torch = newton.newton_solve(weights, rhs, sign, 1e-12, 50, "torch", views)
    ws = workspace.Workspace(folded, 1, 300, rhs)
    setup = (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, 0.0, 0.0)
    w_kernel, _, (stats_kernel,) = dispatch.kernel_run(
        rhs.t(), [block], folded, [setup], [sign], ["kernel"], [ws], [(0, 300)]
    )
    return (w_torch, stats_torch, views.jacobian_map), (w_kernel.t(), stats_kernel, ws.jacobian_maps()[0])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kernel_newton_matches_the_pytorch_solve_per_sample(sign, activation):
    """Same iterate, Jacobian and iteration count for every sample (so the same safeguard and stopping rule)."""
    (w0, s0, a0), (w1, s1, a1) = _solve_pair(sign, activation)
    assert len(set(s0.iterations.tolist())) >= 2  # samples really stop at different iterations
    assert torch.equal(s0.iterations, s1.iterations)
    assert torch.equal(s0.converged, s1.converged) and s1.all_converged
    assert float(s1.residual.max()) <= s1.tol
    assert torch.allclose(w0, w1, atol=1e-12, rtol=0)
    assert torch.allclose(a0, a1, atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_training_forward_fills_the_workspace_like_the_pytorch_kernels(activation):
    """The backward pass reads the final evaluation of every block from the workspace: both kernels write the same."""
    torch.manual_seed(5)
    flow = build_flow(
        FlowConfig(blocks=3, formulation=["monotone", "residual", "inverse_residual"], activation=activation)
    ).double()
    _spread_betas(flow)
    blocks = list(flow.layers)
    folded = fused.fold_nets([b.net for b in blocks])
    net = fused.FoldedNet.from_tensors([t.detach() for t in folded.tensors()], folded.n, folded.kind)
    run_plan = plan.RunPlan(blocks, net.n, net.kind)
    x = torch.randn(70, 2, dtype=DT) * 2
    ws_torch = workspace.Workspace(net, 3, 70, x)
    y_torch, ld_torch = run.torch_forward(x.t().contiguous(), run_plan, net, ws_torch)
    ws_kernel = workspace.Workspace(net, 3, 70, x)
    y_kernel, ld_kernel = dispatch.kernel_forward(x, run_plan, net, [ws_kernel], [(0, 70)])
    assert torch.allclose(y_torch.t(), y_kernel, atol=1e-12, rtol=0)
    assert torch.allclose(ld_torch, ld_kernel, atol=1e-12, rtol=0)
    # what the compiled backward reads (the compiled kernels leave y and the value polynomial unwritten)
    for name in ("x", "h_all", "e_all", "out"):
        assert torch.allclose(getattr(ws_torch, name), getattr(ws_kernel, name), atol=1e-12, rtol=0), name
    assert torch.allclose(ws_torch.q_all[:, :, 1], ws_kernel.q_all[:, :, 1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_grad_evaluations_and_sampling_match_the_pytorch_kernels(monkeypatch, activation):
    torch.manual_seed(6)
    flow = _spread_betas(build_flow(FlowConfig(blocks=4, tol=1e-12, activation=activation)).double())
    x = torch.randn(2000, 2, dtype=DT) * 2
    z = torch.randn(500, 2, dtype=DT)
    results = []
    for use in (True, False):
        monkeypatch.setattr(SETTINGS, "use_kernels", use)
        with torch.no_grad():
            results.append((flow.log_prob(x), flow.inverse(z), flow.solver_stats()[0]["inverse"].iterations))
    (lp1, inv1, it1), (lp0, inv0, it0) = results
    assert torch.allclose(lp1, lp0, atol=1e-10, rtol=0)
    assert torch.allclose(inv1, inv0, atol=1e-10, rtol=0)
    assert torch.equal(it1, it0)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_a_run_of_blocks_is_inverted_in_one_compiled_call(monkeypatch, activation):
    """Sampling inverts a run of blocks (last first, mixed formulations) in one call, as block-by-block PyTorch."""
    torch.manual_seed(8)
    flow = build_flow(
        FlowConfig(blocks=3, formulation=["monotone", "residual", "inverse_residual"], tol=1e-12, activation=activation)
    )
    flow = _spread_betas(flow.double())
    z = torch.randn(300, 2, dtype=DT)
    calls = _count_kernel_calls(monkeypatch)
    with torch.no_grad():
        x = flow.inverse(z)
    assert len(calls) == 1
    stats = [s["inverse"] for s in flow.solver_stats()]
    assert stats[0] is not None and stats[1] is not None and bool(stats[0].converged.all())
    monkeypatch.setattr(SETTINGS, "use_kernels", False)
    with torch.no_grad():
        x_torch = flow.inverse(z)
        z_back, _ = flow(x)
    assert torch.allclose(x, x_torch, atol=1e-10, rtol=0)
    assert torch.allclose(z_back, z, atol=1e-8, rtol=0)


def test_no_grad_slices_give_the_same_values_and_statistics(monkeypatch):
    """A no-gradient evaluation solved in slices of a few points equals one solve of the whole batch."""
    torch.manual_seed(9)
    flow = build_flow(FlowConfig(blocks=3, tol=1e-12)).double()
    x = torch.randn(301, 2, dtype=DT) * 2
    results = []
    for points in (10_000, 37):
        monkeypatch.setattr(SETTINGS, "no_grad_points", points)
        calls = _count_kernel_calls(monkeypatch)
        with torch.no_grad():
            results.append((flow.log_prob(x), flow.inverse(x), flow.solver_stats()[1]["forward"].iterations))
        assert len(calls) == (2 if points > 301 else 2 * 9)  # forward and inverse, in 9 slices each
    (lp1, inv1, it1), (lp0, inv0, it0) = results
    assert torch.allclose(lp1, lp0, atol=1e-12, rtol=0) and torch.allclose(inv1, inv0, atol=1e-12, rtol=0)
    assert torch.equal(it1, it0)


def _count_kernel_calls(monkeypatch):
    calls = []
    original = kernels.solve_run
    monkeypatch.setattr(kernels, "solve_run", lambda *a: (calls.append(1), original(*a))[1])
    return calls


def test_the_pytorch_kernels_serve_until_the_compiled_ones_are_ready(monkeypatch):
    # With SETTINGS.wait off (the default waits, so that a run never switches kernel sets at a timing-dependent
    # step), the PyTorch kernels serve while the compiled ones are not ready.
    monkeypatch.setattr(SETTINGS, "wait", False)
    calls = _count_kernel_calls(monkeypatch)
    flow = build_flow(FlowConfig(blocks=2)).double()
    x = torch.randn(20, 2, dtype=DT)
    for kit in KERNEL_SETS:
        monkeypatch.setitem(COMPILER.state, (DT, kit), "compiling")
    reference = flow.log_prob(x)
    assert not calls
    for kit in KERNEL_SETS:
        monkeypatch.setitem(COMPILER.state, (DT, kit), "ready")
    assert torch.allclose(flow.log_prob(x), reference, atol=1e-12)
    assert calls


def test_compiling_starts_in_the_background_and_then_serves(monkeypatch):
    started = threading.Event()
    release = threading.Event()

    def slow_compile(dtype, kit):
        started.set()
        release.wait(10)
        COMPILER.state[dtype, kit] = "ready"

    monkeypatch.setattr(COMPILER, "compile", slow_compile)
    monkeypatch.delitem(COMPILER.state, (DT, "train"))
    assert not fused.kernels_ready(DT)  # starts the compile and returns at once
    assert started.wait(10)
    assert not fused.kernels_ready(DT)  # still compiling: the PyTorch kernels serve
    release.set()
    for _ in range(200):
        if fused.kernels_ready(DT):
            break
        threading.Event().wait(0.05)
    assert fused.kernels_ready(DT)


def test_a_failed_compile_warns_once_and_leaves_the_pytorch_kernels_in_charge(monkeypatch):
    def broken(*args):
        raise RuntimeError("no machine code today")

    monkeypatch.setattr(kernels, "solve_run", broken)
    for kit in KERNEL_SETS:
        monkeypatch.delitem(COMPILER.state, (DT, kit))
    with pytest.warns(RuntimeWarning, match="compiled kernels"):
        assert not fused.kernels_ready(DT, wait=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fused.kernels_ready(DT, wait=True)  # no second warning
        flow = build_flow(FlowConfig(blocks=2)).double()
        assert torch.isfinite(flow.log_prob(torch.randn(10, 2, dtype=DT))).all()


def _forget_kernel_state(monkeypatch, dtype):
    """As at the first use in a process (Numba's compiled versions stay compiled: no compile is repeated)."""
    for kit in KERNEL_SETS:
        monkeypatch.delitem(COMPILER.state, (dtype, kit), raising=False)


def test_a_solve_without_gradients_prepares_only_the_solvers_kernels(monkeypatch):
    backward = []
    for module, name in ((kernels_fold, "fold_backward"), (kernels, "backward_run")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original: (backward.append(1), _o(*a))[1])
    solves = _count_kernel_calls(monkeypatch)
    _forget_kernel_state(monkeypatch, DT)
    flow = build_flow(FlowConfig(blocks=2)).double()
    with torch.no_grad():
        flow.log_prob(torch.randn(20, 2, dtype=DT))
    assert COMPILER.state[DT, "solve"] == "ready" and (DT, "train") not in COMPILER.state
    assert solves and not backward  # the compiled kernels served, and nothing of training was prepared
    flow.log_prob(torch.randn(20, 2, dtype=DT)).sum().backward()  # training: the rest of the kernels
    assert COMPILER.state[DT, "train"] == "ready" and backward


def test_the_notices_say_when_a_compile_starts_and_ends(monkeypatch, tmp_path):
    notices = []
    monkeypatch.setattr(COMPILER, "notice", notices.append)
    monkeypatch.setenv("MONOFLOW_CACHE_DIR", str(tmp_path))
    _forget_kernel_state(monkeypatch, DT)
    # Compiled in this process already: a load, announced by nothing.
    assert not COMPILER.expect_compile(DT, "solve")
    assert fused.kernels_ready(DT, wait=True, backward=False)
    assert notices == []
    # A compile (as in a process whose cache does not hold them): said before it starts, with how long, then ready.
    monkeypatch.setattr(COMPILER, "expect_compile", lambda dtype, kit: True)
    _forget_kernel_state(monkeypatch, DT)
    assert fused.kernels_ready(DT, wait=True, backward=False)
    assert len(notices) == 2
    assert "compiling the solver kernels for float64" in notices[0] and " s, once" in notices[0]
    assert str(tmp_path / "numba") in notices[0]
    assert "ready" in notices[1]
    # The cache folder's marker tells a later process that they are there.
    path, text = COMPILER.cache_stamp(DT, "solve")
    assert path.parent == tmp_path / "numba" and path.read_text() == text


def test_the_environment_switch_turns_the_compiled_kernels_off(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    monkeypatch.setattr(SETTINGS, "use_kernels", False)
    flow = build_flow(FlowConfig(blocks=2)).double()
    flow.log_prob(torch.randn(10, 2, dtype=DT)).sum().backward()
    assert not calls


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("learnable", [True, False])
def test_compiled_fold_matches_the_pytorch_fold_and_its_gradients(learnable, dtype, activation):
    """Values and gradients (weights, biases, concatenation K, CLipSwish's beta) of the fold, against PyTorch's
    autograd of it; some layers are scaled above their bound so that the soft normalisation's branch through sigma is
    taken, and two nets have bounds of their own."""
    torch.manual_seed(7)
    flow = build_flow(FlowConfig(blocks=3, depth=3, growth=8, learnable_concat=learnable, activation=activation))
    flow = _spread_betas(flow.to(dtype))
    nets = [blk.net for blk in flow.layers]
    with torch.no_grad():
        nets[0].layers[1].weight.mul_(5.0)
        nets[2].final.weight.mul_(5.0)
        for g in nets:
            g.concat_k.add_(torch.randn_like(g.concat_k))
    nets[1].layers[0].coeff = 0.5  # each net's own layer bounds (the fold must not take block 0's for all)
    nets[2].final.coeff = 0.7
    params = [p for g in nets for p in g.parameters() if p.requires_grad]
    assert sum(p.dim() == 0 for p in params) == (9 if activation == "clipswish" else 0)  # the betas
    results = []
    for fold_fn in (fold_compiled.kernel_fold, fold.fold_nets_torch):
        folded = fold_fn(nets)
        cot = [
            torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=dtype)
            for i, t in enumerate(folded.tensors())
        ]
        loss = sum((t * c).sum() for t, c in zip(folded.tensors(), cot, strict=True))
        results.append(([t.detach() for t in folded.tensors()], torch.autograd.grad(loss, params)))
    (v1, g1), (v0, g0) = results
    tight = dtype == torch.float64
    for a, b in zip(v1, v0, strict=True):
        assert torch.allclose(a, b, atol=1e-12 if tight else 1e-6, rtol=1e-12 if tight else 1e-5)
    for a, b in zip(g1, g0, strict=True):
        assert float((a - b).abs().max()) <= (1e-10 if tight else 1e-4) * float(a.abs().max()) + 1e-12


def test_a_batch_split_over_threads_gives_the_same_values_gradients_and_statistics(monkeypatch):
    """With two intra-op threads the kernels run two halves of the batch in parallel; the weight gradients of the
    halves are summed. Everything must equal the one-part run."""
    torch.manual_seed(8)
    flow = build_flow(FlowConfig(blocks=3)).double()
    x = torch.randn(300, 2, dtype=DT) * 2
    params = [p for p in flow.parameters() if p.requires_grad]
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert len(dispatch.kernel_parts(300)) == count
            xi = x.clone().requires_grad_(True)
            lp = flow.log_prob(xi)
            grads = torch.autograd.grad(lp.sum(), [xi, *params])
            results.append((lp.detach(), grads, flow.solver_stats()[1]["forward"].iterations.clone()))
            with torch.no_grad():
                results[-1] += (flow.inverse(x), flow.log_prob(x))
    finally:
        torch.set_num_threads(threads)
    one, two = results
    assert torch.equal(one[2], two[2])
    for a, b in [(one[0], two[0]), *zip(one[1], two[1], strict=True), (one[3], two[3]), (one[4], two[4])]:
        assert torch.allclose(a, b, atol=1e-11, rtol=1e-11)


def test_the_warm_up_draws_no_random_numbers_and_covers_every_architecture(monkeypatch):
    """The compile may run in a background thread: it must leave the global generator alone. And its compiled
    versions must serve any depth, width and formulation: a real step, an evaluation and an inverse afterwards
    compile nothing new (a new version would be compiled in the caller's thread, for half a minute)."""
    state = torch.get_rng_state()
    warm.run_kernels_once(DT, True, lambda: None)
    assert torch.equal(torch.get_rng_state(), state)
    dispatchers = [kernels.solve_run, kernels.backward_run, kernels_fold.fold_forward, kernels_fold.fold_backward]
    before = [len(d.signatures) for d in dispatchers]
    torch.manual_seed(9)
    for activation in ("cpila", "clipswish", "crelu"):
        flow = build_flow(
            FlowConfig(
                blocks=3,
                depth=5,
                growth=6,
                activation=activation,
                formulation=["monotone", "residual", "inverse_residual"],
            )
        ).double()
        flow.log_prob(torch.randn(20, 2, dtype=DT)).sum().backward()
        with torch.no_grad():
            flow.inverse(torch.randn(20, 2, dtype=DT))
    assert [len(d.signatures) for d in dispatchers] == before


@pytest.mark.parametrize("where", [0, 2])
@pytest.mark.parametrize("grad", [True, False])
def test_non_finite_points_are_not_reported_converged(where, grad):
    """A NaN input must fail to converge on the compiled kernels as on the PyTorch ones (and say so), and leave the
    other points' solves alone (first in the batch it once made every residual NaN: all points ran to the cap)."""
    torch.manual_seed(10)
    flow = build_flow(FlowConfig(blocks=1, max_iter=50)).double()
    x = torch.randn(6, 2, dtype=DT)
    x[where, 0] = float("nan")
    with pytest.warns(SolverWarning, match="1 of 6 samples did not converge"), torch.set_grad_enabled(grad):
        flow.log_prob(x)
    stats = flow.solver_stats()[0]["forward"]
    assert stats.converged.tolist() == [i != where for i in range(6)]
    assert int(stats.iterations[where]) == 50 and bool(torch.isnan(stats.residual[where]))
    others = torch.cat([stats.iterations[:where], stats.iterations[where + 1 :]])
    assert int(others.max()) <= 6


def test_empty_batches_give_empty_results():
    """Sampling 0 points, and densities or inverses of an empty batch, on both kernels and the generic path."""
    flow = build_flow(FlowConfig(blocks=2)).double()
    empty = torch.zeros(0, 2, dtype=DT)
    for use, fast_path in ((True, True), (False, True), (False, False)):
        SETTINGS.use_kernels, flow.fast_path = use, fast_path
        try:
            assert flow.sample(0).shape == (0, 2)
            assert flow.log_prob(empty).shape == (0,)
            with torch.no_grad():
                assert flow.inverse(empty).shape == (0, 2) and flow.log_prob(empty).shape == (0,)
        finally:
            SETTINGS.use_kernels, flow.fast_path = True, True


@pytest.mark.parametrize("fraction", [1, 4, 10**6])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_kernel_compacting_solve_matches_the_pytorch_compacting_solve(monkeypatch, fraction, sign):
    """Without a backward pass converged points leave the batch (after 1/fraction of it has converged): per-point
    solutions, iteration counts and log-dets as the PyTorch compacting solve, whatever the fraction."""
    monkeypatch.setattr(SETTINGS, "compact_fraction", fraction)
    torch.manual_seed(11)
    flow = build_flow(FlowConfig(blocks=1, depth=2, growth=8)).double()
    block = flow.layers[0]
    block.tol, block.max_iter = 1e-12, 50
    folded = fused.fold_nets([block.net])
    rhs = (torch.randn(2, 300, dtype=DT) * torch.logspace(-3, 1.3, 300, dtype=DT)).detach()
    w_torch, a_torch, s_torch = newton.newton_solve_compact(folded.block(0), rhs, sign, 1e-12, 50, "torch", True)
    setup = (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, 1.0, 0.0)  # w, and log|det(I + sign J)| as the log-det
    w_kernel, logdet, (s_kernel,) = dispatch.kernel_run(
        rhs.t(), [block], folded, [setup], [sign], ["kernel"], None, [(0, 300)]
    )
    assert len(set(s_torch.iterations.tolist())) >= 2
    assert torch.equal(s_torch.iterations, s_kernel.iterations) and s_kernel.all_converged
    assert torch.allclose(w_torch.t(), w_kernel, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(a_torch.permute(2, 0, 1)).abs().log(), logdet, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_top_singular_pair_gives_the_exact_spectral_norm(dtype, tol):
    """The fold's spectral norms (Gram eigenproblem): tall, wide, square, repeated top value, rank one, zero."""
    rng = np.random.default_rng(10)
    q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    cases = [rng.standard_normal(shape) for shape in ((8, 2), (8, 18), (8, 34), (2, 50), (5, 5))]
    cases += [3.0 * q, np.outer(rng.standard_normal(6), rng.standard_normal(3)), np.zeros((3, 7))]
    for w in cases:
        w = w.astype(dtype)
        u, v = np.empty(w.shape[0], dtype), np.empty(w.shape[1], dtype)
        kernels_fold._top_singular_pair(w, u, v)
        sigma = float(u.astype(np.float64) @ w.astype(np.float64) @ v.astype(np.float64))
        exact = float(np.linalg.svd(w.astype(np.float64), compute_uv=False)[0])
        assert abs(sigma - exact) <= tol * max(exact, 1.0), (w.shape, sigma, exact)
        assert np.isfinite(u).all() and np.isfinite(v).all()
        if exact > 0:
            assert abs(np.linalg.norm(u) - 1.0) < 10 * tol and abs(np.linalg.norm(v) - 1.0) < 10 * tol


def test_the_compiled_stall_test_is_the_pytorch_one():
    """The stall exit of the compiled kernels (``kernels._stalls``) and of the PyTorch kernels (``newton.StallTest``)
    stop the same points at the same iterations: a flat residual after the first iteration's reference (STALL_WINDOW
    more), real progress at 0.997 per iteration (never: 10% takes 35 iterations), fast progress then flat, a NaN
    residual (no reference ever), and a flat residual whose would-be stopping point is a rejected Newton candidate
    (it stops at the next, accepted, point instead)."""
    iterations = 3 * STALL_WINDOW
    k = np.arange(1, iterations + 1, dtype=np.float64)
    merits = np.stack(
        [
            np.ones_like(k),
            0.997**k,
            np.maximum(0.5**k, 0.5**10),
            np.full_like(k, np.nan),
            np.ones_like(k),
        ]
    )
    rejected = np.zeros(merits.shape, bool)
    rejected[4, STALL_WINDOW] = True  # iteration STALL_WINDOW + 1
    want = [STALL_WINDOW + 1, None, 10 + STALL_WINDOW, STALL_WINDOW, STALL_WINDOW + 2]

    test = newton.StallTest()
    torch_stops: list[int | None] = [None] * len(merits)
    for it in range(1, iterations + 1):
        rej = torch.from_numpy(rejected[:, it - 1]) if it > 1 else None
        stuck = test.update(torch.from_numpy(merits[:, it - 1]).unsqueeze(0), rej, it)
        for p in range(len(merits)):
            if stuck is not None and bool(stuck[p]) and torch_stops[p] is None:
                torch_stops[p] = it

    cst = kernels.constants(np.float64)
    bar, last = np.full(len(merits), np.inf), np.zeros(len(merits), np.int64)
    plain = np.zeros(len(merits), bool)
    kernel_stops: list[int | None] = [None] * len(merits)
    for it in range(1, iterations + 1):
        for p in range(len(merits)):
            if kernel_stops[p] is not None:
                continue
            m = merits[p, it - 1]
            # a rejected candidate: a previous accepted residual below this one, and not a plain step
            prev_res = np.array([0.5 * m if rejected[p, it - 1] else -1.0] * len(merits))
            if kernels._stalls(p, m, m * m, prev_res, plain, bar, last, it, cst[10], cst[11], 0.0):
                kernel_stops[p] = it
    assert torch_stops == want
    assert kernel_stops == want


@pytest.mark.parametrize("at", [3, STALL_WINDOW + 5])
def test_the_stall_test_follows_a_compacting_solve(at):
    """A compacting solve drops finished points from its batch (``StallTest.select``), before the test has recorded
    anything (its first ``STALL_WINDOW - 1`` iterations are only kept) or after: the points still in play stop where
    they would without the compaction."""
    iterations = 3 * STALL_WINDOW
    k = torch.arange(1, iterations + 1, dtype=DT)
    merits = torch.stack([torch.ones_like(k), 0.5**k, torch.clamp(0.5**k, min=0.5**7), torch.full_like(k, 2.0)])
    rejected = torch.zeros(merits.shape, dtype=torch.bool)
    rejected[0, STALL_WINDOW : STALL_WINDOW + 9] = True  # iterations 51-59: rejected candidates, no stop on them

    def stops(compact):
        test = newton.StallTest()
        rows = torch.arange(len(merits))
        found = {}
        for it in range(1, iterations + 1):
            if compact and it == at:
                rows = torch.tensor([0, 2, 3])  # point 1 finished (say, converged) and leaves the batch
                test.select(torch.tensor([0, 2, 3]))
            stuck = test.update(merits[rows, it - 1].unsqueeze(0), rejected[rows, it - 1] if it > 1 else None, it)
            for pos, p in enumerate(rows.tolist()):
                if stuck is not None and bool(stuck[pos]):
                    found.setdefault(p, it)
        return found

    whole, compacted = stops(False), stops(True)
    assert whole == {0: STALL_WINDOW + 10, 2: STALL_WINDOW + 7, 3: STALL_WINDOW + 1}  # (point 1 keeps falling)
    assert compacted == whole
