"""Every flow family on the 8 toy densities at an equal budget of training time: who wins where.

The families (their presets): the paper's Monotone Flow (``paper-toy-monotone``, Ahn et al. 2022,
arXiv:2210.08176) and its residual baseline i-DenseNet (``paper-toy-idensenet``), then the comparison families of
docs/families.md: Real NVP (``toy-realnvp``), Glow (``toy-glow``), NSF (``toy-nsf``), MAF (``toy-maf``) and the
CNF (FFJORD, ``toy-cnf``); all about 5,500 parameters, Adam with each preset's settings, batches of 500. Each run
trains with the core's one training loop (``Trainer.step``) for ``--budget-seconds`` of *training time* (the summed
time of its steps; tests and setup are not counted) with one intra-op thread, seed 0 and the same stream of
training batches for every family on a set (the stream depends only on the data set, the seed and the batch size).
Training time is read on ``--clock``: ``thread`` (the default) is the CPU time of the training thread
(``time.thread_time``), ``wall`` the wall clock. With one intra-op thread the whole step (PyTorch's operators and
the compiled kernels) runs on that thread, so on an idle core the two agree; on a shared machine the wall clock also
counts the time other processes hold the core, which would hand a family that trains while the machine is busy a
smaller budget. The thread clock keeps the budgets equal whatever else runs; the wall time of the steps is recorded
beside it. Sampling and density times are read on the same clock (wall times recorded too).

Then, per run:

* **test NLL** in nats ± its standard error on a fixed, seeded held-out set of ``--test-size`` points (default
  100,000, the same points for every family), float64. Log-determinants are exact: 2x2 determinants for the
  implicit blocks, triangular Jacobians for couplings and autoregressive transforms, and for the CNF the exact
  trace of its 2-D Jacobian integrated by an adaptive Dormand-Prince solver (exact up to the solver's tolerance;
  not Hutchinson's estimate). A flow that reported an estimate would be labelled as one;
* parameters, training steps reached within the budget, median (and mean) milliseconds per step;
* **sampling** time for ``--samples`` (160,000) samples and **density** time for a ``--grid`` x ``--grid``
  (400 x 400) grid over [-4, 4]^2, both in float32 with one thread, on the trained model;
* solver failures (samples whose fixed-point solve missed its tolerance, in training and in every measurement),
  rejected (non-finite) steps and every Python warning, counted and reported, never silenced.

**Resumable** (as ``table1.py``): every run lives in its own folder ``RUNS/budget-<B>s/<data>-<family>-seed<S>``,
with a resumable checkpoint every ``--checkpoint-every`` seconds of training and ``result.json`` (written
atomically) once finished. Starting again skips finished runs and continues interrupted ones; ``--jobs 2`` runs two
at once, one per core; a lock file keeps two scripts off the same run. A run folder made with other settings (test
size, measurement sizes, threads or the preset's content) is refused with a message rather than mixed in. The report
(``OUT.md``, ``OUT.json``) is rewritten after every finished run; the picture of the learned densities
(``OUT_<B>s.png``: one row per data set, the data then each family) at the end. ``--rerender`` rebuilds the report
and the pictures from the run folders without training.

Usage::

    python benchmarks/compare_flows.py [--budget-seconds 60[,600]] [--datasets a,b,...] [--families a,b,...]
        [--test-size 100000] [--jobs 1] [--out benchmarks/results/compare_flows] [--rerender]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import compare_flows_report as report

from monoflow_core import evaluation, fused
from monoflow_core.checkpoint import read_checkpoint_metadata
from monoflow_core.data import TOY_DATASETS, sample_toy
from monoflow_core.families.names import FAMILY_INFO
from monoflow_core.presets import load_preset
from monoflow_core.training import EVAL_CHUNK, Trainer, TrainingError

#: family -> (label, preset), in the order of the tables and the picture.
FAMILIES: dict[str, tuple[str, str]] = {
    "monotone": ("Monotone", common.MODEL_PRESETS["monotone"]),
    "idensenet": ("i-DenseNet", common.MODEL_PRESETS["idensenet"]),
    **{name: (info.label, f"toy-{name}") for name, info in FAMILY_INFO.items()},
}
SAMPLES = 160_000  # the paper's sample histograms
GRID = 400  # the paper's density grids, 400 x 400 on [-4, 4]^2
EXTENT = 4.0
MEASURE_CHUNK = 5000  # points per pass when sampling and drawing the grid (the CLI's default)
PROGRESS_KEY = "compare_flows_progress"
#: ``--clock`` -> the clock that measures training budgets, steps, sampling and density times.
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


class RunMismatchError(RuntimeError):
    """A run folder holds a run made with other settings than those asked for."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--budget-seconds", default="60", help="seconds of training per run; comma-separated for several budgets"
    )
    parser.add_argument("--datasets", default=",".join(TOY_DATASETS), help="comma-separated data sets (all 8)")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated, from {list(FAMILIES)}")
    parser.add_argument("--test-size", type=int, default=100_000, help="points of the fixed held-out set")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples drawn for the sampling time")
    parser.add_argument("--grid", type=int, default=GRID, help="points per side of the grid for the density time")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the training stream")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for everything (one core a run)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, one process (core) each")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="thread",
        help="what a second of budget is: CPU time of the training thread (default; load-independent) or wall time",
    )
    parser.add_argument(
        "--checkpoint-every", type=float, default=60.0, help="seconds of training between resumable checkpoints"
    )
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "compare_flows"), help="output path, no suffix")
    parser.add_argument("--runs-dir", default=None, help="the run folders (default: OUT_runs)")
    parser.add_argument("--figure-resolution", type=int, default=160, help="pixels per panel side of the picture")
    parser.add_argument("--no-figure", action="store_true", help="skip the picture (the report is still written)")
    parser.add_argument(
        "--rerender", action="store_true", help="no training: rebuild the report and pictures from the run folders"
    )
    args = parser.parse_args(argv)
    try:
        args.budgets = [float(b) for b in args.budget_seconds.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--budget-seconds: expected numbers of seconds, got {args.budget_seconds!r}")
    if not args.budgets or any(not (b > 0 and math.isfinite(b)) for b in args.budgets):
        parser.error("--budget-seconds: every budget must be a positive number of seconds")
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.families = [f.strip().lower() for f in args.families.split(",") if f.strip()]
    for d in args.datasets:
        if d not in TOY_DATASETS:
            parser.error(f"--datasets: unknown data set {d!r}; choose from {list(TOY_DATASETS)}")
    for f in args.families:
        if f not in FAMILIES:
            parser.error(f"--families: unknown family {f!r}; choose from {list(FAMILIES)}")
    for name in ("test_size", "samples", "grid", "threads", "figure_resolution"):
        if getattr(args, name) < (2 if name in ("grid", "figure_resolution", "test_size") else 1):
            parser.error(f"--{name.replace('_', '-')}: too small ({getattr(args, name)})")
    if not 1 <= args.jobs <= max(1, os.cpu_count() or 1):
        parser.error(f"--jobs: must be between 1 and the number of CPUs ({os.cpu_count()})")
    if not args.checkpoint_every > 0:
        parser.error("--checkpoint-every: must be positive")
    if args.runs_dir is None:
        args.runs_dir = str(Path(args.out).with_suffix("")) + "_runs"
    return args


# ---------------------------------------------------------------------------------------------------------------
# Run folders and resumption
# ---------------------------------------------------------------------------------------------------------------


def budget_name(budget: float) -> str:
    """``60`` -> ``"60s"``; ``2.5`` -> ``"2.5s"``: the budget as folder names and file names write it."""
    return f"{budget:g}s"


def run_dir(runs_dir: str | Path, budget: float, data: str, family: str, seed: int) -> Path:
    """The folder of one run (budget, data set, family and seed make the run what it is)."""
    return Path(runs_dir) / f"budget-{budget_name(budget)}" / f"{data}-{family}-seed{seed}"


def run_settings(args: argparse.Namespace, budget: float, data: str, family: str) -> dict[str, Any]:
    """Everything a finished run's figures depend on: a folder made with other settings is not this run."""
    preset = load_preset(FAMILIES[family][1])
    return {
        "budget_seconds": budget,
        "data": data,
        "family": family,
        "seed": args.seed,
        "test_size": args.test_size,
        "samples": args.samples,
        "grid": args.grid,
        "threads": args.threads,
        "clock": args.clock,
        "preset": preset.name,
        "model": preset.model,
        "training": preset.training,
    }


def run_status(folder: Path, settings: dict[str, Any]) -> str:
    """``"done"`` (result.json), ``"partial"`` (a checkpoint to continue from) or ``"new"``.

    Raises:
        RunMismatchError: the folder's run was made with other settings (it is neither reused nor overwritten).
    """
    result = common.read_result(folder)
    if result is not None:
        stored, state = result.get("settings"), "done"
    elif (folder / "checkpoint.safetensors").is_file():
        user = read_checkpoint_metadata(folder / "checkpoint.safetensors").get("user") or {}
        stored, state = (user.get(PROGRESS_KEY) or {}).get("settings"), "partial"
    else:
        return "new"
    if stored != settings:
        changed = sorted(k for k in set(stored or {}) | set(settings) if (stored or {}).get(k) != settings.get(k))
        raise RunMismatchError(
            f"{folder} holds a run made with other settings ({', '.join(changed)} differ); move it away or choose "
            "another --runs-dir"
        )
    return state


# ---------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------


def _failed(flow: Any, kind: str) -> int:
    """Samples whose latest ``kind`` solve (forward / inverse) missed its tolerance, summed over the blocks."""
    return sum(stats[kind].n_failed for stats in flow.solver_stats() if stats.get(kind) is not None)


def logdet_label(flow: Any) -> str:
    """How the flow's log-density was computed: exact, or an estimate (labelled as such)."""
    cfg = flow.config
    if not flow.logdet_is_exact:
        return "stochastic estimate of the log-det"
    if cfg.family == "cnf":
        return f"exact 2-D trace, Dormand-Prince ODE at tolerance {cfg.tol:g}"
    if cfg.family == "implicit":
        return "exact 2x2 log-det"
    return "exact (triangular Jacobian)"


def measure_test_nll(trainer: Trainer) -> dict[str, Any]:
    """Test NLL (nats) ± standard error on the fixed held-out set, float64, counting the solves that failed.

    The set and the arithmetic of ``Trainer.evaluate(fixed=True)``; evaluated a chunk at a time so that each chunk's
    solver statistics are read.
    """
    tc = trainer.train_config
    x = sample_toy(tc.data, tc.test_size, rng=tc.test_seed, dtype=torch.float64)
    t0 = time.perf_counter()
    model = trainer.evaluation_copy(torch.float64)
    parts, failed = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.test_seed)  # (estimators only; every shipped toy flow is exact)
        for i in range(0, x.shape[0], EVAL_CHUNK):
            parts.append(evaluation.log_prob(model, x[i : i + EVAL_CHUNK], chunk=EVAL_CHUNK))
            failed += _failed(model, "forward")
    logp = torch.cat(parts)
    finite = torch.isfinite(logp)
    return {
        "test_nll_nats": float(-logp.mean()) if bool(finite.all()) else None,
        "test_nll_stderr_nats": float(logp.std() / math.sqrt(logp.numel())) if bool(finite.all()) else None,
        "test_points": int(logp.numel()),
        "test_nonfinite": int((~finite).sum()),
        "test_seconds": time.perf_counter() - t0,
        "test_dtype": "float64",
        "exact_logdet": bool(model.logdet_is_exact),
        "logdet": logdet_label(model),
        "test_solver_failed": failed,
    }


