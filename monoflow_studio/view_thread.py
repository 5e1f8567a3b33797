"""The view thread: computes heavy frames from model snapshots, one at a time, next to the training thread.

The worker (:mod:`monoflow_studio.worker`) hands it jobs: a density frame, a sample grid or a transport
(:class:`FrameJob`), or a bits/dim test of an image run (:class:`EvalJob`). The 2-D density frames themselves go to
the view process (:mod:`monoflow_studio.view_process`) while it works; the rest is computed here
(:mod:`monoflow_studio.view_compute`). Results go back through the worker's signals; tests are posted to the
worker, which records them. The threading contract is described in :mod:`monoflow_studio.session`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PySide6.QtCore import QThread

from monoflow_core import evaluation
from monoflow_core.flow import Flow
from monoflow_core.training import EvalMetrics

from .frames import ImageFrame, TransportFrame, ViewFrame
from .view_compute import SAMPLE_SEED, compute_transport, evaluate_images, histogram2d
from .view_process import (
    VIEW_DTYPE,
    DensityResult,
    ViewComputeError,
    ViewProcess,
    ViewProcessError,
    compute_density,
    flow_message,
)

if TYPE_CHECKING:  # annotations only: the worker creates its view thread
    from .worker import Worker

__all__ = ["PROCESS_FAILURES_TOLERATED", "EvalJob", "FrameJob", "ViewThread"]

#: Frames in a row the view process may fail to compute (each is then computed in the view thread) before the
#: studio stops using it.
PROCESS_FAILURES_TOLERATED = 3
#: Seconds between two looks at a starting view process while no job is waiting (it is warmed as soon as it is ready).
READY_POLL_S = 0.05
#: Held-out points and samples of the warm-up request (its numbers are not shown: it only builds the run's flow in
#: the child and runs its forward and inverse passes once).
WARM_UP_POINTS = 16
#: Grid points per axis of the warm-up request.
WARM_UP_RESOLUTION = 2


@dataclass
class FrameJob:
    """A snapshot to draw: a 2-D run's density frame (with its transport while that view is visible), an image run's
    sample grid, or an on-demand transport alone."""

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
    resolution: int | None = None  # grid points per axis of the density (None: the session's grid_resolution)
    urgent: bool = False  # supersedes every frame submitted before it (abandoned, or skipped if not started)
    order: int = 0  # set by ViewThread.submit: the order of submission


@dataclass
class EvalJob:
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


class ViewThread(QThread):
    """Computes heavy frames from model snapshots, one at a time, next to the training thread.

    A test (:class:`EvalJob`) is long: it runs in slices, and frames that arrive meanwhile are computed between
    two slices, so the sample grid stays live during a test.
    """

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._worker = worker
        self._jobs: queue.Queue[FrameJob | EvalJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._process: ViewProcess | None = ViewProcess() if worker.options.view_process else None
        self._process_ready = False  # set once the process has said it is ready (read by the worker thread)
        self._process_failures = 0  # frames in a row the view process failed to compute
        self._order_lock = threading.Lock()
        self._submitted = 0
        self._latest_urgent = 0  # the order of the latest urgent job: frame jobs submitted before it are stale
        self._latest_flow: dict[str, Any] | None = None  # the flow message of the latest 2-D frame (for the warm-up)

    def submit(self, job: FrameJob | EvalJob) -> None:
        """Queue ``job`` (from the worker thread). An urgent :class:`FrameJob` supersedes the frames submitted
        before it: one not started is skipped, one being computed in the view process is cut short at its next
        pass (see :meth:`_superseded`)."""
        if isinstance(job, FrameJob):
            with self._order_lock:
                self._submitted += 1
                job.order = self._submitted
                if job.urgent:
                    self._latest_urgent = job.order
        self._jobs.put(job)

    def full_frames_ready(self) -> bool:
        """Whether a full-resolution frame can be computed without the studio's own process doing it while a view
        process is still starting: the view process is ready, or there is none (disabled or dropped). Called from
        the worker thread (a plain read)."""
        return self._process is None or self._process_ready

    def process_state(self) -> str:
        """``"ready"``, ``"starting"`` or ``"off"`` (disabled, or dropped after a failure); a plain read."""
        if self._process is None:
            return "off"
        return "ready" if self._process_ready else "starting"

    def _superseded(self, job: FrameJob) -> bool:
        """Whether a later urgent frame makes ``job`` stale (transport-only jobs are never superseded)."""
        return not job.transport_only and job.order < self._latest_urgent

    def request_stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)

    def run(self) -> None:
        try:
            self._start_process()
            while not self._stop.is_set():
                job = self._next_job()
                if job is None:
                    return
                if isinstance(job, EvalJob):
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

    def _next_job(self) -> FrameJob | EvalJob | None:
        """The next job; while the view process is starting, look at it every :data:`READY_POLL_S` meanwhile, so
        that it is warmed as soon as it is ready (before the first frame that needs it, e.g. the one after Train)."""
        while self._process is not None and not self._process_ready and not self._stop.is_set():
            try:
                return self._jobs.get(timeout=READY_POLL_S)
            except queue.Empty:
                self._poll_process(warm=True)
        return self._jobs.get()

    def _poll_process(self, warm: bool) -> bool:
        """Whether the view process is ready; on the first yes, with ``warm``, warm it up (:meth:`_warm_up`)."""
        process = self._process
        if process is None:
            return False
        try:
            ready = process.ready()
        except ViewProcessError as err:
            self._drop_process(err)
            return False
        if ready and not self._process_ready:
            self._process_ready = True
            if warm:
                self._warm_up()
        return ready

    def _warm_up(self) -> None:
        """Build the latest 2-D run's flow in the just-ready child and run its passes once, on a tiny request whose
        numbers are dropped: the first real frame there (e.g. right after Train) then pays neither the build nor
        the first calls' set-up. Abandoned as soon as a job is waiting."""
        process, message = self._process, self._latest_flow
        if process is None or message is None:
            return
        try:
            process.compute(
                message,
                lambda: self._stop.is_set() or not self._jobs.empty(),
                test_points=np.zeros((WARM_UP_POINTS, 2)),
                extent=self._worker.options.grid_extent,
                resolution=WARM_UP_RESOLUTION,
                n_samples=WARM_UP_POINTS,
                chunk=self._worker.options.grid_chunk,
            )
        except ViewProcessError as err:
            self._drop_process(err)
        except ViewComputeError as err:  # the real frames will say more; nothing is shown for a warm-up
            self._worker.message.emit("debug", f"the view process's warm-up failed: {err}")

    def _drop_process(self, err: Exception) -> None:
        """Stop using the view process (it failed): close it and say so; frames are computed in this thread."""
        if self._process is not None:
            self._process.close()
            self._process = None
            self._process_ready = False
        self._worker.message.emit("warning", f"views are computed in the studio's own process from now on ({err})")

    def _between_slices(self, job: EvalJob) -> bool:
        """Between two slices of a test: compute any frame that is waiting; True abandons the test."""
        while not self._stop.is_set():
            try:
                waiting = self._jobs.get_nowait()
            except queue.Empty:
                break
            if waiting is None:
                self._stop.set()
                break
            if isinstance(waiting, EvalJob):  # a newer run's test: it replaces this one
                self._jobs.put(waiting)
                return True
            self._frame_job(waiting)
        return self._stop.is_set() or job.generation != self._worker.eval_generation

    def _evaluate(self, job: EvalJob) -> None:
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

    def _frame_job(self, job: FrameJob) -> None:
        t0 = time.perf_counter()
        if job.transport_only:
            self._transport_job(job)
            return
        if self._superseded(job):
            return  # a newer urgent frame follows in the queue (the worker counts on it, not on this one)
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

    def _transport_job(self, job: FrameJob) -> None:
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

    def _compute_images(self, job: FrameJob) -> ImageFrame:
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

    def _compute(self, job: FrameJob) -> ViewFrame | None:
        opts = self._worker.options
        t0 = time.perf_counter()

        def stop() -> bool:
            return self._stop.is_set() or self._superseded(job)

        args: dict[str, Any] = {
            "test_points": job.test_points.numpy(),
            "extent": opts.grid_extent,
            "resolution": job.resolution or opts.grid_resolution,
            "n_samples": opts.n_samples,
        }
        result = self._compute_in_process(job, args, stop)
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

    def _compute_in_process(
        self, job: FrameJob, args: dict[str, Any], stop: Callable[[], bool]
    ) -> DensityResult | None:
        """The density frame from the view process; None where this thread must compute it (no process, not ready
        yet, or it failed: a dead process is dropped, and so is one that failed :data:`PROCESS_FAILURES_TOLERATED`
        frames in a row), or where ``stop()`` turned true (the child cuts the frame short)."""
        process = self._process
        if process is None:
            return None
        message = flow_message(job.flow)
        if message is None:
            return None
        self._latest_flow = message
        if not self._poll_process(warm=False):  # (this frame warms the child itself)
            return None  # the first frames of a session, while the child imports torch
        try:
            result = process.compute(message, stop, chunk=self._worker.options.grid_chunk, **args)
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
