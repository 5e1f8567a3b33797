"""The session's worker: the one thread that owns the core :class:`~monoflow_core.training.Trainer`.

It builds runs, trains between the commands the GUI thread posts, snapshots the model for the view thread
(:mod:`monoflow_studio.view_thread`) and reports through Qt signals carrying plain data. The threading contract is
described in :mod:`monoflow_studio.session`; every method here runs in the worker thread unless it says otherwise.
"""

from __future__ import annotations

import copy
import math
import queue
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PySide6.QtCore import QObject, QThread, Signal

from monoflow_core import evaluation
from monoflow_core.checkpoint import CheckpointError, load_checkpoint
from monoflow_core.data import POINTS_DATA, sample_toy
from monoflow_core.data.points import PointSet
from monoflow_core.flow import Flow
from monoflow_core.training import EvalMetrics, StepMetrics, Trainer, TrainingError
from monoflow_core.transport import DIRECTIONS

from .fair_share import FairShare
from .frames import RunInfo
from .run_spec import RunSpec
from .session_options import BUILDING, PAUSED, STOPPED, TRAINING, SessionOptions
from .view_compute import histogram2d
from .view_thread import EvalJob, FrameJob, ViewThread

__all__ = ["Worker", "WorkerThread", "evaluation_dtype", "snapshot"]


def evaluation_dtype(trainer: Trainer) -> torch.dtype:
    """The dtype :meth:`Trainer.evaluate` tests in by default (the core decides: float64 on CPU for vectors,
    the training dtype for images and on GPUs)."""
    return trainer.evaluation_dtype()


def snapshot(flow: Flow) -> Flow:
    """A copy of ``flow`` for the view thread: its parameters and buffers in storage of their own, no gradients.

    Taken by the worker thread between two steps (the only thread that touches the live flow), so nothing else
    writes the tensors while they are copied. ``nn.Parameter.__deepcopy__`` clones a parameter's data and leaves its
    ``.grad`` behind; the view thread then owns every tensor of the copy.
    """
    with torch.no_grad():
        return copy.deepcopy(flow)


def points_info(points: PointSet, run_id: int, opts: SessionOptions, seed: int, common: dict[str, Any]) -> RunInfo:
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


