"""Reproduce Table 1 of Ahn et al. (NeurIPS 2022): test NLL (nats) of Monotone Flows and i-DenseNets on 2-D toys.

For each data set and model (presets ``paper-toy-monotone`` / ``paper-toy-idensenet`` with ``data=`` the set;
the toy protocol of arXiv:2210.08176) trains with the core's one training loop (``Trainer``) and
reports:

* the **fixed-set test NLL** (nats): exact log-det, float64, on a fixed seeded held-out set of ``--test-size``
  points (default 100,000) after the last iteration;
* the **paper-protocol NLL** (nats): the mean of the last 20 tests on 10,000 *fresh* points, one test every
  100 iterations (what Table 1 reports);
* Table 1's published value and the data set's entropy floor (the lowest NLL a model can reach), both in nats;
* wall time (s; training plus the periodic tests) and training ms/iteration (the step alone, no tests).

With ``--iterations`` below the paper's 50,000 the run is *shortened*: the learnable-concatenation switch
(``concat_learnable_from``, 25,000 in the paper) is scaled to half of ``--iterations`` so the schedule keeps its
shape, and the results are marked as shortened. Shortened runs are not a reproduction of Table 1.

Goals stated in the output (assessed on the paper-protocol NLL; the fixed-set versions are shown too):

1. Monotone <= Table 1's Monotone value + 0.01 nats on every data set;
2. Monotone <= our i-DenseNet run on at least 7 of the 8 data sets.

Training uses one intra-op thread (``torch.set_num_threads(1)``; fastest for these tiny matrices).

**Resumable.** The full protocol is 16 runs of 50,000 iterations, hours of CPU, so every run lives in its own folder
under ``--runs-dir`` (``<data>-<model>-seed<S>-it<N>``): a resumable checkpoint every ``--checkpoint-every``
iterations (with the run's timings and fresh tests in its metadata, in the same atomic file), and ``result.json``
once the run is finished. Starting the script again skips finished runs and continues interrupted ones from their
last checkpoint; ``--jobs 2`` trains two runs at once, one per core. A lock file keeps two scripts off the same run.
The report is written after every finished run, from every finished run of the requested sets.

Usage::

    python benchmarks/table1.py [--iterations 50000] [--datasets a,b,...] [--models monotone,idensenet]
        [--test-size 100000] [--seed 0] [--jobs 1] [--out benchmarks/results/table1]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from monoflow_core.checkpoint import read_checkpoint_metadata
from monoflow_core.data import TOY_DATASETS
from monoflow_core.presets import load_preset
from monoflow_core.training import PAPER_PROTOCOL_TESTS, StepMetrics, Trainer, TrainingError

PAPER_ITERATIONS = 50_000
GOAL_MARGIN = 0.01  # nats above Table 1's Monotone value
GOAL_MIN_WINS = 7  # of 8 data sets: Monotone <= i-DenseNet
GOAL_WALL_MINUTES = 15.0  # per run, one core: median over the finished full-length runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=PAPER_ITERATIONS, help="iterations per run (paper 50000)")
    parser.add_argument("--datasets", default=",".join(TOY_DATASETS), help="comma-separated data sets (all 8)")
    parser.add_argument("--models", default="monotone,idensenet", help="comma-separated: monotone, idensenet")
    parser.add_argument("--test-size", type=int, default=100_000, help="points of the fixed held-out set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training stream")
    parser.add_argument("--eval-every", type=int, default=None, help="fresh tests every N iterations (preset: 100)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for training (1 was fastest)")
    parser.add_argument("--eval-threads", type=int, default=1, help="intra-op threads for the final fixed-set test")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "table1"), help="output path without suffix")
    parser.add_argument(
        "--runs-dir",
        default=str(common.RESULTS_DIR / "table1_runs"),
        help="one folder per run: resumable checkpoint and result.json",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process (core) each")
    parser.add_argument(
        "--checkpoint-every", type=int, default=2000, help="iterations between a run's resumable checkpoints"
    )
    parser.add_argument(
        "--rerender",
        metavar="JSON",
        help="no training: rewrite OUT.md/OUT.json from the results of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        return args
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    for d in args.datasets:
        if d not in TOY_DATASETS:
            parser.error(f"--datasets: unknown data set {d!r}; choose from {list(TOY_DATASETS)}")
    for m in args.models:
        if m not in common.MODEL_PRESETS:
            parser.error(f"--models: unknown model {m!r}; choose from {list(common.MODEL_PRESETS)}")
    if args.iterations < 1:
        parser.error("--iterations: must be >= 1")
    if not 1 <= args.jobs <= max(1, os.cpu_count() or 1):
        parser.error(f"--jobs: must be between 1 and the number of CPUs ({os.cpu_count()})")
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every: must be >= 1")
    return args


def run_dir(args: argparse.Namespace, data: str, model: str) -> Path:
    """The folder of one run: its name carries everything that makes the run what it is."""
    return Path(args.runs_dir) / f"{data}-{model}-seed{args.seed}-it{args.iterations}"


def train_one(data: str, model: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train one (data set, model) pair to the end, from its last checkpoint if there is one, and return its figures.

    Returns None when another process holds the run's lock (it is training it).
    """
    folder = run_dir(args, data, model)
    done = common.read_result(folder)
    if done is not None:
        return done
    # The lock is held for the whole run (common.run_lock).
    with common.run_lock(folder) as held:
        if not held:
            print(f"[{data} / {model}] another process is training this run; skipped", flush=True)
            return None
        return _train_locked(data, model, args, folder)


