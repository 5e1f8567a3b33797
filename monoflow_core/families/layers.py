"""Flow layers around zuko's transformations: ``forward(x) -> (y, log|det dy/dx|)`` and ``inverse(y) -> x``.

The engine's :class:`~monoflow_core.flow.Flow` composes layers with that interface (as the implicit blocks have);
each class here holds one of zuko's lazy transformations (a module whose call returns a
``torch.distributions.Transform``) and adapts it. zuko's transformations map data towards the base density, as
the engine's layers do, and compute their log-determinants exactly (``call_and_ladj``).

This module imports zuko: use it after :func:`~monoflow_core.families.dependency.require_zuko`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from zuko.transforms import ComposedTransform, LULinearTransform, PermutationTransform

from ..solvers import effective_tolerance

__all__ = ["AffineCoupling", "Autoregressive", "ContinuousFlow", "LUMixing", "TransformLayer"]


class TransformLayer(nn.Module):
    """One zuko lazy transformation as a flow layer.

    Args:
        transform: a ``zuko.lazy.LazyTransform`` (unconditional: it is called without a context).
    """

    def __init__(self, transform: nn.Module) -> None:
        super().__init__()
        self.transform = transform

    def _transform(self, dtype: torch.dtype) -> Any:
        return self.transform()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = self._transform(x.dtype).call_and_ladj(x)
        return y, ladj

    def inverse(self, y: Tensor) -> Tensor:
        return self._transform(y.dtype).inv(y)


class AffineCoupling(TransformLayer):
    """An affine coupling ``y_b = exp(s(x_a)) x_b + t(x_a)``, ``y_a = x_a`` (Dinh et al. 2017, eq. 4-5).

    zuko's ``GeneralCouplingTransform``; its scale ``exp(s)`` is soft-clipped to ``[1e-3, 1e3]``.
    """


class Autoregressive(TransformLayer):
    """A masked autoregressive transform (Papamakarios et al. 2017): each coordinate is transformed by an affine map
    (MAF) or a monotone rational-quadratic spline (Durkan et al. 2019) whose parameters a MADE network computes from
    the coordinates before it. zuko's ``MaskedAutoregressiveTransform``; its inverse takes one pass per coordinate.
    """


class ContinuousFlow(TransformLayer):
    """A continuous normalizing flow (Chen et al. 2018; FFJORD, Grathwohl et al. 2019): ``x(1) = x(0) + int_0^1
    f(t, x(t)) dt`` with ``log|det| = int_0^1 tr(df/dx) dt``.

    zuko's ``FFJTransform`` with ``exact=True``: the trace is the exact trace of the Jacobian (each of the ``dim``
    rows by autograd at every evaluation of ``f``), not Hutchinson's estimate, so in 2-D the log-density is exact up
    to the integration error of the adaptive Dormand-Prince solver (its tolerance is :attr:`tol`).

    Args:
        transform: a ``zuko.flows.continuous.FFJTransform``.
        tol: absolute and relative tolerance of the ODE solver, raised at each call to the dtype's floor of 10
            machine epsilons (as the implicit blocks' solvers, :func:`~monoflow_core.solvers.effective_tolerance`).
    """

    def __init__(self, transform: nn.Module, tol: float) -> None:
        super().__init__(transform)
        self.tol = float(tol)

    def _transform(self, dtype: torch.dtype) -> Any:
        t = self.transform()
        if not t.exact:  # (zuko's default; checked so that a change there cannot slip in an estimate)
            raise RuntimeError("ContinuousFlow: the FFJ transform must compute exact traces")
        t.atol = t.rtol = effective_tolerance(self.tol, dtype)
        return t

    def extra_repr(self) -> str:
        return f"tol={self.tol:g}"


class LUMixing(nn.Module):
    """An invertible linear map ``y = P L U x``: Glow's invertible 1x1 convolution in its LU form (Kingma & Dhariwal
    2018, section 3.2), for vectors.

    ``L`` (lower triangular, learned diagonal) and ``U`` (unit upper triangular) are zuko's ``LULinearTransform``,
    ``P`` a fixed permutation (zuko's ``PermutationTransform``); ``log|det| = sum log|diag L|``. As in Glow, the map
    starts as a random rotation, factorised with partial pivoting (which gives ``P``).

    Args:
        dim: number of features.
    """

    order: Tensor  # the permutation P as indices (a buffer)

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        q, _ = torch.linalg.qr(torch.randn(dim, dim))
        if not bool(torch.isfinite(q).all()):  # (shape-only builds draw uninitialised values; any start will do)
            q = torch.eye(dim)
        p, lower, upper = torch.linalg.lu(q)
        d = torch.diagonal(upper)
        # Q = P L U = P (L D)(D^-1 U): the diagonal moves into L, as LULinearTransform wants it.
        packed = torch.tril(lower * d) + torch.triu(upper / d[:, None], diagonal=1)
        self.lu = nn.Parameter(packed)
        # (P v)_i = v_j where P_ij = 1: PermutationTransform(order) returns v[..., order].
        self.register_buffer("order", p.argmax(dim=1))

    def _transform(self) -> Any:
        return ComposedTransform(LULinearTransform(self.lu), PermutationTransform(self.order))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = self._transform().call_and_ladj(x)
        return y, ladj

    def inverse(self, y: Tensor) -> Tensor:
        return self._transform().inv(y)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