def measure_sampling(trainer: Trainer, n: int, seed: int, clock: str = "thread") -> dict[str, Any]:
    """Seconds to draw ``n`` samples in float32 (``evaluation.sample_pieces``), non-finite samples and failed
    inverse solves."""
    flow = trainer.evaluation_copy(torch.float32)
    counts = {"nonfinite": 0, "failed": 0}

    def consume(piece: Any) -> None:
        counts["nonfinite"] += int((~torch.isfinite(torch.from_numpy(piece)).all(dim=1)).sum())
        counts["failed"] += _failed(flow, "inverse")

    t0, w0 = CLOCKS[clock](), time.perf_counter()
    evaluation.sample_pieces(flow, n, consume, chunk=MEASURE_CHUNK, seed=seed, dtype=torch.float32, piece=MEASURE_CHUNK)
    seconds = CLOCKS[clock]() - t0
    return {
        "sample_seconds": seconds,
        "sample_wall_seconds": time.perf_counter() - w0,
        "samples": n,
        "sample_nonfinite": counts["nonfinite"],
        "sample_solver_failed": counts["failed"],
    }


def measure_density(trainer: Trainer, resolution: int, clock: str = "thread") -> dict[str, Any]:
    """Seconds for the log-density on a ``resolution`` x ``resolution`` grid over [-4, 4]^2 in float32
    (``evaluation.log_density_pieces``, as ``monoflow density`` computes it), non-finite values and failed solves."""
    flow = trainer.evaluation_copy(torch.float32)
    counts = {"nonfinite": 0, "failed": 0}

    def consume(start: int, values: Any) -> None:
        counts["nonfinite"] += int((~torch.isfinite(torch.from_numpy(values))).sum())
        counts["failed"] += _failed(flow, "forward")

    t0, w0 = CLOCKS[clock](), time.perf_counter()
    evaluation.log_density_pieces(
        flow, consume, EXTENT, resolution, chunk=MEASURE_CHUNK, dtype=torch.float32, piece=MEASURE_CHUNK
    )
    seconds = CLOCKS[clock]() - t0
    return {
        "density_seconds": seconds,
        "density_wall_seconds": time.perf_counter() - w0,
        "grid": resolution,
        "density_nonfinite": counts["nonfinite"],
        "density_solver_failed": counts["failed"],
    }


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


