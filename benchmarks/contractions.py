"""Every solver on random contractions: unconverged samples per solver name (the goal: none of 10,000 for each).

A random contraction is ``G(w) = L tanh(w Q + c)`` with Q a Haar-random orthogonal matrix (so Lip(G) = L exactly,
in the Euclidean norm), L uniform in [0.5, 0.99], dimension n from 1 to 8 (an equal share each), a bias c ~ N(0,
0.25 I), and right-hand sides ``y ~ N(0, I) * s`` with the scale s log-uniform in [0.1, 10] per point (small scales
are where plain Newton stalled). Each contraction is solved at ``--points`` right-hand sides in each of the two
fixed-point forms of the project's blocks:

* monotone: ``w - G(w) = sqrt(2) y`` (the inverse of MonotoneBlock, ``f(w) = sqrt(2) y + G(w)``);
* residual: ``w + G(w) = y`` (the inverse of ResidualBlock, ``f(w) = y - G(w)``),

for every solver name of ``monoflow_core.solvers.METHODS`` (``"auto"`` resolved as the blocks resolve it), in
float32 and float64 at the default tolerance of the dtype. Every contraction has its own G, so one batched
:func:`~monoflow_core.solvers.solve` per dimension serves them all (the map looks each sample's G up by its index).
The iteration cap is what the contraction mapping theorem grants plain iteration for the largest L of the batch
(plus 10% and 10 for rounding): ``ceil(log(tol / sqrt(n)) / log(L)) + 1``, 2,750-2,850 for L = 0.99 in float64. The
tables also count the samples that needed more than 1,000 evaluations, the default ``max_iter``.

Two cross-checks use the public blocks themselves (one G per block, ``--block-contractions`` of them per solver,
dtype and block type, 256 points each): ``MonotoneBlock(G).inverse`` and ``ResidualBlock(G).inverse`` with a
plain-callable G (the generic path, Jacobians by autograd); and the fused path (``monoflow_core.fused``, the
project's DenseNet G): ``--fused-flows`` one-block flows ``build_flow(FlowConfig(dim=n, blocks=1, lipschitz=L))``
with random weights, forward and inverse of 256 points each, default settings.

``--compare REV`` also runs the solvers of another revision (its ``monoflow_core/solvers.py``, read with ``git
show``) on the same contractions, for a before/after table; its blocks rows use this checkout's blocks with that
revision's ``solve``.

Usage: ``python benchmarks/contractions.py [--contractions 10000] [--points 4] [--compare REV] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import common
import torch
from torch import Tensor

import monoflow_core.blocks as blocks_module
from monoflow_core import FlowConfig, MonotoneBlock, ResidualBlock, build_flow, fused
from monoflow_core import solvers as current_solvers
from monoflow_core.solvers import METHODS, SolverWarning, default_tolerance, resolve_method

DTYPES = (torch.float32, torch.float64)
DIMS = tuple(range(1, 9))
FORMS = {"monotone": (math.sqrt(2.0), 1.0), "residual": (1.0, -1.0)}  # (rhs factor, sign of G in f)
DEFAULT_MAX_ITER = 1000
ROOT = Path(__file__).resolve().parent.parent


def picard_cap(lip: float, n: int, tol: float) -> int:
    """Evaluations within which plain iteration meets ``tol``: the first residual is ``|G(w0)|_2 <= L sqrt(n)``, each
    plain step shrinks the Euclidean residual by L, and the max-norm is below it. Plus 10% and 10 for rounding."""
    exact = math.ceil(math.log(tol / math.sqrt(n)) / math.log(lip)) + 1
    return int(1.1 * exact) + 10


def orthogonal(n: int, g: torch.Generator, batch: int) -> Tensor:
    """Haar-random orthogonal (batch, n, n) matrices in float64 (QR with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)


def scaled_points(m: int, n: int, g: torch.Generator) -> Tensor:
    scale = 10.0 ** (2.0 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 1.0)
    return torch.randn(m, n, generator=g, dtype=torch.float64) * scale


