"""Activations: closed formulas, analytic derivatives, Lipschitz constants, double backward."""

import math

import pytest
import torch

from monoflow_core import CLipSwish, CPila, CReLU, LipSwish, Pila
from monoflow_core.nn.activations import (
    ACTIVATIONS,
    get_activation,
    pila,
    pila_derivative,
    pila_second_derivative,
)

DT = torch.float64


def pila_reference(x: float, k: float = 5.0) -> float:
    return x if x > 0 else (k * k / 2 * x**3 - k * x * x + x) * math.exp(k * x)


def test_pila_values_and_derivatives_against_closed_formula():
    for x in (-3.0, -1.0, -0.37, -0.01, 0.0, 0.2, 2.5):
        t = torch.tensor(x, dtype=DT)
        assert float(pila(t)) == pytest.approx(pila_reference(x), abs=1e-14)
        h = 1e-6
        fd = (pila_reference(x + h) - pila_reference(x - h)) / (2 * h)
        assert float(pila_derivative(t)) == pytest.approx(fd, abs=1e-7)
        fd2 = (float(pila_derivative(t + h)) - float(pila_derivative(t - h))) / (2 * h)
        assert float(pila_second_derivative(t)) == pytest.approx(fd2, abs=1e-6)
    # C^2 at 0: value 0, slope 1, curvature 0 from both sides.
    z = torch.tensor([-1e-9, 1e-9], dtype=DT)
    assert torch.allclose(pila_derivative(z), torch.ones(2, dtype=DT), atol=1e-7)
    assert torch.allclose(pila_second_derivative(z), torch.zeros(2, dtype=DT), atol=1e-6)


def test_cpila_matches_definition_and_is_one_lipschitz():
    act = CPila()
    x = torch.linspace(-4, 4, 20001, dtype=DT).unsqueeze(1)
    y = act(x)
    expected = torch.cat([pila(x - 0.2), pila(-x - 0.2)], dim=1) / 1.06
    assert torch.allclose(y, expected, atol=1e-15)
    d = act.derivative(x)
    column_norm = torch.linalg.vector_norm(d, dim=1)
    lip = float(column_norm.max())
    assert lip < 1.0
    assert lip == pytest.approx(0.9989, abs=5e-4)
    # maximum near |x| = 0.6
    assert abs(float(x[column_norm.argmax(), 0])) == pytest.approx(0.6, abs=0.1)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_analytic_derivative_matches_autograd(name):
    torch.manual_seed(0)
    act = get_activation(name).to(DT)
    x = torch.randn(64, 3, dtype=DT, requires_grad=True) * 2
    y = act(x)
    n = x.shape[1]
    for half in range(act.expansion):
        sel = slice(half * n, (half + 1) * n)
        (g,) = torch.autograd.grad(y[:, sel].sum(), x, retain_graph=True)
        assert torch.allclose(g, act.derivative(x)[:, sel], atol=1e-12)
    value, deriv = act.forward_and_derivative(x)
    assert torch.allclose(value, y)
    assert torch.allclose(deriv, act.derivative(x))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_lipschitz_constant_below_one(name):
    act = get_activation(name).to(DT)
    x = torch.linspace(-8, 8, 40001, dtype=DT).unsqueeze(1)
    d = act.derivative(x).detach()
    assert float(torch.linalg.vector_norm(d, dim=1).max()) <= 1.0 + 1e-12


@pytest.mark.parametrize("cls", [Pila, CPila, LipSwish, CLipSwish])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_double_backward_gradgradcheck(cls, dtype):
    torch.manual_seed(1)
    act = cls().to(torch.float64)
    x = (torch.randn(7, 2, dtype=torch.float64) * 1.5).requires_grad_(True)
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))
    # derivative() is itself differentiable (needed for the exact log-det's training gradient).
    assert torch.autograd.gradcheck(act.derivative, (x,))
    # float32 runs and gives finite second derivatives, also far on the negative side.
    act32 = cls().to(dtype)
    z = torch.tensor([[-30.0, 40.0]], dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(act32(z).sum(), z, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), z)
    assert torch.isfinite(g).all() and torch.isfinite(h).all()


