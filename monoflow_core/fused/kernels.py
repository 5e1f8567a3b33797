"""Compiled CPU kernels for the fused exact path (Numba), used on CPU when Numba is installed.

The fused path (:mod:`monoflow_core.fused`) evaluates G with its Jacobian as a few PyTorch operators per layer over
the whole batch. On a CPU with small batches each operator costs a few microseconds of dispatch, and one training
step of the paper's 2-D model issued about 3,400 of them (``benchmarks/results/step_phases.md``); the arithmetic
itself is a fraction of that (docs/performance.md). These kernels run the same algorithm, on the same
feature-major layout, as one compiled call each, with BLAS for the layer products (:mod:`monoflow_core.fused.blas`) and
loops over the batch's contiguous columns for everything else:

* :func:`solve_run`: every block of a run: the safeguarded Newton solve of ``w + sign G(w) = rhs`` (the rule of
  :func:`monoflow_core.fused.newton.newton_solve`: each point stops once its relative residual meets the tolerance
  or it stalls; a Newton step that makes the residual grow is replaced by the plain contracting step), the exact
  log-det from the Jacobian at the solution, per-point statistics, and, for a training forward, the final
  evaluation written into the workspace that :func:`backward_run` reads (without one, finished points leave the
  batch);
* :func:`backward_run`: the exact implicit-function backward of such a run (docs/algorithm.md sections 6, 5).

The fold's kernels are in :mod:`monoflow_core.fused.kernels_fold`. Every kernel takes its sizes as arguments, so one
compiled version per dtype serves every architecture. Both implementations agree to rounding in float64
(``tests/core/test_kernels.py``).

This file is longer than the project's other modules (about 1,100 lines) on purpose: its compiled functions call
each other, and Numba's on-disk cache checks only the file of the function it loads. Were the solver's and the
backward's kernels split from the helpers they share, an edit of a helper's file would leave the callers' cached
machine code in place (Numba's documented caching limitation), i.e. stale kernels until the cache is cleared.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import numpy as np

from ..kernel_cache import numba_cache_location
from ..solvers import STALL_FACTOR, STALL_WINDOW
from .blas import (
    gemm,
    numba,  # (None without Numba: the PyTorch kernels serve then)
)

__all__ = [
    "ACT_PILA",
    "ACT_RELU",
    "ACT_SWISH",
    "AVAILABLE",
    "KIND_INVERSE_RESIDUAL",
    "KIND_MONOTONE",
    "KIND_RESIDUAL",
    "MODE_EVALUATE",
    "MODE_SOLVE",
    "Cotangents",
    "KernelConstants",
    "KernelNet",
    "KernelSpace",
    "RunGrads",
    "RunOutputs",
    "RunSetup",
    "SolvePart",
    "SolveWork",
    "backward_run",
    "constants",
    "exp2_bits",
    "exp2_coefficients",
    "scratch_size",
    "solve_run",
]

#: Whether the compiled kernels can be used in this process.
AVAILABLE = numba is not None and gemm is not None

#: Activation codes of :func:`solve_run` and :func:`backward_run` (the folded activations of
#: :func:`monoflow_core.fused.evaluate.activate`): CPila, CReLU, CLipSwish.
ACT_PILA = 0
ACT_RELU = 1
ACT_SWISH = 2

#: Block modes of :func:`solve_run`: evaluate ``w + sign G(w)`` once (a residual block forward), or solve for ``w``.
MODE_EVALUATE = 0
MODE_SOLVE = 1


# The kernels' arguments, in named groups (``nb`` blocks, ``B`` points, ``n`` dimensions, depth ``L``, ``m`` units per
# layer, ``T`` features).


class KernelNet(NamedTuple):
    """A run's folded weights as the kernels read them.

    ``wflat`` (nb, sum_i m widths[i]) each block's hidden weights, layer ``i`` at ``offs[i]`` as (m, widths[i]);
    ``widths`` (L,) the columns each layer reads (1 + its input width); ``fw`` (nb, n, T) the final weights of the map
    ``w + sign G(w)`` (identity included); ``act`` the activation, :data:`ACT_PILA` (folded Pila), :data:`ACT_RELU`
    or :data:`ACT_SWISH` (folded CLipSwish).
    """

    wflat: np.ndarray
    offs: np.ndarray
    widths: np.ndarray
    m: int
    fw: np.ndarray
    act: int


class RunSetup(NamedTuple):
    """How each block of a run is solved, (nb,) each.

    ``modes``: :data:`MODE_SOLVE` (solve ``w + sign G(w) = rhs``) or :data:`MODE_EVALUATE` (``w`` is the map at the
    right-hand side); the right-hand side ``rhs_scale * x`` and the output ``out_w * w + out_x * x``; the log-det
    ``ld_plus * log|det A| + ld_mono * log|det(2I - A)|`` with ``A = I + sign J_G(w)`` at the solution
    (docs/algorithm.md section 3); each block's effective relative tolerance and iteration cap.
    """

    modes: np.ndarray
    rhs_scale: np.ndarray
    out_w: np.ndarray
    out_x: np.ndarray
    ld_plus: np.ndarray
    ld_mono: np.ndarray
    tols: np.ndarray
    max_iters: np.ndarray


class RunOutputs(NamedTuple):
    """What :func:`solve_run` writes: ``y`` (B, n) the outputs of the last block, ``logdet`` (B,) the summed log-dets,
    and per block and point (nb, B): evaluations until converged or stalled, final relative residual, the flags."""

    y: np.ndarray
    logdet: np.ndarray
    iterations: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    stalled: np.ndarray


class KernelSpace(NamedTuple):
    """A workspace (:class:`monoflow_core.fused.workspace.Workspace`, stacked over layers; :func:`_evaluate` says what
    is written): ``x`` (nb, T, (1+n)B), ``h`` (L, nb, m, (1+n)B), ``e`` (L, nb, m, B), ``q`` (L, nb, 2, m, B),
    ``out`` (nb, n, (1+n)B)."""

    x: np.ndarray
    h: np.ndarray
    e: np.ndarray
    q: np.ndarray
    out: np.ndarray


class SolvePart(NamedTuple):
    """Which points one :func:`solve_run` call solves, and how.

    ``start, size``: points ``start .. start + size - 1`` of the batch (the workspace holds that part alone).
    ``keep``: whether block ``j`` evaluates into slice ``j`` of the workspace (a training forward: every point stays
    in the batch, frozen once finished), or into scratch (nothing kept; the workspace is not read).
    ``compact_fraction``: without ``keep``, finished points leave the batch once at least ``1/compact_fraction`` of it
    has finished (0: never).
    """

    start: int
    size: int
    keep: bool
    compact_fraction: int


class KernelConstants(NamedTuple):
    """:func:`constants` (with the stall exit's) and :func:`exp2_coefficients` of the dtype."""

    cst: np.ndarray
    coeffs: np.ndarray


class SolveWork(NamedTuple):
    """Scratch of :func:`solve_run`: ``ibuf`` (count,) integers of the float's width (:func:`exp2_bits`), and without
    ``keep`` at least :func:`scratch_size` elements for the evaluations (reused across calls: fresh memory of this
    size would cost page faults on every call)."""

    ibuf: np.ndarray
    scratch: np.ndarray


class Cotangents(NamedTuple):
    """The cotangents :func:`backward_run` starts from: of the run's output ``y`` (B, n) and summed log-det (B,)."""

    y: np.ndarray
    logdet: np.ndarray


class RunGrads(NamedTuple):
    """What :func:`backward_run` writes: the cotangent of the run's input ``x`` (B, n), and the gradients of the
    folded weights ``wflat`` (nb, sum_i m widths[i]) and ``fw`` (nb, n, T) of this part of the batch."""

    x: np.ndarray
    wflat: np.ndarray
    fw: np.ndarray


def _jit(fn: Any) -> Any:
    if numba is None:  # pragma: no cover
        return fn
    # error_model="numpy": a division by zero gives inf or NaN as in NumPy and PyTorch (whose kernels these mirror;
    # such a point is then reported as not converged) instead of raising, and no division carries a zero test.
    # Cached in the per-user folder of monoflow.kernel_cache (which survives a read-only install).
    with numba_cache_location():
        return numba.njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract", "reassoc"})(fn)


@_jit
def _max_nan(a, b):  # pragma: no cover - compiled
    """``max(a, b)`` that propagates NaN (``max(0.0, nan)`` is 0.0): a non-finite residual must never look converged."""
    return b if b > a or b != b else a


@_jit
def _eliminate(a, b, n):  # pragma: no cover - compiled
    """Gaussian elimination with partial pivoting of ``a`` (n x n, upper triangular afterwards) and the right-hand
    side ``b`` alike, in place; returns ``log|det a|``."""
    total = 0.0
    for col in range(n):
        piv = col
        for i in range(col + 1, n):
            if abs(a[i, col]) > abs(a[piv, col]):
                piv = i
        if piv != col:
            for k in range(n):
                tmp = a[col, k]
                a[col, k] = a[piv, k]
                a[piv, k] = tmp
            tmp = b[col]
            b[col] = b[piv]
            b[piv] = tmp
        total += math.log(abs(a[col, col]))
        for i in range(col + 1, n):
            factor = a[i, col] / a[col, col]
            for k in range(col, n):
                a[i, k] -= factor * a[col, k]
            b[i] -= factor * b[col]
    return total


@_jit
def _solve_small(a, b, n):  # pragma: no cover - compiled
    """Overwrite ``b`` with ``a^{-1} b`` for one small matrix (closed form for n = 1, 2; else partial pivoting).

    ``a`` is overwritten too when n > 2.
    """
    if n == 1:
        b[0] = b[0] / a[0, 0]
        return
    if n == 2:
        det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
        b0 = (a[1, 1] * b[0] - a[0, 1] * b[1]) / det
        b[1] = (a[0, 0] * b[1] - a[1, 0] * b[0]) / det
        b[0] = b0
        return
    _eliminate(a, b, n)
    for i in range(n - 1, -1, -1):
        acc = b[i]
        for k in range(i + 1, n):
            acc -= a[i, k] * b[k]
        b[i] = acc / a[i, i]


@_jit
def _logabsdet(a, n, shift):  # pragma: no cover - compiled
    """``log|det(shift I - a)|`` for shift 2 (``log|det(I - J)|`` from ``a = I + J``), else ``log|det a|``."""
    if n == 1:
        v = a[0, 0] if shift == 0.0 else shift - a[0, 0]
        return math.log(abs(v))
    if n == 2:
        if shift == 0.0:
            return math.log(abs(a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]))
        return math.log(abs((shift - a[0, 0]) * (shift - a[1, 1]) - a[0, 1] * a[1, 0]))
    m = np.empty((n, n), a.dtype)
    for i in range(n):
        for k in range(n):
            m[i, k] = -a[i, k] if shift != 0.0 else a[i, k]
        if shift != 0.0:
            m[i, i] += shift
    return _eliminate(m, np.zeros(n, m.dtype), n)


