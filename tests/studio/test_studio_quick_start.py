"""The quick start: the first frame after Train comes right after the first step, coarse, ahead of any frame in
flight; a full frame follows; the view process is started and warm before Train.

Properties, not seconds: the seconds are measured by ``benchmarks/studio_first_frame.py``.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import replace

import numpy as np
from conftest import BUILD_TIMEOUT_MS, TEST_OPTIONS, WAIT_MS, tiny_spec

from monoflow_studio import view_thread
from monoflow_studio.main_window import MainWindow
from monoflow_studio.session import PAUSED
from monoflow_studio.view_process import ViewProcess
from monoflow_studio.view_thread import FrameJob

#: A coarse first frame (16 x 16) below the full grid (48 x 48); frames in the view thread unless a test says so.
QUICK = replace(TEST_OPTIONS, grid_resolution=48, first_frame_resolution=16)
#: Upper bound of waits for the view process (it imports torch): a guard against a hung test, not a speed claim.
PROCESS_WAIT_MS = 120_000


def side(frame) -> int:
    return int(frame.log_density.shape[0])


def test_the_first_frame_after_train_comes_right_after_the_first_step(make_window, qtbot):
    # An interval of an hour: without the quick start's rule no trained frame would come during the test.
    window = make_window(tiny_spec(), replace(QUICK, frame_min_interval_s=3600.0))
    frames = []
    window.session.frame.connect(frames.append)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: any(f.step >= 1 and side(f) == 48 for f in frames), timeout=WAIT_MS)
    trained = [f for f in frames if f.step >= 1]
    assert trained[0].step == 1 and side(trained[0]) == 16, "coarse, from the snapshot after the first step"
    assert side(trained[1]) == 48, "the full frame follows as soon as the coarse one is on screen"
    assert all(np.isfinite(f.log_density).all() and f.eval is not None for f in trained[:2])


def test_a_new_run_shows_a_coarse_frame_first_then_the_full_one(make_window, qtbot):
    window = make_window(tiny_spec(), QUICK)
    qtbot.waitUntil(lambda: window.density._frame is not None and side(window.density._frame) == 48, timeout=WAIT_MS)
    frames = []
    window.session.frame.connect(frames.append)
    window.session.reset(tiny_spec(seed=5))  # a new run, paused
    qtbot.waitUntil(lambda: any(side(f) == 48 and f.run_id == window.run_id for f in frames), timeout=WAIT_MS)
    mine = [f for f in frames if f.run_id == window.run_id]
    assert [side(f) for f in mine[:2]] == [16, 48] and all(f.step == 0 for f in mine)


def test_an_urgent_frame_supersedes_the_frame_in_flight(make_window, qtbot, monkeypatch):
    """A frame being computed when an urgent one (the first after Train) is submitted is cut short at its next
    pass and never shown; the urgent one is."""
    window = make_window(tiny_spec(), replace(QUICK, thread_grid_chunk=200))
    qtbot.waitUntil(lambda: window.density._frame is not None and side(window.density._frame) == 48, timeout=WAIT_MS)
    started, results = threading.Event(), []
    original = view_thread.compute_density

    def watched(flow, **kwargs):
        if kwargs["resolution"] == 300:
            started.set()
        result = original(flow, **kwargs)
        results.append((kwargs["resolution"], result))
        return result

    monkeypatch.setattr(view_thread, "compute_density", watched)
    worker = window.session._worker
    flow = window.session.submit(lambda trainer: copy.deepcopy(trainer.eval_flow)).result(timeout=WAIT_MS / 1000)
    frames = []
    window.session.frame.connect(frames.append)
    points = worker._test_points
    # 90,000 points in passes of 200: hundreds of passes, each a chance to give way.
    worker.views.submit(FrameJob(window.run_id, 0, flow, [], points, resolution=300))
    assert started.wait(WAIT_MS / 1000)
    worker.views.submit(FrameJob(window.run_id, 0, copy.deepcopy(flow), [], points, resolution=12, urgent=True))
    qtbot.waitUntil(lambda: any(side(f) == 12 for f in frames), timeout=WAIT_MS)
    assert (300, None) in [(r, res) for r, res in results if r == 300], "the slow frame was cut short"
    assert not any(side(f) == 300 for f in frames)


def test_the_view_process_is_started_and_warm_before_train(qtbot, monkeypatch):
    """Before Train: the process runs, and once ready it has computed with the run's model. While it is not
    ready, the paused run's full frame waits for it (the studio's own process draws only the coarse one)."""
    ready = threading.Event()
    original_ready, original_compute = ViewProcess.ready, ViewProcess.compute
    monkeypatch.setattr(ViewProcess, "ready", lambda self: ready.is_set() and original_ready(self))
    computed = []

    def compute(self, flow, stop, **kwargs):
        result = original_compute(self, flow, stop, **kwargs)
        computed.append((flow["config"], kwargs["resolution"], result is not None))
        return result

    monkeypatch.setattr(ViewProcess, "compute", compute)
    window = MainWindow(tiny_spec(), options=replace(QUICK, view_process=True), theme="light")
    qtbot.addWidget(window)
    frames = []
    window.session.frame.connect(frames.append)  # (before the event loop runs: no frame is missed)
    window.show()
    qtbot.waitUntil(lambda: window.state == PAUSED and len(frames) > 0, timeout=BUILD_TIMEOUT_MS)
    views = window.session._worker.views
    assert views._process is not None and views._process.alive, "started with the window, before Train"
    assert not views.full_frames_ready() and window.session._worker._refine
    qtbot.wait(300)  # the worker looks for due frames every 0.1 s while paused
    assert [side(f) for f in frames] == [16], "no full frame in the studio's own process while the child starts"
    ready.set()
    qtbot.waitUntil(lambda: any(side(f) == 48 for f in frames), timeout=PROCESS_WAIT_MS)
    full = next(f for f in frames if side(f) == 48)
    assert full.computed_in_process and full.step == 0
    config = window.session.submit(lambda trainer: trainer.flow.config.to_dict()).result(timeout=WAIT_MS / 1000)
    # (the warm-up may have given way to the full frame: either way the child computed with the run's model)
    assert any(c[0] == config and c[2] for c in computed), "the child computed with the run's model"
    assert all(f.step == 0 for f in frames) and window.step == 0, "all of it before Train"


def test_a_ready_view_process_is_warmed_with_the_runs_model_before_any_frame_asks(qtbot, monkeypatch):
    """No coarse frames here (the full grid is not larger), so no frame is due while paused: the request the child
    gets once ready is the warm-up, with the run's model."""
    ready = threading.Event()
    original_ready, original_compute = ViewProcess.ready, ViewProcess.compute
    monkeypatch.setattr(ViewProcess, "ready", lambda self: ready.is_set() and original_ready(self))
    computed = []

    def compute(self, flow, stop, **kwargs):
        result = original_compute(self, flow, stop, **kwargs)
        computed.append((flow["config"], kwargs["resolution"], result is not None))
        return result

    monkeypatch.setattr(ViewProcess, "compute", compute)
    options = replace(QUICK, view_process=True, first_frame_resolution=QUICK.grid_resolution)
    window = MainWindow(tiny_spec(), options=options, theme="light")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.state == PAUSED and window.density.frames_shown >= 1, timeout=BUILD_TIMEOUT_MS)
    assert computed == []
    ready.set()
    qtbot.waitUntil(lambda: len(computed) > 0, timeout=PROCESS_WAIT_MS)
    config = window.session.submit(lambda trainer: trainer.flow.config.to_dict()).result(timeout=WAIT_MS / 1000)
    assert computed[0][0] == config and computed[0][1] == view_thread.WARM_UP_RESOLUTION and computed[0][2]
    assert window.density.frames_shown == 1 and window.step == 0


