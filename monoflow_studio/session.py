"""The training session: a worker thread that owns the core :class:`~monoflow_core.training.Trainer`.

Threading contract (docs/studio.md):

* the worker thread is the only thread that touches the trainer and its flow: it builds it, runs
  :meth:`Trainer.step`, evaluates it and saves it;
* the GUI thread only *posts commands* (plain callables put on a thread-safe queue, applied between two steps)
  and *receives signals* carrying plain data (``StepMetrics`` lists, numpy arrays, dicts);
* the worker never touches a widget;
* while the worker and view threads run, Python's cyclic garbage collector runs in the GUI thread only
  (:mod:`monoflow_studio.gui_gc`), so that the Qt objects a closed window leaves in reference cycles are destroyed
  in the thread they belong to.

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

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from PySide6.QtCore import QObject, Signal

from monoflow_core.training import Trainer

from .fair_share import FairShare
from .frames import ImageFrame, RunInfo, TransportFrame, ViewFrame
from .gui_gc import gui_collector
from .run_spec import RunSpec
from .session_options import BUILDING, PAUSED, STOPPED, TRAINING, SessionOptions
from .view_compute import evaluate_images
from .worker import Worker, WorkerThread

__all__ = [
    "BUILDING",
    "PAUSED",
    "STOPPED",
    "TRAINING",
    "ImageFrame",
    "RunInfo",
    "Session",
    "SessionOptions",
    "TransportFrame",
    "ViewFrame",
    "evaluate_images",
]


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
        self._worker = Worker(spec, self.options, gate)
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
        self._thread = WorkerThread(self._worker)
        self._holds_collector = False  # see launch()
        self._state = ""
        self.state_changed.connect(self._remember_state)

    def _remember_state(self, state: str) -> None:
        self._state = state

    # -- lifecycle ---------------------------------------------------------------------------------------
    def launch(self) -> None:
        """Start the worker and view threads (the worker builds the first run, then waits paused).

        While they run, garbage cycles are collected in the GUI thread only (:mod:`monoflow_studio.gui_gc`): an
        automatic collection in one of these threads could destroy Qt objects of a closed window there.
        """
        if not self._holds_collector:
            gui_collector().acquire()
            self._holds_collector = True
        self._worker.views.start()
        self._thread.start()

    @property
    def state(self) -> str:
        """The last state the worker reported (``building``, ``paused``, ``training``, ``stopped``)."""
        return self._state

    def is_alive(self) -> bool:
        """Whether the worker or the view thread still runs."""
        return self._thread.isRunning() or self._worker.views.isRunning()

    def view_process_state(self) -> str:
        """The view process: ``"ready"``, ``"starting"`` (frames are computed in the view thread meanwhile) or
        ``"off"`` (disabled, or dropped after a failure). Thread-safe (a plain read)."""
        return self._worker.views.process_state()

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
        if self._holds_collector:
            self._holds_collector = False
            if ok:
                gui_collector().release()
            else:  # automatic collection stays off (and the threads referenced) until they have ended
                gui_collector().release_after([self._thread, views])
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
