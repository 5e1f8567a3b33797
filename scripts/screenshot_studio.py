"""Screenshot of the studio mid-training, for the README: ``python scripts/screenshot_studio.py``.

Runs the real main window offscreen (``QT_QPA_PLATFORM=offscreen``, no display needed), trains the paper's
Monotone Flow on a toy data set for ``--seconds`` seconds and saves ``QMainWindow.grab()`` as a PNG.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "studio.png"), help="PNG to write")
    parser.add_argument("--seconds", type=float, default=60.0, help="training time before the screenshot")
    parser.add_argument("--data", default="8gaussians", help="toy data set")
    parser.add_argument("--blocks", type=int, default=10, help="flow blocks (the paper: 10)")
    parser.add_argument("--theme", default="dark", choices=("light", "dark", "system"))
    parser.add_argument("--size", default="1500x900", help="window size, WIDTHxHEIGHT")
    args = parser.parse_args(argv)

    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from monoflow_studio.app import configure_process
    from monoflow_studio.main_window import MainWindow
    from monoflow_studio.run_spec import RunSpec
    from monoflow_studio.session import PAUSED, TRAINING

    configure_process()
    app = QApplication.instance() or QApplication([])
    spec = RunSpec.default()
    spec.model = spec.model.replace(blocks=args.blocks)
    spec.training = spec.training.replace(data=args.data)
    # A throwaway settings file: the screenshot never depends on (or changes) the user's saved layout.
    settings = QSettings(os.path.join(tempfile.mkdtemp(), "studio.ini"), QSettings.Format.IniFormat)
    window = MainWindow(spec, settings=settings, theme=args.theme)
    width, height = (int(v) for v in args.size.lower().split("x"))
    window.resize(width, height)
    window.density.overlay_box.setChecked(False)
    window.show()

    def pump(seconds: float, until=lambda: False) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end and not until():
            app.processEvents()
            time.sleep(0.01)

    pump(120, lambda: window.state == PAUSED)
    window.train_action.trigger()
    pump(10, lambda: window.state == TRAINING)
    pump(args.seconds)
    # Let the frame in flight land so the view and the curves show the same moment.
    frames = window.density.frames_shown
    pump(30, lambda: window.density.frames_shown > frames)
    pump(0.6)  # one curve redraw
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ok = window.grab().save(str(out), "PNG")
    print(f"{'saved' if ok else 'FAILED to save'} {out} at step {window.step}")
    window.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
