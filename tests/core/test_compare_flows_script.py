"""benchmarks/compare_flows.py: the winner summary, the resumption rules and a tiny end-to-end run (no timings
asserted: the benchmark prints them)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The benchmark's modules (compare_flows, its report and common), imported from benchmarks/."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield argparse.Namespace(
            flows=importlib.import_module("compare_flows"),
            report=importlib.import_module("compare_flows_report"),
            common=importlib.import_module("common"),
        )
    finally:
        sys.path.remove(str(BENCHMARKS))


def run(data: str, family: str, nll: float | None, se: float = 0.002, **extra) -> dict:
    """A finished run's result as the summary reads it."""
    return {
        "data": data,
        "family": family,
        "test_nll_nats": nll,
        "test_nll_stderr_nats": None if nll is None else se,
        "ms_per_step_median": extra.pop("ms", 10.0),
        "iterations": extra.pop("iterations", 1000),
        "sample_seconds": extra.pop("sample", 1.0),
        "density_seconds": extra.pop("density", 1.0),
        "parameters": 5000,
        **extra,
    }


FAMILIES = ["monotone", "idensenet", "realnvp"]


def test_the_summary_names_a_clear_winner_and_calls_close_results_a_tie(bench):
    results = [
        # moons: Real NVP ahead by 0.05 nats, far beyond 2 x sqrt(2) x 0.002: a clear win.
        run("moons", "monotone", 2.50),
        run("moons", "idensenet", 2.55),
        run("moons", "realnvp", 2.45),
        # rings: Monotone and i-DenseNet 0.004 apart (< 2 x 0.0028): a tie between them; Real NVP far behind.
        run("rings", "monotone", 2.700),
        run("rings", "idensenet", 2.704),
        run("rings", "realnvp", 2.90),
    ]
    s = bench.report.summarise(results, ["moons", "rings"], FAMILIES)
    moons, rings = s["per_set"]["moons"], s["per_set"]["rings"]
    assert moons["winner"] == "realnvp" and moons["leaders"] == ["realnvp"]
    assert [r["family"] for r in moons["ranking"]] == ["realnvp", "monotone", "idensenet"]
    assert moons["margin"] == pytest.approx(0.05)
    assert rings["winner"] is None and rings["leaders"] == ["monotone", "idensenet"]
    assert s["wins"] == {"monotone": 0, "idensenet": 0, "realnvp": 1}
    assert s["shared_leads"] == {"monotone": 1, "idensenet": 1, "realnvp": 0}
    assert s["mean_rank"] == {"monotone": 1.5, "idensenet": 2.5, "realnvp": 2.0}
    duel = s["monotone_vs_idensenet"]
    assert duel == {"sets": 2, "monotone_lower": 2, "monotone_clearly_lower": 1, "idensenet_clearly_lower": 0}
    lines = "\n".join(
        bench.report.summary_lines(s, {"monotone": "Monotone", "idensenet": "i-DenseNet", "realnvp": "RNVP"})
    )
    assert "**RNVP** wins" in lines and "a tie within the noise between Monotone, i-DenseNet" in lines
    assert "Monotone ranks 2 of 3" in lines


def test_a_run_without_a_usable_nll_never_wins_and_ranks_last(bench):
    results = [run("moons", "monotone", 2.50), run("moons", "idensenet", None), run("moons", "realnvp", 2.60)]
    s = bench.report.summarise(results, ["moons"], FAMILIES)
    assert s["per_set"]["moons"]["winner"] == "monotone"
    assert s["per_set"]["moons"]["failed"] == ["idensenet"]
    assert s["mean_rank"]["idensenet"] == len(FAMILIES)
    assert s["monotone_vs_idensenet"]["sets"] == 0  # no pair to compare


def test_speed_leaders_are_read_from_the_runs(bench):
    results = [
        run("moons", "monotone", 2.5, ms=12.0, sample=3.0, density=0.5),
        run("moons", "realnvp", 2.6, ms=4.0, sample=0.2, density=0.9),
    ]
    s = bench.report.summarise(results, ["moons"], ["monotone", "realnvp"])
    assert s["fastest"] == {"ms_per_step_median": "realnvp", "sample_seconds": "realnvp", "density_seconds": "monotone"}
    assert s["per_set"]["moons"]["complete"]
    partial = bench.report.summarise(results[:1], ["moons"], ["monotone", "realnvp"])
    assert not partial["per_set"]["moons"]["complete"] and partial["mean_rank"] == {}


def test_step_times_keep_the_median_in_a_bounded_histogram(bench):
    times = bench.common.StepTimes()
    values = [0.001 * (1 + i % 7) for i in range(1001)] + [2.0]  # median 4 ms, one slow outlier
    for v in values:
        times.add(v)
    assert times.median() == pytest.approx(0.004, rel=0.005)
    assert times.n == len(values) and times.slowest_seconds == 2.0
    assert times.mean() == pytest.approx(sum(values) / len(values))
    assert len(times.counts) <= 8
    again = bench.common.StepTimes(json.loads(json.dumps(times.to_dict())))  # through a checkpoint's JSON
    assert again.median() == times.median() and again.n == times.n and again.total_seconds == times.total_seconds


