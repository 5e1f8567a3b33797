"""The report of ``compare_flows.py``: who wins where (computed from the runs), tables, and the picture.

Nothing here trains or measures; everything is computed from the runs' ``result.json`` figures, so the report can
be rebuilt from the run folders at any time (``compare_flows.py --rerender``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import common
from density_figure import Panel, compose, data_panel, model_panel

from monoflow_core.imageio import write_png

#: Two runs on a set are told apart only when their test NLLs differ by more than this many standard errors of
#: the difference, taken as ``sqrt(se_a^2 + se_b^2)``. The runs share their test points, whose errors are positively
#: correlated, so the true standard error of the difference is smaller: the rule errs towards calling a tie.
NOISE_SE = 2.0
#: The settings a report records and a re-render takes back.
SETTINGS = ("budgets", "datasets", "families", "test_size", "samples", "grid", "threads", "seed")


def usable(r: dict[str, Any]) -> bool:
    """Whether a run has a test NLL (finite on every test point) to rank."""
    nll = r.get("test_nll_nats")
    return nll is not None and math.isfinite(nll)


def _close(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``b``'s test NLL is within the noise of ``a``'s (see :data:`NOISE_SE`)."""
    se = math.sqrt(a["test_nll_stderr_nats"] ** 2 + b["test_nll_stderr_nats"] ** 2)
    return abs(b["test_nll_nats"] - a["test_nll_nats"]) <= NOISE_SE * se


def summarise(results: Sequence[dict[str, Any]], datasets: Sequence[str], families: Sequence[str]) -> dict[str, Any]:
    """Who wins where, from the finished runs of one budget.

    Per data set: the families ranked by test NLL, the *leaders* (the best and every family within the noise of it,
    :data:`NOISE_SE`), the winner (the best, when it leads alone) and the runs without a usable NLL. Overall: wins
    and shared leads per family, each family's mean rank over the sets where every family ran (a run without a
    usable NLL ranks last), Monotone against i-DenseNet (the paper's Table 1 claim) and the fastest family by
    median step time, sampling and density time (medians over the sets).
    """
    by = {(r["data"], r["family"]): r for r in results}
    per_set: dict[str, Any] = {}
    wins = dict.fromkeys(families, 0)
    shared = dict.fromkeys(families, 0)
    ranks: dict[str, list[int]] = {f: [] for f in families}
    for d in datasets:
        runs = [by[d, f] for f in families if (d, f) in by]
        if not runs:
            continue
        ranked = sorted((r for r in runs if usable(r)), key=lambda r: r["test_nll_nats"])
        failed = [r["family"] for r in runs if not usable(r)]
        leaders = [r["family"] for r in ranked if _close(ranked[0], r)] if ranked else []
        winner = leaders[0] if len(leaders) == 1 else None
        if winner is not None:
            wins[winner] += 1
        elif len(leaders) > 1:
            for f in leaders:
                shared[f] += 1
        complete = len(runs) == len(families)
        if complete:
            for i, r in enumerate(ranked):
                ranks[r["family"]].append(i + 1)
            for f in failed:
                ranks[f].append(len(families))
        per_set[d] = {
            "ranking": [
                {"family": r["family"], "nll": r["test_nll_nats"], "stderr": r["test_nll_stderr_nats"]} for r in ranked
            ],
            "leaders": leaders,
            "winner": winner,
            "margin": ranked[1]["test_nll_nats"] - ranked[0]["test_nll_nats"] if len(ranked) > 1 else None,
            "failed": failed,
            "complete": complete,
        }
    mean_rank = {f: statistics.fmean(v) for f, v in ranks.items() if v}
    duel = None
    if "monotone" in families and "idensenet" in families:
        pairs = [
            (by[d, "monotone"], by[d, "idensenet"])
            for d in datasets
            if (d, "monotone") in by
            and (d, "idensenet") in by
            and usable(by[d, "monotone"])
            and usable(by[d, "idensenet"])
        ]
        duel = {
            "sets": len(pairs),
            "monotone_lower": sum(a["test_nll_nats"] < b["test_nll_nats"] for a, b in pairs),
            "monotone_clearly_lower": sum(
                a["test_nll_nats"] < b["test_nll_nats"] and not _close(a, b) for a, b in pairs
            ),
            "idensenet_clearly_lower": sum(
                b["test_nll_nats"] < a["test_nll_nats"] and not _close(a, b) for a, b in pairs
            ),
        }
    speed: dict[str, dict[str, float]] = {}
    for f in families:
        mine = [r for r in results if r["family"] == f]
        if mine:
            speed[f] = {
                key: statistics.median(r[key] for r in mine)
                for key in ("ms_per_step_median", "iterations", "sample_seconds", "density_seconds", "parameters")
            }
    fastest = {
        key: min(speed, key=lambda f: speed[f][key]) if speed else None
        for key in ("ms_per_step_median", "sample_seconds", "density_seconds")
    }
    return {
        "per_set": per_set,
        "wins": wins,
        "shared_leads": shared,
        "mean_rank": mean_rank,
        "monotone_vs_idensenet": duel,
        "speed": speed,
        "fastest": fastest,
        "noise_rule": f"a lead counts when it exceeds {NOISE_SE:g} x sqrt(se_a^2 + se_b^2)",
    }


