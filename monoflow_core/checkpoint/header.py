"""The file format: monoflow's format tag and limits, and the checked reading of a safetensors header.

A checkpoint is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: an 8-byte header length, a JSON
header (the tensor table and string metadata), raw tensor bytes. :func:`_read_header` checks the framing, every
entry of the tensor table (dtype, shape, byte span), that the file holds all the bytes the table names, the type of
every metadata entry and the format tag, reading nothing but the header (a FIFO or device is refused unopened).
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import _fail, _is_int, _kind, _short

#: Format tag stored in every checkpoint's metadata; files without it are refused.
FORMAT_TAG = "monoflow-checkpoint/1"
_FORMAT_FAMILY = "monoflow-checkpoint/"

#: Largest JSON header monoflow writes or reads. A real header is well below a megabyte (a tensor table of a few
#: thousand entries, histories thinned to 512 records); the cap bounds what parsing a hostile header can cost, since
#: JSON of tiny containers (``[[],[],...]``) takes about 25 bytes of memory per byte of text.
MAX_HEADER_BYTES = 16 * 1024 * 1024

#: safetensors itself refuses headers above 100 MB; a larger length field means "not a safetensors file".
_SAFETENSORS_MAX_HEADER = 100_000_000

#: Deepest nesting of any JSON document of a checkpoint (real ones nest 5 deep); deeper documents are refused
#: before any code walks them recursively (``copy.deepcopy``, ``repr``) and hits Python's recursion limit.
_MAX_JSON_DEPTH = 32

#: Most dimensions of a stored tensor (the flows' tensors have at most 4).
_MAX_RANK = 8

#: Dtypes a checkpoint's flow may have (its ``dtype`` metadata entry).
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: safetensors dtype names monoflow reads, with their torch dtypes.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth <= _MAX_JSON_DEPTH:  # deeper than the limit: already refused, no need to walk on
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _sniff(head: bytes) -> str:
    """Name what a file that is not safetensors looks like, for the error message."""
    if head.startswith(b"PK"):
        return "it is a zip archive (e.g. a torch.save .pt file), not a safetensors file; it was not unpickled"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"c", b"]", b"}"):
        return "it looks like a Python pickle, not a safetensors file; refused without unpickling"
    return "not a safetensors file (invalid header length)"


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file's table: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


@dataclass
class _Header:
    """A checked safetensors header: the tensor table and the (all-string) metadata."""

    tensors: dict[str, _Entry]
    meta: dict[str, str]


def _tensor_entry(path: Path, key: str, entry: Any) -> tuple[_Entry, int]:
    """Check one entry of the tensor table; return it and the end of its data."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"corrupted header (tensor {_short(key)} has no valid data_offsets)")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise _fail(path, f"tensor {_short(key)}: unsupported dtype {_short(dtype)}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
        raise _fail(path, f"tensor {_short(key)}: invalid shape {_short(shape)}")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(
            path,
            f"corrupted header (tensor {_short(key)}: {dtype} {_short(shape)} needs {nbytes} bytes, its data_offsets "
            f"span {offsets[1] - offsets[0]})",
        )
    return _Entry(dtype, tuple(shape)), offsets[1]


def _read_header(path: Path) -> _Header:
    """Validate the file's safetensors framing, tensor table, metadata types and format tag."""
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "it is a directory, not a checkpoint file")
    try:
        # Non-blocking open: a FIFO planted as a checkpoint would otherwise block until some process writes to it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _fail(path, "not a regular file (a FIFO, device or socket cannot hold a checkpoint)")
            size = info.st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(path, f"file is only {size} bytes: empty or truncated")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _SAFETENSORS_MAX_HEADER:
                raise _fail(path, _sniff(head))
            if n > MAX_HEADER_BYTES and 8 + n <= size:
                raise _fail(
                    path,
                    f"its header claims {n:,} bytes, more than the {MAX_HEADER_BYTES:,} of any monoflow checkpoint "
                    "(refused unread)",
                )
            raw = fh.read(min(n, MAX_HEADER_BYTES + 1))
    except OSError as err:
        raise _fail(path, err.strerror or str(err)) from err
    if len(raw) < n:
        if raw[:1] == b"{":
            raise _fail(path, f"truncated: the file ends inside its header ({size} bytes, header needs {8 + n})")
        raise _fail(path, _sniff(head))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(path, "not a safetensors file (its header is not JSON) or corrupted") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (its header is not a JSON object)")
    tensors: dict[str, _Entry] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key], stop = _tensor_entry(path, key, entry)
        end = max(end, stop)
    if 8 + n + end > size:
        raise _fail(path, f"truncated: expected {8 + n + end} bytes, the file has {size}")
    meta = header.get("__metadata__")
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != FORMAT_TAG:
        if isinstance(tag, str) and tag.startswith(_FORMAT_FAMILY):
            raise _fail(path, f"format {_short(tag)} is not supported by this monoflow (it reads {FORMAT_TAG!r})")
        raise _fail(
            path,
            f"not a monoflow checkpoint (a safetensors file without the {FORMAT_TAG!r} format tag, "
            "perhaps written by another program)",
        )
    assert isinstance(meta, dict)
    for key, value in meta.items():
        # safetensors metadata maps strings to strings; JSON documents are stored as JSON text.
        if not isinstance(value, str):
            raise _fail(path, f"metadata entry {_short(key)} must be a string, got {_kind(value)}")
    return _Header(tensors, meta)
