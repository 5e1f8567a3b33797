"""Helpers shared by the command-line tests (``test_cli.py``, ``test_cli_images.py``)."""

import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np

from monoflow_core.cli import main
from monoflow_core.imageio import PNG_SIGNATURE


def run(argv):
    """``main(argv)`` with stdout / stderr captured: ``(exit code, stdout, stderr)``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_user_error(code, err, *words):
    """Exit status 2 and one ``monoflow: error:`` line on stderr holding every one of ``words``; no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("monoflow: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _png_chunks(path):
    """The chunks of a PNG file in order, ``[(type, data)]``, checking the signature and every chunk's CRC."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    return chunks


def png_text(path):
    """The ``tEXt`` metadata of a PNG file: ``{keyword: text}``."""
    return dict(body.decode("latin-1").split("\0", 1) for kind, body in _png_chunks(path) if kind == b"tEXt")


def read_png(path):
    """Decode the writer's output (8-bit RGB, no interlace, filter 0), checking the signature, every chunk's CRC
    and the chunks (IHDR first, IEND last, nothing but IHDR / tEXt / IDAT / IEND): ``(width, height, RGB pixels)``."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE
    pos, chunks, order = 8, {}, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        order.append(kind)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + length
    assert order[0] == b"IHDR" and order[-1] == b"IEND" and set(chunks) - {b"tEXt"} == {b"IHDR", b"IDAT", b"IEND"}
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()  # filter type None on every scanline (what monoflow's writer uses)
    return width, height, raw[:, 1:].reshape(height, width, 3)
