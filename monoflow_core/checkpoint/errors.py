"""The checkpoint error, and how values read from a file are quoted in its messages.

Every problem with a checkpoint is one :class:`CheckpointError` naming the file and the field. Values quoted from
the file are rendered short (a crafted header may hold megabytes of text or deep nesting), and the type checks
here treat a JSON boolean as no number.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, TypeGuard

# Values quoted in error messages come from the file: keep them short (and never recurse into deep nesting).
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40
_repr.maxlevel = 3


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the problem."""


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {problem}")


def _short(value: Any) -> str:
    """A bounded one-line rendering of a value read from a file, for error messages."""
    return _repr.repr(value)


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """The JSON name of a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
