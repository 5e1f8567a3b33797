"""The command's value types and shared options: argparse types that refuse bad values when parsed.

Integers with a lower bound, 64-bit seeds, thread counts bounded by this machine's cores
(:data:`~monoflow_core.resources.MAX_THREADS_PER_CORE` per core), finite floats, temperatures, formulations and
dtypes; and the options several subcommands share (``--workers``, ``--device``, ``--threads``, ``--dtype``).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import torch

from ..config import DTYPES
from ..resources import MAX_THREADS_PER_CORE, SEED_MAX, max_threads

#: Largest ``--temperature``: the paper samples at temperatures up to 1, and far beyond a few thousand the base
#: noise overflows the flow's inverse (1e300 gave all-NaN samples).
MAX_TEMPERATURE = 1000.0


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _seed(text: str) -> int:
    """An argparse type: a seed in ``[0, SEED_MAX]`` (torch takes 64-bit seeds; the trainer adds offsets)."""
    value = _nonnegative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1 = {SEED_MAX}], got {text}")
    return value


def _threads(text: str) -> int:
    """An argparse type: a thread count of at most :data:`MAX_THREADS_PER_CORE` per core of this machine."""
    value = _positive_int(text)
    cap = max_threads()
    if value > cap:
        cores = os.cpu_count() or 1
        raise argparse.ArgumentTypeError(
            f"at most {cap} on this machine ({cores} CPU core{'s' if cores != 1 else ''}, {MAX_THREADS_PER_CORE} "
            f"threads per core), got {text}"
        )
    return value


def _temperature(text: str) -> float:
    """An argparse type: a temperature in ``(0, MAX_TEMPERATURE]``."""
    value = _finite_float(text)
    if not 0.0 < value <= MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must lie in (0, {MAX_TEMPERATURE:g}], got {text}")
    return value


def _add_workers_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--workers",
        type=_threads,
        default=1,
        metavar="W",
        help="threads evaluating chunks of 5,000 points in parallel, one intra-op thread each "
        f"(default 1; 2 used the 2-core development machine best){note}",
    )


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, shared by the subcommands that evaluate a checkpoint."""
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help=f"torch intra-op threads (default 1; at most {MAX_THREADS_PER_CORE} per core)",
    )


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _formulation(text: str) -> str | list[str]:
    """``monotone`` or a comma-separated list with one formulation per block (``residual,inverse_residual``)."""
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"invalid formulation list {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _dtype(text: str) -> torch.dtype:
    """An argparse type: ``float32`` or ``float64``, the dtype that computes a command's output."""
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return dtype


def _add_dtype_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--dtype",
        type=_dtype,
        metavar="DT",
        help=f"float32 or float64: the dtype the output is computed in (default: {default}); the output states it",
    )


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
