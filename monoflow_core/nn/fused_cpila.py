"""CPila's elementwise jobs, each one kernel (``torch.compile``) where that pays, with an eager fallback.

CPila, the concatenated Pila activation of Monotone Flows (Ahn et al. 2022, arXiv:2210.08176), written in PyTorch
operators costs about a dozen elementwise operators for its value, as many for its derivative and about twenty for a
vector-Jacobian product. In the image models every operator passes over a tensor of ``batch x H x W x 172``
values, and on a GPU every operator is one kernel launch and one round trip through memory. This module writes each
of CPila's jobs once, as a plain function of tensors:

* ``value``: ``[Pila(x - s), Pila(-x - s)] c``;
* ``derivative`` and ``value_and_derivative`` (one clamp and one exponential for both);
* ``vjp``: ``grad``'s product with the Jacobian, as the activation's backward needs it;
* ``vjp_grads``: that product's own derivatives, for double backward (the Neumann log-det gradient's surrogate).

A job runs either compiled by ``torch.compile`` into one kernel, or eagerly (the same operators as the plain
formulas in :mod:`monoflow_core.nn.activations`). :data:`FUSION` decides per device (:meth:`FusionPolicy.active`):

* ``"auto"`` (the default): the compiled jobs for CUDA tensors where ``torch.compile`` can generate GPU kernels
  (Triton is installed); the plain formulas on the CPU and everywhere else. The CPU keeps the plain formulas because
  compiling costs tens of seconds per process there and the CPU's image runs are small (docs/performance.md measured
  no gain from ``torch.compile`` on the CPU); the CUDA default follows the operator counts of
  ``benchmarks/block_operators.py`` (docs/gpu.md) and is to be confirmed by GPU timings (``benchmarks/gpu_step.py``,
  part B, times both variants).
* ``"on"``: the jobs on every device, compiled where ``torch.compile`` works, eagerly otherwise.
* ``"off"``: the plain formulas everywhere.

The environment variable ``MONOFLOW_FUSED_ACTIVATIONS`` (``auto``, ``on`` or ``off``) sets the mode at import;
``FUSION.mode`` changes it at run time.

Autograd: where a graph must be recorded through a job (grad mode on and an input that requires grad), ``value``,
``derivative`` and ``value_and_derivative`` use the plain differentiable formulas, and ``vjp`` runs inside an
autograd function whose backward is ``vjp_grads`` (in differentiable formulas again when a graph of that backward is
wanted), so gradients of every order stay exact. Tensors of a ``torch.func`` transform take the differentiable
formulas directly.

A job runs eagerly, whatever the mode, where compiling cannot or must not happen: with ``FUSION.compile`` off, under
an active ``TorchDispatchMode`` (the operator and synchronisation counters and the TF32 emulation must see every
operator), on tensors of a ``torch.func`` transform, and after ``torch.compile`` failed once in this process (one
``RuntimeWarning`` says why).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "FUSION",
    "FUSION_MODES",
    "JOB_CALLS",
    "FusionPolicy",
    "check_fusion_mode",
    "cpila_derivative",
    "cpila_value",
    "cpila_value_and_derivative",
    "cpila_vjp",
    "gpu_compiler_available",
]

#: Values of :attr:`FusionPolicy.mode`.
FUSION_MODES = ("auto", "on", "off")

#: Environment variable that sets the initial mode.
ENV_VAR = "MONOFLOW_FUSED_ACTIVATIONS"

#: Calls of each fused job in this process (compiled or eager), for operator counts (benchmarks/block_operators.py).
JOB_CALLS: Counter[str] = Counter()


def check_fusion_mode(value: Any) -> str:
    """``value`` as one of :data:`FUSION_MODES`, else ``ValueError`` naming the choices."""
    if not isinstance(value, str) or value.strip().lower() not in FUSION_MODES:
        raise ValueError(f"{ENV_VAR}: unknown value {value!r}; choose one of {list(FUSION_MODES)}")
    return value.strip().lower()


@functools.lru_cache(maxsize=1)
def gpu_compiler_available() -> bool:
    """Whether ``torch.compile`` can generate GPU kernels here (its GPU code generator, Triton, is installed)."""
    return importlib.util.find_spec("triton") is not None


def _initial_mode() -> str:
    return check_fusion_mode(os.environ.get(ENV_VAR, "auto"))


@dataclass
class FusionPolicy:
    """Where CPila's jobs run fused, and how (see the module docstring).

    Attributes:
        mode: ``"auto"``, ``"on"`` or ``"off"``.
        compile: compile the jobs with ``torch.compile`` (off: the same jobs run eagerly, as in tests).
        backend: the ``torch.compile`` backend (``"inductor"`` generates the kernels; ``"eager"`` only traces; a
            callable is a custom backend).
        failure: why compiling failed in this process (then every job runs eagerly), else ``None``.
    """

    mode: str = field(default_factory=_initial_mode)
    compile: bool = True
    backend: str | Callable[..., Any] = "inductor"
    failure: str | None = None
    _compiled: dict[tuple[str, Any], Callable[..., Any]] = field(default_factory=dict, repr=False)

    def active(self, device_type: str, gpu_compiler: bool | None = None) -> bool:
        """Whether CPila on tensors of ``device_type`` uses the fused jobs.

        Args:
            device_type: ``"cpu"``, ``"cuda"``, ...
            gpu_compiler: whether GPU kernels can be generated (default: :func:`gpu_compiler_available`).
        """
        mode = check_fusion_mode(self.mode)
        if mode != "auto":
            return mode == "on"
        if device_type != "cuda":
            return False
        return gpu_compiler_available() if gpu_compiler is None else gpu_compiler

    def describe(self, device_type: str) -> str:
        """One line for logs and benchmark reports: the mode and what it means on ``device_type``."""
        if not self.active(device_type):
            if check_fusion_mode(self.mode) == "off":
                why = "requested"
            elif device_type == "cuda":
                why = "auto: no GPU compiler (Triton) here"
            else:
                why = f"auto: the plain formulas on the {device_type}"
            return f"fused CPila off ({why})"
        how = "eagerly (compile off)" if not self.compile else f"compiled ({self.backend})"
        if self.failure:
            how = f"eagerly (torch.compile failed: {self.failure})"
        return f"fused CPila on ({self.mode}), jobs run {how}"

    def compiled(self, name: str, job: Callable[..., Any]) -> Callable[..., Any]:
        """The compiled form of ``job`` (compiled once per backend, lazily: nothing compiles before the first call)."""
        key = (name, self.backend)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(job, dynamic=True, fullgraph=True, backend=self.backend)
        return self._compiled[key]


#: The process's policy.
FUSION = FusionPolicy()


# -- the jobs (plain functions of tensors: what is compiled, or run eagerly) ----------------------------------------
def _pila_derivative(z: Tensor, k: float) -> Tensor:
    zn = torch.clamp(z, max=0.0)
    poly = ((0.5 * k**3 * zn + 0.5 * k * k) * zn - k) * zn + 1.0
    return torch.where(z > 0, torch.ones_like(z), poly * torch.exp(k * zn))


def _pila_second_derivative(z: Tensor, k: float) -> Tensor:
    zn = torch.clamp(z, max=0.0)
    poly = (0.5 * k**4 * zn + 2.0 * k**3) * zn * zn
    return torch.where(z > 0, torch.zeros_like(z), poly * torch.exp(k * zn))


def _halves(x: Tensor, shift: float) -> tuple[Tensor, Tensor]:
    """``z = [x - shift, -x - shift]`` as ``(..., 2, n)`` and the signs ``[1, -1]`` as ``(2, 1)``.

    A broadcast rather than a concatenation: a compiler then writes both halves of the output in one kernel (a
    concatenation is lowered as one kernel per input). Reshaping ``(..., 2, n)`` to ``(..., 2n)`` is a view and
    gives CPila's layout, the first half then the second.
    """
    sign = 1.0 - 2.0 * torch.arange(2, dtype=x.dtype, device=x.device).view(2, 1)
    return x.unsqueeze(-2) * sign - shift, sign


def _flat(z: Tensor) -> Tensor:
    return z.reshape(*z.shape[:-2], 2 * z.shape[-1])


def _value_job(x: Tensor, k: float, shift: float, scale: float) -> Tensor:
    z, _ = _halves(x, shift)
    zn = torch.clamp(z, max=0.0)
    neg = ((0.5 * k * k * zn - k) * zn * zn + zn) * torch.exp(k * zn)
    return _flat(torch.where(z > 0, z, neg) * scale)


def _value_and_derivative_job(x: Tensor, k: float, shift: float, scale: float) -> tuple[Tensor, Tensor]:
    z, sign = _halves(x, shift)
    zn = torch.clamp(z, max=0.0)
    e = torch.exp(k * zn)
    pos = z > 0
    value = torch.where(pos, z, ((0.5 * k * k * zn - k) * zn * zn + zn) * e) * scale
    deriv = torch.where(pos, torch.ones_like(z), (((0.5 * k**3 * zn + 0.5 * k * k) * zn - k) * zn + 1.0) * e)
    # d/dx Pila(sign x - s) = sign Pila'(sign x - s).
    return _flat(value), _flat(deriv * (sign * scale))


def _derivative_job(x: Tensor, k: float, shift: float, scale: float) -> Tensor:
    z, sign = _halves(x, shift)
    return _flat(_pila_derivative(z, k) * (sign * scale))


def _vjp_job(x: Tensor, grad: Tensor, k: float, shift: float, scale: float) -> Tensor:
    z, sign = _halves(x, shift)
    g = grad.reshape(*x.shape[:-1], 2, x.shape[-1])
    return (g * _pila_derivative(z, k) * sign).sum(dim=-2) * scale


def _vjp_grads_job(
    x: Tensor, grad: Tensor, cotangent: Tensor, k: float, shift: float, scale: float
) -> tuple[Tensor, Tensor]:
    """Derivatives of ``_vjp_job``'s output, weighted by ``cotangent``, with respect to ``x`` and ``grad``.

    The output is ``sum_h g_h s_h P'(s_h x - shift) c`` over the halves ``h`` (signs ``s = (1, -1)``); its derivative
    in ``x`` is ``sum_h g_h P''(s_h x - shift) c`` (``s_h^2 = 1``) and in ``g_h`` it is ``s_h P'(s_h x - shift) c``.
    """
    z, sign = _halves(x, shift)
    g = grad.reshape(*x.shape[:-1], 2, x.shape[-1])
    grad_x = cotangent * (g * _pila_second_derivative(z, k)).sum(dim=-2) * scale
    grad_g = cotangent.unsqueeze(-2) * _pila_derivative(z, k) * (sign * scale)
    return grad_x, _flat(grad_g)


# -- running a job ------------------------------------------------------------------------------------------------
def _is_compiling() -> bool:
    check = getattr(torch.compiler, "is_compiling", None)  # (torch >= 2.3)
    return bool(check()) if check is not None else False


def _may_compile(tensors: tuple[Tensor, ...]) -> bool:
    if not FUSION.compile or FUSION.failure is not None:
        return False
    if torch._C._len_torch_dispatch_stack() > 0:  # a TorchDispatchMode must see every operator
        return False
    if _is_compiling():  # inside someone's compiled region: it traces the job itself
        return False
    return not _transformed(*tensors)


def _run(name: str, job: Callable[..., Any], *args: Any) -> Any:
    """Run ``job`` compiled where that may happen (see the module docstring), eagerly otherwise."""
    JOB_CALLS[name] += 1
    tensors = tuple(a for a in args if isinstance(a, Tensor))
    if not _may_compile(tensors):
        return job(*args)
    try:
        return FUSION.compiled(name, job)(*args)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as err:  # compiling failed (no compiler, an unsupported build): say so once, run eagerly
        FUSION.failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        warnings.warn(
            f"fused CPila: torch.compile failed ({FUSION.failure}); its jobs run eagerly in this process "
            f"(set {ENV_VAR}=off for the plain formulas)",
            RuntimeWarning,
            stacklevel=3,
        )
        return job(*args)


def _transformed(*tensors: Tensor) -> bool:
    """Tensors of a ``torch.func`` transform (vmap, grad, jvp): the differentiable formulas serve them directly."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _recording(*tensors: Tensor) -> bool:
    """Autograd must record a graph through the job (or a ``torch.func`` transform traces it)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or _transformed(*tensors)


class _Vjp(torch.autograd.Function):
    """The fused ``vjp`` job under autograd: its backward is the ``vjp_grads`` job (formulas when a graph is wanted)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, grad: Tensor, k: float, shift: float, scale: float) -> Tensor:
        ctx.save_for_backward(x, grad)
        ctx.constants = (k, shift, scale)
        out: Tensor = _run("vjp", _vjp_job, x, grad, k, shift, scale)
        return out

    @staticmethod
    def backward(ctx: Any, cotangent: Tensor) -> tuple[Tensor | None, ...]:
        x, grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of this backward is wanted (higher orders): differentiable formulas
            grad_x, grad_g = _vjp_grads_job(x, grad, cotangent, *ctx.constants)
        else:
            grad_x, grad_g = _run("vjp_grads", _vjp_grads_job, x, grad, cotangent, *ctx.constants)
        return grad_x, grad_g, None, None, None