class Worker(QObject):
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
        self._trained_seconds = 0.0  # the run's training time in this session (frames come faster early on)
        self._frame_due = False
        # The quick start: the first frame of a run and the first after Train are coarse (cheap) and come at once
        # (after Train: right after the first step, ahead of any frame in flight); so is every frame while the view
        # process is still starting; a full frame follows as soon as the coarse one is on screen and the view
        # process is ready (see _maybe_frame).
        self._frame_after_step: int | None = None  # after Train: a frame is due once step_count exceeds this
        self._refine = False  # the frame on screen or in flight is coarse: a full one follows
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
        self.views = ViewThread(self)

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
            info = points_info(trainer.points, self._run_id + 1, opts, spec.training.seed, common)
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
        self._trained_seconds = 0.0
        self.built.emit(info)
        self.message.emit("info", trainer.precision.describe())  # how G is computed on this device (docs/precision.md)
        self._frame_consumed.set()
        self._frame_after_step = None
        # The new model's picture, computed by the view thread: coarse first, so it comes at once even where the
        # view process is still starting; urgent, so that a frame of the previous run still in flight gives way.
        self._submit_frame(coarse=True, urgent=True)
        self._set_state(TRAINING if self._running else PAUSED)

    def start(self) -> None:
        """Train on. The first frame comes right after the first step (see :meth:`_maybe_frame`), not after
        ``frame_min_interval_s``: what the user pressed Train for is the density starting to move."""
        if self.trainer is None:
            return
        self._running = True
        self._next_frame = time.perf_counter() + self.frame_interval()
        if self.trainer.task != "image":
            self._frame_after_step = self.trainer.step_count
        self._set_state(TRAINING)

    def pause(self) -> None:
        self._frame_after_step = None
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
            copied = snapshot(self.trainer.eval_flow)
            self.views.submit(
                FrameJob(
                    self._run_id,
                    self.trainer.step_count,
                    copied,
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
        self._trained_seconds += metrics.seconds
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

    def frame_interval(self) -> float:
        """Shortest time between two heavy frames while training: ``early_frame_interval_s`` during the run's first
        ``early_frames_s`` seconds of training, ``frame_min_interval_s`` afterwards (:class:`SessionOptions`)."""
        opts = self.options
        if self._trained_seconds < opts.early_frames_s:
            return min(opts.early_frame_interval_s, opts.frame_min_interval_s)
        return opts.frame_min_interval_s

    def _maybe_frame(self) -> None:
        """Submit a frame if one is due.

        Due: the first frame after Train, once the first step is done (coarse and urgent: it does not wait for a
        frame in flight, which gives way to it); then, once the last frame is on screen, a full frame after a
        coarse one as soon as full frames need not be computed in the studio's own process (the view process is
        ready, or there is none: :meth:`ViewThread.full_frames_ready`); a frame asked for (pause, step, new
        settings); and while training, one every :meth:`frame_interval` (and by the frame budgets), coarse while
        the view process is still starting: its start (importing torch) and full frames drawn in the view thread
        meanwhile would both take time from training.
        """
        trainer = self.trainer
        if trainer is None:
            return
        if self._frame_after_step is not None and self._running and trainer.step_count > self._frame_after_step:
            self._frame_after_step = None
            self._guard(lambda: self._submit_frame(coarse=True, urgent=True))
            return
        if not self._frame_consumed.is_set():
            return
        due = self._running and time.perf_counter() >= self._next_frame
        if due and trainer.task == "image":
            due = trainer.step_count >= self._next_frame_step  # N steps or T seconds, whichever is later
        refine = self._refine and self.views.full_frames_ready()
        if self._frame_due or due or refine:
            self._frame_due = False
            self._guard(self._submit_frame)

    def _submit_frame(self, coarse: bool = False, urgent: bool = False) -> None:
        """Hand a snapshot of the model to the view thread (cheap: a deep copy of a small flow).

        Args:
            coarse: a 2-D run's density on the ``first_frame_resolution`` grid (where it is coarser than
                ``grid_resolution``); a full frame follows once it is on screen. Every frame is coarse while the view
                process is starting.
            urgent: the frame supersedes those submitted before it (:meth:`ViewThread.submit`).
        """
        trainer = self.trainer
        assert trainer is not None
        # Diagnostics here: they describe the latest *training* step's solves on the live flow.
        diagnostics = evaluation.solver_diagnostics(trainer.flow) if trainer.step_count > 0 else []
        copied = snapshot(trainer.eval_flow)
        self._frame_consumed.clear()
        self._next_frame = time.perf_counter() + self.frame_interval()
        self._refine = False
        if trainer.task == "image":
            self._next_frame_step = trainer.step_count + self.options.image_frame_min_steps
            self.views.submit(
                FrameJob(
                    self._run_id,
                    trainer.step_count,
                    copied,
                    diagnostics,
                    self._test_points,
                    image=True,
                    n_samples=self._sample_n,
                    temperature=self._sample_temperature,
                    levels=int(trainer.flow.levels),
                    urgent=urgent,
                )
            )
            return
        self.transport_generation += 1  # this frame brings the transport too: pending on-demand jobs are stale
        coarse = (coarse or not self.views.full_frames_ready()) and (
            self.options.first_frame_resolution < self.options.grid_resolution
        )
        self._refine = coarse
        self.views.submit(
            FrameJob(
                self._run_id,
                trainer.step_count,
                copied,
                diagnostics,
                self._test_points,
                transport=self._transport,
                generation=self.transport_generation,
                resolution=self.options.first_frame_resolution if coarse else None,
                urgent=urgent,
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
        copied = snapshot(trainer.eval_flow)
        self._eval_running = True
        self.views.submit(
            EvalJob(
                run_id=self._run_id,
                step=trainer.step_count,
                flow=copied,
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


class WorkerThread(QThread):
    """A thread whose body is the worker's loop (no Qt event loop needed in the worker)."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker

    def run(self) -> None:
        self._worker.loop()
