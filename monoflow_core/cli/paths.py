"""Paths the user names: refused when empty, or when they exist but are no regular file."""

from __future__ import annotations

import os
import stat

from .errors import CLIError

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _require_regular_file(flag: str, path: str | os.PathLike[str], what: str) -> None:
    """Refuse a path that exists but is not a regular file, before anything opens it.

    Opening a FIFO blocks until a writer appears (the command would hang for ever), and a device can be endless
    (``/dev/zero``). A missing or unreadable path passes: the reader then reports it in its own words.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise CLIError(f"{flag} {path}: is {kind}, not a regular file; give {what}")


def _nonempty_path(flag: str, text: str) -> str:
    """``text`` unless it is empty or blank: ``Path("")`` means the current folder, which nobody names that way."""
    if not text.strip():
        raise CLIError(f"{flag}: empty path; name a folder or file (use '.' for the current folder)")
    return text
