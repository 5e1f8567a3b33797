"""Tiny, dependency-free image output for the CLI: a viridis-like colormap and an 8-bit RGB PNG writer.

Only numpy and the standard library (``zlib``, ``struct``) are used, so the core needs neither matplotlib nor
Pillow. Every file is written atomically (:func:`atomic_write`): the bytes go to a temporary file in the target's
directory and replace the target with ``os.replace``, so a failure never leaves a half-written file behind.

PNG layout (W3C PNG specification, 2nd edition): the 8-byte signature, an ``IHDR`` chunk (width, height, bit
depth 8, colour type 2 = truecolour RGB, compression 0, filter 0, interlace 0), one ``IDAT`` chunk holding the
zlib-compressed scanlines (each prefixed with filter type 0, "None"), and ``IEND``; every chunk is
``length | type | data | CRC-32(type + data)``. Optional ``tEXt`` chunks (``keyword NUL text``, Latin-1, section
11.3.4.3) between ``IHDR`` and ``IDAT`` record how a picture was made (e.g. the dtype that computed it).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .fileio import atomic_write

__all__ = ["PNG_SIGNATURE", "VIRIDIS_ANCHORS", "atomic_write", "colormap", "encode_png", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: Eleven samples of matplotlib's viridis at 0, 0.1, ..., 1 (sRGB, 0-255); :func:`colormap` interpolates them
#: linearly into a 256-entry lookup table. Perceptually uniform enough for density pictures.
VIRIDIS_ANCHORS: tuple[tuple[int, int, int], ...] = (
    (68, 1, 84),
    (72, 36, 117),
    (65, 68, 135),
    (53, 95, 141),
    (42, 120, 142),
    (33, 145, 140),
    (34, 168, 132),
    (68, 191, 112),
    (122, 209, 81),
    (189, 223, 38),
    (253, 231, 37),
)


def _lookup_table(size: int = 256) -> np.ndarray:
    anchors = np.asarray(VIRIDIS_ANCHORS, dtype=np.float64)
    at = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, size)
    lut = np.stack([np.interp(t, at, anchors[:, c]) for c in range(3)], axis=1)
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)


_LUT = _lookup_table()


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to viridis-like colours.

    Args:
        values: an array of any shape (typically (H, W)); values are clipped to [0, 1], NaN maps to 0.

    Returns:
        A ``uint8`` array of shape ``values.shape + (3,)`` (RGB).
    """
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    index = np.rint(np.clip(v, 0.0, 1.0) * (len(_LUT) - 1)).astype(np.intp)
    return _LUT[index]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _text_chunk(keyword: str, text: str) -> bytes:
    """A ``tEXt`` chunk: a keyword of 1-79 printable Latin-1 characters, NUL, then the Latin-1 text."""
    if not 1 <= len(keyword) <= 79 or not all(32 <= ord(c) <= 126 for c in keyword):
        raise ValueError(f"png: invalid tEXt keyword {keyword!r}")
    return _chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + text.encode("latin-1"))


def encode_png(rgb: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """The bytes of an 8-bit RGB PNG of an (H, W, 3) ``uint8`` array (row 0 is the top of the picture).

    ``text``: keyword -> text pairs stored as ``tEXt`` chunks (readers show them as the file's metadata).

    Raises:
        ValueError: if the array is not (H, W, 3) ``uint8`` with H, W >= 1, or a keyword is not valid.
    """
    a = np.asarray(rgb)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"png: expected an (H, W, 3) uint8 array, got shape {a.shape} and dtype {a.dtype}")
    height, width = a.shape[:2]
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8), a.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        (
            PNG_SIGNATURE,
            _chunk(b"IHDR", header),
            *(_text_chunk(k, v) for k, v in (text or {}).items()),
            _chunk(b"IDAT", zlib.compress(np.ascontiguousarray(rows).tobytes(), 6)),
            _chunk(b"IEND", b""),
        )
    )


def write_png(path: str | os.PathLike[str], rgb: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write an (H, W, 3) ``uint8`` RGB array as a PNG file, atomically, with ``text`` as ``tEXt`` chunks (see
    :func:`encode_png`); returns the path.

    Raises:
        ValueError: bad array shape or dtype.
        OSError: the file cannot be written (the target is left untouched).
    """
    return atomic_write(path, encode_png(rgb, text))
