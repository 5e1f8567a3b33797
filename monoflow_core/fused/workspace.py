"""The buffers of the fused path's evaluations of G with tangents (feature-major), their views, and their pool."""

from __future__ import annotations

import threading
import weakref
from typing import TypeAlias

import torch
from torch import Tensor

from .algebra import entries
from .folded import BlockWeights, FoldedNet
from .kernels import KernelSpace

__all__ = ["POOL", "BlockViews", "GraphToken", "PoolKey", "Workspace", "WorkspacePool"]

#: What a pooled workspace's shape depends on (:meth:`WorkspacePool.key`).
PoolKey: TypeAlias = tuple[int, int, torch.dtype, torch.device, int, tuple[int, ...], int]


class Workspace:
    """Preallocated buffers of one or more blocks' evaluations of G with tangents, feature-major, and their views.

    ``x[j]`` holds block ``j``'s features, one row per feature and one column per point: columns ``[0, B)`` are
    the primal points, columns ``[(1 + t) B, (2 + t) B)`` the tangents along input direction ``t``. Row 0 is the
    bias row (1 on primal columns, 0 on tangents), rows ``1 .. n`` the input (``w`` and the identity), then each
    layer's activation outputs. Per layer ``i``: ``h[i]`` the pre-activations (primal and tangent columns),
    ``y[i] = min(h, 0)`` and ``e[i]`` its exponential on the primal columns, ``q[i]`` the stacked value and
    derivative polynomials times ``e`` (``q[i][:, 1]`` is the activation's derivative). ``out[j]`` is
    ``[w + sign G(w), I + sign J_G(w)]`` as an (n, (1 + n) B) matrix (see
    :meth:`~monoflow_core.fused.folded.BlockWeights.map_weights`).
    The compiled kernels write only what their backward pass reads: ``x``, ``h``, ``e``, ``q[i][:, 1]`` and
    ``out`` (:func:`monoflow_core.fused.kernels._evaluate`); ``y`` and the value polynomial stay unwritten.

    Every evaluation writes in place (``out=``), so the last evaluation of a solve stays there for the backward
    pass, and the views an evaluation needs are made once per block instead of once per iteration. The
    backward pass reads the same buffers batched over the blocks.
    """

    def __init__(self, net: BlockWeights | FoldedNet, count: int, b: int, like: Tensor) -> None:
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
        self._views: dict[int, BlockViews] = {}

    def d(self, i: int) -> Tensor:
        """Activation derivatives of layer ``i``, (count, m, B)."""
        return self.q[i][:, 1]

    def jacobian_maps(self) -> Tensor:
        """``I + sign J_G`` of every block as a (count, n, n, B) stack (``[j, i, t, k] = dF_i/dw_t`` at point k)."""
        return self.out[:, :, self.b :].view(self.count, self.n, self.n, self.b)

    def block(self, j: int) -> BlockViews:
        """The views of block ``j``'s slice (made once)."""
        if j not in self._views:
            self._views[j] = BlockViews(self, j)
        return self._views[j]

    def kernel_space(self) -> KernelSpace:
        """The buffers the compiled kernels write and read, as NumPy arrays sharing this workspace's memory."""
        return KernelSpace(self.x.numpy(), self.h_all.numpy(), self.e_all.numpy(), self.q_all.numpy(), self.out.numpy())


class WorkspacePool:
    """Workspaces whose autograd graph is gone, by shape, for the next training forward (at most ``keep`` each).

    Reusing saves the allocations and the ~400 views of a 10-block run every step. A workspace returns to the pool
    only when the autograd node that holds it is destroyed (:meth:`release_with`), so a graph that is still alive
    (a second backward with ``retain_graph``, two forwards before one backward) never sees its buffers overwritten.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._free: dict[PoolKey, list[Workspace]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(net: FoldedNet, b: int, like: Tensor) -> PoolKey:
        """The shape of the workspace of ``net`` for ``b`` points in ``like``'s dtype and device."""
        return (
            len(net.final),
            b,
            like.dtype,
            like.device,
            net.n,
            tuple(int(w.shape[-2]) for w in net.weights),
            int(net.final.shape[-1]),
        )

    def acquire(self, net: FoldedNet, b: int, like: Tensor) -> tuple[Workspace, PoolKey]:
        """A workspace for a training forward: a pooled one whose previous graph is gone, else a new one; and its
        pool key."""
        key = self.key(net, b, like)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop(), key
        return Workspace(net, len(net.final), b, like), key

    def release_with(self, holder: GraphToken, ws: Workspace, key: PoolKey) -> None:
        """Return ``ws`` to the pool when ``holder`` (a token kept by the autograd node) is garbage collected."""

        def release() -> None:
            with self._lock:
                free = self._free.setdefault(key, [])
                if len(free) < self.keep:
                    free.append(ws)

        weakref.finalize(holder, release)

    def free_count(self) -> int:
        """How many workspaces wait in the pool."""
        with self._lock:
            return sum(len(v) for v in self._free.values())


#: The process's pool of training workspaces.
POOL = WorkspacePool()


class GraphToken:
    """Lives exactly as long as the autograd node of one fused run (a weak-referenceable marker)."""


class BlockViews:
    """The views of one block's slice of a :class:`Workspace` that
    :func:`~monoflow_core.fused.evaluate.evaluate_with_jacobian` writes."""

    def __init__(self, ws: Workspace, j: int) -> None:
        n, b = ws.n, ws.b
        x = ws.x[j]
        self.w_rows = x[1 : 1 + n, :b]
        self.x_in: list[Tensor] = []
        self.x_act: list[Tensor] = []
        self.x_tan: list[Tensor] = []
        self.h: list[Tensor] = []
        self.h_p: list[Tensor] = []
        self.h_t: list[Tensor] = []
        self.y: list[Tensor] = []
        self.e: list[Tensor] = []
        self.q: list[Tensor] = []
        self.q_value: list[Tensor] = []
        self.d_u: list[Tensor] = []
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
        self.entries: tuple[Tensor, ...] = entries(self.jacobian_map) if n == 2 else ()
        self.scratch = x.new_empty(3, b) if n == 2 else None
