"""The run-folder lock: one writer per folder, and no stale locks after a crash (SIGKILL)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import monoflow_core.runlock as runlock_module
from monoflow_core.runlock import LOCK_NAME, RunLock, RunLockedError, lock_holder

# The child process loads runlock.py on its own (it imports nothing from the package), so it starts in a fraction
# of a second instead of importing torch.
_HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runlock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lock = module.RunLock(sys.argv[2]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def _start_holder(folder: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, runlock_module.__file__, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "locked"
    return child


def test_one_holder_at_a_time_in_one_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert first.locked and lock_holder(tmp_path) == os.getpid()
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path).acquire()
    assert info.value.pid == os.getpid() and str(os.getpid()) in str(info.value)
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()  # no litter in the run folder
    with RunLock(tmp_path) as again:
        assert again.locked
    first.release()  # idempotent


def test_a_live_holder_refuses_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    child = _start_holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        assert info.value.pid == child.pid
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    # The killed holder could not clean up: its file and pid remain, but the kernel released its flock.
    assert (tmp_path / LOCK_NAME).exists() and lock_holder(tmp_path) == child.pid
    with RunLock(tmp_path) as lock:
        assert lock.locked and lock_holder(tmp_path) == os.getpid()


def test_a_lock_file_removed_under_a_waiting_opener_is_not_trusted(tmp_path, monkeypatch):
    # Simulate the race: between our open() and flock(), the previous holder releases and removes the file, so
    # the descriptor we locked no longer names the folder's lock file. acquire() must notice and lock anew.
    real_open = os.open
    calls = {"n": 0}

    def racing_open(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        calls["n"] += 1
        if calls["n"] == 1:
            os.unlink(path)  # the old holder's release
        return fd

    monkeypatch.setattr(runlock_module.os, "open", racing_open)
    lock = RunLock(tmp_path).acquire()
    assert calls["n"] == 2  # retried on the file the path names now
    assert os.path.samestat(os.fstat(lock._fd), os.stat(tmp_path / LOCK_NAME))
    lock.release()


def test_missing_folder_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        RunLock(tmp_path / "missing").acquire()
