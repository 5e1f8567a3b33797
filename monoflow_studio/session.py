"""The training session: a worker thread that owns the core :class:`~monoflow_core.training.Trainer`.

Threading contract (docs/studio.md):

* the worker thread is the only thread that touches the trainer and its flow: it builds it, runs
  :meth:`Trainer.step`, evaluates it and saves it;
* the GUI thread only *posts commands* (plain callables put on a thread-safe queue, applied between two steps)
  and *receives signals* carrying plain data (``StepMetrics`` lists, numpy arrays, dicts);
* the worker never touches a widget.

Heavy views (density grid, samples, test NLL) are computed by a second background thread, the *view thread*, on
a snapshot copy of the flow taken between two steps, so that on a machine with two or more cores training and
views proceed in parallel. The 2-D density frames themselves go from the view thread to a separate process
(:mod:`monoflow_studio.view_process`), which shares no GIL with training; if that process is unavailable, the
view thread computes them (the GIL is mostly released inside torch's batched operations). Frames are throttled:
at most one every ``frame_min_interval_s`` seconds, at most ``frame_budget`` of one core's time
(``thread_frame_budget`` when the view thread computes), and a new frame is only started once the GUI has shown
the previous one, so a slow view never piles up work or slows training more than needed.

Image runs (:attr:`RunSpec.task` ``"image"``) show a grid of model samples (:class:`ImageFrame`, at most every
``image_frame_min_steps`` steps and ``frame_min_interval_s`` seconds, whichever is later) and are tested in
bits/dim every ``eval_every`` steps (``default_eval_every`` when the run sets 0) on a snapshot, in the view thread:
a test of a big model takes minutes, so it proceeds in slices of ``eval_chunk`` images between which sample
frames still come, one test at a time (a test falling due while one runs waits for it), and a new run abandons
the test of the old one. The result (:class:`~monoflow_core.training.EvalMetrics` with ``bpd``) is recorded in the
trainer's ``eval_history`` by the worker, so checkpoints carry it.
"""

from __future__ import annotations

import copy
import math
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PySide6.QtCore import QObject, QThread, Signal

from monoflow_core import evaluation
from monoflow_core.checkpoint import CheckpointError, load_checkpoint
from monoflow_core.data import POINTS_DATA, sample_toy
from monoflow_core.data.points import PointSet
from monoflow_core.evaluation_policy import image_test, prepare_for_test
from monoflow_core.flow import Flow
from monoflow_core.training import (
    EvalMetrics,
    StepMetrics,
    Trainer,
    TrainingError,
)
from monoflow_core.transport import DIRECTIONS, grid_lines, transport_stages

from .fair_share import FairShare
from .frames import ImageFrame, RunInfo, TransportFrame, ViewFrame
from .run_spec import RunSpec
from .view_process import (
    VIEW_DTYPE,
    DensityResult,
    ViewComputeError,
    ViewProcess,
    ViewProcessError,
    compute_density,
    flow_message,
)

__all__ = ["ImageFrame", "RunInfo", "Session", "SessionOptions", "TransportFrame", "ViewFrame", "evaluate_images"]

#: Frames in a row the view process may fail to compute (each is then computed in the view thread) before the
#: studio stops using it.
PROCESS_FAILURES_TOLERATED = 3
#: States reported through :attr:`Session.state_changed`.
BUILDING, PAUSED, TRAINING, STOPPED = "building", "paused", "training", "stopped"


@dataclass(frozen=True)
class SessionOptions:
    """How much the worker computes for the views, and how often.

    Attributes:
        grid_resolution: points per axis of the live density grid.
        grid_extent: half-width of the grid (the toy data lie in about [-4, 4]^2).
        frame_min_interval_s: shortest time between the starts of two heavy frames while training.
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
    grid_extent: float = 4.0
    frame_min_interval_s: float = 1.5
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


def compute_transport(flow: Flow, direction: str, options: SessionOptions) -> tuple[list[np.ndarray], list[str]]:
    """The transport stages of the regular grid of ``options`` through ``flow`` (float32, chunked)."""
    lines = grid_lines(options.grid_extent, options.transport_lines, options.transport_points)
    flat = transport_stages(flow, lines.reshape(-1, 2), direction, dtype=torch.float32)
    names = [type(layer).__name__ for layer in flow.layers]
    if direction == "inverse":
        names.reverse()
    return [s.reshape(lines.shape) for s in flat], names


#: Seed of the base noise of the sample grids (fixed: successive grids show the same latent points).
SAMPLE_SEED = 0


def evaluation_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype :meth:`Trainer.evaluate` tests in by default (the core decides: float64 on CPU for vectors,
    the training dtype for images and on GPUs)."""
    return trainer.evaluation_dtype()


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


