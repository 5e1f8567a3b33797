"""What the view thread computes from a model snapshot, apart from the density frames of the view process.

The transport stages of the plane's grid lines (:func:`compute_transport`), the bits/dim test of an image run
(:func:`evaluate_images`, the core's test in slices) and the 2-D histograms of the data and sample views
(:func:`histogram2d`). Each runs on a snapshot copy of the flow, never on the live trainer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from monoflow_core.evaluation_policy import image_test, prepare_for_test
from monoflow_core.flow import Flow
from monoflow_core.training import EvalMetrics
from monoflow_core.transport import grid_lines, transport_stages

from .session_options import SessionOptions

__all__ = ["SAMPLE_SEED", "compute_transport", "evaluate_images", "histogram2d"]

#: Seed of the base noise of the sample grids (fixed: successive grids show the same latent points).
SAMPLE_SEED = 0


def compute_transport(flow: Flow, direction: str, options: SessionOptions) -> tuple[list[np.ndarray], list[str]]:
    """The transport stages of the regular grid of ``options`` through ``flow`` (float32, chunked)."""
    lines = grid_lines(options.grid_extent, options.transport_lines, options.transport_points)
    flat = transport_stages(flow, lines.reshape(-1, 2), direction, dtype=torch.float32)
    names = [type(layer).__name__ for layer in flow.layers]
    if direction == "inverse":
        names.reverse()
    return [s.reshape(lines.shape) for s in flat], names


def evaluate_images(
    flow: Flow,
    images: torch.Tensor,
    *,
    step: int,
    seed: int,
    split: str,
    dequantization: str,
    dtype: torch.dtype = torch.float64,
    chunk: int = 8,
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int, int], None] | None = None,
) -> EvalMetrics | None:
    """Bits/dim of ``flow`` on ``images``: :meth:`Trainer.evaluate` of an image run, on a snapshot, off its thread.

    The core's test (:mod:`monoflow_core.evaluation_policy`: the snapshot prepared as every evaluation copy, then
    :func:`~monoflow_core.evaluation_policy.image_test`), with two differences that let it run in the view thread
    next to training: it never reseeds torch's global generator (``Trainer.evaluate`` forks and reseeds it, which
    would disturb the training thread's log-det estimator; with an exact evaluation log-det nothing here draws from
    it), and it proceeds in slices of ``chunk`` images so that it can be abandoned (``stop()``) and report
    ``progress(done, total)``; the dequantization noise does not depend on the slicing.

    Args:
        flow: a snapshot of the evaluation weights; it is converted in place (pass a copy).
        images: integer images (N, C, H, W), uint8.
        step: the step the snapshot was taken at.
        seed: the run's ``test_seed``.
        split: the split the images come from (for the result).
        dequantization: the model's dequantization (for the result).
        dtype: evaluation dtype.
        chunk: images per slice.
        stop: polled between slices; True abandons the test (returns ``None``).
        progress: called after every slice with (images done, total).
    """
    model = prepare_for_test(flow.to(dtype=dtype))
    return image_test(
        model,
        images,
        step=step,
        seed=seed,
        split=split,
        dequantization=dequantization,
        slice_size=chunk,
        stop=stop,
        progress=progress,
    )


def histogram2d(points: np.ndarray, extent: tuple[float, float, float, float], bins: int) -> np.ndarray:
    """Counts of ``points`` on a ``bins x bins`` grid over ``extent``, row-major with row 0 at ``ymin``."""
    xmin, xmax, ymin, ymax = extent
    pts = np.asarray(points, dtype=np.float64)
    # histogram2d's first axis follows its first coordinate: pass (y, x) so rows run over y.
    hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=bins, range=[[ymin, ymax], [xmin, xmax]])
    return hist
