"""Spectral normalisation and the Lipschitz bound of G, before and after optimizer steps."""

import pytest
import torch

from monoflow_core import update_lipschitz
from monoflow_core.nn import DenseNetG, LipschitzMLP, SpectralLinear

DT = torch.float64


def measured_lipschitz(g, n, samples=256, scale=3.0):
    """Max over random inputs of the spectral norm of the autograd Jacobian of G (a lower bound on Lip(G))."""
    x = torch.randn(samples, n, dtype=DT) * scale
    jac = torch.func.vmap(torch.func.jacrev(lambda v: g(v.unsqueeze(0))[0]))(x)
    return float(torch.linalg.matrix_norm(jac.detach(), ord=2).max())


@pytest.mark.parametrize("mode", ["exact", "power"])
def test_spectral_linear_norm_never_exceeds_coeff(mode):
    torch.manual_seed(0)
    layer = SpectralLinear(20, 30, coeff=0.7, mode=mode).double()
    with torch.no_grad():
        layer.weight.mul_(10)
    if mode == "power":
        update_lipschitz(layer, 200)
    norm = float(torch.linalg.matrix_norm(layer.normalized_weight().detach(), ord=2))
    assert norm <= 0.7 * (1 + 1e-9)
    assert norm == pytest.approx(0.7, rel=1e-6)


def test_small_weight_is_left_alone():
    layer = SpectralLinear(3, 3, coeff=0.9, mode="exact").double()
    with torch.no_grad():
        layer.weight.copy_(0.1 * torch.eye(3, dtype=DT))
    assert torch.equal(layer.normalized_weight(), layer.weight)


def test_power_iteration_underestimates_then_converges():
    torch.manual_seed(3)
    layer = SpectralLinear(50, 50, coeff=1.0, mode="power").double()
    exact = float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    update_lipschitz(layer, 1)
    assert float(layer.sigma().detach()) <= exact + 1e-12
    update_lipschitz(layer, 500)
    assert float(layer.sigma().detach()) == pytest.approx(exact, rel=1e-6)


def test_sigma_gradient_flows_to_weight():
    layer = SpectralLinear(4, 4, coeff=0.5, mode="exact").double()
    with torch.no_grad():
        layer.weight.mul_(5)
    x = torch.randn(8, 4, dtype=DT)

    def apply(w):
        return torch.nn.functional.linear(x, w / torch.clamp(torch.linalg.matrix_norm(w, ord=2) / 0.5, min=1.0))

    assert torch.autograd.gradcheck(apply, (layer.weight.detach().requires_grad_(),))


@pytest.mark.parametrize(
    "make",
    [
        lambda: DenseNetG(2, depth=3, growth=16, activation="cpila", coeff=0.9, lip_coeff=0.98),
        lambda: DenseNetG(3, depth=2, growth=8, activation="clipswish", coeff=0.95, lip_coeff=0.99),
        lambda: LipschitzMLP(2, hidden=[32, 32], activation="lipswish", coeff=0.9),
    ],
)
def test_lipschitz_of_g_stays_below_bound_across_optimizer_steps(make):
    torch.manual_seed(0)
    g = make().double()
    n = g.in_features
    bound = g.lipschitz_bound()
    assert bound < 1
    opt = torch.optim.Adam(g.parameters(), lr=0.05)
    for step in range(30):
        assert measured_lipschitz(g, n) <= bound + 1e-9, f"step {step}"
        x = torch.randn(64, n, dtype=DT)
        # A loss that rewards large Jacobians pushes the weights against their bound.
        loss = -(g(x) - g(x + 0.1)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 2 == 0:  # the bound must hold whether or not an update ran
            update_lipschitz(g, 5)
    assert measured_lipschitz(g, n) <= bound + 1e-9


def test_densenet_widths_and_concat_norm():
    g = DenseNetG(2, depth=3, growth=16)
    widths = [layer.in_features for layer in g.layers] + [g.final.in_features]
    assert widths == [2, 18, 34, 50]
    mix = g.mix_coefficients()
    assert torch.allclose(torch.linalg.vector_norm(mix, dim=1), torch.full((3,), 0.98))
    g.set_concat_learnable(False)
    assert not g.concat_k.requires_grad


@pytest.mark.parametrize(
    "make",
    [
        lambda: DenseNetG(3, depth=3, growth=8, activation="cpila"),
        lambda: LipschitzMLP(3, hidden=[16, 8], activation="clipswish"),
    ],
)
def test_tangent_jacobian_matches_autograd(make):
    torch.manual_seed(0)
    g = make().double()
    x = torch.randn(10, 3, dtype=DT)
    value, jac = g.evaluate_with_jacobian(x, g.prepare())
    assert torch.allclose(value, g(x), atol=1e-14)
    ref = torch.func.vmap(torch.func.jacrev(lambda v: g(v.unsqueeze(0))[0]))(x)
    assert torch.allclose(jac, ref, atol=1e-13)
