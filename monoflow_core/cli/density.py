"""``monoflow density``: a 2-D flow's log-density on a grid, as ``.npy`` or a heat map ``.png``."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from .. import evaluation
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
from .report import _dtype_name


@full_precision()  # reported numbers and pictures in full float32 / float64 (docs/precision.md)
def _cmd_density(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    out = Path(_nonempty_path("--out", args.out))
    suffix = _check_output_path(out, (".npy", ".png"), "a density grid")
    r = args.resolution
    if r < 2:
        raise CLIError(f"--resolution {r}: must be at least 2 (the grid includes both edges of the extent)")
    box = evaluation.parse_extent(args.extent)
    if suffix == ".npy":
        # Streamed to disk a piece at a time: memory stays bounded whatever --resolution is.
        check_disk(f"--resolution {r}", npy_bytes((r, r), 8), out.parent, f"the {r} x {r} grid")
    else:
        # The heat map needs the whole grid: log-densities, densities, the RGB picture, its flip and its PNG.
        check_memory(
            f"--resolution {r}",
            r * r * (8 + 8 + 3 * 3),
            f"the {r} x {r} heat map",
            hint="write .npy instead (streamed to disk), or use a smaller --resolution",
        )
    ckpt = _load(args.checkpoint, args.device)
    flow = _evaluation_flow(ckpt)
    if flow.event_shape != (2,):
        raise CLIError(
            f"{args.checkpoint}: holds a flow on {flow.dim}-D samples; density grids need a 2-D flow (a toy density)"
        )
    dtype = _picture_dtype(args, flow)
    # The file holds the values in the dtype that computed them (its header says which).
    writer = _NpyWriter(out, (r, r), _numpy_dtype(dtype)) if suffix == ".npy" else None
    grid = np.empty(r * r, dtype=np.float64) if writer is None else None
    lo, hi, total = math.inf, -math.inf, 0.0
    bar = _progress(r * r, "points", "density")

    def consume(start: int, values: np.ndarray) -> None:
        nonlocal lo, hi, total
        _refuse_non_finite(
            values, start, "grid points' log-densities", f"the solver diverged; check --extent {args.extent:g}"
        )
        lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
        total += float(np.exp(values).sum())
        if writer is not None:
            writer.write(values)
        else:
            assert grid is not None
            grid[start : start + values.shape[0]] = values
        bar.update(values.shape[0])

    t0 = time.perf_counter()
    with _streaming(writer, bar):
        xmin, xmax, ymin, ymax = evaluation.log_density_pieces(flow, consume, box, r, dtype=dtype, workers=args.workers)
        seconds = time.perf_counter() - t0
    if grid is not None:
        square = grid.reshape(r, r)
        # density in [0, 1], 1 at the peak; top row = highest y
        write_png(out, colormap(np.exp(square - hi)[::-1]), _png_text(dtype))
    cell = (xmax - xmin) / (r - 1) * (ymax - ymin) / (r - 1)
    print(
        f"wrote the {r} x {r} log-density grid on [{xmin:g}, {xmax:g}] x [{ymin:g}, {ymax:g}] to {out} "
        f"(log p from {lo:.3f} to {hi:.3f} nats; probability mass on the grid about {total * cell:.3f}; "
        f"{_dtype_name(dtype)}; {seconds:.2f} s)"
    )
    note = points_note(ckpt.points, "the grid and its log-densities")
    if note:
        print(note)
    return EXIT_OK