# -- the public jobs ---------------------------------------------------------------------------------------------
def cpila_value(x: Tensor, k: float, shift: float, scale: float) -> Tensor:
    """``[Pila(x - shift), Pila(-x - shift)] * scale`` along the last dimension."""
    if _recording(x):
        return _value_job(x, k, shift, scale)
    out: Tensor = _run("value", _value_job, x, k, shift, scale)
    return out


def cpila_derivative(x: Tensor, k: float, shift: float, scale: float) -> Tensor:
    """The elementwise derivative ``[Pila'(x - shift), -Pila'(-x - shift)] * scale``."""
    if _recording(x):
        return _derivative_job(x, k, shift, scale)
    out: Tensor = _run("derivative", _derivative_job, x, k, shift, scale)
    return out


def cpila_value_and_derivative(x: Tensor, k: float, shift: float, scale: float) -> tuple[Tensor, Tensor]:
    """Value and derivative together (one exponential for both)."""
    if _recording(x):
        return _value_and_derivative_job(x, k, shift, scale)
    value, deriv = _run("value_and_derivative", _value_and_derivative_job, x, k, shift, scale)
    return value, deriv


def cpila_vjp(x: Tensor, grad: Tensor, k: float, shift: float, scale: float) -> Tensor:
    """``grad`` (shaped like the output) times the Jacobian at ``x``: the gradient with respect to ``x``."""
    if _transformed(x, grad):
        return _vjp_job(x, grad, k, shift, scale)
    if _recording(x, grad):
        out: Tensor = _Vjp.apply(x, grad, k, shift, scale)
        return out
    plain: Tensor = _run("vjp", _vjp_job, x, grad, k, shift, scale)
    return plain
