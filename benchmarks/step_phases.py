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

With ``--loop trainer`` (the default) the step is the one users get, :meth:`monoflow_core.training.Trainer.step`
with the default configurations (the same model and data), and the phases are the trainer's: the batch, the forward
and backward passes (``accumulate_gradients``; the backward pass alone is ``torch.autograd.backward``), the gradient
norm, the solver statistics, the guarded optimizer step (Adam inside it), ``zero_grad``, the flat layout's attach
(``monoflow_core.fused.flat``) and the EMA; the compiled kernels' own calls (solves, backward, fold each way) are
summed, and "outside the compiled kernels" is the whole step less that sum. ``--layout both`` alternates blocks of
steps between a trainer with the flat parameter layout and one without (one tensor per parameter, the layout before
it), in one process. ``--loop engine`` is the lean loop of ``engine_speed.py`` (forward, backward, Adam, power
iterations) with the fused path's pieces, as before. The trainer loop also reports the whole step and the time
outside the kernels in the thread's CPU time, which other processes on a busy machine inflate less than wall time.
``--profile N`` prints torch.profiler's operator table (self CPU time) for N further steps.

Usage: ``python benchmarks/step_phases.py [--steps 150] [--kernels compiled|pytorch] [--loop trainer|engine]
[--layout flat|per-tensor|both] [--profile N]``.
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
    timed = _timed(original, acc, label)

    def undo() -> None:
        for module in callers:
            setattr(module, name, original)

    for module in callers:
        setattr(module, name, timed)
    return undo


#: The trainer's phases: (object or module, attribute, label); methods of the trainer and of its optimizer and guard
#: are wrapped on the instance.
TRAINER_PHASES: list[tuple[str, str, str]] = [
    ("trainer", "_next_batch", "batch"),
    ("optimizer", "zero_grad", "zero_grad (twice)"),
    ("trainer", "_attach_flat", "flat layout: validity check and gradient views"),
    ("training", "accumulate_gradients", "forward and backward"),
    ("autograd", "backward", "  backward pass"),
    ("training", "grad_norm", "gradient norm"),
    ("training", "solver_summary", "solver statistics"),
    ("guard", "step", "guarded optimizer step"),
    ("optimizer", "step", "  Adam"),
    ("trainer", "_update_ema", "EMA (off by default)"),
]

#: Suffix of the rows timed in this thread's CPU time (``time.thread_time``: less sensitive than wall time to
#: other processes on a busy machine; the kernels run on the calling thread with one intra-op thread).
CPU = " (thread CPU time)"

#: The compiled kernels' entry points (module, function): their summed time is "inside the compiled kernels".
KERNEL_CALLS = [
    ("kernels", "solve_run"),
    ("kernels", "backward_run"),
    ("kernels_fold", "fold_forward"),
    ("kernels_fold", "fold_backward"),
]


