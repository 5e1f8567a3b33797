"""Running a fused run on the compiled kernels: their arguments, the batch's parts over threads, the statistics."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..solvers import SolverStats, effective_tolerance
from . import blas, kernels
from .compiler import kernels_ready
from .folded import FoldedNet
from .kernels import (
    Cotangents,
    KernelConstants,
    KernelNet,
    KernelSpace,
    RunGrads,
    RunOutputs,
    RunSetup,
    SolvePart,
    SolveWork,
)
from .newton import warn_failed
from .plan import SQRT2, RunPlan
from .settings import SETTINGS
from .workspace import Workspace

__all__ = [
    "FORWARD_SETUP",
    "INVERSE_SETUP",
    "KERNEL_ACTIVATIONS",
    "KERNEL_KINDS",
    "THREADS",
    "KernelThreads",
    "SolveBudget",
    "kernel_backward",
    "kernel_forward",
    "kernel_parts",
    "kernel_run",
    "kernel_weights",
    "kernels_apply",
]

#: Activation kinds of the folded networks -> the compiled kernels' activation codes.
KERNEL_ACTIVATIONS = {"pila": kernels.ACT_PILA, "relu": kernels.ACT_RELU, "swish": kernels.ACT_SWISH}

#: Per block kind of a run, how its solve and log-det are set up on the compiled kernels: (mode, rhs scale, output
#: weight of the solution, output weight of the input, weight of log|det A|, weight of log|det(2I - A)|)
#: (:class:`~monoflow_core.fused.kernels.RunSetup`).
FORWARD_SETUP = {
    "residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 1.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, -1.0, 1.0),
    "inverse_residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, -1.0, 0.0),
}
#: The inverses (no log-det): x = y + G(y) for an inverse residual block, otherwise solve w + sign G(w) = rhs.
INVERSE_SETUP = {
    "inverse_residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 0.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, 0.0, 0.0),
    "residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, 0.0, 0.0),
}
#: Block kinds -> the compiled backward's codes.
KERNEL_KINDS = {
    "residual": kernels.KIND_RESIDUAL,
    "monotone": kernels.KIND_MONOTONE,
    "inverse_residual": kernels.KIND_INVERSE_RESIDUAL,
}


class SolveBudget(Protocol):
    """What a solve reads from its block: the relative tolerance and the iteration cap."""

    @property
    def tol(self) -> float: ...

    @property
    def max_iter(self) -> int: ...


def kernels_apply(x: Tensor, net: FoldedNet, backward: bool = True) -> bool:
    """Whether the compiled kernels serve points ``x`` with the folded weights ``net`` (CPU, float32/64).

    They serve once compiled for ``x``'s dtype and for what the caller needs (:func:`kernels_ready`; ``backward``:
    a forward pass whose backward pass follows, else a solve without gradients). The first call waits for them
    (:attr:`~monoflow_core.fused.settings.FusedSettings.wait`); without waiting the PyTorch kernels serve until they
    are ready.
    """
    return (
        SETTINGS.use_kernels
        and kernels.AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and net.kind in KERNEL_ACTIVATIONS
        and kernels_ready(x.dtype, wait=SETTINGS.wait, backward=backward)
    )


def kernel_weights(net: FoldedNet, signs: Sequence[float]) -> KernelNet:
    """The fold as the kernels read it: each block's hidden weights flattened into one row (layer ``i`` from
    ``offs[i]`` as (m, widths[i])), the offsets, the widths each layer reads, and each block's map weights
    ``[0, I, 0] + sign final`` (nb, n, T) (see :meth:`~monoflow_core.fused.folded.BlockWeights.map_weights`). In
    NumPy: these few small operations cost a fraction of PyTorch's per-operator overhead."""
    final = net.final.detach().numpy()
    nb, n, _ = final.shape
    hidden = [wi.detach().numpy() for wi in net.weights]
    flat = np.concatenate([wi.reshape(nb, -1) for wi in hidden], axis=1)
    sizes = [wi.shape[1] * wi.shape[2] for wi in hidden]
    offs = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    widths = np.array([wi.shape[2] for wi in hidden], dtype=np.int64)
    fw = final * np.asarray(signs, dtype=final.dtype).reshape(nb, 1, 1)
    fw[:, :, 1 : 1 + n] += np.eye(n, dtype=final.dtype)
    return KernelNet(flat, offs, widths, int(net.weights[0].shape[1]), fw, KERNEL_ACTIVATIONS[net.kind])