@_jit
def _inverse_small(a, out, n, shift):  # pragma: no cover - compiled
    """``out = (shift I - a)^{-1}`` if ``shift`` is nonzero, else ``a^{-1}`` (closed form for n <= 2)."""
    sg = -1.0 if shift != 0.0 else 1.0
    if n == 1:
        out[0, 0] = 1.0 / (shift + sg * a[0, 0])
        return
    if n == 2:
        p00 = shift + sg * a[0, 0]
        p11 = shift + sg * a[1, 1]
        p01 = sg * a[0, 1]
        p10 = sg * a[1, 0]
        det = p00 * p11 - p01 * p10
        out[0, 0] = p11 / det
        out[0, 1] = -p01 / det
        out[1, 0] = -p10 / det
        out[1, 1] = p00 / det
        return
    work = np.empty((n, n), a.dtype)
    col = np.empty(n, a.dtype)
    for t in range(n):
        for i in range(n):
            for k in range(n):
                work[i, k] = sg * a[i, k]
            work[i, i] += shift
            col[i] = 1.0 if i == t else 0.0
        _solve_small(work, col, n)
        for i in range(n):
            out[i, t] = col[i]


#: Block kinds of :func:`backward_run`.
KIND_RESIDUAL = 0
KIND_MONOTONE = 1
KIND_INVERSE_RESIDUAL = 2

# Constants of the folded CPila (see monoflow_core.fused.evaluate.activate), in the order of :func:`constants`.
_C = 1.0 / math.log(2.0)  # log2(e), folded into the pre-activations with Pila's k (as monoflow_core.fused.plan)


