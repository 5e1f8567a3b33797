"""Compiled CPU kernels of the fold (Numba): the weights of a run of DenseNet G networks and their gradient.

:func:`fold_forward` / :func:`fold_backward`: the spectral normalisation and concatenation folding of the weights
(as :func:`monoflow_core.fused.fold.fold_nets_torch`) and its gradient, one call each way for a whole run of blocks.
These kernels call no compiled function of another file (Numba's on-disk cache checks a function's own file only),
so they live apart from the solver's kernels (:mod:`monoflow_core.fused.kernels`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .kernels import _jit

__all__ = ["FoldGrads", "FoldLayout", "FoldParams", "FoldSaved", "fold_backward", "fold_forward"]


class FoldLayout(NamedTuple):
    """Shapes and offsets of one block's layers in the fold's flat rows (one row per block, the layers side by side).

    Layer ``i`` of block ``j`` is ``wflat[j, woffs[i]:]`` as (rows[i], cols[i]), its bias ``bflat[j, boffs[i]:]``,
    its folded weights ``out_flat[j, ooffs[i]:]`` as (2 rows[i], 1 + cols[i]) (hidden) or (rows[i], 1 + cols[i])
    (final), its singular vectors ``uflat[j, boffs[i]:]`` and ``vflat[j, voffs[i]:]``; ``out_size`` and ``v_size``
    are the lengths of a row of ``out_flat`` and ``vflat``.
    """

    rows: np.ndarray
    cols: np.ndarray
    woffs: np.ndarray
    boffs: np.ndarray
    ooffs: np.ndarray
    voffs: np.ndarray
    out_size: int
    v_size: int


class FoldParams(NamedTuple):
    """What the fold reads (``nb`` blocks, depth ``L``).

    ``concat_k`` (nb, L, 2) the concatenation parameters K; ``lip`` (nb,) each net's ``lip_coeff``; ``coeff``
    (L + 1, nb) each layer's Lipschitz bound; ``wflat``, ``bflat`` the weights and biases (:class:`FoldLayout`);
    ``gains``, ``scales`` (nb, L) float64, each block's and hidden layer's folded pre-activation factor ``k`` and
    output scale (divided by ``k``); ``shift`` the activation's shift.
    """

    concat_k: np.ndarray
    lip: np.ndarray
    coeff: np.ndarray
    wflat: np.ndarray
    bflat: np.ndarray
    gains: np.ndarray
    shift: float
    scales: np.ndarray


class FoldSaved(NamedTuple):
    """What :func:`fold_forward` writes for :func:`fold_backward`: the top singular vectors ``uflat``, ``vflat`` and
    each layer's ``sig`` (L + 1, nb)."""

    uflat: np.ndarray
    vflat: np.ndarray
    sig: np.ndarray


class FoldGrads(NamedTuple):
    """What :func:`fold_backward` writes: the gradients of the weights, biases, K (nb, L, 2), and of the folded
    factors and scales (nb, L, float64)."""

    wflat: np.ndarray
    bflat: np.ndarray
    concat_k: np.ndarray
    gains: np.ndarray
    scales: np.ndarray


@_jit
def _mix(concat_k, lip, eta1, eta2, prods):  # pragma: no cover - compiled
    """The DenseNet's concatenation coefficients (docs/algorithm.md section 7): ``(eta1, eta2) = lip e / |e|`` with
    ``e = softplus(K) + 0.1`` per dense layer, and ``prods[i] = prod_{l < i} eta1_l``."""
    depth = concat_k.shape[0]
    prods[0] = 1.0
    for i in range(depth):
        e0 = _softplus(concat_k[i, 0]) + 0.1
        e1 = _softplus(concat_k[i, 1]) + 0.1
        norm = math.sqrt(e0 * e0 + e1 * e1)
        eta1[i] = lip * e0 / norm
        eta2[i] = lip * e1 / norm
        prods[i + 1] = prods[i] * eta1[i]


@_jit
def _softplus(x):  # pragma: no cover - compiled
    """``log(1 + e^x)``, the identity above 20 (as ``torch.nn.functional.softplus``)."""
    return x if x > 20.0 else math.log1p(math.exp(x))


