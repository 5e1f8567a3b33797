"""Application setup and the ``monoflow-studio`` command line.

``monoflow-studio [--data NAME] [--preset NAME] [--checkpoint FILE] [--start] [--theme MODE]``: opens the studio
on a preset (default: the paper's Monotone Flow on 8gaussians; ``--preset digits-cpu`` for an image run),
optionally on another 2-D data set, optionally with a checkpoint, and with ``--start`` begins training at once.
Importing this module needs no display: Qt is only started inside :func:`main`.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from monoflow_core.data import TOY_DATASETS

if TYPE_CHECKING:
    from .main_window import MainWindow
    from .run_spec import RunSpec

__all__ = ["build_parser", "configure_process", "freeze_heap_after_first_build", "main", "spec_from_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monoflow-studio",
        description="Train and explore Monotone Flows (Ahn et al., NeurIPS 2022) live, on 2-D toy densities "
        "or on images (--preset digits-cpu).",
    )
    parser.add_argument(
        "--data", choices=TOY_DATASETS, help="2-D toy data set of a 2-D preset (default: the preset's, 8gaussians)"
    )
    parser.add_argument(
        "--preset",
        default=None,
        help="shipped preset name or JSON file (default: quick-monotone; paper-toy-monotone is the "
        "paper's Table 1 model; digits-cpu trains an image flow on 8x8 digits)",
    )
    parser.add_argument("--checkpoint", default=None, help="open this checkpoint (.safetensors) at start")
    parser.add_argument("--start", action="store_true", help="start training at once")
    parser.add_argument(
        "--theme",
        choices=("system", "light", "dark"),
        default=None,
        help="colour theme (default: the last one used, else follow the system)",
    )
    return parser


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The first run's configuration from the parsed arguments.

    Raises:
        ValueError: unknown preset, or a preset the studio cannot run (neither a 2-D density nor an image run
            whose data it can read; the message says what to change).
    """
    from .run_spec import DEFAULT_PRESET, RunSpec

    spec = RunSpec.from_preset(args.preset or DEFAULT_PRESET)
    if args.data:
        spec.training = spec.training.replace(data=args.data)
    spec.check_studio()
    return spec


#: The GIL switch interval of the studio's process, in seconds (Python's default is 0.005).
SWITCH_INTERVAL_S = 0.001


class KernelNotices:
    """The engine's notices about its compiled kernels (``monoflow_core.fused.COMPILER.notice``), held until
    a receiver is connected (the compile starts before the window exists) and then passed on as they come. They may
    come from the background compile thread: the receiver must be thread-safe (a Qt signal's ``emit`` is)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: list[str] = []
        self._receiver: Callable[[str], None] | None = None

    def __call__(self, text: str) -> None:
        with self._lock:
            if self._receiver is None:
                self._held.append(text)
                return
            receiver = self._receiver
        receiver(text)

    def connect(self, receiver: Callable[[str], None]) -> None:
        """Pass the held notices, and every later one, to ``receiver``."""
        with self._lock:
            held, self._held, self._receiver = self._held, [], receiver
        for text in held:
            receiver(text)


#: Where the studio's process sends the kernels' notices: the main window's log and status bar.
KERNEL_NOTICES = KernelNotices()


def configure_process() -> None:
    """Process-wide settings that keep the event loop responsive next to the training thread.

    * torch's intra-op threads stay off one core, so the worker never starves the GUI thread of CPU;
    * glibc's malloc serves the engine's mid-sized temporaries from the heap (:mod:`monoflow_core.runtime`);
    * a 1 ms GIL switch interval: every Python callback of a repaint (pyqtgraph paints in Python) must take the
      GIL back from the worker, and with the default 5 ms a repaint of a few dozen items could wait for a
      hundred milliseconds;
    * antialiased plots (pyqtgraph), here so that the benchmarks measure the studio as it paints;
    * the engine's compiled kernels start loading (or, the first time on a machine, compiling) in the background
      now, not at the first training step; their notices (compiling, ready) are kept in :data:`KERNEL_NOTICES`
      until the window shows them.
    """
    import torch

    from monoflow_core import fused
    from monoflow_core.runtime import tune_allocator

    tune_allocator()
    fused.COMPILER.notice = KERNEL_NOTICES
    fused.kernels_ready(torch.float32)
    import pyqtgraph as pg

    pg.setConfigOptions(antialias=True)  # smooth curves (the benchmarks measure the studio with it, too)
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, min(torch.get_num_threads(), cores - 1)))
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def freeze_heap_after_first_build(window: MainWindow) -> None:
    """Move every object alive once the first run is built into the collector's permanent generation.

    By then the process holds ~400,000 container objects (torch, its optimizer's lazy imports, Qt, pyqtgraph), and
    a full collection walks all of them while holding the GIL: measured 150-330 ms here, a stall of the event loop
    and of training whenever the GUI's allocations trigger one. Frozen, they are never walked again; later
    collections see only what the session allocates afterwards. One collection first (a few hundred ms, once), so
    that garbage cycles of the start-up are freed rather than frozen.
    """
    from PySide6.QtCore import Qt

    def freeze(_info: object) -> None:
        gc.collect()
        gc.freeze()

    window.session.built.connect(freeze, Qt.ConnectionType.SingleShotConnection)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the studio; returns the process exit status (2 for invalid arguments)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        spec = spec_from_args(args)
    except ValueError as err:
        parser.print_usage(sys.stderr)
        print(f"monoflow-studio: error: {err}", file=sys.stderr)
        return 2
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        print(f"monoflow-studio: error: --checkpoint {args.checkpoint}: no such file", file=sys.stderr)
        return 2

    from PySide6.QtWidgets import QApplication

    from .main_window import APPLICATION, ORGANIZATION, MainWindow

    configure_process()
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "monoflow-studio"])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("monoflow studio")
    window = MainWindow(spec, theme=args.theme)
    KERNEL_NOTICES.connect(lambda text: window.session.message.emit("info", text))
    freeze_heap_after_first_build(window)
    window.show()
    if args.checkpoint:
        window.open_checkpoint(args.checkpoint)
    if args.start:
        window.session.start()
    # Ctrl-C in the terminal closes the window cleanly (the worker stops after its current step).
    signal.signal(signal.SIGINT, lambda *_: window.close())
    return int(app.exec())
