"""Curve smoothing for display: TensorBoard's debiased exponential moving average (display only, no model maths)."""

from __future__ import annotations

import numpy as np
from scipy.signal import lfilter

__all__ = ["debiased_ema"]


def debiased_ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with the start-up bias removed (as TensorBoard's smoothing slider).

    ``s_t = weight * s_{t-1} + (1 - weight) * v_t`` from ``s_{-1} = 0``, divided by the same recursion run on
    ones (``1 - weight ** (t + 1)``) so the first points are not pulled towards zero. Non-finite values (rejected
    steps) carry no weight: they enter both recursions as zeros. Vectorised (``lfilter``), since the curves are
    re-smoothed on the GUI thread several times a second.

    Args:
        values: the raw series.
        weight: smoothing in [0, 1); 0 returns the values unchanged.
    """
    v = np.asarray(values, dtype=np.float64)
    if weight <= 0.0 or v.size == 0:
        return v.copy()
    finite = np.isfinite(v)
    b, a = [1.0 - weight], [1.0, -weight]
    num = lfilter(b, a, np.where(finite, v, 0.0))
    den = lfilter(b, a, finite.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
