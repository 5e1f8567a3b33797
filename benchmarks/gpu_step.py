"""One GPU lease, one script: precision, G's products, training steps, digits and the 2-D toy on CUDA.

Made for a 10-minute device lease: the JSON result (default ``benchmarks/results/gpu_step.json``) is rewritten after
every measurement, so a run stopped by its time limit still returns everything measured so far. Solver warnings
are recorded (``warnings.catch_warnings(record=True)``), counted per measurement and reported, never silenced.

Parts (``--parts``, default ``ABEDC``: the heaviest, C, last):

* **A, precision**: one scale-1 monotone block of ``paper-cifar10`` (3 x 32 x 32, conv DenseNet G, growth 172) at
  batch 64: its forward solve's iterations, residual, failures and time in float32 with TF32 off and on, float64,
  and bfloat16 (at initialisation: trained weights may need more iterations). TF32 is set through
  ``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``.
* **B, G's products**: at each scale of ``paper-cifar10``, in float32 (TF32 off and on) and bfloat16, the time of G's
  value, its vector-Jacobian product and its forward-mode (Jacobian-vector) product, each with CPila by the plain
  formulas and by the fused jobs (:mod:`monoflow_core.nn.fused_cpila`, compiled on CUDA; the first call's time, which
  includes compiling, is reported apart), and the two ways a power-series term can be taken: a vector-Jacobian
  product through a kept graph of G, or a forward-mode product with G's derivatives kept (``products="jvp"``), with
  the linearisation that keeps them. These decide the defaults that the CPU's operator counts chose
  (``benchmarks/block_operators.py``, docs/gpu.md): fused CPila on CUDA, series terms by forward mode.
* **C, training steps**: MNIST- and CIFAR-10-shaped models (``paper-mnist``, ``paper-cifar10``) with 1-1-1, 4-4-4 and
  16-16-16 blocks, batch 64, synthetic images: median of 5 steps after 2 warm-up steps, peak memory, forward and
  backward solve iterations, failed samples, host synchronisations per step (``aten._local_scalar_dense`` counted
  by a ``TorchDispatchMode`` during one more step), and the automatic ``--grad-accumulation`` for the device.
* **D, digits on CUDA**: ``digits-cpu`` for 300 steps, then the exact test bits/dim.
* **E, the 2-D toy**: the ``paper-toy-monotone`` training step on CUDA against the CPU's fused path.

``--tiny`` shrinks every size (growth 8, batch 2, one block per scale, a few steps) so that the whole script runs on
the CPU in minutes: that checks the script, and its figures are CPU smoke figures, never GPU ones (the JSON says
which device and whether ``tiny`` was set).

Usage::

    python benchmarks/gpu_step.py [--device cuda] [--parts ABEDC] [--tiny] [--out benchmarks/results/gpu_step.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from monoflow_core.blocks import SQRT2, MonotoneBlock, _NetEvaluator
from monoflow_core.data.images import ImageSet
from monoflow_core.logdet import EstimatorSettings
from monoflow_core.memory_plan import plan_grad_accumulation
from monoflow_core.nn import fused_cpila
from monoflow_core.nn.conv import ConvDenseNetG
from monoflow_core.precision import tf32_mode
from monoflow_core.presets import load_preset
from monoflow_core.resources import memory_budget
from monoflow_core.solvers import SolverWarning
from monoflow_core.training import Trainer

PARTS = "ABCDE"


# -- bookkeeping ---------------------------------------------------------------------------------------------------
class Report:
    """The result document, written atomically after every change."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**header, "parts": {}, "solver_warnings_total": 0}

    def add(self, part: str, key: str, value: Any) -> None:
        self.doc["parts"].setdefault(part, {})[key] = value
        self.doc["solver_warnings_total"] += int(value.get("solver_warnings", 0)) if isinstance(value, dict) else 0
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


