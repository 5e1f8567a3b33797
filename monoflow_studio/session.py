"""The training session: a worker thread that owns the core :class:`~monoflow_core.training.Trainer`.

Threading contract (DESIGN.md, studio section):

* the worker thread is the only thread that touches the trainer and its flow: it builds it, runs
  :meth:`Trainer.step`, evaluates it and saves it;
* the GUI thread only *posts commands* (plain callables put on a thread-safe queue, applied between two steps)
  and *receives signals* carrying plain data (``StepMetrics`` lists, numpy arrays, dicts);
* the worker never touches a widget.

Heavy views (density grid, samples, test NLL) are computed by a second background thread, the *view thread*, on
a snapshot copy of the flow taken between two steps, so that on a machine with two or more cores training and
views proceed in parallel (the GIL is mostly released inside torch's batched operations). Frames are throttled:
at most one every ``frame_min_interval_s`` seconds, at most ``frame_budget`` of one core's time, and a new frame
is only started once the GUI has shown the previous one, so a slow view never piles up work or slows training
more than needed.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PySide6.QtCore import QObject, QThread, Signal

from monoflow_core import evaluation
from monoflow_core.checkpoint import CheckpointError, load_checkpoint
from monoflow_core.data import sample_toy
from monoflow_core.flow import Flow
from monoflow_core.training import EvalMetrics, StepMetrics, Trainer, TrainingError
from monoflow_core.transport import DIRECTIONS, grid_lines, transport_stages

from .run_spec import RunSpec

__all__ = ["RunInfo", "Session", "SessionOptions", "TransportFrame", "ViewFrame"]

#: States reported through :attr:`Session.state_changed`.
BUILDING, PAUSED, TRAINING, STOPPED = "building", "paused", "training", "stopped"


@dataclass(frozen=True)
class SessionOptions:
    """How much the worker computes for the views, and how often.

    Attributes:
        grid_resolution: points per axis of the live density grid.
        grid_extent: half-width of the grid (the toy data lie in about [-4, 4]^2).
        frame_min_interval_s: shortest time between the starts of two heavy frames while training.
        frame_budget: largest fraction of one core's time the view thread spends on heavy frames (the period is
            at least ``frame_seconds / frame_budget``). 1.0 computes continuously next to training; the default
            0.5 (two or more cores; 0.25 on one) shares a busy 2-core machine between training and views.
        n_samples: model samples per frame (inverse pass).
        eval_points: points of the fixed held-out set for the test NLL of each frame.
        data_points: data points sent once per run for the overlay.
        hist_bins: bins per axis of the sample and data histograms.
        metrics_interval_s: step metrics are batched and sent at most this often.
        transport_lines: grid lines per direction of the transport view (horizontal and vertical).
        transport_points: points per grid line of the transport view.
    """

    grid_resolution: int = 160
    grid_extent: float = 4.0
    frame_min_interval_s: float = 1.5
    frame_budget: float = 0.5 if (os.cpu_count() or 1) >= 2 else 0.25
    n_samples: int = 3000
    eval_points: int = 2000
    data_points: int = 1000
    hist_bins: int = 100
    metrics_interval_s: float = 0.05
    transport_lines: int = 17
    transport_points: int = 120


@dataclass
class RunInfo:
    """Sent when a run is (re)built or opened from a checkpoint.

    Attributes:
        run_id: increases with every new run (curves of earlier runs are kept for comparison).
        spec: the run's configuration.
        step: iterations completed (non-zero for a checkpoint).
        device: the torch device the run trains on.
        data_points: a sample of the data set, shape (n, 2), for the overlay.
        data_hist: a 2-D histogram of a large data sample (row-major, row 0 = ymin), for the data view.
        history: step metrics already recorded (from a checkpoint).
        eval_history: tests already recorded (from a checkpoint).
        source: ``"new"`` or the checkpoint path.
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


