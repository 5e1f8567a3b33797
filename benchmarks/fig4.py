"""Reproduce Figure 4 of Ahn et al. (NeurIPS 2022): test MSE of 1-D staircase fits by four 2-block flows.

Presets ``paper-1d-a`` .. ``paper-1d-d`` (docs/algorithm.md §9.2): the flow is used as a map x -> y, trained on the MSE
with batches of 5,000 fresh points (Adam lr 0.01, x0.2 at 1/3 and 2/3 of training), and tested on a fixed,
seeded set of 10,000 points (``Trainer.evaluate(fixed=True)``, float64). Reported next to Figure 4's values
(1.6e-2, 5.8e-3, 4.5e-3, 7.6e-5).

Modes: ``full`` = the paper's 15,000 iterations; ``short`` = 1,500 iterations by default. ``--iterations`` sets
any length; the learning-rate milestones (5,000 and 10,000 of 15,000) and the fresh-test interval (500) are
scaled proportionally. Anything under 15,000 iterations is marked as shortened.

Training uses one intra-op thread (``torch.set_num_threads(1)``).

Usage::

    python benchmarks/fig4.py [--mode short|full] [--iterations N] [--models a,b,c,d]
        [--out benchmarks/results/fig4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch

from monoflow_core.data import sample_staircase
from monoflow_core.presets import load_preset
from monoflow_core.training import StepMetrics, Trainer, TrainingError

PAPER_ITERATIONS = 15_000
MODE_ITERATIONS = {"short": 1_500, "full": PAPER_ITERATIONS}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode",
        choices=sorted(MODE_ITERATIONS),
        default="short",
        help="short = 1,500 iterations, full = 15,000 (the paper)",
    )
    parser.add_argument("--iterations", type=int, default=None, help="override the mode's iteration count")
    parser.add_argument("--models", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="fresh-sample tests every N iterations (default: the preset's 500, scaled); 0 = none",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training stream")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1 was fastest on this CPU)")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "fig4"), help="output path without suffix")
    parser.add_argument(
        "--rerender",
        metavar="JSON",
        help="no training: rewrite OUT.md/OUT.json from the results of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        return args
    if args.iterations is None:
        args.iterations = MODE_ITERATIONS[args.mode]
    if args.iterations < 1:
        parser.error("--iterations: must be >= 1")
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    for m in args.models:
        if f"paper-1d-{m}" not in common.FIG4:
            parser.error(f"--models: unknown model {m!r}; choose from a, b, c, d")
    return args


def scaled_milestones(milestones: list[int], scale: float, iterations: int) -> list[int]:
    """Milestones scaled to a shorter run, kept >= 1 and strictly increasing."""
    out: list[int] = []
    for m in milestones:
        v = max(1, round(m * scale))
        if out and v <= out[-1]:
            v = out[-1] + 1
        out.append(v)
    return [v for v in out if v < iterations] if iterations > 1 else out


def train_one(letter: str, args: argparse.Namespace, warn_log: common.WarningLog) -> dict[str, Any]:
    name = f"paper-1d-{letter}"
    preset = load_preset(name)
    base = preset.train_config()
    scale = args.iterations / base.iterations
    milestones = scaled_milestones(list(base.lr_milestones), scale, args.iterations)
    every = args.eval_every if args.eval_every is not None else max(1, round(base.eval_every * scale))
    tc = preset.train_config(
        iterations=args.iterations, lr_milestones=milestones, eval_every=every, seed=args.seed, checkpoint_every=0
    )
    common.set_threads(args.threads)
    warn_before = dict(warn_log.counts)
    t0 = time.perf_counter()
    trainer = Trainer(preset.model_config(), tc)
    setup_s = time.perf_counter() - t0
    step_seconds: list[float] = []
    eval_seconds: list[float] = []
    solver_max = 0
    solver_failed = 0
    report_every = max(1, args.iterations // 10)
    t_run = time.perf_counter()

    def callback(m: StepMetrics, ev: Any) -> None:
        nonlocal solver_max, solver_failed
        step_seconds.append(m.seconds)
        solver_max = max(solver_max, m.solver_iterations_max)
        solver_failed += m.solver_failed
        if ev is not None:
            eval_seconds.append(ev.seconds)
        if (m.step + 1) % report_every == 0:
            recent = step_seconds[-report_every:]
            print(
                f"    {name} step {m.step + 1}/{args.iterations}: train MSE {m.loss:.3e}, lr {m.lr:g}, "
                f"{1e3 * sum(recent) / len(recent):.0f} ms/iteration, {time.perf_counter() - t_run:.0f} s",
                flush=True,
            )

    error = None
    summary = None
    try:
        summary = trainer.run(args.iterations, callback)
    except TrainingError as err:
        error = str(err)
    run_s = time.perf_counter() - t_run
    fixed = trainer.evaluate(fixed=True)
    fresh = [e for e in trainer.eval_history if not e.fixed]
    label, paper = common.FIG4[name]
    train_s = sum(step_seconds)
    result = {
        "model": letter,
        "preset": name,
        "label": label,
        "iterations": trainer.step_count,
        "shortened": args.iterations < PAPER_ITERATIONS,
        "lr_milestones": milestones,
        "test_mse": fixed.mse,
        "test_n": fixed.n_test,
        "test_dtype": fixed.dtype,
        "test_seconds": fixed.seconds,
        "figure4_mse": paper,
        "ratio_to_figure4": None if fixed.mse is None else fixed.mse / paper,
        "paper_protocol_mse": trainer.paper_protocol(),
        "fresh_tests": [{"step": e.step, "mse": e.mse} for e in fresh],
        "last_train_mse": None if summary is None else summary.last_loss,
        "wall_seconds": run_s,
        "setup_seconds": setup_s,
        "train_seconds": train_s,
        "periodic_test_seconds": sum(eval_seconds),
        "ms_per_iteration_mean": 1e3 * train_s / max(1, len(step_seconds)),
        "ms_per_iteration_median": 1e3 * common.median(step_seconds),
        "rejected_steps": trainer.rejected_total,
        "solver_iterations_max": solver_max,
        "solver_failed_samples": solver_failed,
        "training_error": error,
        "warnings": {k: v - warn_before.get(k, 0) for k, v in warn_log.counts.items() if v > warn_before.get(k, 0)},
        "train_config": tc.to_dict(),
    }
    print(
        f"  {name} {label}: test MSE {common.fmt_sci(fixed.mse)} on {fixed.n_test} fixed points (Figure 4: "
        f"{paper:.1e}); wall {run_s:.1f} s, {result['ms_per_iteration_mean']:.0f} ms/iteration",
        flush=True,
    )
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.start_run(args, argv, rerender)
    if started is None:
        return
    info, commands = started
    shortened = args.iterations < PAPER_ITERATIONS
    print(
        f"Figure 4 benchmark: {args.iterations} iterations ({'SHORTENED' if shortened else 'full'}), torch "
        f"{info['torch']}, torch.set_num_threads({args.threads}); {info['nproc']} CPUs (shared machine).",
        flush=True,
    )
    warn_log = common.WarningLog()
    warnings.simplefilter("always")
    warnings.showwarning = warn_log
    results = []
    for letter in args.models:
        print(f"[paper-1d-{letter}] training {args.iterations} iterations", flush=True)
        results.append(train_one(letter, args, warn_log))
    md, payload = render(results, args, info, commands)
    md_path, js_path = common.write_results(args.out, md, payload)
    print("")
    for r in results:
        print(
            f"{r['label']}: test MSE {common.fmt_sci(r['test_mse'])} (10,000 fixed points) vs Figure 4 "
            f"{r['figure4_mse']:.1e}{' [SHORTENED]' if r['shortened'] else ''}"
        )
    print(f"Straight-line reference (least-squares line on the same test set): MSE {payload['line_fit_mse']:.2e}")
    print(f"Wrote {md_path} and {js_path}")


def line_fit_mse(test_seed: int) -> float:
    """MSE of the least-squares straight line on the fixed test set: what a map that ignores the stairs reaches."""
    x, y = sample_staircase(10_000, rng=test_seed, dtype=torch.float64)
    x, y = x.reshape(-1).numpy(), y.reshape(-1).numpy()
    coef = np.polyfit(x, y, 1)
    return float(np.mean((np.polyval(coef, x) - y) ** 2))


def rerender(args: argparse.Namespace) -> None:
    """Rewrite the Markdown and JSON of an earlier run from its JSON (no training; same settings and figures)."""
    payload = json.loads(Path(args.rerender).read_text())
    commands = [c for c in payload["commands"] if not c.startswith("# re-rendered")]
    commands.append("# re-rendered from the JSON, no training: " + common.command_line())
    old = argparse.Namespace(**payload["settings"])
    md, new_payload = render(payload["results"], old, payload["machine"], commands)
    md_path, js_path = common.write_results(args.out, md, new_payload)
    print(f"Re-rendered {args.rerender} (no training) into {md_path} and {js_path}")


def render(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], commands: list[str]):
    shortened = args.iterations < PAPER_ITERATIONS
    test_seed = results[0]["train_config"]["test_seed"] if results else 1234
    line_mse = line_fit_mse(test_seed)
    md = ["# Figure 4 reproduction: test MSE of the 1-D staircase fit", ""]
    md += common.machine_header(info, commands)
    if shortened:
        ms = results[0]["lr_milestones"] if results else []
        md += [
            f"**SHORTENED RUNS: {args.iterations:,} of the paper's {PAPER_ITERATIONS:,} iterations** (mode "
            f"`{args.mode}`; learning-rate milestones scaled to {ms}). Not a reproduction of Figure 4's values.",
            "",
        ]
    md += [
        "How it was measured:",
        "",
        "- *test MSE*: mean squared error of the flow used as a map x -> y on a fixed, seeded set of 10,000 "
        "points x ~ U(-2, 2) after the last iteration (evaluated in float64); Figure 4's values are test MSEs on "
        "10,000 points.",
        "- *last fresh test*: the MSE on 10,000 fresh points at the last periodic test.",
        f"- *wall*: seconds of `Trainer.run` (training plus periodic fresh tests); *ms/iteration*: mean wall time "
        f"of one training step (batch 5,000), tests excluded. `torch.set_num_threads({args.threads})`, float32 "
        f"training, seed {args.seed}.",
        f"- *straight-line reference*: the least-squares straight line on the same 10,000 test points has MSE "
        f"{line_mse:.2e}; a model near it has not yet learned the stairs.",
        "",
    ]
    header = [
        "model",
        "iterations",
        "test MSE",
        "Figure 4",
        "ours / Figure 4",
        "last fresh test MSE",
        "wall (s)",
        "ms/iteration",
    ]
    rows = []
    for r in results:
        last = r["fresh_tests"][-1]["mse"] if r["fresh_tests"] else None
        rows.append(
            [
                r["label"],
                f"{r['iterations']:,}" + (" (shortened)" if r["shortened"] else ""),
                common.fmt_sci(r["test_mse"]),
                f"{r['figure4_mse']:.1e}",
                "-" if r["ratio_to_figure4"] is None else f"{r['ratio_to_figure4']:.2f}",
                common.fmt_sci(last),
                f"{r['wall_seconds']:.1f}",
                f"{r['ms_per_iteration_mean']:.0f}",
            ]
        )
    md += common.markdown_table(header, rows)
    ordered = [r for r in results if r["test_mse"] is not None and not math.isnan(r["test_mse"])]
    md += ["", "## Comparison", ""]
    flat = [r for r in ordered if r["test_mse"] > 0.5 * line_mse]
    if flat:
        md.append(
            f"- **{len(flat)} of {len(ordered)} model(s) are within a factor 2 of the straight-line reference "
            f"({line_mse:.2e})**: at this length they have not learned the staircase, so their order says "
            "nothing about Figure 4's."
        )
    if len(ordered) == 4:
        best = min(ordered, key=lambda r: r["test_mse"])
        md.append(
            f"- Lowest test MSE: {best['label']} ({best['test_mse']:.2e}); Figure 4's lowest is (d) monotone. "
            f"{'Same' if best['model'] == 'd' else 'Different'} winner"
            f"{' (not meaningful at this length, see above)' if flat else ''}."
        )
        seq = " < ".join(r["model"] for r in sorted(ordered, key=lambda r: r["test_mse"]))
        md.append(f"- Order by test MSE (ours): {seq}; Figure 4: d < c < b < a.")
    for r in ordered:
        md.append(
            f"- {r['label']}: {r['test_mse']:.2e} vs {r['figure4_mse']:.1e} "
            f"({'at or below' if r['test_mse'] <= r['figure4_mse'] else 'above'} Figure 4's value)."
        )
    notes = []
    for r in results:
        bits = common.run_note_bits(r)
        if bits:
            notes.append(f"- {r['preset']}: " + "; ".join(bits))
    md += ["", "## Run notes", ""] + (notes or ["- no rejected steps, solver failures or warnings recorded."])
    payload = {
        "benchmark": "fig4",
        "commands": commands,
        "machine": info,
        "note": common.SHARED_MACHINE_NOTE,
        "settings": {
            "mode": args.mode,
            "iterations": args.iterations,
            "paper_iterations": PAPER_ITERATIONS,
            "shortened": shortened,
            "models": args.models,
            "seed": args.seed,
            "threads": args.threads,
        },
        "line_fit_mse": line_mse,
        "units": {"mse": "squared output units", "time": "seconds", "step_time": "ms/iteration"},
        "results": results,
    }
    return md, payload


if __name__ == "__main__":
    main()