@contextlib.contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record every warning (solver warnings included) so that they can be counted and reported."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def warning_summary(caught: list[warnings.WarningMessage]) -> dict[str, Any]:
    solver = [w for w in caught if issubclass(w.category, SolverWarning)]
    kinds = Counter(str(w.message).split(":")[0][:80] for w in solver)
    for text, n in kinds.items():
        print(f"  solver warning x{n}: {text}", file=sys.stderr)
    return {
        "solver_warnings": len(solver),
        "solver_warning_kinds": dict(kinds),
        "other_warnings": len(caught) - len(solver),
    }


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations: every ``.item()``, ``bool(tensor)`` and ``float(tensor)`` ends in
    ``aten._local_scalar_dense``."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def tf32(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """TF32 for matrix products and cuDNN convolutions on or off, restored afterwards (the engine's own switch)."""
    return tf32_mode(enabled)


#: CPila's two variants for part B; the fused one is compiled on CUDA only (on the CPU compiling takes minutes, and a
#: smoke run checks the script): one policy object each, so compiled kernels are kept between measurements.
_CPILA: dict[str, fused_cpila.FusionPolicy] = {}


def cpila_policy(variant: str, device: torch.device) -> fused_cpila.FusionPolicy:
    if variant not in _CPILA:
        _CPILA[variant] = fused_cpila.FusionPolicy(
            mode="on" if variant == "fused" else "off", compile=device.type == "cuda"
        )
    return _CPILA[variant]


@contextlib.contextmanager
def cpila(variant: str, device: torch.device) -> Iterator[fused_cpila.FusionPolicy]:
    """CPila by the plain formulas (``"plain"``) or the fused jobs (``"fused"``) inside the block."""
    saved = fused_cpila.FUSION
    fused_cpila.FUSION = cpila_policy(variant, device)
    try:
        yield fused_cpila.FUSION
    finally:
        fused_cpila.FUSION = saved


def guarded(report: Report, part: str, key: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one measurement; a failure (out of memory, an error) is recorded and the script goes on."""
    print(f"[{part}] {key} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with recorded_warnings() as caught:
        try:
            result = fn()
        except Exception as err:  # recorded, not hidden: the JSON names the error and the traceback's tail
            result = {
                "error": f"{type(err).__name__}: {err}"[:500],
                "traceback": traceback.format_exc().splitlines()[-6:],
            }
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    result = {**result, **warning_summary(caught), "wall_s": time.perf_counter() - t0}
    print(
        f"[{part}] {key}: {json.dumps({k: v for k, v in result.items() if k != 'traceback'}, default=str)}",
        file=sys.stderr,
        flush=True,
    )
    report.add(part, key, result)


# -- sizes ---------------------------------------------------------------------------------------------------------
def sizes(tiny: bool) -> dict[str, Any]:
    if tiny:
        return {
            "growth": 8,
            "batch": 2,
            "blocks": [1],
            "repeats": 2,
            "steps": 2,
            "warmup": 1,
            "digits_steps": 3,
            "toy_steps": 3,
            "fc_growth": 8,
            "arithmetics": ["fp32"],  # TF32 and bfloat16 are GPU matters
        }
    return {
        "growth": None,
        "batch": 64,
        "blocks": [1, 4, 16],
        "repeats": 5,
        "steps": 5,
        "warmup": 2,
        "digits_steps": 300,
        "toy_steps": 20,
        "fc_growth": None,
        "arithmetics": ["fp32", "tf32", "bf16"],
    }


def _model_overrides(size: dict[str, Any]) -> dict[str, Any]:
    return {k: size[k] for k in ("growth", "fc_growth") if size[k] is not None}


def cifar_scales(size: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of each scale of paper-cifar10 (squeezes, no factor-out)."""
    c, h, w = load_preset("paper-cifar10").model["image_shape"]
    return [(c, h, w), (4 * c, h // 2, w // 2), (16 * c, h // 4, w // 4)]


def conv_g(
    shape: tuple[int, int, int], size: dict[str, Any], device: torch.device, dtype: torch.dtype
) -> ConvDenseNetG:
    model = load_preset("paper-cifar10").model
    g = ConvDenseNetG(
        shape[0],
        shape[1:],
        depth=model["depth"],
        growth=size["growth"] or model["growth"],
        activation=model["activation"],
        coeff=model["lipschitz"],
        lip_coeff=model["concat_lipschitz"],
    )
    return g.to(device=device, dtype=dtype)


# -- parts ---------------------------------------------------------------------------------------------------------
def part_a(report: Report, device: torch.device, size: dict[str, Any]) -> None:
    shape = cifar_scales(size)[0]
    settings = [
        ("float32, TF32 off", torch.float32, False),
        ("float32, TF32 on", torch.float32, True),
        ("float64", torch.float64, False),
        ("bfloat16", torch.bfloat16, False),
    ]
    for label, dtype, allow in settings:

        def run(dtype: torch.dtype = dtype, allow: bool = allow) -> dict[str, Any]:
            torch.manual_seed(0)
            g = conv_g(shape, size, device, dtype)
            block = MonotoneBlock(g)
            x = (torch.rand(size["batch"], *shape, device=device) - 0.5).to(dtype)
            # The forward solve alone (what precision decides), as the block runs it: w + G(w) = sqrt(2) x.
            solve = block._solve
            with tf32(allow), torch.no_grad():
                seconds = timed(
                    lambda: solve(_NetEvaluator(g), SQRT2 * x, 1.0, "forward solve"),
                    device,
                    repeats=size["repeats"] // 2 + 1,
                )
                _, stats, _ = solve(_NetEvaluator(g), SQRT2 * x, 1.0, "forward solve")
            return {
                "dtype": str(dtype),
                "tf32": allow,
                "seconds_per_forward": seconds,
                "tol": stats.tol,
                "max_iter": stats.max_iter,
                "method": stats.method,
                "iterations_median": float(stats.iterations.float().median()),
                "iterations_max": int(stats.iterations.max()),
                "residual_max": float(stats.residual.max()),
                "failed": int((~stats.converged).sum()),
            }

        guarded(report, "A", label, run)


def g_products(g: ConvDenseNetG, x: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of G's value, its products, and the two ways of taking a power-series term, for the CPila in effect."""
    prepared = g.prepare()
    ev = _NetEvaluator(g)
    u = torch.randn_like(x)
    out: dict[str, float] = {}
    synchronize(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        g.evaluate(x, prepared)
    synchronize(device)
    out["first_value_s"] = time.perf_counter() - t0  # includes compiling the fused jobs, where they compile
    with torch.no_grad():
        out["value_s"] = timed(lambda: g.evaluate(x, prepared), device, repeats)

    def vjp() -> None:
        xr = x.detach().requires_grad_(True)
        torch.autograd.grad(g.evaluate(xr, prepared), xr, u)

    out["value_and_vjp_s"] = timed(vjp, device, repeats)
    with torch.no_grad():
        out["jvp_torch_func_s"] = timed(
            lambda: torch.func.jvp(lambda z: g.evaluate(z, prepared), (x,), (u,)), device, repeats
        )
    # A power-series term: a vector-Jacobian product through a kept graph, or a forward-mode product with G's
    # derivatives kept (and the linearisation that keeps them, against the plain graph it replaces).
    point = x.detach().requires_grad_(True)
    with torch.enable_grad():
        gw = ev.value(point)
        out["graph_s"] = timed(lambda: ev.value(x.detach().requires_grad_(True)), device, repeats)
        out["linearize_s"] = timed(lambda: ev.value_and_linear(x.detach().requires_grad_(True)), device, repeats)
        _, jvp = ev.value_and_linear(point)
        out["term_vjp_s"] = timed(lambda: torch.autograd.grad(gw, point, u, retain_graph=True), device, repeats)
    assert jvp is not None
    out["term_jvp_s"] = timed(lambda: jvp(u), device, repeats)
    return out


#: Part B's arithmetics: dtype and TF32.
ARITHMETICS = {"fp32": (torch.float32, False), "tf32": (torch.float32, True), "bf16": (torch.bfloat16, False)}


def part_b(report: Report, device: torch.device, size: dict[str, Any]) -> None:
    for s, shape in enumerate(cifar_scales(size), start=1):
        for label in size["arithmetics"]:
            dtype, allow = ARITHMETICS[label]

            def run(
                shape: tuple[int, int, int] = shape, dtype: torch.dtype = dtype, allow: bool = allow, s: int = s
            ) -> dict[str, Any]:
                torch.manual_seed(0)
                g = conv_g(shape, size, device, dtype)
                x = (torch.rand(size["batch"], *shape, device=device) - 0.5).to(dtype)
                out: dict[str, Any] = {"scale": s, "shape": list(shape), "batch": size["batch"]}
                with tf32(allow):
                    for variant in ("plain", "fused"):
                        with cpila(variant, device) as policy:
                            times = g_products(g, x, device, size["repeats"])
                            out[f"cpila_{variant}"] = {**times, "policy": policy.describe(device.type)}
                return out

            guarded(report, "B", f"scale {s} {label}", run)


def synthetic_trainer(preset_name: str, blocks: int, size: dict[str, Any], device: str) -> Trainer:
    preset = load_preset(preset_name)
    model = preset.model_config(
        blocks_per_scale=[blocks] * len(preset.model["blocks_per_scale"]), **_model_overrides(size)
    )
    c, h, w = preset.model["image_shape"]
    levels = int(preset.model.get("levels", 256))
    train = preset.train_config(
        data="digits", data_dir=None, device=device, batch_size=size["batch"], eval_every=0, dtype="float32"
    )
    budget = memory_budget(device) if device.startswith("cuda") else None
    if budget is not None:
        train = train.replace(
            grad_accumulation=plan_grad_accumulation(
                model.replace(image_shape=[c, h, w]), train, budget
            ).grad_accumulation
        )
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, levels, (max(256, size["batch"]), c, h, w), dtype=torch.uint8, generator=generator)
    return Trainer(
        model, train, images=ImageSet(name=f"synthetic-{preset_name}", split="train", images=images, levels=levels)
    )


def _iterations(trainer: Trainer, which: str) -> dict[str, Any]:
    stats = [s.get(which) for s in trainer.flow.solver_stats()]
    stats = [s for s in stats if s is not None and s.iterations.numel()]
    if not stats:
        return {}
    medians = [float(s.iterations.float().median()) for s in stats]
    return {
        f"{which}_iterations_median_per_block": statistics.median(medians),
        f"{which}_iterations_max": max(int(s.iterations.max()) for s in stats),
        f"{which}_failed": sum(int((~s.converged).sum()) for s in stats),
    }


def part_c(report: Report, device: torch.device, size: dict[str, Any]) -> None:
    for blocks in size["blocks"]:
        for preset in ("paper-mnist", "paper-cifar10"):

            def run(preset: str = preset, blocks: int = blocks) -> dict[str, Any]:
                torch.manual_seed(0)
                trainer = synthetic_trainer(preset, blocks, size, str(device))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                times, losses = [], []
                for i in range(size["warmup"] + size["steps"]):
                    synchronize(device)
                    t0 = time.perf_counter()
                    m = trainer.step()
                    synchronize(device)
                    if i >= size["warmup"]:
                        times.append(time.perf_counter() - t0)
                    losses.append(m.loss)
                out = {
                    "blocks_per_scale": [blocks] * 3,
                    "batch": size["batch"],
                    "grad_accumulation": trainer.train_config.grad_accumulation,
                    "median_step_s": statistics.median(times),
                    "step_s": times,
                    "losses": losses,
                    "peak_memory_gib": (
                        torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                    ),
                    **_iterations(trainer, "forward"),
                    **_iterations(trainer, "backward"),
                }
                counter = SyncCounter()
                with counter:
                    trainer.step()
                out["host_syncs_per_step"] = counter.count
                return out

            guarded(report, "C", f"{preset} {blocks}-{blocks}-{blocks}", run)


def part_d(report: Report, device: torch.device, size: dict[str, Any]) -> None:
    def run() -> dict[str, Any]:
        preset = load_preset("digits-cpu")
        trainer = Trainer(preset.model_config(), preset.train_config(device=str(device), eval_every=0))
        t0 = time.perf_counter()
        for _ in range(size["digits_steps"]):
            m = trainer.step()
        synchronize(device)
        train_s = time.perf_counter() - t0
        ev = trainer.evaluate(n=64 if size["digits_steps"] < 10 else 10**9, split="test")
        return {
            "steps": size["digits_steps"],
            "train_s": train_s,
            "last_loss": m.loss,
            "test_bpd": ev.bpd,
            "test_bpd_stderr": ev.bpd_stderr,
            "exact": ev.exact,
            "n_test": ev.n_test,
        }

    guarded(report, "D", f"digits-cpu {size['digits_steps']} steps", run)


def part_e(report: Report, device: torch.device, size: dict[str, Any]) -> None:
    devices = ["cpu"] + ([str(device)] if device.type == "cuda" else [])
    for dev in devices:

        def run(dev: str = dev) -> dict[str, Any]:
            preset = load_preset("paper-toy-monotone")
            trainer = Trainer(preset.model_config(), preset.train_config(device=dev, eval_every=0))
            target = torch.device(dev)
            seconds = timed(trainer.step, target, size["toy_steps"], warmup=2)
            return {
                "device": dev,
                "fused_path": bool(getattr(trainer.flow, "fast_path", False)) and dev == "cpu",
                "median_step_s": seconds,
                "threads": torch.get_num_threads(),
            }

        guarded(report, "E", f"paper-toy-monotone on {dev}", run)
    if device.type != "cuda":
        report.add("E", "cuda", {"skipped": "no CUDA device in this run"})


RUNNERS = {"A": part_a, "B": part_b, "C": part_c, "D": part_d, "E": part_e}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu (with --tiny only)")
    parser.add_argument("--parts", default="ABEDC", help="which parts, in order (letters of A-E)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a CPU smoke run of the script itself")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "gpu_step.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; run with --tiny --device cpu to check the script")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("no CUDA device: the full sizes are for a GPU; pass --tiny for a CPU smoke run")
    unknown = set(args.parts.upper()) - set(PARTS)
    if unknown:
        raise SystemExit(f"--parts: unknown {sorted(unknown)}; choose letters of {PARTS}")
    info = common.machine_info()
    if device.type == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(device)
    size = sizes(args.tiny)
    header = {
        "what": "gpu_step",
        "device": str(device),
        "tiny": args.tiny,
        "label": (
            "CPU smoke run with tiny sizes: checks the script, not a GPU figure"
            if device.type != "cuda"
            else f"GPU run on {info.get('cuda_device')}"
        )
        + (" (tiny sizes)" if args.tiny and device.type == "cuda" else ""),
        "command": common.command_line(),
        "machine": info,
        "sizes": size,
        "tf32_defaults": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "defaults": {
            "fused_cpila": fused_cpila.FUSION.describe(device.type),
            "series_products": f"{EstimatorSettings().products} (forward mode for the project's G)",
        },
    }
    report = Report(Path(args.out), header)
    report.write()
    for part in args.parts.upper():
        RUNNERS[part](report, device, size)
    report.doc["finished"] = True
    report.write()
    print(f"wrote {args.out}; solver warnings: {report.doc['solver_warnings_total']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
