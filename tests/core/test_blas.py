"""The compiled kernels' matrix product (monoflow_core.fused.blas): every transpose and dtype, both libraries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from monoflow_core.fused import blas

pytestmark = pytest.mark.skipif(blas.gemm is None, reason="Numba (or a BLAS for it) is not installed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_matches_numpy(dtype: type, trans_a: bool, trans_b: bool) -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7) if trans_a else (7, 5)).astype(dtype)
    b = rng.standard_normal((9, 5) if trans_b else (5, 9)).astype(dtype)
    out = np.full((7, 9), np.nan, dtype)
    with blas.single_threaded():
        blas.gemm(trans_a, trans_b, a, b, out)
    expected = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-13)


def test_gemm_on_leading_rows_of_wider_buffers() -> None:
    """The kernels multiply the first rows of feature buffers into rows of larger ones (leading dimensions)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 30))
    w = rng.standard_normal((4, 6))
    out = np.zeros((8, 30))
    blas.gemm(False, False, w, x[:6], out[:4])
    np.testing.assert_allclose(out[:4], w @ x[:6], atol=1e-13)
    assert not out[4:].any()  # nothing written past the product
    grad = np.zeros((6, 30))
    blas.gemm(True, False, w, out[:4], grad)
    np.testing.assert_allclose(grad, w.T @ (w @ x[:6]), atol=1e-12)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
def test_gemm_on_column_slices_whose_rows_are_longer(trans_a: bool, trans_b: bool) -> None:
    """Leading dimensions larger than the operands' widths (column slices of wider buffers), output included."""
    rng = np.random.default_rng(3)
    a_buf, b_buf = rng.standard_normal((9, 12)), rng.standard_normal((9, 14))
    a = a_buf[:5, 2:9] if trans_a else a_buf[:7, 3:8]  # op(a) is 7 x 5
    b = b_buf[:4, 1:6] if trans_b else b_buf[:5, 6:10]  # op(b) is 5 x 4
    out_buf = np.zeros((10, 11))
    blas.gemm(trans_a, trans_b, a, b, out_buf[1:8, 3:7])
    expected = (a.T if trans_a else a) @ (b.T if trans_b else b)
    np.testing.assert_allclose(out_buf[1:8, 3:7], expected, atol=1e-13)
    out_buf[1:8, 3:7] = 0.0
    assert not out_buf.any()  # nothing written outside the output's view


def test_gemm_refuses_strided_rows() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        blas.gemm(False, False, np.ones((3, 8))[:, ::2], np.ones((4, 2)), np.empty((3, 2)))


def test_gemm_empty_shapes() -> None:
    out = np.full((3, 0), 1.0)
    blas.gemm(False, False, np.ones((3, 2)), np.ones((2, 0)), out)  # nothing to do, no BLAS error
    out = np.full((3, 4), 1.0)
    blas.gemm(False, False, np.ones((3, 0)), np.ones((0, 4)), out)
    assert not out.any()  # an empty sum is zero


@pytest.mark.skipif(blas.LIBRARY != "mkl", reason="MKL's per-thread setting applies to PyTorch's MKL only")
def test_single_threaded_restores_the_threads_setting() -> None:
    setter = blas._MKL_LOCAL_THREADS
    before = setter(3)  # this thread's setting: 3 threads
    try:
        with blas.single_threaded():
            assert setter(1) == 1  # inside: one thread
        assert setter(3) == 3  # restored on exit
    finally:
        setter(before)


def test_scipy_fallback_gives_the_same_products() -> None:
    """Where PyTorch has no MKL the kernels call SciPy's BLAS under the same symbols (forced here)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from monoflow_core.fused import blas
        assert blas.LIBRARY == "scipy", blas.LIBRARY
        rng = np.random.default_rng(2)
        for dtype in (np.float32, np.float64):
            a, b = rng.standard_normal((6, 4)).astype(dtype), rng.standard_normal((6, 3)).astype(dtype)
            out = np.empty((4, 3), dtype)
            blas.gemm(True, False, a, b, out)
            assert np.abs(out - a.T @ b).max() < 1e-5, dtype
        print("ok")
        """
    )
    env = {**os.environ, "MONOFLOW_KERNELS_BLAS": "scipy"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
