"""Blocks and flows in float64: round trips, exact log-dets, implicit gradients, Theorem 4, estimators."""

import math

import pytest
import torch
from torch import nn

from monoflow_core import (
    ActNorm,
    FlowConfig,
    InverseResidualBlock,
    MonotoneBlock,
    PositiveScale,
    ResidualBlock,
    build_flow,
)
from monoflow_core.flow import Flow
from monoflow_core.nn import DenseNetG, LipschitzMLP

DT = torch.float64
TIGHT = {"tol": 1e-13, "max_iter": 500}
BLOCKS = {"monotone": MonotoneBlock, "residual": ResidualBlock, "inverse_residual": InverseResidualBlock}


class TanhG(nn.Module):
    """A user-supplied G with parameters that is not one of the project's JacobianNets."""

    def __init__(self, n: int, L: float = 0.9) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.L = L

    def forward(self, w):
        weight = self.lin.weight / torch.linalg.matrix_norm(self.lin.weight, ord=2)
        return self.L * torch.tanh(nn.functional.linear(w, weight, self.lin.bias))


def make_g(kind: str, n: int):
    if kind == "densenet":
        return DenseNetG(n, depth=2, growth=8, coeff=0.9, lip_coeff=0.98)
    if kind == "mlp":
        return LipschitzMLP(n, hidden=[16], activation="clipswish", coeff=0.95)
    if kind == "module":
        return TanhG(n)
    return lambda w: 0.9 * torch.tanh(w)  # parameter-free plain callable