def _points_info(points: PointSet, run_id: int, opts: SessionOptions, seed: int, common: dict[str, Any]) -> RunInfo:
    """The description of a run on a user's points: a seeded subsample of the training part for the overlay, and
    the histogram of the whole training part (the held-out points are never shown as training data)."""
    extent = (-opts.grid_extent, opts.grid_extent, -opts.grid_extent, opts.grid_extent)
    train = points.train.numpy()
    shown = train
    if train.shape[0] > opts.data_points:
        shown = train[np.random.default_rng(seed + 7).choice(train.shape[0], opts.data_points, replace=False)]
    return RunInfo(
        run_id=run_id, data_points=shown.copy(), data_hist=histogram2d(train, extent, opts.hist_bins), **common
    )


def histogram2d(points: np.ndarray, extent: tuple[float, float, float, float], bins: int) -> np.ndarray:
    """Counts of ``points`` on a ``bins x bins`` grid over ``extent``, row-major with row 0 at ``ymin``."""
    xmin, xmax, ymin, ymax = extent
    pts = np.asarray(points, dtype=np.float64)
    # histogram2d's first axis follows its first coordinate: pass (y, x) so rows run over y.
    hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=bins, range=[[ymin, ymax], [xmin, xmax]])
    return hist


class _Worker(QObject):
    """Runs in the worker thread (:meth:`loop`); every other method is called from that thread only."""

    built = Signal(object)  # RunInfo
    build_failed = Signal(str)  # why; the previous run (if any) is kept
    metrics = Signal(object)  # list[StepMetrics]
    frame = Signal(object)  # ViewFrame (2-D runs) or ImageFrame (image runs)
    transport = Signal(object)  # TransportFrame
    evaluated = Signal(int, object)  # run id, EvalMetrics of a bits/dim test (image runs)
    eval_progress = Signal(int, int, int, int)  # run id, step tested, images done, images in the test
    state_changed = Signal(str)
    message = Signal(str, str)  # level ("info" | "warning" | "error"), text
    checkpoint_saved = Signal(str)
    lr_applied = Signal(float)
    finished = Signal()

    def __init__(self, spec: RunSpec, options: SessionOptions, gate: FairShare | None = None) -> None:
        super().__init__()
        self.options = options
        self.trainer: Trainer | None = None
        # Compare mode: the training steps of several sessions take turns through this gate (fair_share.py).
        self._gate = gate
        if gate is not None:
            gate.join(self, lambda: self._running and not self._stop.is_set())
        self._initial_spec = spec
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._stop = threading.Event()
        self._frame_consumed = threading.Event()
        self._frame_consumed.set()
        self._running = False
        self._run_id = 0
        self._pending: list[StepMetrics] = []
        self._last_flush = 0.0
        self._next_frame = 0.0
        self._frame_due = False
        self._state = ""
        self._test_points = torch.zeros(0, 2, dtype=torch.float64)
        self._transport: str | None = None  # the transport view's direction while it is visible, else None
        self.transport_generation = 0  # on-demand transport jobs older than this are skipped
        # Image runs: the sample grid's settings, the test schedule, and the one test in flight.
        self._sample_n = options.image_samples
        self._sample_temperature = options.sample_temperature
        self._next_frame_step = 0
        self._eval_unavailable = False  # the split could not be loaded: no tests for this run
        self._eval_due = False
        self._eval_running = False
        self.eval_generation = 0  # tests of older runs are abandoned by the view thread
        self.views = _ViewThread(self)

    # -- called from the GUI thread (thread-safe) ------------------------------------------------------------
    def post(self, command: Callable[[], None]) -> None:
        self._commands.put(command)

    def request_stop(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake a paused worker blocked on the queue

    def frame_consumed(self) -> None:
        self._frame_consumed.set()

    # -- the loop ----------------------------------------------------------------------------------------
    def loop(self) -> None:
        """The thread's body: build the first run, then train / apply commands until asked to stop."""
        try:
            self._guard(lambda: self.build(self._initial_spec))
            while not self._stop.is_set():
                self._drain(block=not self._running and not (self._frame_due and self._frame_consumed.is_set()))
                if self._stop.is_set():
                    break
                self._maybe_eval()  # a test that waited for the previous one snapshots before the next step
                if self._running and self.trainer is not None:
                    self._guard(self._train_one)
                self._flush(force=not self._running)
                self._maybe_frame()
                self._maybe_eval()
        finally:
            if self._gate is not None:
                self._gate.leave(self)
            self._flush(force=True)
            self._set_state(STOPPED)
            self.finished.emit()

    def _drain(self, block: bool) -> None:
        """Apply the waiting commands; with ``block``, first wait up to 0.1 s for one (an idle, paused worker)."""
        while not self._stop.is_set():
            try:
                command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
            except queue.Empty:
                return
            self._guard(command)
            block = False  # after one command, apply the rest that are waiting, then go on

    def _guard(self, fn: Callable[[], Any]) -> None:
        """Run ``fn``; any error becomes a message and pauses training (the worker never dies)."""
        try:
            fn()
        except TrainingError as err:
            self._running = False
            self.message.emit("error", f"training stopped: {err}")
            self._set_state(PAUSED)
        except Exception as err:  # the session must survive anything the model or a file throws
            self._running = False
            self.message.emit("error", f"{type(err).__name__}: {err}")
            self.message.emit("debug", traceback.format_exc())
            self._set_state(PAUSED)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.state_changed.emit(state)

    # -- commands (worker thread) ------------------------------------------------------------------------
    @property
    def is_image(self) -> bool:
        return self.trainer is not None and self.trainer.task == "image"

    def build(self, spec: RunSpec) -> None:
        """Build a fresh trainer for ``spec``; if that fails (e.g. an image set's files cannot be read), say why
        through :attr:`build_failed` and keep the old run."""
        self._set_state(BUILDING)
        try:
            spec.check_studio()
            points = spec.points if spec.training.data == POINTS_DATA else None
            trainer = Trainer(spec.model.replace(), spec.training.replace(), points=points)
        except Exception as err:  # any failure of the model or the data: the session and the old run go on
            self._running = False
            kept = "; the current run is kept" if self.trainer is not None else ""
            self.build_failed.emit(f"could not build {spec.name} on {spec.training.data}: {err}{kept}")
            self.message.emit("debug", traceback.format_exc())
            self._set_state(PAUSED)
            return
        self._install(trainer, spec, source="new")

    def open_checkpoint(self, path: str) -> None:
        """Replace the run by a checkpoint's; on any error the current run is untouched."""
        was = self._state
        try:
            ckpt = load_checkpoint(path)
            if ckpt.train_config is not None and ckpt.trainer_state is not None:
                trainer = Trainer.from_checkpoint(ckpt)
            else:
                # A flow-only checkpoint: inspect it and train it on as a new run on the current data set.
                # Its data set: the header's (a shipped example records it under "user"), else the current run's.
                user = ckpt.metadata.get("user")
                stored = user.get("data") if isinstance(user, dict) else None
                data = ckpt.metadata.get("data") or stored or (self.trainer.train_config.data if self.trainer else None)
                tc = self._initial_spec.training.replace(**({"data": data} if data else {}))
                current = self.trainer.points if self.trainer is not None else None
                trainer = Trainer(
                    ckpt.model_config, tc, flow=ckpt.flow, points=current if tc.data == POINTS_DATA else None
                )
            spec = RunSpec(
                trainer.model_config.replace(),
                trainer.train_config.replace(),
                name=Path(path).name,
                points=trainer.points,
            )
            spec.check_studio()
        except (CheckpointError, ValueError) as err:
            self.message.emit("error", f"could not open checkpoint: {err}")
            self._set_state(was or PAUSED)
            return
        self._running = False
        self._install(trainer, spec, source=str(path))
        self.message.emit("info", f"opened checkpoint {path} at step {trainer.step_count}")

    def _install(self, trainer: Trainer, spec: RunSpec, source: str) -> None:
        self._flush(force=True)
        opts = self.options
        data = spec.training.data
        common = {
            "spec": spec,
            "step": trainer.step_count,
            "device": str(trainer.device),
            "history": list(trainer.history),
            "eval_history": list(trainer.eval_history),
            "source": source,
        }
        if trainer.task == "image":
            cfg = trainer.train_config
            train = trainer.training_images
            assert train is not None  # an image run's trainer holds its training set
            info = RunInfo(
                run_id=self._run_id + 1,
                data_points=np.zeros((0, 2)),
                data_hist=np.zeros((opts.hist_bins, opts.hist_bins)),
                task="image",
                data_images=train.images[: opts.data_images].numpy().copy(),
                levels=int(train.levels),
                eval_every=cfg.eval_every or opts.default_eval_every,
                **common,
            )
            self._test_points = torch.zeros(0, 2, dtype=torch.float64)
        elif trainer.points is not None:
            info = _points_info(trainer.points, self._run_id + 1, opts, spec.training.seed, common)
            self._test_points = trainer.points.test[: opts.eval_points]
        else:
            extent = (-opts.grid_extent, opts.grid_extent, -opts.grid_extent, opts.grid_extent)
            points = sample_toy(data, opts.data_points, rng=spec.training.seed + 7, dtype=torch.float64).numpy()
            big = sample_toy(data, 50_000, rng=spec.training.seed + 11, dtype=torch.float64).numpy()
            info = RunInfo(
                run_id=self._run_id + 1,
                data_points=points,
                data_hist=histogram2d(big, extent, opts.hist_bins),
                **common,
            )
            self._test_points = sample_toy(data, opts.eval_points, rng=spec.training.test_seed, dtype=torch.float64)
        self.trainer = trainer
        self._run_id += 1
        self._pending.clear()
        self._eval_unavailable = False
        self._eval_due = False
        self._eval_running = False
        self.eval_generation += 1  # a test of the previous run still in the view thread is abandoned
        self._next_frame_step = trainer.step_count
        self.built.emit(info)
        self.message.emit("info", trainer.precision.describe())  # how G is computed on this device (docs/precision.md)
        self._frame_consumed.set()
        self._submit_frame()  # the untrained model's picture, computed by the view thread
        self._set_state(TRAINING if self._running else PAUSED)

    def start(self) -> None:
        if self.trainer is None:
            return
        self._running = True
        self._next_frame = time.perf_counter() + self.options.frame_min_interval_s
        self._set_state(TRAINING)

    def pause(self) -> None:
        if self._running:
            self._running = False
            self._flush(force=True)
            self._frame_due = True  # show the model as it is now
        self._set_state(PAUSED)

    def step_once(self) -> None:
        self._running = False
        if self.trainer is not None:
            self._train_one()
            self._flush(force=True)
            self._frame_due = True
        self._set_state(PAUSED)

    def reset(self, spec: RunSpec, keep_running: bool) -> None:
        self._running = False
        self.build(spec)
        if keep_running:
            self.start()

    def set_lr(self, lr: float) -> None:
        if self.trainer is not None:
            self.trainer.set_lr(lr)
            self.lr_applied.emit(self.trainer.current_lr)

    def set_solver(self, tol: float | None, max_iter: int | None, solver: str | None) -> None:
        if self.trainer is not None:
            self.trainer.set_solver(tol=tol, max_iter=max_iter, solver=solver)

    def set_transport(self, direction: str | None) -> None:
        """The transport view is visible with ``direction`` (or hidden: ``None``); a new direction is computed now.

        Image runs have no transport view: the direction is remembered for the next 2-D run.
        """
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"transport direction: one of {DIRECTIONS}, got {direction!r}")
        changed = direction is not None and direction != self._transport
        self._transport = direction
        if changed and self.trainer is not None and not self.is_image:
            # On demand, on a snapshot (cheap), next to the frames: the view thread computes only the transport.
            self.transport_generation += 1
            with torch.no_grad():
                snapshot = copy.deepcopy(self.trainer.eval_flow)
            self.views.submit(
                _FrameJob(
                    self._run_id,
                    self.trainer.step_count,
                    snapshot,
                    [],
                    self._test_points,
                    transport=direction,
                    transport_only=True,
                    generation=self.transport_generation,
                )
            )

    def set_samples(self, n: int | None, temperature: float | None) -> None:
        """Image runs: images per sample grid and the temperature of their base noise; a new grid comes at once."""
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"samples: must be an integer >= 1, got {n!r}")
            self._sample_n = n
        if temperature is not None:
            if not math.isfinite(temperature) or temperature <= 0:
                raise ValueError(f"temperature: must be > 0, got {temperature!r}")
            self._sample_temperature = float(temperature)
        if self.is_image:
            self._frame_due = True

    def set_evaluation(self, eval_every: int | None, eval_size: int | None) -> None:
        """Image runs: steps between two tests (0: the studio's default) and images per test, from the next test."""
        trainer = self.trainer
        if trainer is None:
            return
        changes = {k: v for k, v in (("eval_every", eval_every), ("eval_size", eval_size)) if v is not None}
        trainer.train_config = trainer.train_config.replace(**changes)  # validated by the core

    def evaluate_now(self) -> None:
        """Image runs: a bits/dim test of the model as it is now (after the one in flight, if any)."""
        if not self.is_image:
            self.message.emit("info", "2-D runs are tested with every view frame (test NLL); nothing to start")
            return
        if self._eval_unavailable:
            self.message.emit("warning", "this run cannot be tested: its evaluation images could not be loaded")
            return
        if self._eval_running:
            self.message.emit("info", "a test is running; another one follows it")
        self._eval_due = True

    def save_checkpoint(self, path: str) -> None:
        if self.trainer is None:
            return
        try:
            saved = self.trainer.save_checkpoint(path, metadata={"written_by": "monoflow-studio"})
        except (CheckpointError, OSError) as err:
            self.message.emit("error", f"could not export checkpoint: {err}")
            return
        self.checkpoint_saved.emit(str(saved))

    # -- training and frames -----------------------------------------------------------------------------
    def _train_one(self) -> None:
        trainer = self.trainer
        assert trainer is not None
        gate = self._gate
        if gate is None or not self._running:  # (a single Step of a paused run waits for no turn)
            metrics = trainer.step()
        else:
            if not gate.acquire(self, lambda: not self._stop.is_set()):
                return  # the session stops
            t0 = time.perf_counter()
            try:
                metrics = trainer.step()
            finally:
                gate.release(self, time.perf_counter() - t0)
        self._pending.append(metrics)
        if trainer.task == "image" and trainer.step_count % self._eval_every(trainer) == 0:
            self._eval_due = True
        if self._running and trainer.step_count >= trainer.train_config.iterations:
            self._running = False
            self._flush(force=True)
            self._frame_due = True
            self.message.emit("info", f"reached the run's {trainer.train_config.iterations} iterations; paused")
            self._set_state(PAUSED)

    def _flush(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self._pending and (force or now - self._last_flush >= self.options.metrics_interval_s):
            batch, self._pending = self._pending, []
            self.metrics.emit(batch)
            self._last_flush = now

    def _maybe_frame(self) -> None:
        trainer = self.trainer
        if trainer is None or not self._frame_consumed.is_set():
            return
        due = self._running and time.perf_counter() >= self._next_frame
        if due and trainer.task == "image":
            due = trainer.step_count >= self._next_frame_step  # N steps or T seconds, whichever is later
        if self._frame_due or due:
            self._frame_due = False
            self._guard(self._submit_frame)

    def _submit_frame(self) -> None:
        """Hand a snapshot of the model to the view thread (cheap: a deep copy of a small flow)."""
        trainer = self.trainer
        assert trainer is not None
        # Diagnostics here: they describe the latest *training* step's solves on the live flow.
        diagnostics = evaluation.solver_diagnostics(trainer.flow) if trainer.step_count > 0 else []
        with torch.no_grad():
            snapshot = copy.deepcopy(trainer.eval_flow)
        self._frame_consumed.clear()
        self._next_frame = time.perf_counter() + self.options.frame_min_interval_s
        if trainer.task == "image":
            self._next_frame_step = trainer.step_count + self.options.image_frame_min_steps
            self.views.submit(
                _FrameJob(
                    self._run_id,
                    trainer.step_count,
                    snapshot,
                    diagnostics,
                    self._test_points,
                    image=True,
                    n_samples=self._sample_n,
                    temperature=self._sample_temperature,
                    levels=int(trainer.flow.levels),
                )
            )
            return
        self.transport_generation += 1  # this frame brings the transport too: pending on-demand jobs are stale
        self.views.submit(
            _FrameJob(
                self._run_id,
                trainer.step_count,
                snapshot,
                diagnostics,
                self._test_points,
                transport=self._transport,
                generation=self.transport_generation,
            )
        )

    # -- tests of image runs -----------------------------------------------------------------------------
    def _eval_every(self, trainer: Trainer) -> int:
        return trainer.train_config.eval_every or self.options.default_eval_every

    def _maybe_eval(self) -> None:
        if self._eval_due and not self._eval_running and self.is_image:
            self._eval_due = False
            if not self._eval_unavailable:  # said once, when the split failed to load
                self._guard(self._submit_eval)

    def _submit_eval(self) -> None:
        """Hand a snapshot and the evaluation images to the view thread (the test runs there, in slices)."""
        trainer = self.trainer
        assert trainer is not None
        cfg = trainer.train_config
        try:
            images = trainer.evaluation_images().images  # loaded once per run by the trainer
        except (ValueError, OSError) as err:  # e.g. a missing test file of an image set on disk
            self._eval_unavailable = True
            self.message.emit("error", f"no tests for this run: the {cfg.eval_split} images could not be loaded: {err}")
            return
        with torch.no_grad():
            snapshot = copy.deepcopy(trainer.eval_flow)
        self._eval_running = True
        self.views.submit(
            _EvalJob(
                run_id=self._run_id,
                step=trainer.step_count,
                flow=snapshot,
                images=images[: cfg.eval_size],
                seed=cfg.test_seed,
                split=cfg.eval_split,
                dtype=evaluation_dtype(trainer),
                dequantization=str(getattr(trainer.model_config, "dequantization", "uniform")),
                generation=self.eval_generation,
            )
        )

    def eval_finished(self, generation: int, result: EvalMetrics | None, error: str | None) -> None:
        """Posted by the view thread when a test ends: record it in the trainer's history and announce it."""
        if generation != self.eval_generation or self.trainer is None:
            return  # a test of an earlier run
        self._eval_running = False
        if result is not None:
            self.trainer.eval_history.append(result)
            self.evaluated.emit(self._run_id, result)
        elif error is not None:
            self.message.emit("error", f"test failed: {error}")

    def frame_done(self, process_seconds: float, thread_seconds: float) -> None:
        """Called by the view thread after a frame: pace the next one by the frame budgets.

        The idle time after a frame is ``s (1 / budget - 1)`` for each part: the seconds spent waiting for the view
        process with ``frame_budget``, those computed in the view thread next to training with
        ``thread_frame_budget``.
        """
        opts = self.options
        idle = process_seconds * (1.0 / opts.frame_budget - 1.0) + thread_seconds * (
            1.0 / opts.thread_frame_budget - 1.0
        )
        self._next_frame = max(self._next_frame, time.perf_counter() + idle)


@dataclass
class _FrameJob:
    run_id: int
    step: int
    flow: Flow
    diagnostics: list[dict[str, Any]]
    test_points: torch.Tensor
    transport: str | None = None  # also compute the transport stages in this direction
    transport_only: bool = False  # an on-demand transport job (no density frame)
    generation: int = 0
    image: bool = False  # an image run's sample grid (no density, no transport)
    n_samples: int = 0
    temperature: float = 1.0
    levels: int = 0


@dataclass
class _EvalJob:
    """A bits/dim test of an image run's snapshot (see :func:`evaluate_images`)."""

    run_id: int
    step: int
    flow: Flow
    images: torch.Tensor
    seed: int
    split: str
    dtype: torch.dtype
    dequantization: str
    generation: int


class _ViewThread(QThread):
    """Computes heavy frames from model snapshots, one at a time, next to the training thread.

    A test (:class:`_EvalJob`) is long: it runs in slices, and frames that arrive meanwhile are computed between
    two slices, so the sample grid stays live during a test.
    """

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self._worker = worker
        self._jobs: queue.Queue[_FrameJob | _EvalJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._process: ViewProcess | None = ViewProcess() if worker.options.view_process else None
        self._process_failures = 0  # frames in a row the view process failed to compute

    def submit(self, job: _FrameJob | _EvalJob) -> None:
        self._jobs.put(job)

    def request_stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)

    def run(self) -> None:
        try:
            self._start_process()
            while not self._stop.is_set():
                job = self._jobs.get()
                if job is None:
                    return
                if isinstance(job, _EvalJob):
                    self._evaluate(job)
                    continue
                self._frame_job(job)
        finally:
            if self._process is not None:
                self._process.close()

    def _start_process(self) -> None:
        """Start the view process now: its imports take seconds (frames are computed here until it is ready)."""
        if self._process is None:
            return
        try:
            self._process.start()
        except ViewProcessError as err:
            self._drop_process(err)

    def _drop_process(self, err: Exception) -> None:
        """Stop using the view process (it failed): close it and say so; frames are computed in this thread."""
        if self._process is not None:
            self._process.close()
            self._process = None
        self._worker.message.emit("warning", f"views are computed in the studio's own process from now on ({err})")

    def _between_slices(self, job: _EvalJob) -> bool:
        """Between two slices of a test: compute any frame that is waiting; True abandons the test."""
        while not self._stop.is_set():
            try:
                waiting = self._jobs.get_nowait()
            except queue.Empty:
                break
            if waiting is None:
                self._stop.set()
                break
            if isinstance(waiting, _EvalJob):  # a newer run's test: it replaces this one
                self._jobs.put(waiting)
                return True
            self._frame_job(waiting)
        return self._stop.is_set() or job.generation != self._worker.eval_generation

    def _evaluate(self, job: _EvalJob) -> None:
        worker = self._worker
        if job.generation != worker.eval_generation:
            return
        try:
            result = evaluate_images(
                job.flow,
                job.images,
                step=job.step,
                seed=job.seed,
                split=job.split,
                dequantization=job.dequantization,
                dtype=job.dtype,
                chunk=worker.options.eval_chunk,
                stop=lambda: self._between_slices(job),
                progress=lambda done, total: worker.eval_progress.emit(job.run_id, job.step, done, total),
            )
        except Exception as err:  # reported; training and the views go on
            message = f"{type(err).__name__}: {err}"
            worker.post(lambda: worker.eval_finished(job.generation, None, message))
            return
        if result is None:  # abandoned: a new run, or the session stops
            return
        worker.post(lambda: worker.eval_finished(job.generation, result, None))

    def _frame_job(self, job: _FrameJob) -> None:
        t0 = time.perf_counter()
        if job.transport_only:
            self._transport_job(job)
            return
        try:
            frame = self._compute_images(job) if job.image else self._compute(job)
        except Exception as err:  # a failed frame is reported; training and later frames go on
            self._worker.message.emit("error", f"view update failed: {type(err).__name__}: {err}")
            self._worker.frame_consumed()
            return
        if frame is None:  # stopped midway
            return
        if job.transport is not None:
            self._transport_job(job)
        # Pace the next frame before this one reaches the GUI (which may ask for the next one at once): the part
        # computed in the view process by its budget, the rest (here, next to training) by the thread's.
        total = time.perf_counter() - t0
        in_process = frame.process_seconds if isinstance(frame, ViewFrame) else 0.0
        self._worker.frame_done(in_process, total - in_process)
        self._worker.frame.emit(frame)

    def _transport_job(self, job: _FrameJob) -> None:
        """Compute and send the transport stages of ``job`` (skipped when a newer job supersedes it)."""
        if (
            job.transport is None
            or self._stop.is_set()
            or (job.transport_only and job.generation < self._worker.transport_generation)
        ):
            return
        t0 = time.perf_counter()
        try:
            stages, names = compute_transport(job.flow, job.transport, self._worker.options)
        except Exception as err:  # reported; training and the other views go on
            self._worker.message.emit("error", f"transport view update failed: {type(err).__name__}: {err}")
            return
        self._worker.transport.emit(
            TransportFrame(
                run_id=job.run_id,
                step=job.step,
                direction=job.transport,
                stages=stages,
                layer_names=names,
                extent=float(self._worker.options.grid_extent),
                seconds=time.perf_counter() - t0,
            )
        )

    def _compute_images(self, job: _FrameJob) -> ImageFrame:
        t0 = time.perf_counter()
        # float32 and a fixed seed, as the 2-D samples: the grid changes only as the model learns.
        images = evaluation.sample_images(
            job.flow, job.n_samples, temperature=job.temperature, seed=SAMPLE_SEED, dtype=VIEW_DTYPE
        )
        return ImageFrame(
            run_id=job.run_id,
            step=job.step,
            images=images,
            grid=evaluation.image_grid(images, job.levels),
            levels=job.levels,
            temperature=job.temperature,
            seed=SAMPLE_SEED,
            diagnostics=job.diagnostics,
            seconds=time.perf_counter() - t0,
            dtype=str(VIEW_DTYPE).replace("torch.", ""),
        )

    def _compute(self, job: _FrameJob) -> ViewFrame | None:
        opts = self._worker.options
        t0 = time.perf_counter()
        stop = self._stop.is_set
        args: dict[str, Any] = {
            "test_points": job.test_points.numpy(),
            "extent": opts.grid_extent,
            "resolution": opts.grid_resolution,
            "n_samples": opts.n_samples,
        }
        result = self._compute_in_process(job, args)
        process_seconds = time.perf_counter() - t0 if result is not None else 0.0
        if result is None and not stop():
            result = compute_density(job.flow, chunk=opts.thread_grid_chunk, stop=stop, **args)
        if result is None or stop():
            return None
        test = result.test_log_prob
        # (``seconds``: the pass over the grid and the test points together)
        ev = (
            EvalMetrics(
                step=job.step,
                nll_nats=float(-test.mean()),
                mse=None,
                n_test=int(test.size),
                seconds=result.pass_seconds,
                exact=result.logdet_exact,
                fixed=True,
                dtype=result.dtype,
            )
            if test.size
            else None
        )
        return ViewFrame(
            run_id=job.run_id,
            step=job.step,
            log_density=np.asarray(result.log_density, dtype=np.float64),
            extent=result.extent,
            samples=result.samples,
            sample_hist=histogram2d(result.samples, result.extent, opts.hist_bins),
            diagnostics=job.diagnostics,
            eval=ev,
            seconds=time.perf_counter() - t0,
            process_seconds=process_seconds,
            dtype=result.dtype,
        )

    def _compute_in_process(self, job: _FrameJob, args: dict[str, Any]) -> DensityResult | None:
        """The density frame from the view process; None where this thread must compute it (no process, not ready
        yet, or it failed: a dead process is dropped, and so is one that failed :data:`PROCESS_FAILURES_TOLERATED`
        frames in a row)."""
        process = self._process
        if process is None:
            return None
        try:
            if not process.ready():
                return None  # the first frames of a session, while the child imports torch
            message = flow_message(job.flow)
            if message is None:
                return None
            result = process.compute(message, self._stop.is_set, chunk=self._worker.options.grid_chunk, **args)
        except ViewProcessError as err:
            self._drop_process(err)
            return None
        except ViewComputeError as err:  # computed here instead; a process that keeps failing is dropped
            self._process_failures += 1
            if self._process_failures >= PROCESS_FAILURES_TOLERATED:
                self._drop_process(err)
            else:
                self._worker.message.emit("warning", f"the view process failed a frame ({err}); computed here")
            return None
        self._process_failures = 0
        return result


class _WorkerThread(QThread):
    """A thread whose body is the worker's loop (no Qt event loop needed in the worker)."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self._worker = worker

    def run(self) -> None:
        self._worker.loop()


class Session(QObject):
    """The GUI thread's handle on a training run in a background thread.

    All methods are called from the GUI thread and return at once: they queue a command that the worker applies
    between two training steps. Results come back through the signals (queued to the GUI thread).

    Args:
        spec: the first run's configuration.
        options: what the worker computes for the views, and how often.
        gate: compare mode: a :class:`~monoflow_studio.fair_share.FairShare` shared with the other sessions of a
            comparison; their training steps then take turns so that each run gets an equal share of the training
            time. ``None`` (one run): the worker trains without waiting.
    """

    built = Signal(object)
    build_failed = Signal(str)
    metrics = Signal(object)
    frame = Signal(object)
    transport = Signal(object)
    evaluated = Signal(int, object)
    eval_progress = Signal(int, int, int, int)
    state_changed = Signal(str)
    message = Signal(str, str)
    checkpoint_saved = Signal(str)
    lr_applied = Signal(float)
    finished = Signal()

    def __init__(
        self,
        spec: RunSpec,
        options: SessionOptions | None = None,
        parent: QObject | None = None,
        gate: FairShare | None = None,
    ) -> None:
        super().__init__(parent)
        self.options = options or SessionOptions()
        self._worker = _Worker(spec, self.options, gate)
        for name in (
            "built",
            "build_failed",
            "metrics",
            "frame",
            "transport",
            "evaluated",
            "eval_progress",
            "state_changed",
            "message",
            "checkpoint_saved",
            "lr_applied",
            "finished",
        ):
            getattr(self._worker, name).connect(getattr(self, name))
        self._thread = _WorkerThread(self._worker)
        self._state = ""
        self.state_changed.connect(self._remember_state)

    def _remember_state(self, state: str) -> None:
        self._state = state

    # -- lifecycle ---------------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the worker and view threads (the worker builds the first run, then waits paused)."""
        self._worker.views.start()
        self._thread.start()

    @property
    def state(self) -> str:
        """The last state the worker reported (``building``, ``paused``, ``training``, ``stopped``)."""
        return self._state

    def is_alive(self) -> bool:
        """Whether the worker or the view thread still runs."""
        return self._thread.isRunning() or self._worker.views.isRunning()

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Ask both threads to stop (after the current step / frame) and wait; True if they ended in time."""
        views = self._worker.views
        self._worker.request_stop()
        views.request_stop()
        deadline = time.perf_counter() + timeout_s
        ok = True
        for thread in (self._thread, views):
            left_ms = max(0, int((deadline - time.perf_counter()) * 1000))
            ok = bool(thread.wait(left_ms)) and ok
        return ok

    # -- commands ----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.post(self._worker.start)

    def pause(self) -> None:
        self._worker.post(self._worker.pause)

    def step_once(self) -> None:
        self._worker.post(self._worker.step_once)

    def reset(self, spec: RunSpec, keep_running: bool = False) -> None:
        """Discard the run and build a fresh one from ``spec`` (training on if ``keep_running``)."""
        spec = spec.copy()
        self._worker.post(lambda: self._worker.reset(spec, keep_running))

    def set_lr(self, lr: float) -> None:
        self._worker.post(lambda: self._worker.set_lr(lr))

    def set_solver(self, tol: float | None = None, max_iter: int | None = None, solver: str | None = None) -> None:
        self._worker.post(lambda: self._worker.set_solver(tol, max_iter, solver))

    def set_transport(self, direction: str | None) -> None:
        """The transport view shows ``direction`` (``"forward"`` / ``"inverse"``), or is hidden (``None``).

        While it is visible every frame also brings a :class:`TransportFrame`; a newly shown direction is computed
        at once (paused or not).
        """
        self._worker.post(lambda: self._worker.set_transport(direction))

    def set_samples(self, n: int | None = None, temperature: float | None = None) -> None:
        """Image runs: images per sample grid and their temperature (a view setting: a new grid comes at once)."""
        self._worker.post(lambda: self._worker.set_samples(n, temperature))

    def set_evaluation(self, eval_every: int | None = None, eval_size: int | None = None) -> None:
        """Image runs: steps between two bits/dim tests (0: every ``default_eval_every``) and images per test."""
        self._worker.post(lambda: self._worker.set_evaluation(eval_every, eval_size))

    def evaluate_now(self) -> None:
        """Image runs: test the model now (off the GUI thread); the result comes through :attr:`evaluated`."""
        self._worker.post(self._worker.evaluate_now)

    def open_checkpoint(self, path: str) -> None:
        self._worker.post(lambda: self._worker.open_checkpoint(path))

    def save_checkpoint(self, path: str) -> None:
        self._worker.post(lambda: self._worker.save_checkpoint(path))

    def frame_consumed(self) -> None:
        """Tell the worker the last frame is on screen (it computes the next one only then)."""
        self._worker.frame_consumed()

    def submit(self, fn: Callable[[Trainer], Any]) -> Future[Any]:
        """Run ``fn(trainer)`` in the worker between two steps; a thread-safe query (used by tests and tools)."""
        future: Future[Any] = Future()

        def command() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                trainer = self._worker.trainer
                if trainer is None:
                    raise RuntimeError("no run is built yet")
                future.set_result(fn(trainer))
            except Exception as err:  # handed to the caller through the future
                future.set_exception(err)

        self._worker.post(command)
        return future
