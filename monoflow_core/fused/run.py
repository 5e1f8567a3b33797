"""The fused path's entry points: a run of blocks forward (differentiable), and inverses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from .algebra import logdet_sum
from .backward import torch_backward
from .dispatch import (
    INVERSE_SETUP,
    kernel_backward,
    kernel_forward,
    kernel_parts,
    kernel_run,
    kernel_weights,
    kernels_apply,
)
from .evaluate import evaluate, evaluate_with_jacobian
from .fold import fold_nets
from .fold_cache import cached_fold
from .folded import BlockWeights, FoldedNet
from .newton import newton_solve, newton_solve_compact
from .plan import SQRT2, FusedBlock, RunPlan, net_of
from .workspace import POOL, BlockViews, GraphToken, Workspace

__all__ = ["FusedBlocks", "fused_inverse", "fused_inverse_run", "run_fused", "torch_forward"]


def _fused(blocks: Sequence[nn.Module]) -> list[FusedBlock]:
    """The blocks as the fused path types them: callers pass blocks that
    :func:`~monoflow_core.fused.plan.fast_eligible` accepted (:func:`~monoflow_core.fused.plan.fusable_runs`)."""
    return cast(list[FusedBlock], list(blocks))


def _block_solve(
    block: FusedBlock, weights: BlockWeights, x: Tensor, v: BlockViews | None
) -> tuple[Tensor, Tensor | None]:
    """One block on points ``x`` (n, B): ``(y, I + J_G at the solution, or None)``; records solver stats.

    With views ``v`` the final evaluation stays in the workspace for the backward pass (and the log-det, computed
    for all blocks at once); without (no gradient needed) finished samples leave the solve early and the
    Jacobian map is returned.
    """
    kind = block.kind
    b = x.shape[1]
    if kind == "residual":
        view = Workspace(weights, 1, b, x).block(0) if v is None else v
        evaluate_with_jacobian(weights, x, view, weights.map_weights(1.0))
        return view.out_p, view.jacobian_map if v is None else None
    rhs = SQRT2 * x if kind == "monotone" else x
    label = f"{type(block).__name__} forward solve"
    a = None
    if v is None:
        w, a, block.forward_stats = newton_solve_compact(weights, rhs, 1.0, block.tol, block.max_iter, label, True)
    else:
        w, block.forward_stats = newton_solve(weights, rhs, 1.0, block.tol, block.max_iter, label, v)
    return (SQRT2 * w - x if kind == "monotone" else w), a


def torch_forward(x: Tensor, plan: RunPlan, net: FoldedNet, ws: Workspace | None) -> tuple[Tensor, Tensor]:
    """Forward through the run on the PyTorch kernels, on points ``x`` (n, B): ``(y, summed log-det)``.

    With a workspace ``ws`` (training), every block evaluates into its own slice of it, where the backward pass
    finds it; without, the solves drop finished samples and nothing is kept.
    """
    maps: list[Tensor] = []  # without a workspace: each block's Jacobian map, as the solves return them
    for j, block in enumerate(plan.blocks):
        x, a = _block_solve(block, net.block(j), x, ws.block(j) if ws is not None else None)
        block.last_logdet_exact = True
        if a is not None:
            maps.append(a)
    kinds = [blk.kind for blk in plan.blocks]
    return x, logdet_sum(kinds, ws.jacobian_maps() if ws is not None else torch.stack(maps))


class FusedBlocks(torch.autograd.Function):
    """A run of blocks as one autograd node with the exact implicit backward (see the package docstring).

    Forward on the compiled kernels where they serve (one workspace per part of the batch, the parts in parallel),
    else on the PyTorch kernels; either way the workspaces come from the pool and return to it when the node dies.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: RunPlan, *tensors: Tensor) -> tuple[Tensor, Tensor]:
        net = FoldedNet.from_tensors([t.detach() for t in tensors], plan.n, plan.kind)
        ctx.token = GraphToken()
        ctx.compiled = kernels_apply(x, net, backward=True)
        if ctx.compiled:
            # one workspace per part of the batch (the parts run in parallel, kernel_parts)
            ctx.parts = kernel_parts(x.shape[0])
            ctx.spaces = []
            for _, count in ctx.parts:
                ws, key = POOL.acquire(net, count, x)
                POOL.release_with(ctx.token, ws, key)
                ctx.spaces.append(ws)
            ctx.weights = kernel_weights(net, [1.0] * len(plan.blocks))
            y, total = kernel_forward(x, plan, net, ctx.spaces, ctx.parts, ctx.weights)
        else:
            xt = x.detach().t().contiguous()  # (the PyTorch kernels' feature-major layout)
            ws, key = POOL.acquire(net, xt.shape[1], xt)
            POOL.release_with(ctx.token, ws, key)
            yt, total = torch_forward(xt, plan, net, ws)
            y = yt.t().contiguous()
            ctx.ws = ws
        ctx.net = net
        ctx.kinds = [blk.kind for blk in plan.blocks]
        return y, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:
        net: FoldedNet = ctx.net
        kinds: list[str] = ctx.kinds
        if ctx.compiled:
            return (*kernel_backward(net, ctx.spaces, ctx.parts, kinds, grad_z, grad_logdet, ctx.weights),)
        return (*torch_backward(net, ctx.ws, kinds, grad_z, grad_logdet),)