def test_frames_stay_coarse_while_the_view_process_starts_and_full_ones_come_once_it_is_ready(qtbot, monkeypatch):
    """While training and the child still starts, the studio's own process draws only coarse frames; once the
    child is ready, a full frame comes from it."""
    ready = threading.Event()
    original_ready = ViewProcess.ready
    monkeypatch.setattr(ViewProcess, "ready", lambda self: ready.is_set() and original_ready(self))
    window = MainWindow(tiny_spec(), options=replace(QUICK, view_process=True), theme="light")
    qtbot.addWidget(window)
    frames = []
    window.session.frame.connect(frames.append)
    window.show()
    qtbot.waitUntil(lambda: window.state == PAUSED and len(frames) > 0, timeout=BUILD_TIMEOUT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: sum(f.step >= 1 for f in frames) >= 3, timeout=WAIT_MS)
    assert window.session.view_process_state() == "starting"
    assert all(side(f) == 16 and not f.computed_in_process for f in frames)
    ready.set()
    qtbot.waitUntil(lambda: any(side(f) == 48 for f in frames), timeout=PROCESS_WAIT_MS)
    full = next(f for f in frames if side(f) == 48)
    assert full.computed_in_process and full.step >= 1
    assert window.session.view_process_state() == "ready"


def test_frames_come_faster_during_the_first_seconds_of_training(make_window, qtbot):
    """Early in a run (the first ``early_frames_s`` seconds of training) frames come every
    ``early_frame_interval_s``; afterwards every ``frame_min_interval_s``; a new run starts early again."""
    opts = replace(QUICK, frame_min_interval_s=2.0, early_frame_interval_s=0.25, early_frames_s=0.5)
    window = make_window(tiny_spec(), opts)
    worker = window.session._worker
    assert worker.frame_interval() == 0.25, "a fresh run is early"
    window.train_action.trigger()
    qtbot.waitUntil(lambda: worker._trained_seconds >= 0.5, timeout=WAIT_MS)
    window.train_action.trigger()  # pause
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)
    assert worker.frame_interval() == 2.0, "after early_frames_s of training: the normal interval"
    window.session.reset(tiny_spec(seed=3))
    qtbot.waitUntil(lambda: worker._trained_seconds == 0.0 and window.state == PAUSED, timeout=WAIT_MS)
    assert worker.frame_interval() == 0.25, "a new run is early again"
    # The early interval never lengthens a shorter normal one.
    worker.options = replace(opts, frame_min_interval_s=0.1)
    assert worker.frame_interval() == 0.1
