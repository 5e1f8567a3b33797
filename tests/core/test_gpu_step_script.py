"""benchmarks/gpu_step.py keeps working without a GPU: its --tiny CPU run, its sync counter and warning counts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from monoflow_core.solvers import SolverWarning

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_step.py"


@pytest.fixture(scope="module")
def gpu_step():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(SCRIPT.parent))


def test_tiny_run_of_two_parts_writes_its_json(tmp_path):
    out = tmp_path / "gpu_step.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--parts", "BE", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["finished"] and doc["tiny"] and doc["device"] == "cpu"
    assert "CPU smoke run" in doc["label"] and "not a GPU figure" in doc["label"]
    cpu = doc["parts"]["E"]["paper-toy-monotone on cpu"]
    assert "error" not in cpu, cpu
    assert cpu["median_step_s"] > 0 and cpu["fused_path"] is True
    assert cpu["solver_warnings"] == 0 and "solver_warning_kinds" in cpu
    assert doc["parts"]["E"]["cuda"] == {"skipped": "no CUDA device in this run"}
    # Part B: G's products at each scale with CPila plain and fused, and a series term each way.
    assert doc["defaults"]["fused_cpila"].startswith("fused CPila off (auto")  # the CPU keeps the plain formulas
    assert sorted(doc["parts"]["B"]) == ["scale 1 fp32", "scale 2 fp32", "scale 3 fp32"]
    for key, result in doc["parts"]["B"].items():
        assert "error" not in result, (key, result)
        assert result["cpila_plain"]["policy"].startswith("fused CPila off (requested)")
        assert result["cpila_fused"]["policy"] == "fused CPila on (on), jobs run eagerly (compile off)"
        for variant in ("cpila_plain", "cpila_fused"):
            times = result[variant]
            assert all(times[k] > 0 for k in ("value_s", "value_and_vjp_s", "term_vjp_s", "term_jvp_s", "linearize_s"))
    # Full sizes need a GPU: refused with a message, not started on the CPU.
    if not torch.cuda.is_available():
        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--parts", "E", "--out", str(tmp_path / "x.json")],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert done.returncode != 0 and "--tiny" in done.stderr


def test_sync_counter_sees_item_and_bool(gpu_step):
    x = torch.arange(4.0)
    counter = gpu_step.SyncCounter()
    with counter:
        y = x * 2
        float(y.sum())
        bool((y > 1).any())
        y.max().item()
        torch.cumsum(y, 0)  # no sync
    assert counter.count == 3


def test_solver_warnings_are_counted_not_hidden(gpu_step, tmp_path):
    report = gpu_step.Report(tmp_path / "r.json", {"what": "test"})

    def noisy():
        warnings.warn("MonotoneBlock forward solve: 2 of 4 samples did not converge", SolverWarning, stacklevel=1)
        warnings.warn("MonotoneBlock forward solve: 1 of 4 samples did not converge", SolverWarning, stacklevel=1)
        return {"value": 1}

    def failing():
        raise RuntimeError("CUDA out of memory (simulated)")

    gpu_step.guarded(report, "X", "noisy", noisy)
    gpu_step.guarded(report, "X", "failing", failing)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["parts"]["X"]["noisy"]["solver_warnings"] == 2
    assert doc["parts"]["X"]["noisy"]["solver_warning_kinds"] == {"MonotoneBlock forward solve": 2}
    assert doc["solver_warnings_total"] == 2
    assert "out of memory" in doc["parts"]["X"]["failing"]["error"]  # recorded; the script goes on
