"""How the command fails: exit statuses, the user-facing :class:`CLIError` and its one-line report.

User mistakes end with one line ``monoflow: error: ...`` on stderr and exit status 2 (:data:`EXIT_USAGE`); output
that is not finite and exhausted memory end with status 1; Ctrl-C with 130.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

PROG = "monoflow"


EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEBUG_ENV = "MONOFLOW_DEBUG"


class CLIError(Exception):
    """A user-facing error: printed as one ``monoflow: error:`` line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_error(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    return str(err) or type(err).__name__


def _error(message: str, stream: TextIO | None = None) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=stream or sys.stderr)


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` reports exhausted memory: Python's, torch's CPU allocator's or a CUDA device's."""
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(err)
    return "can't allocate memory" in text or "not enough memory" in text