@functools.cache
def constants(dtype: Any) -> Any:
    """The kernels' constants in ``dtype`` (so float32 loops stay float32 and vectorise); made once per dtype.

    ``[0, 1, 1/2, a2, a1, b3, s3, s2, sqrt 2, lo, f2, window]`` with the value polynomial ``((a2 y + a1) y + 1) y``,
    the derivative polynomial ``((b3 y + a2) y + a1) y + 1`` and the second derivative's ``(s3 y + s2) y^2`` (all
    times ``2^y``, in the folded variable ``y = min(h, 0)``), the smallest exponent ``lo`` of :func:`_exp2`, and the
    stall exit's ``STALL_FACTOR^2`` and ``STALL_WINDOW`` (:mod:`monoflow_core.solvers`; passed as data rather than
    read as compile-time globals, so that Numba's on-disk cache, which checks this file only, never holds stale
    values).
    """
    c = _C
    lo = -126.0 if np.dtype(dtype) == np.float32 else -1022.0
    return np.array(
        [
            *(0.0, 1.0, 0.5, 0.5 / c**2, -1.0 / c, 0.5 / c**3, 0.5 / c**4, 2.0 / c**3, math.sqrt(2.0), lo),
            *(STALL_FACTOR * STALL_FACTOR, float(STALL_WINDOW)),
        ],
        dtype=dtype,
    )


@functools.cache
def exp2_coefficients(dtype: Any) -> Any:
    """The Taylor coefficients ``ln(2)^k / k!`` of ``2^f`` on ``[-1/2, 1/2]``: 8 for float32 (truncation error
    5e-9, below its rounding), 14 for float64 (4e-18)."""
    terms = 8 if np.dtype(dtype) == np.float32 else 14
    return np.array([math.log(2.0) ** k / math.factorial(k) for k in range(terms)], dtype=dtype)


def exp2_bits(dtype: Any) -> Any:
    """The integer type of ``dtype``'s bit pattern (the scratch ``ibuf`` of :func:`_exp2_fill`)."""
    return np.int32 if np.dtype(dtype) == np.float32 else np.int64


@_jit
def _exp2_parts(y, cst, coeffs, terms):  # pragma: no cover - compiled
    """``2^y = 2^k 2^f`` for ``y <= 0``: ``k = round(y)`` (as a float) and ``2^f`` (``|f| <= 1/2``) by the first
    ``terms`` Taylor coefficients (:func:`exp2_coefficients`). ``y`` is clamped at the smallest normal exponent
    ``cst[9]`` (``2^-126`` is 1e-38 in float32: Pila's tail is zero to working precision there). The callers pass
    ``terms`` as a literal, so the polynomial is unrolled."""
    yc = max(y, cst[9])
    fk = np.floor(yc + cst[2])
    f = yc - fk
    p = coeffs[terms - 1]
    for c in range(terms - 2, -1, -1):
        p = p * f + coeffs[c]
    return fk, p


@_jit
def _exp2_split32(y, cst, coeffs):  # pragma: no cover - compiled
    """The bit pattern of ``2^k`` and the factor ``2^f`` of float32 ``2^y`` (:func:`_exp2_parts`, 8 terms), in code
    that vectorises: the caller reads the bits back as a float. The libm ``exp2`` does not vectorise and costs
    about 5 ns a call here; with 32-bit integers and constant shifts this loop runs eight points per instruction
    (1.6x faster than with 64-bit ones, and 8 terms instead of 14 another 1.25x).
    """
    fk, p = _exp2_parts(y, cst, coeffs, 8)
    return (np.int32(fk) + np.int32(127)) << np.int32(23), p


@_jit
def _exp2_split64(y, cst, coeffs):  # pragma: no cover - compiled
    """:func:`_exp2_split32` for float64 (14 terms, 64-bit exponent bits)."""
    fk, p = _exp2_parts(y, cst, coeffs, 14)
    return (np.int64(fk) + np.int64(1023)) << np.int64(52), p


@_jit
def _exp2_fill(h, ibuf, ptmp, cst, coeffs, count):  # pragma: no cover - compiled
    """First pass of ``2^min(h, 0)`` over ``h[:count]``: exponent bits into ``ibuf`` (a float's width), the
    polynomial into ``ptmp``; the product ``ptmp * ibuf.view(float)`` is the power (read in the caller's second
    pass: the bits cannot be reinterpreted in the same loop without stopping it from vectorising)."""
    zero = cst[0]
    if ibuf.itemsize == 4:
        for s in range(count):
            ibuf[s], ptmp[s] = _exp2_split32(min(h[s], zero), cst, coeffs)
    else:
        for s in range(count):
            ibuf[s], ptmp[s] = _exp2_split64(min(h[s], zero), cst, coeffs)


@_jit
def _exp2(y, e, ptmp, ibuf, scale, coeffs, cst, count):  # pragma: no cover - compiled
    """``e[:count] = 2^y`` (``y <= 0``) by :func:`_exp2_fill`; ``scale`` is ``ibuf`` viewed as floats."""
    _exp2_fill(y, ibuf, ptmp, cst, coeffs, count)
    for s in range(count):
        e[s] = ptmp[s] * scale[s]


@_jit
def _sigmoid_fill(h, out, zero, one, count):  # pragma: no cover - compiled
    """``out[:count] = sigmoid(h[:count])``, as ``1 / (1 + e^-h)`` or ``e^h / (1 + e^h)``: the exponential of
    ``-|h|`` never overflows."""
    for s in range(count):
        hv = h[s]
        ev = math.exp(-abs(hv))
        out[s] = (one if hv >= zero else ev) / (one + ev)


