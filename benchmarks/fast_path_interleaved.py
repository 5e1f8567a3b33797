"""Compare this fused path (``monoflow_core/fast.py``) with the one of another git revision, step by step.

This machine's speed drifts by up to 1.8x within minutes, so two runs minutes apart mislead. Here both versions of
the fused path live in one process and alternate every training step (and every evaluation pass), so the drift
affects both alike. The other revision's ``fast.py`` is read with ``git show`` and its relative imports pointed at
this checkout's engine, which works while the rest of the engine keeps the interface ``fast.py`` uses
(``Flow`` calls ``run_fused``, ``fusable_runs``, ``fused_inverse``, ``fast_eligible`` and, where the revision has it,
``folded_runs``).

Measures, for the paper's toy model (float32, batch 500, 8gaussians, one intra-op thread): the median training
step over steps 51-300 of each version's own run (ms/step), then 40,000 log-densities and 40,000 samples in chunks
of 5,000 (serial, seconds, median of 4 alternating passes).

Usage: ``python benchmarks/fast_path_interleaved.py REVISION`` (e.g. ``c3a0e0d``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from common import command_line, machine_info
from engine_speed import new_optimizer, timed_eval, timed_step  # this folder (the script's own) is on sys.path

import monoflow_core as mc
import monoflow_core.flow as flow_module
from monoflow_core import fast
from monoflow_core.data import ToyStream
from monoflow_core.runtime import tune_allocator

API = ("run_fused", "fusable_runs", "fused_inverse", "fast_eligible")
#: Names ``Flow`` uses that older revisions lack: such a revision gets the stand-in (it changes nothing there).
OPTIONAL_API = {"folded_runs": lambda layers, dim: contextlib.nullcontext()}


def load_other(revision: str) -> ModuleType:
    """``monoflow_core/fast.py`` of ``revision`` as a module importing this checkout's engine."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:monoflow_core/fast.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    source = re.sub(r"^(\s*)from \.", r"\1from monoflow_core.", source, flags=re.MULTILINE)
    path = Path(tempfile.mkdtemp()) / "fast_other.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("fast_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fast_other"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision", help="git revision whose fast.py to compare with")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each version (median of 51..N)")
    parser.add_argument("--json", help="also write the figures, the command and the machine to this JSON file")
    args = parser.parse_args()
    tune_allocator()
    torch.set_num_threads(1)
    versions = {"other": load_other(args.revision), "this": fast}
    runs = {}
    for name in versions:
        torch.manual_seed(0)
        model = mc.build_flow()
        model.train()
        runs[name] = (model, new_optimizer(model), ToyStream("8gaussians", 0))

    def use(name: str) -> None:
        for attr in API:
            setattr(flow_module, attr, getattr(versions[name], attr))
        for attr, stand_in in OPTIONAL_API.items():
            setattr(flow_module, attr, getattr(versions[name], attr, stand_in))

    steps: dict[str, list[float]] = {name: [] for name in versions}
    for i in range(args.steps):
        for name in versions:
            use(name)
            model, opt, stream = runs[name]
            seconds, _ = timed_step(model, opt, stream.sample(500))
            if i >= 50:
                steps[name].append(seconds)
    densities: dict[str, list[float]] = {name: [] for name in versions}
    draws: dict[str, list[float]] = {name: [] for name in versions}
    for _ in range(4):
        for name in versions:
            use(name)
            log_prob_s, sample_s = timed_eval(runs[name][0])
            densities[name].append(log_prob_s)
            draws[name].append(sample_s)
    use("this")
    figures: dict[str, object] = {"command": command_line(), "machine": machine_info(), "revision": args.revision}
    for key, label, data, scale, unit in (
        ("training_step_ms", f"training step (median of steps 51-{args.steps}, 1 thread)", steps, 1e3, "ms"),
        ("log_prob_40k_s", "40k log-densities (serial, chunks of 5,000, median of 4 passes)", densities, 1.0, "s"),
        ("samples_40k_s", "40k samples (serial, chunks of 5,000, median of 4 passes)", draws, 1.0, "s"),
    ):
        other, this = statistics.median(data["other"]), statistics.median(data["this"])
        figures[key] = {"other": scale * other, "this": scale * this, "speedup": other / this}
        print(
            f"{label}: {args.revision} {scale * other:.2f} {unit}, this checkout {scale * this:.2f} {unit} "
            f"({other / this:.2f}x)",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
