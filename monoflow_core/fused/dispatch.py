"""Running a fused run on the compiled kernels: their arguments, the batch's parts over threads, the statistics."""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..solvers import SolverStats, effective_tolerance
from . import blas, kernels, settings
from .compiler import kernels_ready
from .dispatch_codes import _KERNEL_ACTIVATIONS, _KERNEL_FORWARD, _KERNEL_KINDS
from .folded import FoldedNet
from .newton import _warn_unconverged
from .plan import _Plan
from .workspace import _Workspace


def kernels_apply(x: Tensor, net: FoldedNet, backward: bool = True) -> bool:
    """Whether the compiled kernels serve points ``x`` with the folded weights ``net`` (CPU, float32/64).

    They serve once compiled for ``x``'s dtype and for what the caller needs (:func:`kernels_ready`; ``backward``:
    a forward pass whose backward pass follows, else a solve without gradients). The first call waits for them
    (:data:`KERNELS_WAIT`); without waiting the PyTorch kernels serve until they are ready.
    """
    return (
        settings.USE_KERNELS
        and kernels.AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and net.kind in _KERNEL_ACTIVATIONS
        and kernels_ready(x.dtype, wait=settings.KERNELS_WAIT, backward=backward)
    )


def _kernel_weights(net: FoldedNet, signs: Sequence[float]) -> tuple[Any, Any, Any, Any]:
    """The fold as the kernels read it: each block's hidden weights flattened into one row (layer ``i`` from
    ``offs[i]`` as (m, widths[i])), the offsets, the widths each layer reads, and each block's map weights
    ``[0, I, 0] + sign final`` (nb, n, T) (see :meth:`_BlockWeights.map_weights`). In NumPy: these few small
    operations cost a fraction of PyTorch's per-operator overhead."""
    final = net.final.detach().numpy()
    nb, n, _ = final.shape
    hidden = [wi.detach().numpy() for wi in net.weights]
    flat = np.concatenate([wi.reshape(nb, -1) for wi in hidden], axis=1)
    sizes = [wi.shape[1] * wi.shape[2] for wi in hidden]
    offs = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    widths = np.array([wi.shape[2] for wi in hidden], dtype=np.int64)
    fw = final * np.asarray(signs, dtype=final.dtype).reshape(nb, 1, 1)
    fw[:, :, 1 : 1 + n] += np.eye(n, dtype=final.dtype)
    return flat, offs, widths, fw


