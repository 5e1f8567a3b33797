"""The fused path's entry points: a run of blocks forward (differentiable), and inverses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .algebra import _logdet_sum
from .backward import torch_backward
from .dispatch import _kernel_backward, _kernel_forward, _kernel_run, _kernel_weights, kernel_parts, kernels_apply
from .dispatch_codes import _KERNEL_INVERSE
from .evaluate import evaluate, evaluate_with_jacobian
from .fold import fold_nets
from .fold_cache import cached_fold
from .folded import FoldedNet, _BlockWeights
from .newton import _newton, _newton_compact
from .plan import SQRT2, _Plan
from .workspace import _acquire_workspace, _BlockViews, _GraphToken, _release_with, _Workspace


def _block_solve(block: Any, weights: _BlockWeights, x: Tensor, v: _BlockViews | None) -> tuple[Tensor, Tensor | None]:
    """One block on points ``x`` (n, B): ``(y, I + J_G at the solution, or None)``; records solver stats.

    With views ``v`` the final evaluation stays in the workspace for the backward pass (and the log-det, computed
    for all blocks at once); without (no gradient needed) converged samples leave the solve early and the
    Jacobian map is returned.
    """
    kind = block.kind
    b = x.shape[1]
    if kind == "residual":
        view = _Workspace(weights, 1, b, x).block(0) if v is None else v
        evaluate_with_jacobian(weights, x, view, weights.map_weights(1.0))
        return view.out_p, view.jacobian_map if v is None else None
    rhs = SQRT2 * x if kind == "monotone" else x
    label = f"{type(block).__name__} forward solve"
    a = None
    if v is None:
        w, a, block.forward_stats = _newton_compact(weights, rhs, 1.0, block.tol, block.max_iter, label, True)
    else:
        w, block.forward_stats = _newton(weights, rhs, 1.0, block.tol, block.max_iter, label, v)
    return (SQRT2 * w - x if kind == "monotone" else w), a


def _fused_forward(x: Tensor, plan: _Plan, net: FoldedNet, ws: _Workspace | None) -> tuple[Tensor, Tensor]:
    """Forward through the run on points ``x`` (n, B): ``(y, summed log-det)``.

    With a workspace ``ws`` (training), every block evaluates into its own slice of it, where the backward pass
    finds it; without, the solves drop converged samples and nothing is kept.
    """
    maps: list[Tensor] = []  # without a workspace: each block's Jacobian map, as the solves return them
    for j, block in enumerate(plan.blocks):
        x, a = _block_solve(block, net.block(j), x, ws.block(j) if ws is not None else None)
        block.last_logdet_exact = True
        if a is not None:
            maps.append(a)
    kinds = [blk.kind for blk in plan.blocks]
    return x, _logdet_sum(kinds, ws.jacobian_maps() if ws is not None else torch.stack(maps))


class _FusedBlocks(torch.autograd.Function):
    """A run of blocks as one autograd node with the exact implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        net = FoldedNet.from_tensors([t.detach() for t in tensors], plan.n, plan.kind)
        ctx.token = _GraphToken()
        ctx.compiled = kernels_apply(x, net, backward=True)
        if ctx.compiled:
            # one workspace per part of the batch (the parts run in parallel, kernel_parts)
            ctx.parts = kernel_parts(x.shape[0])
            ctx.spaces = []
            for _, count in ctx.parts:
                ws, key = _acquire_workspace(net, count, x)
                _release_with(ctx.token, ws, key)
                ctx.spaces.append(ws)
            ctx.weights = _kernel_weights(net, [1.0] * len(plan.blocks))
            y, total = _kernel_forward(x, plan, net, ctx.spaces, ctx.parts, ctx.weights)
        else:
            xt = x.detach().t().contiguous()  # (the PyTorch kernels' feature-major layout)
            ws, key = _acquire_workspace(net, xt.shape[1], xt)
            _release_with(ctx.token, ws, key)
            yt, total = _fused_forward(xt, plan, net, ws)
            y = yt.t().contiguous()
            ctx.ws = ws
        ctx.net = net
        ctx.kinds = [blk.kind for blk in plan.blocks]
        return y, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        net: FoldedNet = ctx.net
        kinds: list[str] = ctx.kinds
        if ctx.compiled:
            return (*_kernel_backward(net, ctx.spaces, ctx.parts, kinds, grad_z, grad_logdet, ctx.weights),)
        return (*torch_backward(net, ctx.ws, kinds, grad_z, grad_logdet),)


def run_fused(blocks: Sequence[Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run eligible blocks (same architecture) on ``x`` (B, n); returns ``(y, summed logdet)``, differentiable."""
    nets = [blk.net for blk in blocks]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for g in nets for p in g.parameters())
    )
    if not needs_grad:
        with torch.no_grad():
            folded = cached_fold(nets)
            plan = _Plan(list(blocks), folded.n, folded.kind)
            if kernels_apply(x, folded, backward=False):
                return _kernel_forward(x, plan, folded, None)
            y, logdet = _fused_forward(x.t().contiguous(), plan, folded, None)
        return y.t(), logdet
    folded = fold_nets(nets)
    plan = _Plan(list(blocks), folded.n, folded.kind)
    return _FusedBlocks.apply(x, plan, *folded.tensors())


def fused_inverse_run(blocks: Sequence[Any], y: Tensor) -> Tensor:
    """Inverse of a run of eligible blocks (same architecture; the last block first) on ``y`` (B, n), without
    autograd: one compiled call for the whole run where the kernels serve (as :func:`run_fused` forward), else block
    by block (:func:`fused_inverse`). Inside :func:`folded_runs` the run's fold is made once per scope."""
    if len(blocks) > 1:
        with torch.no_grad():
            folded = cached_fold([blk.net for blk in blocks])
            if kernels_apply(y, folded, backward=False):
                order = list(reversed(blocks))
                signs = [-1.0 if blk.kind == "monotone" else 1.0 for blk in order]
                labels = [f"{type(blk).__name__} inverse solve" for blk in order]
                x, _, stats = _kernel_run(
                    y, order, folded.reversed(), [_KERNEL_INVERSE[blk.kind] for blk in order], signs, labels, None
                )
                for blk, st in zip(order, stats, strict=True):
                    if blk.kind != "inverse_residual":
                        blk.inverse_stats = st
                return x
    for blk in reversed(blocks):
        y = fused_inverse(blk, y)
    return y


def fused_inverse(block: Any, y: Tensor) -> Tensor:
    """Inverse of one eligible block on ``y`` (B, n) without autograd (sampling): Newton on the folded kernel."""
    with torch.no_grad():
        folded = cached_fold([block.net])
        if kernels_apply(y, folded, backward=False):
            sign = -1.0 if block.kind == "monotone" else 1.0
            x, _, (stats,) = _kernel_run(
                y,
                [block],
                folded,
                [_KERNEL_INVERSE[block.kind]],
                [sign],
                [f"{type(block).__name__} inverse solve"],
                None,
            )
            if block.kind != "inverse_residual":
                block.inverse_stats = stats
            return x
        net = folded.block(0)
        yt = y.t().contiguous()
        if block.kind == "inverse_residual":
            return evaluate(net, yt, net.map_weights(1.0)).t()
        sign = -1.0 if block.kind == "monotone" else 1.0
        rhs = SQRT2 * yt if block.kind == "monotone" else yt
        label = f"{type(block).__name__} inverse solve"
        w, _, block.inverse_stats = _newton_compact(net, rhs, sign, block.tol, block.max_iter, label, False)
        return (SQRT2 * w - yt).t() if block.kind == "monotone" else w.t()
