"""A process that uses the engine exits cleanly, whatever its background kernel compile is doing at exit.

The compiled kernels (``monoflow_core.fused.kernels``) can compile in a background thread (``fused.kernels_ready``
without ``wait``). At finalisation Python ends the daemon threads still running by unwinding their stacks without
running them; one inside PyTorch's autograd engine (the compile's warm-up differentiates the fold) aborted the whole
process with ``terminate called without an active exception`` and exit status 134, after the program had done its work.
The fix cancels the compile and joins its thread before finalisation (``fused.COMPILER.stop_background_compiles``).

These tests start fresh processes, each with an empty Numba cache (``NUMBA_CACHE_DIR``) where the compile matters.
A cold compile takes a minute or more on the 2-core development machine, so the suite runs one process that exits
at the moment that aborted (deterministically, rather than many runs hoping to hit it) and two short
``monoflow train`` runs on the cache the suite already has; ``benchmarks/cold_exit.py`` runs the command line cold
as often as asked (``benchmarks/results/cold_exit.md``).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from monoflow_core.fused import kernels

REPO = Path(__file__).resolve().parents[2]
ABORT = "terminate called"

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")

# Ends the program while the background compile thread is inside torch.autograd.grad (Numba compiling the fold's
# backward kernel, called from the autograd engine). A hook registered before monoflow_core is imported runs after
# monoflow_core's own exit hook (atexit runs hooks last in, first out) and reports what that hook left.
_EXIT_INSIDE_AUTOGRAD = """
import atexit
import sys
import threading

def report():
    from monoflow_core.fused import COMPILER
    alive = [t.name for t in COMPILER.threads if t.is_alive()]
    print("state", COMPILER.state.get((torch.float32, "train")), "alive", alive, flush=True)

atexit.register(report)

import torch
from monoflow_core import fused
from monoflow_core.fused import kernels_fold

inside = threading.Event()
original = kernels_fold.fold_backward

def marked(*args):
    inside.set()
    return original(*args)

kernels_fold.fold_backward = marked
assert not fused.kernels_ready(torch.float32)  # starts the background compile
assert inside.wait(600), "the compile never reached the fold's backward"
print("exiting inside autograd", flush=True)
"""


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MONOFLOW_KERNELS"}
    env.update(changes)
    return env


def test_exit_while_the_background_compile_is_inside_autograd_is_clean(tmp_path):
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_INSIDE_AUTOGRAD],
        cwd=REPO,
        env=_env(NUMBA_CACHE_DIR=str(cache)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ABORT not in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting inside autograd" in done.stdout
    # Cancelled at the next piece rather than compiled to the end (which takes a minute or more cold), and joined.
    assert "state compiling alive []" in done.stdout, done.stdout


@pytest.mark.slow
def test_consecutive_short_train_processes_exit_zero(tmp_path):
    """``monoflow train`` processes of a few iterations in a row: each exits 0 with all its files written."""
    for i in range(2):
        out = tmp_path / f"run{i}"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "monoflow_core",
                "train",
                "--data",
                "8gaussians",
                "--blocks",
                "2",
                "--iterations",
                "10",
                "--batch-size",
                "64",
                "--eval-every",
                "0",
                "--test-size",
                "200",
                "--out",
                str(out),
                "--no-progress",
            ],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert ABORT not in done.stderr, done.stderr[-2000:]
        assert done.returncode == 0, done.stderr[-2000:]
        assert "unavailable" not in done.stderr  # (the compiled kernels served: no failed compile)
        assert (out / "checkpoint.safetensors").is_file() and (out / "metrics.csv").is_file()
