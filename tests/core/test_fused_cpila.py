"""CPila's fused jobs (monoflow_core.nn.fused_cpila): the policy, the same values and gradients as the plain formulas
(float64, gradcheck), the eager fallback, and the compiled kernels on CUDA (skipped without a GPU)."""

from __future__ import annotations

import warnings

import pytest
import torch

from monoflow_core import MonotoneBlock
from monoflow_core.logdet import EstimatorSettings
from monoflow_core.nn import fused_cpila as fc
from monoflow_core.nn.activations import CPila
from monoflow_core.nn.conv import ConvDenseNetG
from monoflow_core.syncs import SyncCounter

DT = torch.float64


def use(monkeypatch: pytest.MonkeyPatch, **settings: object) -> fc.FusionPolicy:
    """A fresh policy for this test (restored afterwards)."""
    policy = fc.FusionPolicy(**settings)  # type: ignore[arg-type]
    monkeypatch.setattr(fc, "FUSION", policy)
    return policy


def inputs(shape: tuple[int, ...] = (4, 3, 3, 5)) -> torch.Tensor:
    """Values on both branches of Pila, at the kinks (+-0.2) and far out (the exponential underflows there)."""
    x = torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(0))
    x.view(-1)[:6] = torch.tensor([0.2, -0.2, 0.0, -40.0, 40.0, 1e-9], dtype=DT)
    return x


def outputs(act: CPila, x: torch.Tensor) -> list[torch.Tensor]:
    """Everything CPila computes: value, derivative, both together, and first and second derivatives by autograd."""
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    cot = torch.randn(y.shape, dtype=DT, generator=torch.Generator().manual_seed(1)).to(y)
    (gx,) = torch.autograd.grad((y * cot).sum(), xr, create_graph=True)
    (gxx,) = torch.autograd.grad((gx * gx).sum(), xr)
    value, deriv = act.forward_and_derivative(x)
    return [y.detach(), gx.detach(), gxx, value, deriv, act.derivative(x)]


def test_the_default_keeps_the_plain_formulas_on_the_cpu(monkeypatch):
    monkeypatch.delenv(fc.ENV_VAR, raising=False)
    policy = fc.FusionPolicy()
    assert policy.mode == "auto"
    assert not policy.active("cpu")
    assert policy.active("cuda", gpu_compiler=True) and not policy.active("cuda", gpu_compiler=False)
    assert "off (auto: the plain formulas on the cpu)" in policy.describe("cpu")
    assert fc.FusionPolicy(mode="on").active("cpu") and not fc.FusionPolicy(mode="off").active("cuda", True)
    monkeypatch.setattr(fc, "FUSION", policy)
    before = sum(fc.JOB_CALLS.values())
    outputs(CPila(), inputs())
    assert sum(fc.JOB_CALLS.values()) == before  # no fused job ran
    monkeypatch.setenv(fc.ENV_VAR, " ON ")
    assert fc.FusionPolicy().mode == "on"
    monkeypatch.setenv(fc.ENV_VAR, "always")
    with pytest.raises(ValueError, match=r"MONOFLOW_FUSED_ACTIVATIONS: unknown value 'always'.*'auto', 'on', 'off'"):
        fc.FusionPolicy()


@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 4, 5)])
def test_fused_jobs_give_the_plain_values_and_derivatives(monkeypatch, shape):
    x = inputs(shape)
    use(monkeypatch, mode="off")
    plain = outputs(CPila(), x)
    use(monkeypatch, mode="on", compile=False)
    before = fc.JOB_CALLS.copy()
    fused = outputs(CPila(), x)
    calls = fc.JOB_CALLS - before
    # Every job ran: value and vjp in the forward and first backward, vjp_grads in the second-order backward.
    assert {"value", "vjp", "vjp_grads", "value_and_derivative", "derivative"} <= set(calls)
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-300)


def test_fused_cpila_passes_gradcheck_to_second_order(monkeypatch):
    use(monkeypatch, mode="on", compile=False)
    act = CPila()
    x = (torch.randn(3, 4, dtype=DT, generator=torch.Generator().manual_seed(2)) * 0.8).requires_grad_(True)
    before = fc.JOB_CALLS["vjp"]
    assert torch.autograd.gradcheck(act, (x,))
    assert torch.autograd.gradgradcheck(act, (x,))
    assert fc.JOB_CALLS["vjp"] > before  # the fused vector-Jacobian product served the checks