def kernel_parts(b: int) -> list[tuple[int, int]]:
    """How the compiled kernels split a batch of ``b`` points: ``(start, count)`` parts, one per thread.

    As many parts as :attr:`~monoflow_core.fused.settings.FusedSettings.threads`, or PyTorch's intra-op threads
    (``torch.get_num_threads()``), each of at least ``part_min`` points: the points are independent (only the weight
    gradients are summed), and the kernels release the GIL, so the parts run in parallel. On the 2-core development
    VM two parts made a training step only about 10% faster (its cores behave like one core's two hyperthreads;
    ``engine_speed.md``). The studio gives training one thread (its view process has the other core); the command
    line's ``--threads`` and the benchmarks set it explicitly.
    """
    parts = max(1, min(SETTINGS.threads or torch.get_num_threads(), b // SETTINGS.part_min))
    bounds = [round(i * b / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


class KernelThreads:
    """The threads the compiled kernels' parts run on (one pool, made at first need) and each thread's scratch.

    Attributes:
        keep_bytes: the largest scratch array a thread keeps between calls (evaluations come in chunks of a few
            thousand points; an unchunked huge batch does not pin its memory afterwards).
    """

    def __init__(self, keep_bytes: int = 64 * 1024 * 1024) -> None:
        self.keep_bytes = keep_bytes
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._local = threading.local()

    def scratch(self, size: int, dtype: np.dtype) -> np.ndarray:
        """This thread's scratch array for the kernels' no-gradient solves, of at least ``size`` elements of
        ``dtype`` (kept and grown: a fresh one per call would pay page faults on every chunk of an evaluation)."""
        key = np.dtype(dtype).str
        buffers: dict[str, np.ndarray] | None = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get(key)
        if buf is None or buf.shape[0] < size:
            buf = np.empty(size, dtype)
            if buf.nbytes <= self.keep_bytes:
                buffers[key] = buf
        return buf

    def run(self, task: Callable[[int], None], count: int) -> None:
        """Run ``task(i)`` for ``i < count``: ``i = 0`` in this thread, the others in the pool.

        Each task's BLAS products run on its own thread alone (:func:`monoflow_core.fused.blas.single_threaded`): the
        parts are the parallelism.
        """
        if count == 1:
            _single_threaded(task, 0)
            return
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=os.cpu_count() or 2, thread_name_prefix="monoflow-kernel"
                )
            executor = self._executor
        futures = [executor.submit(_single_threaded, task, i) for i in range(1, count)]
        try:
            _single_threaded(task, 0)
        finally:
            # every part has finished (even when one failed) before its buffers can be reused
            concurrent.futures.wait(futures)
        for future in futures:
            future.result()  # re-raises a part's error


def _single_threaded(task: Callable[[int], None], i: int) -> None:
    with blas.single_threaded():
        task(i)


#: The process's kernel threads.
THREADS = KernelThreads()


def _setup(rows: Sequence[tuple[float, ...]], tols: np.ndarray, caps: np.ndarray, dtype: np.dtype) -> RunSetup:
    table = np.array(rows, dtype=np.float64)
    rhs_scale, out_w, out_x, ld_plus, ld_mono = (table[:, c].astype(dtype) for c in range(1, 6))
    return RunSetup(table[:, 0].astype(np.int64), rhs_scale, out_w, out_x, ld_plus, ld_mono, tols, caps)


def kernel_run(
    x: Tensor,
    blocks: Sequence[SolveBudget],
    net: FoldedNet,
    setup: Sequence[tuple[float, ...]],
    signs: Sequence[float],
    labels: Sequence[str],
    spaces: Sequence[Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: KernelNet | None = None,
) -> tuple[Tensor, Tensor, list[SolverStats]]:
    """Run blocks on points ``x`` (B, n) with the compiled kernels: ``(y (B, n), summed log-det (B,), stats)``.

    ``setup`` holds each block's row of :data:`FORWARD_SETUP` (or of :data:`INVERSE_SETUP`). The batch runs in
    ``parts`` (default :func:`kernel_parts`), in parallel; with workspaces ``spaces`` (one per part) every block's
    final evaluation stays there for the backward pass, without them the kernel uses scratch of its own.
    ``weights``: :func:`kernel_weights` of ``net`` and ``signs`` if already made.
    """
    x = x.detach().contiguous()
    b = x.shape[0]
    nb = len(blocks)
    parts = kernel_parts(b) if parts is None else parts
    knet = weights if weights is not None else kernel_weights(net, signs)
    np_dtype = x.numpy().dtype
    tols = np.array([effective_tolerance(blk.tol, x.dtype) for blk in blocks], dtype=np_dtype)
    caps = np.array([int(blk.max_iter) for blk in blocks], dtype=np.int64)
    y = torch.empty_like(x)
    logdet = x.new_empty(b)
    iterations = torch.empty(nb, b, dtype=torch.int64)
    residual = x.new_empty(nb, b)
    converged = torch.empty(nb, b, dtype=torch.bool)
    stalled = torch.empty(nb, b, dtype=torch.bool)
    run_setup = _setup(setup, tols, caps, np_dtype)
    outputs = RunOutputs(*(t.numpy() for t in (y, logdet, iterations, residual, converged, stalled)))
    consts = KernelConstants(kernels.constants(np_dtype), kernels.exp2_coefficients(np_dtype))
    int_type = kernels.exp2_bits(np_dtype)
    keep = spaces is not None
    points = x.numpy()
    no_space = KernelSpace(*(np.empty((0,) * d, np_dtype) for d in (3, 4, 4, 5, 3)))  # (the kernel's own scratch)

    def run(i: int) -> None:
        start, count = parts[i]
        if spaces is not None:  # a training forward: the part's own workspace, in one call
            space = spaces[i].kernel_space()
            scratch = np.empty(0, np_dtype)
            sub = max(1, count)
        else:  # slices that stay in cache, in this thread's scratch
            space = no_space
            sub = max(1, min(count, SETTINGS.no_grad_points))
            size = kernels.scratch_size(knet.fw.shape[2], len(knet.offs), knet.m, knet.fw.shape[1], sub)
            scratch = THREADS.scratch(size, np_dtype)
        for at in range(start, start + count, sub):
            n_at = min(sub, start + count - at)
            part = SolvePart(at, n_at, keep, SETTINGS.compact_fraction)
            work = SolveWork(np.empty(n_at, int_type), scratch)
            kernels.solve_run(points, knet, run_setup, outputs, space, part, consts, work)

    THREADS.run(run, len(parts))
    evaluations = iterations.numpy().max(axis=1)
    failed = b - converged.numpy().sum(axis=1)
    stats = []
    for j in range(nb):
        st = SolverStats(
            "newton",
            iterations[j],
            residual[j],
            converged[j],
            int(evaluations[j]),
            float(tols[j]),
            int(caps[j]),
            stalled=stalled[j],
        )
        if failed[j]:
            warn_failed(st, labels[j])
        stats.append(st)
    return y, logdet, stats


def kernel_forward(
    x: Tensor,
    plan: RunPlan,
    net: FoldedNet,
    spaces: Sequence[Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: KernelNet | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`~monoflow_core.fused.run.torch_forward` by the compiled kernels, on points ``x`` (B, n):
    ``(y (B, n), summed log-det)``; records each block's solver statistics."""
    blocks = plan.blocks
    labels = [f"{type(blk).__name__} forward solve" for blk in blocks]
    y, logdet, stats = kernel_run(
        x,
        blocks,
        net,
        [FORWARD_SETUP[blk.kind] for blk in blocks],
        [1.0] * len(blocks),
        labels,
        spaces,
        parts,
        weights,
    )
    for blk, st in zip(blocks, stats, strict=True):
        if blk.kind != "residual":
            blk.forward_stats = st
        blk.last_logdet_exact = True
    return y, logdet


def kernel_backward(
    net: FoldedNet,
    spaces: Sequence[Workspace],
    parts: Sequence[tuple[int, int]],
    kinds: Sequence[str],
    grad_z: Tensor,
    grad_logdet: Tensor,
    weights: KernelNet | None = None,
) -> list[Tensor | None]:
    """:meth:`~monoflow_core.fused.run.FusedBlocks.backward` by the compiled kernel, part by part in parallel: the
    gradients of ``x``, (plan) and the folded tensors (each part's weight gradients summed). ``weights``: the
    forward's :func:`kernel_weights`."""
    knet = weights if weights is not None else kernel_weights(net, [1.0] * len(kinds))
    grad_flat = net.final.new_empty((len(parts), *knet.wflat.shape))
    grad_fw = net.final.new_empty((len(parts), *knet.fw.shape))
    grad_x = torch.empty(grad_z.shape, dtype=grad_z.dtype)
    codes = np.array([KERNEL_KINDS[k] for k in kinds], dtype=np.int64)
    cotangents = Cotangents(grad_z.detach().contiguous().numpy(), grad_logdet.detach().contiguous().numpy())
    cst = kernels.constants(grad_flat.numpy().dtype)

    def run(i: int) -> None:
        grads = RunGrads(grad_x.numpy(), grad_flat[i].numpy(), grad_fw[i].numpy())
        kernels.backward_run(knet, codes, cotangents, spaces[i].kernel_space(), grads, cst, *parts[i])

    THREADS.run(run, len(parts))
    if len(parts) > 1:
        grad_flat, grad_fw = grad_flat.sum(0), grad_fw.sum(0)
    else:
        grad_flat, grad_fw = grad_flat[0], grad_fw[0]
    grads: list[Tensor | None] = [grad_x, None]
    start = 0
    for wi in net.weights:
        size = wi.shape[1] * wi.shape[2]
        grads.append(grad_flat[:, start : start + size].view(wi.shape))
        start += size
    grads.append(grad_fw)
    return grads
