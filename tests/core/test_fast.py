"""The fused exact path agrees with the generic autograd path (the reference) in float64."""

import re
import warnings

import pytest
import torch

from monoflow_core import FlowConfig, build_flow, fused, solvers
from monoflow_core.fused import SETTINGS, fast_eligible, fold, fold_cache, fusable_runs, newton, workspace
from monoflow_core.solvers import STALL_FACTOR, STALL_WINDOW, SolverWarning

DT = torch.float64
TIGHT = {"tol": 1e-13, "max_iter": 200}


@pytest.fixture(params=["compiled", "pytorch"])
def kernels(request, monkeypatch):
    """Run a test on the compiled kernels (monoflow_core.fused.kernels) and on the PyTorch kernels of the fused path."""
    compiled = request.param == "compiled"
    if compiled and not fused.kernels_ready(DT, wait=True):
        pytest.skip("the compiled kernels are unavailable here")
    monkeypatch.setattr(SETTINGS, "use_kernels", compiled)
    return request.param


def both_paths(flow, x, seed=0):
    """Values, log-dets and gradients (input and parameters) from the generic and the fused path."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for fast in (False, True):
        flow.fast_path = fast
        xi = x.clone().requires_grad_(True)
        z, logdet = flow(xi)
        gz = torch.randn(z.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
        gl = torch.randn(logdet.shape, generator=g.manual_seed(seed + 1), dtype=DT)
        params = [p for p in flow.parameters() if p.requires_grad]
        grads = torch.autograd.grad((z * gz).sum() + (logdet * gl).sum(), [xi, *params], allow_unused=True)
        out.append((z.detach(), logdet.detach(), grads))
    flow.fast_path = True
    return out


@pytest.mark.parametrize("formulation", ["monotone", "residual", "inverse_residual"])
@pytest.mark.parametrize("dim,activation", [(2, "cpila"), (1, "crelu"), (3, "cpila"), (2, "clipswish")])
def test_fused_matches_generic(formulation, dim, activation, kernels):
    torch.manual_seed(0)
    cfg = FlowConfig(dim=dim, blocks=4, depth=3, growth=8, activation=activation, formulation=formulation, **TIGHT)
    flow = build_flow(cfg).double()
    assert fusable_runs(list(flow.layers), dim) == [(0, 4)]
    x = torch.randn(40, dim, dtype=DT) * 2
    (z0, l0, g0), (z1, l1, g1) = both_paths(flow, x)
    assert torch.allclose(z0, z1, atol=1e-10, rtol=0)
    assert torch.allclose(l0, l1, atol=1e-10, rtol=0)
    for a, b in zip(g0, g1, strict=True):
        assert b is not None
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    with torch.no_grad():
        assert float((flow.inverse(z1) - x).abs().max()) < 1e-9
        flow.fast_path = False
        slow_inverse = flow.inverse(z1)
        flow.fast_path = True
        assert torch.allclose(slow_inverse, flow.inverse(z1), atol=1e-10)


def test_fused_runs_split_around_other_layers_and_mixed_formulations(kernels):
    torch.manual_seed(1)
    cfg = FlowConfig(
        blocks=4,
        formulation=["monotone", "residual", "inverse_residual", "monotone"],
        actnorm=True,
        actnorm_input=True,
        **TIGHT,
    )
    flow = build_flow(cfg).double()
    layers = list(flow.layers)
    assert fusable_runs(layers, 2) == [(1, 2), (3, 4), (5, 6), (7, 8)]
    x = torch.randn(30, 2, dtype=DT)
    flow.train()
    flow(x)  # data-dependent ActNorm initialisation
    (z0, l0, g0), (z1, l1, g1) = both_paths(flow, x)
    assert torch.allclose(z0, z1, atol=1e-10) and torch.allclose(l0, l1, atol=1e-10)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_eligibility_rules():
    flow = build_flow(FlowConfig(blocks=1))
    block = flow.layers[0]
    assert fast_eligible(block, 2)
    assert not fast_eligible(block, 3)  # wrong dimension
    for attr, value in (("logdet_mode", "estimator"), ("solver", "anderson"), ("implicit_grad", "backward_solve")):
        old = getattr(block, attr)
        setattr(block, attr, value)
        assert not fast_eligible(block, 2), attr
        setattr(block, attr, old)
    # CLipSwish (learnable beta, folded into the weights) is fused; a plain, non-concatenated LipSwish is not
    assert fast_eligible(build_flow(FlowConfig(blocks=1, activation="clipswish")).layers[0], 2)
    assert not fast_eligible(build_flow(FlowConfig(blocks=1, activation="lipswish")).layers[0], 2)


def idensenet_flow(dtype, formulation="residual", learnable_concat=True, seed=0):
    """The i-DenseNet toy model (assets/presets/paper-toy-idensenet.json: residual blocks, DenseNet G 3 x 16,
    CLipSwish, exact log-det), 4 blocks here, with every beta and concatenation weight moved off its initial value
    (all betas equal would hide a mix-up of layers or blocks)."""
    torch.manual_seed(seed)
    cfg = FlowConfig(
        dim=2,
        blocks=4,
        depth=3,
        growth=16,
        activation="clipswish",
        formulation=formulation,
        learnable_concat=learnable_concat,
        **TIGHT,
    )
    flow = build_flow(cfg).to(dtype)
    with torch.no_grad():
        for blk in flow.layers:
            for act in blk.net.activations:
                act.beta_raw.add_(torch.randn(()) * 1.5)
            blk.net.concat_k.add_(torch.randn_like(blk.net.concat_k))
    return flow


@pytest.mark.parametrize("formulation", ["residual", "monotone", "inverse_residual"])
@pytest.mark.parametrize("learnable_concat", [True, False])
def test_fused_clipswish_matches_generic_including_every_beta(formulation, learnable_concat, kernels):
    """Outputs, log-dets, inverse and every gradient (each beta_raw, through the exact log-det's second-order terms
    too) of the i-DenseNet toy model, fused against generic in float64; with the concatenation weights frozen (the
    preset's first half) and learnable (after ``concat_learnable_from``)."""
    flow = idensenet_flow(DT, formulation, learnable_concat)
    assert fusable_runs(list(flow.layers), 2) == [(0, 4)]
    names = ["x", *(name for name, p in flow.named_parameters() if p.requires_grad)]
    assert sum("beta_raw" in name for name in names) == 12
    assert any("concat_k" in name for name in names) == learnable_concat
    x = torch.randn(60, 2, dtype=DT) * 2
    (z0, l0, g0), (z1, l1, g1) = both_paths(flow, x)
    assert torch.allclose(z0, z1, atol=1e-10, rtol=1e-10)
    assert torch.allclose(l0, l1, atol=1e-10, rtol=1e-10)
    for name, a, b in zip(names, g0, g1, strict=True):
        assert float(a.abs().max()) > 0, name
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-9), name
    with torch.no_grad():
        flow.fast_path = False
        slow_inverse = flow.inverse(z1)
        flow.fast_path = True
        fast_inverse = flow.inverse(z1)
    assert torch.allclose(slow_inverse, fast_inverse, atol=1e-10, rtol=0)
    assert float((fast_inverse - x).abs().max()) < 1e-9


