"""Where the compiled kernels are cached (monoflow_core.kernel_cache): a per-user folder, overridable, that a
read-only install does not prevent."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from monoflow_core import kernel_cache
from monoflow_core.fused import kernels

REPO = Path(__file__).resolve().parents[2]


def test_monoflow_cache_dir_wins_then_numba_cache_dir_then_the_platform_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("MONOFLOW_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba"))
    assert kernel_cache.kernel_cache_dir() == tmp_path / "mine" / "numba"
    monkeypatch.delenv("MONOFLOW_CACHE_DIR")
    assert kernel_cache.kernel_cache_dir() == tmp_path / "numba"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernel_cache.kernel_cache_dir() == tmp_path / "xdg" / "monoflow" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kernel_cache.kernel_cache_dir() == tmp_path / "home" / ".cache" / "monoflow" / "numba"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert kernel_cache.kernel_cache_dir() == tmp_path / "home" / "Library" / "Caches" / "monoflow" / "numba"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert kernel_cache.kernel_cache_dir() == tmp_path / "local" / "monoflow" / "Cache" / "numba"


def test_numba_cache_location_is_set_only_while_decorating(monkeypatch, tmp_path):
    from numba.core import config

    monkeypatch.setenv("MONOFLOW_CACHE_DIR", str(tmp_path))
    before = config.CACHE_DIR
    with kernel_cache.numba_cache_location() as path:
        assert config.CACHE_DIR == str(path) == str(tmp_path / "numba")
    assert before == config.CACHE_DIR  # other Numba code in the process keeps its setting


_WHERE = """
import os
from monoflow_core.fused import blas, kernels, kernels_fold
print(kernels.solve_run._cache._cache_path)
print(kernels_fold.fold_forward._cache._cache_path)
print(blas.gemm._cache._cache_path)
print(os.environ.get("NUMBA_CACHE_DIR"))
"""


@pytest.mark.skipif(not kernels.AVAILABLE, reason="Numba is not installed")
def test_the_kernels_cache_into_the_override_and_leave_numba_s_setting_alone(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["MONOFLOW_CACHE_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", _WHERE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    solve, fold, gemm, numba_env = done.stdout.splitlines()
    assert Path(solve).parent == Path(fold).parent == Path(gemm).parent == tmp_path / "numba"
    assert numba_env == "None"  # (the process's environment is not changed)