def summary_lines(summary: dict[str, Any], labels: Mapping[str, str]) -> list[str]:
    """The summary in words (Markdown bullets), every statement read off :func:`summarise`'s numbers."""
    lines = []
    for d, s in summary["per_set"].items():
        if not s["ranking"]:
            lines.append(f"- **{d}**: no run has a usable test NLL ({', '.join(labels[f] for f in s['failed'])}).")
            continue
        best = s["ranking"][0]
        text = f"- **{d}**: "
        if s["winner"] is not None:
            runner = s["ranking"][1] if len(s["ranking"]) > 1 else None
            text += f"**{labels[best['family']]}** wins ({best['nll']:.4f} +- {best['stderr']:.4f} nats)"
            if runner is not None:
                text += f", {s['margin']:.4f} nats ahead of {labels[runner['family']]}"
        else:
            text += (
                f"a tie within the noise between {', '.join(labels[f] for f in s['leaders'])} (best "
                f"{labels[best['family']]}, {best['nll']:.4f} +- {best['stderr']:.4f} nats)"
            )
        mono = next((i for i, r in enumerate(s["ranking"]) if r["family"] == "monotone"), None)
        if mono is not None and mono > 0 and "monotone" not in s["leaders"]:
            text += (
                f"; Monotone ranks {mono + 1} of {len(s['ranking'])}, +{s['ranking'][mono]['nll'] - best['nll']:.4f}"
            )
        if s["failed"]:
            text += f"; no usable NLL: {', '.join(labels[f] for f in s['failed'])}"
        if not s["complete"]:
            text += " (not every family has finished on this set)"
        lines.append(text + ".")
    wins = {f: n for f, n in summary["wins"].items() if n}
    shared = {f: n for f, n in summary["shared_leads"].items() if n}
    lines.append(
        "- Outright wins: "
        + (", ".join(f"{labels[f]} {n}" for f, n in sorted(wins.items(), key=lambda kv: -kv[1])) or "none")
        + "; shared leads (ties within the noise): "
        + (", ".join(f"{labels[f]} {n}" for f, n in sorted(shared.items(), key=lambda kv: -kv[1])) or "none")
        + "."
    )
    if summary["mean_rank"]:
        order = sorted(summary["mean_rank"].items(), key=lambda kv: kv[1])
        lines.append(
            "- Mean rank over the sets where every family ran (1 = best): "
            + ", ".join(f"{labels[f]} {r:.2f}" for f, r in order)
            + "."
        )
    duel = summary["monotone_vs_idensenet"]
    if duel and duel["sets"]:
        lines.append(
            f"- Monotone vs i-DenseNet (the paper's claim, at equal training time): Monotone lower on "
            f"{duel['monotone_lower']} of {duel['sets']} sets; clearly lower on {duel['monotone_clearly_lower']}, "
            f"clearly higher on {duel['idensenet_clearly_lower']}."
        )
    fastest, speed = summary["fastest"], summary["speed"]
    if fastest["ms_per_step_median"] is not None:
        slowest = max(speed, key=lambda f: speed[f]["ms_per_step_median"])
        lines.append(
            f"- Cheapest step: {labels[fastest['ms_per_step_median']]} "
            f"({speed[fastest['ms_per_step_median']]['ms_per_step_median']:.1f} ms median, so the most steps in the "
            f"budget); dearest: {labels[slowest]} ({speed[slowest]['ms_per_step_median']:.1f} ms). Fastest sampling: "
            f"{labels[fastest['sample_seconds']]} ({speed[fastest['sample_seconds']]['sample_seconds']:.2f} s); "
            f"fastest density grid: {labels[fastest['density_seconds']]} "
            f"({speed[fastest['density_seconds']]['density_seconds']:.2f} s)."
        )
    return lines