def _train_locked(data: str, model: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The body of :func:`train_one`, run while holding the run's lock."""
    warn_log = common.capture_warnings()
    common.set_threads(args.threads)
    preset = load_preset(common.MODEL_PRESETS[model])
    base = preset.train_config()
    scale = args.iterations / base.iterations
    concat_from = None if base.concat_learnable_from is None else round(base.concat_learnable_from * scale)
    overrides: dict[str, Any] = {
        "data": data,
        "iterations": args.iterations,
        "seed": args.seed,
        "test_size": args.test_size,
        "concat_learnable_from": concat_from,
        "checkpoint_every": 0,
    }
    if args.eval_every is not None:
        overrides["eval_every"] = args.eval_every
    tc = preset.train_config(**overrides)
    mc = preset.model_config()
    ckpt_path = folder / "checkpoint.safetensors"
    # What the run has measured so far; it travels in the checkpoint's own metadata, so the two never disagree.
    progress: dict[str, Any] = {
        "step_us": [],
        "eval_seconds": 0.0,
        "wall_seconds": 0.0,
        "setup_seconds": 0.0,
        "solver_max": 0,
        "solver_failed": 0,
        "nonfinite_losses": 0,
        "fresh_tests": [],
        "warnings": {},
        "segments": 0,
    }
    t_setup = time.perf_counter()
    if ckpt_path.is_file():
        trainer = Trainer.from_checkpoint(ckpt_path)
        progress = read_checkpoint_metadata(ckpt_path)["user"]["table1_progress"]
        print(f"[{data} / {model}] resuming at iteration {trainer.step_count} of {args.iterations}", flush=True)
    else:
        trainer = Trainer(mc, tc)
        print(f"[{data} / {model}] training {args.iterations} iterations", flush=True)
    progress["setup_seconds"] += time.perf_counter() - t_setup
    progress["segments"] += 1

    step_us: list[int] = progress["step_us"]
    report_every = max(1, args.iterations // 10)
    t_run = time.perf_counter()
    wall_before = progress["wall_seconds"]

    def save() -> None:
        progress["wall_seconds"] = wall_before + time.perf_counter() - t_run
        progress["warnings"] = {k: progress["warnings"].get(k, 0) + v for k, v in warn_log.counts.items()}
        warn_log.counts.clear()
        trainer.save_checkpoint(ckpt_path, metadata={"table1_progress": progress})

    def callback(m: StepMetrics, ev: Any) -> None:
        step_us.append(round(1e6 * m.seconds))
        progress["solver_max"] = max(progress["solver_max"], m.solver_iterations_max)
        progress["solver_failed"] += m.solver_failed
        progress["nonfinite_losses"] += int(not math.isfinite(m.loss))
        if ev is not None:
            progress["eval_seconds"] += ev.seconds
            progress["fresh_tests"].append({"step": ev.step, "nll_nats": ev.nll_nats})
        if (m.step + 1) % report_every == 0:
            recent = step_us[-report_every:]
            last = f"; fresh test {ev.nll_nats:.4f} nats" if ev is not None and ev.nll_nats is not None else ""
            print(
                f"    {data}/{model} step {m.step + 1}/{args.iterations}: train loss {m.loss:.4f} nats, "
                f"{1e-3 * sum(recent) / len(recent):.1f} ms/iteration, "
                f"{wall_before + time.perf_counter() - t_run:.0f} s{last}",
                flush=True,
            )
        if (m.step + 1) % args.checkpoint_every == 0 and m.step + 1 < args.iterations:
            save()

    error = None
    try:
        summary = trainer.run(None, callback)
    except TrainingError as err:
        error = str(err)
        summary = None
    save()
    run_s = progress["wall_seconds"]

    common.set_threads(args.eval_threads)
    fixed = trainer.evaluate(fixed=True)
    common.set_threads(args.threads)

    fresh = progress["fresh_tests"]
    fresh_nll = [t["nll_nats"] for t in fresh if t["nll_nats"] is not None]
    paper = sum(fresh_nll[-PAPER_PROTOCOL_TESTS:]) / len(fresh_nll[-PAPER_PROTOCOL_TESTS:]) if fresh_nll else None
    step_seconds = [1e-6 * us for us in step_us]
    train_s = sum(step_seconds)
    eval_seconds = progress["eval_seconds"]
    result = {
        "data": data,
        "model": model,
        "preset": preset.name,
        "iterations": trainer.step_count,
        "shortened": args.iterations < PAPER_ITERATIONS,
        "concat_learnable_from": concat_from,
        "fixed_nll_nats": fixed.nll_nats,
        "fixed_nll_stderr_nats": fixed.nll_stderr_nats,
        "fixed_n_test": fixed.n_test,
        "fixed_exact_logdet": fixed.exact,
        "fixed_eval_dtype": fixed.dtype,
        "fixed_eval_seconds": fixed.seconds,
        "paper_protocol_nll_nats": paper,
        "paper_protocol_tests": min(len(fresh_nll), PAPER_PROTOCOL_TESTS),
        "fresh_test_size": tc.eval_size,
        "eval_every": tc.eval_every,
        "last_fresh_nll_nats": fresh[-1]["nll_nats"] if fresh else None,
        "fresh_exact_logdet": all(e.exact for e in trainer.eval_history if not e.fixed) if fresh else None,
        "table1_nats": common.TABLE1[data][model],
        "entropy_floor_nats": common.ENTROPY_FLOOR[data],
        "wall_seconds": run_s,
        # The machine is shared: the load when the run ends says how far its wall time is from a quiet core's.
        "load_average_at_end": list(os.getloadavg()),
        "setup_seconds": progress["setup_seconds"],
        "sessions": progress["segments"],
        "train_seconds": train_s,
        "periodic_test_seconds": eval_seconds,
        "ms_per_iteration_mean": 1e3 * train_s / max(1, len(step_seconds)),
        "ms_per_iteration_median": 1e3 * common.median(step_seconds),
        "slowest_step_ms": 1e3 * max(step_seconds) if step_seconds else None,
        "rejected_steps": trainer.rejected_total,
        "solver_iterations_max": progress["solver_max"],
        "solver_failed_samples": progress["solver_failed"],
        "nonfinite_losses": progress["nonfinite_losses"],
        "last_train_loss_nats": None if summary is None else summary.last_loss,
        "training_error": error,
        "warnings": progress["warnings"],
        "fresh_tests": fresh,
        "train_config": tc.to_dict(),
    }
    print(
        f"  {data}/{model}: fixed-set NLL {common.fmt(fixed.nll_nats)} nats ({fixed.n_test} points), paper protocol "
        f"{common.fmt(paper)} nats (mean of last {result['paper_protocol_tests']} fresh tests), Table 1 "
        f"{result['table1_nats']:.3f} nats, floor {result['entropy_floor_nats']:.3f} nats; wall {run_s:.1f} s, "
        f"{result['ms_per_iteration_mean']:.1f} ms/iteration (training step only)",
        flush=True,
    )
    common.write_result(folder, result)
    return result


def assess_goals(results: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Goal 1 and goal 2 for the runs present, on the NLL ``key`` (paper protocol or fixed set)."""
    by = {(r["data"], r["model"]): r for r in results}
    sets = sorted({r["data"] for r in results}, key=list(TOY_DATASETS).index)
    g1 = {}
    for d in sets:
        r = by.get((d, "monotone"))
        if r is not None and r[key] is not None:
            g1[d] = {
                "ours": r[key],
                "bound": common.TABLE1[d]["monotone"] + GOAL_MARGIN,
                "met": r[key] <= common.TABLE1[d]["monotone"] + GOAL_MARGIN,
            }
    g2 = {}
    for d in sets:
        a, b = by.get((d, "monotone")), by.get((d, "idensenet"))
        if a is not None and b is not None and a[key] is not None and b[key] is not None:
            g2[d] = {"monotone": a[key], "idensenet": b[key], "met": a[key] <= b[key]}
    n1, k1 = len(g1), sum(v["met"] for v in g1.values())
    n2, k2 = len(g2), sum(v["met"] for v in g2.values())
    total = len(TOY_DATASETS)
    if n1 == 0:
        g1_status = "not assessed (no Monotone run)"
    elif k1 < n1:
        g1_status = f"NOT MET: {n1 - k1} of {n1} set(s) that ran exceed Table 1 + {GOAL_MARGIN} nats"
    elif n1 < total:
        g1_status = f"met on all {n1} set(s) that ran; {total - n1} set(s) not run"
    else:
        g1_status = "MET on all 8 sets"
    if n2 == 0:
        g2_status = "not assessed (needs both models on a set)"
    elif k2 >= GOAL_MIN_WINS:
        g2_status = f"MET: Monotone <= i-DenseNet on {k2} of {n2} set(s) (need {GOAL_MIN_WINS} of {total})"
    elif k2 + (total - n2) < GOAL_MIN_WINS:
        g2_status = f"NOT MET: Monotone <= i-DenseNet on only {k2} of {n2} set(s); {GOAL_MIN_WINS} of {total} needed"
    else:
        g2_status = (
            f"undecided: Monotone <= i-DenseNet on {k2} of {n2} set(s) that ran; {GOAL_MIN_WINS} of {total} needed, "
            f"{total - n2} not run"
        )
    return {"goal1": g1, "goal1_status": g1_status, "goal2": g2, "goal2_status": g2_status}


def assess_wall(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Goal 3: the median wall time of a run (training and periodic tests) against the per-run budget, in minutes."""
    walls = sorted(r["wall_seconds"] / 60 for r in results)
    by_model = {
        m: common.median([r["wall_seconds"] / 60 for r in results if r["model"] == m])
        for m in common.MODEL_PRESETS
        if any(r["model"] == m for r in results)
    }
    if not walls:
        return {"median_minutes": None, "by_model": {}, "status": "not assessed (no finished run)"}
    median = common.median(walls)
    verdict = "met" if median <= GOAL_WALL_MINUTES else "NOT MET"
    status = (
        f"{verdict}: median {median:.1f} min over {len(walls)} run(s) (fastest {walls[0]:.1f}, slowest "
        f"{walls[-1]:.1f}); budget {GOAL_WALL_MINUTES:.0f} min"
    )
    return {"median_minutes": median, "by_model": by_model, "status": status}


def render(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], commands: list[str]):
    shortened = args.iterations < PAPER_ITERATIONS
    goals = {
        "paper_protocol": assess_goals(results, "paper_protocol_nll_nats"),
        "fixed_set": assess_goals(results, "fixed_nll_nats"),
        "wall": assess_wall(results),
    }
    md = ["# Table 1 reproduction: test NLL (nats) on the 2-D toy densities", ""]
    md += common.machine_header(info, commands)
    if shortened:
        md += [
            f"**SHORTENED RUNS: {args.iterations:,} of the paper's {PAPER_ITERATIONS:,} iterations per run** "
            f"(learnable concatenation from iteration {args.iterations // 2:,}, i.e. half, as in the paper's "
            "schedule). These numbers are *not* a reproduction of Table 1; the goals below are assessed only for "
            "these settings.",
            "",
        ]
    fresh_size = results[0]["fresh_test_size"] if results else 10_000
    every = results[0]["eval_every"] if results else 100
    md += [
        "How it was measured:",
        "",
        f"- *fixed-set NLL*: mean negative log-likelihood in nats on a fixed, seeded held-out set of "
        f"{args.test_size:,} points after the last iteration; exact 2x2 log-det, evaluated in float64.",
        f"- *paper protocol*: Table 1's protocol, the mean of the last {PAPER_PROTOCOL_TESTS} tests on "
        f"{fresh_size:,} fresh points, one test every {every} iterations (exact log-det, float64); "
        "the number of tests averaged is given when fewer than 20 exist.",
    ]
    if shortened:
        window = min(PAPER_PROTOCOL_TESTS * every, args.iterations)
        md += [
            f"  In a shortened run the averaged tests cover the last {window:,} of {args.iterations:,} iterations "
            f"({100 * window / args.iterations:.0f}% of the run; in the paper the last 2,000 of 50,000, 4%), so the "
            "mean includes early, still-improving tests and lies above the final model's NLL; the fixed-set NLL is "
            "the better measure of the final model here.",
        ]
    md += [
        "- *Table 1*: the published value (nats); *floor*: the generator's entropy, the lowest "
        "expected NLL any model can reach.",
        "- *wall*: seconds of `Trainer.run` (training and the periodic fresh tests, not the final fixed-set test); "
        "*ms/iteration*: mean wall time of one training step (batch of 500 fresh points, forward with exact "
        "log-det, backward, Adam, spectral-norm update), tests excluded.",
        f"- Training with `torch.set_num_threads({args.threads})` (1 intra-op thread was fastest for these tiny "
        f"matrices); the final fixed-set test with {args.eval_threads} thread(s). Seed {args.seed}. float32 training.",
        "",
    ]
    header = [
        "data",
        "model",
        "iterations",
        "fixed-set NLL (nats)",
        "paper protocol (nats)",
        "Table 1 (nats)",
        "floor (nats)",
        "wall (s)",
        "ms/iteration",
        "rejected steps",
    ]
    rows = []
    for r in results:
        pp = common.fmt(r["paper_protocol_nll_nats"])
        if r["paper_protocol_tests"] < PAPER_PROTOCOL_TESTS:
            pp += f" ({r['paper_protocol_tests']} tests)"
        it = f"{r['iterations']:,}" + (" (shortened)" if r["shortened"] else "")
        fixed = f"{common.fmt(r['fixed_nll_nats'])} +- {common.fmt(r['fixed_nll_stderr_nats'])}"
        rows.append(
            [
                r["data"],
                r["model"],
                it,
                fixed,
                pp,
                f"{r['table1_nats']:.3f}",
                f"{r['entropy_floor_nats']:.3f}",
                f"{r['wall_seconds']:.1f}",
                f"{r['ms_per_iteration_mean']:.1f}",
                r["rejected_steps"],
            ]
        )
    md += common.markdown_table(header, rows)
    md += ["", "(+- is the standard error of the fixed-set mean, nats.)", ""]
    md += ["## Goals", ""]
    if shortened:
        md += [f"Assessed for the settings that ran (SHORTENED, {args.iterations:,} iterations):", ""]
    for label, key in (("paper protocol", "paper_protocol"), ("fixed set", "fixed_set")):
        g = goals[key]
        md += [
            f"On the {label} NLL:",
            "",
            f"1. Monotone <= Table 1 + {GOAL_MARGIN} nats on every set: **{g['goal1_status']}**",
        ]
        md += [
            f"   - {d}: {v['ours']:.4f} vs bound {v['bound']:.3f} nats: {'met' if v['met'] else 'NOT met'}"
            for d, v in g["goal1"].items()
        ]
        md += [f"2. Monotone <= i-DenseNet (our run) on >= {GOAL_MIN_WINS} of 8 sets: **{g['goal2_status']}**"]
        md += [
            f"   - {d}: Monotone {v['monotone']:.4f} vs i-DenseNet {v['idensenet']:.4f} nats: "
            f"{'met' if v['met'] else 'NOT met'}"
            for d, v in g["goal2"].items()
        ]
        md += [""]
    wall = goals["wall"]
    md += [f"3. Each run at most {GOAL_WALL_MINUTES:.0f} minutes of wall time on one core: **{wall['status']}**"]
    md += [f"   - {m}: median {v:.1f} min" for m, v in wall["by_model"].items()]
    loads = [r["load_average_at_end"][0] for r in results if r.get("load_average_at_end")]
    md += [
        "   - measured as the runs ran, two at a time (one per core) on the shared 2-core machine, often beside other "
        "work; "
        + (
            f"1-minute load average at the end of the runs that recorded it: median {common.median(loads):.1f}."
            if loads
            else "the load was not recorded per run."
        ),
        "",
    ]
    notes = []
    for r in results:
        bits = common.run_note_bits(r)
        if bits:
            notes.append(f"- {r['data']}/{r['model']}: " + "; ".join(bits))
    md += ["## Run notes", ""] + (notes or ["- no rejected steps, solver failures or warnings recorded."])
    md += [
        "",
        f"Largest forward-solve iteration count seen in any block: "
        f"{max((r['solver_iterations_max'] for r in results), default=0)} G-evaluations per sample.",
    ]
    payload = {
        "benchmark": "table1",
        "commands": commands,
        "machine": info,
        "note": common.SHARED_MACHINE_NOTE,
        "settings": {
            "iterations": args.iterations,
            "paper_iterations": PAPER_ITERATIONS,
            "shortened": shortened,
            "datasets": args.datasets,
            "models": args.models,
            "test_size": args.test_size,
            "seed": args.seed,
            "threads": args.threads,
            "eval_threads": args.eval_threads,
        },
        "units": {"nll": "nats", "time": "seconds", "step_time": "ms/iteration"},
        "goals": goals,
        "results": results,
    }
    return md, payload, goals


def rerender(args: argparse.Namespace) -> None:
    """Rewrite the Markdown and JSON of an earlier run from its JSON (no training; same settings and figures)."""
    payload = json.loads(Path(args.rerender).read_text())
    settings = payload["settings"]
    old = argparse.Namespace(
        **{k: settings[k] for k in ("iterations", "datasets", "models", "test_size", "seed", "threads", "eval_threads")}
    )
    commands = [c for c in payload["commands"] if not c.startswith("# re-rendered")]
    commands.append("# re-rendered from the JSON, no training: " + common.command_line())
    md, new_payload, _ = render(payload["results"], old, payload["machine"], commands)
    md_path, js_path = common.write_results(args.out, md, new_payload)
    print(f"Re-rendered {args.rerender} (no training) into {md_path} and {js_path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.start_run(args, argv, rerender)
    if started is None:
        return
    info, commands = started
    shortened = args.iterations < PAPER_ITERATIONS
    print(
        f"Table 1 benchmark: torch {info['torch']}, torch.set_num_threads({args.threads}) for training "
        f"(1 intra-op thread was fastest for these tiny matrices), {args.eval_threads} for the final test; "
        f"{info['nproc']} CPUs (shared machine).",
        flush=True,
    )
    if shortened:
        print(
            f"SHORTENED RUNS: {args.iterations} of {PAPER_ITERATIONS} iterations; concat learnable from "
            f"{args.iterations // 2}. Not a reproduction of Table 1.",
            flush=True,
        )
    pending = [(d, m) for d in args.datasets for m in args.models if common.read_result(run_dir(args, d, m)) is None]
    print(f"{len(pending)} run(s) to train or continue, {args.jobs} at a time; finished runs are skipped.", flush=True)

    # The report always covers every finished run of this seed and length, not only the subset trained by this
    # invocation: `--models idensenet` to finish the second column must not drop the first from the table.
    every = [(d, m) for d in TOY_DATASETS for m in common.MODEL_PRESETS]
    commands.append(
        f"# the whole table, every run resumed or skipped when finished: python benchmarks/table1.py "
        f"--iterations {args.iterations} --seed {args.seed} --jobs 2"
    )

    def finished() -> list[dict[str, Any]]:
        found = [common.read_result(run_dir(args, d, m)) for d, m in every]
        return [r for r in found if r is not None]

    def report() -> tuple[Path, Path, dict[str, Any]]:
        results = finished()
        reported = argparse.Namespace(**vars(args))
        reported.datasets = [d for d in TOY_DATASETS if any(r["data"] == d for r in results)] or args.datasets
        reported.models = [m for m in common.MODEL_PRESETS if any(r["model"] == m for r in results)] or args.models
        md, payload, goals = render(results, reported, info, commands)
        md_path, js_path = common.write_results(args.out, md, payload)
        return md_path, js_path, goals

    md_path, js_path, goals = report()

    def after_each() -> None:
        nonlocal md_path, js_path, goals
        md_path, js_path, goals = report()

    # One process per run with --jobs > 1 (spawned: a fresh interpreter each), one core each.
    common.run_jobs(train_one, [(d, m, args) for d, m in pending], args.jobs, after_each)
    print("")
    print(f"Goals ({'SHORTENED, ' if shortened else ''}{args.iterations} iterations; paper-protocol NLL in nats):")
    print(f"  1. Monotone <= Table 1 + {GOAL_MARGIN} nats on every set: {goals['paper_protocol']['goal1_status']}")
    print(f"  2. Monotone <= i-DenseNet on >= {GOAL_MIN_WINS} of 8: {goals['paper_protocol']['goal2_status']}")
    print(
        f"  (fixed {args.test_size}-point set: 1. {goals['fixed_set']['goal1_status']}; "
        f"2. {goals['fixed_set']['goal2_status']})"
    )
    print(f"  3. Each run <= {GOAL_WALL_MINUTES:.0f} min of wall time on one core: {goals['wall']['status']}")
    print(f"Wrote {md_path} and {js_path}")


if __name__ == "__main__":
    main()
