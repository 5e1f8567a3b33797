"""The view process: density frames computed in a child process equal the in-process ones; failures are handled."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TEST_OPTIONS, tiny_spec
from PySide6.QtWidgets import QApplication

import monoflow_core as mc
from monoflow_studio.view_process import (
    ViewComputeError,
    ViewProcess,
    ViewProcessError,
    compute_density,
    flow_message,
)

#: Upper bound of every wait below: a guard against a hung test, not a speed claim (frames and exits normally take
#: well under a second; speed is measured by benchmarks/studio_responsiveness.py).
HANG_GUARD_S = 120


def _trained_flow() -> mc.Flow:
    """A 2-block toy flow moved off its initialisation (a few Adam steps), so its state is not the default."""
    torch.manual_seed(3)
    flow = mc.build_flow(mc.FlowConfig(blocks=2, actnorm=True))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    x = torch.randn(128, 2) * torch.tensor([2.0, 0.5])
    for _ in range(5):
        loss = -flow.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        mc.update_lipschitz(flow, 5)
    return flow.eval()


@pytest.fixture(scope="module")
def process():
    proc = ViewProcess()
    yield proc
    proc.close()


def test_child_frame_equals_the_in_process_frame(process: ViewProcess) -> None:
    flow = _trained_flow()
    test = torch.randn(300, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    args = {"test_points": test, "extent": 3.0, "resolution": 24, "n_samples": 200, "chunk": 100}
    here = compute_density(flow, **args)
    there = process.compute(flow_message(flow), lambda: False, **{**args, "test_points": test.numpy()})
    assert here is not None and there is not None
    # The same flow rebuilt in the child from its configuration and state: the same numbers (float32 evaluation).
    np.testing.assert_allclose(there.log_density, here.log_density, rtol=0, atol=1e-5)
    np.testing.assert_allclose(there.test_log_prob, here.test_log_prob, rtol=0, atol=1e-5)
    np.testing.assert_allclose(there.samples, here.samples, rtol=0, atol=1e-4)
    assert there.log_density.shape == (24, 24) and there.samples.shape == (200, 2)
    assert there.extent == (-3.0, 3.0, -3.0, 3.0) and there.logdet_exact
    # And they are a real density's: the grid's mass over [-3, 3]^2 is close to (below) one.
    cell = (6.0 / 23) ** 2
    assert 0.5 < float(np.exp(there.log_density).sum() * cell) < 1.1
    # A changed state reaches the child (its cached model is reloaded, not reused as it was).
    with torch.no_grad():
        flow.layers[0].net.final.bias.add_(0.3)
    again = process.compute(flow_message(flow), lambda: False, **{**args, "test_points": test.numpy()})
    assert again is not None
    assert np.abs(again.test_log_prob - there.test_log_prob).max() > 1e-3
    np.testing.assert_allclose(again.test_log_prob, compute_density(flow, **args).test_log_prob, atol=1e-5)


def test_an_error_in_the_child_is_reported_and_the_child_serves_on(process: ViewProcess) -> None:
    flow = _trained_flow()
    message = flow_message(flow)
    bad = {**message, "state": {**message["state"], "layers.0.net.final.weight": np.zeros((3, 3), np.float32)}}
    with pytest.raises(ViewComputeError, match="RuntimeError"):
        process.compute(
            bad, lambda: False, test_points=np.zeros((0, 2)), extent=2.0, resolution=4, n_samples=0, chunk=10
        )
    ok = process.compute(
        message, lambda: False, test_points=np.zeros((0, 2)), extent=2.0, resolution=4, n_samples=0, chunk=10
    )
    assert ok is not None and np.isfinite(ok.log_density).all() and ok.samples.shape == (0, 2)


def test_stop_abandons_a_request_and_the_next_answer_is_the_next_requests(process: ViewProcess) -> None:
    flow = _trained_flow()
    message = flow_message(flow)
    args = {"test_points": np.zeros((0, 2)), "extent": 2.0, "n_samples": 0, "chunk": 1000}
    assert process.compute(message, lambda: True, resolution=60, **args) is None
    small = process.compute(message, lambda: False, resolution=5, **args)
    assert small is not None and small.log_density.shape == (5, 5)  # not the abandoned 60 x 60 answer


def test_a_child_dying_midway_raises_and_is_not_restarted_and_close_is_idempotent() -> None:
    proc = ViewProcess()
    message = flow_message(_trained_flow())
    args = {"test_points": np.zeros((0, 2)), "extent": 2.0, "resolution": 4, "n_samples": 0, "chunk": 10}
    assert proc.compute(message, lambda: False, **args) is not None

    def kill_once() -> bool:
        if proc.alive:
            os.kill(proc._proc.pid, 9)  # type: ignore[union-attr]
            proc._proc.join(5)  # type: ignore[union-attr]
        return False

    with pytest.raises(ViewProcessError, match=r"exited|lost"):  # a 200 x 200 request: killed long before its answer
        proc.compute(message, kill_once, **{**args, "resolution": 200})
    with pytest.raises(ViewProcessError, match="exited"):  # the caller decides what to do; no silent restart
        proc.compute(message, lambda: False, **args)
    proc.close()
    proc.close()
    with pytest.raises(ViewProcessError, match="closed"):
        proc.start()


def test_large_answers_of_abandoned_requests_do_not_deadlock_the_pipe() -> None:
    """A request abandoned by stop leaves its answer in the pipe; with a large answer and a large next request,
    both ends would wait for the other to read if the parent sent before reading it."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    flow = mc.build_flow(mc.FlowConfig(blocks=10, growth=64)).eval()
    message = flow_message(flow)
    assert sum(v.nbytes for v in message["state"].values()) > 256 * 1024
    args = {"test_points": np.zeros((0, 2)), "extent": 2.0, "n_samples": 0, "chunk": 5000}
    proc = ViewProcess()
    pool = None
    try:
        assert proc.compute(message, lambda: False, resolution=4, **args) is not None  # the child is ready
        # A request whose answer (320 kB) is in the pipe, unread, when it is abandoned (as when the cancel that
        # compute() sends comes too late for the child): sent by hand, so that no cancel cuts it short.
        proc._serial += 1
        proc._conn.send((proc._serial, {"flow": message, **args, "resolution": 200}))
        proc._abandoned = proc._serial
        assert proc._conn.poll(None)  # the child is writing its answer (poll waits without a time limit)
        pool = ThreadPoolExecutor(1)  # (a deadlocked call must not hang the test: closing the child ends it)
        got = pool.submit(proc.compute, message, lambda: False, resolution=5, **args).result(timeout=120)
        assert got is not None and got.log_density.shape == (5, 5)
    finally:
        proc.close()
        if pool is not None:
            pool.shutdown(wait=False)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="holds the child with SIGSTOP (POSIX)")