def _timed(original: Callable[..., Any], acc: dict[str, float], label: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - t0

    return timed


def _wrap_trainer(trainer: Any, acc: dict[str, float]) -> None:
    """Time the trainer's phases (instance attributes: this trainer only) into ``acc``."""
    owners = {"trainer": trainer, "optimizer": trainer.optimizer, "guard": trainer._guard}
    for owner, name, label in TRAINER_PHASES:
        if owner in owners:
            setattr(owners[owner], name, _timed(getattr(owners[owner], name), acc, label))


def trainer_loop(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    """Steps of default trainers (with and/or without the flat layout), timed phase by phase."""
    from monoflow_core import training
    from monoflow_core.fused import kernels, kernels_fold
    from monoflow_core.fused.flat import FLAT
    from monoflow_core.training import TrainConfig, Trainer

    layouts = ["flat", "per-tensor"] if args.layout == "both" else [args.layout]
    accs: dict[str, dict[str, float]] = {}
    trainers = {}
    for layout in layouts:
        FLAT.enabled = layout == "flat"
        trainers[layout] = Trainer(mc.FlowConfig(), TrainConfig())
        accs[layout] = collections.defaultdict(float)
        _wrap_trainer(trainers[layout], accs[layout])
    FLAT.enabled = True
    current: list[dict[str, float]] = [accs[layouts[0]]]  # the accumulator of the trainer stepping now
    modules = {"training": training, "autograd": torch.autograd, "kernels": kernels, "kernels_fold": kernels_fold}
    undo: list[tuple[Any, str, Any]] = []

    def shared(module: Any, name: str, label: str, cpu: bool = False) -> None:
        original = getattr(module, name)

        def timed(*a: Any, **k: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time() if cpu else 0.0
            try:
                return original(*a, **k)
            finally:
                current[0][label] += time.perf_counter() - t0
                if cpu:
                    current[0][label + CPU] += time.thread_time() - c0

        undo.append((module, name, original))
        setattr(module, name, timed)

    for owner, name, label in TRAINER_PHASES:
        if owner in modules:
            shared(modules[owner], name, label)
    for module, name in KERNEL_CALLS:
        shared(modules[module], name, "inside the compiled kernels", cpu=True)
    series: dict[str, dict[str, list[float]]] = {layout: collections.defaultdict(list) for layout in layouts}
    block = 10
    try:
        for step in range(args.steps):
            for layout in layouts if (step // block) % 2 == 0 else reversed(layouts):
                acc = current[0] = accs[layout]
                acc.clear()
                t0, c0 = time.perf_counter(), time.thread_time()
                trainers[layout].step()
                whole, whole_cpu = time.perf_counter() - t0, time.thread_time() - c0
                if step >= 50:
                    out = series[layout]
                    out["whole step"].append(whole)
                    out["outside the compiled kernels"].append(whole - acc.get("inside the compiled kernels", 0.0))
                    out["whole step" + CPU].append(whole_cpu)
                    out["outside the compiled kernels" + CPU].append(
                        whole_cpu - acc.get("inside the compiled kernels" + CPU, 0.0)
                    )
                    for label, seconds in acc.items():
                        out[label].append(seconds)
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for layout in layouts:
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(args.profile):
                        trainers[layout].step()
                print(f"\ntorch.profiler, {layout} layout, {args.profile} steps (self CPU time):")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    finally:
        for module, name, original in undo:
            setattr(module, name, original)
    return series


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps (phases are timed from step 51)")
    parser.add_argument(
        "--kernels",
        choices=["compiled", "pytorch"],
        default="compiled",
        help="the fused path's kernels: compiled (Numba) or PyTorch",
    )
    parser.add_argument("--loop", choices=["trainer", "engine"], default="trainer", help="the step that is timed")
    parser.add_argument(
        "--layout",
        choices=["flat", "per-tensor", "both"],
        default="flat",
        help="trainer loop: the parameter layout (both: alternating blocks of 10 steps in one process)",
    )
    parser.add_argument("--profile", type=int, default=0, help="trainer loop: torch.profiler table over N more steps")
    args = parser.parse_args(argv)
    if args.steps <= 50:
        parser.error("--steps must exceed 50")
    torch.set_num_threads(1)
    if args.kernels == "pytorch":
        SETTINGS.use_kernels = False
    elif not fused.kernels_ready(torch.float32, wait=True):
        parser.error("the compiled kernels are unavailable here; use --kernels pytorch")
    if args.loop == "trainer":
        info = common.machine_info()
        tables = trainer_loop(args)
        print(
            f"{info['machine']}, {info['nproc']} cores, load {info['loadavg_at_start']} -> {common.load_average()}, "
            f"torch {info['torch']}, git {info['git_revision']}; 1 intra-op thread; steps 51-{args.steps}; "
            f"{args.kernels} kernels; default Trainer step"
        )
        for layout, series in tables.items():
            print(f"-- {layout} layout")
            for label, values in series.items():
                print(f"{label:52s} {statistics.median(values) * 1e3:7.2f} ms/step (median)")
        return 0
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
