"""Atomic file writes for the studio's exports: a failed export never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], suffix: str = "") -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it over ``path``.

    Args:
        path: the target file.
        write: writes the content to the given temporary path; it may raise ``OSError`` (or return normally
            after writing).
        suffix: suffix of the temporary file (some writers, e.g. Qt's image writers, choose the format by it).

    Raises:
        OSError: the directory is missing or unwritable, or ``write`` failed; the target is then untouched.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); an export is an ordinary user file.
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    return atomic_write(path, write)
