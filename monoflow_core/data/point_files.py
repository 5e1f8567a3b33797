"""Reading a user's 2-D points from a CSV, NPY or NPZ file: the columns a file holds and the two chosen.

Three formats, each read without running code from the file:

* **CSV** (any text file): fields separated by commas, semicolons, tabs or runs of spaces (found from the first data
  line); lines that are empty or start with ``#`` are skipped. The first line is a header when none of its fields is
  a number; the columns are then named by it, else ``"0"``, ``"1"``, ... Only the two chosen columns must hold
  numbers, so a label column of text is fine.
* **NPY**: one numeric array of shape ``(n, k)``, ``k >= 2``, read with ``allow_pickle=False``; columns ``"0"``,
  ``"1"``, ...
* **NPZ**: its numeric 1-D arrays are columns named by their keys, and the columns of a 2-D array ``a`` are named
  ``a[0]``, ``a[1]``, ...

Columns are chosen by name or by position in that list (an int, or a string of digits that names no column): a file
of exactly two columns needs no choice; with more, the choice is required and a missing or ambiguous one is an error
that lists the columns the file has. Rows holding a non-finite value (NaN, infinity) are refused, naming the file and
the first such row: a silent drop would change the data behind the user's back.

Bounds (:data:`MAX_FILE_BYTES`, :data:`MAX_POINTS`) are checked before anything is read or decompressed: an NPY or
NPZ member's declared shape is read from its header first, so a tiny compressed archive cannot expand into gigabytes.
Every problem raises one :class:`PointDataError` (a ``ValueError``) whose message names the file.
"""

from __future__ import annotations

import operator
import os
import re
import stat
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_POINTS",
    "POINT_SUFFIXES",
    "ColumnChoice",
    "PointDataError",
    "PointTable",
    "looks_like_point_file",
    "parse_columns",
    "read_point_table",
]

#: File suffixes read as point files.
POINT_SUFFIXES = (".csv", ".txt", ".tsv", ".npy", ".npz")

#: Largest point file read (bytes on disk); a CSV of two million points takes about 50 MB.
MAX_FILE_BYTES = 256 * 1024 * 1024

#: Most points (rows) a file may hold: two million 2-D points are 32 MB in float64, and a training run keeps them.
MAX_POINTS = 2_000_000

#: Most columns a file may hold (a wider table is not a table of 2-D points).
MAX_COLUMNS = 10_000

#: A column chosen by its name or by its position.
ColumnChoice = str | int

_INDEX = re.compile(r"[0-9]{1,6}")


class PointDataError(ValueError):
    """A point file cannot be used; the message names the file and what is wrong with it."""


