"""Prepare the compiled kernels ahead of time (``monoflow warmup``), e.g. while building a Docker or lab image.

The first process on a machine compiles the engine's compiled kernels (:mod:`monoflow_core.fused.kernels`) before
its first step (:attr:`monoflow_core.fused.FusedSettings.wait`): half a minute to a few minutes, depending on the
machine and its load. Numba keeps the machine code in the per-user cache folder of :mod:`monoflow_core.kernel_cache`,
and every later process loads it in about a second. :func:`warm_up` does that first compile now, so that no run pays
for it; in an image, run it as the user who will run monoflow, or point ``MONOFLOW_CACHE_DIR`` at a folder that user
can read (the cache is tied to the machine's CPU model: build on the kind of machine that will run it).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .fused import SETTINGS, kernels, kernels_ready

__all__ = ["WarmupResult", "warm_up"]


@dataclass
class WarmupResult:
    """One prepared kernel set: its dtype, set (``"solve"`` or ``"train"``), success and wall seconds."""

    dtype: torch.dtype
    kit: str
    ready: bool
    seconds: float


def warm_up(dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64), train: bool = True) -> list[WarmupResult]:
    """Compile (or load from the cache) the kernels of every dtype in ``dtypes``: the training set (which holds the
    solvers' set) if ``train``, else the solvers' set only (densities, samples and tests). Returns what was
    prepared; an empty list when the compiled kernels are unavailable here (no Numba or BLAS, or
    ``MONOFLOW_KERNELS=0``)."""
    if not (SETTINGS.use_kernels and kernels.AVAILABLE):
        return []
    results = []
    for dtype in dtypes:
        t0 = time.perf_counter()
        ready = kernels_ready(dtype, wait=True, backward=train)
        results.append(WarmupResult(dtype, "train" if train else "solve", ready, time.perf_counter() - t0))
    return results
