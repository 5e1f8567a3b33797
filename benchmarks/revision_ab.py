"""This checkout's engine against another git revision's, in alternating processes (A/B/B/A ...).

This machine's speed drifts by up to 1.8x within minutes, so two benchmark runs minutes apart mislead. Here each
version runs in its own fresh process (the other revision from a temporary ``git worktree``, with its own compiled
kernels), one after the other, several times, in the order A B B A A B ...; the medians over the runs are compared.
No interface is shared between the versions: each process imports its own complete engine (the fused path as the
package ``monoflow_core.fused``, or in revisions before it as the module ``monoflow_core.fast``).

Each process measures, on the paper's toy model (10 monotone blocks, DenseNet G 3x16, CPila, float32, seed 0):
the median training step over steps 51-250 of an 8gaussians run (batch 500, Adam, 5 power iterations, one intra-op
thread; ms/step), then a 400 x 400 log-density grid and 160,000 samples (2 worker threads, chunks of 5,000; s),
like ``engine_speed.py``. Compiling or loading the kernels happens before any timing.

Usage: ``python benchmarks/revision_ab.py REVISION [--pairs 3] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure() -> dict[str, float]:
    """The child process: time this process's engine (the one first on ``sys.path``)."""
    import time

    import torch

    # (this script's directory is first on sys.path: engine_speed's step, run on the engine PYTHONPATH selects)
    from engine_speed import new_optimizer, timed_step

    import monoflow_core as mc
    from monoflow_core import evaluation
    from monoflow_core.data import ToyStream
    from monoflow_core.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(1)
    try:
        from monoflow_core import fused as fused_path
    except ImportError:  # revisions before the package: one module
        from monoflow_core import fast as fused_path
    if hasattr(fused_path, "kernels_ready"):
        fused_path.kernels_ready(torch.float32, wait=True)
    torch.manual_seed(0)
    flow = mc.build_flow()
    flow.train()
    opt = new_optimizer(flow)
    stream = ToyStream("8gaussians", 0)
    times = [timed_step(flow, opt, stream.sample(500))[0] for _ in range(250)]
    flow.eval()
    ticks = torch.linspace(-4, 4, 400)
    yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    evaluation.log_prob(flow, grid[:5000], chunk=5000, dtype=None)  # warm-up
    t0 = time.perf_counter()
    evaluation.log_prob(flow, grid, chunk=5000, dtype=None, workers=2)
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluation.sample(flow, 160_000, chunk=5000, seed=0, workers=2)
    sample_s = time.perf_counter() - t0
    return {"step_ms": statistics.median(times[50:]) * 1e3, "grid_s": grid_s, "samples_s": sample_s}


def run_child(source: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child"],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revision", nargs="?", help="the git revision to compare with (e.g. 3bbfcff)")
    parser.add_argument("--pairs", type=int, default=3, help="processes per version")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure()))
        return 0
    if not args.revision:
        parser.error("give the revision to compare with")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import command_line, machine_info

    info = machine_info()
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="monoflow-ab-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(other), args.revision], cwd=ROOT, capture_output=True, check=True
        )
        try:
            versions = {args.revision: other, f"{head} (this checkout)": ROOT}
            names = list(versions)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in names}
            for i in range(args.pairs):
                for name in names if i % 2 == 0 else reversed(names):  # A B, B A, A B, ...
                    figures = run_child(versions[name])
                    results[name].append(figures)
                    print(
                        f"{name}: {figures['step_ms']:.2f} ms/step, grid {figures['grid_s']:.3f} s, "
                        f"samples {figures['samples_s']:.3f} s",
                        flush=True,
                    )
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True, check=False
            )
    summary = {
        name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
        for name, runs in results.items()
    }
    old, new = summary[names[0]], summary[names[1]]
    print("medians:", json.dumps(summary))
    print(
        f"speed-up of this checkout: step {old['step_ms'] / new['step_ms']:.2f}x, grid "
        f"{old['grid_s'] / new['grid_s']:.2f}x, samples {old['samples_s'] / new['samples_s']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"command": command_line(), "machine_info": info, "runs": results, "medians": summary}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
