"""Where one training step of the paper's 2-D toy model spends its time, phase by phase (ms/step).

Trains the paper's toy Monotone Flow (10 blocks, DenseNet G 3x16, CPila, float32, batch 500, one intra-op thread)
on 8gaussians as ``engine_speed.py`` does and reports, over steps 51 to ``--steps``, the median wall time of:
the whole step; the forward pass (``-log_prob(x).mean()``); the backward pass; the Adam step; the power-iteration
update; and, inside them, the fused path's pieces (``monoflow_core.fused``): the fold of the spectrally normalised
weights, the Newton solves (and within them the evaluations of G with its Jacobian, the 2x2 Newton steps and the
safeguard), and the batched reverse passes of the backward; on the compiled kernels (the default, see
``monoflow_core.fused.kernels``) the fold, the forward and the backward are one call each. The pieces are timed by
wrapping the package's functions (in the modules that call them) with ``time.perf_counter`` (a few microseconds of
overhead per call), so they are approximate and do not add up to the phases exactly.

Usage: ``python benchmarks/step_phases.py [--steps 150] [--kernels compiled|pytorch]``.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import common
import torch
from engine_speed import new_optimizer

import monoflow_core as mc
from monoflow_core import fused
from monoflow_core.data import ToyStream
from monoflow_core.fused import SETTINGS, backward, fold, fold_cache, newton, run

#: (function, the modules of monoflow_core.fused that call it, label): the pieces of the fused path that are timed.
PIECES: list[tuple[str, tuple[ModuleType, ...], str]] = [
    ("fold_nets", (run, fold_cache), "fused: fold of the weights (forward)"),
    ("torch_forward", (run,), "fused: forward solves and log-dets"),
    ("evaluate_with_jacobian", (newton, run), "  G with its Jacobian (all Newton evaluations)"),
    ("newton_step", (newton,), "  2x2 Newton steps"),
    ("safeguard", (newton,), "  safeguard"),
    ("reverse_tangents", (backward,), "fused backward: reverse pass through the tangents"),
    ("reverse_primals", (backward,), "fused backward: reverse pass through the primals"),
    ("kernel_fold", (fold,), "compiled: fold of the weights (forward; its backward is inside the backward phase)"),
    ("kernel_forward", (run,), "compiled: forward solves and log-dets"),
    ("kernel_backward", (run,), "compiled: backward of the solves and log-dets"),
]


def wrap(name: str, callers: tuple[ModuleType, ...], label: str, acc: dict[str, float]) -> Callable[[], None]:
    """Time every call of ``name`` from the modules ``callers`` into ``acc[label]``; returns a function that undoes
    the wrapping."""
    original = getattr(callers[0], name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t0

    def undo() -> None:
        for module in callers:
            setattr(module, name, original)

    for module in callers:
        setattr(module, name, timed)
    return undo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (phases are timed from step 51)")
    parser.add_argument(
        "--kernels",
        choices=["compiled", "pytorch"],
        default="compiled",
        help="the fused path's kernels: compiled (Numba) or PyTorch",
    )
    args = parser.parse_args(argv)
    if args.steps <= 50:
        parser.error("--steps must exceed 50")
    torch.set_num_threads(1)
    if args.kernels == "pytorch":
        SETTINGS.use_kernels = False
    elif not fused.kernels_ready(torch.float32, wait=True):
        parser.error("the compiled kernels are unavailable here; use --kernels pytorch")
    torch.manual_seed(0)
    flow = mc.build_flow(mc.FlowConfig())
    opt = new_optimizer(flow)
    stream = ToyStream("8gaussians", 0)
    acc: dict[str, float] = collections.defaultdict(float)
    undo = [wrap(name, callers, label, acc) for name, callers, label in PIECES]
    series: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for step in range(args.steps):
            x = stream.sample(500)
            acc.clear()
            t0 = time.perf_counter()
            loss = -flow.log_prob(x).mean()
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            t3 = time.perf_counter()
            mc.update_lipschitz(flow, 5)
            t4 = time.perf_counter()
            if step >= 50:
                for label, seconds in (
                    ("whole step", t4 - t0),
                    ("forward", t1 - t0),
                    ("backward", t2 - t1),
                    ("Adam step", t3 - t2),
                    ("power iterations", t4 - t3),
                    *acc.items(),
                ):
                    series[label].append(seconds)
    finally:
        for u in undo:
            u()
    info = common.machine_info()
    print(
        f"{info['machine']}, {info['nproc']} cores, load {info['loadavg_at_start']}, torch {info['torch']}, "
        f"git {info['git_revision']}; 1 intra-op thread; steps 51-{args.steps}; {args.kernels} kernels"
    )
    for label, values in series.items():
        print(f"{label:52s} {statistics.median(values) * 1e3:7.2f} ms/step (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