class Batch:
    """``count`` contractions of dimension ``n``, each at ``points`` right-hand sides, as per-sample maps."""

    def __init__(self, count: int, points: int, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.q = orthogonal(n, g, count).repeat_interleave(points, dim=0)
        self.lip = (0.5 + 0.49 * torch.rand(count, generator=g, dtype=torch.float64)).repeat_interleave(points)
        self.c = (0.5 * torch.randn(count, n, generator=g, dtype=torch.float64)).repeat_interleave(points, dim=0)
        self.y = scaled_points(count * points, n, g)

    def maps(self, dtype: torch.dtype, form: str) -> tuple[Tensor, Callable[..., Tensor], Callable[..., Any]]:
        """``(rhs, f, newton_map)`` of one fixed-point form in ``dtype``."""
        factor, sign = FORMS[form]
        q, lip, c = self.q.to(dtype), self.lip.to(dtype), self.c.to(dtype)
        rhs = (factor * self.y).to(dtype)
        eye = torch.eye(self.n, dtype=dtype)

        def g_of(w: Tensor, idx: Tensor) -> Tensor:
            return torch.tanh(torch.bmm(w.unsqueeze(1), q[idx]).squeeze(1) + c[idx])

        def f(w: Tensor, idx: Tensor) -> Tensor:
            return rhs[idx] + sign * lip[idx, None] * g_of(w, idx)

        def newton_map(w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
            t = g_of(w, idx)
            jac_g = (lip[idx, None] * (1 - t * t)).unsqueeze(-1) * q[idx].transpose(1, 2)
            return rhs[idx] + sign * lip[idx, None] * t, eye - sign * jac_g

        return rhs, f, newton_map


def load_revision_solvers(rev: str) -> ModuleType:
    """``monoflow_core/solvers.py`` as it was at ``rev``, imported as a stand-alone module."""
    text = subprocess.run(
        ["git", "show", f"{rev}:monoflow_core/solvers.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"solvers_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"solvers_{rev}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def direct_rows(module: ModuleType, label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The solvers directly: one row per dtype and solver name, both forms."""
    per_dim = math.ceil(args.contractions / len(DIMS))
    rows = []
    for dtype in DTYPES:
        tol = default_tolerance(dtype)
        for name in METHODS:
            row: dict[str, Any] = {
                "revision": label,
                "dtype": str(dtype).removeprefix("torch."),
                "solver": name,
                "contractions": per_dim * len(DIMS),
                "tol": tol,
            }
            its: list[Tensor] = []
            t0 = time.perf_counter()
            for form in FORMS:
                failed = 0
                for n in DIMS:
                    batch = Batch(per_dim, args.points, n, seed=args.seed + 97 * n)
                    rhs, f, newton_map = batch.maps(dtype, form)
                    cap = picard_cap(float(batch.lip.max()), n, tol)
                    _, stats, _ = module.solve(
                        f, rhs, method=resolve_method(name, n), tol=tol, max_iter=cap, newton_map=newton_map, warn=False
                    )
                    failed += stats.n_failed
                    its.append(torch.where(stats.converged, stats.iterations, cap + 1))
                row[f"unconverged_{form}"] = failed
            it = torch.cat(its).double()
            row.update(
                samples=int(it.numel()),
                evaluations_mean=float(it.mean()),
                evaluations_max=int(it.max()),
                over_default_cap=int((it > DEFAULT_MAX_ITER).sum()),
                seconds=time.perf_counter() - t0,
            )
            print(
                f"  {label} solve {row['dtype']} {name}: unconverged {row['unconverged_monotone']} + "
                f"{row['unconverged_residual']} of {row['samples']} samples; evaluations mean "
                f"{row['evaluations_mean']:.1f}, max {row['evaluations_max']}",
                flush=True,
            )
            rows.append(row)
    return rows


def tanh_g(lip: float, q: Tensor, c: Tensor) -> Callable[[Tensor], Tensor]:
    """One user-supplied G = L tanh(w Q + c), a plain callable (the blocks' generic path)."""
    return lambda w: lip * torch.tanh(w @ q + c)


def block_rows(solve: Callable[..., Any], label: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """MonotoneBlock / ResidualBlock inverses, one G per block."""
    rows = []
    original = blocks_module.solve
    blocks_module.solve = solve
    try:
        for dtype in DTYPES:
            tol = default_tolerance(dtype)
            for block_type in (MonotoneBlock, ResidualBlock):
                for name in METHODS:
                    g = torch.Generator().manual_seed(args.seed + 1)
                    failed = samples = worst = 0
                    for k in range(args.block_contractions):
                        n = DIMS[k % len(DIMS)]
                        lip = float(0.5 + 0.49 * torch.rand((), generator=g, dtype=torch.float64))
                        q = orthogonal(n, g, 1)[0].to(dtype)
                        c = (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
                        y = scaled_points(256, n, g).to(dtype)
                        block = block_type(tanh_g(lip, q, c), solver=name, max_iter=picard_cap(lip, n, tol))
                        with torch.no_grad():
                            block.inverse(y)
                        stats = block.inverse_stats
                        assert stats is not None
                        failed += stats.n_failed
                        samples += stats.batch_size
                        worst = max(worst, int(stats.iterations.max()))
                    rows.append(
                        {
                            "revision": label,
                            "dtype": str(dtype).removeprefix("torch."),
                            "block": block_type.__name__,
                            "solver": name,
                            "contractions": args.block_contractions,
                            "samples": samples,
                            "unconverged": failed,
                            "evaluations_max": worst,
                        }
                    )
                    print(
                        f"  {label} {block_type.__name__}.inverse {rows[-1]['dtype']} {name}: unconverged {failed} "
                        f"of {samples}",
                        flush=True,
                    )
    finally:
        blocks_module.solve = original
    return rows


def fused_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The fused path with default settings on one-block flows of the project's DenseNet G."""
    rows = []
    for dtype in DTYPES:
        fused.kernels_ready(dtype, wait=True)
        g = torch.Generator().manual_seed(args.seed + 2)
        failed = {"forward": 0, "inverse": 0}
        samples = worst = 0
        for k in range(args.fused_flows):
            n = DIMS[k % len(DIMS)]
            lip = float(0.5 + 0.49 * torch.rand((), generator=g, dtype=torch.float64))
            torch.manual_seed(args.seed + k)
            flow = build_flow(FlowConfig(dim=n, blocks=1, lipschitz=lip)).to(dtype).eval()
            x = scaled_points(256, n, g).to(dtype)
            with torch.no_grad():
                flow(x)
                flow.inverse(x)
            block = flow.implicit_blocks()[0]
            for key, stats in (("forward", block.forward_stats), ("inverse", block.inverse_stats)):
                assert stats is not None
                failed[key] += stats.n_failed
                worst = max(worst, int(stats.iterations.max()))
            samples += x.shape[0]
        rows.append(
            {
                "dtype": str(dtype).removeprefix("torch."),
                "flows": args.fused_flows,
                "samples": samples,
                "unconverged_forward": failed["forward"],
                "unconverged_inverse": failed["inverse"],
                "evaluations_max": worst,
                "tol": default_tolerance(dtype),
            }
        )
        print(f"  fused {rows[-1]['dtype']}: unconverged {failed} of {samples} (each way)", flush=True)
    return rows


def render(payload: dict[str, Any]) -> list[str]:
    args = payload["args"]
    lines = ["# Solvers on random contractions", ""]
    lines += common.machine_header(payload["machine"], payload["commands"])
    lines += [
        f"Family: `G(w) = L tanh(w Q + c)`, Q Haar-orthogonal, L ~ U[0.5, 0.99], n = 1..8 (equal shares), c ~ N(0, "
        f"0.25 I), right-hand sides N(0, I) times a log-uniform scale in [0.1, 10]; {args['points']} right-hand sides "
        "per contraction and form; tolerance: the dtype's default (1.19e-6 in float32, 1e-12 in float64); cap: the "
        "plain-iteration bound for the batch's largest L plus 10% and 10 (at L = 0.99: 1,500-1,620 evaluations in "
        "float32, 3,040-3,150 in float64, from n = 1 to 8). "
        '"evaluations": evaluations of G per sample, an unconverged sample counted as the cap + 1; "> 1000": '
        "samples that needed more than the default `max_iter` of 1,000 evaluations (or did not converge).",
        "",
        "## The solvers directly (`monoflow_core.solvers.solve`)",
        "",
    ]
    header = [
        "revision",
        "dtype",
        "solver",
        "contractions",
        "samples",
        "unconverged (monotone form)",
        "unconverged (residual form)",
        "evaluations mean",
        "evaluations max",
        "> 1000",
    ]
    lines += common.markdown_table(
        header,
        [
            [
                r["revision"],
                r["dtype"],
                r["solver"],
                f"{r['contractions']:,}",
                f"{r['samples']:,}",
                r["unconverged_monotone"],
                r["unconverged_residual"],
                f"{r['evaluations_mean']:.1f}",
                r["evaluations_max"],
                r["over_default_cap"],
            ]
            for r in payload["direct"]
        ],
    )
    lines += ["", "## Through the blocks (`MonotoneBlock(G).inverse`, `ResidualBlock(G).inverse`; generic path)", ""]
    header = ["revision", "dtype", "block", "solver", "contractions", "samples", "unconverged", "evaluations max"]
    lines += common.markdown_table(
        header,
        [
            [
                r["revision"],
                r["dtype"],
                r["block"],
                r["solver"],
                r["contractions"],
                f"{r['samples']:,}",
                r["unconverged"],
                r["evaluations_max"],
            ]
            for r in payload["blocks"]
        ],
    )
    if payload["fused"]:
        lines += ["", "## The fused path (one-block flows of the project's DenseNet G, default settings)", ""]
        header = ["dtype", "flows", "samples", "unconverged (forward)", "unconverged (inverse)", "evaluations max"]
        lines += common.markdown_table(
            header,
            [
                [
                    r["dtype"],
                    r["flows"],
                    f"{r['samples']:,}",
                    r["unconverged_forward"],
                    r["unconverged_inverse"],
                    r["evaluations_max"],
                ]
                for r in payload["fused"]
            ],
        )
    lines += ["", f"Wall time: {payload['seconds']:.0f} s."]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contractions", type=int, default=10_000, help="random contractions per solver and dtype")
    parser.add_argument("--points", type=int, default=4, help="right-hand sides per contraction and form")
    parser.add_argument(
        "--block-contractions",
        type=int,
        default=48,
        help="contractions (one block each, 256 points) per solver, dtype and block type",
    )
    parser.add_argument("--fused-flows", type=int, default=200, help="one-block DenseNet flows per dtype (0: skip)")
    parser.add_argument("--compare", metavar="REV", help="also run this git revision's monoflow_core/solvers.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "contractions"))
    parser.add_argument("--rerender", action="store_true", help="rewrite OUT.md from OUT.json (no run)")
    args = parser.parse_args(argv)
    if args.rerender:
        payload = json.loads(Path(args.out).with_suffix(".json").read_text())
        md, _ = common.write_results(args.out, render(payload), payload)
        print(md.read_text())
        return
    common.set_threads(args.threads)
    info = common.machine_info()
    commands = [common.command_line(None if argv is None else [sys.argv[0], *argv])]
    t0 = time.perf_counter()
    runs: list[tuple[str, ModuleType]] = [("this checkout", current_solvers)]
    if args.compare:
        runs.append((args.compare, load_revision_solvers(args.compare)))
    direct: list[dict[str, Any]] = []
    by_block: list[dict[str, Any]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SolverWarning)
        for label, module in runs:
            direct += direct_rows(module, label, args)
        for label, module in runs:
            by_block += block_rows(module.solve, label, args)
        fused = fused_rows(args) if args.fused_flows > 0 else []
    payload = {
        "args": vars(args),
        "machine": info,
        "commands": commands,
        "direct": direct,
        "blocks": by_block,
        "fused": fused,
        "seconds": time.perf_counter() - t0,
    }
    md, _ = common.write_results(args.out, render(payload), payload)
    print(md.read_text())


if __name__ == "__main__":
    main()
