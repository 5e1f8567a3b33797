"""Calling every compiled kernel of a set once, on a tiny deterministic problem: how a set is compiled."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

from .compiler import _check_not_cancelled
from .dispatch import _kernel_backward, _kernel_run
from .dispatch_codes import _KERNEL_FORWARD
from .fold_compiled import _fold_layout, _folded_from_flat, _KernelFold
from .plan import _K, _LOG2E
from .workspace import _Workspace


def run_kernels_once(dtype: torch.dtype, backward: bool = True) -> None:
    """Call every compiled kernel of a set once in ``dtype`` on a tiny deterministic problem (see
    :func:`_compile_kernels`): the fold's forward and a solve, then with ``backward`` the fold's backward, a training
    solve and the run's backward.

    Each call is one piece of the compile (Numba compiles a kernel at its first call); a background compile checks
    for shutdown before each (:func:`_check_not_cancelled`), so no piece, and no autograd pass, starts once the
    interpreter is shutting down.
    """

    def ramp(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.sin(torch.arange(math.prod(shape), dtype=dtype)).mul_(scale).view(shape)

    n, m, depth = 2, 4, 2
    shapes = [(m, n), (m, n + 2 * m), (n, n + 4 * m)]  # (rows, cols) of each linear layer (widths 2, 10, 18)
    linears = [SimpleNamespace(weight=torch.empty(r, c)) for r, c in shapes]
    layout = _fold_layout(linears)
    sizes = [r * c for r, c in shapes]
    wflat = ramp(1, sum(sizes)).requires_grad_(backward)
    bflat = ramp(1, sum(r for r, _ in shapes)).requires_grad_(backward)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    meta = (np.ones(1, np_dtype) * 0.98, np.full((depth + 1, 1), 0.9, np_dtype), 0.2, layout)
    gains = torch.full((1, depth), _K * _LOG2E, dtype=torch.float64)
    scales = torch.full((1, depth), 1.0 / 1.06 / (_K * _LOG2E), dtype=torch.float64)
    _check_not_cancelled()
    out = _KernelFold.apply(
        meta, torch.ones(1, depth, 2, dtype=dtype, requires_grad=backward), wflat, bflat, gains, scales
    )
    if backward:
        _check_not_cancelled()
        torch.autograd.grad(out.sum(), [wflat, bflat])
    net = _folded_from_flat(out.detach(), layout, n, "pila")
    block = SimpleNamespace(tol=1e-6, max_iter=20, kind="monotone")
    x = ramp(4, n, scale=1.0)
    setup = [_KERNEL_FORWARD["monotone"]]
    if backward:
        ws = _Workspace(net, 1, 4, x)
        _check_not_cancelled()
        _kernel_run(x, [block], net, setup, [1.0], ["warm-up"], [ws], [(0, 4)])
    _check_not_cancelled()
    _kernel_run(x, [block], net, setup, [1.0], ["warm-up"], None, [(0, 4)])
    if backward:
        _check_not_cancelled()
        _kernel_backward(net, [ws], [(0, 4)], ["monotone"], torch.zeros_like(x), torch.zeros(4, dtype=dtype))
