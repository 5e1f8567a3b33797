"""Atomic file writes for the studio's exports, through the core's one implementation.

A failed export never leaves a half-written file behind, and a killed export's temporary file is removed by the
next write of the same file (:mod:`monoflow_core.fileio`).
"""

from __future__ import annotations

import os
from pathlib import Path

from monoflow_core.fileio import atomic_write, atomic_write_with

__all__ = ["atomic_write_text", "atomic_write_with"]


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, text)
