"""The measurements behind the default solver tolerances (docs/solvers.md): round trips against the tolerance.

Two questions decide the defaults:

1. **How tight must the tolerance be?** The paper's 2-D toy flow (``build_flow(FlowConfig(tol=...))``, 10 monotone
   blocks) at tolerances from 1e-6 to 1e-13 in float64 (and 1e-4, 1e-5 and the floor in float32): the worst
   round-trip errors ``|F(F^-1(z)) - z|`` and ``|F^-1(F(x)) - x|`` and the mean evaluations of G per block of the
   inverse, for freshly initialised flows (5 seeds x 2,000 points) and for one trained flow (``--train-steps``
   steps on checkerboard in float32, the default training, then evaluated on 5,000 points in each dtype). Solver
   errors compound over the blocks (a monotone block may stretch distances by up to ``(1 + L) / (1 - L)``), so
   the round trip is an amplified copy of the tolerance.
2. **Is the floor of 10 machine epsilons reachable?** Every solver at the floor, with a generous cap, on a family
   of random contractions ``G(w) = L tanh(w Q + c)`` (``benchmarks/contractions.py``'s family, with every
   contraction at ``L = 0.99`` in a third of the batches, where rounding hurts most): the largest final residual,
   in machine epsilons, and the samples left above the floor.

``--compare REV`` adds the floor rows of another revision's ``monoflow_core/solvers.py``.

Usage: ``python benchmarks/tolerance_defaults.py [--train-steps 1500] [--compare REV] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

import common
import torch
from contractions import DIMS, Batch, load_revision_solvers

from monoflow_core import FlowConfig, build_flow
from monoflow_core import solvers as current_solvers
from monoflow_core.flow import Flow
from monoflow_core.solvers import SolverWarning, resolve_method
from monoflow_core.training import TrainConfig, Trainer

#: Tolerances tried per dtype (float32's floor is 1.19e-6: below it every setting means the floor).
TOLERANCES = {torch.float64: (1e-6, 1e-8, 1e-10, 1e-11, 1e-12, 1e-13), torch.float32: (1e-4, 1e-5, 1e-12)}


def round_trip(flow: Flow, z: torch.Tensor) -> dict[str, float]:
    """Worst ``z -> x -> z`` and ``x -> z -> x`` errors, the mean inverse evaluations per block, the tolerance used."""
    with torch.no_grad():
        x = flow.inverse(z)
        stats = [b.inverse_stats for b in flow.implicit_blocks() if b.inverse_stats is not None]
        z_back, _ = flow(x)
        x_back = flow.inverse(z_back)
    return {
        "z_error": float((z_back - z).abs().max()),
        "x_error": float((x_back - x).abs().max()),
        "evaluations": sum(float(s.iterations.double().mean()) for s in stats) / len(stats),
        "tol_used": float(stats[0].tol),
    }


def fresh_rows(dtype: torch.dtype, seeds: int, points: int) -> list[dict[str, Any]]:
    rows = []
    for tol in TOLERANCES[dtype]:
        results = []
        for seed in range(seeds):
            torch.manual_seed(seed)
            flow = build_flow(FlowConfig(tol=tol)).to(dtype).eval()
            z = torch.randn(points, 2, dtype=dtype, generator=torch.Generator().manual_seed(seed))
            results.append(round_trip(flow, z))
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "tol": tol,
                "tol_used": results[0]["tol_used"],
                "z_error": max(r["z_error"] for r in results),
                "x_error": max(r["x_error"] for r in results),
                "evaluations": sum(r["evaluations"] for r in results) / len(results),
            }
        )
        print(f"  fresh {rows[-1]}", flush=True)
    return rows


def trained_rows(steps: int, points: int) -> tuple[list[dict[str, Any]], float]:
    trainer = Trainer(FlowConfig(), TrainConfig(data="checkerboard", iterations=steps, eval_every=0, seed=0))
    loss = math.nan
    for _ in range(steps):
        loss = float(trainer.step().loss)
    state = trainer.flow.state_dict()
    rows = []
    for dtype in (torch.float64, torch.float32):
        for tol in TOLERANCES[dtype]:
            flow = build_flow(FlowConfig(tol=tol))
            flow.load_state_dict(state)
            flow = flow.to(dtype).eval()
            z = torch.randn(points, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
            rows.append({"dtype": str(dtype).removeprefix("torch."), "tol": tol, **round_trip(flow, z)})
            print(f"  trained {rows[-1]}", flush=True)
    return rows, loss


def floor_rows(per_dim: int, module: Any, label: str) -> list[dict[str, Any]]:
    rows = []
    for dtype in (torch.float32, torch.float64):
        eps = torch.finfo(dtype).eps
        for method in ("picard", "anderson", "newton"):
            residuals = []
            for n in DIMS:
                for part in range(3):
                    batch = Batch(per_dim, 1, n, seed=1000 * part + n)
                    if part == 2:
                        batch.lip.fill_(0.99)
                    for form in ("monotone", "residual"):
                        rhs, f, newton_map = batch.maps(dtype, form)
                        cap = 6000 if method == "picard" else 300
                        _, stats, _ = module.solve(
                            f,
                            rhs,
                            method=resolve_method(method, n),
                            tol=1e-300,
                            max_iter=cap,
                            newton_map=newton_map,
                            warn=False,
                        )
                        residuals.append(stats.residual.double() / eps)
            r = torch.cat(residuals)
            rows.append(
                {
                    "revision": label,
                    "dtype": str(dtype).removeprefix("torch."),
                    "solver": method,
                    "samples": int(r.numel()),
                    "max_eps": float(r.max()),
                    "p9999_eps": float(r.quantile(0.9999)),
                    "above_floor": int((r > 10.0 * (1 + 1e-6)).sum()),
                }
            )
            print(f"  floor {rows[-1]}", flush=True)
    return rows


def render(payload: dict[str, Any]) -> list[str]:
    args = payload["args"]
    lines = ["# Default solver tolerances: the measurements", ""]
    lines += common.machine_header(payload["machine"], payload["commands"])
    lines += [
        "## Round trips of the default flow (`build_flow(FlowConfig(tol=...))` in float64 and float32)",
        "",
        '"tol used": the tolerance after the floor of 10 machine epsilons (the solver statistics\' `tol`).',
        "",
        f"Freshly initialised: {args['seeds']} seeds x {args['points']:,} points.",
        "",
    ]
    header = [
        "dtype",
        "tol",
        "tol used",
        "max abs z -> x -> z",
        "max abs x -> z -> x",
        "G evaluations per block (inverse, mean)",
    ]

    def table(rows: list[dict[str, Any]]) -> list[str]:
        return common.markdown_table(
            header,
            [
                [
                    r["dtype"],
                    f"{r['tol']:g}",
                    f"{r['tol_used']:.3g}",
                    common.fmt_sci(r["z_error"]),
                    common.fmt_sci(r["x_error"]),
                    f"{r['evaluations']:.2f}",
                ]
                for r in rows
            ],
        )

    lines += table(payload["fresh"])
    if payload["trained"]:
        lines += [
            "",
            f"Trained {args['train_steps']} steps on checkerboard (float32, default training; last loss "
            f"{payload['trained_loss']:.3f} nats), then evaluated on 5,000 points in each dtype.",
            "",
        ]
        lines += table(payload["trained"])
    lines += [
        "",
        "## Reaching the floor of 10 machine epsilons",
        "",
        f"Random contractions, {args['floor_per_dim']} per dimension 1-8, three batches each (the third at L = "
        "0.99), both fixed-point forms; tolerance set below the floor (so the floor applies); cap 6,000 "
        "(picard) or 300 evaluations.",
        "",
    ]
    header = [
        "revision",
        "dtype",
        "solver",
        "samples",
        "largest final residual (eps)",
        "99.99th percentile (eps)",
        "samples above the floor",
    ]
    lines += common.markdown_table(
        header,
        [
            [
                r["revision"],
                r["dtype"],
                r["solver"],
                f"{r['samples']:,}",
                f"{r['max_eps']:.4g}",
                f"{r['p9999_eps']:.4g}",
                r["above_floor"],
            ]
            for r in payload["floor"]
        ],
    )
    lines += ["", f"Wall time: {payload['seconds']:.0f} s."]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--points", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=1500, help="0: skip the trained flow")
    parser.add_argument("--floor-per-dim", type=int, default=1000)
    parser.add_argument("--compare", metavar="REV", help="also run this git revision's solvers in the floor section")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "tolerance_defaults"))
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    info = common.machine_info()
    commands = [common.command_line(None if argv is None else [sys.argv[0], *argv])]
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        fresh = [row for dtype in (torch.float64, torch.float32) for row in fresh_rows(dtype, args.seeds, args.points)]
        trained, loss = trained_rows(args.train_steps, 5000) if args.train_steps > 0 else ([], math.nan)
        floor = floor_rows(args.floor_per_dim, current_solvers, "this checkout")
        if args.compare:
            floor += floor_rows(args.floor_per_dim, load_revision_solvers(args.compare), args.compare)
    payload = {
        "args": vars(args),
        "machine": info,
        "commands": commands,
        "fresh": fresh,
        "trained": trained,
        "trained_loss": loss,
        "floor": floor,
        "seconds": time.perf_counter() - t0,
    }
    md, _ = common.write_results(args.out, render(payload), payload)
    print(md.read_text())


if __name__ == "__main__":
    main()