def test_crelu_and_registry():
    x = torch.tensor([[-1.0, 2.0]])
    assert torch.equal(CReLU()(x), torch.tensor([[0.0, 2.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="cpila"):
        get_activation("nope")
    assert set(ACTIVATIONS) >= {"cpila", "clipswish", "lipswish", "crelu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_activations_on_cuda_match_cpu():
    for name in ACTIVATIONS:
        act = get_activation(name).double()
        x = torch.randn(100, 4, dtype=DT, requires_grad=True)
        xc = x.detach().cuda().requires_grad_(True)
        actc = get_activation(name).double().cuda()
        assert torch.allclose(act(x), actc(xc).cpu(), atol=1e-12)
        assert torch.allclose(act.derivative(x), actc.derivative(xc).cpu(), atol=1e-12)


@pytest.mark.parametrize("name", ["pila", "cpila", "lipswish", "clipswish"])
def test_memory_saving_autograd_matches_formulas_to_second_order(name):
    # forward() saves only the input and recomputes the derivative in backward; its first and second derivatives,
    # with respect to the input and to a learnable parameter (LipSwish's beta), must equal autograd through the
    # plain formulas (value()), and gradgradcheck must pass with the parameter as an input too.
    torch.manual_seed(2)
    act = get_activation(name).to(DT)
    params = list(act.parameters())
    x = (torch.randn(5, 3, dtype=DT) * 1.5).requires_grad_(True)

    def saving(x, *p):
        return act._apply_saving_input(x, *p)

    def plain(x, *p):
        return act.value(x, *p)

    assert torch.autograd.gradcheck(saving, (x, *params))
    assert torch.autograd.gradgradcheck(saving, (x, *params))
    w = torch.randn(5, 3 * act.expansion, dtype=DT)
    inputs = (x, *params)
    first_s = torch.autograd.grad((saving(*inputs) * w).sum(), inputs, create_graph=True)
    first_p = torch.autograd.grad((plain(*inputs) * w).sum(), inputs, create_graph=True)
    for a, b in zip(first_s, first_p, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    second_s = torch.autograd.grad(sum((g * g).sum() for g in first_s), inputs)
    second_p = torch.autograd.grad(sum((g * g).sum() for g in first_p), inputs)
    for a, b in zip(second_s, second_p, strict=True):
        assert torch.allclose(a, b, atol=1e-11)


@pytest.mark.parametrize("name", ["cpila", "clipswish"])
def test_forward_saves_only_its_input(name):
    act = get_activation(name)
    x = torch.randn(16, 32, requires_grad=True) * 2
    saved: list[int] = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x * 1.0)
    # the input (and a learnable scalar): autograd through the formulas would save about ten tensors of 2x the width
    assert sum(saved) <= x.numel() * 4 + 64, saved


@pytest.mark.parametrize("name", ["pila", "cpila", "lipswish", "clipswish"])
def test_memory_saving_forward_mode_matches_formulas(name):
    # torch.func.jvp (forward mode, e.g. power-series terms by forward products) through the memory-saving path,
    # with tangents for the input and the learnable parameter, equals forward mode through the plain formulas.
    torch.manual_seed(3)
    act = get_activation(name).to(DT)
    params = list(act.parameters())
    x = torch.randn(4, 3, dtype=DT) * 1.5
    tangents = (torch.randn_like(x), *[torch.randn_like(p) for p in params])
    _, saving = torch.func.jvp(lambda z, *p: act._apply_saving_input(z, *p), (x, *params), tangents)
    _, plain = torch.func.jvp(lambda z, *p: act.value(z, *p), (x, *params), tangents)
    assert torch.allclose(saving, plain, atol=1e-13)
