"""Density frames (grid, held-out NLL, samples) computed in a separate process, next to the training thread.

Why a process: on a 2-core machine the view computations slow training in two ways. Next to the training
thread, every operator of a view *thread* must take the GIL back from it (so a view thread wants few, large
operators), while large operators stream big buffers through the shared caches (so they want small ones): a
200 x 200 grid in passes of 45,000 points cost the training thread 27-34% of its speed, in passes of 2,000 43%.
A process has no GIL to share, so its passes can be small: with 2,500-5,000 points per pass the same grids cost
training 10-20% and came at least as fast (``benchmarks/studio_responsiveness.py``; the figures are in its results
page).

Only the 2-D density frame moves here; transport views, image runs and their tests stay in the view thread. The
module imports neither Qt nor the studio, so the child needs no display (with ``spawn`` it also re-imports the
parent's main script, e.g. a benchmark's). The snapshot travels as its configuration and numpy state by pickle
over a private pipe between this process and its own child (no file is read). A child that fails to start or
dies raises :class:`ViewProcessError`; the studio then computes in its thread.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monoflow_core import evaluation
from monoflow_core.config import FlowConfig
from monoflow_core.flow import Flow
from monoflow_core.models import build_flow

__all__ = ["DensityResult", "ViewComputeError", "ViewProcess", "ViewProcessError", "compute_density", "flow_message"]

#: Seconds a new child may take to say it is ready (importing torch takes a few); then it counts as failed.
#: (The child loads the engine's compiled kernels before it is ready: about a second, or, the first time on a machine,
#: their compile, which took 30-70 s on the 2-core development machine next to the studio's own; the studio's view
#: thread draws meanwhile.)
START_TIMEOUT_S = 240.0
#: Seconds to wait for a child to leave after it was asked to; then it is terminated (it writes nothing, so nothing
#: is lost; a child still importing torch or midway through a frame would otherwise hold up closing the window).
CLOSE_TIMEOUT_S = 0.5


#: The parent's message that abandons the request in flight (sent as ``(CANCEL, serial)``; see :func:`_serve`).
CANCEL = "cancel"

#: The dtype of the live views (density frames, samples and the frames' quick test): the training dtype of the
#: studio's runs. A picture does not need float64's last digits; the run's reported test NLL keeps float64
#: (:meth:`monoflow_core.training.Trainer.evaluation_dtype`).
VIEW_DTYPE = torch.float32


class ViewProcessError(RuntimeError):
    """The view process could not start, died, or stopped answering."""


class ViewComputeError(RuntimeError):
    """The view process is fine, but computing the frame raised (the message names the exception)."""


@dataclass
class DensityResult:
    """The numbers of one density frame (see :class:`monoflow_studio.session.ViewFrame`).

    Attributes:
        log_density: ``log p`` on the grid in nats, float64 (res, res), row-major, row 0 = ``ymin``.
        extent: ``(xmin, xmax, ymin, ymax)`` of the grid.
        test_log_prob: ``log p`` of the held-out points in nats, float64 (n,).
        samples: model samples (n_samples, 2), float64; (0, 2) when none were asked for.
        pass_seconds: wall time of the pass over the grid and the held-out points.
        logdet_exact: whether the flow's log-det was exact (else the values are estimates).
        dtype: the dtype that computed the numbers (:data:`VIEW_DTYPE`).
    """

    log_density: np.ndarray
    extent: tuple[float, float, float, float]
    test_log_prob: np.ndarray
    samples: np.ndarray
    pass_seconds: float
    logdet_exact: bool
    dtype: str = "float32"


def compute_density(
    flow: Flow,
    test_points: torch.Tensor | np.ndarray,
    extent: float,
    resolution: int,
    chunk: int,
    n_samples: int,
    stop: Callable[[], bool] = lambda: False,
) -> DensityResult | None:
    """Log-density on a ``resolution``-square grid over ``[-extent, extent]^2``, of ``test_points``, and samples.

    The grid and the held-out points go through the flow together (passes of ``chunk`` points); everything in
    :data:`VIEW_DTYPE` (a live view does not need float64's last digits). The samples use a fixed seed, so they move
    smoothly from frame to frame. Returns None if ``stop()`` turns true between two passes (or before the samples):
    a frame that a newer one supersedes is abandoned within one pass.
    """
    t0 = time.perf_counter()
    grid_pts, box = evaluation.density_grid_points(flow, extent, resolution)
    n_grid = grid_pts.shape[0]
    points = torch.cat([grid_pts, torch.as_tensor(test_points).to(grid_pts.dtype).reshape(-1, 2)])
    if next(flow.parameters(), grid_pts).dtype != VIEW_DTYPE:
        flow = copy.deepcopy(flow).to(dtype=VIEW_DTYPE)  # one copy, not one per pass
    parts = []
    for start in range(0, points.shape[0], max(1, chunk)):
        if stop():
            return None
        parts.append(evaluation.log_prob(flow, points[start : start + chunk], chunk=chunk, dtype=VIEW_DTYPE))
    values = torch.cat(parts)
    pass_seconds = time.perf_counter() - t0
    if stop():
        return None
    samples = (
        np.asarray(evaluation.sample(flow, n_samples, seed=0, dtype=VIEW_DTYPE), dtype=np.float64)
        if n_samples > 0
        else np.zeros((0, 2))
    )
    return DensityResult(
        log_density=values[:n_grid].reshape(resolution, resolution).numpy(),
        extent=box,
        test_log_prob=values[n_grid:].numpy(),
        samples=samples,
        pass_seconds=pass_seconds,
        logdet_exact=bool(flow.logdet_is_exact),
        dtype=str(VIEW_DTYPE).replace("torch.", ""),
    )


def flow_message(flow: Flow) -> dict[str, Any] | None:
    """What the child needs to rebuild ``flow``: its configuration and its state as numpy arrays (a few ms to
    pickle, against ~25 ms for the module itself); None for a flow built without a configuration."""
    if getattr(flow, "config", None) is None or not isinstance(flow.config, FlowConfig):
        return None
    return {
        "config": flow.config.to_dict(),
        "state": {k: v.detach().cpu().numpy() for k, v in flow.state_dict().items()},
    }


def _flow_from(message: dict[str, Any], cache: dict[str, Flow]) -> Flow:
    """The flow of a :func:`flow_message`: built once per configuration, then only its state is loaded."""
    import json

    key = json.dumps(message["config"], sort_keys=True)
    flow = cache.get(key)
    if flow is None:
        cache.clear()  # one run at a time
        flow = cache[key] = build_flow(FlowConfig.from_dict(message["config"]))
    flow.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in message["state"].items()})
    return flow.eval()


def _serve(conn: Any) -> None:
    """The child's loop: say ``("ready", 0, None)``, then answer each ``(serial, kwargs)`` with
    ``("ok", serial, result)`` or ``("error", serial, message)``, until None (or the parent's end closes).

    Any message that arrives while a frame is computed (a :data:`CANCEL` the parent sends when it abandons the
    request, a newer request, or None) cuts the frame short at the next pass: it is answered
    ``("cancelled", serial, None)``, and the message is read next. A frame in flight thus never holds up a newer one
    by more than one pass.
    """
    # Ctrl-C in the terminal reaches the whole process group: the parent closes the window and then this child.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from monoflow_core.runtime import tune_allocator

    tune_allocator()  # as in the studio's own process (mid-sized temporaries from the heap, not fresh mmaps)
    torch.set_num_threads(1)  # one core for the views, the other for training
    from monoflow_core import fused

    # The compiled kernels, loaded (or compiled) before this child says it is ready, so that its frames come from
    # the same kernels as the studio's own: the parent's view thread draws meanwhile. Only the solvers' set: the
    # child never trains.
    fused.kernels_ready(VIEW_DTYPE, wait=True, backward=False)
    cache: dict[str, Flow] = {}
    try:
        conn.send(("ready", 0, None))  # imports done: the parent may count on this child
    except (BrokenPipeError, OSError):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if message is None:
            return
        if message[0] == CANCEL:  # the request it cancels was answered already
            continue
        serial, kwargs = message
        try:
            flow = _flow_from(kwargs.pop("flow"), cache)
            result = compute_density(flow, stop=lambda: bool(conn.poll(0)), **kwargs)
            reply = ("ok", serial, result) if result is not None else ("cancelled", serial, None)
        except Exception as err:  # reported to the parent, which shows it; the child serves on
            reply = ("error", serial, f"{type(err).__name__}: {err}")
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class ViewProcess:
    """A child process computing density frames on request, for one thread at a time.

    :meth:`start` starts it (importing torch in the child takes a few seconds; :meth:`ready` says when it is done);
    :meth:`compute` sends a request and waits for its answer; :meth:`close` asks the child to leave and terminates
    it after :data:`CLOSE_TIMEOUT_S`. A child that died is not restarted: :meth:`compute` raises
    :class:`ViewProcessError`, and the caller decides (the studio computes in its view thread from then on).
    """

    def __init__(self) -> None:
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: Any = None
        self._serial = 0
        self._abandoned = 0  # the serial of a request whose answer was not read (abandoned by stop)
        self._lock = threading.Lock()
        self._closed = False
        self._ready = False
        self._started_at = 0.0

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def start(self) -> None:
        """Start the child (no-op once started). Raises :class:`ViewProcessError` if it cannot start, was closed,
        or has died."""
        with self._lock:
            if self._closed:
                raise ViewProcessError("the view process was closed")
            if self._proc is not None:
                if not self._proc.is_alive():
                    raise ViewProcessError(f"the view process exited (code {self._proc.exitcode})")
                return
            ctx = multiprocessing.get_context("spawn")  # no fork of a process with Qt and torch threads
            try:
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=_serve, args=(child,), name="monoflow-views", daemon=True)
                proc.start()
            except (OSError, RuntimeError, ValueError) as err:
                raise ViewProcessError(f"could not start the view process: {err}") from err
            child.close()
            self._proc, self._conn = proc, parent
            self._ready, self._started_at = False, time.monotonic()

    def ready(self) -> bool:
        """Whether the started child has finished its imports and waits for requests (does not block).

        Raises:
            ViewProcessError: the child died, or did not get ready within :data:`START_TIMEOUT_S`.
        """
        self.start()
        if not self._ready:
            self._check()
            try:
                if self._conn.poll(0):
                    status, _, _ = self._conn.recv()
                    self._ready = status == "ready"
            except (EOFError, OSError) as err:
                raise ViewProcessError(f"lost the view process: {err}") from err
        return self._ready

    def _check(self) -> None:
        proc = self._proc
        if proc is None or not proc.is_alive():
            raise ViewProcessError(f"the view process exited (code {None if proc is None else proc.exitcode})")
        if not self._ready and time.monotonic() - self._started_at > START_TIMEOUT_S:
            raise ViewProcessError(f"the view process did not start within {START_TIMEOUT_S:g} s")

    def _receive(self, serial: int, stop: Callable[[], bool]) -> tuple[bool, Any]:
        """Read messages until the answer to ``serial``: ``(True, (status, payload))``, or ``(False, None)`` if
        ``stop()`` turned true first (polled every 50 ms)."""
        conn = self._conn
        while True:
            if stop():
                return False, None
            if conn.poll(0.05):
                status, got, payload = conn.recv()
                if status == "ready":
                    self._ready = True
                elif got == serial:
                    return True, (status, payload)
                continue  # an answer to an earlier request
            self._check()

    def compute(self, flow: dict[str, Any], stop: Callable[[], bool], **kwargs: Any) -> DensityResult | None:
        """:func:`compute_density` in the child on the flow of a :func:`flow_message`, with ``kwargs`` (all but
        ``stop``; send numpy arrays, not tensors: a tensor would travel through torch's shared-memory sharing);
        None if ``stop()`` turns true while waiting (polled every 50 ms).

        Raises:
            ViewProcessError: the child could not start, or died.
            ViewComputeError: the computation raised in the child (which serves on); the message says what.
        """
        self.start()
        try:
            if self._abandoned:
                # Its answer may still be on its way: read it before sending, or a large answer and a large
                # request could each wait for the other side to read.
                done, _ = self._receive(self._abandoned, stop)
                if not done:
                    return None
                self._abandoned = 0
            self._serial += 1
            serial = self._serial
            self._conn.send((serial, {"flow": flow, **kwargs}))
            done, answer = self._receive(serial, stop)
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError) as err:
            raise ViewProcessError(f"lost the view process: {err}") from err
        if not done:
            self._abandoned = serial
            with contextlib.suppress(BrokenPipeError, OSError):  # (a dead child is found by the next call)
                self._conn.send((CANCEL, serial))  # the child stops it at its next pass
            return None
        status, payload = answer
        if status == "ok":
            return payload
        raise ViewComputeError(payload if status == "error" else f"the view process answered {status!r}")

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Ask the child to leave; terminate (then kill) it if it has not within ``timeout`` seconds. Idempotent."""
        with self._lock:
            self._closed = True
            proc, conn = self._proc, self._conn
            self._proc = self._conn = None
        if proc is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):  # already gone: nothing to ask
            conn.send(None)
        proc.join(timeout)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout)
        conn.close()
