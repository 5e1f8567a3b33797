"""The threading contract of a session (monoflow_studio/session.py): what crosses threads, and where garbage dies.

Garbage cycles die in the GUI thread while a session runs (monoflow_studio/gui_gc.py): a closed window leaves Qt
objects in reference cycles, and an automatic collection in the worker or view thread destroyed them off the GUI
thread, which later crashed the GUI thread (a segmentation fault in Qt's timer dispatch). These tests check the rule
that prevents it, not the crash itself (which needed a timer to fire on a destroyed widget). The view thread gets
snapshots of the model that share nothing mutable with the live flow the worker trains.
"""

from __future__ import annotations

import gc
import threading
import weakref

import torch
from conftest import WAIT_MS, tiny_spec

from monoflow_core.models import build_flow
from monoflow_studio.gui_gc import GuiCollector, gui_collector
from monoflow_studio.worker import snapshot


class _Cycle:
    """An object that refers to itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_background_allocations_never_collect_while_a_session_runs(window, qtbot):
    assert not gc.isenabled(), "automatic collection is off while the window's session runs"
    died: list[str] = []
    kept: list[list[list[object]]] = []

    def allocate() -> None:
        # The garbage is made here, then this thread allocates as a worker's snapshots do: with automatic collection
        # on, the first collection after it (70 are due in these allocations) ran in this thread or another
        # background thread (the GUI thread waits in join() meanwhile).
        cycle = _Cycle()
        weakref.finalize(cycle, lambda: died.append(threading.current_thread().name))
        del cycle
        kept.extend([[] for _ in range(1000)] for _ in range(50))  # kept alive: a collection is due until one runs

    thread = threading.Thread(target=allocate, name="allocator")
    thread.start()
    thread.join()
    assert died == [], f"a background thread ran a collection: {died}"
    qtbot.waitUntil(lambda: bool(died), timeout=WAIT_MS)  # the GUI thread's collector takes it
    assert died == ["MainThread"]
    kept.clear()


def test_the_last_session_to_stop_turns_automatic_collection_back_on(make_window):
    collector = gui_collector()
    before = collector.holders  # sessions of earlier tests that are still stopping (normally none)
    first, second = make_window(), make_window()
    assert collector.holders == before + 2 and not gc.isenabled()
    first.close()
    assert collector.holders == before + 1 and not gc.isenabled(), "the other session still runs"
    second.close()
    assert collector.holders == before
    if before == 0:
        assert gc.isenabled()


def test_a_session_that_stops_late_keeps_its_threads_and_the_collector_until_they_end(window, qtbot):
    collector = gui_collector()
    before = collector.holders
    session = window.session
    release = threading.Event()
    busy = session.submit(lambda trainer: release.wait())  # the worker is held inside a command
    qtbot.waitUntil(busy.running, timeout=WAIT_MS)
    assert not session.shutdown(timeout_s=0.1), "the worker cannot stop while the command runs"
    assert collector.holders == before and not gc.isenabled(), "still held: its threads run"
    held = collector.waiting_on()
    assert session._thread in held and session._worker.views in held, "referenced until they end"
    release.set()
    qtbot.waitUntil(lambda: collector.holders == before - 1, timeout=WAIT_MS)
    assert not session.is_alive() and session._thread not in collector.waiting_on()
    if before == 1:
        assert gc.isenabled()


def test_the_collector_takes_the_generation_the_interpreter_would():
    thresholds, was_enabled = gc.get_threshold(), gc.isenabled()
    collector = GuiCollector()
    gc.disable()
    try:
        gc.set_threshold(500, 2, 3)
        gc.collect()  # all counts start at 0
        assert collector.collect_due() is None, "nothing is due below threshold0"
        passes = []
        for _ in range(4):
            kept = [[] for _ in range(600)]  # more than threshold0 new objects
            passes.append(collector.collect_due())
            del kept
        # Generation 1 once it has seen more than 2 passes over generation 0, then generation 0 again.
        assert passes == [0, 0, 0, 1]
        assert gc.get_count()[2] == 1  # the pass over generation 1 is counted for generation 2
    finally:
        gc.set_threshold(*thresholds)
        if was_enabled:
            gc.enable()


def test_a_snapshot_owns_its_tensors_and_carries_no_gradients():
    torch.manual_seed(0)
    flow = build_flow(tiny_spec().model.replace(actnorm=True))
    x = torch.randn(64, 2)
    flow.train()
    (-flow.log_prob(x).mean()).backward()  # the live flow as a step leaves it before zero_grad
    assert all(p.grad is not None for p in flow.parameters() if p.requires_grad)

    copied = snapshot(flow)
    live = {t.untyped_storage().data_ptr() for t in (*flow.parameters(), *flow.buffers())}
    mine = [*copied.parameters(), *copied.buffers()]
    assert len(mine) == len(live) and not any(t.untyped_storage().data_ptr() in live for t in mine)
    assert all(p.grad is None for p in copied.parameters())
    for (name, p), q in zip(flow.named_parameters(), copied.parameters(), strict=True):
        assert torch.equal(p, q) and p.requires_grad == q.requires_grad, name
    for b, c in zip(flow.buffers(), copied.buffers(), strict=True):
        assert torch.equal(b, c)
    flow.eval(), copied.eval()
    with torch.no_grad():
        before = copied.log_prob(x)
        torch.testing.assert_close(before, flow.log_prob(x), rtol=0, atol=0)
        for p in flow.parameters():  # the optimizer writes the live weights in place: the snapshot keeps its own
            p.add_(0.1)
        torch.testing.assert_close(copied.log_prob(x), before, rtol=0, atol=0)
