"""Compare two checkouts of the engine in one time window (this machine's speed drifts by up to 1.8x).

Runs a short benchmark of each checkout in a fresh process, alternately, ``--rounds`` times: 150 training steps of
the paper's toy model (float32, batch 500, 8gaussians, one intra-op thread; median ms/step of steps 51-150), then
the log-density of 40,000 points and 40,000 samples in chunks of 5,000 (serial, one thread; seconds).

Usage: ``python benchmarks/engine_compare.py OTHER_CHECKOUT [--rounds 2]``, e.g. after
``git worktree add /tmp/base c3a0e0d``. Each process imports ``monoflow_core`` from the checkout it measures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, statistics, sys
sys.path.insert(0, sys.argv[1])  # the engine under test
sys.path.insert(1, sys.argv[2])  # this checkout's benchmarks folder (engine_speed's step)
import torch
import monoflow_core as mc
from monoflow_core.data import ToyStream
from engine_speed import new_optimizer, timed_eval, timed_step
try:
    from monoflow_core.runtime import tune_allocator
    tune_allocator()
except ImportError:  # an engine from before monoflow_core.runtime
    pass
assert mc.__file__.startswith(sys.argv[1]), mc.__file__
torch.manual_seed(0)
torch.set_num_threads(1)
flow = mc.build_flow()
flow.train()
stream = ToyStream("8gaussians", 0)
opt = new_optimizer(flow)
times = [timed_step(flow, opt, stream.sample(500))[0] for _ in range(150)]
grid_s, sample_s = timed_eval(flow)
print(json.dumps({"step_ms": 1e3 * statistics.median(times[50:]), "log_prob_40k_s": grid_s,
                  "samples_40k_s": sample_s}))
"""


def measure(checkout: Path) -> dict[str, float]:
    here = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkout), str(here)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path, help="the other checkout (a folder holding monoflow_core/)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements of each checkout")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent.parent
    for r in range(args.rounds):
        for name, path in (("other", args.other.resolve()), ("this", here)):
            m = measure(path)
            print(
                f"round {r + 1} {name:5s} ({path}): training step {m['step_ms']:.1f} ms/step (median of steps "
                f"51-150), 40k log-densities {m['log_prob_40k_s']:.2f} s, 40k samples {m['samples_40k_s']:.2f} s "
                "(serial, chunks of 5,000)",
                flush=True,
            )


if __name__ == "__main__":
    main()