def problem_notes(r: dict[str, Any]) -> list[str]:
    """What went wrong or was unusual in one run: errors, failed solves, non-finite values, warnings."""
    bits = []
    if r.get("training_error"):
        bits.append(f"training stopped: {r['training_error']}")
    if r.get("rejected_steps"):
        bits.append(f"{r['rejected_steps']} rejected (non-finite) steps")
    for key, what in (
        ("training_solver_failed", "samples missed the solver tolerance in training (summed over steps and blocks)"),
        ("test_solver_failed", "test points missed the solver tolerance"),
        ("sample_solver_failed", "samples missed the inverse solver's tolerance"),
        ("density_solver_failed", "grid points missed the solver tolerance"),
        ("test_nonfinite", "non-finite test log-densities"),
        ("sample_nonfinite", "non-finite samples"),
        ("density_nonfinite", "non-finite grid values"),
    ):
        if r.get(key):
            bits.append(f"{r[key]} {what}")
    if not r.get("exact_logdet", True):
        bits.append("the test NLL uses a stochastic log-det estimate")
    if r.get("warnings"):
        bits.append("warnings: " + "; ".join(f"{k} (x{v})" for k, v in r["warnings"].items()))
    if r.get("sessions", 1) > 1:
        bits.append(f"trained in {r['sessions']} sessions (resumed)")
    return bits


def _table(results: Sequence[dict[str, Any]], labels: Mapping[str, str]) -> list[str]:
    header = [
        "data",
        "family",
        "test NLL (nats)",
        "above floor",
        "parameters",
        "steps",
        "ms/step (median)",
        "sampling (s)",
        "density (s)",
        "log-det",
        "load at start",
    ]
    rows = []
    for r in results:
        nll = f"{common.fmt(r['test_nll_nats'])} +- {common.fmt(r['test_nll_stderr_nats'])}"
        above = "-" if not usable(r) else f"{r['test_nll_nats'] - r['entropy_floor_nats']:.4f}"
        rows.append(
            [
                r["data"],
                labels.get(r["family"], r["family"]),
                nll,
                above,
                f"{r['parameters']:,}",
                f"{r['iterations']:,}",
                f"{r['ms_per_step_median']:.2f}",
                f"{r['sample_seconds']:.2f}",
                f"{r['density_seconds']:.2f}",
                r["logdet"],
                r["loadavg_start"][0],
            ]
        )
    return common.markdown_table(header, rows)


