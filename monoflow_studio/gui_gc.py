"""Python's cyclic garbage collector runs in the GUI thread only, while any session's threads run.

Qt objects must be destroyed in the thread they live in, and a closed window leaves some of its Qt objects in
reference cycles: pyqtgraph's context menus (a ``QMenu`` with its child widgets, owned by Python), its widget
groups, a session's :class:`~monoflow_studio.worker.Worker` and its two ``QThread`` objects, items of the drawing
canvas that were never added to a scene. Only the cyclic collector frees those. The interpreter runs an automatic
collection in whichever thread's allocation crosses its threshold, and in the studio that is mostly the worker and
view threads: their snapshots (``copy.deepcopy`` of a flow) and frames allocate far more objects than the GUI
thread (measured: about three quarters of the automatic collections of a training session ran in those threads).
A collection there destroyed a closed window's widgets off the GUI thread; their timers could not be stopped from
that thread, and the GUI thread later crashed delivering a timer event to a destroyed object (a segmentation fault
in ``QTimerInfoList::activateTimers``), with the worker thread caught mid-``deepcopy`` as a bystander.

So while a session's threads run, automatic collection is off, and a timer of the GUI thread collects instead, with
the interpreter's own thresholds: a pass over the youngest generation once it holds more than ``threshold0`` new
objects, the older generations as often as the interpreter would take them (pyqtgraph documents the same remedy,
``pyqtgraph.util.garbage_collector``). When the last session's threads have ended, automatic collection is turned
back on as it was. Everything here runs in the GUI thread.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QObject, QThread, QTimer

__all__ = ["COLLECT_INTERVAL_MS", "GuiCollector", "gui_collector"]

#: Milliseconds between two looks at the collector's counts (a pass runs only when one is due).
COLLECT_INTERVAL_MS = 250


class GuiCollector(QObject):
    """Collects garbage cycles in the GUI thread while it is held (see the module docstring).

    :meth:`acquire` and :meth:`release` are counted: each running session holds it once.
    """

    def __init__(self) -> None:
        super().__init__()
        self._holders = 0
        self._was_enabled = True
        self._timer = QTimer(self)
        self._timer.setInterval(COLLECT_INTERVAL_MS)
        self._timer.timeout.connect(self.collect_due)
        self._stopping: list[list[QThread]] = []  # threads of holders that did not stop in time (release_after)

    @property
    def holders(self) -> int:
        """How many sessions hold the collector (automatic collection is off while any does)."""
        return self._holders

    def waiting_on(self) -> list[QThread]:
        """The threads :meth:`release_after` still waits for."""
        return [t for group in self._stopping for t in group]

    def acquire(self) -> None:
        """Turn automatic collection off (the first holder) and collect from the GUI thread's timer instead."""
        if self._holders == 0:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._timer.start()
        self._holders += 1

    def release(self) -> None:
        """One holder less; with the last, collect what is due here and turn automatic collection back on."""
        if self._holders == 0:
            return
        self._holders -= 1
        if self._holders == 0:
            self._timer.stop()
            self.collect_due()
            if self._was_enabled:
                gc.enable()

    def release_after(self, threads: list[QThread]) -> None:
        """Release once every thread of ``threads`` has finished (a session whose threads did not stop in time).

        The threads stay referenced until then: Qt aborts the process when a running ``QThread`` is destroyed,
        which a closed window's last reference going away would otherwise do.
        """
        group = list(threads)
        self._stopping.append(group)
        for thread in group:
            thread.finished.connect(self._thread_finished)  # queued to this (the GUI) thread
        self._thread_finished()  # (one may have finished before the connection)

    def _thread_finished(self) -> None:
        for group in [g for g in self._stopping if all(t.isFinished() for t in g)]:
            self._stopping.remove(group)
            self.release()

    def collect_due(self) -> int | None:
        """Collect the generation the interpreter would collect now, if any; returns it (None: none was due).

        The interpreter's rule: once the youngest generation holds more than ``threshold0`` new objects, collect
        the oldest generation whose count exceeds its threshold (a generation's count is the number of passes over
        the next younger one since its own last pass). The interpreter also puts off a full collection until the
        long-lived objects have grown by a quarter, a count Python does not expose: here a full pass comes every
        ``threshold1 * threshold2`` youngest passes, at most every ``COLLECT_INTERVAL_MS * 100`` ms with the default
        thresholds (the studio freezes its start-up heap, which full passes then skip: :mod:`monoflow_studio.app`).
        """
        thresholds, counts = gc.get_threshold(), gc.get_count()
        if counts[0] <= thresholds[0]:
            return None
        generation = 0
        for g in range(len(counts) - 1, 0, -1):
            if counts[g] > thresholds[g]:
                generation = g
                break
        gc.collect(generation)
        return generation


_COLLECTOR: GuiCollector | None = None


def gui_collector() -> GuiCollector:
    """The process's collector, made at first need (call it from the GUI thread)."""
    global _COLLECTOR
    if _COLLECTOR is None:
        _COLLECTOR = GuiCollector()
    return _COLLECTOR