@_jit
def _evaluate(
    wflat, offs, widths, m, fw, n, kind, b, x, ws_h, ws_e, ws_q, jw, cst, coeffs, tmp, ibuf, scale
):  # pragma: no cover - compiled
    """``w + sign G(w)`` and ``I + sign J_G(w)`` at the ``b`` points of one block's feature buffer ``x``.

    The layout of :class:`monoflow_core.fused.workspace.Workspace` (one block's slices): ``x`` (T, (1 + n) b) holds the
    features, one column per point (primal columns first, then the tangents along each input direction; forward
    mode, docs/performance.md): the bias row, the input rows (``w`` and the identity, set by the caller), then each
    layer's activation outputs. Layer ``i`` computes its pre-activations ``h[i] = W_i x[:widths[i]]`` over all
    columns with one BLAS product (``W_i`` is ``wflat[offs[i]:]`` as (m, widths[i])), then on the primal columns
    the activation (CPila folded as in :func:`monoflow_core.fused.evaluate.activate`: ``relu(h) + y p(y / c) 2^y`` with
    ``y = min(h, 0)``; derivative ``(u^3/2 + u^2/2 - u + 1) 2^y``; or ReLU; or CLipSwish folded with its ``beta``:
    ``h s`` with ``s = sigmoid(h)``, derivative ``s (1 + h (1 - s))``), storing ``2^y`` (or ``s``; ``ws_e``) and the
    derivative (``ws_q[.., 1, ..]``) in workspace slice ``jw`` (the backward pass needs no more: it recomputes ``y``
    from ``h``; the value polynomial ``ws_q[.., 0, ..]`` of the PyTorch kernels is not written), and the tangents
    times the derivative. Layer ``i``'s outputs are rows ``widths[i] ..`` of ``x``. The last rows of ``tmp``
    receive ``fw x``: the map on the primal columns and its Jacobian on the tangent ones.
    """
    depth = offs.shape[0]
    cols = (1 + n) * b
    total = x.shape[0]
    zero, one = cst[0], cst[1]
    a2, a1, b3 = cst[3], cst[4], cst[5]
    ptmp = tmp[1]
    for i in range(depth):
        width = widths[i]
        wi = wflat[offs[i] : offs[i] + m * width].reshape((m, width))
        gemm(False, False, wi, x[:width], ws_h[i, jw])
        for u in range(m):
            hrow = ws_h[i, jw, u]
            drow = ws_q[i, jw, 1, u]
            xrow = x[width + u]
            if kind == ACT_PILA:  # folded Pila
                erow = ws_e[i, jw, u]
                _exp2_fill(hrow, ibuf, ptmp, cst, coeffs, b)  # 2^y as _exp2, in two passes
                for s in range(b):
                    yv = min(hrow[s], zero)
                    ev = ptmp[s] * scale[s]
                    erow[s] = ev
                    drow[s] = (((b3 * yv + a2) * yv + a1) * yv + one) * ev
                    xrow[s] = max(hrow[s], zero) + ((a2 * yv + a1) * yv + one) * yv * ev
            elif kind == ACT_SWISH:  # folded CLipSwish: h sigmoid(h)
                erow = ws_e[i, jw, u]
                _sigmoid_fill(hrow, erow, zero, one, b)
                for s in range(b):
                    hv = hrow[s]
                    sv = erow[s]
                    drow[s] = sv * (one + hv * (one - sv))
                    xrow[s] = hv * sv
            else:  # ReLU
                for s in range(b):
                    hv = hrow[s]
                    drow[s] = one if hv > zero else zero
                    xrow[s] = max(hv, zero)
            for t in range(n):
                base = (1 + t) * b
                for s in range(b):
                    xrow[base + s] = hrow[base + s] * drow[s]
    a = 0
    while a + 2 <= n:  # the map's rows in pairs (n = 2: one pass), each pair reading x once
        _map_rows(fw[a], fw[a + 1], x, tmp[2 + a], tmp[3 + a], total, cols, True, zero)
        a += 2
    if a < n:
        _map_rows(fw[a], fw[a], x, tmp[2 + a], tmp[2 + a], total, cols, False, zero)


@_jit
def _map_rows(f0, f1, x, out0, out1, total, cols, pair, zero):  # pragma: no cover - compiled
    """``out0 = f0 x`` (and ``out1 = f1 x`` if ``pair``) over ``x[:total, :cols]``, four rows of ``x`` per pass.

    Row by row (one multiply-add per load and store of the output) this was 1.4x slower, and as a BLAS product
    with two rows 1.65x slower (2-D toy model, 51 rows, 1,500 columns).
    """
    for q_ in range(cols):
        out0[q_] = zero
        if pair:
            out1[q_] = zero
    k = 0
    while k + 4 <= total:
        x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
        a0, a1, a2, a3 = f0[k], f0[k + 1], f0[k + 2], f0[k + 3]
        c0, c1, c2, c3 = f1[k], f1[k + 1], f1[k + 2], f1[k + 3]
        if pair:
            for q_ in range(cols):
                v0, v1, v2, v3 = x0[q_], x1[q_], x2[q_], x3[q_]
                out0[q_] += a0 * v0 + a1 * v1 + a2 * v2 + a3 * v3
                out1[q_] += c0 * v0 + c1 * v1 + c2 * v2 + c3 * v3
        else:
            for q_ in range(cols):
                out0[q_] += a0 * x0[q_] + a1 * x1[q_] + a2 * x2[q_] + a3 * x3[q_]
        k += 4
    while k < total:
        xk = x[k]
        a0, c0 = f0[k], f1[k]
        for q_ in range(cols):
            out0[q_] += a0 * xk[q_]
            if pair:
                out1[q_] += c0 * xk[q_]
        k += 1