@_jit
def _column_scales(i, n, hidden_widths, eta2, prods, scale, cols):  # pragma: no cover - compiled
    """Scale of each input column of layer ``i``: the input block scaled by ``prods[i]``, then the outputs of each
    earlier dense layer ``l`` by ``eta2_l prods[i] / prods[l + 1]`` times the activation's folded output scale
    ``scale[l]``."""
    for c in range(n):
        cols[c] = prods[i]
    offset = n
    for layer in range(i):
        width = 2 * hidden_widths[layer]
        value = eta2[layer] * prods[i] / prods[layer + 1] * scale[layer]
        for c in range(width):
            cols[offset + c] = value
        offset += width
    return offset


@_jit
def _fold_setup(concat_k, rows, cols_):  # pragma: no cover - compiled
    """Sizes and scratch of :func:`fold_forward` and :func:`fold_backward`: ``(nb, depth, n, eta1, eta2, prods,
    column scales)``."""
    depth = concat_k.shape[1]
    dt = concat_k.dtype
    return (
        concat_k.shape[0],
        depth,
        cols_[0],
        np.empty(depth, dt),
        np.empty(depth, dt),
        np.empty(depth + 1, dt),
        np.empty(cols_[depth], dt),
    )


@_jit
def fold_forward(params, layout, out_flat, saved):  # pragma: no cover - compiled
    """Fold a stack of DenseNet G networks into the weights the kernels use (as
    :func:`monoflow_core.fused.fold.fold_nets`).

    Per block ``j`` and layer position ``i``: the exact spectral norm ``sigma = u^T W v`` from the top singular pair
    (:func:`_top_singular_pair`, no gradient through ``u, v``), the soft normalisation ``W / max(1, sigma / coeff)``
    (docs/algorithm.md §7), the column scales of the learnable concatenation, and for a hidden layer the concatenated
    activation's two halves ``[[k (b - shift), k Wn], [k (-b - shift), -k Wn]]`` (final layer: ``[b, Wn]``), with the
    pre-activation factor ``k`` of the block's layer (``gains[j, i]``: Pila's constant, or CLipSwish's ``beta``).

    Every per-layer array is one row per block with the layers side by side (so one compiled version serves every
    depth): layer ``i`` of block ``j`` is ``wflat[j, woffs[i]:]`` as (rows[i], cols_[i]), its bias
    ``bflat[j, boffs[i]:]``, its folded weights ``out_flat[j, ooffs[i]:]`` as (2 rows[i], 1 + cols_[i]) (hidden) or
    (rows[i], 1 + cols_[i]) (final), its singular vectors ``uflat[j, boffs[i]:]`` and ``vflat[j, voffs[i]:]``.

    Args:
        params: what the fold reads (:class:`FoldParams`).
        layout: where each layer's pieces are in the flat rows (:class:`FoldLayout`).
        out_flat: (nb, layout.out_size) receives the folded weights.
        saved: receives what :func:`fold_backward` reads (:class:`FoldSaved`).
    """
    concat_k, lip, coeff, wflat, bflat, gains, shift, scales = params
    rows, cols_, woffs, boffs, ooffs, voffs, _, _ = layout
    uflat, vflat, sig = saved
    nb, depth, n, eta1, eta2, prods, cols = _fold_setup(concat_k, rows, cols_)
    for j in range(nb):
        _mix(concat_k[j], lip[j], eta1, eta2, prods)
        for i in range(depth + 1):
            r_i = rows[i]
            width = cols_[i]
            w = wflat[j, woffs[i] : woffs[i] + r_i * width].reshape((r_i, width))
            u = uflat[j, boffs[i] : boffs[i] + r_i]
            v = vflat[j, voffs[i] : voffs[i] + width]
            _top_singular_pair(w, u, v)
            sigma = 0.0
            for r in range(r_i):
                acc = 0.0
                for c in range(width):
                    acc += w[r, c] * v[c]
                sigma += u[r] * acc
            sig[i, j] = sigma
            s = max(1.0, sigma / coeff[i, j])
            _column_scales(i, n, rows, eta2, prods, scales[j], cols)
            b = bflat[j, boffs[i] : boffs[i] + r_i]
            if i < depth:
                k = gains[j, i]
                out = out_flat[j, ooffs[i] : ooffs[i] + 2 * r_i * (1 + width)].reshape((2 * r_i, 1 + width))
                for r in range(r_i):
                    out[r, 0] = k * (b[r] - shift)
                    out[r_i + r, 0] = -k * (b[r] + shift)
                    for c in range(width):
                        value = k * w[r, c] / s * cols[c]
                        out[r, 1 + c] = value
                        out[r_i + r, 1 + c] = -value
            else:
                out = out_flat[j, ooffs[i] : ooffs[i] + r_i * (1 + width)].reshape((r_i, 1 + width))
                for r in range(r_i):
                    out[r, 0] = b[r]
                    for c in range(width):
                        out[r, 1 + c] = w[r, c] / s * cols[c]


