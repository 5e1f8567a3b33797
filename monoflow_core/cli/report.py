"""How results are written as text: test results, counts, dtypes and JSON values."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..data.points import POINTS_DATA


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _describe_test(ev: Any, data: str) -> str:
    if ev.bpd is not None:
        return f"{ev.describe()}; {ev.dtype}; {ev.seconds:.2f} s"
    points = f"{_fmt_int(ev.n_test)} {'held-out' if data == POINTS_DATA else f'fixed {data}'} points"
    if ev.nll_nats is not None:
        err = f" +- {ev.nll_stderr_nats:.4f}" if ev.nll_stderr_nats is not None else ""
        logdet = "exact log-det" if ev.exact else "estimated log-det (unbiased, stochastic)"
        return f"test NLL {ev.nll_nats:.4f}{err} nats ({points}, {logdet}, {ev.dtype}; {ev.seconds:.2f} s)"
    return f"test MSE {ev.mse:.4g} ({points}, {ev.dtype}; {ev.seconds:.2f} s)"
