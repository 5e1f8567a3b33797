"""The one atomic writer: byte payloads and path writers (the studio's image exports) share its naming and cleanup."""

from __future__ import annotations

import os

import pytest

from monoflow_core.fileio import HOST_TAG, atomic_write, atomic_write_with


def test_path_writer_gets_a_temporary_with_the_format_suffix_and_its_stale_leftovers_are_cleaned(tmp_path):
    target = tmp_path / "view.png"
    # A leftover of a killed export of the same file by a process that no longer exists (pid 2**22 + 1 is beyond
    # Linux's pid range, so it cannot run).
    stale = tmp_path / f".view.png.{HOST_TAG}-{2**22 + 1}.abc123.tmp.png"
    stale.write_bytes(b"half")
    seen = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        with open(tmp, "wb") as fh:
            fh.write(b"picture")

    atomic_write_with(target, write, suffix=".png")
    assert seen[0].endswith(".tmp.png"), "Qt picks the image format by the suffix"
    assert target.read_bytes() == b"picture"
    assert not stale.exists()
    assert sorted(os.listdir(tmp_path)) == ["view.png"]


def test_a_failed_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "curves.csv"
    atomic_write(target, "old\n")

    def fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write_with(target, fail)
    assert target.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["curves.csv"]
