"""Studio responsiveness: training throughput in the studio vs headless, density refresh, event-loop stalls.

Goals (issue 4): studio throughput >= 70% of the headless :class:`~monoflow_core.training.Trainer` on the same
model; a 200 x 200 density grid refreshed at least every 2 s during training; the longest event-loop stall
< 100 ms. The studio runs offscreen (``QT_QPA_PLATFORM=offscreen``) with the app's own process settings; the
headless and studio measurements alternate (``--rounds``) so that load from other jobs affects both alike. Each
studio round measures the steady state: after a few training steps and, with the view process (the default), once
its first frame has come (the frames before it come from the view thread while the child imports torch).

Usage::

    python benchmarks/studio_responsiveness.py [--seconds 20] [--rounds 2] [--blocks 10] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import itertools
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
from common import command_line

from monoflow_core.training import Trainer
from monoflow_studio.app import configure_process, freeze_heap_after_first_build
from monoflow_studio.run_spec import RunSpec
from monoflow_studio.session import PAUSED, SessionOptions, ViewFrame

GRID = 200
WARMUP_STEPS = 5


@dataclass
class StudioRun:
    it_per_s: float
    frame_intervals: list[float]
    frame_seconds: list[float]
    longest_stall_ms: float
    p99_gap_ms: float
    frames_in_process: int


def spec_for(blocks: int) -> RunSpec:
    spec = RunSpec.default()
    spec.model = spec.model.replace(blocks=blocks)
    return spec


def headless(spec: RunSpec, seconds: float) -> float:
    """Iterations per second of the bare core Trainer (no Qt, no views)."""
    trainer = Trainer(spec.model.replace(), spec.training.replace())
    for _ in range(WARMUP_STEPS):
        trainer.step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        trainer.step()
        n += 1
    return n / (time.perf_counter() - t0)


def studio(spec: RunSpec, seconds: float, **overrides: object) -> StudioRun:
    """Train in the real main window (offscreen) with a 200 x 200 live grid; probe the event loop at 10 ms.

    ``overrides``: :class:`SessionOptions` fields to change (e.g. ``frame_budget``, ``view_process``).
    """
    from PySide6.QtCore import QEventLoop, QSettings, QTimer
    from PySide6.QtWidgets import QApplication

    from monoflow_studio.main_window import MainWindow

    app = QApplication.instance() or QApplication([])
    settings = QSettings(os.path.join(tempfile.mkdtemp(), "studio.ini"), QSettings.Format.IniFormat)
    options = replace(SessionOptions(grid_resolution=GRID), **overrides)
    window = MainWindow(spec, options=options, settings=settings, theme="dark")
    freeze_heap_after_first_build(window)
    window.show()
    loop = QEventLoop()

    def wait_until(cond, timeout_s: float) -> None:
        end = time.perf_counter() + timeout_s
        while not cond() and time.perf_counter() < end:
            app.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
            time.sleep(0.005)

    frame_times: list[float] = []
    frame_seconds: list[float] = []
    in_process: list[bool] = []

    def on_frame(frame: ViewFrame) -> None:
        frame_times.append(time.perf_counter())
        frame_seconds.append(frame.seconds)
        in_process.append(frame.computed_in_process)

    window.session.frame.connect(on_frame)
    wait_until(lambda: window.state == PAUSED, 120)
    window.train_action.trigger()
    wait_until(lambda: window.step >= WARMUP_STEPS, 120)
    if options.view_process:
        # Steady state: the first frames come from the view thread while the child process imports torch.
        wait_until(lambda: any(in_process), 120)
    for record in (frame_times, frame_seconds, in_process):
        record.clear()
    gaps: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    probe = QTimer()
    probe.setInterval(10)
    probe.timeout.connect(tick)
    start_step, t0 = window.step, time.perf_counter()
    last[0] = t0
    probe.start()
    QTimer.singleShot(int(seconds * 1000), loop.quit)
    loop.exec()
    probe.stop()
    wall = time.perf_counter() - t0
    steps = window.step - start_step
    window.close()
    intervals = [b - a for a, b in itertools.pairwise(frame_times)]
    ordered = sorted(gaps)
    return StudioRun(
        it_per_s=steps / wall,
        frame_intervals=intervals,
        frame_seconds=frame_seconds,
        longest_stall_ms=max(gaps) * 1000,
        p99_gap_ms=ordered[int(0.99 * (len(ordered) - 1))] * 1000,
        frames_in_process=sum(in_process),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement time per round and mode")
    parser.add_argument("--rounds", type=int, default=2, help="alternating headless / studio rounds")
    parser.add_argument("--blocks", type=int, default=10, help="flow blocks (the paper: 10)")
    parser.add_argument("--out", default=None, help="also write the report (markdown) here")
    parser.add_argument(
        "--frame-budget",
        type=float,
        default=None,
        help="the views' share of a core (default: the studio's, SessionOptions.frame_budget, or "
        "thread_frame_budget with --no-view-process)",
    )
    parser.add_argument(
        "--grid-chunk",
        type=int,
        default=None,
        help="points per pass of the live grid (default: the studio's, SessionOptions.grid_chunk, or "
        "thread_grid_chunk with --no-view-process)",
    )
    parser.add_argument(
        "--no-view-process",
        action="store_true",
        help="compute the frames in the studio's view thread instead of its view process",
    )
    args = parser.parse_args(argv)

    configure_process()
    from monoflow_core import fused

    # the engine's compiled kernels ready before the first round (configure_process started loading them), so that
    # the headless and the studio rounds run on the same kernels
    fused.kernels_ready(torch.float32, wait=True)
    spec = spec_for(args.blocks)
    defaults = SessionOptions()
    thread = args.no_view_process
    budget = (
        args.frame_budget
        if args.frame_budget is not None
        else (defaults.thread_frame_budget if thread else defaults.frame_budget)
    )
    chunk = (
        args.grid_chunk
        if args.grid_chunk is not None
        else (defaults.thread_grid_chunk if thread else defaults.grid_chunk)
    )
    overrides = {
        "view_process": not thread,
        "frame_budget" if not thread else "thread_frame_budget": budget,
        "grid_chunk" if not thread else "thread_grid_chunk": chunk,
    }
    heads: list[float] = []
    runs: list[StudioRun] = []
    for r in range(args.rounds):
        heads.append(headless(spec, args.seconds))
        print(f"round {r + 1}: headless {heads[-1]:.2f} it/s", flush=True)
        runs.append(studio(spec, args.seconds, **overrides))
        print(
            f"round {r + 1}: studio {runs[-1].it_per_s:.2f} it/s, stall {runs[-1].longest_stall_ms:.0f} ms, "
            f"frames {len(runs[-1].frame_seconds)}",
            flush=True,
        )

    head = statistics.mean(heads)
    stud = statistics.mean(r.it_per_s for r in runs)
    intervals = [i for r in runs for i in r.frame_intervals]
    frame_s = [s for r in runs for s in r.frame_seconds]
    stall = max(r.longest_stall_ms for r in runs)
    p99 = max(r.p99_gap_ms for r in runs)
    ratio = stud / head if head > 0 else float("nan")
    mean_interval = statistics.mean(intervals) if intervals else float("nan")
    worst_interval = max(intervals) if intervals else float("nan")

    def verdict(ok: bool) -> str:
        return "meets goal" if ok else "MISSES goal"

    lines = [
        "# Studio responsiveness",
        "",
        f"Command: `{command_line(None if argv is None else [__file__, *argv])}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} intra-op thread(s)), {platform.platform()}.",
        "",
        f"Model: the paper's toy Monotone Flow ({args.blocks} blocks, DenseNet G 3x16, CPila), batch "
        f"{spec.training.batch_size}, float32, CPU. Studio: offscreen main window, live grid {GRID} x {GRID}, "
        f"{args.rounds} alternating rounds of {args.seconds:g} s per mode, view frame budget "
        f"{budget:g}, grid passes of {chunk:,} points, frames computed in the "
        f"{'view thread' if thread else 'view process'} ({sum(r.frames_in_process for r in runs)} of "
        f"{len(frame_s)} frames came from the view process).",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
        f"| headless Trainer | {head:.2f} it/s (rounds: {', '.join(f'{h:.2f}' for h in heads)}) | |",
        f"| studio training | {stud:.2f} it/s (rounds: {', '.join(f'{r.it_per_s:.2f}' for r in runs)}) | |",
        f"| studio / headless | {ratio:.0%} | >= 70%: {verdict(ratio >= 0.7)} |",
        f"| density refresh interval ({GRID}x{GRID}) during training | mean {mean_interval:.2f} s, worst "
        f"{worst_interval:.2f} s ({len(intervals)} intervals) | <= 2 s: {verdict(mean_interval <= 2.0)} (mean) |",
        f"| worker time per frame (grid + samples + test NLL) | mean {statistics.mean(frame_s):.2f} s, max "
        f"{max(frame_s):.2f} s | |"
        if frame_s
        else "| worker time per frame | no frames | |",
        f"| longest event-loop stall (10 ms probe) | {stall:.0f} ms (99th percentile gap {p99:.0f} ms) | "
        f"< 100 ms: {verdict(stall < 100)} |",
        "",
    ]
    report = "\n".join(lines)
    print()
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
