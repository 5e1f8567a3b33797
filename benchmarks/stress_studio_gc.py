"""Close studio windows while a background thread allocates: ``python benchmarks/stress_studio_gc.py``.

A reproduction of the studio's intermittent segmentation fault, made quick. A closed window leaves Qt objects in
reference cycles. Each round opens a window on a small model, trains a few steps and closes it as pytest-qt does
(``close`` then ``deleteLater``). While the next window starts, a plain Python thread allocates the way the worker's
snapshots do, until a full automatic collection has run in it or a budget of allocations is spent. Before
``monoflow_studio/gui_gc.py``, that collection destroyed the closed window's widgets in the allocating thread, and the
GUI thread crashed within a round or two (``QTimerInfoList::activateTimers``). Now automatic collection is off while a
session runs, so the thread never collects, and the script ends with "no crash". A crash ends the process with
SIGSEGV (exit status 139); ``python -X faulthandler`` prints every thread's stack.

Prints, per round, the threads in which the interpreter's collections ran, by generation. No timing is measured.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import collections
import gc
import threading
import time
from collections.abc import Callable

#: Lists the allocating thread creates at most per round (1,000 per batch, kept alive, released every 2,000 batches).
ALLOCATION_BUDGET = 3_000_000


def allocate() -> None:
    """Allocate container objects until this thread has run a full automatic collection, or the budget is spent."""
    full = gc.get_stats()[2]["collections"]
    junk: list[list[list[object]]] = []
    for _ in range(ALLOCATION_BUDGET // 1000):
        if gc.get_stats()[2]["collections"] != full:
            break
        junk.append([[] for _ in range(1000)])
        if len(junk) > 2000:
            junk.clear()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="windows to open and close")
    parser.add_argument("--steps", type=int, default=5, help="training steps per window")
    args = parser.parse_args(argv)

    from PySide6.QtCore import QCoreApplication, QEvent
    from PySide6.QtWidgets import QApplication

    from monoflow_studio.app import configure_process
    from monoflow_studio.main_window import MainWindow
    from monoflow_studio.run_spec import RunSpec
    from monoflow_studio.session import PAUSED, SessionOptions

    configure_process()
    app = QApplication.instance() or QApplication([])
    spec = RunSpec.default()
    spec.model = spec.model.replace(blocks=2)
    spec.training = spec.training.replace(batch_size=128, test_size=5000)
    options = SessionOptions(grid_resolution=48, frame_min_interval_s=0.3, n_samples=500, view_process=False)

    by_thread: collections.Counter[tuple[int, str]] = collections.Counter()

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            by_thread[(info["generation"], threading.current_thread().name.split("-")[0])] += 1

    gc.callbacks.append(note)

    def wait(condition: Callable[[], bool], timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            app.processEvents()
            time.sleep(0.002)
            if time.monotonic() > deadline:
                raise TimeoutError("the window did not get there in time")

    allocator: threading.Thread | None = None
    for i in range(args.rounds):
        window = MainWindow(spec.copy(), options=options, theme="light")
        window.show()
        if i > 0:  # the previous window's cycles are garbage now
            allocator = threading.Thread(target=allocate, name="allocator")
            allocator.start()
        wait(lambda w=window: w.state == PAUSED and w.density.frames_shown >= 1)
        window.train_action.trigger()
        wait(lambda w=window: w.step >= args.steps and w.density.frames_shown >= 2)
        if allocator is not None:
            allocator.join()
        window.close()
        window.deleteLater()
        QCoreApplication.sendPostedEvents(None, QEvent.Type.DeferredDelete)
        app.processEvents()
        del window
        print(f"round {i}: collections by (generation, thread) {dict(sorted(by_thread.items()))}", flush=True)
    print("no crash")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
