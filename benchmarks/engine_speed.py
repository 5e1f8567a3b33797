"""Engine speed on the paper's 2-D toy model (10 monotone blocks, DenseNet G 3x16, CPila; docs/algorithm.md §9.1).

Measures, on this machine, in float32 at batch 500:

* the median wall time of one training step (forward with exact log-det, backward, Adam step, spectral-norm
  update) over steps 51-250 of a real 8gaussians training run (ms/step);
* forward-solve evaluations of G per block over that run (median and maximum);
* the log-density on a 400 x 400 grid over [-4, 4]^2 and 160,000 samples (s), after that training;
* the same training step on the generic autograd path (``flow.fast_path = False``) for comparison.

The fused path runs on the compiled kernels (``monoflow_core.fused.kernels``, Numba), compiled or loaded from Numba's
cache before the first timed step (the seconds that took are printed), or with ``--kernels pytorch`` on the PyTorch
kernels alone.

Usage: ``python benchmarks/engine_speed.py [--steps 250] [--threads 1] [--eval-threads 1] [--workers 2]
[--kernels compiled|pytorch] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import monoflow_core as mc
from monoflow_core import evaluation
from monoflow_core.data import ToyStream
from monoflow_core.training import make_adam


def new_optimizer(flow: mc.Flow) -> torch.optim.Optimizer:
    """The optimizer of every speed benchmark: Adam (fused kernel), lr 1e-3, weight decay 1e-5."""
    return make_adam((p for p in flow.parameters() if p.requires_grad), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-5)


def timed_step(flow: mc.Flow, opt: torch.optim.Optimizer, x: torch.Tensor) -> tuple[float, float]:
    """One training step on the batch ``x`` (exact NLL, backward, Adam, 5 power iterations): (seconds, loss)."""
    t0 = time.perf_counter()
    loss = -flow.log_prob(x).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    mc.update_lipschitz(flow, 5)
    return time.perf_counter() - t0, float(loss.detach())


def timed_eval(flow: mc.Flow) -> tuple[float, float]:
    """Seconds for 40,000 log-densities of seeded points on [-4, 4]^2 and for 40,000 samples, in chunks of 5,000,
    serial, without autograd (the flow in eval mode)."""
    flow.eval()
    points = (torch.rand(40_000, 2, generator=torch.Generator().manual_seed(0)) - 0.5) * 8
    with torch.no_grad():
        t0 = time.perf_counter()
        for chunk in points.split(5000):
            flow.log_prob(chunk)
        log_prob_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(8):
            flow.sample(5000)
    return log_prob_s, time.perf_counter() - t0


def train_steps(flow: mc.Flow, steps: int, seed: int) -> tuple[list[float], list[int], list[int], float]:
    """Run ``steps`` Adam steps on fresh 8gaussians batches; per-step ms, median/max G-evaluations, last loss."""
    stream = ToyStream("8gaussians", seed)
    opt = new_optimizer(flow)
    times, med_evals, max_evals = [], [], []
    loss = float("nan")
    for _ in range(steps):
        seconds, loss = timed_step(flow, opt, stream.sample(500))
        times.append(seconds * 1e3)
        its = torch.cat([s["forward"].iterations for s in flow.solver_stats() if s["forward"] is not None])
        med_evals.append(int(its.median()))
        max_evals.append(int(its.max()))
    return times, med_evals, max_evals, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250, help="training steps (the median uses steps 51..N)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for training (1 was fastest)")
    parser.add_argument("--eval-threads", type=int, default=1, help="intra-op threads for grid and sampling")
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="threads evaluating chunks of the grid and the samples in parallel (one intra-op thread each)",
    )
    parser.add_argument("--generic-steps", type=int, default=60, help="steps on the generic autograd path")
    parser.add_argument(
        "--kernel-threads",
        type=int,
        default=None,
        help="threads the compiled kernels split a training batch over (default: --threads)",
    )
    parser.add_argument(
        "--kernels",
        choices=["compiled", "pytorch"],
        default="compiled",
        help="the fused path's kernels: compiled (Numba) or PyTorch",
    )
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    # (imported here: engine_compare.py imports this module next to older engines without monoflow_core.runtime)
    from monoflow_core.runtime import tune_allocator

    tune_allocator()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    from common import command_line, machine_info  # (here, for the same reason as tune_allocator above)

    info = machine_info()  # at the start: the load average says how busy the machine was before the run
    from monoflow_core import fused
    from monoflow_core.fused import SETTINGS

    kernels_s = None
    if args.kernel_threads is not None:
        SETTINGS.threads = args.kernel_threads
    if args.kernels == "pytorch":
        SETTINGS.use_kernels = False
    else:
        t0 = time.perf_counter()
        if not (fused.kernels_ready(torch.float32, wait=True) and fused.kernels_ready(torch.float64, wait=True)):
            raise SystemExit("the compiled kernels are unavailable here (is Numba installed?); use --kernels pytorch")
        kernels_s = time.perf_counter() - t0
    flow = mc.build_flow()
    flow.train()
    times, med_evals, max_evals, loss = train_steps(flow, args.steps, seed=0)
    window = times[50:] if len(times) > 60 else times
    step_ms = statistics.median(window)

    torch.set_num_threads(args.eval_threads)
    flow.eval()
    ticks = torch.linspace(-4, 4, 400)
    yy, xx = torch.meshgrid(ticks, ticks, indexing="ij")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    # Warm-up (first-call allocations), then the timed passes in the flow's own dtype (float32).
    evaluation.log_prob(flow, grid[:5000], chunk=5000, dtype=None)
    t0 = time.perf_counter()
    logp = evaluation.log_prob(flow, grid, chunk=5000, dtype=None, workers=args.workers)
    grid_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = evaluation.sample(flow, 160_000, chunk=5000, seed=0, workers=args.workers)
    sample_s = time.perf_counter() - t0
    assert torch.isfinite(logp).all() and bool(np.isfinite(samples).all())

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    generic = mc.build_flow()
    generic.fast_path = False
    generic.train()
    gtimes, _, _, _ = train_steps(generic, args.generic_steps, seed=0)
    generic_ms = statistics.median(gtimes[10:] if len(gtimes) > 20 else gtimes)

    figures = {
        "command": command_line(),
        "machine_info": info,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads available to torch, "
        f"torch {torch.__version__}",
        "train_step_ms_median": round(step_ms, 2),
        "train_step_ms_p90": round(sorted(window)[int(0.9 * len(window))], 2),
        "generic_autograd_step_ms_median": round(generic_ms, 2),
        "forward_G_evaluations_per_block_median": statistics.median(med_evals[50:] or med_evals),
        "forward_G_evaluations_per_block_max": max(max_evals[50:] or max_evals),
        "grid_400x400_s": round(grid_s, 3),
        "samples_160000_s": round(sample_s, 3),
        "train_loss_last_nats": round(loss, 4),
        "threads_train": args.threads,
        "threads_eval": args.eval_threads,
        "eval_workers": args.workers,
        "kernels": args.kernels,
        "kernels_compile_or_load_s": None if kernels_s is None else round(kernels_s, 2),
    }
    print(
        f"training step (fused exact path, float32, batch 500, steps 51-{args.steps}): "
        f"median {step_ms:.1f} ms/step, p90 {figures['train_step_ms_p90']} ms/step ({args.threads} thread)"
    )
    print(f"training step (generic autograd path): median {generic_ms:.1f} ms/step")
    print(
        f"forward-solve G evaluations per block: median {figures['forward_G_evaluations_per_block_median']}, "
        f"max {figures['forward_G_evaluations_per_block_max']}"
    )
    print(
        f"log-density, 400x400 grid: {grid_s:.2f} s; 160,000 samples: {sample_s:.2f} s "
        f"({args.workers} worker threads x {args.eval_threads} intra-op thread, chunks of 5,000, float32)"
    )
    print(f"last training loss: {loss:.4f} nats (exact NLL of the batch)")
    if kernels_s is not None:
        print(f"kernels: compiled (Numba), compiled or loaded from its cache in {kernels_s:.1f} s before the run")
    else:
        print("kernels: PyTorch")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(figures, fh, indent=2)


if __name__ == "__main__":
    main()
