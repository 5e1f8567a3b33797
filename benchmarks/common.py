"""Shared helpers of the reproduction benchmarks (``table1.py``, ``time_to_quality.py``, ``fig4.py``).

Published numbers (Ahn et al., NeurIPS 2022; docs/algorithm.md §9), machine description, thread settings and the
Markdown / JSON writers. Nothing here trains anything: the scripts drive the core's one training loop
(:class:`monoflow_core.training.Trainer`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from monoflow_core.runtime import tune_allocator

# Every benchmark measures the engine as the CLI and the studio run it (glibc malloc settings, monoflow_core.runtime).
tune_allocator()

#: Table 1 of the paper: test NLL in nats (mean of the last 20 tests of 10,000 fresh points; docs/algorithm.md §9.1).
TABLE1: dict[str, dict[str, float]] = {
    "2spirals": {"idensenet": 2.729, "monotone": 2.658},
    "8gaussians": {"idensenet": 2.840, "monotone": 2.840},
    "checkerboard": {"idensenet": 3.609, "monotone": 3.540},
    "circles": {"idensenet": 3.280, "monotone": 3.276},
    "moons": {"idensenet": 2.401, "monotone": 2.400},
    "pinwheel": {"idensenet": 2.343, "monotone": 2.333},
    "rings": {"idensenet": 2.884, "monotone": 2.665},
    "swissroll": {"idensenet": 2.680, "monotone": 2.676},
}

#: Entropy floors in nats: the lowest expected test NLL any model can reach on each generator.
ENTROPY_FLOOR: dict[str, float] = {
    "2spirals": 2.656,
    "8gaussians": 2.835,
    "checkerboard": 3.466,
    "circles": 3.271,
    "moons": 2.393,
    "pinwheel": 2.324,
    "rings": 2.617,
    "swissroll": 2.671,
}

#: Figure 4 of the paper: test MSE on 10,000 points of the 1-D staircase fit (docs/algorithm.md section 9.2).
FIG4: dict[str, tuple[str, float]] = {
    "paper-1d-a": ("(a) residual o residual", 1.6e-2),
    "paper-1d-b": ("(b) R+ residual o R+ residual", 5.8e-3),
    "paper-1d-c": ("(c) R+ inverse-residual o R+ residual", 4.5e-3),
    "paper-1d-d": ("(d) R+ monotone o R+ monotone", 7.6e-5),
}

#: Preset of each Table 1 model.
MODEL_PRESETS: dict[str, str] = {"monotone": "paper-toy-monotone", "idensenet": "paper-toy-idensenet"}

RESULTS_DIR = Path(__file__).resolve().parent / "results"

SHARED_MACHINE_NOTE = (
    "Timings come from a 2-core CPU VM whose speed drifts by up to 1.8x within minutes and which other jobs may "
    "share (the load average above says how busy it was), so wall times and ms/iteration are upper bounds of "
    "what this code does on an idle, steady machine."
)


def set_threads(n: int) -> None:
    """Set torch's intra-op threads (1 was fastest for the paper's tiny matrices, docs/performance.md)."""
    torch.set_num_threads(int(n))


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + (" (+ uncommitted or untracked files)" if dirty else "")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        loadavg = os.getloadavg()
    except OSError:
        loadavg = (math.nan, math.nan, math.nan)
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": [round(v, 2) for v in loadavg],
        "git_revision": _git_revision(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced the results, as typed from the repository root."""
    args = list(sys.argv if argv is None else argv)
    script = Path(args[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *args[1:]])


def machine_header(info: dict[str, Any], commands: Sequence[str]) -> list[str]:
    """Markdown lines: the exact command(s) and the machine."""
    lines = ["Command(s):", "", "```"]
    lines += list(commands)
    lines += [
        "```",
        "",
        f"Machine: processor `{info['processor']}` ({info['machine']}), `nproc` = {info['nproc']}, "
        f"torch {info['torch']}, Python {info['python']}, {info['platform']}; "
        f"load average at start {info['loadavg_at_start']}; code revision {info['git_revision']}; "
        f"run at {info['date_utc']} UTC.",
        "",
        SHARED_MACHINE_NOTE,
        "",
    ]
    return lines


def fmt(value: float | None, digits: int = 4) -> str:
    """A fixed-point number, or '-' for missing values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def fmt_sci(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def write_results(out: str | Path, markdown: Sequence[str], payload: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``OUT.md`` and ``OUT.json`` (``out`` without a suffix); return both paths."""
    base = Path(out)
    if base.suffix in (".md", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = base.with_suffix(".md"), base.with_suffix(".json")
    md.write_text("\n".join(markdown).rstrip() + "\n")
    js.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return md, js


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


class WarningLog:
    """Collects Python warnings raised during a run (solver warnings and the like), de-duplicated with counts."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def __call__(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None):
        key = f"{getattr(category, '__name__', category)}: {message} ({Path(filename).name}:{lineno})"
        if key not in self.counts:
            print(f"  warning: {key}", flush=True)
        self.counts[key] = self.counts.get(key, 0) + 1

    def as_list(self) -> list[dict[str, Any]]:
        return [{"warning": k, "count": v} for k, v in self.counts.items()]


def run_note_bits(r: dict) -> list[str]:
    """What went wrong (or was unusual) in one run: rejected steps, solver failures, warnings, slow steps."""
    bits = []
    if r.get("rejected_steps"):
        bits.append(f"{r['rejected_steps']} rejected (non-finite) steps")
    if r.get("solver_failed_samples"):
        bits.append(f"{r['solver_failed_samples']} samples missed the solver tolerance (summed over steps/blocks)")
    if r.get("warnings"):
        bits.append("warnings: " + "; ".join(f"{k} (x{v})" for k, v in r["warnings"].items()))
    if r.get("training_error"):
        bits.append(f"training stopped: {r['training_error']}")
    slowest, median = r.get("slowest_step_ms"), r.get("ms_per_iteration_median")
    if slowest is not None and median and slowest > 5 * median:
        bits.append(f"slowest step {slowest:.0f} ms (median {median:.1f} ms)")
    return bits


def start_run(args: Any, argv: Sequence[str] | None, rerender: Any) -> tuple[dict[str, Any], list[str]] | None:
    """Common start of a benchmark's ``main``: re-render only (returns None), or set threads, have the engine's
    compiled kernels ready for float32 (compiled or loaded from Numba's cache, so that the first timed steps run on
    them too), and return the machine description and the command line that is recorded with the results."""
    if args.rerender:
        rerender(args)
        return None
    set_threads(args.threads)
    from monoflow_core import fused

    fused.kernels_ready(torch.float32, wait=True)
    return machine_info(), [command_line(None if argv is None else [sys.argv[0], *argv])]