def compute_transport(flow: Flow, direction: str, options: SessionOptions) -> tuple[list[np.ndarray], list[str]]:
    """The transport stages of the regular grid of ``options`` through ``flow`` (float32, chunked)."""
    lines = grid_lines(options.grid_extent, options.transport_lines, options.transport_points)
    flat = transport_stages(flow, lines.reshape(-1, 2), direction, dtype=torch.float32)
    names = [type(layer).__name__ for layer in flow.layers]
    if direction == "inverse":
        names.reverse()
    return [s.reshape(lines.shape) for s in flat], names


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
    metrics = Signal(object)  # list[StepMetrics]
    frame = Signal(object)  # ViewFrame
    transport = Signal(object)  # TransportFrame
    state_changed = Signal(str)
    message = Signal(str, str)  # level ("info" | "warning" | "error"), text
    checkpoint_saved = Signal(str)
    lr_applied = Signal(float)
    finished = Signal()

    def __init__(self, spec: RunSpec, options: SessionOptions) -> None:
        super().__init__()
        self.options = options
        self.trainer: Trainer | None = None
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
                if self._running and self.trainer is not None:
                    self._guard(self._train_one)
                self._flush(force=not self._running)
                self._maybe_frame()
        finally:
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
    def build(self, spec: RunSpec) -> None:
        """Build a fresh trainer for ``spec`` (the old one is kept if this fails)."""
        self._set_state(BUILDING)
        spec.check_studio()
        trainer = Trainer(spec.model.replace(), spec.training.replace())
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
                data = ckpt.metadata.get("data") or (self.trainer.train_config.data if self.trainer else None)
                tc = self._initial_spec.training.replace(**({"data": data} if data else {}))
                trainer = Trainer(ckpt.model_config, tc, flow=ckpt.flow)
            spec = RunSpec(trainer.model_config.replace(), trainer.train_config.replace(), name=Path(path).name)
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
        self.trainer = trainer
        self._run_id += 1
        self._pending.clear()
        opts = self.options
        extent = (-opts.grid_extent, opts.grid_extent, -opts.grid_extent, opts.grid_extent)
        data = spec.training.data
        points = sample_toy(data, opts.data_points, rng=spec.training.seed + 7, dtype=torch.float64).numpy()
        big = sample_toy(data, 50_000, rng=spec.training.seed + 11, dtype=torch.float64).numpy()
        info = RunInfo(
            run_id=self._run_id,
            spec=spec,
            step=trainer.step_count,
            device=str(trainer.device),
            data_points=points,
            data_hist=histogram2d(big, extent, opts.hist_bins),
            history=list(trainer.history),
            eval_history=list(trainer.eval_history),
            source=source,
        )
        self._test_points = sample_toy(data, opts.eval_points, rng=spec.training.test_seed, dtype=torch.float64)
        self.built.emit(info)
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
        """The transport view is visible with ``direction`` (or hidden: ``None``); a new direction is computed now."""
        if direction is not None and direction not in DIRECTIONS:
            raise ValueError(f"transport direction: one of {DIRECTIONS}, got {direction!r}")
        changed = direction is not None and direction != self._transport
        self._transport = direction
        if changed and self.trainer is not None:
            # On demand, on a snapshot (cheap), next to the frames: the view thread computes only the transport.
            self.transport_generation += 1
            with torch.no_grad():
                snapshot = copy.deepcopy(self.trainer.eval_flow)
            self.views.submit(_FrameJob(self._run_id, self.trainer.step_count, snapshot, [], self._test_points,
                                        transport=direction, transport_only=True,
                                        generation=self.transport_generation))

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
        metrics = trainer.step()
        self._pending.append(metrics)
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
        if self.trainer is None or not self._frame_consumed.is_set():
            return
        if self._frame_due or (self._running and time.perf_counter() >= self._next_frame):
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
        self.transport_generation += 1  # this frame brings the transport too: pending on-demand jobs are stale
        self.views.submit(_FrameJob(self._run_id, trainer.step_count, snapshot, diagnostics, self._test_points,
                                    transport=self._transport, generation=self.transport_generation))

    def frame_done(self, seconds: float) -> None:
        """Called by the view thread after a frame: pace the next one by the frame budget."""
        opts = self.options
        self._next_frame = max(self._next_frame, time.perf_counter() + seconds / opts.frame_budget - seconds)


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


