"""Lipschitz activations used by Monotone Flows and their residual baselines.

Every activation here is 1-Lipschitz (the concatenated ones from R^n to R^{2n}) and exposes, besides
``forward``, an analytic elementwise ``derivative`` so that the project's G networks can push Jacobian
tangents through them by hand (forward mode; see ``monoflow_core.nn.densenet``). All formulas are written in
plain PyTorch operators, so autograd differentiates them to any order (the exact log-det needs the second
derivative during training) on every device and dtype.

``forward`` of CPila, Pila, LipSwish and CLipSwish runs through :class:`_SavedInputActivation`, an autograd
function that saves only the activation's *input* (and its parameter) for backward and recomputes the
derivative there: autograd through the formulas would keep every intermediate of them (about ten tensors of the
concatenated width per CPila call), which dominated the memory that image training keeps for backward. Its
backward is itself written in differentiable operators, so double backward (the Neumann log-det gradient, the
exact log-det's gradient) stays exact.

References:
    Ahn, Kim, Hong, Kim. *Invertible Monotone Operators for Normalizing Flows*. NeurIPS 2022 (Pila, CPila).
    Chen et al. *Residual Flows for Invertible Generative Modeling*. NeurIPS 2019 (LipSwish).
    Perugachi-Diaz et al. *Invertible DenseNets with Concatenated LipSwish*. NeurIPS 2021 (CLipSwish).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fused_cpila

__all__ = [
    "ACTIVATIONS",
    "CLipSwish",
    "CPila",
    "CReLU",
    "LipSwish",
    "LipschitzActivation",
    "Pila",
    "get_activation",
]


def pila(x: Tensor, k: float = 5.0) -> Tensor:
    """Pila(x) = x for x > 0, (k^2/2 x^3 - k x^2 + x) e^{kx} otherwise (Ahn et al. 2022, eq. for CPila).

    The negative branch is evaluated on ``min(x, 0)`` so that ``exp`` never overflows on the branch that
    ``torch.where`` discards (an overflow there would turn gradients into NaN).
    """
    xn = torch.clamp(x, max=0.0)
    neg = (0.5 * k * k * xn - k) * xn * xn + xn
    return torch.where(x > 0, x, neg * torch.exp(k * xn))


def pila_derivative(x: Tensor, k: float = 5.0) -> Tensor:
    """d/dx Pila(x) = 1 for x > 0, e^{kx} (k^3/2 x^3 + k^2/2 x^2 - k x + 1) otherwise (continuous at 0)."""
    xn = torch.clamp(x, max=0.0)
    poly = ((0.5 * k**3 * xn + 0.5 * k * k) * xn - k) * xn + 1.0
    return torch.where(x > 0, torch.ones_like(x), poly * torch.exp(k * xn))


def pila_second_derivative(x: Tensor, k: float = 5.0) -> Tensor:
    """d^2/dx^2 Pila(x) = 0 for x > 0, e^{kx} (k^4/2 x^3 + 2 k^3 x^2) otherwise (Pila is C^2 at 0)."""
    xn = torch.clamp(x, max=0.0)
    poly = (0.5 * k**4 * xn + 2.0 * k**3) * xn * xn
    return torch.where(x > 0, torch.zeros_like(x), poly * torch.exp(k * xn))


class _SavedInputActivation(torch.autograd.Function):
    """``act.value(x, *params)``, saving only ``x`` and ``params``; backward is ``act.vjp`` (differentiable)."""

    generate_vmap_rule = True  # torch.func transforms (vmap of jacrev) see through it

    @staticmethod
    def forward(act: LipschitzActivation, x: Tensor, *params: Tensor) -> Tensor:
        return act.value(x, *params)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        act, x, *params = inputs
        ctx.act = act
        ctx.save_for_backward(x, *params)
        ctx.save_for_forward(x, *params)

    @staticmethod
    def jvp(ctx: Any, _act_tangent: None, x_tangent: Tensor | None, *param_tangents: Tensor | None) -> Tensor:
        """Forward mode (input tangents): ``derivative(x) * t``, the tangent repeated per concatenated half."""
        x, *params = ctx.saved_tensors
        deriv = ctx.act.derivative(x)
        out = (
            torch.zeros_like(deriv)
            if x_tangent is None
            else (deriv * x_tangent.repeat(*([1] * (x.dim() - 1)), ctx.act.expansion))
        )
        for i, tangent in enumerate(param_tangents):
            if tangent is not None:
                out = out + ctx.act.param_derivative(x, params, i) * tangent
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *params = ctx.saved_tensors
        return (None, *ctx.act.vjp(x, params, grad))


class LipschitzActivation(nn.Module):
    """Base class: a 1-Lipschitz elementwise (or concatenated) activation.

    Attributes:
        expansion: output width divided by input width (1 plain, 2 concatenated).
    """

    expansion: int = 1

    def derivative(self, x: Tensor) -> Tensor:
        """Elementwise derivative, shaped like ``forward(x)``.

        For a concatenated activation ``[f1(x), f2(x)]`` this returns ``[f1'(x), f2'(x)]`` so that a tangent
        ``t`` maps to ``derivative(x) * t.repeat(2)``.
        """
        raise NotImplementedError

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Value and derivative together (a subclass may share work between the two)."""
        return self(x), self.derivative(x)

    # -- the memory-saving autograd path (used by subclasses that define value and vjp) --------------------
    def value(self, x: Tensor, *params: Tensor) -> Tensor:
        """The activation from its input and its parameters (plain operators, no graph needed)."""
        raise NotImplementedError

    def vjp(self, x: Tensor, params: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
        """``(grad^T d act / dx, grad^T d act / d param for each param)``, in differentiable operators."""
        raise NotImplementedError

    def param_derivative(self, x: Tensor, params: Sequence[Tensor], i: int) -> Tensor:
        """Elementwise derivative of the output with respect to the scalar parameter ``params[i]``."""
        raise NotImplementedError

    def _apply_saving_input(self, x: Tensor, *params: Tensor) -> Tensor:
        return cast(Tensor, _SavedInputActivation.apply(self, x, *params))


class Pila(LipschitzActivation):
    """Pila activation with shape parameter ``k`` (Ahn et al. 2022; k = 5 in all published runs)."""

    def __init__(self, k: float = 5.0) -> None:
        super().__init__()
        self.k = float(k)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply_saving_input(x)

    def value(self, x: Tensor, *params: Tensor) -> Tensor:
        return pila(x, self.k)

    def vjp(self, x: Tensor, params: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
        return (grad * pila_derivative(x, self.k),)

    def derivative(self, x: Tensor) -> Tensor:
        return pila_derivative(x, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}"


class CPila(LipschitzActivation):
    """Concatenated Pila: ``[Pila(x - 0.2), Pila(-x - 0.2)] / 1.06`` (Ahn et al. 2022).

    Doubles the width. The division by 1.06 makes the map from R^n to R^{2n} 1-Lipschitz: its Jacobian
    column norm ``sqrt(Pila'(x-0.2)^2 + Pila'(-x-0.2)^2) / 1.06`` peaks at about 0.9989 near x = +-0.6.

    Where :data:`monoflow_core.nn.fused_cpila.FUSION` is active for the tensor's device (by default: CUDA with a GPU
    compiler), value, derivative and vector-Jacobian product run as fused jobs, one kernel each
    (:mod:`monoflow_core.nn.fused_cpila`); they compute the same formulas.
    """

    expansion = 2
    shift: float = 0.2
    scale: float = 1.0 / 1.06

    def __init__(self, k: float = 5.0) -> None:
        super().__init__()
        self.k = float(k)

    def _fused(self, x: Tensor) -> bool:
        return fused_cpila.FUSION.active(x.device.type)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply_saving_input(x)

    def value(self, x: Tensor, *params: Tensor) -> Tensor:
        if self._fused(x):
            return fused_cpila.cpila_value(x, self.k, self.shift, self.scale)
        both = torch.cat([x - self.shift, -x - self.shift], dim=-1)
        return pila(both, self.k) * self.scale

    def vjp(self, x: Tensor, params: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
        if self._fused(x):
            return (fused_cpila.cpila_vjp(x, grad, self.k, self.shift, self.scale),)
        # d/dx [Pila(x - s), Pila(-x - s)] = [Pila'(x - s), -Pila'(-x - s)], each times the scale.
        n = x.shape[-1]
        first = grad[..., :n] * pila_derivative(x - self.shift, self.k)
        second = grad[..., n:] * pila_derivative(-x - self.shift, self.k)
        return ((first - second) * self.scale,)

    def derivative(self, x: Tensor) -> Tensor:
        if self._fused(x):
            return fused_cpila.cpila_derivative(x, self.k, self.shift, self.scale)
        both = torch.cat([x - self.shift, -x - self.shift], dim=-1)
        sign = torch.cat([torch.ones_like(x), -torch.ones_like(x)], dim=-1)
        return pila_derivative(both, self.k) * (sign * self.scale)

    def forward_and_derivative(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._fused(x):
            return fused_cpila.cpila_value_and_derivative(x, self.k, self.shift, self.scale)
        both = torch.cat([x - self.shift, -x - self.shift], dim=-1)
        # Shared pieces of Pila and Pila': one clamp and one exp for both.
        k = self.k
        xn = torch.clamp(both, max=0.0)
        e = torch.exp(k * xn)
        pos = both > 0
        value = torch.where(pos, both, ((0.5 * k * k * xn - k) * xn * xn + xn) * e) * self.scale
        dpoly = ((0.5 * k**3 * xn + 0.5 * k * k) * xn - k) * xn + 1.0
        deriv = torch.where(pos, torch.ones_like(both), dpoly * e) * self.scale
        n = x.shape[-1]
        deriv = torch.cat([deriv[..., :n], -deriv[..., n:]], dim=-1)
        return value, deriv

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _swish(z: Tensor, beta: Tensor) -> Tensor:
    return z * torch.sigmoid(beta * z)


def _swish_derivative(z: Tensor, beta: Tensor) -> Tensor:
    s = torch.sigmoid(beta * z)
    return s + beta * z * s * (1.0 - s)


def _swish_beta_derivative(z: Tensor, beta_raw: Tensor, divisor: float) -> Tensor:
    """``d (swish_beta(z) / divisor) / d beta_raw = z^2 s (1 - s) sigmoid(beta_raw) / divisor``, elementwise."""
    s = torch.sigmoid(F.softplus(beta_raw) * z)
    return z * z * s * (1.0 - s) * torch.sigmoid(beta_raw) / divisor


def _swish_vjp(z: Tensor, beta_raw: Tensor, grad: Tensor, divisor: float) -> tuple[Tensor, Tensor]:
    """Gradients of ``sum(grad * swish_beta(z)) / divisor`` with respect to ``z`` and ``beta_raw``.

    ``d swish / d beta = z^2 s (1 - s)`` with ``s = sigmoid(beta z)``, and ``d beta / d beta_raw = sigmoid(beta_raw)``
    (``beta = softplus(beta_raw)``). Plain operators, so the result is differentiable again.
    """
    beta = F.softplus(beta_raw)
    s = torch.sigmoid(beta * z)
    ds = s * (1.0 - s)
    gz = grad * (s + beta * z * ds) / divisor
    gbeta = (grad * z * z * ds).sum() * torch.sigmoid(beta_raw) / divisor
    return gz, gbeta.reshape(beta_raw.shape)


class LipSwish(LipschitzActivation):
    """LipSwish: ``swish_beta(x) / 1.1`` with ``beta = softplus(beta_raw)`` learnable (Chen et al. 2019).

    The maximal slope of ``z sigmoid(beta z)`` over all beta >= 0 is about 1.0998, hence the 1.1.
    """

    divisor: float = 1.1

    def __init__(self, beta_init: float = 0.5) -> None:
        super().__init__()
        # softplus(raw) = beta_init  <=>  raw = log(exp(beta_init) - 1)
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.expm1(beta_init))))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.beta_raw)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply_saving_input(x, self.beta_raw)

    def value(self, x: Tensor, *params: Tensor) -> Tensor:
        return _swish(x, F.softplus(params[0])) / self.divisor

    def vjp(self, x: Tensor, params: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
        return _swish_vjp(x, params[0], grad, self.divisor)

    def param_derivative(self, x: Tensor, params: Sequence[Tensor], i: int) -> Tensor:
        return _swish_beta_derivative(x, params[0], self.divisor)

    def derivative(self, x: Tensor) -> Tensor:
        return _swish_derivative(x, self.beta) / self.divisor


class CLipSwish(LipschitzActivation):
    """Concatenated LipSwish: ``swish_beta([x, -x]) / 1.1 / 1.004`` (Perugachi-Diaz et al. 2021).

    The extra 1.004 keeps the concatenated map 1-Lipschitz from R^n to R^{2n}.
    """

    expansion = 2
    divisor: float = 1.1 * 1.004

    def __init__(self, beta_init: float = 0.5) -> None:
        super().__init__()
        self.beta_raw = nn.Parameter(torch.tensor(math.log(math.expm1(beta_init))))

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.beta_raw)

    def forward(self, x: Tensor) -> Tensor:
        return self._apply_saving_input(x, self.beta_raw)

    def value(self, x: Tensor, *params: Tensor) -> Tensor:
        return _swish(torch.cat([x, -x], dim=-1), F.softplus(params[0])) / self.divisor

    def vjp(self, x: Tensor, params: Sequence[Tensor], grad: Tensor) -> tuple[Tensor, ...]:
        # [swish(x), swish(-x)]: the second half's derivative with respect to x changes sign.
        n = x.shape[-1]
        gx1, gb1 = _swish_vjp(x, params[0], grad[..., :n], self.divisor)
        gx2, gb2 = _swish_vjp(-x, params[0], grad[..., n:], self.divisor)
        return gx1 - gx2, gb1 + gb2

    def param_derivative(self, x: Tensor, params: Sequence[Tensor], i: int) -> Tensor:
        return _swish_beta_derivative(torch.cat([x, -x], dim=-1), params[0], self.divisor)

    def derivative(self, x: Tensor) -> Tensor:
        both = torch.cat([x, -x], dim=-1)
        sign = torch.cat([torch.ones_like(x), -torch.ones_like(x)], dim=-1)
        return _swish_derivative(both, self.beta) * (sign / self.divisor)


class CReLU(LipschitzActivation):
    """Concatenated ReLU ``[relu(x), relu(-x)]`` (1-Lipschitz; used in the 1-D experiment of Ahn et al.)."""

    expansion = 2

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.cat([x, -x], dim=-1))

    def derivative(self, x: Tensor) -> Tensor:
        both = torch.cat([x, -x], dim=-1)
        sign = torch.cat([torch.ones_like(x), -torch.ones_like(x)], dim=-1)
        return (both > 0).to(x.dtype) * sign


ACTIVATIONS: dict[str, type[LipschitzActivation]] = {
    "pila": Pila,
    "cpila": CPila,
    "lipswish": LipSwish,
    "clipswish": CLipSwish,
    "crelu": CReLU,
}


def get_activation(name: str) -> LipschitzActivation:
    """Build an activation from its lower-case registry name.

    Raises:
        ValueError: if ``name`` is not registered; the message lists the valid names.
    """
    key = name.lower()
    if key not in ACTIVATIONS:
        raise ValueError(f"activation: unknown name {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[key]()
