"""The power series' terms by forward-mode products (``products="jvp"``): G's linearisation, the same estimate as
vector-Jacobian products, an unbiased gradient, no graph in evaluations, and fewer operators per term."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import monoflow_core.logdet as logdet_module
from monoflow_core import InverseResidualBlock, MonotoneBlock, ResidualBlock
from monoflow_core.logdet import EstimatorSettings, neumann_logdet, resolve_series_products
from monoflow_core.nn import DenseNetG, LipschitzMLP
from monoflow_core.nn.conv import ConvDenseNetG
from monoflow_core.syncs import OperatorCounter

DT = torch.float64
BLOCKS = {"monotone": MonotoneBlock, "residual": ResidualBlock, "inverse_residual": InverseResidualBlock}


NETS = {
    "conv images": (lambda: ConvDenseNetG(2, (4, 4), depth=3, growth=8), (3, 2, 4, 4)),
    "conv flat, clipswish": (lambda: ConvDenseNetG(2, (3, 3), depth=2, growth=6, activation="clipswish"), (3, 18)),
    "dense": (lambda: DenseNetG(5, depth=3, growth=8), (4, 5)),
    "mlp": (lambda: LipschitzMLP(5, hidden=[7, 6], activation="cpila"), (4, 5)),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_linearize_gives_the_value_and_the_forward_mode_product(name):
    torch.manual_seed(0)
    make, shape = NETS[name]
    net = make().double()
    assert net.supports_linearize
    prepared = net.prepare()
    x, t = torch.randn(shape, dtype=DT), torch.randn(shape, dtype=DT)
    reference = net.evaluate(x, prepared).detach()
    _, expected = torch.func.jvp(lambda z: net.evaluate(z, prepared), (x,), (t,))
    with torch.no_grad():
        value, jvp = net.linearize(x, prepared)
    torch.testing.assert_close(value, reference, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(jvp(t), expected.detach(), rtol=1e-12, atol=1e-14)
    # Under autograd the value carries the same graph as evaluate's; the product carries none.
    xr = x.clone().requires_grad_(True)
    value, jvp = net.linearize(xr, prepared)
    (grad,) = torch.autograd.grad(value.sum(), xr)
    (expected_grad,) = torch.autograd.grad(net.evaluate(xr, prepared).sum(), xr)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-13, atol=1e-14)
    product = jvp(t)
    assert not product.requires_grad
    torch.testing.assert_close(product, expected.detach(), rtol=1e-12, atol=1e-14)


def test_which_products_a_series_takes():
    assert resolve_series_products("auto", True) == "jvp"
    assert resolve_series_products("auto", False) == "vjp"  # any other G: its graph's vector-Jacobian products
    assert resolve_series_products("jvp", False) == "vjp"
    assert resolve_series_products("vjp", True) == "vjp"
    assert EstimatorSettings().products == "auto"
    with pytest.raises(ValueError, match=r"products: unknown 'fwd'; choose one of \['auto', 'jvp', 'vjp'\]"):
        EstimatorSettings(products="fwd")
    with pytest.raises(ValueError, match="training needs vjp"):
        logdet_module.power_series_logdet(
            None, torch.Size([2, 3]), "monotone", EstimatorSettings(), training=True, dtype=DT, device="cpu",
            jvp=lambda u: u,
        )  # fmt: skip


def _dense_case(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-sample Jacobian J(theta) = 0.5 tanh(theta) (2 samples, n x n, not symmetric, spectral radius < 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(2, n, n, dtype=DT, generator=gen) / math.sqrt(n)).requires_grad_(True)
    return theta, 0.5 * torch.tanh(theta)


def _products(j: torch.Tensor) -> tuple[Any, Any]:
    """``vjp(u, create_graph) = u^T J`` and ``jvp(u) = J u`` for a batch of dense Jacobians."""

    def vjp(u, create_graph):
        return torch.einsum("bi,bij->bj", u, j if create_graph else j.detach())

    def jvp(u):
        return torch.einsum("bij,bj->bi", j.detach(), u)

    return vjp, jvp


@pytest.mark.parametrize("kind", ["monotone", "residual", "inverse_residual"])
def test_forward_mode_draw_is_the_vjp_draw_of_the_transposed_jacobian(kind):
    """Per draw, exactly: forward-mode products give the value of the vjp series and the gradient that the vjp series
    gives for J^T (the surrogate ``v^T J p`` instead of ``q^T J v``); for a non-symmetric J the two gradients differ."""
    theta, _ = _dense_case(n=5, seed=3)
    point = torch.zeros(2, 5, dtype=DT, requires_grad=True)
    settings = EstimatorSettings(n_exact_terms=3, roulette="poisson", roulette_param=2.0, n_probes=2)
    weights = torch.tensor([0.3, -1.7], dtype=DT)
    results = {}
    for case in ("jvp", "vjp transposed", "vjp"):
        j = 0.5 * torch.tanh(theta)
        vjp, jvp = _products(j.transpose(1, 2) if case == "vjp transposed" else j)
        if case == "jvp":
            vjp = _products(j)[0]
        torch.manual_seed(11)
        value = neumann_logdet(vjp, point, [theta], kind, settings, attach_to=point, jvp=jvp if case == "jvp" else None)
        results[case] = (value.detach(), torch.autograd.grad((weights * value).sum(), theta)[0])
    (v_fwd, g_fwd), (v_t, g_t), (v_rev, g_rev) = results["jvp"], results["vjp transposed"], results["vjp"]
    torch.testing.assert_close(v_fwd, v_rev, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_fwd, v_t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_fwd, g_t, rtol=1e-10, atol=1e-13)
    assert float((g_fwd - g_rev).abs().max()) > 1e-6


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
def test_blocks_give_the_same_estimate_with_either_products(formulation, monkeypatch):
    """Same draw, either products: the same log-det in training and in evaluation; forward mode is what runs."""
    torch.manual_seed(0)
    g = ConvDenseNetG(2, (4, 4), depth=2, growth=8).double()
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    seen: list[bool] = []
    original = logdet_module._series

    def spy(product, v, weights):
        seen.append(getattr(product, "__name__", "") == "jvp")
        return original(product, v, weights)

    monkeypatch.setattr(logdet_module, "_series", spy)
    out = {}
    for products in ("vjp", "jvp"):
        estimator = EstimatorSettings(n_exact_terms=4, n_exact_terms_eval=6, products=products)
        block = BLOCKS[formulation](g, logdet="estimator", tol=1e-12, estimator=estimator)
        seen.clear()
        torch.manual_seed(5)
        _, trained = block(x.clone().requires_grad_(True))
        torch.manual_seed(5)
        with torch.no_grad():
            _, evaluated = block(x)
        assert seen == [products == "jvp"] * 2
        out[products] = (trained.detach(), evaluated)
    for a, b in zip(out["vjp"], out["jvp"], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("implicit_grad", ["one_step", "backward_solve"])
def test_block_gradients_with_forward_mode_products_are_unbiased(implicit_grad):
    """A monotone block's training gradient (parameters and input, through the implicit gradient) averaged over draws
    of the forward-mode estimator matches the exact log-det's gradient within 5 standard errors."""
    torch.manual_seed(0)
    n = 6
    g = LipschitzMLP(n, hidden=[8], activation="cpila", coeff=0.6).double()
    x = torch.randn(2, n, dtype=DT)
    params = list(g.parameters())
    common = {"tol": 1e-13, "max_iter": 300, "implicit_grad": implicit_grad}

    def gradient(block):
        xr = x.clone().requires_grad_(True)
        _, logdet = block(xr)
        return torch.cat([t.reshape(-1) for t in torch.autograd.grad(logdet.sum(), [xr, *params])])

    exact = gradient(MonotoneBlock(g, logdet="exact", **common))
    settings = EstimatorSettings(n_exact_terms=2, roulette="geometric", roulette_param=0.5, products="jvp")
    block = MonotoneBlock(g, logdet="estimator", estimator=settings, **common)
    torch.manual_seed(1)
    draws = torch.stack([gradient(block) for _ in range(600)])
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((draws.mean(0) - exact).abs() <= 5 * se + 1e-12).all())


