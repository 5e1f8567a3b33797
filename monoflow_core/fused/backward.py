"""The exact backward pass of a fused run on the PyTorch kernels (docs/algorithm.md sections 5 and 6)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .algebra import inv_small, logdet_terms, row_combination
from .evaluate import second_derivative
from .folded import FoldedNet
from .plan import SQRT2
from .workspace import Workspace

__all__ = ["ReverseLayout", "reverse_primals", "reverse_tangents", "torch_backward"]


class ReverseLayout:
    """Where every cotangent of the backward pass lives, and the weight blocks that carry them down.

    All cotangents of one pass sit in one buffer ``C`` (blocks, K, columns) with rows
    ``[G's outputs (n); layer L-1's pre-activations; ...; layer 0's]``. The cotangent of layer ``i``'s *outputs*
    is then one product ``M_i^T C[:, :K_i]``, where ``M_i`` stacks the columns that read those outputs in the final
    layer and in every later layer (``K_i`` = their rows). That replaces accumulating into a cotangent of the whole
    feature buffer (a strided in-place ``baddbmm_`` per layer, 3-4x slower here) by products with fresh outputs.
    """

    def __init__(self, net: FoldedNet) -> None:
        n = net.n
        weights = [w.detach() for w in net.weights]
        final = net.final.detach()
        self.m = [w.shape[1] for w in weights]
        starts = [w.shape[2] for w in weights]  # layer i's outputs start at row width_i of the feature buffer
        depth = len(weights)
        self.offset = [0] * depth  # row of layer i's pre-activation cotangents in C
        rows = n
        for i in reversed(range(depth)):
            self.offset[i] = rows
            rows += self.m[i]
        self.rows = rows
        self.reader: list[Tensor] = []  # M_i, (blocks, K_i, m_i)
        for i in range(depth):
            cols = slice(starts[i], starts[i] + self.m[i])
            self.reader.append(
                torch.cat([final[:, :, cols], *(weights[j][:, :, cols] for j in reversed(range(i + 1, depth)))], dim=1)
            )
        inputs = slice(1, 1 + n)  # the input rows (w); the bias row has no cotangent worth computing
        self.input_reader = torch.cat(
            [final[:, :, inputs], *(weights[j][:, :, inputs] for j in reversed(range(depth)))], dim=1
        )


def reverse_tangents(net: FoldedNet, ws: Workspace, lay: ReverseLayout, c: Tensor) -> Tensor:
    """Reverse pass through G and its tangents of every block at once; returns dL/dw, (blocks, n, B).

    ``c[:, :n]`` holds each block's cotangent of ``[G, J_G]``; the pre-activation cotangents of every layer
    (primal and tangent columns) are written below it (:class:`ReverseLayout`). The tangent path is where the
    activation's second derivative enters (the log-det's gradient). Batched over blocks: nothing here depends on
    the other blocks' gradients.
    """
    n, b, nb = ws.n, ws.b, ws.count
    for i in reversed(range(len(net.weights))):
        m = lay.m[i]
        cx = torch.bmm(lay.reader[i].transpose(1, 2), c[:, : lay.offset[i]])
        cx_t = cx[:, :, b:].view(nb, m, n, b)
        slot = c[:, lay.offset[i] : lay.offset[i] + m]
        d = ws.d(i)
        torch.mul(cx_t, d.unsqueeze(2), out=slot[:, :, b:].view(nb, m, n, b))
        torch.mul(cx[:, :, :b], d, out=slot[:, :, :b])
        d2 = second_derivative(net.kind, ws.h[i][:, :, :b], ws.y[i], ws.e[i])
        if d2 is not None:
            h_t = ws.h[i][:, :, b:].view(nb, m, n, b)
            # sum_t c_t * ht_t, as a chain of fused products (a reduction across the middle dimension is slow)
            paired = torch.mul(cx_t[:, :, 0], h_t[:, :, 0])
            for t_ in range(1, n):
                paired.addcmul_(cx_t[:, :, t_], h_t[:, :, t_])
            slot[:, :, :b].addcmul_(paired, d2)
    return torch.bmm(lay.input_reader.transpose(1, 2), c[:, :, :b])


def reverse_primals(ws: Workspace, lay: ReverseLayout, c: Tensor) -> None:
    """Reverse pass through every block's primal network; ``c[:, :n]`` (blocks, n, B) holds the cotangents of G.

    Writes each layer's pre-activation cotangents below them (:class:`ReverseLayout`, primal columns only).
    """
    for i in reversed(range(len(lay.m))):
        m = lay.m[i]
        cx = torch.bmm(lay.reader[i].transpose(1, 2), c[:, : lay.offset[i]])
        torch.mul(cx, ws.d(i), out=c[:, lay.offset[i] : lay.offset[i] + m])


def torch_backward(
    net: FoldedNet, ws: Workspace, kinds: Sequence[str], grad_z: Tensor, grad_logdet: Tensor
) -> list[Tensor | None]:
    """The backward pass of a fused run on the PyTorch kernels: the gradients of the run's input, (its plan) and the
    folded tensors, from the final evaluations in the workspace ``ws`` and the cotangents of the output and of the
    summed log-det.

    Three parts (docs/algorithm.md sections 5 and 6): the log-det's cotangents back through every block's tangent
    network at once (:func:`reverse_tangents`), the implicit-function gradient block by block (the sequential part),
    and the resulting cotangents of G back through every primal network at once (:func:`reverse_primals`); each
    weight gradient is then one batched product.
    """
    n, b, nb = ws.n, ws.b, ws.count
    a_all = ws.jacobian_maps()  # I + J_G at each block's solution
    inv_all = inv_small(a_all)
    # d(summed log-det)/dJ of every block at once (the log-det's gradient is the same for all blocks):
    # residual (I + J)^-T, inverse residual -(I + J)^-T, monotone -((I - J)^-T + (I + J)^-T).
    sign, mono, a_minus = logdet_terms(kinds, a_all)
    dlog = inv_all * sign.view(nb, 1, 1, 1)
    if a_minus is not None:
        dlog[mono] -= inv_small(a_minus)
    lay = ReverseLayout(net)
    cols = (1 + n) * b
    c = ws.x.new_empty(nb, lay.rows, cols)  # pass 1: the log-det's cotangents (tangent and primal columns)
    torch.mul(dlog.transpose(1, 2), grad_logdet, out=c[:, :n, b:].view(nb, n, n, b))
    c[:, :n, :b].zero_()
    v_all = reverse_tangents(net, ws, lay, c)  # dL/dw through each block's log-det
    # The sequential part: the implicit-function gradient through each solve (docs/algorithm.md §6), block by block.
    gy = grad_z.t().contiguous()
    c2 = ws.x.new_empty(nb, lay.rows, b)  # pass 2: cotangents of G(w) in the first n rows, filled below
    for j in reversed(range(nb)):
        kind, inv, v = kinds[j], inv_all[j], v_all[j]
        if kind == "residual":
            # y = x + G(x): dL/dx = gy (I + J) + v; G's weights see the cotangent gy.
            c2[j, :n] = gy
            gy = row_combination(a_all[j], gy).add_(v)
            continue
        gw = torch.add(v, gy, alpha=SQRT2) if kind == "monotone" else v.add_(gy)
        # a = gw (I + J)^{-1} with respect to the solve's right-hand side; the parameters receive -a dG/dtheta.
        a = row_combination(inv, gw)
        torch.neg(a, out=c2[j, :n])
        gy = torch.sub(a, gy, alpha=1.0 / SQRT2).mul_(SQRT2) if kind == "monotone" else a
    reverse_primals(ws, lay, c2)
    c[:, :, :b].add_(c2)  # both passes' cotangents of the primal columns
    # (X C^T)^T rather than C X^T: the same numbers, 25% faster here for these long reductions
    grads = []
    for w, offset, m in zip(net.weights, lay.offset, lay.m, strict=True):
        grads.append(torch.bmm(ws.x[:, : w.shape[2]], c[:, offset : offset + m].transpose(1, 2)).transpose(1, 2))
    grads.append(torch.bmm(ws.x, c[:, :n].transpose(1, 2)).transpose(1, 2))
    return [gy.t(), None, *grads]
