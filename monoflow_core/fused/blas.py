"""The matrix product of the compiled kernels (:mod:`monoflow_core.fused.kernels`): which BLAS, and on how many threads.

The kernels' layer products are small (16 rows by a few thousand columns, 3 to 51 deep), and which BLAS serves
them matters more than anything else in an evaluation of G. Measured on the 2-core development machine, one thread,
float32, 16 x K by K x 1,500, us per product (``python benchmarks/blas_products.py``, three runs;
``benchmarks/results/engine_speed.md``):

=========  ===================================  ==================================
K          SciPy's OpenBLAS 0.3.30 (``np.dot``)  MKL inside PyTorch (``sgemm_``)
=========  ===================================  ==================================
3          5.9                                  5.5
19         28.0-28.4                            14.7-16.7
35         28.9-36.2                            25.2-27.2
=========  ===================================  ==================================

Numba's ``np.dot`` calls SciPy's copy of OpenBLAS; PyTorch's x86-64 wheels carry MKL and export its Fortran
interface (``sgemm_``, ``dgemm_``) with a per-thread thread count (``MKL_Set_Num_Threads_Local``). So at import
this module looks up those symbols and registers them with LLVM under names of its own
(``monoflow_kernels_sgemm`` / ``_dgemm``); compiled code calls them by name, so Numba's on-disk cache stays valid
from process to process (a baked-in address would not be). Where PyTorch has no MKL (ARM, macOS), SciPy's
BLAS is registered under the same names. :func:`single_threaded` makes MKL run the calling thread's products on
that thread alone (the engine parallelises over parts of a batch itself; MKL's own threads would oversubscribe the
cores) and restores the thread's setting afterwards, so PyTorch's MKL use is left as it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..kernel_cache import numba_cache_location


def _import_numba() -> Any:
    """Numba, or None where it is not installed (the PyTorch kernels serve then)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - exercised only where Numba is missing
        return None
    return numba


numba = _import_numba()

__all__ = ["LIBRARY", "gemm", "limit_blas_threads", "single_threaded"]

_SYMBOLS = ("monoflow_kernels_sgemm", "monoflow_kernels_dgemm")


def _mkl_in_torch() -> tuple[int, int, Any] | None:
    """Addresses of MKL's ``sgemm_`` and ``dgemm_`` in PyTorch's CPU library, and its per-thread thread setter."""
    try:
        import torch

        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        sgemm, dgemm, local = lib.sgemm_, lib.dgemm_, lib.MKL_Set_Num_Threads_Local
    except (ImportError, OSError, AttributeError):
        return None
    local.argtypes = [ctypes.c_int]
    local.restype = ctypes.c_int
    single, double = ctypes.cast(sgemm, ctypes.c_void_p).value, ctypes.cast(dgemm, ctypes.c_void_p).value
    if single is None or double is None:  # pragma: no cover - exported symbols have addresses
        return None
    return single, double, local


def _scipy_blas() -> tuple[int, int] | None:
    """Addresses of ``sgemm`` and ``dgemm`` in SciPy's BLAS (the same Fortran interface, 32-bit integers)."""
    try:
        from numba.extending import get_cython_function_address

        return (
            get_cython_function_address("scipy.linalg.cython_blas", "sgemm"),
            get_cython_function_address("scipy.linalg.cython_blas", "dgemm"),
        )
    except (ImportError, ValueError, AttributeError):
        return None


def _bind() -> tuple[str | None, Any]:
    """Register the BLAS the kernels call; returns its name (None: none found) and MKL's thread setter if MKL."""
    if numba is None:  # pragma: no cover
        return None, None
    import llvmlite.binding as llvm

    mkl = None if os.environ.get("MONOFLOW_KERNELS_BLAS") == "scipy" else _mkl_in_torch()
    if mkl is not None:
        addresses, name, local = mkl[:2], "mkl", mkl[2]
    else:
        found = _scipy_blas()
        if found is None:  # pragma: no cover - SciPy comes with scikit-learn
            return None, None
        addresses, name, local = found, "scipy", None
    for symbol, address in zip(_SYMBOLS, addresses, strict=True):
        llvm.add_symbol(symbol, address)
    return name, local


