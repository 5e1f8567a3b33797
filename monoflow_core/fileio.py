"""Atomic file writes: a crash or an error mid-write never leaves a half-written file or destroys the old one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    A new file gets mode ``rw-r--r--``; a replaced file keeps its mode.

    Raises:
        OSError: the folder is missing or unwritable, or the path is a directory; no temporary file is left
            behind and an existing target is unchanged.
    """
    target = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if target.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(target))
    directory = target.parent
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    if not directory.is_dir():
        raise FileNotFoundError(2, "No such directory", str(directory))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    except OSError as err:  # name the target, not the temporary file, in the message
        raise type(err)(err.errno, err.strerror, str(target)) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort: not every platform can fsync a directory).
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return target
