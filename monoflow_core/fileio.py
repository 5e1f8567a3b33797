"""Atomic file writes: a crash or an error mid-write never leaves a half-written file or destroys the old one.

The bytes go to a temporary file next to the target, named ``.<target name>.<host>-<pid>.<random>.tmp``, which
replaces the target once it is completely on disk. A process killed mid-write (``kill -9``, a power cut) cannot
remove its temporary file, so every write first removes the temporary files of the same target that were left by
processes of this host that no longer run. A temporary file of a live process (a concurrent save of the same file)
is never touched, nor is one written on another host (a shared network folder): its process cannot be checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "atomic_write_with", "remove_stale_temporaries"]

#: Eight hex digits naming this host in temporary file names (a hash: host names may hold dots and dashes).
HOST_TAG = hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]

# What follows ``.<target name>.`` in a temporary file's name: host tag, writer's pid, mkstemp's random part.
# An optional format suffix may follow ``.tmp`` (see :func:`atomic_write_with`).
_TEMP_TAIL = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,12})\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]{1,8})?")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may still run on this host (when in doubt: yes, so its file is kept)."""
    if pid <= 0 or os.name != "posix":
        # pid 0 would address our process group; on Windows os.kill(pid, 0) would terminate the process.
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (OverflowError, ValueError):
        return False  # no process can have such a number
    except OSError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of ``path`` left behind by killed writes; return the files removed.

    Only files named as :func:`atomic_write` names them, written on this host by a process that no longer exists,
    are removed: a concurrent write by a live process keeps its temporary file. A reused pid can make a dead
    writer's file look live; it is then kept until that process ends (harmless, it is removed later).
    Errors (an unreadable folder, a file removed meanwhile) are ignored: cleaning up is best effort.
    """
    target = Path(path)
    prefix = f".{target.name}."
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent if str(target.parent) else "."))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        match = _TEMP_TAIL.fullmatch(entry.name[len(prefix) :])
        if match is None or match["host"] != HOST_TAG:
            continue
        pid = int(match["pid"])
        # Our own pid: another thread of this process may be writing the same target right now.
        if pid == os.getpid() or _pid_alive(pid):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, ``os.replace``).

    A new file gets mode ``rw-r--r--``; a replaced file keeps its mode. Temporary files of ``path`` left by
    killed writes are removed first (:func:`remove_stale_temporaries`).

    Raises:
        OSError: the folder is missing or unwritable, or the path is a directory; no temporary file is left
            behind and an existing target is unchanged.
    """
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(payload)

    return atomic_write_with(path, write)


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[str], None], *, suffix: str = "") -> Path:
    """Have ``write(tmp_path)`` write a temporary file next to ``path``, then move it over ``path`` atomically.

    For writers that want a path rather than bytes (e.g. Qt's image and SVG writers, which choose the format by
    the file's suffix). The temporary file is named like every other (so a killed write's leftover is removed by
    the next write) and ends in ``.tmp`` followed by ``suffix``.

    Args:
        path: the target file.
        write: writes the content to the path it is given; it may raise.
        suffix: what the temporary file's name ends with after ``.tmp`` (e.g. ``".png"``).

    Raises:
        OSError: the folder is missing or unwritable, the path is a directory, or ``write`` failed; no temporary
            file is left behind and an existing target is unchanged.
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(target))
    directory = target.parent
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        mode = 0o644
    if not directory.is_dir():
        raise FileNotFoundError(2, "No such directory", str(directory))
    remove_stale_temporaries(target)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp" + suffix, dir=directory
        )
    except OSError as err:  # name the target, not the temporary file, in the message
        raise type(err)(err.errno, err.strerror, str(target)) from None
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:  # the content is on disk before the rename makes it the target
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