def test_fused_clipswish_matches_generic_in_float32(kernels):
    """The same in float32 (training's dtype), to float32 rounding: relative to each tensor's scale."""
    flow = idensenet_flow(torch.float32)
    x = torch.randn(200, 2) * 2
    params = [p for p in flow.parameters() if p.requires_grad]
    results = []
    for fast in (False, True):
        flow.fast_path = fast
        xi = x.clone().requires_grad_(True)
        lp = flow.log_prob(xi)
        results.append((lp.detach(), torch.autograd.grad(lp.mean(), [xi, *params])))
    (lp0, g0), (lp1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-5, rtol=1e-5)
    for a, b in zip(g0, g1, strict=True):
        assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max()) + 1e-7
    with torch.no_grad():
        z = torch.randn(300, 2)
        flow.fast_path = False
        slow = flow.inverse(z)
        flow.fast_path = True
        assert torch.allclose(slow, flow.inverse(z), atol=1e-4, rtol=0)


def test_fused_solver_statistics_and_non_convergence_warning(kernels):
    torch.manual_seed(2)
    flow = build_flow(FlowConfig(blocks=2, max_iter=1))
    x = torch.randn(64, 2) * 3
    with pytest.warns(SolverWarning, match="did not converge"):
        flow.log_prob(x).sum().backward()
    stats = flow.solver_stats()[0]["forward"]
    assert stats.n_failed > 0 and int(stats.iterations.max()) == 1
    flow.set_solver_options(max_iter=50)
    flow.log_prob(x).sum().backward()
    stats = flow.solver_stats()[0]["forward"]
    assert stats.all_converged and 2 <= int(stats.iterations.max()) <= 10
    assert float(stats.residual.max()) <= stats.tol


