"""Operators, kernel launches and FLOPs of one CIFAR-shaped implicit block, per variant: load-independent figures.

On a GPU every PyTorch operator that is not a view launches a kernel, and every host read (``.item()``, ``bool()``)
waits for the queue; their numbers do not depend on the machine or its load, so they can be counted on the CPU
with a ``TorchDispatchMode``. This script counts them for one scale-1 monotone block of ``paper-cifar10`` (3 x 32 x 32,
conv DenseNet G of depth 3 and growth 172, CPila; the preset's estimator: Poisson roulette, 10 exact terms in
training, 20 in evaluation) in four variants:

* CPila by the plain formulas or by the fused jobs (:mod:`monoflow_core.nn.fused_cpila`; counted as they run
  eagerly, and as they would run compiled: each job one kernel);
* the power series' terms by vector-Jacobian products through a graph of G (``products="vjp"``) or by forward-mode
  products with G's derivatives kept (``products="jvp"``).

Per unit (one evaluation of G in a solve, one series term, one backward-solve iteration) and per whole pass
(training forward and backward; a no-gradient evaluation): operators, the non-view operators (kernel launches), the
convolution FLOPs (``torch.utils.flop_counter``) and host synchronisations (:class:`monoflow_core.syncs.SyncCounter`).
The solves keep a fixed shape, as on CUDA (:func:`monoflow_core.solvers.default_fixed_shape`).
Times are not measured: ``benchmarks/gpu_step.py`` (part B) times the same variants on a GPU.

``--compile-check`` also compiles each fused job with ``torch.compile`` (inductor, on this CPU: C++ code, tens of
seconds per job) and records how many kernels inductor generated for it. ``--time`` adds the CPU's wall-clock time of
one series term each way (interleaved medians, one thread), for this block and for the ``digits-cpu`` G at batch 64:
timings of a shared machine, noisy, unlike the counts.

Usage: ``python benchmarks/block_operators.py [--growth 172] [--batch 2] [--compile-check] [--time] [--out PATH]``
(writes ``PATH.json`` and ``PATH.md``; default ``benchmarks/results/block_operators``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch.utils.flop_counter import FlopCounterMode

import monoflow_core.solvers as solvers
from monoflow_core import MonotoneBlock
from monoflow_core.blocks import _NetEvaluator
from monoflow_core.logdet import EstimatorSettings
from monoflow_core.nn import fused_cpila
from monoflow_core.nn.conv import ConvDenseNetG
from monoflow_core.presets import load_preset
from monoflow_core.solvers import SolverWarning
from monoflow_core.syncs import OperatorCounter, SyncCounter

VARIANTS = [("plain", "vjp"), ("plain", "jvp"), ("fused", "vjp"), ("fused", "jvp")]

#: Kernels inductor generates per fused job (``--compile-check`` on this CPU: one each, two for ``vjp_grads``, whose
#: two outputs have different shapes).
KERNELS_PER_JOB = {"vjp_grads": 2}


class JobOperatorCounter(OperatorCounter):
    """:class:`~monoflow_core.syncs.OperatorCounter` that also counts the operators inside fused jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.in_jobs = 0  # non-view operators run inside fused jobs (eagerly)
        self.jobs = 0  # kernels of the fused jobs called, had they been compiled
        self.inside = 0

    def counted(self, func: Any) -> None:
        super().counted(func)
        if self.inside and not getattr(func, "is_view", False):
            self.in_jobs += 1

    def compiled_launches(self) -> int:
        """Kernel launches if every fused job were one compiled kernel."""
        return self.launches - self.in_jobs + self.jobs


@contextlib.contextmanager
def counting() -> Iterator[tuple[JobOperatorCounter, FlopCounterMode, SyncCounter]]:
    """Count operators, FLOPs and host synchronisations; fused jobs report their own calls to the counter."""
    counter = JobOperatorCounter()
    original = fused_cpila._run

    def run(name: str, job: Callable[..., Any], *args: Any) -> Any:
        counter.jobs += KERNELS_PER_JOB.get(name, 1)
        counter.inside += 1
        try:
            return original(name, job, *args)
        finally:
            counter.inside -= 1

    fused_cpila._run = run  # type: ignore[assignment]
    try:
        with FlopCounterMode(display=False) as flops, SyncCounter() as syncs, counter:
            yield counter, flops, syncs
    finally:
        fused_cpila._run = original  # type: ignore[assignment]


def figures(counter: JobOperatorCounter, flops: FlopCounterMode, syncs: SyncCounter) -> dict[str, Any]:
    return {
        "operators": counter.ops,
        "launches": counter.launches,
        "launches_if_compiled": counter.compiled_launches(),
        "fused_job_kernels": counter.jobs,
        "gflop": flops.get_total_flops() / 1e9,
        "host_syncs": syncs.count,
    }


