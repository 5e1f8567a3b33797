"""Digits benchmark: test bits/dim of the Monotone and the residual formulation at equal training wall-clock.

Model: the ``digits-cpu`` preset (a multiscale Monotone Flow for scikit-learn's 8x8 digits, 17 grey levels), and
the same architecture with ``formulation = "residual"`` (an i-DenseNet-style residual flow). Both train with the
core's one loop (:class:`monoflow_core.training.Trainer`) for ``--minutes`` of *training* time each (evaluations
are timed separately and excluded), one intra-op thread each. With ``--parallel`` the two runs train at the same
time in two processes, one per core of a 2-core machine, so they see the same conditions.

Reported per formulation (bits/dim, uniform dequantization bound, EMA weights, **exact** log-det: 64
dimensions per block; the dequantization noise is seeded):

* test bpd on all 447 test images (1350-1796) at the end;
* validation bpd on the 350 validation images (1000-1349) every ``--eval-minutes`` of training;
* iterations run, training seconds, seconds per iteration.

Reference points (docs/performance.md): uniform 4.087 bpd, full-covariance Gaussian 2.965, independent per-pixel
categorical 2.398. Goal: Monotone below 2.40 within 30 minutes on a 2-core CPU, and better than residual.

Usage::

    python benchmarks/digits_bpd.py [--minutes 30] [--eval-minutes 5] [--parallel]
        [--formulations monotone,residual] [--out benchmarks/results/digits_bpd]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from monoflow_core import evaluation
from monoflow_core.presets import load_preset
from monoflow_core.training import Trainer

PRESET = "digits-cpu"
BASELINES = {"uniform": 4.087, "full-covariance Gaussian": 2.965, "independent per-pixel categorical": 2.398}
GOAL_BPD = 2.40


def train_one(
    formulation: str, minutes: float, eval_minutes: float, seed: int, save_dir: str | None = None
) -> dict[str, Any]:
    """Train one formulation for ``minutes`` of training time; return its figures."""
    common.set_threads(1)
    preset = load_preset(PRESET)
    model = preset.model_config(formulation=formulation)
    training = preset.train_config(iterations=10**9, eval_every=0, seed=seed)
    trainer = Trainer(model, training)
    budget = minutes * 60.0
    next_eval = eval_minutes * 60.0
    trained = 0.0
    curve: list[dict[str, Any]] = []
    losses: list[float] = []
    eval_seconds = 0.0
    while trained < budget:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # solver warnings are counted in the step metrics
            m = trainer.step()
        trained += time.perf_counter() - t0
        losses.append(m.loss)
        if trained >= next_eval and trained < budget:
            t1 = time.perf_counter()
            ev = trainer.evaluate(n=350, split="validation")
            eval_seconds += time.perf_counter() - t1
            recent = losses[-50:]
            curve.append(
                {
                    "train_minutes": trained / 60.0,
                    "iterations": trainer.step_count,
                    "validation_bpd": ev.bpd,
                    "validation_bpd_stderr": ev.bpd_stderr,
                    "train_bpd_last50": sum(recent) / len(recent),
                    "exact": ev.exact,
                }
            )
            print(
                f"[{formulation}] {trained / 60:.1f} min, {trainer.step_count} it: validation "
                f"{ev.bpd:.4f} +- {ev.bpd_stderr:.4f} bpd",
                file=sys.stderr,
                flush=True,
            )
            next_eval += eval_minutes * 60.0
    t1 = time.perf_counter()
    # The test of Trainer.evaluate, kept per image for a paired comparison: every run sees the same images with
    # the same seeded dequantization noise.
    model = trainer.evaluation_copy()
    per_image = evaluation.image_bpd(
        model, trainer.evaluation_images("test").images, seed=trainer.train_config.test_seed
    )
    assert per_image is not None
    eval_seconds += time.perf_counter() - t1
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(Path(save_dir) / f"digits-{formulation}.safetensors")
    return {
        "formulation": formulation,
        "iterations": trainer.step_count,
        "train_seconds": trained,
        "seconds_per_iteration": trained / max(1, trainer.step_count),
        "test_bpd": float(per_image.mean()),
        "test_bpd_stderr": float(per_image.std() / math.sqrt(per_image.numel())),
        "test_images": int(per_image.numel()),
        "test_exact_logdet": bool(model.logdet_is_exact),
        "eval_dtype": str(model.dtype).replace("torch.", ""),
        "eval_seconds": eval_seconds,
        "rejected_steps": trainer.rejected_total,
        "test_bpd_per_image": per_image.tolist(),
        "curve": curve,
    }


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float] | None:
    """Mean and standard error of ``a_i - b_i`` (bits/dim), or ``None`` without per-image figures."""
    if not a or len(a) != len(b):
        return None
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)
    return mean, (var / len(d)) ** 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="training minutes per formulation")
    parser.add_argument("--eval-minutes", type=float, default=5.0, help="validation test every this many minutes")
    parser.add_argument("--formulations", default="monotone,residual")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", action="store_true", help="train the formulations at the same time")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one formulation, print JSON
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "digits_bpd"))
    parser.add_argument("--save-dir", help="also write each run's checkpoint into this folder")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(train_one(args.one, args.minutes, args.eval_minutes, args.seed, args.save_dir)))
        return 0
    forms = [f.strip() for f in args.formulations.split(",") if f.strip()]
    base = [
        sys.executable,
        __file__,
        "--minutes",
        str(args.minutes),
        "--eval-minutes",
        str(args.eval_minutes),
        "--seed",
        str(args.seed),
    ]
    if args.save_dir:
        base += ["--save-dir", args.save_dir]
    results: list[dict[str, Any]] = []
    if args.parallel:
        procs = [subprocess.Popen([*base, "--one", f], stdout=subprocess.PIPE, text=True) for f in forms]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"a benchmark process failed with status {p.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    else:
        results = [train_one(f, args.minutes, args.eval_minutes, args.seed, args.save_dir) for f in forms]

    info = common.machine_info()
    md = [
        "# Digits: test bits/dim at equal training wall-clock",
        "",
        *common.machine_header(info, [common.command_line()]),
        "",
        f"Preset `{PRESET}` (and the same architecture with the residual formulation); {args.minutes:g} minutes "
        "of training each, one intra-op thread each"
        + (", both runs at the same time (one per core)" if args.parallel else ", one after the other")
        + ". "
        "bpd = bits/dim of the uniform-dequantization bound, EMA weights, evaluated in "
        f"{results[0].get('eval_dtype', 'float64')}, exact log-det (64 dimensions per block); "
        "test = all 447 test images (1350-1796), mean +- standard error over images.",
        "",
    ]
    rows = [
        [
            r["formulation"],
            r["iterations"],
            f"{r['seconds_per_iteration']:.2f}",
            common.fmt(r["test_bpd"]),
            common.fmt(r["test_bpd_stderr"]),
            "yes" if r["test_exact_logdet"] else "no (estimate)",
        ]
        for r in results
    ]
    md += common.markdown_table(
        ["formulation", "iterations", "s/iteration", "test bpd (bits/dim)", "+- stderr", "exact log-det"], rows
    )
    md += ["", "Reference points (bits/dim): " + ", ".join(f"{k} {v}" for k, v in BASELINES.items()) + ".", ""]
    md += ["Validation bpd (350 images) during training:", ""]
    for r in results:
        md += [
            f"- {r['formulation']}: "
            + "; ".join(
                f"{c['train_minutes']:.1f} min ({c['iterations']} it): {c['validation_bpd']:.4f}" for c in r["curve"]
            )
        ]
    mono = next((r for r in results if r["formulation"] == "monotone"), None)
    resid = next((r for r in results if r["formulation"] == "residual"), None)
    if mono is not None:
        md += [
            "",
            f"Goal: Monotone below {GOAL_BPD} bpd: {'met' if mono['test_bpd'] < GOAL_BPD else 'NOT met'} "
            f"({mono['test_bpd']:.4f}).",
        ]
    if mono is not None and resid is not None:
        diff = paired_difference(mono["test_bpd_per_image"], resid["test_bpd_per_image"])
        if diff is None:
            verdict = "yes" if mono["test_bpd"] < resid["test_bpd"] else "NO"
            md += [
                f"Monotone better than residual at equal wall-clock: {verdict} "
                f"({mono['test_bpd']:.4f} vs {resid['test_bpd']:.4f})."
            ]
        else:
            mean, se = diff
            if mean + 2 * se < 0:
                verdict = "yes (more than 2 standard errors)"
            elif mean < 0:
                verdict = "lower, but within 2 standard errors (not significant)"
            else:
                verdict = "NO"
            md += [
                f"Monotone better than residual at equal wall-clock: {verdict}. Paired difference over the same "
                f"test images and dequantization noise, Monotone minus residual: {mean:+.4f} +- {se:.4f} bits/dim "
                "(mean +- standard error)."
            ]
    md_path, json_path = common.write_results(
        args.out, md, {"machine": info, "results": results, "baselines": BASELINES, "minutes": args.minutes}
    )
    print("\n".join(md))
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