STALL_MESSAGE = (
    rf"(\d+) of \d+ samples did not converge \(newton\): (\d+) stalled \(residual not below {STALL_FACTOR:g} x "
    rf"its last value for {STALL_WINDOW} iterations\)"
)


def _stalled_counts(record):
    """``(failed, stalled)`` of every stall warning in ``record``."""
    found = [re.search(STALL_MESSAGE, str(w.message)) for w in record if issubclass(w.category, SolverWarning)]
    return [(int(m.group(1)), int(m.group(2))) for m in found if m]


@pytest.mark.parametrize("grad", [True, False])
def test_fused_solves_stop_on_stall_when_the_tolerance_is_out_of_reach(monkeypatch, kernels, grad):
    """A tolerance below what float64 can reach (the floor of ``effective_tolerance`` lifted, tol 1e-30): every sample
    either lands on an exactly zero residual or stalls at the rounding floor, and stops within a few windows of
    STALL_WINDOW instead of running to max_iter; the stalled samples are flagged, counted and warned of, and their
    points are as good as the arithmetic allows. Forward solves with a backward pass (every sample kept, frozen once
    finished) and without (finished samples leave the batch), and the inverse, on both kernel sets."""
    monkeypatch.setattr(solvers, "arithmetic_floor", lambda dtype, device=None: 0.0)
    torch.manual_seed(12)
    flow = build_flow(FlowConfig(blocks=2, max_iter=1000)).double()
    for block in flow.layers:
        block.tol = 1e-30
    x = torch.randn(200, 2, dtype=DT) * 2
    with warnings.catch_warnings(record=True) as record, torch.set_grad_enabled(grad):
        warnings.simplefilter("always")
        xi = x.clone().requires_grad_(grad)
        z, logdet = flow(xi)
        if grad:
            (gx,) = torch.autograd.grad(z.sum() + logdet.sum(), [xi])
            assert torch.isfinite(gx).all()
    forward = [s["forward"] for s in flow.solver_stats()]
    with warnings.catch_warnings(record=True) as record_inverse, torch.no_grad():
        warnings.simplefilter("always")
        x_back = flow.inverse(z.detach())
    inverse = [s["inverse"] for s in reversed(flow.solver_stats())]  # (the last block is inverted first)
    assert torch.isfinite(logdet).all() and float((x_back - x).abs().max()) < 1e-12
    for stats, warned in ((forward, record), (inverse, record_inverse)):
        assert _stalled_counts(warned) == [(s.n_failed, s.n_stalled) for s in stats]  # one warning per block
        for s in stats:
            assert s.n_stalled > 0 and s.stalled is not None
            assert torch.equal(s.stalled, ~s.converged)  # every sample that failed stalled: none ran to max_iter
            assert int(s.iterations.max()) <= 4 * STALL_WINDOW and s.max_iter == 1000
            assert int(s.iterations[s.stalled].min()) > STALL_WINDOW  # (no stall before a window has passed)
            assert float(s.residual[s.converged].abs().max()) == 0.0  # only an exact solution meets 1e-30
            assert float(s.residual.max()) < 1e-14  # the stalled ones sit at float64's rounding floor


def test_fused_gradients_match_finite_differences(kernels):
    torch.manual_seed(3)
    flow = build_flow(FlowConfig(blocks=2, depth=2, growth=4, **TIGHT)).double()
    x = torch.randn(3, 2, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: flow.log_prob(v), (x,))


