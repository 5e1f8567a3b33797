"""The messages the session sends to the window: a new run's description and the frames of its views.

Plain data (numpy arrays, core metrics, dataclasses) with no behaviour, in a module of their own so that the views
import what they draw without importing the session's threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monoflow_core.training import EvalMetrics, StepMetrics

from .run_spec import RunSpec

__all__ = ["ImageFrame", "RunInfo", "TransportFrame", "ViewFrame"]


@dataclass
class RunInfo:
    """Sent when a run is (re)built or opened from a checkpoint.

    Attributes:
        run_id: increases with every new run (curves of earlier runs are kept for comparison).
        spec: the run's configuration.
        step: iterations completed (non-zero for a checkpoint).
        device: the torch device the run trains on.
        data_points: a sample of the data set, shape (n, 2), for the overlay (empty for image runs).
        data_hist: a 2-D histogram of a large data sample (row-major, row 0 = ymin), for the data view (zeros for
            image runs).
        history: step metrics already recorded (from a checkpoint).
        eval_history: tests already recorded (from a checkpoint).
        source: ``"new"`` or the checkpoint path.
        task: ``"density"`` (2-D) or ``"image"``.
        data_images: image runs: the first training images as integer levels (n, C, H, W), for the data grid.
        levels: image runs: pixel levels K of the data (e.g. 17 for digits), else 0.
        eval_every: image runs: steps between two tests (the run's ``eval_every``, or the studio's default).
    """

    run_id: int
    spec: RunSpec
    step: int
    device: str
    data_points: np.ndarray
    data_hist: np.ndarray
    history: list[StepMetrics] = field(default_factory=list)
    eval_history: list[EvalMetrics] = field(default_factory=list)
    source: str = "new"
    task: str = "density"
    data_images: np.ndarray | None = None
    levels: int = 0
    eval_every: int = 0


@dataclass
class ViewFrame:
    """One refresh of the heavy views, computed in the worker.

    Attributes:
        run_id: the run it belongs to.
        step: iterations completed when it was computed.
        log_density: ``log p`` on the grid in nats, float64 (res, res), row-major, row 0 = ``ymin``.
        extent: ``(xmin, xmax, ymin, ymax)`` of the grid.
        samples: model samples, shape (n, 2).
        sample_hist: 2-D histogram of the samples on the same extent (row-major, row 0 = ymin).
        diagnostics: :func:`monoflow_core.evaluation.solver_diagnostics` of the latest *training* step.
        eval: the test NLL (nats) of the snapshot on a fixed held-out set (``eval_points`` points drawn with the
            run's ``test_seed``), or ``None``.
        seconds: time the worker spent on this frame.
        process_seconds: the part of ``seconds`` spent waiting for the view process (0: computed in the view
            thread).
        dtype: the dtype that computed the density, the samples and the test (the views show it).
    """

    run_id: int
    step: int
    log_density: np.ndarray
    extent: tuple[float, float, float, float]
    samples: np.ndarray
    sample_hist: np.ndarray
    diagnostics: list[dict[str, Any]]
    eval: EvalMetrics | None
    seconds: float
    process_seconds: float = 0.0
    dtype: str = "float32"

    @property
    def computed_in_process(self) -> bool:
        """Whether the view process computed the density (else the view thread did)."""
        return self.process_seconds > 0


@dataclass
class ImageFrame:
    """A grid of model samples of an image run, computed in the view thread.

    Attributes:
        run_id: the run it belongs to.
        step: iterations completed when it was computed.
        images: the samples as integer levels in [0, levels - 1], shape (n, C, H, W).
        grid: the samples tiled into one RGB picture, ``uint8`` (rows, cols, 3) (:func:`evaluation.image_grid`).
        levels: pixel levels K.
        temperature: scale of the base noise.
        seed: seed of the base noise (the same every frame, so the samples change only as the model learns).
        diagnostics: :func:`monoflow_core.evaluation.solver_diagnostics` of the latest *training* step.
        seconds: time the view thread spent on it.
        dtype: the dtype the samples were drawn in.
    """

    run_id: int
    step: int
    images: np.ndarray
    grid: np.ndarray
    levels: int
    temperature: float
    seed: int
    diagnostics: list[dict[str, Any]]
    seconds: float
    dtype: str = "float32"


@dataclass
class TransportFrame:
    """The grid of the transport view after every layer, computed in the view thread.

    Attributes:
        run_id: the run it belongs to.
        step: iterations completed when it was computed.
        direction: ``"forward"`` (data -> latent) or ``"inverse"`` (latent -> data).
        stages: ``len(flow.layers) + 1`` float64 arrays (lines, points, 2): stage 0 is the regular grid, stage k
            the grid after layer k (forward) or after undoing the k last layers (inverse).
        layer_names: class name of each layer in the order applied.
        extent: half-width of the regular grid.
        seconds: time the view thread spent on it.
    """

    run_id: int
    step: int
    direction: str
    stages: list[np.ndarray]
    layer_names: list[str]
    extent: float
    seconds: float
