"""Shared helpers of the reproduction benchmarks (``table1.py``, ``compare_flows.py``, ``time_to_quality.py``, ...).

Published numbers (Ahn et al., NeurIPS 2022; docs/algorithm.md §9), machine description, thread settings, the
Markdown / JSON writers, and the machinery of resumable benchmarks made of one folder per run (``result.json``,
a lock file, several runs at once). Nothing here trains anything: the scripts drive the core's one training loop
(:class:`monoflow_core.training.Trainer`).
"""

from __future__ import annotations

import bisect
import concurrent.futures
import contextlib
import fcntl
import importlib.metadata
import itertools
import json
import math
import multiprocessing
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from monoflow_core.fileio import atomic_write
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


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages (NaN where the system has none), rounded to 0.01."""
    try:
        values = os.getloadavg()
    except OSError:
        values = (math.nan, math.nan, math.nan)
    return [round(v, 2) for v in values]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    loadavg = load_average()
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": _version("numba"),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": loadavg,
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


def warm_data(data: str) -> None:
    """Draw a few points from a toy generator so that its imports happen before a clock starts.

    ``moons`` and ``circles`` come from scikit-learn, whose first import takes seconds on a busy machine; without
    this, the first training step of a run on those sets would pay for it.
    """
    from monoflow_core.data import sample_toy

    sample_toy(data, 2, rng=0)


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


def capture_warnings() -> WarningLog:
    """Route every Python warning of this process (solver warnings included, each occurrence: ``"always"``) into a
    fresh :class:`WarningLog`, which prints each kind once and counts them; nothing is silenced."""
    log = WarningLog()
    warnings.simplefilter("always")
    warnings.showwarning = log
    return log


class StepTimes:
    """Durations of training steps, kept as a histogram with logarithmic bins 0.5% wide.

    A resumable run stores its step times in its checkpoint: a histogram keeps that record bounded (a few hundred
    bins for steps from microseconds to minutes) however many steps a run takes, and gives the median to within a
    quarter of a percent. The count, total and slowest step are kept exactly.
    """

    #: bins per factor e: bin ``k`` holds durations within a factor ``exp(1 / BINS_PER_E)`` of ``exp(k / BINS_PER_E)``
    #: microseconds.
    BINS_PER_E = 200

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        state = state or {}
        self.counts: dict[int, int] = {int(k): int(v) for k, v in state.get("counts", {}).items()}
        self.n = int(state.get("n", 0))
        self.total_seconds = float(state.get("total_seconds", 0.0))
        self.slowest_seconds = float(state.get("slowest_seconds", 0.0))

    def add(self, seconds: float) -> None:
        key = round(self.BINS_PER_E * math.log(max(seconds, 1e-9) * 1e6))
        self.counts[key] = self.counts.get(key, 0) + 1
        self.n += 1
        self.total_seconds += seconds
        self.slowest_seconds = max(self.slowest_seconds, seconds)

    def _value(self, index: int, keys: list[int], cumulative: list[int]) -> float:
        """The centre of the bin holding the ``index``-th smallest duration (0-based), in seconds."""
        key = keys[bisect.bisect_right(cumulative, index)]
        return 1e-6 * math.exp(key / self.BINS_PER_E)

    def median(self) -> float:
        """The median step in seconds (to the histogram's resolution); NaN without steps."""
        if self.n == 0:
            return math.nan
        keys = sorted(self.counts)
        cumulative = list(itertools.accumulate(self.counts[k] for k in keys))
        lo, hi = (self.n - 1) // 2, self.n // 2
        return 0.5 * (self._value(lo, keys, cumulative) + self._value(hi, keys, cumulative))

    def mean(self) -> float:
        return self.total_seconds / self.n if self.n else math.nan

    def to_dict(self) -> dict[str, Any]:
        # (JSON object keys are strings)
        return {
            "counts": {str(k): v for k, v in sorted(self.counts.items())},
            "n": self.n,
            "total_seconds": self.total_seconds,
            "slowest_seconds": self.slowest_seconds,
        }


# ---------------------------------------------------------------------------------------------------------------
# Resumable benchmarks: one folder per run
# ---------------------------------------------------------------------------------------------------------------


def read_result(folder: Path) -> dict[str, Any] | None:
    """A finished run's figures (its ``result.json``), or None while it is unfinished."""
    path = Path(folder) / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(folder: Path, result: dict[str, Any]) -> Path:
    """Write a finished run's ``result.json`` atomically: a run folder holds a whole result or none."""
    return atomic_write(Path(folder) / "result.json", json.dumps(result, indent=1).encode())


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[bool]:
    """Hold the lock of a run folder while the body trains it; yields False (and holds nothing) when another
    process holds it.

    ``flock`` on ``run.lock``: the kernel releases it when a killed process dies, so a lock is never stale.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "run.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def run_jobs(
    fn: Callable[..., Any], calls: Sequence[tuple[Any, ...]], jobs: int, after_each: Callable[[], Any]
) -> None:
    """``fn(*args)`` for every ``args`` in ``calls``, ``jobs`` at a time, calling ``after_each()`` after each one.

    With ``jobs > 1`` each call runs in its own spawned process (a fresh interpreter, nothing shared with this one;
    one core each when every call uses one thread); an exception in a call is raised here.
    """
    if jobs == 1:
        for args in calls:
            fn(*args)
            after_each()
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        for future in concurrent.futures.as_completed(futures):
            future.result()
            after_each()