@pytest.mark.parametrize("fraction", [1, 4, 10**6])
def test_compacting_solve_matches_the_freezing_solve_per_sample(monkeypatch, fraction):
    """Without a backward pass converged samples leave the batch; each sample's iterate, Jacobian and iteration
    count must be those of the solve that keeps every sample (fraction 1: remove as soon as any converged;
    10**6: never before the end, i.e. frozen in place)."""
    monkeypatch.setattr(SETTINGS, "compact_fraction", fraction)
    torch.manual_seed(4)
    flow = build_flow(FlowConfig(blocks=1, depth=2, growth=8)).double()
    weights = fused.fold_nets([flow.layers[0].net]).block(0)
    # a wide spread of right-hand sides: far points need more Newton iterations than near ones
    rhs = (torch.randn(2, 300, dtype=DT) * torch.logspace(-3, 1.3, 300, dtype=DT)).detach()
    for sign in (1.0, -1.0):
        views = workspace.Workspace(weights, 1, 300, rhs).block(0)
        w_keep, stats_keep = newton.newton_solve(weights, rhs, sign, 1e-12, 50, "keep", views)
        w_drop, a_drop, stats_drop = newton.newton_solve_compact(weights, rhs, sign, 1e-12, 50, "drop", True)
        assert len(set(stats_keep.iterations.tolist())) >= 2  # samples really stop at different iterations
        assert torch.equal(stats_keep.iterations, stats_drop.iterations)
        assert stats_drop.all_converged and float(stats_drop.residual.max()) <= stats_drop.tol
        assert torch.allclose(w_keep, w_drop, atol=1e-12, rtol=0)
        assert torch.allclose(views.jacobian_map, a_drop, atol=1e-12, rtol=0)


def test_pooled_workspaces_never_overwrite_a_live_graph():
    """Training forwards reuse workspaces whose graph is gone; interleaved graphs keep their own buffers."""
    import gc

    torch.manual_seed(6)
    flow = build_flow(FlowConfig(blocks=3, depth=2, growth=8, **TIGHT)).double()
    params = [p for p in flow.parameters() if p.requires_grad]
    x1, x2 = torch.randn(50, 2, dtype=DT), torch.randn(50, 2, dtype=DT) * 2

    def reference(x):
        flow.fast_path = False
        out = torch.autograd.grad(flow.log_prob(x).sum(), params)
        flow.fast_path = True
        return out

    ref1, ref2 = reference(x1), reference(x2)
    # two forwards, then the backward of the first graph twice (retain_graph) around a third forward
    loss1 = flow.log_prob(x1).sum()
    loss2 = flow.log_prob(x2).sum()
    first = torch.autograd.grad(loss1, params, retain_graph=True)
    third = torch.autograd.grad(flow.log_prob(x2).sum(), params)
    again = torch.autograd.grad(loss1, params)
    second = torch.autograd.grad(loss2, params)
    for got, want in ((first, ref1), (again, ref1), (second, ref2), (third, ref2)):
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)
    # once the graphs are gone their workspaces return to the pool, and the next forward takes one
    del loss1, loss2
    gc.collect()
    assert workspace.POOL.free_count() > 0
    before = workspace.POOL.free_count()
    loss = flow.log_prob(x1).sum()
    assert workspace.POOL.free_count() == before - 1
    for a, b in zip(torch.autograd.grad(loss, params), ref1, strict=True):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-9)


def test_newton_safeguard_replaces_worse_steps_by_plain_steps_once():
    w0, r0 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 0.1]])
    res0 = r0.abs()[0]
    cand, prev, plain = newton.safeguard(w0, r0, res0, torch.tensor([[9.0, 9.0]]), None, None)
    assert torch.equal(cand, torch.tensor([[9.0, 9.0]])) and plain is None  # nothing to compare with yet
    # at the new points the first sample's residual grew, the second's fell
    w1, r1 = torch.tensor([[3.0, 1.5]]), torch.tensor([[0.8, 0.01]])
    cand, prev, plain = newton.safeguard(w1, r1, r1.abs()[0], torch.tensor([[7.0, 7.0]]), prev, plain)
    assert torch.equal(cand, torch.tensor([[0.5, 7.0]]))  # plain step w0 - r0 for the first, Newton for the second
    assert plain.tolist() == [True, False]
    assert torch.equal(prev[0], torch.tensor([[1.0, 1.5]]))  # the first keeps its last accepted point
    # the plain step's result is accepted even if its residual is larger than the one it is compared with
    w2, r2 = torch.tensor([[0.5, 7.0]]), torch.tensor([[0.9, 0.001]])
    cand, prev, plain = newton.safeguard(w2, r2, r2.abs()[0], torch.tensor([[0.4, 6.9]]), prev, plain)
    assert torch.equal(cand, torch.tensor([[0.4, 6.9]])) and plain is None