@_jit
def _top_singular_pair(w, u, v):  # pragma: no cover - compiled
    """The top singular vectors ``u`` (rows) and ``v`` (columns) of the small matrix ``w``, written in place.

    From the symmetric eigenproblem of the Gram matrix of the smaller side (``w w^T`` or ``w^T w``, at most 8 x 8 for
    the 2-D toy model), formed and solved in float64: about 3x faster than an SVD of ``w`` here, and as accurate
    for the top pair (the caller takes ``sigma = u^T w v``, whose error is second order in that of ``u, v``).
    """
    rows, cols = w.shape
    wd = w.astype(np.float64)
    tall = rows > cols
    gram = wd.T @ wd if tall else wd @ wd.T
    _, vectors = np.linalg.eigh(gram)  # ascending eigenvalues: the last column is the top eigenvector
    top = vectors[:, vectors.shape[1] - 1]
    other = wd @ top if tall else wd.T @ top  # w v = sigma u (tall), w^T u = sigma v (wide)
    norm = math.sqrt(np.sum(other * other))
    scale = 1.0 / norm if norm > 0.0 else 0.0  # (w = 0: sigma = 0 whatever the vectors)
    if tall:
        for c in range(cols):
            v[c] = top[c]
        for r in range(rows):
            u[r] = other[r] * scale
    else:
        for r in range(rows):
            u[r] = top[r]
        for c in range(cols):
            v[c] = other[c] * scale


@_jit
def _gain_gradient(g, b, w, s, cols, shift):  # pragma: no cover - compiled
    """The gradient of a hidden layer's pre-activation factor ``k`` in :func:`fold_backward`: its folded weights are
    ``k [[b - shift, Wn], [-b - shift, -Wn]]`` with ``Wn = W / s * cols``, and ``g`` is their cotangent.

    (A loop of its own: accumulating it in the weights' loop changed how that loop is vectorised, and so the rounding
    of the Pila fold's gradients.)"""
    r_i, width = w.shape
    total = 0.0
    for r in range(r_i):
        total += g[r, 0] * (b[r] - shift) - g[r_i + r, 0] * (b[r] + shift)
        for c in range(width):
            total += (g[r, 1 + c] - g[r_i + r, 1 + c]) * (w[r, c] / s * cols[c])
    return total


