"""The 2-D toy training step against the authors' released code, in alternating fresh processes (A B B A ...).

Both sides train the paper's 8gaussians Monotone Flow (10 monotone blocks, DenseNet G of depth 3 and growth 16,
CPila, float32, batches of 500 fresh samples, Adam with lr 1e-3 and weight decay 1e-5, 5 power iterations after each
step) with one intra-op thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=MKL_NUM_THREADS=1``), and each
process reports the median time of iterations 51 to 250 (``--steps``). The processes alternate, released then this
checkout, then this checkout then released, and so on (``--pairs``), so that both sides see the same spells of this
machine's drifting speed; the load average is recorded before and after every process.

**The released side** is the authors' own script and model, unmodified: a checkout of their repository
(``--released PATH``) run with the interpreter ``--released-python`` (a virtual environment with torch, numpy,
scipy, scikit-learn, matplotlib and termcolor, the imports of their toy script). The command is the one the authors
publish for the 8gaussians Monotone Flow, ``train_toy.py --data 8gaussians --nblocks 10 --densenet True
--learnable_concat True --start_learnable_concat 25000 --act CPila --densenet_depth 3 --densenet_growth 16
--monotone_resolvent True --brute-force True`` (batch 500 and every other setting at its default), with
``--niters 250`` and validation and plotting frequencies beyond the run (their script still plots once after the
first iteration and validates after the last, both outside the timed iterations). Their loop times an iteration
with ``time.time()`` from the end of the previous iteration to the end of this one's power iterations: zeroing the
gradients, drawing the batch and computing the loss, the backward pass, their Adam step, resetting the
concatenation weights (before iteration 25,000), and ``update_lipschitz``; it logs that figure per iteration
("``Iter 0051 | Time 0.4123(...)``", seconds to 0.1 ms), and this script reads the figures from their log file.
Their CPila activation is a C++ extension that their code compiles at import with its CUDA source, which a CPU-only
torch cannot build: the child process that runs their script replaces ``torch.utils.cpp_extension.load`` by one that
builds the C++ source alone, with a stand-in for the CUDA entry point that a CPU run never calls (it raises if it
is). Nothing else is changed.

**This checkout's side** is the step a user gets: :class:`monoflow_core.training.Trainer` with the default
configurations (``FlowConfig()``, ``TrainConfig()``: the same model and training settings, 8gaussians, float32,
the compiled kernels), as ``monoflow train`` and the studio run it. Each call of :meth:`Trainer.step` is timed
with ``time.perf_counter`` from its start to its end; it covers everything the released loop's figure covers (the
fresh batch included) and the trainer's own bookkeeping (gradient norm, overflow guard, solver statistics). The
compiled kernels are loaded from Numba's on-disk cache before the first step (a warm-up process fills the cache and
builds the released extension first).

Both sides' solver warnings are counted and reported: the released code logs "Iterations exceeded ..." when a
fixed-point solve misses its tolerance; this checkout raises Python warnings (all recorded, none filtered) and
reports samples that missed the tolerance in each step's statistics.

Usage: ``python benchmarks/released_ab.py --released PATH --released-python PYTHON [--pairs 3] [--steps 250]
[--out benchmarks/results/released_ab]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The authors' published 8gaussians Monotone Flow command of the released code (every other setting at its default).
RELEASED_ARGS = [
    "--data",
    "8gaussians",
    "--nblocks",
    "10",
    "--densenet",
    "True",
    "--learnable_concat",
    "True",
    "--start_learnable_concat",
    "25000",
    "--act",
    "CPila",
    "--densenet_depth",
    "3",
    "--densenet_growth",
    "16",
    "--monotone_resolvent",
    "True",
    "--brute-force",
    "True",
]

#: The first timed iteration (1-based; the median is over iterations FIRST_TIMED..steps).
FIRST_TIMED = 51

#: A stand-in for the CUDA half of the released CPila extension: a CPU run never calls it.
CUDA_STANDIN = """#include <torch/extension.h>
torch::Tensor pila_cuda_forward(torch::Tensor x, torch::Tensor kabcdmn) {
    TORCH_CHECK(false, "pila_cuda_forward: this CPU-only build of the extension has no CUDA kernel");
    return x;
}
"""

_ITER_LINE = re.compile(r"^Iter (\d+) \| Time ([0-9.]+)\(")


def _one_thread_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- the released side (runs under the released code's interpreter: standard library and torch only) ----------------
def released_child(checkout: Path, save: Path, steps: int, warm_only: bool) -> None:
    """Run the released toy script unmodified (see the module docstring), its CPila extension built for CPU."""
    import runpy

    import torch
    import torch.utils.cpp_extension as cpp_extension

    torch.set_num_threads(1)
    standin = Path(tempfile.gettempdir()) / "monoflow-released-ab" / "pila_cuda_standin.cpp"
    standin.parent.mkdir(parents=True, exist_ok=True)
    if not standin.exists() or standin.read_text() != CUDA_STANDIN:
        standin.write_text(CUDA_STANDIN)
    original = cpp_extension.load

    def cpu_load(name: str, sources: list[str], *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("extra_cuda_cflags", None)
        cpu = [str(Path(s).resolve()) for s in sources if not str(s).endswith(".cu")]
        return original(f"{name}_cpu", [*cpu, str(standin)], *args, **kwargs)

    cpp_extension.load = cpu_load  # type: ignore[assignment]
    os.chdir(checkout)  # their script finds its extension's sources relative to the checkout
    sys.path.insert(0, str(checkout))
    if warm_only:  # build (or load) the extension, nothing else
        import lib.layers.base  # noqa: F401  (the released code's own package)

        return
    big = str(10 * steps + 10)  # validation and plots beyond the run (their script still plots after iteration 1)
    sys.argv = [
        "train_toy.py",
        *RELEASED_ARGS,
        "--niters",
        str(steps),
        "--viz_freq",
        big,
        "--val_freq",
        big,
        "--save",
        str(save),
    ]
    runpy.run_path(str(checkout / "train_toy.py"), run_name="__main__")


def parse_released_log(text: str) -> tuple[dict[int, float], int]:
    """Per-iteration seconds from the released script's log, and how many solves it reported as not converged."""
    times: dict[int, float] = {}
    for line in text.splitlines():
        m = _ITER_LINE.match(line)
        if m:
            times[int(m[1])] = float(m[2])
    missed = sum("Iterations exceeded" in line for line in text.splitlines())
    return times, missed


