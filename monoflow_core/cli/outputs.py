"""The files ``sample`` and ``density`` write: checked paths, a streamed ``.npy`` writer, progress bars.

Large outputs are written a piece at a time (:class:`_NpyWriter`, bounded memory; only the disk limits them), into
a temporary file renamed into place only when every piece was written; output that is not finite is refused
(exit status 1), never written. Pictures state the dtype that computed them.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .. import __version__, evaluation
from ..fileio import HOST_TAG, remove_stale_temporaries
from ..flow import Flow
from .errors import EXIT_FAILURE, PROG, CLIError
from .report import _dtype_name


def _check_output_path(path: Path, suffixes: Sequence[str], what: str) -> str:
    """The lower-case suffix of ``path`` if allowed, and its folder exists; else a clear error (before work)."""
    if path.is_dir():
        raise CLIError(f"--out {path}: is a directory; give a file name ending in {' or '.join(suffixes)}")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise CLIError(
            f"--out {path}: unsupported file type {path.suffix or '(none)'!r} for {what}; "
            f"use one of {', '.join(suffixes)}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"--out {path}: cannot write there, folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"--out {path}: cannot write there, folder {parent} is not writable")
    return suffix


class _NpyWriter:
    """A ``.npy`` file written piece by piece, for arrays too large to hold: the header first, then the rows.

    The bytes go to a temporary file next to the target, renamed over it by :meth:`commit`, so an interrupted or
    failed write (a full disk, non-finite samples, Ctrl-C) leaves no partial file and keeps an older one. Plain
    sequential writes rather than a memory map: a disk that fills up is then an ``OSError`` (ENOSPC), not a
    ``SIGBUS`` that kills the process. The file's bytes equal ``np.save`` of the whole array.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.size = math.prod(int(s) for s in shape)
        self.written = 0
        # Named as atomic_write names its temporary files, so that a write killed with SIGKILL (which no cleanup
        # survives) leaves a file the next write of the same target removes.
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)}
        try:
            try:
                np.lib.format.write_array_header_1_0(self._fh, header)
            except ValueError:  # a header over 64 KiB needs format 2.0 (what np.save falls back to as well)
                np.lib.format.write_array_header_2_0(self._fh, header)
        except BaseException:
            self.abort()
            raise

    def write(self, values: np.ndarray) -> None:
        """Append ``values``' elements in C order, converted to the file's dtype (rows, or any run of elements)."""
        block = np.ascontiguousarray(values, dtype=self.dtype)
        if self.written + block.size > self.size:
            raise AssertionError(f"npy writer: {self.written + block.size} elements for a file of {self.size}")
        self._fh.write(block.data)  # the array's own buffer: no copy of a piece that may be hundreds of MB
        self.written += block.size

    def commit(self) -> None:
        """Flush, fsync and rename the file into place (every element must have been written)."""
        if self.written != self.size:
            raise AssertionError(f"npy writer: {self.written} of {self.size} elements written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


@contextlib.contextmanager
def _streaming(writer: _NpyWriter | None, bar: Any) -> Iterator[None]:
    """The body streams pieces into ``writer`` (if any): commit the file when it finishes, abort it (no partial
    file is left) when it raises or is interrupted, and close the progress bar either way."""
    try:
        yield
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()


def _progress(total: int, unit: str, desc: str, piece: int | None = None) -> Any:
    """A progress bar on stderr for work of more than one piece (default size: ``evaluation.PIECE_POINTS``); a
    single piece is done at once, and a bar would only add lines to the output."""
    from tqdm import tqdm

    piece = evaluation.PIECE_POINTS if piece is None else piece
    return tqdm(
        total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, unit_scale=True, disable=total <= piece
    )


def _refuse_non_finite(values: np.ndarray, done: int, what: str, cause: str) -> None:
    """Stop with exit status 1 if ``values`` hold a NaN or an infinity: never report success for such output."""
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise CLIError(
            f"{bad:,} of the first {done + values.shape[0]:,} {what} are not finite (NaN or infinite: {cause}); "
            "nothing was written",
            code=EXIT_FAILURE,
        )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return torch.empty(0, dtype=dtype).numpy().dtype


def _picture_dtype(args: argparse.Namespace, flow: Flow) -> torch.dtype:
    """The dtype of samples and density grids: ``--dtype``, by default the flow's training dtype (float32 unless
    the run trained in float64). A picture or a sample set does not need float64's last digits; a reported
    likelihood does, and ``eval`` keeps float64 (:meth:`~monoflow_core.training.Trainer.evaluation_dtype`)."""
    return cast(torch.dtype, args.dtype) if args.dtype is not None else flow.dtype


def _png_text(dtype: torch.dtype) -> dict[str, str]:
    """The ``tEXt`` metadata of the command's pictures: the program and the dtype that computed the picture."""
    return {"Software": f"{PROG} {__version__}", "monoflow:dtype": _dtype_name(dtype)}
