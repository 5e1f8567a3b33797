"""Folding on the compiled kernels: one call each way (:mod:`monoflow_core.fused.kernels_fold`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.densenet import DenseNetG
from . import kernels, kernels_fold
from .compiler import kernels_ready
from .dispatch import KERNEL_ACTIVATIONS
from .flat import active_run
from .folded import FoldedNet, swish_gains
from .kernels_fold import FoldGrads, FoldLayout, FoldParams, FoldSaved
from .plan import LOG2E, PILA_K, activation_spec, bias_of, linears
from .settings import SETTINGS

__all__ = ["FoldConstants", "KernelFold", "fold_layout", "folded_from_flat", "kernel_fold", "kernel_fold_applies"]


def kernel_fold_applies(nets: Sequence[DenseNetG]) -> bool:
    """Whether the compiled fold serves ``nets``: the kernels ready (CPU, float32/float64), exact spectral norms."""
    layers = linears(nets[0])
    ref = layers[0].weight
    spec = activation_spec(nets[0])
    return (
        SETTINGS.use_kernels
        and kernels.AVAILABLE
        and ref.device.type == "cpu"
        and ref.dtype in (torch.float32, torch.float64)
        and spec is not None
        and spec.kind in KERNEL_ACTIVATIONS
        and all(lin.mode == "exact" and lin.bias is not None for lin in layers)
        and kernels_ready(ref.dtype, wait=SETTINGS.wait, backward=torch.is_grad_enabled())
    )


class FoldConstants(NamedTuple):
    """The fold's inputs that are no tensors of autograd: each net's ``lip_coeff`` (nb,), each layer's bound
    (L + 1, nb), the activation's shift, and the layout of the flat rows."""

    lip: np.ndarray
    coeff: np.ndarray
    shift: float
    layout: FoldLayout


def _params(
    constants: FoldConstants, concat_k: Tensor, wflat: Tensor, bflat: Tensor, gains: Tensor, scales: Tensor
) -> FoldParams:
    return FoldParams(
        concat_k.detach().numpy(),
        constants.lip,
        constants.coeff,
        wflat.detach().numpy(),
        bflat.detach().numpy(),
        gains.detach().numpy(),
        constants.shift,
        scales.detach().numpy(),
    )


