"""Process-wide settings that make the engine's many mid-sized temporaries cheap.

The fused path (:mod:`monoflow_core.fused`) evaluates G on a few thousand points at a time, so most of its
temporaries are between 100 KiB and a few MiB. glibc serves blocks above its mmap threshold (128 KiB at start)
with a fresh ``mmap`` and returns them with ``munmap`` on free, so every such temporary pays page faults on first
touch: measured on the 2-core development machine, the Pila activation of 5,000 points took 2.0 ms per layer that
way and 0.44 ms with the heap serving them (``benchmarks/results/engine_speed.md``).

:func:`tune_allocator` raises the mmap threshold to 32 MiB (glibc's maximum on 64-bit) and the trim threshold to
1 GiB, so freed blocks are reused instead of being returned to the kernel. The cost is that the process keeps
up to that much freed memory mapped after a large evaluation. The command line, the studio and the benchmarks
call it at start; a script using the library can call it once itself. On other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "tune_allocator"]

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def tune_allocator() -> bool:
    """Make glibc's malloc keep mid-sized blocks on the heap (see the module docstring); idempotent.

    Returns:
        True when the settings are in effect (glibc), False where they do not apply.
    """
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