def _args(bench, tmp_path: Path, *extra: str) -> argparse.Namespace:
    return bench.flows.parse_args(["--out", str(tmp_path / "out"), "--test-size", "500", *extra])


def test_finished_runs_are_skipped_and_foreign_ones_refused(bench, tmp_path, monkeypatch):
    flows = bench.flows
    args = _args(bench, tmp_path)
    settings = flows.run_settings(args, 60.0, "moons", "monotone")
    folder = flows.run_dir(args.runs_dir, 60.0, "moons", "monotone", args.seed)
    assert flows.run_status(folder, settings) == "new"
    folder.mkdir(parents=True)
    bench.common.write_result(folder, {"settings": settings, "test_nll_nats": 2.5})
    assert flows.run_status(folder, settings) == "done"

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(flows, "_train_locked", no_training)
    assert flows.train_one(60.0, "moons", "monotone", args)["test_nll_nats"] == 2.5
    # Another test size (or preset content, budget, ...) is another run: refused, not reused.
    other = flows.run_settings(_args(bench, tmp_path, "--test-size", "800"), 60.0, "moons", "monotone")
    with pytest.raises(flows.RunMismatchError, match="test_size"):
        flows.run_status(folder, other)


def test_an_interrupted_run_continues_from_its_checkpoint(bench, tmp_path):
    from monoflow_core.presets import load_preset
    from monoflow_core.training import Trainer

    flows = bench.flows
    args = _args(bench, tmp_path)
    settings = flows.run_settings(args, 60.0, "moons", "monotone")
    folder = flows.run_dir(args.runs_dir, 60.0, "moons", "monotone", args.seed)
    folder.mkdir(parents=True)
    preset = load_preset("quick-monotone")
    trainer = Trainer(preset.model_config(), preset.train_config(eval_every=0, test_size=500))
    progress = flows._new_progress(settings)
    trainer.save_checkpoint(folder / "checkpoint.safetensors", metadata={flows.PROGRESS_KEY: progress})
    assert flows.run_status(folder, settings) == "partial"
    with pytest.raises(flows.RunMismatchError, match="budget_seconds"):
        flows.run_status(folder, {**settings, "budget_seconds": 600.0})
    # A budget read on another clock is another run.
    wall = flows.run_settings(_args(bench, tmp_path, "--clock", "wall"), 60.0, "moons", "monotone")
    with pytest.raises(flows.RunMismatchError, match="clock"):
        flows.run_status(folder, wall)


def test_a_tiny_run_end_to_end_resumes_and_rerenders(tmp_path):
    """Two families on one set for a fraction of a second each: result.json per run, the report, a second start
    that trains nothing, and a re-render from the run folders."""
    pytest.importorskip("zuko")
    out = tmp_path / "cmp"
    base = [sys.executable, str(BENCHMARKS / "compare_flows.py"), "--out", str(out)]
    tiny = ["--budget-seconds", "0.3", "--datasets", "moons", "--families", "monotone,maf", "--test-size", "500"]
    tiny += ["--samples", "300", "--grid", "8", "--figure-resolution", "16"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def go(*extra: str) -> subprocess.CompletedProcess:
        done = subprocess.run([*base, *extra], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return done

    first = go(*tiny)
    assert "2 run(s) to train" in first.stdout
    payload = json.loads(out.with_suffix(".json").read_text())
    runs = payload["results"]["0.3"]
    assert [r["family"] for r in runs] == ["monotone", "maf"]
    for r in runs:
        assert r["iterations"] >= 1 and r["train_seconds"] >= 0.3 and r["test_points"] == 500
        # The budget is read on the training thread's CPU clock by default; the wall time is kept beside it.
        assert r["clock"] == "thread" and r["settings"]["clock"] == "thread"
        assert r["train_wall_seconds"] >= 0.9 * r["train_seconds"]
        assert r["exact_logdet"] and r["samples"] == 300 and r["grid"] == 8
        assert r["test_nll_nats"] > r["entropy_floor_nats"] - 0.1  # a density: no NLL far below the entropy
    assert Path(payload["pictures"]["0.3"]).is_file()
    result = out.parent / "cmp_runs" / "budget-0.3s" / "moons-maf-seed0" / "result.json"
    stamp = result.stat().st_mtime_ns
    again = go(*tiny)
    assert "0 run(s) to train" in again.stdout and result.stat().st_mtime_ns == stamp
    out.with_suffix(".md").unlink()
    go("--rerender", "--no-figure")
    md = out.with_suffix(".md").read_text()
    assert "re-rendered from the run folders" in md and "### Who wins where" in md and "moons" in md
