"""Where the compiled kernels' machine code is kept between processes: a per-user cache folder.

Numba compiles the kernels (:mod:`monoflow_core.fused.kernels`, :mod:`~monoflow_core.fused.kernels_fold`,
:mod:`~monoflow_core.fused.blas`) at their first use and, with ``cache=True``, keeps the machine code on disk, so
that later processes load it in about a second. By default
Numba writes next to the source files (``__pycache__``), which a read-only, system-wide install (a lab image, a
Docker image run as another user, a site-packages owned by root) does not allow: every process would then compile
again. So the kernels are cached in a per-user folder, chosen in this order:

1. ``$MONOFLOW_CACHE_DIR/numba`` when the environment variable ``MONOFLOW_CACHE_DIR`` is set;
2. ``$NUMBA_CACHE_DIR`` when the user set Numba's own variable;
3. the platform's per-user cache folder: ``$XDG_CACHE_HOME/monoflow/numba`` (default ``~/.cache/monoflow/numba``)
   on Linux, ``~/Library/Caches/monoflow/numba`` on macOS, ``%LOCALAPPDATA%\\monoflow\\Cache\\numba`` on Windows.

Numba fixes a function's cache folder when the function is decorated (its cache locator reads
``numba.config.CACHE_DIR`` then), so the kernels' modules decorate inside :func:`numba_cache_location`, which sets
that value for the duration only: other Numba code in the same process keeps its own cache settings, and it works
whether or not Numba was imported before monoflow. If the folder cannot be created or written, Numba falls back
to its own choices (``__pycache__`` if writable, else its user-wide folder) and the kernels still work.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ENV_VAR", "kernel_cache_dir", "numba_cache_location", "user_cache_root"]

#: Environment variable naming monoflow's cache folder (the kernels go into its ``numba`` subfolder).
ENV_VAR = "MONOFLOW_CACHE_DIR"


def user_cache_root() -> Path:
    """Monoflow's per-user cache folder: ``$MONOFLOW_CACHE_DIR`` if set, else the platform's convention."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA", "").strip()
        return (Path(base) if base else home / "AppData" / "Local") / "monoflow" / "Cache"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "monoflow"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".cache") / "monoflow"


def kernel_cache_dir() -> Path:
    """The folder holding the compiled kernels (see the module docstring for the order of the choices)."""
    if not os.environ.get(ENV_VAR, "").strip():
        numba_dir = os.environ.get("NUMBA_CACHE_DIR", "").strip()
        if numba_dir:
            return Path(numba_dir).expanduser()
    return user_cache_root() / "numba"


@contextmanager
def numba_cache_location() -> Iterator[Path]:
    """Point Numba's cache at :func:`kernel_cache_dir` while functions are decorated (and restore it after)."""
    path = kernel_cache_dir()
    try:
        import numba.core.config
    except ImportError:  # pragma: no cover - without Numba there is nothing to cache
        yield path
        return
    config: Any = numba.core.config
    previous = config.CACHE_DIR
    config.CACHE_DIR = str(path)
    try:
        yield path
    finally:
        config.CACHE_DIR = previous