@_jit
def solve_run(points, net, setup, outputs, space, part, consts, work):  # pragma: no cover - compiled
    """Every block of a run on a batch of points: solves, outputs, log-dets, statistics, and the backward's buffers.

    A solve is safeguarded Newton as :func:`monoflow_core.fused.newton.newton_solve`: each point stops moving once its
    relative residual ``|w + sign G(w) - rhs|_inf / (1 + |rhs|_inf)`` meets its block's tolerance; a Newton step that
    makes a point's residual grow is replaced by the plain contracting step from its previous accepted iterate, which is
    then accepted without comparison. A point whose Euclidean residual has not fallen below ``STALL_FACTOR`` times
    its value at the last such decrease for ``STALL_WINDOW`` iterations (rejected candidates count as no progress)
    stops at its next accepted point, as not converged: the generic solvers' stall exit
    (:class:`monoflow_core.fused.newton.StallTest`). The batch evaluates until all its points have finished (or the
    cap), so a finished point's last evaluation is at its returned point: its Jacobian gives the exact log-det, and
    with ``keep`` the evaluation stays in the workspace (block ``j``'s slices) where :func:`backward_run` reads it.

    Args (``nb`` blocks, ``B`` points, ``n`` dimensions):
        points: (B, n) inputs of the first block.
        net: the folded weights (:class:`KernelNet`).
        setup: how each block is solved, its log-det weights, tolerance and cap (:class:`RunSetup`).
        outputs: receives the outputs of the last block, the summed log-dets and each block's per-point statistics
            (:class:`RunOutputs`).
        space: the workspace (:class:`KernelSpace`), written with ``part.keep`` and not read otherwise.
        part: the points to run and how (:class:`SolvePart`): points ``start .. start + size - 1`` of ``points``,
            the outputs and the statistics (the workspace and ``work.ibuf`` hold that part alone).
        consts: the dtype's constants (:class:`KernelConstants`).
        work: scratch (:class:`SolveWork`).

    The arguments arrive in named groups (Numba passes a named tuple of arrays as one structure) and are unpacked
    here, so the loops below read plain locals.
    """
    wflat, offs, widths, m, fw, kind = net
    modes, rhs_scale, out_w, out_x, ld_plus, ld_mono, tols, max_iters = setup
    y_out, logdet, iterations, residual, converged, stalled = outputs
    ws_x, ws_h, ws_e, ws_q, ws_out = space
    start, count, keep, compact_fraction = part
    cst, coeffs = consts
    ibuf, scratch = work
    nb = wflat.shape[0]
    b = count
    n = points.shape[1]
    dt = points.dtype
    cols = (1 + n) * b
    zero, one = cst[0], cst[1]
    scale = ibuf.view(dt)
    tmp = np.empty((2 + n, cols), dt)
    x = np.empty((n, b), dt)
    cur = np.empty((n, b), dt)
    rhs = np.empty((n, b), dt)
    thr = np.empty(b, dt)
    res = np.empty(b, dt)
    r = np.empty((n, b), dt)
    prev_w = np.empty((n, b), dt)
    prev_r = np.empty((n, b), dt)
    prev_res = np.empty(b, dt)
    plain = np.zeros(b, np.bool_)
    done = np.zeros(b, np.bool_)
    first = np.zeros(b, np.int64)
    # the stall exit: STALL_FACTOR^2 |r|_2^2 at each point's last decrease, the iteration of it, whether it stalled
    f2, window = cst[10], cst[11]
    bar = np.empty(b, dt)
    last_dec = np.zeros(b, np.int64)
    stall = np.zeros(b, np.bool_)
    jac = np.empty((n, n), dt)
    jpt = np.empty((n, n, b), dt)
    step = np.empty(n, dt)
    for s in range(b):
        logdet[start + s] = zero
        for a in range(n):
            x[a, s] = points[start + s, a]
    total = fw.shape[2]
    depth = offs.shape[0]
    if not keep:  # the caller's scratch, re-viewed as the batch shrinks (the BLAS products need contiguous operands)
        sizes = (total * cols, depth * m * cols, depth * m * b, depth * 2 * m * b)
        at = 0
        fx = scratch[at : at + sizes[0]]
        at += sizes[0]
        fh = scratch[at : at + sizes[1]]
        at += sizes[1]
        fe = scratch[at : at + sizes[2]]
        at += sizes[2]
        fq = scratch[at : at + sizes[3]]
    idx = np.arange(b)
    for j in range(nb):
        tol = tols[j]
        cap = max_iters[j]
        solve = modes[j] == MODE_SOLVE
        na = b  # active points, at positions 0 .. na - 1; idx maps them to the batch
        for p in range(b):
            idx[p] = p
            bound = zero
            for a in range(n):
                rhs[a, p] = rhs_scale[j] * x[a, p]
                cur[a, p] = rhs[a, p]
                bound = _max_nan(bound, abs(rhs[a, p]))
            thr[p] = (bound + one) * tol
            done[p] = False
            plain[p] = False
            prev_res[p] = -one  # no accepted iterate yet
            first[p] = 0
            bar[p] = np.inf
            last_dec[p] = 0
            stall[p] = False
        it = 0
        fresh = True  # the buffers' layout must be (re)made for na points
        while True:
            it += 1
            if fresh:
                if keep:
                    jw = j
                    xs, hs, es, qs = ws_x, ws_h, ws_e, ws_q
                else:
                    jw = 0
                    xs = fx[: total * (1 + n) * na].reshape((1, total, (1 + n) * na))
                    hs = fh[: depth * m * (1 + n) * na].reshape((depth, 1, m, (1 + n) * na))
                    es = fe[: depth * m * na].reshape((depth, 1, m, na))
                    qs = fq[: depth * 2 * m * na].reshape((depth, 1, 2, m, na))
                xj = xs[jw]
                # bias and identity rows (the activation rows are overwritten by every evaluation)
                for k in range(1 + n):
                    for q_ in range((1 + n) * na):
                        xj[k, q_] = zero
                for p in range(na):
                    xj[0, p] = one
                for t in range(n):
                    for p in range(na):
                        xj[1 + t, (1 + t) * na + p] = one
                fresh = False
            for a in range(n):
                for p in range(na):
                    xj[1 + a, p] = cur[a, p]
            _evaluate(wflat[j], offs, widths, m, fw[j], n, kind, na, xj, hs, es, qs, jw, cst, coeffs, tmp, ibuf, scale)
            out = tmp[2 : 2 + n]
            remaining = 0
            # n = 2: the residuals and the Newton steps in one closed-form pass (the general passes then skip)
            stepped = solve and n == 2 and it < cap
            if stepped:
                remaining = _residual_and_step2(
                    out,
                    rhs,
                    cur,
                    r,
                    res,
                    thr,
                    done,
                    first,
                    prev_w,
                    prev_r,
                    prev_res,
                    plain,
                    it,
                    na,
                    zero,
                    bar,
                    last_dec,
                    stall,
                    f2,
                    window,
                )
            for p in range(0 if stepped else na):
                if not solve:
                    done[p] = True
                    first[p] = 1
                    res[p] = zero
                    continue
                if done[p]:
                    continue
                rs = zero
                m2 = zero
                for a in range(n):
                    r[a, p] = out[a, p] - rhs[a, p]
                    rs = _max_nan(rs, abs(r[a, p]))
                    m2 += r[a, p] * r[a, p]
                res[p] = rs
                if rs <= thr[p]:
                    done[p] = True
                    first[p] = it
                elif _stalls(p, rs, m2, prev_res, plain, bar, last_dec, it, f2, window, zero):
                    done[p] = True
                    stall[p] = True
                    first[p] = it
                else:
                    remaining += 1
                    for a in range(n):  # the Jacobian for its Newton step (kept per point: points may move)
                        for t in range(n):
                            jpt[a, t, p] = out[a, (1 + t) * na + p]
            last = remaining == 0 or it >= cap
            shrink = not keep and compact_fraction > 0 and (na - remaining) * compact_fraction >= na
            if last or shrink:
                # write out the finished points (all of them at the end), from this evaluation at their solution
                kept = 0
                for p in range(na):
                    if done[p] or last:
                        s = idx[p]
                        iterations[j, start + s] = first[p] if done[p] else it
                        residual[j, start + s] = res[p] / thr[p] * tol
                        converged[j, start + s] = done[p] and not stall[p]
                        stalled[j, start + s] = stall[p]
                        if n == 2 and ld_plus[j] != 0.0 and ld_mono[j] == -ld_plus[j]:
                            # a monotone block: log|det(2I - A)| - log|det A| as one logarithm
                            a00, a01 = out[0, na + p], out[0, 2 * na + p]
                            a10, a11 = out[1, na + p], out[1, 2 * na + p]
                            ratio = ((2.0 - a00) * (2.0 - a11) - a01 * a10) / (a00 * a11 - a01 * a10)
                            logdet[start + s] += ld_mono[j] * math.log(abs(ratio))
                        else:
                            for a in range(n):
                                for t in range(n):
                                    jac[a, t] = out[a, (1 + t) * na + p]
                            if ld_plus[j] != 0.0:
                                logdet[start + s] += ld_plus[j] * _logabsdet(jac, n, 0.0)
                            if ld_mono[j] != 0.0:
                                logdet[start + s] += ld_mono[j] * _logabsdet(jac, n, 2.0)
                        for a in range(n):
                            sol = cur[a, p] if solve else out[a, p]
                            x[a, s] = out_w[j] * sol + out_x[j] * x[a, s]
                    else:  # still working: move down to position kept
                        idx[kept] = idx[p]
                        for a in range(n):
                            cur[a, kept] = cur[a, p]
                            rhs[a, kept] = rhs[a, p]
                            r[a, kept] = r[a, p]
                            prev_w[a, kept] = prev_w[a, p]
                            prev_r[a, kept] = prev_r[a, p]
                        for a in range(n):
                            for t in range(n):
                                jpt[a, t, kept] = jpt[a, t, p]
                        thr[kept] = thr[p]
                        res[kept] = res[p]
                        prev_res[kept] = prev_res[p]
                        bar[kept] = bar[p]
                        last_dec[kept] = last_dec[p]
                        plain[kept] = plain[p]
                        done[kept] = False
                        kept += 1
                if last:
                    if keep:
                        ws_out[j] = out
                    break
                if kept != na:
                    na = kept
                    fresh = True
            for p in range(0 if stepped else na):
                if done[p]:
                    continue
                if prev_res[p] >= zero and res[p] > prev_res[p] and not plain[p]:
                    # the Newton step made things worse: the plain contracting step from the previous accepted
                    # point instead, accepted without comparison next time
                    for a in range(n):
                        cur[a, p] = prev_w[a, p] - prev_r[a, p]
                    plain[p] = True
                    continue
                for a in range(n):
                    for t in range(n):
                        jac[a, t] = jpt[a, t, p]
                    step[a] = r[a, p]
                _solve_small(jac, step, n)
                for a in range(n):
                    prev_w[a, p] = cur[a, p]
                    prev_r[a, p] = r[a, p]
                    cur[a, p] -= step[a]
                prev_res[p] = res[p]
                plain[p] = False
    for s in range(b):
        for a in range(n):
            y_out[start + s, a] = x[a, s]