def _count(block, x) -> tuple[int, float, int]:
    """Operators, convolution FLOPs and tensors saved for backward of a no-gradient pass of ``block``."""
    packed = 0

    def pack(t):
        nonlocal packed
        packed += 1
        return t

    torch.manual_seed(2)
    with (
        OperatorCounter() as ops,
        FlopCounterMode(display=False) as flops,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.no_grad(),
    ):
        block(x)
    return ops.ops, flops.get_total_flops(), packed


def test_forward_mode_terms_cost_the_same_convolutions_fewer_operators_and_no_graph():
    """Per term of an evaluation's series (a conv G with CPila): the same convolution FLOPs as a vector-Jacobian
    product, fewer operators (no derivative recomputed, no graph walked), and nothing saved for backward."""
    torch.manual_seed(0)
    g = ConvDenseNetG(2, (4, 4), depth=3, growth=8)
    x = torch.randn(2, 2, 4, 4)
    per_term = {}
    for products in ("vjp", "jvp"):
        counts = []
        for terms in (10, 20):
            estimator = EstimatorSettings(n_exact_terms_eval=terms, roulette="geometric", roulette_param=0.999,
                                          products=products)  # fmt: skip
            counts.append(_count(MonotoneBlock(g, logdet="estimator", estimator=estimator), x))
        (ops10, flops10, _), (ops20, flops20, packed) = counts
        per_term[products] = ((ops20 - ops10) / 10, (flops20 - flops10) / 10, packed)
    (ops_v, flops_v, packed_v), (ops_j, flops_j, packed_j) = per_term["vjp"], per_term["jvp"]
    assert flops_j == flops_v > 0
    assert ops_j < 0.6 * ops_v, per_term
    assert packed_j == 0 < packed_v  # an evaluation by forward mode builds no graph
