"""Run short ``monoflow train`` processes on a cold kernel cache and count those that do not exit 0.

Each run is a new process with its own empty Numba cache (``NUMBA_CACHE_DIR`` in a fresh temporary folder), so the
compiled kernels (``monoflow_core/fused/kernels*.py``) are compiled from scratch in it, as on a new machine. The
reported failure: such runs of 20-60 iterations sometimes aborted at exit (``terminate called without an active
exception``, exit status 134) after writing everything, when the interpreter ended the background compile thread
inside PyTorch's autograd engine. The goal: no non-zero exit in 20 runs.

Usage: ``python benchmarks/cold_exit.py [--runs 20] [--iterations 20,40,60] [--out PATH]``; the iteration counts
are used in turn. Prints one line per run and the count of non-zero exits; writes ``PATH.md`` and ``PATH.json``
(default ``benchmarks/results/cold_exit``) unless ``--out -``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, machine_header, machine_info, markdown_table, write_results

REPO = Path(__file__).resolve().parent.parent
ABORT = "terminate called"


def one_run(iterations: int, timeout: float) -> dict[str, Any]:
    """One ``monoflow train`` process on a fresh, empty kernel cache: exit status, abort message, wall time."""
    with tempfile.TemporaryDirectory(prefix="monoflow-cold-") as tmp:
        cache = Path(tmp) / "numba-cache"
        cache.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "MONOFLOW_KERNELS"}
        env["NUMBA_CACHE_DIR"] = str(cache)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        argv = [
            sys.executable,
            "-m",
            "monoflow_core",
            "train",
            "--data",
            "8gaussians",
            "--iterations",
            str(iterations),
            "--batch-size",
            "64",
            "--eval-every",
            "0",
            "--test-size",
            "200",
            "--out",
            str(Path(tmp) / "run"),
            "--no-progress",
        ]
        start = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
            code, stderr = done.returncode, done.stderr
        except subprocess.TimeoutExpired as expired:
            code = None
            stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else ""
        seconds = time.perf_counter() - start
        written = (Path(tmp) / "run" / "checkpoint.safetensors").is_file()
    return {
        "iterations": iterations,
        "exit": code,
        "abort": ABORT in (stderr or ""),
        "seconds": round(seconds, 1),
        "checkpoint_written": written,
        "kernels_failed": "unavailable" in (stderr or ""),
        "stderr_tail": (stderr or "")[-600:] if code != 0 else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20, help="number of cold-cache runs (default 20)")
    p.add_argument("--iterations", default="20,40,60", help="comma-separated iteration counts, used in turn")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds allowed per run (default 1200)")
    p.add_argument("--out", default=str(RESULTS_DIR / "cold_exit"), help="results path without suffix, or '-'")
    args = p.parse_args(argv)
    counts = [int(v) for v in args.iterations.split(",")]
    info = machine_info()
    runs = []
    for i in range(args.runs):
        r = one_run(counts[i % len(counts)], args.timeout)
        runs.append(r)
        print(
            f"run {i + 1}/{args.runs}: {r['iterations']} iterations, exit {r['exit']}"
            f"{' (abort)' if r['abort'] else ''}, {r['seconds']} s",
            flush=True,
        )
    failed = [r for r in runs if r["exit"] != 0]
    print(f"{len(failed)} of {len(runs)} cold-cache runs exited non-zero", flush=True)
    if args.out != "-":
        lines = ["# Clean exit of short runs on a cold kernel cache", ""]
        lines += machine_header(info, [command_line(argv and [sys.argv[0], *argv])])
        lines += [
            f"**{len(failed)} of {len(runs)} runs exited non-zero** ({sum(r['abort'] for r in runs)} with "
            f"'{ABORT} without an active exception'). Each run: `monoflow train --data 8gaussians "
            "--iterations N --batch-size 64 --eval-every 0 --test-size 200` in a new process with an empty "
            "`NUMBA_CACHE_DIR`, so the compiled kernels are compiled from scratch in every run.",
            "",
        ]
        lines += markdown_table(
            ["run", "iterations", "exit status", "abort message", "checkpoint written", "wall s"],
            [
                [
                    i + 1,
                    r["iterations"],
                    r["exit"],
                    "yes" if r["abort"] else "no",
                    "yes" if r["checkpoint_written"] else "no",
                    r["seconds"],
                ]
                for i, r in enumerate(runs)
            ],
        )
        lines.append("")
        write_results(args.out, lines, {"machine": info, "runs": runs, "non_zero_exits": len(failed)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
