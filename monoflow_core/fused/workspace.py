"""The buffers of the fused path's evaluations of G with tangents (feature-major), their views, and their pool."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from torch import Tensor

from .algebra import _entries
from .folded import FoldedNet, _BlockWeights


class _Workspace:
    """Preallocated buffers of one or more blocks' evaluations of G with tangents, feature-major, and their views.

    ``x[j]`` holds block ``j``'s features, one row per feature and one column per point: columns ``[0, B)`` are
    the primal points, columns ``[(1 + t) B, (2 + t) B)`` the tangents along input direction ``t``. Row 0 is the
    bias row (1 on primal columns, 0 on tangents), rows ``1 .. n`` the input (``w`` and the identity), then each
    layer's activation outputs. Per layer ``i``: ``h[i]`` the pre-activations (primal and tangent columns),
    ``y[i] = min(h, 0)`` and ``e[i]`` its exponential on the primal columns, ``q[i]`` the stacked value and
    derivative polynomials times ``e`` (``q[i][:, 1]`` is the activation's derivative). ``out[j]`` is
    ``[w + sign G(w), I + sign J_G(w)]`` as an (n, (1 + n) B) matrix (see :meth:`_BlockWeights.map_weights`).
    The compiled kernels write only what their backward pass reads: ``x``, ``h``, ``e``, ``q[i][:, 1]`` and
    ``out`` (:func:`monoflow_core.fused.kernels._evaluate`); ``y`` and the value polynomial stay unwritten.

    Every evaluation writes in place (``out=``), so the last evaluation of a solve stays there for the backward
    pass, and the views an evaluation needs are made once per block instead of once per iteration. The
    backward pass reads the same buffers batched over the blocks.
    """

    def __init__(self, net: _BlockWeights | FoldedNet, count: int, b: int, like: Tensor) -> None:
        n = net.n
        widths = [w.shape[-2] for w in net.weights]
        total = net.final.shape[-1]
        cols = (1 + n) * b
        self.n, self.b, self.count = n, b, count
        self.x = like.new_empty(count, total, cols)
        seed = self.x[:, : 1 + n]
        seed.zero_()
        seed[:, 0, :b] = 1.0
        for t in range(n):
            seed[:, 1 + t, (1 + t) * b : (2 + t) * b] = 1.0
        # Stacked over the layers (a DenseNet G has the same number of units in every layer), so that the compiled
        # kernels (monoflow_core.fused.kernels) fill them in one call; the per-layer lists are views.
        depth, m = len(widths), widths[0]
        self.h_all = like.new_empty(depth, count, m, cols)
        self.y_all = like.new_empty(depth, count, m, b)
        self.e_all = like.new_empty(depth, count, m, b)
        self.q_all = like.new_empty(depth, count, 2, m, b)
        self.h, self.y, self.e, self.q = (list(t.unbind(0)) for t in (self.h_all, self.y_all, self.e_all, self.q_all))
        self.out = like.new_empty(count, n, cols)
        self._views: dict[int, _BlockViews] = {}

    def d(self, i: int) -> Tensor:
        """Activation derivatives of layer ``i``, (count, m, B)."""
        return self.q[i][:, 1]

    def jacobian_maps(self) -> Tensor:
        """``I + sign J_G`` of every block as a (count, n, n, B) stack (``[j, i, t, k] = dF_i/dw_t`` at point k)."""
        return self.out[:, :, self.b :].view(self.count, self.n, self.n, self.b)

    def block(self, j: int) -> _BlockViews:
        if j not in self._views:
            self._views[j] = _BlockViews(self, j)
        return self._views[j]


#: Workspaces whose autograd graph is gone, by shape, for the next training forward (at most _POOL_KEEP each).
_POOL: dict[tuple[Any, ...], list[_Workspace]] = {}
_POOL_LOCK = threading.Lock()
_POOL_KEEP = 2


def _workspace_key(net: FoldedNet, b: int, like: Tensor) -> tuple[Any, ...]:
    return (
        len(net.final),
        b,
        like.dtype,
        like.device,
        net.n,
        tuple(w.shape[-2] for w in net.weights),
        net.final.shape[-1],
    )


def _acquire_workspace(net: FoldedNet, b: int, like: Tensor) -> tuple[_Workspace, tuple[Any, ...]]:
    """A workspace for a training forward: a pooled one whose previous graph is gone, else a new one.

    Reusing saves the allocations and the ~400 views of a 10-block run every step. A workspace returns to the pool
    only when the autograd node that holds it is destroyed (see :func:`_release_with`), so a graph that is still
    alive (a second backward with ``retain_graph``, two forwards before one backward) never sees its buffers
    overwritten. Returns the workspace and its pool key.
    """
    key = _workspace_key(net, b, like)
    with _POOL_LOCK:
        free = _POOL.get(key)
        if free:
            return free.pop(), key
    return _Workspace(net, len(net.final), b, like), key


def _release_with(holder: Any, ws: _Workspace, key: tuple[Any, ...]) -> None:
    """Return ``ws`` to the pool when ``holder`` (a token kept by the autograd node) is garbage collected."""

    def release() -> None:
        with _POOL_LOCK:
            free = _POOL.setdefault(key, [])
            if len(free) < _POOL_KEEP:
                free.append(ws)

    weakref.finalize(holder, release)


class _GraphToken:
    """Lives exactly as long as the autograd node of one fused run (a weak-referenceable marker)."""


class _BlockViews:
    """The views of one block's slice of a :class:`_Workspace` that :func:`evaluate_with_jacobian` writes."""

    def __init__(self, ws: _Workspace, j: int) -> None:
        n, b = ws.n, ws.b
        x = ws.x[j]
        self.w_rows = x[1 : 1 + n, :b]
        self.x_in, self.x_act, self.x_tan = [], [], []
        self.h, self.h_p, self.h_t, self.y, self.e, self.q, self.q_value, self.d_u = [], [], [], [], [], [], [], []
        width = 1 + n
        for i in range(len(ws.h)):
            m = ws.h[i].shape[1]
            h = ws.h[i][j]
            self.x_in.append(x[:width])
            self.x_act.append(x[width : width + m, :b])
            self.x_tan.append(x[width : width + m, b:].view(m, n, b))
            self.h.append(h)
            self.h_p.append(h[:, :b])
            self.h_t.append(h[:, b:].view(m, n, b))
            self.y.append(ws.y[i][j])
            self.e.append(ws.e[i][j])
            q = ws.q[i][j]
            self.q.append(q)
            self.q_value.append(q[0])
            self.d_u.append(q[1].unsqueeze(1))
            width += m
        self.x = x
        self.out = ws.out[j]
        self.out_p = self.out[:, :b]
        self.jacobian_map = self.out[:, b:].view(n, n, b)
        # For the closed-form 2 x 2 Newton step: the entries of the Jacobian map and scratch for the step.
        self.entries = _entries(self.jacobian_map) if n == 2 else ()
        self.scratch = x.new_empty(3, b) if n == 2 else None
