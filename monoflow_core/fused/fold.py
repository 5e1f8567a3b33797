"""Folding a run of DenseNet G networks into the fused path's weights, in PyTorch (autograd through it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..nn.densenet import DenseNetG
from ..nn.lipschitz import SpectralLinear
from .flat import active_run
from .fold_compiled import kernel_fold, kernel_fold_applies
from .folded import FoldedNet, swish_gains
from .plan import LOG2E, PILA_K, activation_spec, bias_of, linears

__all__ = ["FoldLayer", "fold_nets", "fold_nets_torch"]


def _singular_pair(layers: Sequence[SpectralLinear], w: Tensor) -> tuple[Tensor, Tensor]:
    """Batched vectors ``u, v`` with ``sigma = u^T W v``: the exact top singular pair (``"exact"`` mode, from an
    SVD outside autograd: the value and gradient ``u v^T`` of ``matrix_norm(W, 2)``) or the power-iteration
    buffers (``"power"`` mode)."""
    with torch.no_grad():
        if layers[0].mode == "exact":
            left, _, right_h = torch.linalg.svd(w.detach(), full_matrices=False)
            return left[..., 0], right_h[..., 0, :]
        return torch.stack([lin.u for lin in layers]), torch.stack([lin.v for lin in layers])


class FoldLayer(torch.autograd.Function):
    """One layer position of the fold, batched over the blocks, with a hand-written backward.

    Forward: ``wn = W / max(1, sigma / coeff) * cols`` (soft spectral normalisation, docs/algorithm.md section 7, with
    ``sigma = u^T W v``, then the DenseNet's column scales); a hidden layer becomes
    ``[[k (b - shift), k wn], [k (-b - shift), -k wn]]`` (the concatenated activation's two halves), the final
    layer ``[b, wn]``. Autograd through these ~12 operators per layer cost more than the arithmetic; the
    backward here is the same chain rule in a few batched operations (checked against autograd in float64 by
    the fused-versus-generic tests).

    ``gain`` (nb,), if given, replaces the constant ``k`` of a hidden layer by a per-block factor that is itself
    differentiated: CLipSwish's learnable ``beta`` (see :func:`~monoflow_core.fused.folded.swish_gains`).
    """

    @staticmethod
    def forward(
        ctx: Any,
        w: Tensor,
        b: Tensor,
        cols: Tensor,
        u: Tensor,
        v: Tensor,
        coeff: Tensor,
        hidden: bool,
        shift: float,
        k: float,
        gain: Tensor | None = None,
    ) -> Tensor:
        # u^T W v (einsum measured 60 us here, two bmm 22 us)
        sigma = torch.bmm(torch.bmm(u.unsqueeze(1), w), v.unsqueeze(2)).view(-1)
        ratio = sigma / coeff
        s = torch.clamp(ratio, min=1.0)
        raw = w / s[:, None, None]
        wn = raw * cols[:, None, :]
        nb, m, width = w.shape
        if hidden and gain is not None:
            out = w.new_empty(nb, 2 * m, 1 + width)
            g1, g2 = gain[:, None], gain[:, None, None]
            torch.mul(torch.sub(b, shift), g1, out=out[:, :m, 0])
            torch.mul(torch.add(b, shift), g1, out=out[:, m:, 0]).neg_()
            torch.mul(wn, g2, out=out[:, :m, 1:])
            torch.mul(wn, g2, out=out[:, m:, 1:]).neg_()
        elif hidden:
            out = w.new_empty(nb, 2 * m, 1 + width)
            torch.mul(torch.sub(b, shift), k, out=out[:, :m, 0])
            torch.mul(torch.add(b, shift), -k, out=out[:, m:, 0])
            torch.mul(wn, k, out=out[:, :m, 1:])
            torch.mul(wn, -k, out=out[:, m:, 1:])
        else:
            out = torch.cat([b.unsqueeze(2), wn], dim=2)
        ctx.save_for_backward(w, raw, cols, u, v, coeff, s, ratio, *((b, wn, gain) if gain is not None else ()))
        ctx.hidden, ctx.k, ctx.shift = hidden, k, shift
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        w, raw, cols, u, v, coeff, s, ratio, *extra = ctx.saved_tensors
        m = w.shape[1]
        g_gain = None
        if ctx.hidden and extra:
            # out = gain [[b - shift, wn], [-b - shift, -wn]]: the gain's gradient pairs grad with that matrix
            b, wn, gain = extra
            shift = ctx.shift
            top0, bot0, d_wn = grad[:, :m, 0], grad[:, m:, 0], grad[:, :m, 1:] - grad[:, m:, 1:]
            g_gain = (top0 * (b - shift) - bot0 * (b + shift)).sum(1) + (d_wn * wn).sum((1, 2))
            g_b = (top0 - bot0).mul_(gain[:, None])
            g_wn = d_wn.mul_(gain[:, None, None])
        elif ctx.hidden:
            k = ctx.k
            g_b = (grad[:, :m, 0] - grad[:, m:, 0]).mul_(k)
            g_wn = (grad[:, :m, 1:] - grad[:, m:, 1:]).mul_(k)
        else:
            g_b, g_wn = grad[:, :, 0], grad[:, :, 1:]
        g_cols = (g_wn * raw).sum(1)
        g_raw = g_wn * cols[:, None, :]
        # raw = W / s, s = max(1, sigma / coeff) (clamp passes its gradient where ratio >= 1, as torch.clamp)
        g_sigma = (g_raw * w).sum((1, 2)).div_(s * s * coeff).neg_() * (ratio >= 1.0).to(w.dtype)
        g_w = g_raw / s[:, None, None] + g_sigma[:, None, None] * (u[:, :, None] * v[:, None, :])
        return g_w, g_b, g_cols, None, None, None, None, None, None, g_gain


def fold_nets(nets: Sequence[DenseNetG]) -> FoldedNet:
    """Fold a stack of same-architecture DenseNet G networks (differentiable in their parameters).

    With the compiled kernels ready (CPU, exact spectral norms) the fold is one compiled call each way
    (:class:`~monoflow_core.fused.fold_compiled.KernelFold`); otherwise it is the PyTorch computation below, whose
    autograd is the reference.
    """
    if kernel_fold_applies(nets):
        return kernel_fold(nets)
    return fold_nets_torch(nets)


def fold_nets_torch(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` in PyTorch operators (autograd through them)."""
    spec = activation_spec(nets[0])
    assert spec is not None, "fold_nets: the nets' activation is not one the fused path folds"
    shift, scale, kind = spec
    # Pila's k (times log2 e, for exp2) is folded into the pre-activations and 1/k into the next layers' weights;
    # CLipSwish's learnable beta likewise, per block and layer (swish_gains).
    k = PILA_K * LOG2E if kind == "pila" else 1.0
    scale = scale / k
    run = active_run(nets)  # inside a trainer's step: the flat buffers (monoflow_core.fused.flat), no stacking
    gains = None
    if kind == "swish":
        gains = swish_gains(nets) if run is None or run.activation is None else F.softplus(run.activation.data)
    scales = scale / gains if gains is not None else None  # (nb, depth): the output scale of each layer
    depth = len(nets[0].layers)
    n = nets[0].in_features
    ref = linears(nets[0])[0].weight
    lip = torch.tensor([g.lip_coeff for g in nets], dtype=ref.dtype, device=ref.device)
    concat_k = torch.stack([g.concat_k for g in nets]) if run is None else run.concat.data
    e = F.softplus(concat_k) + 0.1  # (nb, depth, 2)
    mix = lip[:, None, None] * e / torch.linalg.vector_norm(e, dim=2, keepdim=True)
    eta1, eta2 = mix[..., 0], mix[..., 1]  # (nb, depth)
    nb = len(nets)
    ones = torch.ones(nb, 1, dtype=ref.dtype, device=ref.device)
    # prods[:, i] = prod_{l < i} eta1_l: how much the input block is scaled when it reaches layer i.
    prods = torch.cat([ones, torch.cumprod(eta1, dim=1)], dim=1)  # (nb, depth + 1)
    weights: list[Tensor] = []
    widths = [n]
    layers = [linears(g) for g in nets]
    for i in range(depth + 1):
        # Scale of each feature block at the input of layer i: the input, then the new features of layer j < i.
        block_scales: list[Tensor] = [prods[:, i : i + 1]]
        for j in range(i):
            share = eta2[:, j : j + 1] * prods[:, i : i + 1] / prods[:, j + 1 : j + 2]
            block_scales.append(share * scale if scales is None else share * scales[:, j : j + 1])
        cols = torch.cat([s.expand(nb, wdt) for s, wdt in zip(block_scales, widths, strict=True)], dim=1)
        hidden = i < depth
        stack = [row[i] for row in layers]  # layer i of every block (the final layer at i = depth)
        w = torch.stack([lin.weight for lin in stack]) if run is None else run.layer_weight(i)
        u, v = _singular_pair(stack, w)
        coeff = torch.tensor([lin.coeff for lin in stack], dtype=w.dtype, device=w.device)
        b = torch.stack([bias_of(lin) for lin in stack]) if run is None else run.layer_bias(i)
        gain = gains[:, i] if gains is not None and hidden else None
        weights.append(FoldLayer.apply(w, b, cols, u, v, coeff, hidden, shift, k, gain))
        if not hidden:
            break
        widths.append(2 * w.shape[1])
    return FoldedNet(weights[:-1], weights[-1], n, kind)