#: The BLAS behind the kernels' products: "mkl" (PyTorch's), "scipy", or None (no BLAS: no compiled kernels).
LIBRARY, _MKL_LOCAL_THREADS = _bind()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Run this thread's kernel products on one BLAS thread (MKL's per-thread setting), restored on exit.

    SciPy's OpenBLAS has no per-thread setting; :func:`limit_blas_threads` sets it to one thread for the process
    instead.
    """
    if _MKL_LOCAL_THREADS is None:
        yield
        return
    previous = _MKL_LOCAL_THREADS(1)
    try:
        yield
    finally:
        _MKL_LOCAL_THREADS(previous)  # (0, the usual previous value, means "follow the global setting")


def limit_blas_threads() -> int:
    """Where the kernels' products run on SciPy's BLAS (:data:`LIBRARY` is "scipy"), run it on
    one thread; returns the number of libraries set (0 with MKL, whose setting is per thread instead).

    The products are small (16 rows by a few thousand columns): a second BLAS thread gained at most 15% on a
    training step here, and where the engine parallelises (worker threads of :mod:`monoflow_core.evaluation`,
    the studio's view process next to training) two BLAS threads per call oversubscribed the two cores: a
    400 x 400 density grid took 3.1 s instead of 1.8 s. Only SciPy's copy of OpenBLAS is limited (NumPy's keeps its
    settings); threadpoolctl comes with scikit-learn.
    """
    if LIBRARY != "scipy":
        return 0
    try:
        import scipy
        import scipy.linalg.cython_blas  # (loads the library the kernels call)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - both come with scikit-learn
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
    mine = [
        lib
        for lib in ThreadpoolController().lib_controllers
        if lib.user_api == "blas" and os.path.relpath(lib.filepath, root).startswith("scipy")
    ]
    for lib in mine:
        lib.set_num_threads(1)
    return len(mine)


if numba is not None and LIBRARY is not None:
    from numba import types

    _SIGNATURE = types.void(*([types.voidptr] * 13))
    _sgemm = types.ExternalFunction(_SYMBOLS[0], _SIGNATURE)
    _dgemm = types.ExternalFunction(_SYMBOLS[1], _SIGNATURE)

    def _njit(fn: Any) -> Any:
        # cached in the per-user folder of monoflow_core.kernel_cache, as the kernels are
        with numba_cache_location():
            return numba.njit(cache=True, nogil=True)(fn)

    @_njit
    def _rows_contiguous(arr):  # pragma: no cover - compiled
        return arr.shape[1] <= 1 or arr.strides[1] == arr.itemsize  # (a one-element row has no stride to speak of)

    @_njit
    def gemm(trans_a, trans_b, a, b, out):  # pragma: no cover - compiled
        """``out = op(a) op(b)`` for row-major float32 or float64 matrices whose rows are contiguous (``op``
        transposes where its flag is set; the row strides may exceed the rows' lengths); ``out`` is overwritten.

        BLAS is column-major, so it computes ``out^T = op(b)^T op(a)^T``: a row-major array is its transpose in
        column-major order, with the row stride as leading dimension, so the flags pass through unchanged.
        """
        m = a.shape[1] if trans_a else a.shape[0]
        k = a.shape[0] if trans_a else a.shape[1]
        n = b.shape[0] if trans_b else b.shape[1]
        if m == 0 or n == 0:
            return
        if k == 0:
            out[:m, :n] = 0.0
            return
        if not (_rows_contiguous(a) and _rows_contiguous(b) and _rows_contiguous(out)):
            raise ValueError("gemm: every operand's rows must be contiguous")
        iv = np.empty(6, np.int32)
        iv[0] = n
        iv[1] = m
        iv[2] = k
        iv[3] = max(1, b.strides[0] // b.itemsize)
        iv[4] = max(1, a.strides[0] // a.itemsize)
        iv[5] = max(1, out.strides[0] // out.itemsize)
        ch = np.empty(2, np.uint8)
        ch[0] = 84 if trans_b else 78  # 'T' or 'N'
        ch[1] = 84 if trans_a else 78
        sc = np.empty(2, out.dtype)
        sc[0] = 1.0
        sc[1] = 0.0
        args = (
            ch[0:].ctypes,
            ch[1:].ctypes,
            iv[0:].ctypes,
            iv[1:].ctypes,
            iv[2:].ctypes,
            sc.ctypes,
            b.ctypes,
            iv[3:].ctypes,
            a.ctypes,
            iv[4:].ctypes,
            sc[1:].ctypes,
            out.ctypes,
            iv[5:].ctypes,
        )
        if out.itemsize == 4:
            _sgemm(*args)
        else:
            _dgemm(*args)
else:  # pragma: no cover
    gemm = None