@pytest.mark.parametrize("hidden,gain", [(True, False), (False, False), (True, True)])
def test_fold_layer_backward_against_finite_differences(hidden, gain):
    """The hand-written backward of the fold, with the spectral clamp active for one block and not the other;
    ``gain``: a per-block, differentiated pre-activation factor (CLipSwish's beta) instead of the constant k."""
    torch.manual_seed(7)
    w = torch.randn(2, 4, 5, dtype=DT)
    w[1] *= 0.05  # block 1: sigma below its coefficient (no normalisation); block 0: well above
    left, _, right_h = torch.linalg.svd(w)
    u, v = left[..., 0], right_h[..., 0, :]
    coeff = torch.tensor([0.9, 0.98], dtype=DT)
    assert float(torch.linalg.matrix_norm(w[0], 2)) > 0.9 > float(torch.linalg.matrix_norm(w[1], 2))
    inputs = (
        w.requires_grad_(),
        torch.randn(2, 4, dtype=DT, requires_grad=True),
        torch.rand(2, 5, dtype=DT, requires_grad=True),
    )
    if gain:
        inputs += (torch.tensor([0.7, 1.9], dtype=DT, requires_grad=True),)
    assert torch.autograd.gradcheck(
        lambda a, b, c, *g: fold.FoldLayer.apply(a, b, c, u, v, coeff, hidden, 0.2, 7.2, *g), inputs
    )


def test_no_grad_evaluations_see_every_optimizer_step():
    """The fused Adam kernel updates parameters without bumping their version counters: an evaluation after a step
    must still fold the new weights (a fold remembered across calls once showed the density before training)."""
    from monoflow_core import evaluation
    from monoflow_core.training import make_adam

    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=3, depth=2, growth=8))
    opt = make_adam(flow.parameters(), lr=1e-2)
    x = torch.randn(200, 2) * 2
    points = torch.randn(50, 2)
    for _ in range(3):
        before = evaluation.log_prob(flow, points, chunk=20)
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        after = evaluation.log_prob(flow, points, chunk=20, workers=2)
        with torch.no_grad():
            direct = flow.log_prob(points).double()
        flow.fast_path = False
        with torch.no_grad():
            reference = flow.log_prob(points).double()
        flow.fast_path = True
        assert float((after - before).abs().max()) > 1e-4  # the step changed the model
        assert torch.allclose(after, reference, atol=1e-4)
        assert torch.allclose(direct, reference, atol=1e-4)


def test_one_evaluation_folds_each_run_once_and_the_next_folds_again(monkeypatch):
    """Inside one evaluation call (many chunks, worker threads) the weights are folded once; a later call folds anew."""
    from monoflow_core import evaluation

    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=3, depth=2, growth=8))
    calls = []
    original = fold_cache.fold_nets
    monkeypatch.setattr(fold_cache, "fold_nets", lambda nets: calls.append(len(nets)) or original(nets))
    points = torch.randn(100, 2)
    first = evaluation.log_prob(flow, points, chunk=10, workers=2)
    assert 1 <= len(calls) <= 2 and set(calls) == {3}  # one run of 3 blocks; two threads may race to fold it first
    calls.clear()
    second = evaluation.log_prob(flow, points, chunk=10)
    assert calls == [3]
    assert torch.equal(first, second)


def test_inverse_and_transport_fold_each_run_once(monkeypatch):
    """The inverse pass takes blocks one by one but folds their run in one batch (per call, never across calls)."""
    from monoflow_core.transport import transport_stages

    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=4, depth=2, growth=8)).double()
    calls = []
    original = fold_cache.fold_nets
    monkeypatch.setattr(fold_cache, "fold_nets", lambda nets: calls.append(len(nets)) or original(nets))
    z = torch.randn(30, 2, dtype=DT)
    with torch.no_grad():
        x = flow.inverse(z)
        assert calls == [4]
        flow.inverse(z)
        assert calls == [4, 4]
        flow.fast_path = False
        reference = flow.inverse(z)
        flow.fast_path = True
    assert torch.allclose(x, reference, atol=1e-9)
    calls.clear()
    stages = transport_stages(flow, z, direction="inverse", chunk=10)
    assert calls == [4]
    assert torch.allclose(torch.as_tensor(stages[-1]), x, atol=1e-9)