class _ViewThread(QThread):
    """Computes heavy frames from model snapshots, one at a time, next to the training thread."""

    def __init__(self, worker: _Worker) -> None:
        super().__init__()
        self._worker = worker
        self._jobs: queue.Queue[_FrameJob | None] = queue.Queue()
        self._stop = threading.Event()

    def submit(self, job: _FrameJob) -> None:
        self._jobs.put(job)

    def request_stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)

    def run(self) -> None:
        while not self._stop.is_set():
            job = self._jobs.get()
            if job is None:
                return
            t0 = time.perf_counter()
            if job.transport_only:
                self._transport_job(job)
                continue
            try:
                frame = self._compute(job)
            except Exception as err:  # a failed frame is reported; training and later frames go on
                self._worker.message.emit("error", f"view update failed: {type(err).__name__}: {err}")
                self._worker.frame_consumed()
                continue
            if frame is None:  # stopped midway
                return
            if job.transport is not None:
                self._transport_job(job)
            self._worker.frame.emit(frame)
            self._worker.frame_done(time.perf_counter() - t0)

    def _transport_job(self, job: _FrameJob) -> None:
        """Compute and send the transport stages of ``job`` (skipped when a newer job supersedes it)."""
        if job.transport is None or self._stop.is_set() or (
                job.transport_only and job.generation < self._worker.transport_generation):
            return
        t0 = time.perf_counter()
        try:
            stages, names = compute_transport(job.flow, job.transport, self._worker.options)
        except Exception as err:  # reported; training and the other views go on
            self._worker.message.emit("error", f"transport view update failed: {type(err).__name__}: {err}")
            return
        self._worker.transport.emit(TransportFrame(
            run_id=job.run_id, step=job.step, direction=job.transport, stages=stages, layer_names=names,
            extent=float(self._worker.options.grid_extent), seconds=time.perf_counter() - t0))

    def _compute(self, job: _FrameJob) -> ViewFrame | None:
        opts = self._worker.options
        t0 = time.perf_counter()
        # float32: a live view does not need float64's last digits, and float64 is slower.
        grid, extent = evaluation.log_density_grid(job.flow, opts.grid_extent, opts.grid_resolution,
                                                   dtype=torch.float32)
        if self._stop.is_set():
            return None
        # A dedicated seed: the same base noise every frame (samples move smoothly; no global RNG is touched).
        samples = np.asarray(evaluation.sample(job.flow, opts.n_samples, seed=0, dtype=torch.float32),
                             dtype=np.float64)
        if self._stop.is_set():
            return None
        t1 = time.perf_counter()
        nll = evaluation.test_nll(job.flow, job.test_points, dtype=torch.float32)
        ev = EvalMetrics(step=job.step, nll_nats=nll, mse=None, n_test=int(job.test_points.shape[0]),
                         seconds=time.perf_counter() - t1, exact=bool(job.flow.logdet_is_exact), fixed=True,
                         dtype="float32")
        return ViewFrame(
            run_id=job.run_id,
            step=job.step,
            log_density=np.asarray(grid, dtype=np.float64),
            extent=extent,
            samples=samples,
            sample_hist=histogram2d(samples, extent, opts.hist_bins),
            diagnostics=job.diagnostics,
            eval=ev,
            seconds=time.perf_counter() - t0,
        )


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
    """

    built = Signal(object)
    metrics = Signal(object)
    frame = Signal(object)
    transport = Signal(object)
    state_changed = Signal(str)
    message = Signal(str, str)
    checkpoint_saved = Signal(str)
    lr_applied = Signal(float)
    finished = Signal()

    def __init__(self, spec: RunSpec, options: SessionOptions | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.options = options or SessionOptions()
        self._worker = _Worker(spec, self.options)
        for name in ("built", "metrics", "frame", "transport", "state_changed", "message", "checkpoint_saved",
                     "lr_applied", "finished"):
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