def make_block(growth: int, products: str) -> tuple[MonotoneBlock, ConvDenseNetG]:
    preset = load_preset("paper-cifar10").model
    torch.manual_seed(0)
    g = ConvDenseNetG(
        3,
        (32, 32),
        depth=preset["depth"],
        growth=growth,
        activation=preset["activation"],
        coeff=preset["lipschitz"],
        lip_coeff=preset["concat_lipschitz"],
    )
    estimator = EstimatorSettings(
        n_exact_terms=preset["n_exact_terms"],
        n_exact_terms_eval=preset["n_exact_terms_eval"],
        roulette=preset["roulette"],
        roulette_param=preset["roulette_param"],
        products=products,
    )
    block = MonotoneBlock(g, logdet="estimator", max_iter=preset["max_iter"], estimator=estimator)
    return block, g


def units(block: MonotoneBlock, g: ConvDenseNetG, x: torch.Tensor) -> dict[str, Any]:
    """One G evaluation, one series term each way, the linearisation's extra cost, one backward-solve product."""
    ev = _NetEvaluator(g)
    u = torch.randn_like(x)
    out: dict[str, Any] = {}
    with torch.no_grad(), counting() as c:
        ev.value(x)
    out["G value (a solver iteration)"] = figures(*c)
    with torch.enable_grad():
        point = x.clone().requires_grad_(True)
        gw = ev.value(point)
        with counting() as c:
            torch.autograd.grad(gw, point, u, retain_graph=True)
        out["series term by vjp (= a backward-solve product)"] = figures(*c)
        with counting() as c:
            ev.value(point.detach().requires_grad_(True))
        graph = figures(*c)
        with counting() as c:
            _, jvp = ev.value_and_linear(point.detach().requires_grad_(True))
        linear = figures(*c)
    with torch.no_grad(), counting() as c:
        jvp(u)
    out["series term by jvp"] = figures(*c)
    out["linearisation's extra cost (derivatives at the point)"] = {
        k: linear[k] - graph[k] for k in ("operators", "launches", "launches_if_compiled", "fused_job_kernels", "gflop")
    }
    return out


