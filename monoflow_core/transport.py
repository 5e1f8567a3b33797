"""Transport of space: how a 2-D flow deforms a regular grid, layer by layer.

:func:`grid_lines` draws a regular grid as polylines; :func:`transport_stages` pushes points through the flow one
layer at a time and returns every intermediate position, either data -> latent (each layer's ``forward``) or
latent -> data (each layer's ``inverse``, last layer first). Everything runs under ``torch.no_grad()`` with the
flow in eval mode, on a copy when another dtype is asked for (as in :mod:`monoflow_core.evaluation`); no Qt.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor

from .evaluation import _as_tensor, _check_chunk, _evaluating, _flow_dtype_device
from .flow import Flow
from .fused import fast_eligible, folded_runs, fused_inverse, run_fused

__all__ = ["DIRECTIONS", "grid_lines", "transport_stages"]

#: ``forward``: data -> latent (stage k = after layer k); ``inverse``: latent -> data (stage k = after undoing
#: the k last layers).
DIRECTIONS = ("forward", "inverse")


def grid_lines(extent: float = 4.0, n_lines: int = 17, points_per_line: int = 200) -> np.ndarray:
    """A regular grid on ``[-extent, extent]^2`` as polylines, float64 of shape (2 * n_lines, points_per_line, 2).

    Lines ``0 .. n_lines - 1`` are horizontal (constant ``y``, from ``ymin`` up), lines ``n_lines ..`` vertical
    (constant ``x``, from ``xmin`` right); each runs from ``-extent`` to ``extent`` in ``points_per_line`` points.
    """
    if not extent > 0:
        raise ValueError(f"extent: must be positive, got {extent!r}")
    for name, value in (("n_lines", n_lines), ("points_per_line", points_per_line)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"{name}: must be an integer >= 2, got {value!r}")
    levels = np.linspace(-extent, extent, n_lines)
    along = np.linspace(-extent, extent, points_per_line)
    lines = np.empty((2 * n_lines, points_per_line, 2), dtype=np.float64)
    lines[:n_lines, :, 0] = along[None, :]
    lines[:n_lines, :, 1] = levels[:, None]
    lines[n_lines:, :, 0] = levels[:, None]
    lines[n_lines:, :, 1] = along[None, :]
    return lines


def _forward_layer(layer: Any, x: Tensor, dim: int, fast: bool) -> Tensor:
    if fast and fast_eligible(layer, dim):
        return run_fused([layer], x)[0]  # the path Flow.forward takes for this block
    return layer(x)[0]


def _inverse_layer(layer: Any, y: Tensor, dim: int, fast: bool) -> Tensor:
    if fast and fast_eligible(layer, dim):
        return fused_inverse(layer, y)  # the path Flow.inverse takes for this block
    return layer.inverse(y)


def transport_stages(
    flow: Flow,
    points: Tensor | np.ndarray,
    direction: str = "forward",
    chunk: int = 10_000,
    dtype: torch.dtype | None = None,
) -> list[np.ndarray]:
    """Positions of ``points`` after each layer of ``flow``.

    Args:
        flow: a flow; its ``layers`` are applied one at a time.
        points: shape (N, *event_shape), e.g. :func:`grid_lines` reshaped to (-1, 2).
        direction: ``"forward"`` (data -> latent: stage k = after layer k, each layer's ``forward(x)[0]``) or
            ``"inverse"`` (latent -> data: stage k = after the inverses of the k last layers, last layer first).
        chunk: points per pass.
        dtype: evaluate in this dtype (``torch.float32`` or ``torch.float64``; on a copy if it differs from the
            flow's); ``None``: the flow's own.

    Returns:
        ``len(flow.layers) + 1`` float64 arrays of the shape of ``points``: stage 0 is the input, the last stage
        equals ``flow(points)[0]`` (forward) or ``flow.inverse(points)`` (inverse) up to solver tolerance.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: one of {DIRECTIONS}, got {direction!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: torch.float32, torch.float64 or None, got {dtype!r}")
    chunk = _check_chunk(chunk)
    with _evaluating(flow, dtype) as evaluated:
        model = cast(Flow, evaluated)  # ``flow`` itself or a copy of it in ``dtype``
        dt, dev = _flow_dtype_device(model)
        x = _as_tensor(points, dt, dev)
        model._check(x)
        order = list(model.layers)
        layers = order[::-1] if direction == "inverse" else order
        step = _forward_layer if direction == "forward" else _inverse_layer
        fast = bool(model.fast_path) and x.dim() == 2
        dim = model.dim
        stages = [x.detach().to(device="cpu", dtype=torch.float64).numpy().copy()]
        parts = [x[i : i + chunk] for i in range(0, x.shape[0], chunk)]
        with folded_runs(order, dim) if fast else contextlib.nullcontext():  # one fold per run
            for layer in layers:
                parts = [step(layer, part, dim, fast) for part in parts]
                out = torch.cat(parts) if parts else x[:0]
                stages.append(out.to(device="cpu", dtype=torch.float64).numpy().copy())
    return stages
