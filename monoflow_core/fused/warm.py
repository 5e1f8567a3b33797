"""Calling every compiled kernel of a set once, on a tiny deterministic problem: how a set is compiled."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .dispatch import FORWARD_SETUP, kernel_backward, kernel_run
from .fold_compiled import FoldConstants, KernelFold, fold_layout, folded_from_flat
from .plan import LOG2E, PILA_K
from .workspace import Workspace

__all__ = ["run_kernels_once"]


@dataclass
class _WarmBlock:
    """What the kernels' solve reads of a block (:class:`~monoflow_core.fused.dispatch.SolveBudget`)."""

    tol: float
    max_iter: int
    kind: str


def run_kernels_once(dtype: torch.dtype, backward: bool, check: Callable[[], None]) -> None:
    """Call every compiled kernel of a set once in ``dtype`` on a tiny deterministic problem (see
    :meth:`~monoflow_core.fused.compiler.KernelCompiler.compile`): the fold's forward and a solve, then with
    ``backward`` the fold's backward, a training solve and the run's backward.

    Each call is one piece of the compile (Numba compiles a kernel at its first call); ``check`` runs before each (a
    background compile stops there once the interpreter is shutting down), so no piece, and no autograd pass, starts
    then. 2 dimensions, 2 layers of 4 units: every kernel takes its sizes as arguments.
    """

    def ramp(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.sin(torch.arange(math.prod(shape), dtype=dtype)).mul_(scale).view(shape)

    n, m, depth = 2, 4, 2
    shapes = [(m, n), (m, n + 2 * m), (n, n + 4 * m)]  # (rows, cols) of each linear layer (widths 2, 10, 18)
    layout = fold_layout(shapes)
    sizes = [r * c for r, c in shapes]
    wflat = ramp(1, sum(sizes)).requires_grad_(backward)
    bflat = ramp(1, sum(r for r, _ in shapes)).requires_grad_(backward)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    constants = FoldConstants(np.ones(1, np_dtype) * 0.98, np.full((depth + 1, 1), 0.9, np_dtype), 0.2, layout)
    gains = torch.full((1, depth), PILA_K * LOG2E, dtype=torch.float64)
    scales = torch.full((1, depth), 1.0 / 1.06 / (PILA_K * LOG2E), dtype=torch.float64)
    check()
    out = KernelFold.apply(
        constants, torch.ones(1, depth, 2, dtype=dtype, requires_grad=backward), wflat, bflat, gains, scales
    )
    if backward:
        check()
        torch.autograd.grad(out.sum(), [wflat, bflat])
    net = folded_from_flat(out.detach(), layout, n, "pila")
    block = _WarmBlock(tol=1e-6, max_iter=20, kind="monotone")
    x = ramp(4, n, scale=1.0)
    setup = [FORWARD_SETUP["monotone"]]
    ws = Workspace(net, 1, 4, x)
    if backward:
        check()
        kernel_run(x, [block], net, setup, [1.0], ["warm-up"], [ws], [(0, 4)])
    check()
    kernel_run(x, [block], net, setup, [1.0], ["warm-up"], None, [(0, 4)])
    if backward:
        check()
        kernel_backward(net, [ws], [(0, 4)], ["monotone"], torch.zeros_like(x), torch.zeros(4, dtype=dtype))
