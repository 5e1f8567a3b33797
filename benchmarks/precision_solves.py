"""Solves under each arithmetic, the stall exit's window, image iteration counts, compaction against fixed shapes.

The measurements behind docs/precision.md and the "Stall exit" and "Host synchronisations" sections of
docs/solvers.md, all on the CPU (TF32 is emulated: :func:`monoflow_core.precision.emulate_reduced_precision` rounds the
inputs of every float32 product and convolution to TF32's 10 mantissa bits, as the hardware does):

* ``floors``: the forward Anderson solves of every implicit block of CIFAR-10- and MNIST-shaped Monotone Flows (the
  ``paper-cifar10`` / ``paper-mnist`` presets reduced to one block per scale and one FC block), on smooth synthetic
  images after ActNorm's data initialisation, in three arithmetics: float32; TF32 with float32's floor (what the
  engine did before the precision policy: it aimed at 1.19e-6, now the stall exit stops it); TF32 with TF32's floor.
  Iterations, the lowest residual each sample reached (the noise floor), stalled samples.
* ``window``: the random contractions of ``benchmarks/contractions.py`` solved by every solver with the stall exit
  switched off; per converged sample, the longest run of iterations in which its Euclidean residual did not fall by
  10% (what the stall exit's window must exceed), and how many would have been stopped by the chosen window.
* ``training``: forward and backward solver iterations per block during short training runs of the ``digits-cpu``
  preset and of the reduced ``paper-mnist`` model (float32, default settings), for the image presets' iteration cap.
* ``compaction``: CPU time of the same solves with compaction and with fixed shapes (median of interleaved repeats),
  and host synchronisations per solve (:class:`monoflow_core.syncs.SyncCounter`).

Every solver warning is counted and reported (none is silenced).

Usage: ``python benchmarks/precision_solves.py [--parts floors,window,training,compaction] [--batch 4]
[--contractions 500] [--digits-steps 100] [--mnist-steps 3] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import common
import torch
from torch import Tensor

import monoflow_core.solvers as solvers
from monoflow_core import build_flow
from monoflow_core.blocks import SQRT2, _NetEvaluator
from monoflow_core.precision import emulate_reduced_precision
from monoflow_core.presets import load_preset
from monoflow_core.syncs import SyncCounter
from monoflow_core.training import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contractions import DIMS, Batch, picard_cap

PARTS = ("floors", "window", "training", "compaction")


# --------------------------------------------------------------------------------------------------------------
# instrumentation
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def tracked() -> Iterator[list[dict[str, Tensor]]]:
    """Record, for every solve inside the block, each sample's lowest residual and its longest run without a 10%
    decrease of the Euclidean residual (the stall test's counter ``since``, at its largest)."""
    records: list[dict[str, Tensor]] = []
    original = solvers._Run.measure

    def measure(self: Any, r: Tensor, it: int, merit: Tensor | None = None) -> Tensor:
        done = original(self, r, it, merit)
        if not hasattr(self, "_track"):
            self._track = {"lowest": self.residual.clone(), "longest": self.since.clone()}
            records.append(self._track)
        self._track["lowest"] = torch.minimum(self._track["lowest"], self.residual)
        self._track["longest"] = torch.maximum(self._track["longest"], self.since)
        return done

    solvers._Run.measure = measure  # type: ignore[method-assign]
    try:
        yield records
    finally:
        solvers._Run.measure = original  # type: ignore[method-assign]


@contextmanager
def stall_window(window: int) -> Iterator[None]:
    previous = solvers.STALL_WINDOW
    solvers.STALL_WINDOW = window
    try:
        yield
    finally:
        solvers.STALL_WINDOW = previous


@contextmanager
def counted_warnings() -> Iterator[list[str]]:
    caught: list[str] = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always", solvers.SolverWarning)
        yield caught
    caught.extend(str(w.message) for w in record if issubclass(w.category, solvers.SolverWarning))


def smooth_images(shape: list[int], batch: int, seed: int) -> Tensor:
    """Dequantized 8-bit images with smooth content (bilinear upsampling of a coarse random grid)."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, c, max(1, h // 4), max(1, w // 4), generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return (torch.floor(x * 255) + torch.rand(x.shape, generator=g)) / 256


def reduced_image_model(preset: str) -> Any:
    return load_preset(preset).model_config(blocks_per_scale=[1, 1, 1], fc_blocks=1)


# --------------------------------------------------------------------------------------------------------------
# parts
# --------------------------------------------------------------------------------------------------------------


def part_floors(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for preset in ("paper-cifar10", "paper-mnist"):
        cfg = reduced_image_model(preset)
        torch.manual_seed(0)
        flow = build_flow(cfg)
        x = smooth_images(cfg.image_shape, args.batch, seed=1)
        inputs: list[tuple[Any, Tensor]] = []
        hooks = [
            b.register_forward_pre_hook(lambda m, a, seen=inputs: seen.append((m, a[0].detach())))
            for b in flow.implicit_blocks()
        ]
        flow.train()
        with torch.no_grad():
            flow(x)  # ActNorm's data initialisation; records every block's input
        for h in hooks:
            h.remove()
        for arith, emulate, declare in (
            ("float32", False, False),
            ("tf32, float32 floor", True, False),
            ("tf32, TF32 floor", True, True),
        ):
            for k, (block, xin) in enumerate(inputs):
                ev = _NetEvaluator(block.net)
                rhs = SQRT2 * xin
                t0 = time.perf_counter()
                with tracked() as rec, counted_warnings() as warned, torch.no_grad():
                    if emulate:
                        with emulate_reduced_precision("tf32", declare=declare):
                            _, st, _ = solvers.solve(
                                lambda v, idx, r=rhs, e=ev: r[idx] - e.value(v),
                                rhs,
                                method="anderson",
                                tol=block.tol,
                                max_iter=1000,
                                memory=block.memory,
                                label=f"{preset} block {k}",
                            )
                    else:
                        _, st, _ = solvers.solve(
                            lambda v, idx, r=rhs, e=ev: r[idx] - e.value(v),
                            rhs,
                            method="anderson",
                            tol=block.tol,
                            max_iter=1000,
                            memory=block.memory,
                            label=f"{preset} block {k}",
                        )
                row = {
                    "preset": preset,
                    "block": k,
                    "g": type(block.net).__name__,
                    "arithmetic": arith,
                    "tol": st.tol,
                    "iterations": st.iterations.tolist(),
                    "evaluations": st.evaluations,
                    "converged": int(st.converged.sum()),
                    "stalled": st.n_stalled,
                    "batch": st.batch_size,
                    "lowest_residual": rec[0]["lowest"].tolist(),
                    "warnings": len(warned),
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(
                    f"floors {preset} block {k} {arith}: its {row['iterations']} stalled {row['stalled']} lowest "
                    f"{max(row['lowest_residual']):.2e}",
                    flush=True,
                )
    return rows


def part_window(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    per_dim = max(1, math.ceil(args.contractions / len(DIMS)))
    for dtype in (torch.float32, torch.float64):
        tol = solvers.default_tolerance(dtype)
        for method in ("picard", "anderson", "newton"):
            longest: list[int] = []
            unconverged = 0
            for n in DIMS:
                batch = Batch(per_dim, args.points, n, seed=1000 + n)
                cap = picard_cap(float(batch.lip.max()), n, tol)
                for form in ("monotone", "residual"):
                    rhs, f, newton_map = batch.maps(dtype, form)
                    with stall_window(10**9), tracked() as rec, counted_warnings() as warned:
                        _, st, _ = solvers.solve(f, rhs, method=method, max_iter=cap, newton_map=newton_map)
                    unconverged += int((~st.converged).sum())
                    longest += rec[0]["longest"][st.converged].tolist()
                    del warned
            worst = max(longest) if longest else 0
            q = sorted(longest)[int(0.999 * (len(longest) - 1))] if longest else 0
            row = {
                "dtype": str(dtype).replace("torch.", ""),
                "method": method,
                "samples": len(longest) + unconverged,
                "unconverged": unconverged,
                "longest_max": worst,
                "longest_p999": q,
                "would_stall": sum(v >= solvers.STALL_WINDOW for v in longest),
            }
            rows.append(row)
            print(f"window {row}", flush=True)
    return rows


def _block_iterations(flow: Any) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"forward": [], "backward": []}
    for block in flow.implicit_blocks():
        for kind in ("forward", "backward"):
            st = getattr(block, f"{kind}_stats", None)
            if st is not None and st.batch_size:
                out[kind].append(int(st.iterations.max()))
    return out


def _train(label: str, model: Any, train: Any, steps: int) -> dict[str, Any]:
    trainer = Trainer(model, train)
    fwd: list[int] = []
    bwd: list[int] = []
    t0 = time.perf_counter()
    with counted_warnings() as warned:
        for _ in range(steps):
            trainer.step()
            its = _block_iterations(trainer.flow)
            fwd += its["forward"]
            bwd += its["backward"]
    row = {
        "run": label,
        "steps": steps,
        "forward_max": max(fwd, default=0),
        "forward_median": statistics.median(fwd) if fwd else 0,
        "backward_max": max(bwd, default=0),
        "backward_median": statistics.median(bwd) if bwd else 0,
        "warnings": len(warned),
        "warning_texts": warned[:5],
        "seconds": time.perf_counter() - t0,
        "final_loss": trainer.history[-1].loss if trainer.history else None,
    }
    print(f"training {row}", flush=True)
    return row


def part_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    digits = load_preset("digits-cpu")
    rows.append(_train("digits-cpu", digits.model_config(), digits.train_config(eval_every=0), args.digits_steps))
    mnist = load_preset("paper-mnist")
    # No MNIST files here: the same model on the built-in digits upsampled is not possible, so train the reduced
    # paper-mnist architecture on 8x8 digits (image shape from the data) at a small batch.
    rows.append(
        _train(
            "paper-mnist architecture (1-1-1, FC 1) on digits",
            reduced_image_model("paper-mnist").replace(image_shape=None),
            mnist.train_config(
                data="digits", data_dir=None, batch_size=args.batch, device="cpu", eval_every=0, warmup_iterations=10
            ),
            args.mnist_steps,
        )
    )
    return rows


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_compaction(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    cases = []
    toy = build_flow(load_preset("paper-toy-monotone").model_config())
    toy.fast_path = False  # the generic path: the one that solves with solvers.solve
    x_toy = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    cases.append(("2-D toy flow, generic path, batch 500 (newton)", lambda: toy(x_toy)))
    digits = load_preset("digits-cpu")
    cfg = digits.model_config()
    torch.manual_seed(0)
    img = build_flow(cfg)
    x_img = smooth_images(cfg.image_shape, 64, seed=2)
    img.train()
    with torch.no_grad():
        img(x_img)
    img.eval()
    cases.append(("digits-cpu flow, batch 64 (anderson)", lambda: img(x_img)))
    # Samples whose iteration counts differ widely: plain iteration on random contractions (L in [0.5, 0.99]).
    batch = Batch(256, 4, 8, seed=7)
    rhs, f, _ = batch.maps(torch.float64, "residual")
    cases.append(
        (
            "random contractions, picard, 1,024 samples of dimension 8 (float64)",
            lambda: solvers.solve(f, rhs, method="picard", max_iter=5000),
        )
    )
    original = solvers.default_fixed_shape
    for label, fn in cases:
        times: dict[bool, list[float]] = {False: [], True: []}
        syncs: dict[bool, int] = {}
        with counted_warnings() as warned, torch.no_grad():
            for fixed in (False, True):
                solvers.default_fixed_shape = lambda device, v=fixed: v  # type: ignore[assignment]
                fn()  # warm-up
                with SyncCounter() as counter:
                    fn()
                syncs[fixed] = counter.count
            for _ in range(args.repeats):
                for fixed in (False, True):
                    solvers.default_fixed_shape = lambda device, v=fixed: v  # type: ignore[assignment]
                    times[fixed].append(_median_time(fn, 1))
        solvers.default_fixed_shape = original
        row = {
            "case": label,
            "compaction_ms": 1000 * statistics.median(times[False]),
            "fixed_shape_ms": 1000 * statistics.median(times[True]),
            "compaction_syncs": syncs[False],
            "fixed_shape_syncs": syncs[True],
            "warnings": len(warned),
        }
        rows.append(row)
        print(f"compaction {row}", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def render(payload: dict[str, Any]) -> list[str]:
    lines = ["# Solves under each arithmetic; stall window; image iteration counts; compaction", ""]
    lines += common.machine_header(payload["machine"], payload["commands"])
    floors = payload.get("floors")
    if floors:
        lines += [
            "## Forward solves of image blocks (TF32 emulated on the CPU)",
            "",
            f"Batch {floors[0]['batch']}, Anderson, cap 1,000; residuals relative (max-norm).",
            "",
        ]
        lines += common.markdown_table(
            [
                "preset",
                "block (G)",
                "arithmetic",
                "tolerance",
                "iterations per sample",
                "stalled",
                "lowest residual (worst sample)",
                "warnings",
            ],
            [
                [
                    r["preset"],
                    f"{r['block']} ({r['g']})",
                    r["arithmetic"],
                    common.fmt_sci(r["tol"]),
                    ", ".join(map(str, r["iterations"])),
                    r["stalled"],
                    common.fmt_sci(max(r["lowest_residual"])),
                    r["warnings"],
                ]
                for r in floors
            ],
        )
        lines.append("")
    window = payload.get("window")
    if window:
        lines += ["## Longest run without a 10% residual decrease (converged samples, stall exit off)", ""]
        lines += common.markdown_table(
            [
                "dtype",
                "solver",
                "samples",
                "unconverged",
                "longest run",
                "99.9th percentile",
                f"would stall (window {payload['stall_window']})",
            ],
            [
                [
                    r["dtype"],
                    r["method"],
                    r["samples"],
                    r["unconverged"],
                    r["longest_max"],
                    r["longest_p999"],
                    r["would_stall"],
                ]
                for r in window
            ],
        )
        lines.append("")
    training = payload.get("training")
    if training:
        lines += ["## Solver iterations per block during training (float32, default settings)", ""]
        lines += common.markdown_table(
            ["run", "steps", "forward median / max", "backward median / max", "solver warnings", "seconds"],
            [
                [
                    r["run"],
                    r["steps"],
                    f"{r['forward_median']} / {r['forward_max']}",
                    f"{r['backward_median']} / {r['backward_max']}",
                    r["warnings"],
                    f"{r['seconds']:.0f}",
                ]
                for r in training
            ],
        )
        lines.append("")
    comp = payload.get("compaction")
    if comp:
        lines += ["## Compaction against fixed shapes on the CPU (median of interleaved repeats)", ""]
        lines += common.markdown_table(
            [
                "case",
                "compaction ms",
                "fixed shape ms",
                "host syncs (compaction)",
                "host syncs (fixed shape)",
                "warnings",
            ],
            [
                [
                    r["case"],
                    f"{r['compaction_ms']:.1f}",
                    f"{r['fixed_shape_ms']:.1f}",
                    r["compaction_syncs"],
                    r["fixed_shape_syncs"],
                    r["warnings"],
                ]
                for r in comp
            ],
        )
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--contractions", type=int, default=500)
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--digits-steps", type=int, default=100)
    parser.add_argument("--mnist-steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "precision_solves"))
    parser.add_argument(
        "--update", action="store_true", help="keep the other parts of an existing OUT.json and rerun only --parts"
    )
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    common.set_threads(args.threads)
    command = common.command_line(None if argv is None else [sys.argv[0], *argv])
    payload: dict[str, Any] = {
        "machine": common.machine_info(),
        "commands": [command],
        "stall_window": solvers.STALL_WINDOW,
        "stall_factor": solvers.STALL_FACTOR,
    }
    previous = Path(args.out).with_suffix(".json")
    if args.update and previous.is_file():
        payload = {
            **json.loads(previous.read_text()),
            "stall_window": solvers.STALL_WINDOW,
            "stall_factor": solvers.STALL_FACTOR,
        }
        payload["commands"] = [*payload.get("commands", []), command]
        payload.setdefault("machines", []).append(common.machine_info())
    for part in parts:
        payload[part] = {
            "floors": part_floors,
            "window": part_window,
            "training": part_training,
            "compaction": part_compaction,
        }[part](args)
        common.write_results(args.out, render(payload), payload)  # after each part: a stopped run keeps its results
    md, _ = common.write_results(args.out, render(payload), payload)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
