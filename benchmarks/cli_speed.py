"""The command line's speed as a user gets it: ``monoflow density`` and ``monoflow sample`` timed from outside.

Each command runs as a new process (``python -m monoflow_core ...``) with a warm kernel cache, and the wall time of
the whole process (interpreter and torch start, checkpoint load, the kernels loaded from the cache, the work, the
file written) is measured around it; the command's own printed time (the work alone) is read from its output. The
source trees given with ``--tree NAME=PATH`` run in turn (alternating, so that a drift of the machine's speed
touches them alike); the first round of each tree is a warm-up that fills its kernel cache and is not reported.
Solver warnings on stderr are counted and reported.

Usage: ``python benchmarks/cli_speed.py [--tree this=.] [--tree main=/path/to/main] [--rounds 3]
[--checkpoint assets/models/8gaussians-monotone.safetensors] [--out PATH]``; writes ``PATH.md`` / ``PATH.json``
(default ``benchmarks/results/cli_speed``) unless ``--out -``.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import RESULTS_DIR, command_line, machine_header, machine_info, markdown_table, write_results

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "density 400x400": ["density", "{ckpt}", "--resolution", "400", "--workers", "2", "--out", "{tmp}/d.npy"],
    "sample 160k": ["sample", "{ckpt}", "--n", "160000", "--workers", "2", "--out", "{tmp}/s.npy"],
}
_OWN_TIME = re.compile(r"(?:took |; )(\d+\.\d+) s\)")
_DTYPE = re.compile(r"float(?:32|64)")


def one_command(tree: Path, argv: list[str], timeout: float) -> dict[str, Any]:
    """Run ``python -m monoflow_core argv`` with ``tree`` first on the path: wall seconds, own seconds, output."""
    env = {k: v for k, v in os.environ.items() if k != "MONOFLOW_KERNELS"}
    env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "monoflow_core", *argv],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    wall = time.perf_counter() - start
    own = _OWN_TIME.findall(done.stdout)
    dtype = _DTYPE.findall(done.stdout)
    return {
        "exit": done.returncode,
        "wall_s": round(wall, 3),
        "own_s": float(own[-1]) if own else None,
        "dtype": dtype[-1] if dtype else "float64 (not stated)",
        "solver_warnings": done.stderr.count("SolverWarning") + done.stderr.count("did not converge"),
        "stdout": done.stdout.strip()[-300:],
        "stderr_tail": done.stderr[-300:] if done.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tree",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="a source tree to time (repeatable; default: this=<this repository>)",
    )
    p.add_argument("--checkpoint", default=str(REPO / "assets" / "models" / "8gaussians-monotone.safetensors"))
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per tree and command (default 3)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per command (default 1800)")
    p.add_argument("--out", default=str(RESULTS_DIR / "cli_speed"), help="results path without suffix, or '-'")
    args = p.parse_args(argv)
    trees = dict(t.split("=", 1) for t in (args.tree or [f"this={REPO}"]))
    info = machine_info()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="monoflow-cli-speed-") as tmp:
        for rnd in range(args.rounds + 1):
            for name, path in trees.items():
                for label, template in COMMANDS.items():
                    cmd = [a.format(ckpt=args.checkpoint, tmp=tmp) for a in template]
                    r = one_command(Path(path).resolve(), cmd, args.timeout)
                    r.update(tree=name, command=label, round=rnd)
                    print(
                        f"round {rnd}{' (warm-up)' if rnd == 0 else ''} {name} {label}: exit {r['exit']}, "
                        f"wall {r['wall_s']:.2f} s, own {r['own_s']} s, {r['dtype']}, "
                        f"{r['solver_warnings']} solver warnings",
                        flush=True,
                    )
                    if rnd:
                        rows.append(r)
    summary = []
    for name in trees:
        for label in COMMANDS:
            got = [r for r in rows if r["tree"] == name and r["command"] == label]
            summary.append(
                [
                    name,
                    label,
                    got[0]["dtype"] if got else "",
                    f"{statistics.median(r['wall_s'] for r in got):.2f}",
                    f"{min(r['wall_s'] for r in got):.2f}-{max(r['wall_s'] for r in got):.2f}",
                    f"{statistics.median(r['own_s'] or 0 for r in got):.2f}",
                    sum(r["solver_warnings"] for r in got),
                    sum(r["exit"] != 0 for r in got),
                ]
            )
    for row in summary:
        print(" | ".join(str(v) for v in row))
    if args.out != "-":
        lines = ["# The command line's speed, process start included", ""]
        lines += machine_header(info, [command_line(argv and [sys.argv[0], *argv])])
        lines += [
            f"Checkpoint `{Path(args.checkpoint).name}`; warm kernel caches; {args.rounds} timed rounds "
            "(after one warm-up round), trees alternating. *wall*: the whole process, measured outside it; "
            "*own*: the time the command prints (the work alone).",
            "",
        ]
        lines += markdown_table(
            [
                "tree",
                "command",
                "dtype",
                "wall s (median)",
                "wall s (range)",
                "own s (median)",
                "solver warnings",
                "failed runs",
            ],
            summary,
        )
        lines.append("")
        write_results(args.out, lines, {"machine": info, "trees": trees, "runs": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
