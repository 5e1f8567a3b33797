"""Time to quality: training seconds until a preset first reaches a target test NLL.

Two presets by default: ``quick-monotone`` (what the studio opens on: 6 monotone blocks, Adam 2e-2, weights averaged
with decay 0.95 for the tests; goal <= 3 s)
and the paper's ``paper-toy-monotone`` (10 monotone blocks, DenseNet G 3x16, CPila, exact log-det, Adam 1e-3;
goal <= 10 s), batch 500 fresh points, float32, one intra-op thread, on this CPU. Every ``--eval-every`` iterations the
test NLL (nats) is evaluated on a fixed, seeded held-out set of ``--test-size`` points (exact log-det, float64;
``Trainer.evaluate(n=test_size, fixed=True)``). Reported per data set:

* training seconds (wall time of the training steps only; the tests are timed and reported separately) until the
  NLL first reaches the target; the target can only be detected at a test, so the figure has a granularity of
  ``--eval-every`` iterations;
* iterations needed, and the NLL at the last test.

Goals: quick-monotone <= 3 s and paper-toy-monotone <= 10 s of training per target (the released research code
needs about 140 s on 8gaussians and 150 s on moons).

Usage::

    python benchmarks/time_to_quality.py [--presets quick-monotone:3,paper-toy-monotone:10]
        [--targets 8gaussians:2.90,moons:2.45] [--max-seconds 300]
        [--eval-every 50] [--test-size 20000] [--out benchmarks/results/time_to_quality]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from monoflow_core.data import TOY_DATASETS
from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer

#: preset -> goal in seconds of training per target
PRESET_GOALS = "quick-monotone:3,paper-toy-monotone:10"
RELEASED_CODE_SECONDS = {"8gaussians": 140.0, "moons": 150.0}


def parse_presets(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        name, _, goal = item.strip().partition(":")
        if not name or not goal:
            raise ValueError(f"--presets: expected PRESET:SECONDS, got {item!r}")
        load_preset(name)  # a clear error for an unknown name before any training
        out.append((name, float(goal)))
    return out


def parse_targets(text: str) -> list[tuple[str, float]]:
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, value = item.partition(":")
        if name not in TOY_DATASETS or not value:
            raise ValueError(f"--targets: expected DATA:NATS with DATA in {list(TOY_DATASETS)}, got {item!r}")
        out.append((name, float(value)))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--presets", default=PRESET_GOALS, help="PRESET:GOAL_SECONDS pairs, comma-separated (shipped preset names)"
    )
    parser.add_argument("--targets", default="8gaussians:2.90,moons:2.45", help="DATA:NATS pairs, comma-separated")
    parser.add_argument("--max-seconds", type=float, default=300.0, help="training-time budget per target (s)")
    parser.add_argument("--eval-every", type=int, default=50, help="test every N iterations")
    parser.add_argument("--test-size", type=int, default=20_000, help="points of the fixed held-out test set")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="fresh training points per iteration (default: the preset's, 500 for all shipped toys)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training stream")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for training (1 was fastest)")
    parser.add_argument("--eval-threads", type=int, default=1, help="intra-op threads for the tests")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "time_to_quality"), help="output path, no suffix")
    parser.add_argument(
        "--rerender",
        metavar="JSON",
        help="no training: rewrite OUT.md/OUT.json from the results of an earlier run's JSON",
    )
    args = parser.parse_args(argv)
    if args.rerender:
        return args
    try:
        args.targets = parse_targets(args.targets)
        args.presets = parse_presets(args.presets)
    except (ValueError, KeyError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.eval_every < 1:
        parser.error("--eval-every: must be >= 1")
    return args


def run_target(
    preset_name: str,
    goal_seconds: float,
    data: str,
    target: float,
    args: argparse.Namespace,
    warn_log: common.WarningLog,
) -> dict[str, Any]:
    preset = load_preset(preset_name)
    overrides: dict[str, Any] = {} if args.batch_size is None else {"batch_size": args.batch_size}
    tc = preset.train_config(
        data=data, seed=args.seed, test_size=args.test_size, eval_every=0, checkpoint_every=0, **overrides
    )
    common.set_threads(args.threads)
    warn_before = dict(warn_log.counts)
    t0 = time.perf_counter()
    common.warm_data(data)  # (scikit-learn's import for moons: setup, not the first step)
    trainer = Trainer(preset.model_config(), tc)
    setup_s = time.perf_counter() - t0

    def test() -> tuple[float, float]:
        common.set_threads(args.eval_threads)
        t = time.perf_counter()
        ev = trainer.evaluate(n=args.test_size, fixed=True)
        seconds = time.perf_counter() - t
        common.set_threads(args.threads)
        assert ev.nll_nats is not None and ev.exact
        return ev.nll_nats, seconds

    nll0, eval_s = test()
    curve = [{"iteration": 0, "train_seconds": 0.0, "nll_nats": nll0}]
    print(
        f"  {data}: initial test NLL {nll0:.4f} nats on {args.test_size} fixed points; target {target} nats", flush=True
    )
    train_s = 0.0
    step_ms: list[float] = []
    reached: dict[str, Any] | None = None
    rejected = 0
    solver_max = 0
    last_nll = nll0
    while train_s < args.max_seconds:
        t = time.perf_counter()
        m = trainer.step()
        dt = time.perf_counter() - t
        train_s += dt
        step_ms.append(1e3 * dt)
        rejected += int(m.rejected)
        solver_max = max(solver_max, m.solver_iterations_max)
        if trainer.step_count % args.eval_every == 0:
            last_nll, s = test()
            eval_s += s
            curve.append({"iteration": trainer.step_count, "train_seconds": train_s, "nll_nats": last_nll})
            print(
                f"    iteration {trainer.step_count}: test NLL {last_nll:.4f} nats after {train_s:.1f} s of "
                f"training ({1e3 * train_s / trainer.step_count:.1f} ms/iteration); tests so far {eval_s:.1f} s",
                flush=True,
            )
            if last_nll <= target:
                reached = {"iteration": trainer.step_count, "train_seconds": train_s, "nll_nats": last_nll}
                break
    if curve[-1]["iteration"] != trainer.step_count:
        last_nll, s = test()
        eval_s += s
        curve.append({"iteration": trainer.step_count, "train_seconds": train_s, "nll_nats": last_nll})
    met = reached is not None and reached["train_seconds"] <= goal_seconds
    result = {
        "preset": preset_name,
        "batch_size": tc.batch_size,
        "data": data,
        "target_nll_nats": target,
        "reached": reached is not None,
        "train_seconds_to_target": None if reached is None else reached["train_seconds"],
        "iterations_to_target": None if reached is None else reached["iteration"],
        "final_nll_nats": last_nll,
        "final_iteration": trainer.step_count,
        "train_seconds_total": train_s,
        "eval_seconds_total": eval_s,
        "setup_seconds": setup_s,
        "ms_per_iteration_mean": train_s * 1e3 / max(1, trainer.step_count),
        "ms_per_iteration_median": common.median(step_ms),
        "rejected_steps": rejected,
        "solver_iterations_max": solver_max,
        "goal_seconds": goal_seconds,
        "goal_met": met,
        "released_code_seconds": RELEASED_CODE_SECONDS.get(data),
        "warnings": {k: v - warn_before.get(k, 0) for k, v in warn_log.counts.items() if v > warn_before.get(k, 0)},
        "curve": curve,
    }
    if reached is None:
        print(
            f"  {data}: target {target} nats NOT reached within {args.max_seconds:.0f} s of training "
            f"({trainer.step_count} iterations); last test NLL {last_nll:.4f} nats",
            flush=True,
        )
    else:
        print(
            f"  {data}: reached {reached['nll_nats']:.4f} <= {target} nats after {reached['train_seconds']:.1f} s "
            f"of training ({reached['iteration']} iterations; tests took another {eval_s:.1f} s); goal <= "
            f"{goal_seconds:.0f} s: {'MET' if met else 'NOT MET'}",
            flush=True,
        )
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = common.start_run(args, argv, rerender)
    if started is None:
        return
    info, commands = started
    print(
        f"Time to quality: presets {', '.join(p for p, _ in args.presets)}, float32, torch {info['torch']}, "
        f"torch.set_num_threads({args.threads}) for training (1 intra-op thread was fastest for these tiny "
        f"matrices), {args.eval_threads} for tests; {info['nproc']} CPUs (shared machine).",
        flush=True,
    )
    warn_log = common.WarningLog()
    warnings.simplefilter("always")
    warnings.showwarning = warn_log
    results = []
    for preset_name, goal in args.presets:
        for data, target in args.targets:
            print(f"[{preset_name} / {data}] target test NLL {target} nats", flush=True)
            results.append(run_target(preset_name, goal, data, target, args, warn_log))
    md, payload = render(results, args, info, commands)
    md_path, js_path = common.write_results(args.out, md, payload)
    print("")
    for r in results:
        t = f"{r['train_seconds_to_target']:.1f} s" if r["reached"] else "not reached"
        print(
            f"{r['preset']} / {r['data']}: {t} of training to {r['target_nll_nats']} nats (goal <= "
            f"{r['goal_seconds']:.0f} s: "
            f"{'MET' if r['goal_met'] else 'NOT MET'}; released code ~{r['released_code_seconds']} s)"
        )
    print(f"Wrote {md_path} and {js_path}")


def rerender(args: argparse.Namespace) -> None:
    """Rewrite the Markdown and JSON of an earlier run from its JSON (no training; same settings and figures)."""
    payload = json.loads(Path(args.rerender).read_text())
    settings = dict(payload["settings"])
    commands = [c for c in payload["commands"] if not c.startswith("# re-rendered")]
    commands.append("# re-rendered from the JSON, no training: " + common.command_line())
    md, new_payload = render(payload["results"], argparse.Namespace(**settings), payload["machine"], commands)
    md_path, js_path = common.write_results(args.out, md, new_payload)
    print(f"Re-rendered {args.rerender} (no training) into {md_path} and {js_path}")


def render(results: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], commands: list[str]):
    md = ["# Time to quality: training seconds until the test NLL first reaches a target", ""]
    md += common.machine_header(info, commands)
    md += [
        "How it was measured:",
        "",
        f"- Presets {', '.join(f'`{p}`' for p, _ in args.presets)} (`paper-toy-monotone` is Table 1's Monotone "
        "Flow; `quick-monotone` is the studio's default), the preset's batch of fresh points per iteration, "
        f"float32, `torch.set_num_threads({args.threads})` for training (1 intra-op thread was fastest for these "
        f"tiny matrices), seed {args.seed}.",
        f"- Every {args.eval_every} iterations: test NLL in nats on a fixed, seeded held-out set of "
        f"{args.test_size:,} points (exact log-det: 2x2 for the implicit flows, closed form or the exact 2-D trace "
        f"for the comparison families; float64, {args.eval_threads} thread(s)).",
        "- *training seconds*: summed wall time of the training steps only (fresh batch, forward with exact "
        "log-det, backward, Adam, and the spectral-norm update of the implicit flows); the tests are timed "
        "separately, and building the model is not counted (*setup*). The target is only checked at a test, so "
        f"the time has a granularity of {args.eval_every} iterations.",
        f"- Budget: {args.max_seconds:.0f} s of training per target.",
        "",
    ]
    header = [
        "preset",
        "data",
        "target (nats)",
        "training s to target",
        "iterations",
        "final test NLL (nats)",
        "test time (s)",
        "setup (s)",
        "ms/iteration",
        "goal (s)",
        "released code (s)",
    ]
    rows = []
    for r in results:
        rows.append(
            [
                r.get("preset", "paper-toy-monotone"),
                r["data"],
                f"{r['target_nll_nats']:.2f}",
                common.fmt(r["train_seconds_to_target"], 1)
                if r["reached"]
                else f"not reached in {r['train_seconds_total']:.0f}",
                r["iterations_to_target"] if r["reached"] else f"({r['final_iteration']} run)",
                f"{r['final_nll_nats']:.4f} at iteration {r['final_iteration']}",
                f"{r['eval_seconds_total']:.1f}",
                f"{r['setup_seconds']:.1f}",
                f"{r['ms_per_iteration_mean']:.1f}",
                f"<= {r['goal_seconds']:.0f}: {'MET' if r['goal_met'] else 'NOT MET'}",
                "-" if r["released_code_seconds"] is None else f"~{r['released_code_seconds']:.0f}",
            ]
        )
    md += common.markdown_table(header, rows)
    md += ["", "## Goal", ""]
    for r in results:
        if r["reached"]:
            name = f"{r.get('preset', 'paper-toy-monotone')} / {r['data']}"
            md.append(
                f"- {name}: {r['train_seconds_to_target']:.1f} s of training ({r['iterations_to_target']} "
                f"iterations at {r['ms_per_iteration_mean']:.1f} ms/iteration) to reach "
                f"{r['target_nll_nats']:.2f} nats: goal <= {r['goal_seconds']:.0f} s "
                f"**{'MET' if r['goal_met'] else 'NOT MET'}**. At this iteration count the goal needs "
                f"<= {1e3 * r['goal_seconds'] / r['iterations_to_target']:.1f} ms/iteration."
            )
        else:
            name = f"{r.get('preset', 'paper-toy-monotone')} / {r['data']}"
            md.append(
                f"- {name}: target {r['target_nll_nats']:.2f} nats **not reached** within "
                f"{r['train_seconds_total']:.0f} s of training; goal **NOT MET**."
            )
    md += ["", "## Test NLL along the way (nats, fixed held-out set)", ""]
    for r in results:
        pts = ", ".join(f"{c['iteration']}: {c['nll_nats']:.3f} ({c['train_seconds']:.1f} s)" for c in r["curve"])
        md.append(f"- {r.get('preset', 'paper-toy-monotone')} / {r['data']}: {pts}")
    notes = []
    for r in results:
        if r["rejected_steps"] or r["warnings"]:
            notes.append(f"- {r['data']}: {r['rejected_steps']} rejected steps; warnings: {r['warnings'] or 'none'}")
    md += ["", "## Run notes", ""] + (notes or ["- no rejected steps or warnings recorded."])
    md += [
        f"- largest forward-solve iteration count in any block: "
        f"{max(r['solver_iterations_max'] for r in results)} G-evaluations per sample."
    ]
    payload = {
        "benchmark": "time_to_quality",
        "commands": commands,
        "machine": info,
        "note": common.SHARED_MACHINE_NOTE,
        "settings": {
            "presets": args.presets,
            "targets": args.targets,
            "max_seconds": args.max_seconds,
            "eval_every": args.eval_every,
            "test_size": args.test_size,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "threads": args.threads,
            "eval_threads": args.eval_threads,
        },
        "units": {"nll": "nats", "time": "seconds", "step_time": "ms/iteration"},
        "goal": "seconds of training per target: " + ", ".join(f"{p} <= {g:g} s" for p, g in args.presets),
        "results": results,
    }
    return md, payload


if __name__ == "__main__":
    main()