@_jit
def _stalls(p, rs, m2, prev_res, plain, bar, last_dec, it, f2, window, zero):  # pragma: no cover - compiled
    """The stall test of point ``p`` after an evaluation with max-norm residual ``rs`` and squared Euclidean residual
    ``m2`` that did not converge (:class:`monoflow_core.fused.newton.StallTest`): a point that was not rejected by the
    safeguard (see :func:`solve_run`) and got below its bar records the decrease; one that was not rejected and has
    gone ``window`` iterations without a decrease stalls (returns True)."""
    if prev_res[p] >= zero and rs > prev_res[p] and not plain[p]:
        return False  # a rejected Newton candidate: no progress, and no stop here (the plain step comes first)
    if m2 < bar[p]:  # (False for NaN)
        bar[p] = m2 * f2
        last_dec[p] = it
        return False
    return it - last_dec[p] >= window


@_jit
def _residual_and_step2(
    out,
    rhs,
    cur,
    r,
    res,
    thr,
    done,
    first,
    prev_w,
    prev_r,
    prev_res,
    plain,
    it,
    na,
    zero,
    bar,
    last_dec,
    stall,
    f2,
    window,
):  # pragma: no cover - compiled
    """For n = 2, the two per-point passes of :func:`solve_run` after an evaluation in one, without loops over the
    dimensions: each active point's residual, convergence and stall tests, then its safeguarded Newton step (the
    same rule and the same arithmetic as the general passes, with the 2 x 2 solve in closed form). Returns the
    number of points still working."""
    remaining = 0
    for p in range(na):
        if done[p]:
            continue
        r0 = out[0, p] - rhs[0, p]
        r1 = out[1, p] - rhs[1, p]
        rs = _max_nan(_max_nan(zero, abs(r0)), abs(r1))
        res[p] = rs
        r[0, p] = r0
        r[1, p] = r1
        if rs <= thr[p]:
            done[p] = True
            first[p] = it
            continue
        if _stalls(p, rs, r0 * r0 + r1 * r1, prev_res, plain, bar, last_dec, it, f2, window, zero):
            done[p] = True
            stall[p] = True
            first[p] = it
            continue
        remaining += 1
        if prev_res[p] >= zero and rs > prev_res[p] and not plain[p]:
            # the Newton step made things worse: the plain step from the previous accepted point (as solve_run)
            cur[0, p] = prev_w[0, p] - prev_r[0, p]
            cur[1, p] = prev_w[1, p] - prev_r[1, p]
            plain[p] = True
            continue
        a00 = out[0, na + p]
        a01 = out[0, 2 * na + p]
        a10 = out[1, na + p]
        a11 = out[1, 2 * na + p]
        det = a00 * a11 - a01 * a10
        prev_w[0, p] = cur[0, p]
        prev_w[1, p] = cur[1, p]
        prev_r[0, p] = r0
        prev_r[1, p] = r1
        cur[0, p] -= (a11 * r0 - a01 * r1) / det
        cur[1, p] -= (a00 * r1 - a10 * r0) / det
        prev_res[p] = rs
        plain[p] = False
    return remaining