def passes(block: MonotoneBlock, x: torch.Tensor) -> dict[str, Any]:
    """A training pass (forward and backward) and a no-gradient evaluation, with the same roulette draws."""
    out: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(1)
        xr = x.clone().requires_grad_(True)
        with counting() as c:
            y, logdet = block(xr)
            (y.square().mean() + logdet.mean()).backward()
        assert block.forward_stats is not None and block.backward_stats is not None
        out["training pass"] = {
            **figures(*c),
            "forward_iterations_max": int(block.forward_stats.iterations.max()),
            "backward_iterations_max": int(block.backward_stats.iterations.max()),
        }
        torch.manual_seed(1)
        with torch.no_grad(), counting() as c:
            block(x)
        out["evaluation pass"] = {**figures(*c), "forward_iterations_max": int(block.forward_stats.iterations.max())}
    out["solver_warnings"] = sum(issubclass(w.category, SolverWarning) for w in caught)
    return out


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, alternating their order from one repeat to the next."""
    times: dict[str, list[float]] = {key: [] for key in runs}
    keys = list(runs)
    for i in range(repeats):
        for key in keys if i % 2 == 0 else keys[::-1]:
            t0 = time.perf_counter()
            runs[key]()
            times[key].append(time.perf_counter() - t0)
    return times


def term_times(growth: int, batch: int) -> dict[str, Any]:
    """CPU milliseconds of one series term by vjp and by jvp (plain CPila), medians of interleaved repeats."""
    digits = load_preset("digits-cpu").model
    cases = {
        f"paper-cifar10 scale 1 (3 x 32 x 32, growth {growth}), batch {batch}": (3, 32, growth, batch, 6),
        f"digits-cpu scale 1 (1 x 8 x 8, growth {digits['growth']}), batch 64": (1, 8, digits["growth"], 64, 40),
        f"digits-cpu scale 2 (4 x 4 x 4, growth {digits['growth']}), batch 64": (4, 4, digits["growth"], 64, 40),
    }
    out: dict[str, Any] = {}
    for name, (c, side, width, b, repeats) in cases.items():
        torch.manual_seed(0)
        ev = _NetEvaluator(ConvDenseNetG(c, (side, side), depth=3, growth=width, coeff=0.98))
        x = torch.rand(b, c, side, side) - 0.5
        u = torch.randn_like(x)
        with torch.enable_grad():
            point = x.clone().requires_grad_(True)
            gw = ev.value(point)
            _, jvp = ev.value_and_linear(x.clone().requires_grad_(True))
        assert jvp is not None
        times = _interleaved(
            {
                "vjp": functools.partial(torch.autograd.grad, gw, point, u, retain_graph=True),
                "jvp": functools.partial(jvp, u),
            },
            repeats,
        )
        out[name] = {f"term_{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
        print(f"  {name}: {out[name]}", file=sys.stderr, flush=True)
    return out


def compile_check() -> dict[str, Any]:
    """Compile each fused job with inductor on this CPU and record the kernels it generated."""
    from torch._inductor import metrics

    x = torch.randn(2, 8, 8, 86)
    grad = torch.randn(2, 8, 8, 172)
    k, shift, scale = 5.0, 0.2, 1.0 / 1.06
    jobs = {
        "value": (fused_cpila._value_job, (x, k, shift, scale)),
        "value_and_derivative": (fused_cpila._value_and_derivative_job, (x, k, shift, scale)),
        "derivative": (fused_cpila._derivative_job, (x, k, shift, scale)),
        "vjp": (fused_cpila._vjp_job, (x, grad, k, shift, scale)),
        "vjp_grads": (fused_cpila._vjp_grads_job, (x, grad, x.clone(), k, shift, scale)),
    }
    out: dict[str, Any] = {}
    for name, (job, args) in jobs.items():
        metrics.reset()
        compiled = torch.compile(job, dynamic=True, fullgraph=True)
        result = compiled(*args)
        expected = job(*args)
        pairs = zip(result, expected, strict=True) if isinstance(result, tuple) else [(result, expected)]
        out[name] = {
            "kernels_generated": int(metrics.generated_kernel_count),
            "max_abs_difference_to_eager": max(float((a - b).abs().max()) for a, b in pairs),
        }
    return out


def markdown(doc: dict[str, Any]) -> list[str]:
    rows = []
    for variant, parts in doc["variants"].items():
        measured = {**parts["units"], **{k: v for k, v in parts["passes"].items() if isinstance(v, dict)}}
        for unit, f in measured.items():
            iterations = ", ".join(f"{k.split('_')[0]} {v}" for k, v in f.items() if k.endswith("iterations_max"))
            rows.append(
                [
                    unit + (f" (max iterations: {iterations})" if iterations else ""),
                    variant,
                    f["operators"],
                    f["launches"],
                    f["launches_if_compiled"],
                    f"{f['gflop']:.3g}",
                    f.get("host_syncs", "-"),
                ]
            )
    lines = [
        "# Operators, kernel launches and FLOPs of one CIFAR-shaped block",
        "",
        *common.machine_header(doc["machine"], [doc["command"]]),
        f"One scale-1 monotone block of paper-cifar10 (3 x 32 x 32, conv DenseNet G of depth 3 and growth "
        f"{doc['growth']}, CPila; Poisson roulette, 10 exact terms in training, 20 in evaluation), batch "
        f"{doc['batch']}, float32, on the CPU, solves with fixed shapes as on CUDA. These counts do not depend on"
        " the machine or its load (the timing note above does not apply to them); whole passes depend on the solves'"
        " iterations, listed. Launches: operators that are not views (each one kernel on a GPU). Launches if"
        " compiled: the same with every fused CPila job compiled (one kernel each, two for the second-order job).",
        "",
        *common.markdown_table(
            ["unit", "variant", "operators", "launches", "launches if compiled", "GFLOP", "host syncs"], rows
        ),
    ]
    if doc.get("cpu_term_times"):
        lines += [
            "",
            "CPU wall-clock time of one series term, plain CPila, one thread (`--time`; medians of interleaved"
            " repeats on the shared machine above: noisy, unlike the counts):",
            "",
            *common.markdown_table(
                ["G", "term by vjp (ms)", "term by jvp (ms)"],
                [[k, f"{v['term_vjp_ms']:.1f}", f"{v['term_jvp_ms']:.1f}"] for k, v in doc["cpu_term_times"].items()],
            ),
        ]
    if doc.get("compile_check"):
        lines += ["", "Inductor on this CPU (`--compile-check`), kernels generated per fused job:", ""]
        lines += [
            f"- {k}: {v['kernels_generated']} (largest difference to the eager job "
            f"{v['max_abs_difference_to_eager']:.2g})"
            for k, v in doc["compile_check"].items()
        ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--growth", type=int, default=172)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--compile-check", action="store_true")
    parser.add_argument("--time", action="store_true", help="also time one series term each way on this CPU")
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "block_operators"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 3, 32, 32) - 0.5
    doc: dict[str, Any] = {
        "what": "block_operators",
        "command": common.command_line(),
        "machine": common.machine_info(),
        "growth": args.growth,
        "batch": args.batch,
        "variants": {},
    }
    saved = fused_cpila.FUSION
    # Fixed-shape solves, as on CUDA (the CPU's default compacts the batch, which reads the host every iteration).
    solvers.default_fixed_shape = lambda device: True  # type: ignore[assignment]
    try:
        for cpila, products in VARIANTS:
            fused_cpila.FUSION = fused_cpila.FusionPolicy(mode="on" if cpila == "fused" else "off", compile=False)
            block, g = make_block(args.growth, products)
            key = f"CPila {cpila}, series by {products}"
            print(f"{key} ...", file=sys.stderr, flush=True)
            doc["variants"][key] = {"units": units(block, g, x), "passes": passes(block, x)}
    finally:
        fused_cpila.FUSION = saved
    if args.compile_check:
        doc["compile_check"] = compile_check()
    if args.time:
        doc["cpu_term_times"] = term_times(args.growth, args.batch)
    md_path, json_path = common.write_results(args.out, markdown(doc), doc)
    print("\n".join(markdown(doc)))
    print(f"wrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