# -- this checkout's side ------------------------------------------------------------------------------------------
def monoflow_child(steps: int, warm_only: bool) -> dict[str, Any]:
    """Time ``steps`` default trainer steps in this process (this checkout's engine)."""
    import warnings

    import torch

    from monoflow_core import fused
    from monoflow_core.config import FlowConfig
    from monoflow_core.runtime import tune_allocator
    from monoflow_core.training import TrainConfig, Trainer

    tune_allocator()  # as the CLI and the studio run it
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    fused.kernels_ready(torch.float32, wait=True)
    kernels_s = time.perf_counter() - t0
    if warm_only:
        return {"kernels_s": kernels_s}
    counts: dict[str, int] = {}

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        key = f"{getattr(category, '__name__', category)}: {message} ({Path(filename).name}:{lineno})"
        if key not in counts:
            print(f"warning: {key}", file=sys.stderr, flush=True)  # reported as it happens, never filtered
        counts[key] = counts.get(key, 0) + 1

    warnings.simplefilter("always")
    warnings.showwarning = record
    trainer = Trainer(FlowConfig(), TrainConfig())
    seconds: list[float] = []
    failed = rejected = 0
    for _ in range(steps):
        t = time.perf_counter()
        m = trainer.step()
        seconds.append(time.perf_counter() - t)
        failed += m.solver_failed
        rejected += int(m.rejected)
    return {
        "kernels_s": kernels_s,
        "seconds": seconds,
        "solver_failed_samples": failed,
        "rejected_steps": rejected,
        "warnings": counts,
        "last_loss": trainer.history[-1].loss,
    }