def test_an_image_block_trains_the_same_with_fused_cpila(monkeypatch):
    """A conv block's training pass (power-series log-det, Neumann gradient, backward solve): same numbers."""
    torch.manual_seed(0)
    g = ConvDenseNetG(2, (4, 4), depth=2, growth=8).double()
    x = torch.randn(3, 2, 4, 4, dtype=DT)
    results = []
    for mode in ("off", "on"):
        use(monkeypatch, mode=mode, compile=False)
        block = MonotoneBlock(g, logdet="estimator", tol=1e-12, estimator=EstimatorSettings(n_exact_terms=5))
        torch.manual_seed(3)
        xr = x.clone().requires_grad_(True)
        y, logdet = block(xr)
        grads = torch.autograd.grad((y.square().sum() + logdet.sum()), [xr, *g.parameters()], allow_unused=True)
        results.append((logdet.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-13)
    for a, b in zip(g0, g1, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no kernel compiler on this machine (simulated)")


def test_a_failed_compile_is_said_once_and_the_jobs_run_eagerly(monkeypatch):
    x = inputs((5, 6))
    use(monkeypatch, mode="off")
    plain = outputs(CPila(), x)
    policy = use(monkeypatch, mode="on", compile=True, backend=_failing_backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = outputs(CPila(), x)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "torch.compile failed" in messages[0] and "run eagerly" in messages[0]
    assert policy.failure is not None and "eagerly (torch.compile failed" in policy.describe("cpu")
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-300)


def test_no_compile_under_a_dispatch_mode(monkeypatch):
    """Operator and synchronisation counters (TorchDispatchModes) must see every operator: the jobs run eagerly."""
    policy = use(monkeypatch, mode="on", compile=True, backend=_failing_backend)
    with SyncCounter():
        outputs(CPila(), inputs((3, 4)))
    assert policy.failure is None  # nothing was compiled (else the failing backend would have been called)


def test_torch_func_transforms_see_through_fused_cpila(monkeypatch):
    """Inside vmap of jacrev (wrapped tensors) the differentiable formulas serve and nothing is compiled; functorch's
    jvp gives the plain formulas' tangent (it calls the activation on plain tensors, where fused jobs may serve)."""
    x = inputs((3, 4))
    t = torch.randn_like(x)
    use(monkeypatch, mode="off")
    jacobians = torch.func.vmap(torch.func.jacrev(CPila()))(x)
    tangent = torch.func.jvp(CPila(), (x,), (t,))[1]
    policy = use(monkeypatch, mode="on", compile=True, backend=_failing_backend)
    torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(CPila()))(x), jacobians, rtol=1e-13, atol=1e-300)
    assert policy.failure is None
    use(monkeypatch, mode="on", compile=False)
    torch.testing.assert_close(torch.func.jvp(CPila(), (x,), (t,))[1], tangent, rtol=1e-13, atol=1e-300)


@pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile does not support this Python")
def test_the_jobs_compile_as_whole_graphs(monkeypatch):
    """Each job traces into one graph (``fullgraph=True``: a break would fail); the 'eager' backend runs the traced
    graph without generating code, so no compiler is needed here."""
    x = inputs((4, 5))
    use(monkeypatch, mode="off")
    plain = outputs(CPila(), x)
    policy = use(monkeypatch, mode="on", compile=True, backend="eager")
    fused = outputs(CPila(), x)
    assert policy.failure is None, policy.failure
    assert {name for name, _ in policy._compiled} == {"value", "vjp", "vjp_grads", "value_and_derivative", "derivative"}
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-13, atol=1e-300)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_cpila_on_cuda_matches_the_plain_formulas(monkeypatch, dtype):
    """The default policy on CUDA: compiled kernels (where Triton is installed), same values and gradients."""
    if not fc.gpu_compiler_available():
        pytest.skip("no GPU compiler (Triton) in this torch build: the default keeps the plain formulas")
    x = inputs((8, 4, 4, 16)).to("cuda", dtype)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-14}
    use(monkeypatch, mode="off")
    plain = outputs(CPila(), x)
    policy = use(monkeypatch, mode="auto")
    assert policy.active("cuda")
    fused = outputs(CPila(), x)
    assert policy.failure is None, policy.failure
    for a, b in zip(plain, fused, strict=True):
        torch.testing.assert_close(b, a, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(CPila(), (x[:2, :1, :2].clone().requires_grad_(True),))
