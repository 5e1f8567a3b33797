"""What a training session computes for the views (:class:`SessionOptions`) and the states it reports.

Plain settings and names with no behaviour, in a module of their own so that the window, the compare mode and
the worker share them without importing each other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["BUILDING", "PAUSED", "STOPPED", "TRAINING", "SessionOptions"]

#: States reported through :attr:`Session.state_changed`.
BUILDING, PAUSED, TRAINING, STOPPED = "building", "paused", "training", "stopped"


@dataclass(frozen=True)
class SessionOptions:
    """How much the worker computes for the views, and how often.

    Attributes:
        grid_resolution: points per axis of the live density grid.
        first_frame_resolution: points per axis of the grid of a run's first frame, of the first frame after
            Train, and of every frame while the view process is starting (when below ``grid_resolution``): a tenth
            of the points, so that frame comes at once, wherever it is computed; a full frame follows as soon as it
            is on screen and the view process is ready (``benchmarks/studio_first_frame.py``).
        grid_extent: half-width of the grid (the toy data lie in about [-4, 4]^2).
        frame_min_interval_s: shortest time between the starts of two heavy frames while training.
        early_frame_interval_s: the same during a run's first ``early_frames_s`` seconds of training, when the
            density changes fastest (a quick preset reaches its target within a few seconds): the picture and its
            test NLL follow the model closely there, and the frame budgets below still pace the frames.
        early_frames_s: seconds of training (summed over the run's steps, pauses excluded) during which frames come
            every ``early_frame_interval_s``.
        frame_budget: largest fraction of one core's time spent on heavy frames in the view process (the period
            is at least ``frame_seconds / frame_budget``). The default 1.0 (two or more cores; 0.25 on one)
            computes continuously on the second core: the process costs training only what the two share (caches,
            memory bandwidth).
        thread_frame_budget: the same when the view thread computes the frames (no view process): there they also
            compete with training for the GIL, so the default is 0.5 (two or more cores; 0.25 on one).
        n_samples: model samples per frame (inverse pass).
        eval_points: points of the fixed held-out set for the test NLL of each frame.
        data_points: data points sent once per run for the overlay.
        hist_bins: bins per axis of the sample and data histograms.
        metrics_interval_s: step metrics are batched and sent at most this often.
        transport_lines: grid lines per direction of the transport view (horizontal and vertical).
        transport_points: points per grid line of the transport view.
        image_samples: images per sample grid of an image run (changed live by :meth:`Session.set_samples`).
        sample_temperature: scale of the base noise of those samples (below 1: smoother, more typical images).
        image_frame_min_steps: image runs: training steps between two sample grids (the grid also waits at least
            ``frame_min_interval_s``; whichever is later).
        default_eval_every: image runs whose ``eval_every`` is 0: a bits/dim test every this many steps.
        eval_chunk: images per slice of a test (sample frames are computed between slices).
        view_process: compute the 2-D density frames (grid, held-out NLL, samples) in a separate process
            (:mod:`monoflow_studio.view_process`): it shares no GIL with training, so it can use small passes that
            disturb training less. If the process cannot start or dies, the view thread computes them instead.
        grid_chunk: points per pass of the live grid and the held-out points (which go through the flow together)
            in the view process. Small passes keep the view's buffers out of the caches training uses.
        thread_grid_chunk: the same, when the view thread computes the frames. There every operator must take the
            GIL back from the training thread, so few, large passes: one for a 200 x 200 grid and the test points
            (``benchmarks/studio_responsiveness.py``).
        data_images: training images sent once per image run for the data grid.
    """

    grid_resolution: int = 200
    first_frame_resolution: int = 64
    grid_extent: float = 4.0
    frame_min_interval_s: float = 1.5
    early_frame_interval_s: float = 0.4
    early_frames_s: float = 10.0
    frame_budget: float = 1.0 if (os.cpu_count() or 1) >= 2 else 0.25
    thread_frame_budget: float = 0.5 if (os.cpu_count() or 1) >= 2 else 0.25
    n_samples: int = 3000
    eval_points: int = 2000
    data_points: int = 1000
    hist_bins: int = 100
    metrics_interval_s: float = 0.05
    transport_lines: int = 17
    transport_points: int = 120
    image_samples: int = 64
    sample_temperature: float = 1.0
    image_frame_min_steps: int = 5
    default_eval_every: int = 100
    eval_chunk: int = 8
    view_process: bool = True
    grid_chunk: int = 5_000
    thread_grid_chunk: int = 45_000
    data_images: int = 144