@dataclass
class PointTable:
    """The columns of a point file, before two of them are chosen.

    Attributes:
        path: the file.
        names: the columns' names, in file order (a string of digits that names no column is a position).
    """

    path: Path
    names: list[str]
    #: ``column(i)`` -> (the column as float64, ``label(row)`` naming a row in messages); reads on demand.
    _column: Any

    def describe_columns(self) -> str:
        """``"x, y, label"``: the names, shortened when there are many."""
        shown = self.names if len(self.names) <= 12 else [*self.names[:10], "...", self.names[-1]]
        return ", ".join(shown)

    def resolve(self, columns: Sequence[ColumnChoice] | None) -> tuple[int, int]:
        """The positions of the two chosen columns.

        Raises:
            PointDataError: fewer than two columns, no choice where one is needed, or a choice that names no column,
                names one twice or is ambiguous; the message lists the columns there are.
        """
        where = str(self.path)
        names = self.names
        if len(names) < 2:
            raise PointDataError(
                f"{where}: has only {len(names)} column ({self.describe_columns()}); 2-D points need two"
            )
        if columns is None:
            if len(names) == 2:
                return 0, 1
            example = ",".join(names[:2])
            raise PointDataError(
                f"{where}: has {len(names)} columns ({self.describe_columns()}); choose two of them "
                f"(e.g. columns {example})"
            )
        if isinstance(columns, str) or len(columns) != 2:
            raise PointDataError(
                f"{where}: choose exactly two columns, got {columns!r}; the file has {self.describe_columns()}"
            )
        picked = (self._position(columns[0]), self._position(columns[1]))
        if picked[0] == picked[1]:
            raise PointDataError(
                f"{where}: the two chosen columns are the same ({names[picked[0]]!r}); choose two "
                f"different ones of {self.describe_columns()}"
            )
        return picked

    def _position(self, choice: ColumnChoice) -> int:
        names = self.names
        if isinstance(choice, bool) or not isinstance(choice, int | str):
            raise PointDataError(f"{self.path}: a column is chosen by name or position, got {choice!r}")
        if isinstance(choice, str):
            text = choice.strip()
            hits = [i for i, name in enumerate(names) if name == text]
            if len(hits) > 1:
                raise PointDataError(
                    f"{self.path}: column name {text!r} is ambiguous (columns "
                    f"{', '.join(str(i) for i in hits)} share it); choose by position"
                )
            if hits:
                return hits[0]
            if not _INDEX.fullmatch(text):
                raise PointDataError(f"{self.path}: no column named {text!r}; the file has {self.describe_columns()}")
            choice = int(text)
        if not 0 <= choice < len(names):
            raise PointDataError(
                f"{self.path}: no column {choice} (positions 0 to {len(names) - 1}: {self.describe_columns()})"
            )
        return choice

    def read(self, columns: Sequence[ColumnChoice] | None) -> tuple[np.ndarray, tuple[str, str]]:
        """The two chosen columns as a float64 array ``(n, 2)`` of finite values, and their names.

        Raises:
            PointDataError: a bad choice (:meth:`resolve`), text where a number belongs, a non-finite value (the
                message names the row), columns of different lengths, or no rows.
        """
        i, j = self.resolve(columns)
        first, rows_a = self._column(i)
        second, _ = self._column(j)
        name_a, name_b = self.names[i], self.names[j]
        if first.shape[0] != second.shape[0]:
            raise PointDataError(
                f"{self.path}: columns {name_a!r} and {name_b!r} have different lengths "
                f"({first.shape[0]} and {second.shape[0]})"
            )
        if first.shape[0] == 0:
            raise PointDataError(f"{self.path}: holds no points (no data rows)")
        points = np.stack([first, second], axis=1)
        bad = ~np.isfinite(points)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            col = name_a if bad[row, 0] else name_b
            count = int(bad.any(axis=1).sum())
            label = rows_a(row)
            raise PointDataError(
                f"{self.path}: {label}, column {col!r}: {float(points[row, 0 if bad[row, 0] else 1])} is not a "
                f"finite number ({count:,} row{'s' if count > 1 else ''} in all); non-finite rows are refused, not "
                "dropped: remove or fix them"
            )
        return points, (name_a, name_b)


def looks_like_point_file(text: str) -> bool:
    """Whether a ``--data`` value names a point file (by its suffix, or as an existing file) rather than a data set."""
    return Path(text).suffix.lower() in POINT_SUFFIXES or os.path.sep in text or Path(text).is_file()


def parse_columns(text: str | None) -> tuple[str, str] | None:
    """``"x,y"`` -> ``("x", "y")`` (a command-line column choice); ``None`` stays ``None``.

    Raises:
        PointDataError: not exactly two comma-separated non-empty names.
    """
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 2 or not all(parts):
        raise PointDataError(
            f"columns: give two column names or positions separated by a comma (e.g. x,y or 0,1), got {text!r}"
        )
    return parts[0], parts[1]


# ----------------------------------------------------------------------------------------------------------
# opening a file
# ----------------------------------------------------------------------------------------------------------


