"""One writer per run folder: an advisory lock that ``monoflow train`` holds on its output folder while it runs.

Two training runs writing into the same folder would interleave their ``metrics.csv`` rows and overwrite each
other's checkpoints, each believing the folder is its own. :class:`RunLock` takes an exclusive ``flock`` on a lock
file in the folder (:data:`LOCK_NAME`, which also records the holder's pid for the refusal message); a second
run asking for the same folder is refused at once instead of waiting.

A lock never goes stale: the kernel releases a ``flock`` when its holder exits for any reason, ``SIGKILL``
included, so a crashed run's leftover lock file is simply locked again by the next run. On release the file is
removed; a process that opened it just before that removal would hold a lock on a file no longer in the folder,
so :meth:`RunLock.acquire` checks after locking that the path still names the file it locked, and retries if not.

File systems without ``flock`` support (some network mounts) and platforms without ``fcntl`` run unlocked:
:attr:`RunLock.locked` is then ``False`` and :attr:`RunLock.warning` says why, for the caller to print.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "lock_holder"]

#: Name of the lock file inside a run folder.
LOCK_NAME = ".monoflow-train.lock"

# flock errors that mean "this file system cannot lock", as opposed to "someone holds the lock".
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_RETRIES = 20


class RunLockedError(RuntimeError):
    """Another live process holds the folder's lock; ``pid`` is its process id when it could be read."""

    def __init__(self, folder: Path, pid: int | None) -> None:
        holder = f"process {pid}" if pid is not None else "another process"
        super().__init__(
            f"{folder}: {holder} is already training into this folder (it holds {folder / LOCK_NAME}); wait for it "
            "to finish, or write to another folder"
        )
        self.folder = folder
        self.pid = pid


def lock_holder(folder: str | os.PathLike[str]) -> int | None:
    """The pid recorded in ``folder``'s lock file, or ``None`` (no file, or no readable pid in it).

    The recorded pid is only informative: a run killed with ``SIGKILL`` leaves its pid behind, and whether the
    lock is held is decided by ``flock`` alone.
    """
    try:
        text = (Path(folder) / LOCK_NAME).read_text().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


class RunLock:
    """An exclusive, non-blocking lock on a run folder, as a context manager.

    Args:
        folder: the run folder; it must exist.

    Example::

        with RunLock(out):
            ...  # the only process writing into ``out``
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.locked = False
        self.warning: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, record this process's pid in the lock file, and return ``self``.

        Raises:
            RunLockedError: another process holds the lock.
            OSError: the lock file cannot be created (a missing or read-only folder).
        """
        if self._fd is not None:
            return self
        if fcntl is None:  # pragma: no cover - Windows
            self.warning = "this platform has no flock: the run folder is not locked against a second run"
            return self
        for _ in range(_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockedError(self.folder, lock_holder(self.folder)) from None
                if err.errno in _UNSUPPORTED:
                    self.warning = (
                        f"{self.folder}: the file system cannot lock files ({err.strerror}); make sure "
                        "no other run writes into this folder"
                    )
                    with contextlib.suppress(OSError):
                        os.unlink(self.path)
                    return self
                raise
            # The previous holder may have removed the file between our open and our flock: then we hold a lock
            # on an unlinked file that a third process cannot see. Lock the file the path names now instead.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            self.locked = True
            return self
        raise RunLockedError(self.folder, lock_holder(self.folder))  # pragma: no cover - a lock storm

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Unlink while still holding the lock, so that no one can lock the file between the two steps and then
        # lose it to the unlink (the inode check in acquire() covers the reverse order).
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(fd)  # closing the last descriptor releases the flock
        self.locked = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