def kernel_parts(b: int) -> list[tuple[int, int]]:
    """How the compiled kernels split a batch of ``b`` points: ``(start, count)`` parts, one per thread.

    As many parts as :data:`KERNEL_THREADS`, or PyTorch's intra-op threads (``torch.get_num_threads()``), each of
    at least :data:`KERNEL_PART_MIN` points: the points are independent (only the weight gradients are summed), and
    the kernels release the GIL, so the parts run in parallel. On the 2-core development VM two parts made a training
    step only about 10% faster (its cores behave like one core's two hyperthreads; ``engine_speed.md``). The studio
    gives training one thread (its view process has the other core); the command line's ``--threads`` and the
    benchmarks set it explicitly.
    """
    parts = max(1, min(settings.KERNEL_THREADS or torch.get_num_threads(), b // settings.KERNEL_PART_MIN))
    bounds = [round(i * b / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()
_SCRATCH = threading.local()


def _scratch(size: int, dtype: Any) -> Any:
    """This thread's scratch array for the kernels' no-gradient solves, of at least ``size`` elements of ``dtype``
    (kept and grown: a fresh one per call would pay page faults on every chunk of an evaluation)."""
    key = np.dtype(dtype).str
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.shape[0] < size:
        buf = np.empty(size, dtype)
        if buf.nbytes <= _SCRATCH_KEEP_BYTES:  # (an unchunked huge batch does not pin its memory afterwards)
            buffers[key] = buf
    return buf


#: Largest scratch array a thread keeps between calls (evaluations come in chunks of a few thousand points).
_SCRATCH_KEEP_BYTES = 64 * 1024 * 1024


def _in_parallel(task: Any, count: int) -> None:
    """Run ``task(i)`` for ``i < count``: ``i = 0`` in this thread, the others in the module's thread pool.

    Each task's BLAS products run on its own thread alone (:func:`monoflow_core.fused.blas.single_threaded`): the parts
    are the parallelism.
    """
    global _EXECUTOR
    if count == 1:
        _single_threaded(task, 0)
        return
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="monoflow-kernel"
            )
    futures = [_EXECUTOR.submit(_single_threaded, task, i) for i in range(1, count)]
    try:
        _single_threaded(task, 0)
    finally:
        # every part has finished (even when one failed) before its buffers can be reused
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()  # re-raises a part's error


def _single_threaded(task: Any, i: int) -> None:
    with blas.single_threaded():
        task(i)


def _kernel_run(
    x: Tensor,
    blocks: Sequence[Any],
    net: FoldedNet,
    setup: Sequence[tuple[float, ...]],
    signs: Sequence[float],
    labels: Sequence[str],
    spaces: Sequence[_Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: tuple[Any, ...] | None = None,
) -> tuple[Tensor, Tensor, list[SolverStats]]:
    """Run blocks on points ``x`` (B, n) with the compiled kernels: ``(y (B, n), summed log-det (B,), stats)``.

    ``setup`` holds each block's row of :data:`_KERNEL_FORWARD` (or of an inverse's setup). The batch runs in
    ``parts`` (default :func:`kernel_parts`), in parallel; with workspaces ``spaces`` (one per part) every block's
    final evaluation stays there for the backward pass, without them the kernel uses scratch of its own.
    ``weights``: :func:`_kernel_weights` of ``net`` and ``signs`` if already made.
    """
    x = x.detach().contiguous()
    b = x.shape[0]
    nb = len(blocks)
    parts = kernel_parts(b) if parts is None else parts
    flat, offs, widths, fw = weights if weights is not None else _kernel_weights(net, signs)
    np_dtype = x.numpy().dtype
    table = np.array(setup, dtype=np.float64)
    tols = np.array([effective_tolerance(blk.tol, x.dtype) for blk in blocks], dtype=np_dtype)
    caps = np.array([int(blk.max_iter) for blk in blocks], dtype=np.int64)
    y = torch.empty_like(x)
    logdet = x.new_empty(b)
    iterations = torch.empty(nb, b, dtype=torch.int64)
    residual = x.new_empty(nb, b)
    converged = torch.empty(nb, b, dtype=torch.bool)
    stalled = torch.empty(nb, b, dtype=torch.bool)
    int_type = kernels.exp2_bits(np_dtype)
    common = (
        x.numpy(),
        flat,
        offs,
        widths,
        net.weights[0].shape[1],
        fw,
        _KERNEL_ACTIVATIONS[net.kind],
        table[:, 0].astype("int64"),
        *(table[:, c].astype(np_dtype) for c in range(1, 6)),
        tols,
        caps,
        y.numpy(),
        logdet.numpy(),
        iterations.numpy(),
        residual.numpy(),
        converged.numpy(),
        stalled.numpy(),
        spaces is not None,
    )
    constants = (kernels.constants(np_dtype), kernels.exp2_coefficients(np_dtype), settings.COMPACT_FRACTION)
    empty = [np.empty((0,) * d, np_dtype) for d in (3, 4, 4, 5, 3)]  # (the kernel's own scratch serves)

    def run(i: int) -> None:
        start, count = parts[i]
        if spaces is not None:  # a training forward: the part's own workspace, in one call
            ws = spaces[i]
            space = [t.numpy() for t in (ws.x, ws.h_all, ws.e_all, ws.q_all, ws.out)]
            scratch = empty[0].reshape(-1)
            sub = max(1, count)
        else:  # slices that stay in cache, in this thread's scratch
            space = empty
            sub = max(1, min(count, settings.KERNEL_NO_GRAD_POINTS))
            size = kernels.scratch_size(fw.shape[2], len(net.weights), net.weights[0].shape[1], fw.shape[1], sub)
            scratch = _scratch(size, np_dtype)
        for at in range(start, start + count, sub):
            n_at = min(sub, start + count - at)
            kernels.solve_run(*common, *space, np.empty(n_at, int_type), *constants, at, n_at, scratch)

    _in_parallel(run, len(parts))
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
            _warn_unconverged(st, labels[j])
        stats.append(st)
    return y, logdet, stats


def _kernel_forward(
    x: Tensor,
    plan: _Plan,
    net: FoldedNet,
    spaces: Sequence[_Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: tuple[Any, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`_fused_forward` by the compiled kernels, on points ``x`` (B, n): ``(y (B, n), summed log-det)``."""
    blocks = plan.blocks
    labels = [f"{type(blk).__name__} forward solve" for blk in blocks]
    y, logdet, stats = _kernel_run(
        x,
        blocks,
        net,
        [_KERNEL_FORWARD[blk.kind] for blk in blocks],
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


def _kernel_backward(
    net: FoldedNet,
    spaces: Sequence[_Workspace],
    parts: Sequence[tuple[int, int]],
    kinds: Sequence[str],
    grad_z: Tensor,
    grad_logdet: Tensor,
    weights: tuple[Any, ...] | None = None,
) -> list[Tensor | None]:
    """:meth:`_FusedBlocks.backward` by the compiled kernel, part by part in parallel: the gradients of ``x``,
    (plan) and the folded tensors (each part's weight gradients summed). ``weights``: the forward's
    :func:`_kernel_weights`."""
    flat, offs, widths, fw = weights if weights is not None else _kernel_weights(net, [1.0] * len(kinds))
    grad_flat = net.final.new_empty((len(parts), *flat.shape))
    grad_fw = net.final.new_empty((len(parts), *fw.shape))
    grad_x = torch.empty(grad_z.shape, dtype=grad_z.dtype)
    codes = np.array([_KERNEL_KINDS[k] for k in kinds], dtype=np.int64)
    common = (
        flat,
        offs,
        widths,
        net.weights[0].shape[1],
        fw,
        _KERNEL_ACTIVATIONS[net.kind],
        codes,
        grad_z.detach().contiguous().numpy(),
        grad_logdet.detach().contiguous().numpy(),
    )
    cst = kernels.constants(grad_flat.numpy().dtype)

    def run(i: int) -> None:
        ws = spaces[i]
        kernels.backward_run(
            *common,
            *(t.numpy() for t in (ws.x, ws.h_all, ws.e_all, ws.q_all, ws.out)),
            grad_x.numpy(),
            grad_flat[i].numpy(),
            grad_fw[i].numpy(),
            cst,
            *parts[i],
        )

    _in_parallel(run, len(parts))
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