def train_one(budget: float, data: str, family: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """Train and measure one run to the end (from its checkpoint if it has one); its figures, or None when another
    process holds the run's lock."""
    folder = run_dir(args.runs_dir, budget, data, family, args.seed)
    settings = run_settings(args, budget, data, family)
    if run_status(folder, settings) == "done":
        return common.read_result(folder)
    with common.run_lock(folder) as held:
        if not held:
            print(f"[{budget_name(budget)} / {data} / {family}] another process is training this run; skipped")
            return None
        return _train_locked(budget, data, family, args, folder, settings)


def _new_progress(settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": settings,
        "trained": False,
        "steps": common.StepTimes().to_dict(),
        "solver_failed": 0,
        "solver_iterations_max": 0,
        "nonfinite_losses": 0,
        "training_error": None,
        "warnings": {},
        "sessions": 0,
        "setup_seconds": 0.0,
        "loadavg_start": common.load_average(),
    }


def _train_locked(
    budget: float, data: str, family: str, args: argparse.Namespace, folder: Path, settings: dict[str, Any]
) -> dict[str, Any]:
    """The body of :func:`train_one`, run while holding the run's lock."""
    name = f"{budget_name(budget)} / {data} / {family}"
    warn_log = common.capture_warnings()
    common.set_threads(args.threads)
    # The compiled kernels (training in float32, tests in float64), loaded before the clock starts.
    fused.kernels_ready(torch.float32, wait=True)
    fused.kernels_ready(torch.float64, wait=True, backward=False)
    common.warm_data(data)
    ckpt = folder / "checkpoint.safetensors"
    t_setup = time.perf_counter()
    if run_status(folder, settings) == "partial":
        trainer = Trainer.from_checkpoint(ckpt)
        progress = read_checkpoint_metadata(ckpt)["user"][PROGRESS_KEY]
        print(f"[{name}] resuming after {progress['steps']['total_seconds']:.1f} s of training", flush=True)
    else:
        preset = load_preset(FAMILIES[family][1])
        tc = preset.train_config(data=data, seed=args.seed, test_size=args.test_size, eval_every=0, checkpoint_every=0)
        trainer = Trainer(preset.model_config(), tc)
        progress = _new_progress(settings)
        print(f"[{name}] training for {budget:g} s", flush=True)
    progress["setup_seconds"] += time.perf_counter() - t_setup
    progress["sessions"] += 1
    steps = common.StepTimes(progress["steps"])

    def save() -> None:
        progress["steps"] = steps.to_dict()
        progress["warnings"] = {k: progress["warnings"].get(k, 0) + v for k, v in warn_log.counts.items()}
        warn_log.counts.clear()
        trainer.save_checkpoint(ckpt, metadata={PROGRESS_KEY: progress})

    clock = CLOCKS[args.clock]
    progress.setdefault("wall_seconds", 0.0)  # the steps' wall time, beside the budget's clock
    last_save = steps.total_seconds
    while not progress["trained"] and steps.total_seconds < budget:
        t0, w0 = clock(), time.perf_counter()
        try:
            m = trainer.step()
        except TrainingError as err:  # (the step's time is spent all the same)
            steps.add(clock() - t0)
            progress["wall_seconds"] += time.perf_counter() - w0
            progress["training_error"] = str(err)
            print(f"[{name}] training stopped: {err}", flush=True)
            break
        steps.add(clock() - t0)
        progress["wall_seconds"] += time.perf_counter() - w0
        progress["solver_failed"] += m.solver_failed
        progress["solver_iterations_max"] = max(progress["solver_iterations_max"], m.solver_iterations_max)
        progress["nonfinite_losses"] += int(not math.isfinite(m.loss))
        if steps.total_seconds - last_save >= args.checkpoint_every and steps.total_seconds < budget:
            save()
            last_save = steps.total_seconds
    progress["trained"] = True
    save()  # the final model: resumption after this point only measures

    measured: dict[str, Any] = {}
    measured.update(measure_test_nll(trainer))
    measured.update(measure_sampling(trainer, args.samples, args.seed, args.clock))
    measured.update(measure_density(trainer, args.grid, args.clock))
    warnings_seen = {k: progress["warnings"].get(k, 0) + v for k, v in warn_log.counts.items()}
    warnings_seen.update({k: v for k, v in progress["warnings"].items() if k not in warnings_seen})
    tc = trainer.train_config
    result = {
        "settings": settings,
        "data": data,
        "family": family,
        "label": FAMILIES[family][0],
        "preset": settings["preset"],
        "budget_seconds": budget,
        "parameters": sum(p.numel() for p in trainer.flow.parameters()),
        "iterations": trainer.step_count,
        "train_seconds": steps.total_seconds,
        "clock": args.clock,
        "train_wall_seconds": progress["wall_seconds"],
        "ms_per_step_median": 1e3 * steps.median(),
        "ms_per_step_mean": 1e3 * steps.mean(),
        "slowest_step_ms": 1e3 * steps.slowest_seconds,
        "batch_size": tc.batch_size,
        "lr": tc.lr,
        "rejected_steps": trainer.rejected_total,
        "nonfinite_losses": progress["nonfinite_losses"],
        "training_solver_failed": progress["solver_failed"],
        "solver_iterations_max": progress["solver_iterations_max"],
        "training_error": progress["training_error"],
        **measured,
        "entropy_floor_nats": common.ENTROPY_FLOOR[data],
        "warnings": warnings_seen,
        "setup_seconds": progress["setup_seconds"],
        "sessions": progress["sessions"],
        "loadavg_start": progress["loadavg_start"],
        "loadavg_end": common.load_average(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    print(
        f"[{name}] test NLL {common.fmt(result['test_nll_nats'])} +- {common.fmt(result['test_nll_stderr_nats'])} "
        f"nats after {result['iterations']} steps ({result['ms_per_step_median']:.1f} ms median); "
        f"{args.samples} samples {result['sample_seconds']:.2f} s, {args.grid}^2 grid "
        f"{result['density_seconds']:.2f} s (float32)",
        flush=True,
    )
    common.write_result(folder, result)
    return result


# ---------------------------------------------------------------------------------------------------------------
# The whole benchmark
# ---------------------------------------------------------------------------------------------------------------


def collect(args: argparse.Namespace) -> dict[float, list[dict[str, Any]]]:
    """The finished runs of every requested budget, set and family (in that order), checked against the settings."""
    out: dict[float, list[dict[str, Any]]] = {}
    for budget in args.budgets:
        found = []
        for data in args.datasets:
            for family in args.families:
                folder = run_dir(args.runs_dir, budget, data, family, args.seed)
                if run_status(folder, run_settings(args, budget, data, family)) == "done":
                    found.append(common.read_result(folder))
        out[budget] = found
    return out


def write_report(args: argparse.Namespace, info: dict[str, Any], commands: list[str], figures: bool) -> None:
    results = collect(args)
    pictures = {}
    if figures and not args.no_figure:
        for budget in args.budgets:
            folders = {
                (d, f): run_dir(args.runs_dir, budget, d, f, args.seed) for d in args.datasets for f in args.families
            }
            path = Path(f"{Path(args.out).with_suffix('')}_{budget_name(budget)}.png")
            labels = {f: FAMILIES[f][0] for f in args.families}
            pictures[budget] = str(report.picture(path, args.datasets, labels, folders, args.figure_resolution))
            print(f"wrote {pictures[budget]}", flush=True)
    md, payload = report.render(results, args, info, commands, {f: FAMILIES[f][0] for f in args.families}, pictures)
    md_path, js_path = common.write_results(args.out, md, payload)
    print(f"wrote {md_path} and {js_path}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = common.command_line(None if argv is None else [sys.argv[0], *argv])
    if args.rerender:
        # The settings, machine and commands of the report being rebuilt (when there is one), the run folders' figures.
        info, commands, settings = report.previous(args.out)
        for key, value in settings.items():
            setattr(args, key, value)
        commands.append("# re-rendered from the run folders, no training: " + command)
    else:
        info, commands = common.machine_info(), [command]
    try:
        pending = [
            (b, d, f, args)
            for b in args.budgets
            for d in args.datasets
            for f in args.families
            if run_status(run_dir(args.runs_dir, b, d, f, args.seed), run_settings(args, b, d, f)) != "done"
        ]  # (every existing folder is checked before anything trains)
    except RunMismatchError as err:
        raise SystemExit(f"compare_flows: {err}") from None
    if args.rerender:
        write_report(args, info, commands, figures=True)
        return
    common.set_threads(args.threads)
    print(
        f"compare_flows: {len(pending)} run(s) to train or continue, {args.jobs} at a time (finished runs skipped); "
        f"budgets {', '.join(budget_name(b) for b in args.budgets)} of training, "
        f"torch.set_num_threads({args.threads}), {info['nproc']} CPUs, load average {info['loadavg_at_start']} "
        "(shared machine).",
        flush=True,
    )
    write_report(args, info, commands, figures=False)
    common.run_jobs(train_one, pending, args.jobs, lambda: write_report(args, info, commands, figures=False))
    write_report(args, info, commands, figures=True)


if __name__ == "__main__":
    main()
