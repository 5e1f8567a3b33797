"""Folding on the compiled kernels: one call each way (:mod:`monoflow_core.fused.kernels_fold`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..nn.densenet import DenseNetG
from . import kernels, kernels_fold, settings
from .compiler import kernels_ready
from .dispatch_codes import _KERNEL_ACTIVATIONS
from .folded import FoldedNet, _swish_gains
from .plan import _K, _LOG2E, _activation_spec


def _kernel_fold_applies(nets: Sequence[DenseNetG]) -> bool:
    ref = nets[0].layers[0].weight
    spec = _activation_spec(nets[0])
    return (
        settings.USE_KERNELS
        and kernels.AVAILABLE
        and ref.device.type == "cpu"
        and ref.dtype in (torch.float32, torch.float64)
        and spec is not None
        and spec[2] in _KERNEL_ACTIVATIONS
        and all(lin.mode == "exact" and lin.bias is not None for lin in [*nets[0].layers, nets[0].final])
        and kernels_ready(ref.dtype, wait=settings.KERNELS_WAIT, backward=torch.is_grad_enabled())
    )


class _KernelFold(torch.autograd.Function):
    """:func:`fold_nets` as one compiled call each way (:func:`monoflow_core.fused.kernels_fold.fold_forward`).

    Inputs and output are flat, one row per block with the layers side by side (``layout`` has the offsets), so that
    one compiled version serves networks of every depth. ``gains`` and ``scales`` (nb, depth, float64) are each
    block's and hidden layer's pre-activation factor and output scale (constants for Pila and ReLU; CLipSwish's
    ``beta`` and ``1 / (1.1 * 1.004 * beta)``, differentiated, see :func:`_swish_gains`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, meta: tuple[Any, ...], concat_k: Tensor, wflat: Tensor, bflat: Tensor, gains: Tensor, scales: Tensor
    ) -> Tensor:
        lip, coeff, shift, layout = meta
        rows, cols, woffs, boffs, ooffs, voffs, out_size, v_size = layout
        nb = concat_k.shape[0]
        out = wflat.new_empty(nb, out_size)
        uflat = wflat.new_empty(bflat.shape)
        vflat = wflat.new_empty(nb, v_size)
        sig = wflat.new_empty(len(rows), nb)
        kernels_fold.fold_forward(
            concat_k.detach().numpy(),
            lip,
            coeff,
            wflat.detach().numpy(),
            bflat.detach().numpy(),
            rows,
            cols,
            woffs,
            boffs,
            ooffs,
            voffs,
            gains.detach().numpy(),
            shift,
            scales.detach().numpy(),
            out.numpy(),
            uflat.numpy(),
            vflat.numpy(),
            sig.numpy(),
        )
        ctx.save_for_backward(concat_k, wflat, bflat, gains, scales)
        ctx.extra = (meta, uflat, vflat, sig)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        concat_k, wflat, bflat, gains, scales = ctx.saved_tensors
        (lip, coeff, shift, layout), uflat, vflat, sig = ctx.extra
        rows, cols, woffs, boffs, ooffs, voffs, _, _ = layout
        gw = torch.empty_like(wflat)
        gb = torch.empty_like(bflat)
        gk = torch.empty_like(concat_k)
        g_gains = torch.empty_like(gains)
        g_scales = torch.empty_like(scales)
        kernels_fold.fold_backward(
            concat_k.detach().numpy(),
            lip,
            coeff,
            wflat.detach().numpy(),
            bflat.detach().numpy(),
            rows,
            cols,
            woffs,
            boffs,
            ooffs,
            voffs,
            gains.detach().numpy(),
            shift,
            scales.detach().numpy(),
            grad.contiguous().numpy(),
            uflat.numpy(),
            vflat.numpy(),
            sig.numpy(),
            gw.numpy(),
            gb.numpy(),
            gk.numpy(),
            g_gains.numpy(),
            g_scales.numpy(),
        )
        needs = ctx.needs_input_grad
        return None, gk, gw, gb, g_gains if needs[4] else None, g_scales if needs[5] else None


def _fold_layout(layers: Sequence[Any]) -> tuple[Any, ...]:
    """Shapes and offsets of one block's layers in :class:`_KernelFold`'s flat rows (``kernels_fold.fold_forward``)."""
    rows = np.array([lin.weight.shape[0] for lin in layers], dtype=np.int64)
    cols = np.array([lin.weight.shape[1] for lin in layers], dtype=np.int64)
    outs = [(2 if i < len(layers) - 1 else 1) * r * (1 + c) for i, (r, c) in enumerate(zip(rows, cols, strict=True))]

    def offsets(sizes: Any) -> Any:
        return np.cumsum([0, *list(sizes)[:-1]]).astype(np.int64)

    return (
        rows,
        cols,
        offsets(rows * cols),
        offsets(rows),
        offsets(outs),
        offsets(cols),
        int(sum(outs)),
        int(cols.sum()),
    )


def _kernel_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` on the compiled kernels (differentiable through :class:`_KernelFold`)."""
    shift, scale, kind = _activation_spec(nets[0])  # type: ignore[misc]
    k = _K * _LOG2E if kind == "pila" else 1.0
    ref = nets[0].layers[0].weight
    nb, depth = len(nets), len(nets[0].layers)
    if kind == "swish":  # (float64: the fold's arithmetic with them is in float64, as with Pila's constant k)
        gains = _swish_gains(nets).to(torch.float64)
        scales = scale / gains
    else:
        gains = torch.full((nb, depth), k, dtype=torch.float64)
        scales = torch.full((nb, depth), scale / k, dtype=torch.float64)
    np_dtype = torch.empty(0, dtype=ref.dtype).numpy().dtype
    layers = [[*g.layers, g.final] for g in nets]
    positions = range(len(layers[0]))
    layout = _fold_layout(layers[0])
    wflat = torch.cat([torch.stack([row[i].weight for row in layers]).reshape(nb, -1) for i in positions], dim=1)
    bflat = torch.cat([torch.stack([row[i].bias for row in layers]) for i in positions], dim=1)
    lip = np.array([g.lip_coeff for g in nets], dtype=np_dtype)
    coeff = np.array([[row[i].coeff for row in layers] for i in positions], dtype=np_dtype)
    meta = (lip, coeff, shift, layout)
    out = _KernelFold.apply(meta, torch.stack([g.concat_k for g in nets]), wflat, bflat, gains, scales)
    return _folded_from_flat(out, layout, nets[0].in_features, kind)


def _folded_from_flat(out: Tensor, layout: tuple[Any, ...], n: int, kind: str) -> FoldedNet:
    """The :class:`FoldedNet` whose tensors are views of :class:`_KernelFold`'s flat output ``out``."""
    rows, cols, _, _, ooffs, _, _, _ = layout
    last = len(rows) - 1
    tensors = []
    for i in range(len(rows)):
        height = int(rows[i]) * (2 if i < last else 1)
        size = height * (1 + int(cols[i]))
        tensors.append(out[:, ooffs[i] : ooffs[i] + size].view(out.shape[0], height, 1 + int(cols[i])))
    return FoldedNet(tensors[:-1], tensors[-1], n, kind)
