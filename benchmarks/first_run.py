"""The first run on a machine: when does a process with an empty kernel cache reach the warm training step time?

The compiled kernels (``monoflow_core/fused/kernels*.py``) are compiled at their first use in a process, and the
fused path waits for them (``monoflow_core.fused.SETTINGS.wait``, so that results never depend on how long a
compile took);
Numba caches the machine code in the per-user folder of ``monoflow_core.kernel_cache``, and later processes load it.
This benchmark empties a temporary cache (``MONOFLOW_CACHE_DIR``), then runs, each as a new process:

1. *cold*: a toy training run (``8gaussians``, the default model and batch) on the empty cache, printing the time
   since the process was started at the end of every step, the kernels' notices, and what each kernel's first call
   cost (the compile of each piece);
2. *warm*: the same run again, on the cache the cold run filled (the warm step time is its median step, steps
   11 to N);
3. *after warmup* (with ``--warmup``): ``monoflow warmup --dtype float32`` on a second empty cache, timed, then the
   run (what a user gets from an image prepared with ``monoflow warmup``).

For each run it reports the seconds from the process's start until its steps reach the warm step time (the first
step from which the median of 5 consecutive steps is within 20% of it). The goal of the project: at most 10 s for
a cold first process.

Usage: ``python benchmarks/first_run.py [--steps 60] [--warmup] [--out PATH]``; writes ``PATH.md`` /
``PATH.json`` (default ``benchmarks/results/first_run``) unless ``--out -``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, machine_header, machine_info, markdown_table, write_results

REPO = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, time
started = float(sys.argv[1])
import torch
torch.set_num_threads(1)
from monoflow_core import FlowConfig
from monoflow_core.fused import COMPILER, kernels, kernels_fold
from monoflow_core.training import TrainConfig, Trainer
COMPILER.notice = lambda text: print(json.dumps({"notice": text, "at": time.time() - started}), flush=True)
first = {}
for module, name in ((kernels_fold, "fold_forward"), (kernels_fold, "fold_backward"), (kernels, "solve_run"),
                     (kernels, "backward_run")):
    original = getattr(module, name)
    def timed(*a, _o=original, _n=name):
        t = time.perf_counter()
        r = _o(*a)
        first.setdefault(_n, round(time.perf_counter() - t, 2))  # the first call: the compile or the cache load
        return r
    setattr(module, name, timed)
imported = time.time() - started
torch.manual_seed(0)
trainer = Trainer(FlowConfig(), TrainConfig(data="8gaussians", eval_every=0, seed=0))
ends, steps = [], []
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    trainer.step()
    steps.append(time.perf_counter() - t)
    ends.append(time.time() - started)
print(json.dumps({"imported_s": imported, "step_end_s": ends, "step_s": steps, "first_call_s": first}), flush=True)
"""


def run_child(cache: Path, steps: int, timeout: float) -> dict[str, Any]:
    """One training process on the kernel cache ``cache``; its per-step times and notices."""
    env = {k: v for k, v in os.environ.items() if k not in ("MONOFLOW_KERNELS", "NUMBA_CACHE_DIR")}
    env["MONOFLOW_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    start = time.time()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, repr(start), str(steps)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise SystemExit(f"the training process failed:\n{done.stderr[-3000:]}")
    docs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = docs[-1]
    result["notices"] = [(round(d["at"], 1), d["notice"]) for d in docs[:-1]]
    result["wall_s"] = time.time() - start
    result["solver_warnings"] = done.stderr.count("SolverWarning") + done.stderr.count("did not converge")
    return result


def reach(result: dict[str, Any], warm_step: float, window: int = 5, slack: float = 1.2) -> float | None:
    """Seconds from the process's start to the end of the first step from which ``window`` consecutive steps have a
    median within ``slack`` times the warm step time (None: never within the run)."""
    steps, ends = result["step_s"], result["step_end_s"]
    for i in range(len(steps) - window + 1):
        if statistics.median(steps[i : i + window]) <= slack * warm_step:
            return float(ends[i])
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per process (default 60)")
    p.add_argument("--warmup", action="store_true", help="also time 'monoflow warmup' and the run after it")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per process (default 3600)")
    p.add_argument("--out", default=str(RESULTS_DIR / "first_run"), help="results path without suffix, or '-'")
    args = p.parse_args(argv)
    info = machine_info()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="monoflow-first-run-") as tmp:
        cache = Path(tmp) / "cache"  # empty: nothing compiled yet
        runs["cold"] = run_child(cache, args.steps, args.timeout)
        runs["warm"] = run_child(cache, args.steps, args.timeout)
        if args.warmup:
            prepared = Path(tmp) / "prepared"
            env = {k: v for k, v in os.environ.items() if k not in ("MONOFLOW_KERNELS", "NUMBA_CACHE_DIR")}
            env.update(MONOFLOW_CACHE_DIR=str(prepared), PYTHONPATH=str(REPO))
            t0 = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "monoflow_core", "warmup", "--dtype", "float32"],
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            warmup_s = time.perf_counter() - t0
            print(f"monoflow warmup --dtype float32: exit {done.returncode}, {warmup_s:.1f} s", flush=True)
            runs["after warmup"] = run_child(prepared, args.steps, args.timeout)
            runs["after warmup"]["warmup_command_s"] = round(warmup_s, 1)
    warm_step = statistics.median(runs["warm"]["step_s"][10:])
    table = []
    for name, r in runs.items():
        at = reach(r, warm_step)
        r["reaches_warm_step_s"] = at
        first = r["step_end_s"][0]
        print(
            f"{name}: import {r['imported_s']:.1f} s, first step done at {first:.1f} s, warm step time reached at "
            f"{'never' if at is None else f'{at:.1f} s'}; first calls {r['first_call_s']}; notices "
            f"{[n for _, n in r['notices']]}",
            flush=True,
        )
        table.append(
            [
                name,
                f"{r['imported_s']:.1f}",
                f"{first:.1f}",
                "not within the run" if at is None else f"{at:.1f}",
                f"{statistics.median(r['step_s'][10:]) * 1e3:.1f}",
                ", ".join(f"{k} {v}" for k, v in r["first_call_s"].items()),
                r["solver_warnings"],
            ]
        )
    print(f"warm step time: {warm_step * 1e3:.1f} ms", flush=True)
    if args.out != "-":
        lines = ["# The first run: a cold process against the warm step time", ""]
        lines += machine_header(info, [command_line(argv and [sys.argv[0], *argv])])
        lines += [
            f"Toy training (8gaussians, default model and batch, one thread), {args.steps} steps per process; "
            f"warm step time {warm_step * 1e3:.1f} ms (median of the warm run's steps 11-{args.steps}). "
            "*reaches warm step*: seconds from the process's start to the first step from which 5 steps in a "
            "row have a median within 20% of it. *first calls*: seconds of each kernel's first call (its "
            "compile, or its load from the cache).",
            "",
        ]
        lines += markdown_table(
            [
                "process",
                "imports s",
                "first step done s",
                "reaches warm step s",
                "median step ms (11-N)",
                "first calls s",
                "solver warnings",
            ],
            table,
        )
        lines.append("")
        for name, r in runs.items():
            for at, text in r["notices"]:
                lines.append(f"- {name}, at {at} s: {text}")
        lines.append("")
        write_results(args.out, lines, {"machine": info, "warm_step_s": warm_step, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
