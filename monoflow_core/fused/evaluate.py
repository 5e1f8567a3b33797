"""G and its Jacobian on the PyTorch kernels of the fused path: folded activations, feature-major products."""

from __future__ import annotations

from typing import TypeAlias

import torch
from torch import Tensor

from .folded import BlockWeights
from .plan import LOG2E
from .workspace import BlockViews

__all__ = ["HORNER", "HornerCoefficients", "activate", "evaluate", "evaluate_with_jacobian", "second_derivative"]


#: The stacked coefficients of Pila's two cubics (highest degree first).
Horner: TypeAlias = tuple[Tensor, Tensor, Tensor, Tensor]


class HornerCoefficients:
    """Pila's stacked cubic coefficients on each dtype and device, made once per dtype and device.

    Each of the four is of shape (2, 1, 1): the coefficients of two cubics in the folded variable ``y = min(h, 0)``
    (see :func:`activate`), ``y p(y / c)`` for the value and the derivative's polynomial.
    """

    def __init__(self) -> None:
        self._made: dict[tuple[torch.dtype, torch.device], Horner] = {}

    def get(self, like: Tensor) -> Horner:
        """The coefficients in ``like``'s dtype and device."""
        key = (like.dtype, like.device)
        made = self._made.get(key)
        if made is None:
            c = LOG2E

            def col(a: float, b: float) -> Tensor:
                return torch.tensor([a, b], dtype=like.dtype, device=like.device).view(2, 1, 1)

            made = self._made[key] = (
                col(0.5 / c**2, 0.5 / c**3),
                col(-1.0 / c, 0.5 / c**2),
                col(1.0, -1.0 / c),
                col(0.0, 1.0),
            )
        return made


#: The process's coefficients.
HORNER = HornerCoefficients()


def activate(kind: str, v: BlockViews, i: int, horner: Horner) -> None:
    """Activation of layer ``i``'s primal pre-activations, in place: value into ``x``, ``y, e, q`` alongside.

    For Pila the pre-activations arrive as ``h = c k x`` (``k = 5``, ``c = log2 e``, folded into the weights).
    With ``y = min(h, 0)`` and ``e = 2^y = e^(k min(x, 0))`` the stored value is
    ``c k Pila(x) = relu(h) + y p(y / c) e`` with ``p(u) = u^2/2 - u + 1``, and the derivative is
    ``Pila'(x) = (u^3/2 + u^2/2 - u + 1) e`` at ``u = y / c`` (Ahn et al. 2022, Pila). Both cubics are evaluated
    in one stacked Horner scheme; no ``where`` is needed because the branches meet at 0 with two derivatives.

    For CLipSwish the pre-activations arrive as ``h = beta z`` (:func:`~monoflow_core.fused.folded.swish_gains`); the
    stored value is ``h sigmoid(h)`` and its derivative ``s (1 + h (1 - s))`` with ``s = sigmoid(h)``, which goes
    into ``e`` (the second derivative, :func:`second_derivative`, reads it; ``y`` and the value polynomial stay
    unwritten).
    """
    hp = v.h_p[i]
    if kind == "relu":
        torch.clamp_min(hp, 0.0, out=v.x_act[i])
        v.q[i][1].copy_(hp > 0)
        return
    if kind == "swish":
        sig, d = v.e[i], v.q[i][1]
        torch.sigmoid(hp, out=sig)
        torch.mul(sig, -1.0, out=d).add_(1.0).mul_(hp).add_(1.0).mul_(sig)  # s (1 + h (1 - s))
        torch.mul(hp, sig, out=v.x_act[i])
        return
    a3, a2, a1, a0 = horner
    y, q = v.y[i], v.q[i]
    torch.clamp_max(hp, 0.0, out=y)
    torch.exp2(y, out=v.e[i])
    # (a mul and an in-place add: a ternary op broadcasting a (2, 1, 1) operand is 3x slower here)
    torch.mul(y, a3, out=q).add_(a2)
    torch.addcmul(a1, q, y, out=q)
    torch.addcmul(a0, q, y, out=q).mul_(v.e[i])
    torch.clamp_min(hp, 0.0, out=v.x_act[i]).add_(v.q_value[i])


def second_derivative(kind: str, h: Tensor, y: Tensor, e: Tensor) -> Tensor | None:
    """Derivative of the activation's derivative with respect to the folded input ``h``; None for ReLU.

    ``dPila'(x)/dh = Pila''(x) / (c k) = (u^3/2 + 2 u^2) e / c`` with ``u = y / c``
    (``Pila''(x) = k (u^3/2 + 2 u^2) e^u``). For the folded swish ``h sigmoid(h)`` (``e`` holds ``s = sigmoid(h)``
    there): ``s (1 - s) (2 + h (1 - 2 s))``.
    """
    if kind == "relu":
        return None
    if kind == "swish":
        spread = torch.mul(e, -2.0).add_(1.0).mul_(h).add_(2.0)  # 2 + h (1 - 2 s)
        return torch.mul(e, -1.0).add_(1.0).mul_(e).mul_(spread)
    c = LOG2E
    return torch.mul(y, 0.5 / c**4).add_(2.0 / c**3).mul_(y).mul_(y).mul_(e)


def evaluate_with_jacobian(net: BlockWeights, w: Tensor, v: BlockViews, final: Tensor) -> None:
    """The map ``w + sign G(w)`` and its Jacobian at the points ``w`` (n, B), written into the views ``v``.

    Each layer is one matrix product over the stacked primal and tangent columns (forward-mode tangents,
    docs/performance.md); ``final`` is :meth:`~monoflow_core.fused.folded.BlockWeights.map_weights` (``sign``), so
    ``v.out_p`` receives ``w + sign G(w)`` and ``v.jacobian_map`` receives ``I + sign J_G(w)``.
    """
    horner = HORNER.get(w)
    v.w_rows.copy_(w)
    for i, weight in enumerate(net.weights):
        torch.mm(weight, v.x_in[i], out=v.h[i])
        activate(net.kind, v, i, horner)
        torch.mul(v.h_t[i], v.d_u[i], out=v.x_tan[i])
    torch.mm(final, v.x, out=v.out)


def _activation_value(kind: str, h: Tensor, out: Tensor) -> None:
    """The value alone of :func:`activate` (``relu(h) + y p(y / c) e``, or ``h sigmoid(h)``), written into ``out``."""
    if kind == "relu":
        torch.clamp_min(h, 0.0, out=out)
        return
    if kind == "swish":
        torch.mul(h, torch.sigmoid(h), out=out)
        return
    c = LOG2E
    y = torch.clamp_max(h, 0.0)
    q = torch.mul(y, 0.5 / c**2).add_(-1.0 / c).mul_(y).add_(1.0).mul_(y).mul_(torch.exp2(y))
    torch.clamp_min(h, 0.0, out=out).add_(q)


def evaluate(net: BlockWeights, w: Tensor, final: Tensor) -> Tensor:
    """``final`` applied to G's features at the points ``w`` (n, B), e.g. ``w + G(w)``; no tangents, no autograd."""
    n, b = w.shape
    x = w.new_empty(net.total, b)
    x[0] = 1.0
    x[1 : 1 + n] = w
    width = 1 + n
    for weight in net.weights:
        m = weight.shape[0]
        _activation_value(net.kind, torch.mm(weight, x[:width]), x[width : width + m])
        width += m
    return torch.mm(final, x)