def test_an_abandoned_request_is_cut_short_by_the_child(process: ViewProcess) -> None:
    """Abandoning a request sends the child a cancel, which it sees between two passes: it answers "cancelled"
    instead of computing the whole frame (so the next request does not wait for it)."""
    message = flow_message(_trained_flow())
    args = {"test_points": np.zeros((0, 2)), "extent": 2.0, "n_samples": 0, "chunk": 1000}
    assert process.compute(message, lambda: False, resolution=4, **args) is not None  # the child is ready
    # The child is held (SIGSTOP) while the request and its cancel are sent, so the cancel is in the pipe before
    # the child's first pass whatever the machine's load: the outcome does not race the frame's computation.
    pid = process._proc.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert process.compute(message, lambda: True, resolution=600, **args) is None  # 360 passes of 1,000 points
    finally:
        os.kill(pid, signal.SIGCONT)
    abandoned = process._abandoned
    done, answer = process._receive(abandoned, lambda: False)
    assert done and answer == ("cancelled", None)
    process._abandoned = 0
    got = process.compute(message, lambda: False, resolution=5, **args)
    assert got is not None and got.log_density.shape == (5, 5)


def test_compute_density_stops_between_passes() -> None:
    flow = _trained_flow()
    calls = []

    def stop_at_third_look() -> bool:
        calls.append(1)
        return len(calls) >= 3

    test = np.zeros((0, 2))
    assert compute_density(flow, test, 2.0, 10, chunk=10, n_samples=0, stop=stop_at_third_look) is None
    assert len(calls) == 3  # looked before each of the first three passes of ten (of ten), then gave up
    whole = compute_density(flow, test, 2.0, 10, chunk=10, n_samples=0)
    assert whole is not None and np.isfinite(whole.log_density).all()