def _check_file(path: Path) -> int:
    """Size in bytes of a regular, readable point file within :data:`MAX_FILE_BYTES`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise PointDataError(f"{path}: no such file") from None
    except OSError as err:
        raise PointDataError(f"{path}: cannot read it ({err.strerror or err})") from None
    if stat.S_ISDIR(info.st_mode):
        raise PointDataError(f"{path}: is a directory; give a .csv, .npy or .npz file of 2-D points")
    if not stat.S_ISREG(info.st_mode):
        raise PointDataError(f"{path}: not a regular file (a FIFO, device or socket cannot hold points)")
    if info.st_size > MAX_FILE_BYTES:
        raise PointDataError(
            f"{path}: is {info.st_size / 2**20:,.0f} MB; point files are limited to "
            f"{MAX_FILE_BYTES // 2**20} MB ({MAX_POINTS:,} points)"
        )
    if info.st_size == 0:
        raise PointDataError(f"{path}: is empty (0 bytes); it holds no points")
    return int(info.st_size)


def read_point_table(path: str | os.PathLike[str]) -> PointTable:
    """Open a point file and list its columns (nothing is chosen yet).

    Raises:
        PointDataError: a missing, empty, oversized or malformed file; the message names it.
    """
    path = Path(path)
    _check_file(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return _npy_table(path)
        if suffix == ".npz":
            return _npz_table(path)
        return _csv_table(path)
    except PointDataError:
        raise
    except (OSError, MemoryError) as err:
        raise PointDataError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None


# ----------------------------------------------------------------------------------------------------------
# CSV
# ----------------------------------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _splitter(line: str) -> Any:
    # Fields keep their surrounding spaces: both numpy's and Python's float parsers ignore them.
    for sep in (",", ";", "\t"):
        if sep in line:
            return operator.methodcaller("split", sep)
    return operator.methodcaller("split")


def _csv_table(path: Path) -> PointTable:
    raw = path.read_bytes()
    if b"\x00" in raw[:4096]:
        raise PointDataError(f"{path}: is a binary file, not CSV text (use .npy or .npz for arrays)")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PointDataError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    del raw
    lines = [
        (n, line)
        for n, line in enumerate(text.splitlines(), start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    del text
    if not lines:
        raise PointDataError(f"{path}: holds no points (no data lines)")
    split = _splitter(lines[0][1])
    head = split(lines[0][1])
    header = all(_number(field) is None for field in head)
    names = (
        [field.strip().strip('"').strip("'") or str(i) for i, field in enumerate(head)]
        if header
        else [str(i) for i in range(len(head))]
    )
    if len(names) > MAX_COLUMNS:
        raise PointDataError(f"{path}: has {len(names):,} columns; a table of points has a few")
    body = lines[1:] if header else lines
    if len(body) > MAX_POINTS:
        raise PointDataError(f"{path}: holds {len(body):,} rows; at most {MAX_POINTS:,} points are read")
    rows = list(map(split, (line for _, line in body)))
    widths = set(map(len, rows))
    for (n, _), fields in zip(body, rows, strict=True) if widths != {len(names)} else ():
        if len(fields) != len(names):
            raise PointDataError(
                f"{path}: line {n} has {len(fields)} field{'s' if len(fields) != 1 else ''}, "
                f"the {'header' if header else 'first line'} has {len(names)}"
            )

    def column(i: int) -> tuple[np.ndarray, Any]:
        texts = [fields[i] for fields in rows]
        try:
            values = np.array(texts, dtype=np.float64)  # numpy's parser: about 5x faster than float() per value
        except ValueError:
            for r, text in enumerate(texts):  # find the culprit, for the message
                if _number(text) is None:
                    raise PointDataError(
                        f"{path}: line {body[r][0]}, column {names[i]!r}: cannot read {text[:40]!r} as a number"
                    ) from None
            raise PointDataError(f"{path}: column {names[i]!r} cannot be read as numbers") from None
        return values, lambda r: f"line {body[r][0]}"

    return PointTable(path, names, column)


# ----------------------------------------------------------------------------------------------------------
# NPY and NPZ
# ----------------------------------------------------------------------------------------------------------


def _array_header(fh: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """The shape and dtype an .npy stream declares, read from its header only (no data)."""
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, OSError, SyntaxError) as err:
        raise PointDataError(f"{where}: not a valid .npy array ({str(err)[:120]})") from None
    return tuple(int(s) for s in shape), np.dtype(dtype)


def _usable(shape: tuple[int, ...], dtype: np.dtype[Any]) -> str:
    """Why an array cannot hold points ("" if it can)."""
    if dtype.hasobject:
        return "holds Python objects (a pickle; refused without unpickling)"
    if dtype.names is not None:
        return "is a structured (record) array; save a plain numeric array of shape (n, 2)"
    if dtype.kind not in "iuf":
        return f"holds {dtype} values, not real numbers"
    if len(shape) not in (1, 2):
        return f"has {len(shape)} dimensions {shape}; points are a 2-D array (n, 2) or 1-D columns"
    return ""


def _check_rows(where: str, shape: tuple[int, ...]) -> None:
    if shape and shape[0] > MAX_POINTS:
        raise PointDataError(f"{where}: holds {shape[0]:,} rows; at most {MAX_POINTS:,} points are read")
    if len(shape) == 2 and shape[1] > MAX_COLUMNS:
        raise PointDataError(f"{where}: has {shape[1]:,} columns; a table of points has a few")


def _read_array(fh: IO[bytes], where: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(fh, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise PointDataError(f"{where}: cannot read its array ({str(err)[:120]}; truncated or corrupted?)") from None


def _row_label(r: int) -> str:
    return f"row {r}"


def _npy_table(path: Path) -> PointTable:
    with path.open("rb") as fh:
        shape, dtype = _array_header(fh, str(path))
        problem = _usable(shape, dtype)
        if problem:
            raise PointDataError(f"{path}: {problem}")
        _check_rows(str(path), shape)
        if len(shape) == 1:
            raise PointDataError(
                f"{path}: is a 1-D array of {shape[0]:,} values (one column); 2-D points "
                "need an array of shape (n, 2) or more columns"
            )
        fh.seek(0)
        array = _read_array(fh, str(path))
    names = [str(j) for j in range(shape[1])]
    return PointTable(path, names, lambda j: (np.asarray(array[:, j], dtype=np.float64), _row_label))


def _npz_table(path: Path) -> PointTable:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise PointDataError(f"{path}: not a valid .npz archive ({err})") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        declared: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        unusable: list[str] = []
        for member in members:
            key = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
            try:
                with archive.open(member) as fh:
                    shape, dtype = _array_header(fh, f"{path}: array {key!r}")
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as err:
                raise PointDataError(f"{path}: array {key!r} cannot be read ({err})") from None
            problem = _usable(shape, dtype)
            if problem:
                unusable.append(f"{key} {problem}")
                continue
            _check_rows(f"{path}: array {key!r}", shape)
            declared[key] = (shape, dtype)
        if not declared:
            listed = "; ".join(unusable) if unusable else "it is empty"
            raise PointDataError(
                f"{path}: holds no usable array ({listed}); 2-D points need a numeric array of "
                "shape (n, 2) or 1-D arrays of equal length, one per column"
            )
        arrays: dict[str, np.ndarray] = {}
        for member in members:
            key = member.filename[:-4] if member.filename.endswith(".npy") else member.filename
            if key in declared:
                with archive.open(member) as fh:
                    arrays[key] = _read_array(fh, f"{path}: array {key!r}")
    names: list[str] = []
    sources: list[tuple[str, int | None]] = []
    for key, array in arrays.items():
        if array.ndim == 1:
            names.append(key)
            sources.append((key, None))
        else:
            for j in range(array.shape[1]):
                names.append(f"{key}[{j}]")
                sources.append((key, j))

    def column(i: int) -> tuple[np.ndarray, Any]:
        key, j = sources[i]
        values = arrays[key] if j is None else arrays[key][:, j]
        return np.asarray(values, dtype=np.float64), _row_label

    return PointTable(path, names, column)
