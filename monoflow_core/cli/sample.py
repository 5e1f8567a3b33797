"""``monoflow sample``: model samples as ``.npy``, a 2-D histogram ``.png`` or an image grid ``.png``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .. import evaluation
from ..flow import Flow
from ..imageio import colormap, write_png
from ..precision import full_precision
from ..resources import check_disk, check_memory, npy_bytes
from .errors import EXIT_OK, CLIError
from .loading import _evaluation_flow, _load
from .options import _set_threads
from .outputs import (
    _check_output_path,
    _NpyWriter,
    _numpy_dtype,
    _picture_dtype,
    _png_text,
    _progress,
    _refuse_non_finite,
    _streaming,
)
from .paths import _nonempty_path
from .points import points_note
from .report import _dtype_name, _fmt_int


@full_precision()  # reported numbers and pictures in full float32 / float64 (docs/precision.md)
def _cmd_sample(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    out = Path(_nonempty_path("--out", args.out))
    suffix = _check_output_path(out, (".npy", ".png"), "samples")
    ckpt = _load(args.checkpoint, args.device)
    flow = _evaluation_flow(ckpt)
    if ckpt.model_config.is_image:
        return _sample_images(args, flow, out, suffix)
    if suffix == ".png" and flow.event_shape != (2,):
        raise CLIError(
            f"{args.checkpoint}: holds a flow on {flow.dim}-D samples; a .png histogram needs 2-D samples "
            "(write .npy instead)"
        )
    n, dtype = args.n, _picture_dtype(args, flow)
    np_dtype = _numpy_dtype(dtype)
    e, r = args.extent, args.resolution
    if suffix == ".npy":
        # Streamed to disk a piece at a time, so memory stays bounded whatever --n is; only the disk can refuse.
        check_disk(
            f"--n {n}",
            npy_bytes((n, flow.dim), np_dtype.itemsize),
            out.parent,
            f"{_fmt_int(n)} samples of {flow.dim} {np_dtype} value{'s' if flow.dim > 1 else ''}",
        )
    else:
        if not e > 0:
            raise CLIError(f"--extent: must be positive, got {e}")
        # float64 counts, their transposed and normalised copies, the RGB picture and its PNG encoding
        check_memory(
            f"--resolution {r}", r * r * (4 * 8 + 3 * 3), f"the {r} x {r} histogram", hint="use a smaller --resolution"
        )
    cause = f"the inverse solve diverged at temperature {args.temperature:g}"
    done = 0
    counts = np.zeros((r, r), dtype=np.float64) if suffix == ".png" else None
    writer = _NpyWriter(out, (n, flow.dim), np_dtype) if suffix == ".npy" else None
    bar = _progress(n, "samples", "sample")

    def consume(piece: np.ndarray) -> None:
        nonlocal done
        _refuse_non_finite(piece, done, "samples", cause)
        if writer is not None:
            writer.write(piece)
        else:
            assert counts is not None
            hist = np.histogram2d(piece[:, 0], piece[:, 1], bins=r, range=[[-e, e], [-e, e]])[0]
            np.add(counts, hist, out=counts)
        done += piece.shape[0]
        bar.update(piece.shape[0])

    t0 = time.perf_counter()
    with _streaming(writer, bar):
        evaluation.sample_pieces(
            flow, n, consume, temperature=args.temperature, seed=args.seed, dtype=dtype, workers=args.workers
        )
        seconds = time.perf_counter() - t0
    if writer is not None:
        what = f"{_fmt_int(n)} samples ({flow.dim}-D, float array {n} x {flow.dim})"
    else:
        assert counts is not None
        # counts[i, j]: x bin i, y bin j -> image rows from the highest y (top) to the lowest.
        image = counts.T[::-1]
        peak = image.max()
        write_png(out, colormap(image / peak if peak > 0 else image), _png_text(dtype))
        what = (
            f"a {r} x {r} histogram of {_fmt_int(n)} samples on [-{e:g}, {e:g}]^2 ({_fmt_int(int(counts.sum()))} "
            "inside)"
        )
    print(
        f"wrote {what} to {out} (temperature {args.temperature:g}, seed {args.seed}, {_dtype_name(dtype)}; "
        f"sampling took {seconds:.2f} s)"
    )
    note = points_note(ckpt.points, "the samples")
    if note:
        print(note)
    return EXIT_OK


def _sample_images(args: argparse.Namespace, flow: Flow, out: Path, suffix: str) -> int:
    from ..multiscale import quantize

    n, dtype = args.n, _picture_dtype(args, flow)
    levels = int(cast(Any, flow).levels)  # an image flow (MultiscaleFlow), as the caller checked
    c, h, w = (int(s) for s in flow.event_shape)
    np_dtype = np.dtype(np.uint8 if levels <= 256 else np.int64)
    if suffix == ".npy":
        check_disk(
            f"--n {n}",
            npy_bytes((n, c, h, w), np_dtype.itemsize),
            out.parent,
            f"{_fmt_int(n)} images of {c} x {h} x {w} {np_dtype} levels",
        )
    else:
        cols = math.ceil(math.sqrt(n))
        grid = (math.ceil(n / cols) * (h + 1) + 1) * (cols * (w + 1) + 1) * 3
        # The grid holds every image at once: the float samples, their levels, the scaled copy, the picture twice.
        check_memory(
            f"--n {n}",
            n * c * h * w * (_numpy_dtype(dtype).itemsize + 8 + 3) + 2 * grid,
            f"a grid of {_fmt_int(n)} images",
            hint="write .npy instead (streamed to disk), or use a smaller --n",
        )
    cause = f"the inverse solve diverged at temperature {args.temperature:g}"
    done = 0
    pieces: list[np.ndarray] = []
    writer = _NpyWriter(out, (n, c, h, w), np_dtype) if suffix == ".npy" else None
    piece = 2000  # images per piece: a few MB of pixels for the shipped image shapes
    bar = _progress(n, "images", "sample", piece)

    def consume(y: np.ndarray) -> None:
        nonlocal done
        # Checked before quantizing: a NaN would become an arbitrary integer level.
        _refuse_non_finite(y, done, "images", cause)
        levels_of = quantize(torch.from_numpy(y), levels).numpy()
        if writer is not None:
            writer.write(levels_of)
        else:
            pieces.append(levels_of)
        done += y.shape[0]
        bar.update(y.shape[0])

    t0 = time.perf_counter()
    with _streaming(writer, bar):
        # The draws of evaluation.sample_images (chunks of 500 images), a few chunks at a time.
        evaluation.sample_pieces(
            flow, n, consume, chunk=500, piece=piece, temperature=args.temperature, seed=args.seed, dtype=dtype
        )
        seconds = time.perf_counter() - t0
    shape = f"{c} x {h} x {w}"
    if writer is not None:
        what = f"{_fmt_int(n)} images ({shape}, integer levels 0-{levels - 1})"
    else:
        write_png(out, evaluation.image_grid(np.concatenate(pieces), levels), _png_text(dtype))
        what = f"a grid of {_fmt_int(n)} sampled images ({shape}, {levels} levels)"
    print(
        f"wrote {what} to {out} (temperature {args.temperature:g}, seed {args.seed}, {_dtype_name(dtype)}; "
        f"sampling took {seconds:.2f} s)"
    )
    return EXIT_OK