def run_fused(blocks: Sequence[nn.Module], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run eligible blocks (one architecture, :func:`~monoflow_core.fused.plan.fusable_runs`) on ``x`` (B, n);
    returns ``(y, summed logdet)``, differentiable."""
    run = _fused(blocks)
    nets = [net_of(blk) for blk in run]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for g in nets for p in g.parameters())
    )
    if not needs_grad:
        with torch.no_grad():
            folded = cached_fold(nets)
            plan = RunPlan(run, folded.n, folded.kind)
            if kernels_apply(x, folded, backward=False):
                return kernel_forward(x, plan, folded, None)
            y, logdet = torch_forward(x.t().contiguous(), plan, folded, None)
        return y.t(), logdet
    folded = fold_nets(nets)
    plan = RunPlan(run, folded.n, folded.kind)
    y, logdet = FusedBlocks.apply(x, plan, *folded.tensors())
    return y, logdet


def fused_inverse_run(blocks: Sequence[nn.Module], y: Tensor) -> Tensor:
    """Inverse of a run of eligible blocks (one architecture; the last block first) on ``y`` (B, n), without
    autograd: one compiled call for the whole run where the kernels serve (as :func:`run_fused` forward), else block
    by block (:func:`fused_inverse`). Inside :func:`~monoflow_core.fused.fold_cache.folded_runs` the run's fold is
    made once per scope."""
    run = _fused(blocks)
    if len(run) > 1:
        with torch.no_grad():
            folded = cached_fold([net_of(blk) for blk in run])
            if kernels_apply(y, folded, backward=False):
                order = list(reversed(run))
                signs = [-1.0 if blk.kind == "monotone" else 1.0 for blk in order]
                labels = [f"{type(blk).__name__} inverse solve" for blk in order]
                x, _, stats = kernel_run(
                    y, order, folded.reversed(), [INVERSE_SETUP[blk.kind] for blk in order], signs, labels, None
                )
                for blk, st in zip(order, stats, strict=True):
                    if blk.kind != "inverse_residual":
                        blk.inverse_stats = st
                return x
    for blk in reversed(run):
        y = fused_inverse(blk, y)
    return y


def fused_inverse(block: nn.Module, y: Tensor) -> Tensor:
    """Inverse of one eligible block on ``y`` (B, n) without autograd (sampling): Newton on the folded kernel."""
    (blk,) = _fused([block])
    with torch.no_grad():
        folded = cached_fold([net_of(blk)])
        if kernels_apply(y, folded, backward=False):
            sign = -1.0 if blk.kind == "monotone" else 1.0
            x, _, (stats,) = kernel_run(
                y,
                [blk],
                folded,
                [INVERSE_SETUP[blk.kind]],
                [sign],
                [f"{type(blk).__name__} inverse solve"],
                None,
            )
            if blk.kind != "inverse_residual":
                blk.inverse_stats = stats
            return x
        net = folded.block(0)
        yt = y.t().contiguous()
        if blk.kind == "inverse_residual":
            return evaluate(net, yt, net.map_weights(1.0)).t()
        sign = -1.0 if blk.kind == "monotone" else 1.0
        rhs = SQRT2 * yt if blk.kind == "monotone" else yt
        label = f"{type(blk).__name__} inverse solve"
        w, _, blk.inverse_stats = newton_solve_compact(net, rhs, sign, blk.tol, blk.max_iter, label, False)
        return (SQRT2 * w - yt).t() if blk.kind == "monotone" else w.t()
