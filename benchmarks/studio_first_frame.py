"""Studio start as a user sees it: seconds after pressing Train until the first density frame, and until the
studio's own held-out test NLL first reaches a target.

The studio runs offscreen (``QT_QPA_PLATFORM=offscreen``) on its default preset (``quick-monotone``) with its
default :class:`~monoflow_studio.session.SessionOptions` (200 x 200 live grid, coarse 64 x 64 first frames, the view
process, 2,000 held-out points per frame) and the app's own process settings. The window's event loop runs as in
the app (``QEventLoop.exec``: idle between events; a loop polling ``processEvents`` would keep the GIL and a core
busy and slow training and the frames down). The clock starts when the Train action is triggered on a built,
paused run; it stops at the first frame computed from a trained snapshot (step >= 1), at the first such frame on
the full grid, and at the first frame whose test NLL (nats, the studio's fixed held-out set) is at or below the
target. A frame's NLL can only be seen when a frame arrives, so that figure includes the wait for the next frame.

When Train is pressed (``--press-at``, a comma-separated list; each mode gets ``--rounds`` fresh windows):

* ``shown``: once the untrained model's picture is on screen (what a user sees before pressing Train);
* ``built``: as soon as the run is built and paused (the earliest possible press: the view process may still be
  starting, and the untrained frame may still be in flight);
* ``ready``: once the view process is also ready.

Each round records whether the view process was ready when Train was pressed, and the load average.

Goals (issue 18): first frame within 0.5 s; 8gaussians at 2.90 nats and moons at 2.45 nats within 3 s.

Usage::

    python benchmarks/studio_first_frame.py [--targets 8gaussians:2.90,moons:2.45] [--rounds 3]
        [--press-at shown,built] [--max-seconds 30]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import torch

from monoflow_studio.app import configure_process
from monoflow_studio.run_spec import DEFAULT_PRESET, RunSpec
from monoflow_studio.session import PAUSED, SessionOptions, ViewFrame

FIRST_FRAME_GOAL_S = 0.5
QUALITY_GOAL_S = 3.0
PRESS_MODES = ("shown", "built", "ready")


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


def run_loop_until(done: Callable[[], bool], timeout_s: float) -> None:
    """Run the Qt event loop (idle between events, as ``app.exec()``) until ``done()`` or ``timeout_s``."""
    from PySide6.QtCore import QEventLoop, QTimer

    end = time.perf_counter() + timeout_s
    loop = QEventLoop()
    timer = QTimer()
    timer.setInterval(5)  # how often the condition is looked at: the figures' resolution
    timer.timeout.connect(lambda: loop.quit() if done() or time.perf_counter() >= end else None)
    timer.start()
    if not (done() or time.perf_counter() >= end):
        loop.exec()
    timer.stop()


def one_round(data: str, target: float, max_seconds: float, press_at: str) -> dict[str, Any]:
    """One fresh window: build, press Train (when ``press_at`` says), watch the frames."""
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from monoflow_studio.main_window import MainWindow

    QApplication.instance() or QApplication([])
    settings = QSettings(os.path.join(tempfile.mkdtemp(), "studio.ini"), QSettings.Format.IniFormat)
    spec = RunSpec.from_preset(DEFAULT_PRESET, data=data)
    options = SessionOptions()
    opened = time.perf_counter()
    window = MainWindow(spec, options=options, settings=settings, theme="dark")
    seen: list[tuple[float, int, float | None, int]] = []

    def on_frame(frame: ViewFrame) -> None:
        nll = None if frame.eval is None else frame.eval.value
        seen.append((time.perf_counter(), frame.step, nll, int(frame.log_density.shape[0])))

    window.session.frame.connect(on_frame)
    window.show()
    session = window.session
    ready_at: list[float] = []

    def process_ready() -> bool:
        if not ready_at and session.view_process_state() == "ready":
            ready_at.append(time.perf_counter())
        return bool(ready_at)

    def pressable() -> bool:
        process_ready()
        if window.state != PAUSED:
            return False
        if press_at == "built":
            return True
        if press_at == "shown":
            return window.density.frames_shown >= 1
        return process_ready() and window.density.frames_shown >= 1

    run_loop_until(pressable, 240)
    state_at_train = session.view_process_state()
    load_at_train = common.load_average()
    built_s = time.perf_counter() - opened
    seen.clear()
    t0 = time.perf_counter()
    window.train_action.trigger()
    first: tuple[float, int, int] | None = None
    first_full: float | None = None
    reached: tuple[float, int, float] | None = None

    def check() -> bool:
        nonlocal first, first_full, reached
        process_ready()
        for t, step, nll, side in seen:
            if step < 1:
                continue
            if first is None:
                first = (t - t0, step, side)
            if first_full is None and side == options.grid_resolution:
                first_full = t - t0
            if reached is None and nll is not None and nll <= target:
                reached = (t - t0, step, nll)
        return reached is not None and first_full is not None

    run_loop_until(check, max_seconds)
    last_nll = next((nll for _, _, nll, _ in reversed(seen) if nll is not None), None)
    window.close()
    return {
        "data": data,
        "press_at": press_at,
        "target_nll_nats": target,
        "first_frame_s": None if first is None else first[0],
        "first_frame_step": None if first is None else first[1],
        "first_frame_resolution": None if first is None else first[2],
        "first_full_frame_s": first_full,
        "reached_s": None if reached is None else reached[0],
        "reached_step": None if reached is None else reached[1],
        "reached_nll_nats": None if reached is None else reached[2],
        "frames": len(seen),
        "last_nll_nats": last_nll,
        "seconds_open_to_train": built_s,
        "view_process_at_train": state_at_train,
        "view_process_ready_after_open_s": ready_at[0] - opened if ready_at else None,
        "loadavg_at_train": load_at_train,
    }


def median_or_none(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def summary_rows(results: list[dict[str, Any]], targets: list[tuple[str, float]], modes: list[str]) -> list[list]:
    rows = []
    for press_at in modes:
        for data, target in targets:
            mine = [r for r in results if r["data"] == data and r["press_at"] == press_at]
            if not mine:
                continue
            first = median_or_none([r["first_frame_s"] for r in mine])
            full = median_or_none([r["first_full_frame_s"] for r in mine])
            all_reached = all(r["reached_s"] is not None for r in mine)
            reached = median_or_none([r["reached_s"] for r in mine]) if all_reached else None
            firsts_ok = all(r["first_frame_s"] is not None for r in mine)
            n_reached = sum(r["reached_s"] is not None for r in mine)
            reached_text = common.fmt(reached, 2) if all_reached else f"reached in {n_reached} of {len(mine)}"
            rows.append(
                [
                    press_at,
                    data,
                    ", ".join(common.fmt(r["seconds_open_to_train"], 1) for r in mine),
                    ", ".join(common.fmt(r["view_process_ready_after_open_s"], 1) for r in mine),
                    ", ".join(common.fmt(r["first_frame_s"], 2) for r in mine),
                    ", ".join(f"{r['first_frame_resolution']}@{r['first_frame_step']}" for r in mine),
                    f"{common.fmt(first, 2)}: "
                    f"{verdict(firsts_ok and first is not None and first <= FIRST_FRAME_GOAL_S)}",
                    common.fmt(full, 2),
                    f"{target:.2f}",
                    ", ".join(common.fmt(r["reached_s"], 2) for r in mine),
                    f"{reached_text}: {verdict(reached is not None and reached <= QUALITY_GOAL_S)}",
                    ", ".join(f"{r['loadavg_at_train'][0]:.1f}" for r in mine),
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="8gaussians:2.90,moons:2.45", help="DATA:NATS pairs, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="fresh windows per data set and press mode")
    parser.add_argument(
        "--press-at", default="shown,built", help=f"when Train is pressed, comma-separated: {', '.join(PRESS_MODES)}"
    )
    parser.add_argument("--max-seconds", type=float, default=30.0, help="give up on a target after this long")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "studio_first_frame"), help="output, no suffix")
    parser.add_argument(
        "--rerender", metavar="JSON", help="no studio: rewrite OUT.md/OUT.json from an earlier run's JSON"
    )
    args = parser.parse_args(argv)
    if args.rerender:
        rerender(args)
        return
    targets = [(d, float(v)) for d, _, v in (item.partition(":") for item in args.targets.split(","))]
    modes = [m.strip() for m in args.press_at.split(",") if m.strip()]
    if not modes or any(m not in PRESS_MODES for m in modes):
        parser.error(f"--press-at: comma-separated values of {', '.join(PRESS_MODES)}, got {args.press_at!r}")
    configure_process()
    from monoflow_core import fused

    fused.kernels_ready(torch.float32, wait=True)  # as after the first start on a machine (see docs/performance.md)
    info = common.machine_info()
    commands = [common.command_line(argv)]
    warn_log = common.WarningLog()
    warnings.simplefilter("always")
    warnings.showwarning = warn_log
    results = []
    for press_at in modes:
        for data, target in targets:
            for r in range(args.rounds):
                res = one_round(data, target, args.max_seconds, press_at)
                res["round"] = r
                results.append(res)
                print(
                    f"{data}, Train pressed when {press_at} (view process {res['view_process_at_train']}) round {r}: "
                    f"first frame {common.fmt(res['first_frame_s'], 2)} s "
                    f"({res['first_frame_resolution']}^2 grid, step {res['first_frame_step']}), full grid "
                    f"{common.fmt(res['first_full_frame_s'], 2)} s; {target} nats at "
                    f"{common.fmt(res['reached_s'], 2)} s (step {res['reached_step']}); load {res['loadavg_at_train']}",
                    flush=True,
                )
    payload = {
        "benchmark": "studio_first_frame",
        "commands": commands,
        "machine": info,
        "loadavg_at_end": common.load_average(),
        "note": common.SHARED_MACHINE_NOTE,
        "settings": {"targets": targets, "press_at": modes, "rounds": args.rounds, "max_seconds": args.max_seconds},
        "units": {"time": "seconds", "nll": "nats"},
        "warnings": dict(warn_log.counts),
        "results": results,
    }
    md_path, js_path = common.write_results(args.out, render(payload), payload)
    print(f"Wrote {md_path} and {js_path}")


def rerender(args: argparse.Namespace) -> None:
    """Rewrite the Markdown and JSON of an earlier run from its JSON (no studio; the same figures)."""
    payload = json.loads(Path(args.rerender).read_text())
    results = payload["results"]
    if "settings" not in payload:  # (a JSON written before the settings were recorded: read them off the rounds)
        targets = list(dict.fromkeys((r["data"], r["target_nll_nats"]) for r in results))
        modes = list(dict.fromkeys(r["press_at"] for r in results))
        payload["settings"] = {"targets": targets, "press_at": modes}
    payload["commands"] = [c for c in payload["commands"] if not c.startswith("# re-rendered")]
    payload["commands"].append("# re-rendered from the JSON, no studio: " + common.command_line())
    md_path, js_path = common.write_results(args.out, render(payload), payload)
    print(f"Re-rendered {args.rerender} into {md_path} and {js_path}")


def render(payload: dict[str, Any]) -> list[str]:
    """The Markdown page of a run's payload."""
    results, settings = payload["results"], payload["settings"]
    targets = [(d, float(t)) for d, t in settings["targets"]]
    options = SessionOptions()
    md = ["# Studio start: first density frame and time to quality after pressing Train", ""]
    md += common.machine_header(payload["machine"], payload["commands"])
    md += [
        f"Load average at the end: {payload['loadavg_at_end']}.",
        "",
        f"Preset `{DEFAULT_PRESET}` (the studio's default), default session options ({options.grid_resolution} x "
        f"{options.grid_resolution} grid, first frames {options.first_frame_resolution} x "
        f"{options.first_frame_resolution}, view process, {options.eval_points:,} held-out points per frame), a "
        "fresh window per round, the kernels already compiled, the Qt event loop idle between events as in the app. "
        "Seconds of wall time after the Train action; the NLL is the studio's own held-out test (nats), seen only "
        "when a frame arrives. *Train pressed when*: `shown` = the untrained picture is on screen, `built` = the "
        "run is built (the earliest press), `ready` = the view process is ready too. *Open to Train*: seconds from "
        "creating the window to pressing Train; *view process ready*: seconds from creating the window until the "
        "view process was ready (- : not within the round).",
        "",
    ]
    md += common.markdown_table(
        [
            "Train pressed when",
            "data",
            "open to Train, each round (s)",
            "view process ready, each round (s)",
            "first frame, each round (s)",
            "its grid@step",
            f"first frame, median (s): goal <= {FIRST_FRAME_GOAL_S}",
            "first full frame, median (s)",
            "target (nats)",
            "to target, each round (s)",
            f"to target, median (s): goal <= {QUALITY_GOAL_S}",
            "load (1 min) at Train",
        ],
        summary_rows(results, targets, list(settings["press_at"])),
    )
    md += ["", f"Warnings during the runs: {dict(payload['warnings']) or 'none'}."]
    return md


if __name__ == "__main__":
    main()