def render(
    results: Mapping[float, list[dict[str, Any]]],
    args: argparse.Namespace,
    info: dict[str, Any],
    commands: list[str],
    labels: Mapping[str, str],
    pictures: Mapping[float, str],
) -> tuple[list[str], dict[str, Any]]:
    """The Markdown report and its JSON payload."""
    expected = len(args.datasets) * len(args.families)
    first = {r["family"]: r for found in results.values() for r in reversed(found)}
    presets = ", ".join(f"{labels[f]} `{first[f]['preset']}`" for f in args.families if f in first) or "none ran"
    md = ["# Flow families at an equal budget of training time on the 2-D toy densities", ""]
    md += common.machine_header(info, commands)
    md += [
        "How it was measured:",
        "",
        "- Every family trains with the engine's one training loop (`Trainer.step`) from its preset "
        f"({presets}), "
        f"seed {args.seed}, `torch.set_num_threads({args.threads})`, float32, batches of 500 fresh points from the "
        "same seeded stream for every family on a set, for the budget of *training time* (the steps' summed "
        + (
            "CPU time of the training thread, `time.thread_time`: with one intra-op thread the whole step runs on "
            "it, so on an idle core it equals the wall time, and other jobs on the machine do not shrink a run's "
            "budget; "
            if getattr(args, "clock", "wall") == "thread"
            else "wall time; "
        )
        + "setup and tests excluded; the last step may end past the budget).",
        f"- *test NLL*: mean negative log-likelihood in nats on a fixed, seeded held-out set of {args.test_size:,} "
        "points (the same points for every family), float64, +- its standard error. *log-det* says how the "
        "log-density was computed: exact for every shipped family; the CNF's is the exact trace of its 2-D Jacobian "
        "integrated by the adaptive ODE solver, exact up to the solver's tolerance (not Hutchinson's estimator). "
        "*above floor*: the NLL minus the data's entropy, the lowest NLL any model can reach.",
        f"- *sampling*: seconds to draw {args.samples:,} samples; *density*: seconds for the log-density on a "
        f"{args.grid} x {args.grid} grid over [-4, 4]^2; both **in float32**, one thread, chunks of 5,000, on the "
        "trained model, on the same clock. *ms/step*: median time of one training step (fresh batch, forward, "
        "backward, Adam, spectral-norm update for the implicit flows). *load at start*: the machine's 1-minute load "
        "average when the run started.",
        f"- *Who wins where* is computed from the numbers below: {NOISE_SE:g} x sqrt(se_a^2 + se_b^2) separates two "
        "runs on a set, a conservative rule (the runs share their test points, so the true error of a difference is "
        "smaller); leads within it are called ties.",
        "",
    ]
    summaries: dict[str, Any] = {}
    for budget, found in results.items():
        name = f"{budget:g} s"
        md += [f"## {name} of training per run", ""]
        if len(found) < expected:
            md += [f"**{len(found)} of {expected} runs finished**; the summary covers those.", ""]
        summary = summarise(found, args.datasets, args.families)
        summaries[f"{budget:g}"] = summary
        md += ["### Who wins where", ""] + (summary_lines(summary, labels) if found else ["- no finished run yet."])
        md += ["", "### Every run", "", *_table(found, labels)]
        if summary["speed"]:
            md += ["", "### Cost per family (medians over the sets)", ""]
            rows = [
                [
                    labels[f],
                    f"{int(s['parameters']):,}",
                    f"{s['ms_per_step_median']:.2f}",
                    f"{s['iterations']:,.0f}",
                    f"{s['sample_seconds']:.2f}",
                    f"{s['density_seconds']:.2f}",
                ]
                for f, s in summary["speed"].items()
            ]
            md += common.markdown_table(
                ["family", "parameters", "ms/step", "steps in the budget", "sampling (s)", "density (s)"], rows
            )
        if budget in pictures:
            rel = os.path.relpath(pictures[budget], Path(args.out).resolve().parent)
            md += [
                "",
                f"![learned densities, {name}]({rel})",
                "",
                "The learned densities (one row per data set: the data's histogram, then each family's exp(log p) "
                "on [-4, 4]^2 divided by its peak, float64, as `monoflow density` draws it; the caption is the test "
                "NLL).",
            ]
        notes = [f"- {r['data']} / {labels[r['family']]}: " + "; ".join(problem_notes(r)) for r in found]
        notes = [n for n, r in zip(notes, found, strict=True) if problem_notes(r)]
        md += ["", "### Run notes", ""] + (notes or ["- no failed solves, rejected steps or warnings recorded."])
        md += [""]
    payload = {
        "benchmark": "compare_flows",
        "commands": commands,
        "machine": info,
        "note": common.SHARED_MACHINE_NOTE,
        "settings": {key: getattr(args, key) for key in SETTINGS},
        "units": {"nll": "nats", "time": "seconds", "step_time": "ms/step"},
        "pictures": {f"{b:g}": p for b, p in pictures.items()},
        "summary": summaries,
        "results": {f"{b:g}": found for b, found in results.items()},
    }
    return md, payload


def previous(out: str | Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The machine, commands and settings of the report at ``OUT.json`` (a re-render keeps them), or the current
    machine, no commands and no settings when there is none."""
    path = Path(out).with_suffix(".json")
    if not path.is_file():
        return common.machine_info(), [], {}
    payload = json.loads(path.read_text())
    commands = [c for c in payload.get("commands", []) if not c.startswith("# re-rendered")]
    return payload["machine"], commands, payload.get("settings", {})


def picture(
    path: Path,
    datasets: Sequence[str],
    labels: Mapping[str, str],
    folders: Mapping[tuple[str, str], Path],
    resolution: int,
) -> Path:
    """The learned densities: one row per data set, the data then each family (``labels``' order); a run not
    finished yet is a grey panel."""
    rows = []
    for d in datasets:
        row = [Panel(data_panel(d, resolution))]
        for f in labels:
            folder = folders[d, f]
            result = common.read_result(folder)
            if result is None:
                row.append(Panel(note="not run yet"))
                continue
            nll = result["test_nll_nats"]
            caption = f"{nll:.3f} nats" if nll is not None else "NLL not finite"
            row.append(Panel(model_panel(folder / "checkpoint.safetensors", resolution), caption=caption))
        rows.append(row)
    return write_png(path, compose(rows, list(datasets), ["Data", *labels.values()], resolution))
