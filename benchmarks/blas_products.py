"""The compiled kernels' layer products on each BLAS: SciPy's OpenBLAS (Numba's ``np.dot``) against the library
``monoflow_core.fused.blas`` binds (MKL inside PyTorch where its wheel has it), one thread, in compiled loops.

Shapes of the paper's 2-D toy model (DenseNet G 3x16): 16 x K times K x (3 x 500) for the layers' K = 3, 19, 35
(value and two tangent columns per point), float32; the median of 30 timings of 200 products each (us/product).

Usage: ``python benchmarks/blas_products.py``.
"""

from __future__ import annotations

import statistics
import time

import numba
import numpy as np

from monoflow_core.fused import blas


@numba.njit(cache=True)
def _scipy_products(w, x, out, reps):  # pragma: no cover - compiled
    for _ in range(reps):
        np.dot(w, x, out)


@numba.njit(cache=True)
def _bound_products(w, x, out, reps):  # pragma: no cover - compiled
    for _ in range(reps):
        blas.gemm(False, False, w, x, out)


def per_product_us(run, w, x, out, reps: int = 200, rounds: int = 30) -> float:
    run(w, x, out, 1)  # compile or load
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        run(w, x, out, reps)
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e6


def main() -> int:
    blas.limit_blas_threads()  # (SciPy's OpenBLAS on one thread, whichever library the kernels use)
    rng = np.random.default_rng(0)
    print(f"kernels' BLAS: {blas.LIBRARY}; float32, one thread, us per product (median of 30 x 200)")
    with blas.single_threaded():
        for k in (3, 19, 35):
            w = rng.standard_normal((16, k)).astype(np.float32)
            x = rng.standard_normal((k, 1500)).astype(np.float32)
            out = np.empty((16, 1500), np.float32)
            scipy_us = per_product_us(_scipy_products, w, x, out)
            bound_us = per_product_us(_bound_products, w, x, out)
            print(
                f"16 x {k:2d} by {k:2d} x 1500: SciPy's OpenBLAS {scipy_us:6.1f} us, "
                f"{blas.LIBRARY} {bound_us:6.1f} us ({scipy_us / bound_us:.2f}x)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