class KernelFold(torch.autograd.Function):
    """:func:`~monoflow_core.fused.fold.fold_nets` as one compiled call each way
    (:func:`monoflow_core.fused.kernels_fold.fold_forward`).

    Inputs and output are flat, one row per block with the layers side by side (:class:`FoldLayout` has the
    offsets), so that one compiled version serves networks of every depth. ``gains`` and ``scales`` (nb, depth,
    float64) are each block's and hidden layer's pre-activation factor and output scale (constants for Pila and ReLU;
    CLipSwish's ``beta`` and ``1 / (1.1 * 1.004 * beta)``, differentiated, see
    :func:`~monoflow_core.fused.folded.swish_gains`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        constants: FoldConstants,
        concat_k: Tensor,
        wflat: Tensor,
        bflat: Tensor,
        gains: Tensor,
        scales: Tensor,
    ) -> Tensor:
        layout = constants.layout
        nb = concat_k.shape[0]
        out = wflat.new_empty(nb, layout.out_size)
        saved = FoldSaved(
            wflat.new_empty(bflat.shape).numpy(),
            wflat.new_empty(nb, layout.v_size).numpy(),
            wflat.new_empty(len(layout.rows), nb).numpy(),
        )
        p = _params(constants, concat_k, wflat, bflat, gains, scales)
        kernels_fold.fold_forward(p, layout, out.numpy(), saved)
        ctx.save_for_backward(concat_k, wflat, bflat, gains, scales)
        ctx.constants, ctx.saved = constants, saved
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        concat_k, wflat, bflat, gains, scales = ctx.saved_tensors
        constants: FoldConstants = ctx.constants
        grads = [torch.empty_like(t) for t in (wflat, bflat, concat_k, gains, scales)]
        p = _params(constants, concat_k, wflat, bflat, gains, scales)
        out = FoldGrads(*(g.numpy() for g in grads))
        kernels_fold.fold_backward(p, constants.layout, grad.contiguous().numpy(), ctx.saved, out)
        gw, gb, gk, g_gains, g_scales = grads
        needs = ctx.needs_input_grad
        return None, gk, gw, gb, g_gains if needs[4] else None, g_scales if needs[5] else None


def fold_layout(shapes: Sequence[tuple[int, int]]) -> FoldLayout:
    """Offsets of one block's layers, of weight shapes ``shapes`` (rows, columns), in :class:`KernelFold`'s flat
    rows (made once per architecture: the arrays are read, never written)."""
    return _fold_layout(tuple((int(r), int(c)) for r, c in shapes))


@functools.lru_cache(maxsize=64)
def _fold_layout(shapes: tuple[tuple[int, int], ...]) -> FoldLayout:
    rows = np.array([r for r, _ in shapes], dtype=np.int64)
    cols = np.array([c for _, c in shapes], dtype=np.int64)
    outs = [(2 if i < len(shapes) - 1 else 1) * r * (1 + c) for i, (r, c) in enumerate(zip(rows, cols, strict=True))]

    def offsets(sizes: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.cumsum([0, *list(sizes)[:-1]]).astype(np.int64)

    return FoldLayout(
        rows,
        cols,
        offsets(rows * cols),
        offsets(rows),
        offsets(outs),
        offsets(cols),
        int(sum(outs)),
        int(cols.sum()),
    )


def kernel_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`~monoflow_core.fused.fold.fold_nets` on the compiled kernels (differentiable through
    :class:`KernelFold`)."""
    spec = activation_spec(nets[0])
    assert spec is not None, "kernel_fold: the nets' activation is not one the fused path folds"
    shift, scale, kind = spec
    k = PILA_K * LOG2E if kind == "pila" else 1.0
    layers = [linears(g) for g in nets]
    ref = layers[0][0].weight
    nb, depth = len(nets), len(layers[0]) - 1
    # Inside a trainer's step the parameters are views of flat buffers laid out as this fold's rows
    # (monoflow_core.fused.flat): the fold reads the buffers and its gradient lands in them, no stacking either way.
    run = active_run(nets)
    if kind == "swish":  # (float64: the fold's arithmetic with them is in float64, as with Pila's constant k)
        raw = run.activation.data if run is not None and run.activation is not None else None
        gains = (swish_gains(nets) if raw is None else F.softplus(raw)).to(torch.float64)
        scales = scale / gains
    else:
        gains, scales = _constant_gains(nb, depth, k, scale / k)
    np_dtype = torch.empty(0, dtype=ref.dtype).numpy().dtype
    positions = range(depth + 1)
    layout = fold_layout([(int(lin.weight.shape[0]), int(lin.weight.shape[1])) for lin in layers[0]])
    if run is not None:
        concat_k, wflat, bflat = run.concat.data, run.weight.data, run.bias.data
    else:
        concat_k = torch.stack([g.concat_k for g in nets])
        wflat = torch.cat([torch.stack([row[i].weight for row in layers]).reshape(nb, -1) for i in positions], dim=1)
        bflat = torch.cat([torch.stack([bias_of(row[i]) for row in layers]) for i in positions], dim=1)
    lip = np.array([g.lip_coeff for g in nets], dtype=np_dtype)
    coeff = np.array([[row[i].coeff for row in layers] for i in positions], dtype=np_dtype)
    constants = FoldConstants(lip, coeff, shift, layout)
    out = KernelFold.apply(constants, concat_k, wflat, bflat, gains, scales)
    return folded_from_flat(out, layout, nets[0].in_features, kind)


@functools.lru_cache(maxsize=64)
def _constant_gains(nb: int, depth: int, gain: float, scale: float) -> tuple[Tensor, Tensor]:
    """Pila's and ReLU's constant pre-activation factors and output scales, (nb, depth) float64 (made once per shape;
    the fold reads them, never writes them)."""
    return torch.full((nb, depth), gain, dtype=torch.float64), torch.full((nb, depth), scale, dtype=torch.float64)


def folded_from_flat(out: Tensor, layout: FoldLayout, n: int, kind: str) -> FoldedNet:
    """The :class:`~monoflow_core.fused.folded.FoldedNet` whose tensors are views of :class:`KernelFold`'s flat
    output ``out``."""
    last = len(layout.rows) - 1
    tensors = []
    for i in range(len(layout.rows)):
        height = int(layout.rows[i]) * (2 if i < last else 1)
        width = 1 + int(layout.cols[i])
        start = int(layout.ooffs[i])
        tensors.append(out[:, start : start + height * width].view(out.shape[0], height, width))
    return FoldedNet(tensors[:-1], tensors[-1], n, kind)
