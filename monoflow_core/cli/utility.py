"""``monoflow warmup`` (compile the engine's kernels ahead of time) and ``monoflow presets`` (list them)."""

from __future__ import annotations

import argparse
import sys

import torch

from ..presets import list_presets
from .errors import EXIT_FAILURE, EXIT_OK, PROG
from .report import _dtype_name


def _cmd_warmup(args: argparse.Namespace) -> int:
    from ..kernel_cache import kernel_cache_dir
    from ..warmup import warm_up

    dtypes = [args.dtype] if args.dtype is not None else [torch.float32, torch.float64]
    results = warm_up(dtypes, train=not args.solve_only)
    if not results:
        print(
            f"{PROG}: the compiled kernels are unavailable here (Numba or a BLAS is missing, or MONOFLOW_KERNELS=0); "
            "nothing to prepare: the PyTorch kernels serve",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    for r in results:
        what = "training and solver" if r.kit == "train" else "solver"
        state = "ready" if r.ready else "FAILED (the PyTorch kernels serve instead)"
        print(f"{_dtype_name(r.dtype)} {what} kernels: {state} ({r.seconds:.1f} s)")
    print(f"cache folder: {kernel_cache_dir()}")
    return EXIT_OK if all(r.ready for r in results) else EXIT_FAILURE


def _cmd_presets(args: argparse.Namespace) -> int:
    presets = list_presets()
    if not presets:
        print("no presets found", file=sys.stderr)
        return EXIT_FAILURE
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.description}")
    return EXIT_OK