def scratch_size(total: int, depth: int, m: int, n: int, b: int) -> int:
    """Elements of :func:`solve_run`'s ``scratch`` for ``b`` points (features, pre-activations, activation parts)."""
    cols = (1 + n) * b
    return total * cols + depth * m * cols + 3 * depth * m * b


@_jit
def backward_run(net, kinds, cotangents, space, grads, cst, start, count):  # pragma: no cover - compiled
    """The exact backward pass of a run of blocks after :func:`solve_run` with ``keep``, block by block.

    The algorithm of :meth:`monoflow_core.fused.run.FusedBlocks.backward` (docs/algorithm.md §§6, 5), from the last
    block: (1) the log-det's cotangent ``d log|det| / dA`` (``A^{-T}`` with the block's signs) goes back through G's
    tangent network, where the activation's second derivative enters, giving the log-det's gradient ``v`` with
    respect to the solution ``w``; (2) the implicit-function gradient ``a = (g_w + v) A^{-1}`` (``g_w = sqrt 2 g``
    for a monotone block, ``g`` for an inverse residual one) gives the cotangent ``-a`` of G's output and the
    cotangent of the block's input; (3) that cotangent goes back through G's primal network. Each weight gradient
    is then one product of the summed pre-activation cotangents with the features.

    Args (shapes as :func:`solve_run`):
        net: the folded weights (:class:`KernelNet`), those of the forward.
        kinds: (nb,) :data:`KIND_RESIDUAL`, :data:`KIND_MONOTONE` or :data:`KIND_INVERSE_RESIDUAL`.
        cotangents: of the run's output and summed log-det (:class:`Cotangents`).
        space: the workspace :func:`solve_run` filled with ``keep`` (:class:`KernelSpace`).
        grads: receives the cotangent of the run's input and the gradients of the folded weights (:class:`RunGrads`):
            those of this part of the batch alone.
        cst: :func:`constants` of the dtype.
        start, count: the part of the batch (as :func:`solve_run`): rows ``start ..`` of the cotangents and of
            ``grads.x``.
    """
    wflat, offs, widths, m, fw, kind = net
    grad_z, grad_logdet = cotangents
    ws_x, ws_h, ws_e, ws_q, ws_out = space
    grad_x, grad_wflat, grad_fw = grads
    nb = wflat.shape[0]
    depth = offs.shape[0]
    b = count
    n = grad_z.shape[1]
    dt = grad_z.dtype
    total = fw.shape[2]
    cols = (1 + n) * b
    zero, one, s3, s2, root2 = cst[0], cst[1], cst[6], cst[7], cst[8]
    two = one + one
    gx = np.empty((total, cols), dt)
    gx2 = np.empty((total, b), dt)
    tmp = np.empty((total, cols), dt)
    tmp2 = np.empty((total, b), dt)
    ghs = np.empty((depth, m, cols), dt)
    g2 = np.empty((m, b), dt)
    gd = np.empty(b, dt)
    c_out = np.empty((n, cols), dt)
    gy = np.empty((n, b), dt)
    amat = np.empty((n, n), dt)
    inv = np.empty((n, n), dt)
    inv2 = np.empty((n, n), dt)
    row_v = np.empty(n, dt)
    for s in range(b):
        for a in range(n):
            gy[a, s] = grad_z[start + s, a]
    for j in range(nb - 1, -1, -1):
        kj = kinds[j]
        xj = ws_x[j]
        outj = ws_out[j]
        # (1) the log-det's cotangent of A = I + J_G at the solution (the tangent columns of the map)
        closed = n == 2 and kj == KIND_MONOTONE  # steps (1) and (2) in closed form per point
        if closed:
            _logdet_cotangent_monotone2(outj, grad_logdet[start : start + b], c_out, b)
        for s in range(0 if closed else b):
            for a in range(n):
                for t in range(n):
                    amat[a, t] = outj[a, (1 + t) * b + s]
            _inverse_small(amat, inv, n, 0.0)
            if kj == KIND_MONOTONE:
                _inverse_small(amat, inv2, n, 2.0)  # (2I - A)^{-1}
            gl = grad_logdet[start + s]
            for a in range(n):
                for t in range(n):
                    if kj == KIND_RESIDUAL:
                        val = inv[t, a]
                    elif kj == KIND_MONOTONE:
                        val = -(inv[t, a] + inv2[t, a])
                    else:
                        val = -inv[t, a]
                    c_out[a, (1 + t) * b + s] = val * gl
        for a in range(n):
            for s in range(b):
                c_out[a, s] = zero
        _transpose_product(fw[j], c_out, gx, n, total, cols)
        for i in range(depth - 1, -1, -1):  # (layer i's outputs are rows widths[i] .. widths[i] + m - 1)
            width = widths[i]
            for u in range(m):
                grow = gx[width + u]
                hrow = ws_h[i, j, u]
                drow = ws_q[i, j, 1, u]
                srow = ghs[i, u]
                for s in range(b):
                    gd[s] = zero
                for t in range(n):
                    base = (1 + t) * b
                    for s in range(b):
                        gd[s] += grow[base + s] * hrow[base + s]
                        srow[base + s] = grow[base + s] * drow[s]
                if kind == ACT_PILA:
                    erow = ws_e[i, j, u]
                    for s in range(b):
                        yv = min(hrow[s], zero)
                        srow[s] = grow[s] * drow[s] + gd[s] * ((s3 * yv + s2) * yv * yv * erow[s])
                elif kind == ACT_SWISH:  # the folded swish's second derivative s (1 - s) (2 + h (1 - 2 s))
                    erow = ws_e[i, j, u]
                    for s in range(b):
                        sv = erow[s]
                        second = sv * (one - sv) * (two + hrow[s] * (one - two * sv))
                        srow[s] = grow[s] * drow[s] + gd[s] * second
                else:
                    for s in range(b):
                        srow[s] = grow[s] * drow[s]
            _back_through(wflat[j, offs[i] : offs[i] + m * width].reshape((m, width)), ghs[i], tmp, gx)
        # (2) the implicit-function gradient, per point; c_out's primal columns receive the cotangent of G's output
        if closed:
            _implicit_gradient_monotone2(outj, gx, gy, c_out, root2, b)
        for s in range(0 if closed else b):
            for a in range(n):
                for t in range(n):
                    amat[a, t] = outj[a, (1 + t) * b + s]
                row_v[a] = gx[1 + a, s]  # v: the log-det's gradient with respect to w
            if kj == KIND_RESIDUAL:
                # y = x + G(x): dL/dx = g A + v; G's output receives g
                for t in range(n):
                    acc = row_v[t]
                    for a in range(n):
                        acc += gy[a, s] * amat[a, t]
                    c_out[t, s] = gy[t, s]
                    row_v[t] = acc
                for a in range(n):
                    gy[a, s] = row_v[a]
                continue
            _inverse_small(amat, inv, n, 0.0)
            for a in range(n):
                row_v[a] += root2 * gy[a, s] if kj == KIND_MONOTONE else gy[a, s]
            for t in range(n):
                acc = zero
                for a in range(n):
                    acc += row_v[a] * inv[a, t]
                c_out[t, s] = -acc
                gy[t, s] = root2 * acc - gy[t, s] if kj == KIND_MONOTONE else acc
        # (3) back through G's primal network with that cotangent
        _transpose_product(fw[j], c_out, gx2, n, total, b)
        for i in range(depth - 1, -1, -1):
            width = widths[i]
            for u in range(m):
                grow = gx2[width + u]
                drow = ws_q[i, j, 1, u]
                srow = ghs[i, u]
                g2row = g2[u]
                for s in range(b):
                    g = grow[s] * drow[s]
                    g2row[s] = g
                    srow[s] += g
            if i > 0:  # (the input's cotangent is not needed: the implicit gradient gave it)
                _back_through(wflat[j, offs[i] : offs[i] + m * width].reshape((m, width)), g2, tmp2, gx2)
        # the weight gradients: summed pre-activation cotangents (both passes) times the features
        for i in range(depth):
            width = widths[i]
            gw = grad_wflat[j, offs[i] : offs[i] + m * width].reshape((m, width))
            gemm(False, True, ghs[i], xj[:width], gw)
        for a in range(n):
            crow = c_out[a]
            for k in range(total):
                xk = xj[k]
                acc = zero
                for q_ in range(cols):
                    acc += crow[q_] * xk[q_]
                grad_fw[j, a, k] = acc
    for s in range(b):
        for a in range(n):
            grad_x[start + s, a] = gy[a, s]