@_jit
def fold_backward(params, layout, gout, saved, grads):  # pragma: no cover - compiled
    """The gradients of :func:`fold_forward` with respect to K, the weights, the biases, and the activation's folded
    factors and scales (same layouts).

    ``params``, ``layout`` and ``saved`` as :func:`fold_forward` read and wrote them; ``gout`` is the cotangent of
    ``out_flat``; ``grads`` (:class:`FoldGrads`) receives the gradients: the chain rule of the soft normalisation (the
    gradient flows through ``sigma = u^T W v``, and only where ``sigma > coeff``), of the column scales through
    ``eta``, ``prod eta1`` and the output scales, of the pre-activation factors, and of ``softplus`` (checked against
    PyTorch's autograd of the same fold; CLipSwish's ``beta`` reaches its parameter through the gradients of the gains
    and scales).
    """
    concat_k, lip, coeff, wflat, bflat, gains, shift, scales = params
    rows, cols_, woffs, boffs, ooffs, voffs, _, _ = layout
    uflat, vflat, sig = saved
    gwflat, gbflat, gk, ggains, gscales = grads
    nb, depth, n, eta1, eta2, prods, cols = _fold_setup(concat_k, rows, cols_)
    g_eta1 = np.empty_like(eta1)
    g_eta2 = np.empty_like(eta2)
    g_prods = np.empty_like(prods)
    g_cols = np.empty_like(cols)
    for j in range(nb):
        _mix(concat_k[j], lip[j], eta1, eta2, prods)
        g_eta1[:] = 0.0
        g_eta2[:] = 0.0
        g_prods[:] = 0.0
        gscales[j, :] = 0.0
        for i in range(depth + 1):
            r_i = rows[i]
            width = cols_[i]
            w = wflat[j, woffs[i] : woffs[i] + r_i * width].reshape((r_i, width))
            hidden = i < depth
            out_rows = 2 * r_i if hidden else r_i
            g = gout[j, ooffs[i] : ooffs[i] + out_rows * (1 + width)].reshape((out_rows, 1 + width))
            ratio = sig[i, j] / coeff[i, j]
            s = max(1.0, ratio)
            _column_scales(i, n, rows, eta2, prods, scales[j], cols)
            gw = gwflat[j, woffs[i] : woffs[i] + r_i * width].reshape((r_i, width))
            gb = gbflat[j, boffs[i] : boffs[i] + r_i]
            b = bflat[j, boffs[i] : boffs[i] + r_i]
            k = gains[j, i] if hidden else 1.0
            g_sigma_sum = 0.0
            for c in range(width):
                g_cols[c] = 0.0
            for r in range(r_i):
                if hidden:
                    gb[r] = k * (g[r, 0] - g[r_i + r, 0])
                else:
                    gb[r] = g[r, 0]
                for c in range(width):
                    g_wn = k * (g[r, 1 + c] - g[r_i + r, 1 + c]) if hidden else g[r, 1 + c]
                    g_cols[c] += g_wn * w[r, c] / s
                    g_raw = g_wn * cols[c]
                    gw[r, c] = g_raw / s
                    g_sigma_sum += g_raw * w[r, c]
            if hidden:
                ggains[j, i] = _gain_gradient(g, b, w, s, cols, shift)
            if ratio >= 1.0:  # W / s with s = sigma / coeff: the gradient through sigma = u^T W v
                g_sigma = -g_sigma_sum / (s * s * coeff[i, j])
                for r in range(r_i):
                    for c in range(width):
                        gw[r, c] += g_sigma * uflat[j, boffs[i] + r] * vflat[j, voffs[i] + c]
            # the column scales: prods[i] on the input block, eta2_l prods[i] / prods[l + 1] * scale on layer l's
            acc = 0.0
            for c in range(n):
                acc += g_cols[c]
            g_prods[i] += acc
            offset = n
            for layer in range(i):
                wdt = 2 * rows[layer]
                total = 0.0
                for c in range(wdt):
                    total += g_cols[offset + c]
                offset += wdt
                ratio_p = prods[i] / prods[layer + 1]
                scale = scales[j, layer]
                g_eta2[layer] += total * ratio_p * scale
                g_prods[i] += total * eta2[layer] / prods[layer + 1] * scale
                g_prods[layer + 1] -= total * eta2[layer] * ratio_p / prods[layer + 1] * scale
                gscales[j, layer] += total * eta2[layer] * ratio_p
        # prods[i] = prod_{l < i} eta1_l (eta1 > 0)
        for i in range(1, depth + 1):
            for layer in range(i):
                g_eta1[layer] += g_prods[i] * prods[i] / eta1[layer]
        # eta = lip e / |e|, e = softplus(K) + 0.1
        for i in range(depth):
            k0 = concat_k[j, i, 0]
            k1 = concat_k[j, i, 1]
            e0 = _softplus(k0) + 0.1
            e1 = _softplus(k1) + 0.1
            norm = math.sqrt(e0 * e0 + e1 * e1)
            dot = g_eta1[i] * e0 + g_eta2[i] * e1
            ge0 = lip[j] * (g_eta1[i] / norm - e0 * dot / (norm * norm * norm))
            ge1 = lip[j] * (g_eta2[i] / norm - e1 * dot / (norm * norm * norm))
            gk[j, i, 0] = ge0 * (1.0 if k0 > 20.0 else 1.0 / (1.0 + math.exp(-k0)))
            gk[j, i, 1] = ge1 * (1.0 if k1 > 20.0 else 1.0 / (1.0 + math.exp(-k1)))