# -- the alternation -------------------------------------------------------------------------------------------------
def _run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=7200, check=False)


def run_released(args: argparse.Namespace, warm_only: bool = False) -> dict[str, Any]:
    """One released process: its per-iteration times from its log, its reported missed solves, load before/after."""
    with tempfile.TemporaryDirectory(prefix="monoflow-released-run-") as tmp:
        save = Path(tmp) / "run"
        command = [
            args.released_python,
            str(Path(__file__).resolve()),
            "--child",
            "released",
            "--released",
            str(Path(args.released).resolve()),
            "--save",
            str(save),
            "--steps",
            str(args.steps),
            *(["--warm"] if warm_only else []),
        ]
        before = _load_average()
        t0 = time.perf_counter()
        done = _run(command, _one_thread_env(), ROOT)
        wall = time.perf_counter() - t0
        after = _load_average()
        if done.returncode != 0:
            raise SystemExit(f"the released code failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        if warm_only:
            return {"wall_s": wall}
        log = (save / "logs").read_text()
    times, missed = parse_released_log(log)
    timed = [times[i] for i in range(FIRST_TIMED, args.steps + 1) if i in times]
    if len(timed) != args.steps - FIRST_TIMED + 1:
        raise SystemExit(f"the released log has {len(timed)} of iterations {FIRST_TIMED}-{args.steps}")
    python_warnings = sum("Warning" in line for line in done.stderr.splitlines())
    return {
        **_summary("released", timed, before, after, wall),
        "solver_not_converged_logged": missed,
        "python_warning_lines": python_warnings,
    }


def _summary(side: str, timed: list[float], before: Any, after: Any, wall: float) -> dict[str, Any]:
    """One process's step times (seconds) as the report gives them: median and p10-p90 in ms, load, wall."""
    deciles = statistics.quantiles(timed, n=10)
    return {
        "side": side,
        "median_ms": statistics.median(timed) * 1e3,
        "p10_ms": deciles[0] * 1e3,
        "p90_ms": deciles[-1] * 1e3,
        "load_before": before,
        "load_after": after,
        "wall_s": round(wall, 1),
    }


def run_monoflow(args: argparse.Namespace, warm_only: bool = False) -> dict[str, Any]:
    """One process of this checkout: its step times, warnings and solver statistics, load before/after."""
    env = {**_one_thread_env(), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "monoflow", "--steps", str(args.steps)]
    command += ["--warm"] if warm_only else []
    before = _load_average()
    t0 = time.perf_counter()
    done = _run(command, env, ROOT)
    wall = time.perf_counter() - t0
    after = _load_average()
    if done.returncode != 0:
        raise SystemExit(f"this checkout's run failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if warm_only:
        return result
    timed = result["seconds"][FIRST_TIMED - 1 : args.steps]
    return {
        **_summary("monoflow", timed, before, after, wall),
        "kernels_s": round(result["kernels_s"], 2),
        "solver_failed_samples": result["solver_failed_samples"],
        "rejected_steps": result["rejected_steps"],
        "warnings": result["warnings"],
        "last_loss": result["last_loss"],
    }


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def _released_torch(python: str) -> str:
    done = subprocess.run(
        [python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def report(args: argparse.Namespace, runs: list[dict[str, Any]], info: dict[str, Any], command: str) -> None:
    """Print and write the figures (``--out``.md and .json)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import fmt, machine_header, markdown_table, write_results

    released = [r["median_ms"] for r in runs if r["side"] == "released"]
    ours = [r["median_ms"] for r in runs if r["side"] == "monoflow"]
    med_released, med_ours = statistics.median(released), statistics.median(ours)
    ratio = med_released / med_ours
    # each pair's two adjacent processes
    pair_ratios = [
        a["median_ms"] / b["median_ms"] if a["side"] == "released" else b["median_ms"] / a["median_ms"]
        for a, b in zip(runs[0::2], runs[1::2], strict=True)
    ]
    payload = {
        "command": command,
        "machine_info": info,
        "released_checkout": str(Path(args.released).resolve()),
        "released_commit": _git(Path(args.released), "rev-parse", "HEAD"),
        "released_torch": _released_torch(args.released_python),
        "steps": args.steps,
        "timed_iterations": [FIRST_TIMED, args.steps],
        "runs": runs,
        "median_ms": {"released": med_released, "monoflow": med_ours},
        "ratio": ratio,
        "pair_ratios": pair_ratios,
        "load_at_end": _load_average(),
    }
    rows = []
    for i, r in enumerate(runs):
        if r["side"] == "released":
            notes = f"{r['solver_not_converged_logged']} solves logged as not converged"
            notes += f", {r['python_warning_lines']} warning lines"
        else:
            notes = f"{r['solver_failed_samples']} samples missed the solver tolerance, "
            notes += f"{sum(r['warnings'].values())} warnings, {r['rejected_steps']} rejected steps"
        rows.append(
            [
                i + 1,
                r["side"],
                fmt(r["median_ms"], 1),
                f"{fmt(r['p10_ms'], 1)}-{fmt(r['p90_ms'], 1)}",
                r["load_before"],
                r["load_after"],
                notes,
            ]
        )
    lines = ["# The training step against the authors' released code (alternating processes)", ""]
    lines += machine_header(info, [command])
    lines += [
        f"Released code: commit {payload['released_commit']}, torch {payload['released_torch']}, its 8gaussians "
        "Monotone Flow command; this checkout: the default `Trainer` step. One intra-op thread each; median of "
        f"iterations {FIRST_TIMED}-{args.steps} per process; the recipe is in `benchmarks/released_ab.py`'s "
        "docstring and docs/performance.md.",
        "",
    ]
    lines += markdown_table(
        ["process", "side", "median ms/step", "p10-p90 ms", "load before", "load after", "solver / warnings"], rows
    )
    lines += [
        "",
        f"Medians over the processes: released **{med_released:.1f} ms**, this checkout **{med_ours:.2f} ms**: "
        f"**{ratio:.1f}x** (pairs of adjacent processes: {', '.join(f'{x:.1f}x' for x in pair_ratios)}).",
    ]
    md, js = write_results(args.out, lines, payload)
    print("\n".join(lines[-1:]))
    print(f"wrote {md} and {js}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--released", help="a checkout of the authors' released code")
    parser.add_argument("--released-python", default=sys.executable, help="the interpreter for the released code")
    parser.add_argument("--pairs", type=int, default=3, help="processes per side")
    parser.add_argument("--steps", type=int, default=250, help=f"iterations per process (timed from {FIRST_TIMED})")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "released_ab"))
    parser.add_argument("--child", choices=["released", "monoflow"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "released":
        released_child(Path(args.released), Path(args.save), args.steps, args.warm)
        return 0
    if args.child == "monoflow":
        print(json.dumps(monoflow_child(args.steps, args.warm)))
        return 0
    if not args.released or not (Path(args.released) / "train_toy.py").is_file():
        parser.error("--released must name a checkout of the authors' code (with train_toy.py)")
    if args.steps <= FIRST_TIMED + 10 or args.pairs < 1:
        parser.error(f"--steps must exceed {FIRST_TIMED + 10} and --pairs be at least 1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import command_line, machine_info

    info = machine_info()
    command = command_line(None if argv is None else [sys.argv[0], *argv])
    print("warm-up: building the released extension and loading this checkout's kernels ...", flush=True)
    run_released(args, warm_only=True)
    run_monoflow(args, warm_only=True)
    runs: list[dict[str, Any]] = []
    for i in range(args.pairs):
        order = (run_released, run_monoflow) if i % 2 == 0 else (run_monoflow, run_released)
        for run in order:
            r = run(args)
            runs.append(r)
            print(
                f"{r['side']}: {r['median_ms']:.2f} ms/step (median of iterations {FIRST_TIMED}-{args.steps}), "
                f"load {r['load_before']} -> {r['load_after']}",
                flush=True,
            )
    report(args, runs, info, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