@_jit
def _logdet_cotangent_monotone2(outj, grad_logdet, c_out, b):  # pragma: no cover - compiled
    """Step (1) of :func:`backward_run` for a monotone block in two dimensions, in closed form per point:
    ``d(log|det(2I - A)| - log|det A|) / dA = -((2I - A)^{-T} + A^{-T})`` times the log-det's cotangent, into the
    tangent columns of ``c_out``."""
    for s in range(b):
        a00, a01 = outj[0, b + s], outj[0, 2 * b + s]
        a10, a11 = outj[1, b + s], outj[1, 2 * b + s]
        gl = grad_logdet[s]
        pa = gl / (a00 * a11 - a01 * a10)  # 1 / det A and 1 / det(2I - A), times the cotangent
        pm = gl / ((2.0 - a00) * (2.0 - a11) - a01 * a10)
        c_out[0, b + s] = -(a11 * pa + (2.0 - a11) * pm)
        c_out[0, 2 * b + s] = a10 * pa - a10 * pm
        c_out[1, b + s] = a01 * pa - a01 * pm
        c_out[1, 2 * b + s] = -(a00 * pa + (2.0 - a00) * pm)


@_jit
def _implicit_gradient_monotone2(outj, gx, gy, c_out, root2, b):  # pragma: no cover - compiled
    """Step (2) of :func:`backward_run` for a monotone block in two dimensions, in closed form per point:
    ``a = (v + sqrt 2 g) A^{-1}`` (``v`` the log-det's gradient in rows 1-2 of ``gx``), G's output receives ``-a`` and
    the block's input ``sqrt 2 a - g`` (docs/algorithm.md section 6)."""
    for s in range(b):
        a00, a01 = outj[0, b + s], outj[0, 2 * b + s]
        a10, a11 = outj[1, b + s], outj[1, 2 * b + s]
        g0, g1 = gy[0, s], gy[1, s]
        v0 = gx[1, s] + root2 * g0
        v1 = gx[2, s] + root2 * g1
        det = a00 * a11 - a01 * a10
        # row vector v times A^{-1} = [[a11, -a01], [-a10, a00]] / det
        acc0 = (v0 * a11 - v1 * a10) / det
        acc1 = (v1 * a00 - v0 * a01) / det
        c_out[0, s] = -acc0
        c_out[1, s] = -acc1
        gy[0, s] = root2 * acc0 - g0
        gy[1, s] = root2 * acc1 - g1


@_jit
def _back_through(w, g, tmp, gx):  # pragma: no cover - compiled
    """``gx[:width] += w^T g``: pre-activation cotangents ``g`` (m, cols) back to a layer's inputs (one BLAS product
    into the scratch ``tmp``, then a vectorised sum)."""
    width = w.shape[1]
    gemm(True, False, w, g, tmp[:width])
    for k in range(width):
        grow = gx[k]
        trow = tmp[k]
        for q_ in range(g.shape[1]):
            grow[q_] += trow[q_]


@_jit
def _transpose_product(fw, c, out, n, total, cols):  # pragma: no cover - compiled
    """``out[:, :cols] = fw^T c[:, :cols]`` for the (n, T) final weights (n is small: rows of axpys, no BLAS)."""
    for k in range(total):
        orow = out[k]
        f0 = fw[0, k]
        c0 = c[0]
        for q_ in range(cols):
            orow[q_] = f0 * c0[q_]
        for a in range(1, n):
            fa = fw[a, k]
            ca = c[a]
            for q_ in range(cols):
                orow[q_] += fa * ca[q_]
