"""Training-step time of the Table 1 presets on the generic path and on the fused path (both kernel sets), interleaved.

For each preset (default: ``paper-toy-monotone`` and ``paper-toy-idensenet``, the i-DenseNet baseline with CLipSwish,
whose learnable ``beta`` the fused path folds into the weights), three copies of the model (seed 0, float32, one
intra-op thread) train on 8gaussians batches of 500 with the preset's Adam and 5 power iterations per step
(``engine_speed.timed_step``):

* ``generic``: ``flow.fast_path = False`` (autograd through G and its Jacobian; where the i-DenseNet baseline ran
  before CLipSwish was fused);
* ``fused-pytorch``: the fused path on its PyTorch kernels (``monoflow_core.fused.SETTINGS.use_kernels = False``);
* ``fused-compiled``: the fused path on the compiled kernels (``monoflow_core.fused.kernels``, the default).

The copies take turns, ``--steps`` steps each per round, for ``--rounds`` rounds, so that the machine's drift hits all
three alike; the first ``--warmup`` steps of each copy are not counted. Reported: the median ms/step of each, and the
solver warnings each copy raised (never silenced).

Usage: ``python benchmarks/preset_step.py [--presets paper-toy-monotone paper-toy-idensenet] [--rounds 3]
[--steps 40] [--warmup 10] [--out benchmarks/results/preset_step]``.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import common
import torch
from engine_speed import timed_step

import monoflow_core as mc
from monoflow_core import fused
from monoflow_core.data import ToyStream
from monoflow_core.fused import SETTINGS
from monoflow_core.presets import load_preset
from monoflow_core.solvers import SolverWarning
from monoflow_core.training import make_adam

MODES = ("generic", "fused-pytorch", "fused-compiled")


def _copy(preset: str) -> tuple[mc.Flow, torch.optim.Optimizer, ToyStream]:
    """A fresh model of the preset (seed 0, float32), its Adam (the preset's settings) and its data stream."""
    spec = load_preset(preset)
    train = spec.train_config()
    torch.manual_seed(0)
    flow = mc.build_flow(spec.model_config())
    flow.train()
    opt = make_adam(
        (p for p in flow.parameters() if p.requires_grad),
        lr=train.lr,
        betas=tuple(train.betas),
        weight_decay=train.weight_decay,
    )
    return flow, opt, ToyStream("8gaussians", 0)


def measure(preset: str, rounds: int, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median ms/step and solver warnings of each mode on ``preset`` (the modes interleaved round by round)."""
    copies = {mode: _copy(preset) for mode in MODES}
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    warned = dict.fromkeys(MODES, 0)
    for _ in range(rounds):
        for mode, (flow, opt, stream) in copies.items():
            flow.fast_path = mode != "generic"
            SETTINGS.use_kernels = mode == "fused-compiled"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SolverWarning)
                for _ in range(steps):
                    seconds, _ = timed_step(flow, opt, stream.sample(500))
                    times[mode].append(seconds * 1e3)
            warned[mode] += sum(issubclass(w.category, SolverWarning) for w in caught)
    SETTINGS.use_kernels = True
    eligible = [fused.fast_eligible(layer, 2) for layer in copies["generic"][0].layers]
    return {
        mode: {
            "median_ms": statistics.median(times[mode][warmup:]),
            "steps": len(times[mode]) - warmup,
            "solver_warnings": warned[mode],
            "fused_blocks": sum(eligible),
        }
        for mode in MODES
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["paper-toy-monotone", "paper-toy-idensenet"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "preset_step"))
    args = parser.parse_args()
    common.set_threads(1)
    info = common.machine_info()
    assert fused.kernels_ready(torch.float32, wait=True), "the compiled kernels are unavailable"
    results = {}
    rows = []
    for preset in args.presets:
        results[preset] = measure(preset, args.rounds, args.steps, args.warmup)
        for mode, r in results[preset].items():
            rows.append([preset, mode, f"{r['median_ms']:.1f}", r["steps"], r["solver_warnings"]])
            print(
                f"{preset:22s} {mode:15s} {r['median_ms']:7.1f} ms/step  ({r['steps']} steps, "
                f"{r['solver_warnings']} solver warnings)",
                flush=True,
            )
    markdown = ["# Training step of the Table 1 presets: generic vs fused path", ""]
    markdown += common.machine_header(info, [common.command_line()])
    markdown += [
        "Median ms per training step (float32, batch 500, one thread; the three copies interleaved round by "
        "round; the first steps of each copy not counted):",
        "",
    ]
    markdown += common.markdown_table(["preset", "path", "ms/step", "steps", "solver warnings"], rows)
    path, _ = common.write_results(
        args.out, markdown, {"machine": info, "command": common.command_line(), "results": results}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