def autograd_logdet(fn, x):
    return torch.stack(
        [
            torch.linalg.slogdet(
                torch.autograd.functional.jacobian(fn, xi.unsqueeze(0)).reshape(x.shape[1], x.shape[1])
            ).logabsdet
            for xi in x
        ]
    )


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
@pytest.mark.parametrize("g_kind", ["densenet", "mlp", "module", "callable"])
@pytest.mark.parametrize("solver", ["newton", "anderson", "picard"])
def test_block_round_trip_and_exact_logdet(formulation, g_kind, solver):
    torch.manual_seed(0)
    n = 3
    g = make_g(g_kind, n)
    if isinstance(g, nn.Module):
        g = g.double()
    block = BLOCKS[formulation](g, solver=solver, **TIGHT)
    x = torch.randn(16, n, dtype=DT) * 2
    y, logdet = block(x)
    assert logdet.shape == (16,)
    assert float((block.inverse(y) - x).detach().abs().max()) <= 1e-8
    ref = autograd_logdet(lambda v: block(v)[0], x[:5])
    assert torch.allclose(logdet[:5], ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
def test_solver_statistics_are_reported(formulation):
    torch.manual_seed(0)
    block = BLOCKS[formulation](DenseNetG(2, depth=2, growth=8).double(), solver="anderson", **TIGHT)
    x = torch.randn(32, 2, dtype=DT)
    y, _ = block(x)
    block.inverse(y)
    stats = [s for s in (block.forward_stats, block.inverse_stats) if s is not None]
    # monotone: both directions solve; residual: only the inverse; inverse residual: only the forward
    assert len(stats) == (2 if formulation == "monotone" else 1)
    for s in stats:
        assert s.all_converged and s.iterations.shape == (32,) and float(s.residual.max()) <= 1e-13


@pytest.mark.parametrize("formulation", ["monotone", "residual", "inverse_residual", "mixed"])
def test_ten_block_flow_round_trip_and_logdet(formulation):
    torch.manual_seed(1)
    form = ["monotone", "residual", "inverse_residual"] * 3 + ["monotone"] if formulation == "mixed" else formulation
    flow = build_flow(FlowConfig(formulation=form, blocks=10, actnorm=True, **TIGHT)).double()
    x = torch.randn(64, 2, dtype=DT) * 2
    flow.train()
    flow(x)  # ActNorm data init
    flow.eval()
    z, logdet = flow(x)
    assert float((flow.inverse(z) - x).detach().abs().max()) <= 1e-8
    ref = autograd_logdet(lambda v: flow(v)[0], x[:4])
    assert torch.allclose(logdet[:4], ref, atol=1e-8, rtol=0)
    assert flow.logdet_is_exact


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
@pytest.mark.parametrize("implicit_grad", ["one_step", "backward_solve"])
def test_log_prob_gradients_match_finite_differences(formulation, implicit_grad):
    torch.manual_seed(2)
    cfg = FlowConfig(formulation=formulation, blocks=2, depth=2, growth=8, implicit_grad=implicit_grad, **TIGHT)
    flow = build_flow(cfg).double()
    x = (torch.randn(3, 2, dtype=DT) * 1.5).requires_grad_(True)
    params = [p for p in flow.parameters() if p.requires_grad]

    def f(x_, *ps):
        with torch.nn.utils.stateless._reparametrize_module(
            flow,
            {
                name: p
                for (name, _), p in zip(
                    [(n, q) for n, q in flow.named_parameters() if q.requires_grad], ps, strict=True
                )
            },
        ):
            return flow.log_prob(x_)

    assert torch.autograd.gradcheck(
        f, (x, *[p.detach().clone().requires_grad_(True) for p in params]), eps=1e-6, atol=1e-6, rtol=1e-5
    )


def test_backward_solve_and_one_step_agree_in_higher_dimension():
    torch.manual_seed(3)
    n = 20  # above ONE_STEP_MAX_DIM, so "auto" uses the backward solve
    grads = {}
    for mode in ("one_step", "backward_solve", "auto"):
        torch.manual_seed(3)
        block = MonotoneBlock(LipschitzMLP(n, hidden=[32], activation="cpila").double(), implicit_grad=mode, **TIGHT)
        x = torch.randn(8, n, dtype=DT, requires_grad=True)
        y, logdet = block(x)
        (y.pow(2).sum() + logdet.sum()).backward()
        grads[mode] = (x.grad.clone(), [p.grad.clone() for p in block.parameters()])
        if mode != "one_step":
            assert block.backward_stats is not None and block.backward_stats.all_converged
    for mode in ("backward_solve", "auto"):
        assert torch.allclose(grads[mode][0], grads["one_step"][0], atol=1e-10)
        for a, b in zip(grads[mode][1], grads["one_step"][1], strict=True):
            assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("L", [0.5, 0.9])
def test_theorem4_derivative_range_in_one_dimension(L):
    """Monotone block derivative lies in [(1-L)/(1+L), (1+L)/(1-L)] and exceeds the residual range [1-L, 1+L]."""
    x = torch.linspace(-6, 6, 2001, dtype=DT).unsqueeze(1)
    lo, hi = (1 - L) / (1 + L), (1 + L) / (1 - L)
    # G(w) = L * sin(w) spans slopes in [-L, L]; the monotone block reaches both ends of its range.
    for g in (lambda w: L * torch.sin(w), lambda w: L * torch.tanh(3 * w) / 3):
        mono = MonotoneBlock(g, **TIGHT)
        resid = ResidualBlock(g, **TIGHT)
        d_mono = torch.exp(mono(x)[1])
        d_res = torch.exp(resid(x)[1])
        assert float(d_mono.min()) >= lo - 1e-12 and float(d_mono.max()) <= hi + 1e-12
        assert float(d_res.min()) >= 1 - L - 1e-12 and float(d_res.max()) <= 1 + L + 1e-12
    d_mono = torch.exp(MonotoneBlock(lambda w: L * torch.sin(w), **TIGHT)(x)[1])
    assert float(d_mono.max()) > 1 + L and float(d_mono.min()) < 1 - L
    assert float(d_mono.max()) == pytest.approx(hi, rel=1e-2)
    assert float(d_mono.min()) == pytest.approx(lo, rel=1e-2)


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
def test_estimator_mean_within_standard_error_of_exact(formulation):
    torch.manual_seed(4)
    n = 6
    g = LipschitzMLP(n, hidden=[16], activation="clipswish", coeff=0.7).double()  # Lip <= 0.49: finite variance
    exact_block = BLOCKS[formulation](g, logdet="exact", **TIGHT)
    est_block = BLOCKS[formulation](g, logdet="estimator", **TIGHT)
    est_block.estimator.n_exact_terms_eval = 1
    x = torch.randn(4, n, dtype=DT)
    with torch.no_grad():
        exact = exact_block(x)[1]
        draws = torch.stack([est_block(x)[1] for _ in range(400)])
    assert not est_block.last_logdet_exact and exact_block.last_logdet_exact
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool((se > 0).all())
    assert bool(((mean - exact).abs() <= 4 * se + 1e-12).all()), (mean, exact, se)


def test_estimator_gradient_is_unbiased_for_neumann_and_plain():
    torch.manual_seed(5)
    n = 5
    g = LipschitzMLP(n, hidden=[12], activation="clipswish", coeff=0.7).double()
    x = torch.randn(3, n, dtype=DT)
    exact_block = MonotoneBlock(g, logdet="exact", **TIGHT)
    exact_grad = torch.autograd.grad(exact_block(x)[1].sum(), list(g.parameters()))
    for neumann in (True, False):
        block = MonotoneBlock(g, logdet="estimator", **TIGHT)
        block.estimator.neumann_grad = neumann
        acc = [torch.zeros_like(p) for p in g.parameters()]
        sq = [torch.zeros_like(p) for p in g.parameters()]
        draws = 300
        for _ in range(draws):
            gr = torch.autograd.grad(block(x)[1].sum(), list(g.parameters()))
            for a, s, v in zip(acc, sq, gr, strict=True):
                a += v
                s += v * v
        for a, s, e in zip(acc, sq, exact_grad, strict=True):
            mean = a / draws
            se = ((s / draws - mean**2).clamp_min(0) / draws).sqrt()
            assert bool(((mean - e).abs() <= 5 * se + 1e-9).all())


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
def test_estimator_value_in_training_equals_no_grad_value_with_backward_solve(formulation):
    # Regression: the series' vector-Jacobian products were taken with respect to w itself, which fired the
    # backward-solve hook registered on w (a wrong product and a full implicit solve per product).
    torch.manual_seed(6)
    n = 20
    g = LipschitzMLP(n, hidden=[24], activation="clipswish", coeff=0.7).double()
    block = BLOCKS[formulation](g, logdet="estimator", implicit_grad="backward_solve", **TIGHT)
    block.estimator.n_exact_terms = block.estimator.n_exact_terms_eval = 3
    x = torch.randn(4, n, dtype=DT, requires_grad=True)
    torch.manual_seed(11)
    _, train_value = block(x)
    train_value.sum().backward()  # the hook runs once, here
    torch.manual_seed(11)
    with torch.no_grad():
        _, eval_value = block(x)
    assert torch.allclose(train_value.detach(), eval_value, rtol=1e-10, atol=1e-10)


def test_generic_g_exact_logdet_gradient_with_backward_solve_matches_finite_differences():
    # A plain nn.Module G (no forward-mode Jacobian) in 18 dimensions: the exact log-det's Jacobian comes from
    # reverse-mode products, which must not trigger the backward-solve hook on w.
    torch.manual_seed(7)
    n = 18
    lin = nn.Linear(n, n).double()
    with torch.no_grad():
        lin.weight.mul_(0.6 / torch.linalg.matrix_norm(lin.weight, ord=2))
    g = nn.Sequential(lin, nn.Tanh())
    block = MonotoneBlock(g, logdet="exact", implicit_grad="backward_solve", **TIGHT)
    x = torch.randn(2, n, dtype=DT, requires_grad=True)
    c = torch.randn(2, n, dtype=DT)

    def objective(inp):
        y, ld = block(inp)
        return (y * c).sum() + ld.sum()

    (grad,) = torch.autograd.grad(objective(x), x)
    eps = 1e-6
    fd = torch.zeros_like(x)
    with torch.no_grad():
        for i in range(2):
            for j in range(0, n, 5):
                e = torch.zeros_like(x)
                e[i, j] = eps
                fd[i, j] = (objective(x + e) - objective(x - e)) / (2 * eps)
    cols = list(range(0, n, 5))
    assert torch.allclose(grad[:, cols], fd[:, cols], rtol=1e-5, atol=1e-7)


def test_actnorm_and_positive_scale():
    torch.manual_seed(6)
    x = torch.randn(500, 3, dtype=DT) * torch.tensor([0.1, 2.0, 5.0], dtype=DT) + 3
    an = ActNorm(3).double()
    y, logdet = an(x)
    assert torch.allclose(y.mean(0), torch.zeros(3, dtype=DT), atol=1e-10)
    # variance floor 0.2: the first feature (var 0.01) is scaled by 1/sqrt(0.2), the others to unit variance
    assert torch.allclose(y[:, 1:].var(0, unbiased=False), torch.ones(2, dtype=DT), atol=1e-10)
    assert float((an.inverse(y) - x).detach().abs().max()) < 1e-12
    ref = autograd_logdet(lambda v: an(v)[0], x[:3])
    assert torch.allclose(logdet[:3], ref, atol=1e-12)
    ps = PositiveScale(3).double()
    with torch.no_grad():
        ps.log_scale.copy_(torch.tensor([0.5, -1.0, 0.0]))
    y, logdet = ps(x)
    assert float((ps.inverse(y) - x).detach().abs().max()) < 1e-12
    assert torch.allclose(logdet, torch.full((500,), -0.5, dtype=DT))


def test_flow_log_prob_integrates_to_one_and_samples():
    torch.manual_seed(7)
    flow = build_flow(FlowConfig(blocks=3, depth=2, growth=8)).double()
    with torch.no_grad():
        ticks = torch.linspace(-10, 10, 301, dtype=DT)
        xx, yy = torch.meshgrid(ticks, ticks, indexing="xy")
        grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
        mass = float(flow.log_prob(grid).exp().sum() * (ticks[1] - ticks[0]) ** 2)
    assert mass == pytest.approx(1.0, abs=2e-3)
    s = flow.sample(100, temperature=0.5)
    assert s.shape == (100, 2) and s.dtype == DT and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="shape"):
        flow(torch.zeros(4, 3, dtype=DT))


def test_flow_container_accepts_custom_layers():
    flow = Flow([MonotoneBlock(lambda w: 0.5 * torch.sin(w), **TIGHT), ActNorm(2, data_init=False)], (2,)).double()
    x = torch.randn(10, 2, dtype=DT)
    z, _ = flow(x)
    assert float((flow.inverse(z) - x).detach().abs().max()) < 1e-10
    assert flow.sample(5).shape == (5, 2)


def test_float32_flow_converges_without_spinning():
    torch.manual_seed(8)
    flow = build_flow(FlowConfig(tol=1e-9))  # below float32 resolution: must be raised, not spun on
    x = torch.randn(200, 2) * 2
    flow(x)
    for stats in flow.solver_stats():
        assert stats["forward"].all_converged
        assert int(stats["forward"].iterations.max()) <= 20