def test_close_ends_a_child_in_the_middle_of_a_frame() -> None:
    proc = ViewProcess()
    message = flow_message(_trained_flow())
    args = {"test_points": np.zeros((0, 2)), "extent": 2.0, "n_samples": 0, "chunk": 1000}
    assert proc.compute(message, lambda: False, resolution=4, **args) is not None
    assert proc.compute(message, lambda: True, resolution=600, **args) is None  # 360,000 points: seconds of work
    child = proc._proc
    proc.close()
    # No wall-clock bound here (it would depend on the machine's load): close() returns only once the child is gone.
    assert child is not None and not child.is_alive()


def test_a_flow_without_configuration_has_no_message() -> None:
    flow = mc.Flow([mc.MonotoneBlock(lambda w: 0.5 * torch.tanh(w))], (2,))
    assert flow_message(flow) is None


def test_studio_frames_come_from_the_view_process(make_window) -> None:
    """The default options: the window's density frames are computed in the child, and closing ends it."""
    window = make_window(tiny_spec(), replace(TEST_OPTIONS, view_process=True))
    frames = []
    window.session.frame.connect(frames.append)
    window.session.start()
    deadline = time.perf_counter() + HANG_GUARD_S
    while not any(f.computed_in_process for f in frames) and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    assert any(f.computed_in_process for f in frames)
    frame = next(f for f in frames if f.computed_in_process)
    assert np.isfinite(frame.log_density).all() and frame.eval is not None and np.isfinite(frame.eval.nll_nats)
    child = window.session._worker.views._process._proc  # type: ignore[union-attr]
    assert child is not None and child.is_alive()
    window.close()
    # close() stops the child; the join only guards the test against a hang (no speed is asserted).
    child.join(timeout=HANG_GUARD_S)
    assert not child.is_alive()


def test_studio_falls_back_to_the_view_thread_when_the_process_cannot_start(make_window, monkeypatch) -> None:
    def refuse(self: ViewProcess) -> None:
        raise ViewProcessError("could not start the view process: refused by the test")

    monkeypatch.setattr(ViewProcess, "start", refuse)
    window = make_window(tiny_spec(), replace(TEST_OPTIONS, view_process=True))
    frames = []
    window.session.frame.connect(frames.append)
    window.session.start()
    deadline = time.perf_counter() + HANG_GUARD_S
    while len(frames) < 2 and time.perf_counter() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    assert len(frames) >= 2 and not any(f.computed_in_process for f in frames)
    assert "refused by the test" in window.log.toPlainText()


def test_studio_goes_on_in_the_view_thread_when_the_child_dies(make_window) -> None:
    window = make_window(tiny_spec(), replace(TEST_OPTIONS, view_process=True))
    frames = []
    window.session.frame.connect(frames.append)
    window.session.start()

    def wait_for(cond) -> None:
        deadline = time.perf_counter() + HANG_GUARD_S
        while not cond() and time.perf_counter() < deadline:
            QApplication.processEvents()
            time.sleep(0.02)

    wait_for(lambda: any(f.computed_in_process for f in frames))
    assert any(f.computed_in_process for f in frames)
    process = window.session._worker.views._process  # type: ignore[union-attr]
    os.kill(process._proc.pid, 9)
    seen = len(frames)
    wait_for(lambda: len(frames) >= seen + 2)
    later = frames[seen + 1 :]
    assert later and not any(f.computed_in_process for f in later)  # from the view thread; training goes on
    assert "views are computed in the studio's own process from now on" in window.log.toPlainText()


def test_the_shared_pass_gives_the_grid_and_the_test_nll_of_separate_calls() -> None:
    from monoflow_core import evaluation

    flow = _trained_flow()
    test = torch.randn(250, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = compute_density(flow, test, extent=2.5, resolution=20, chunk=64, n_samples=0)
    assert got is not None
    grid, _ = evaluation.log_density_grid(flow, 2.5, 20, chunk=64, dtype=torch.float32)
    np.testing.assert_allclose(got.log_density, grid, rtol=0, atol=1e-5)
    assert abs(float(-got.test_log_prob.mean()) - evaluation.test_nll(flow, test, dtype=torch.float32)) < 1e-5
