"""Studio start as a user sees it: seconds after pressing Train until the first density frame, and until the
studio's own held-out test NLL first reaches a target.

The studio runs offscreen (``QT_QPA_PLATFORM=offscreen``) on its default preset (``quick-monotone``) with its
default :class:`~monoflow_studio.session.SessionOptions` (200 x 200 live grid, the view process, 2,000 held-out
points per frame) and the app's own process settings. The clock starts when the Train action is triggered on a
built, paused run; it stops at the first frame computed from a trained snapshot (step >= 1), and at the first
frame whose test NLL (nats, the studio's fixed held-out set) is at or below the target. A frame's NLL can only be
seen when a frame arrives, so the second figure includes the wait for the next frame.

Goals (issue 18): first frame within 0.5 s; 8gaussians at 2.90 nats and moons at 2.45 nats within 3 s.

Usage::

    python benchmarks/studio_first_frame.py [--targets 8gaussians:2.90,moons:2.45] [--rounds 3] [--max-seconds 30]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import statistics
import tempfile
import time
import warnings
from typing import Any

import common
import torch

from monoflow_studio.app import configure_process
from monoflow_studio.run_spec import DEFAULT_PRESET, RunSpec
from monoflow_studio.session import PAUSED, SessionOptions, ViewFrame

FIRST_FRAME_GOAL_S = 0.5
QUALITY_GOAL_S = 3.0


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def one_round(data: str, target: float, max_seconds: float) -> dict[str, Any]:
    """One fresh window: build, press Train, watch the frames."""
    from PySide6.QtCore import QEventLoop, QSettings
    from PySide6.QtWidgets import QApplication

    from monoflow_studio.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    settings = QSettings(os.path.join(tempfile.mkdtemp(), "studio.ini"), QSettings.Format.IniFormat)
    spec = RunSpec.from_preset(DEFAULT_PRESET, data=data)
    window = MainWindow(spec, options=SessionOptions(), settings=settings, theme="dark")
    window.show()

    def wait_until(cond: Any, timeout_s: float) -> None:
        end = time.perf_counter() + timeout_s
        while not cond() and time.perf_counter() < end:
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 10)

    seen: list[tuple[float, int, float | None]] = []

    def on_frame(frame: ViewFrame) -> None:
        nll = None if frame.eval is None else frame.eval.value
        seen.append((time.perf_counter(), frame.step, nll))

    window.session.frame.connect(on_frame)
    wait_until(lambda: window.state == PAUSED, 120)
    seen.clear()
    t0 = time.perf_counter()
    window.train_action.trigger()
    first: float | None = None
    reached: tuple[float, int, float] | None = None
    while time.perf_counter() - t0 < max_seconds and reached is None:
        wait_until(lambda: False, 0.01)
        for t, step, nll in seen:
            if first is None and step >= 1:
                first = t - t0
            if nll is not None and step >= 1 and nll <= target:
                reached = (t - t0, step, nll)
                break
    last_nll = next((nll for _, _, nll in reversed(seen) if nll is not None), None)
    window.close()
    return {
        "data": data,
        "target_nll_nats": target,
        "first_frame_s": first,
        "reached_s": None if reached is None else reached[0],
        "reached_step": None if reached is None else reached[1],
        "reached_nll_nats": None if reached is None else reached[2],
        "frames": len(seen),
        "last_nll_nats": last_nll,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="8gaussians:2.90,moons:2.45", help="DATA:NATS pairs, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="fresh windows per data set")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="give up on a target after this long")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "studio_first_frame"), help="output, no suffix")
    args = parser.parse_args(argv)
    targets = [(d, float(v)) for d, _, v in (item.partition(":") for item in args.targets.split(","))]
    configure_process()
    from monoflow_core import fused

    fused.kernels_ready(torch.float32, wait=True)  # as after the first start on a machine (see docs/performance.md)
    info = common.machine_info()
    commands = [common.command_line(argv)]
    warn_log = common.WarningLog()
    warnings.simplefilter("always")
    warnings.showwarning = warn_log
    results = []
    for data, target in targets:
        for r in range(args.rounds):
            res = one_round(data, target, args.max_seconds)
            res["round"] = r
            results.append(res)
            print(
                f"{data} round {r}: first frame {common.fmt(res['first_frame_s'], 2)} s; "
                f"{target} nats at {common.fmt(res['reached_s'], 2)} s (step {res['reached_step']})",
                flush=True,
            )
    md = ["# Studio start: first density frame and time to quality after pressing Train", ""]
    md += common.machine_header(info, commands)
    md += [
        f"Preset `{DEFAULT_PRESET}` (the studio's default), default session options (200 x 200 grid, view "
        "process, 2,000 held-out points per frame), a fresh window per round, the kernels already compiled. "
        "Seconds of wall time after the Train action; the NLL is the studio's own held-out test (nats).",
        "",
    ]
    rows = []
    for data, target in targets:
        mine = [r for r in results if r["data"] == data]
        firsts = [r["first_frame_s"] for r in mine if r["first_frame_s"] is not None]
        reached = [r["reached_s"] for r in mine if r["reached_s"] is not None]
        rows.append(
            [
                data,
                f"{target:.2f}",
                common.fmt(statistics.median(firsts), 2) if firsts else "none",
                f"<= {FIRST_FRAME_GOAL_S}: {verdict(bool(firsts) and statistics.median(firsts) <= FIRST_FRAME_GOAL_S)}",
                common.fmt(statistics.median(reached), 2)
                if len(reached) == len(mine)
                else f"reached in {len(reached)} of {len(mine)}",
                f"<= {QUALITY_GOAL_S}: "
                f"{'MET' if len(reached) == len(mine) and statistics.median(reached) <= QUALITY_GOAL_S else 'NOT MET'}",
                ", ".join(common.fmt(r["reached_s"], 2) for r in mine),
            ]
        )
    md += common.markdown_table(
        [
            "data",
            "target (nats)",
            "first frame, median (s)",
            "goal",
            "to target, median (s)",
            "goal",
            "to target, each round (s)",
        ],
        rows,
    )
    md += ["", f"Warnings during the runs: {dict(warn_log.counts) or 'none'}."]
    payload = {
        "benchmark": "studio_first_frame",
        "commands": commands,
        "machine": info,
        "note": common.SHARED_MACHINE_NOTE,
        "units": {"time": "seconds", "nll": "nats"},
        "warnings": dict(warn_log.counts),
        "results": results,
    }
    md_path, js_path = common.write_results(args.out, md, payload)
    print(f"Wrote {md_path} and {js_path}")


if __name__ == "__main__":
    main()
