"""Evaluation of trained flows: log-density grids, samples, test NLL / MSE and solver diagnostics.

Everything here runs under ``torch.no_grad()`` with the flow in eval mode, and hands back plain numbers or numpy
arrays (what the CLI and the studio display). Likelihoods are best evaluated in float64 (docs/performance.md: in
float32 a few stagnating points can hold a whole grid's solve, in float64 every block converges in a handful of
iterations); a float32 flow is then evaluated on a float64 *copy*, so the caller's flow keeps its dtype, its
mode and its weights.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .config import _int_at_least
from .flow import Flow
from .fused import fold_scope

__all__ = [
    "IMAGE_NOISE_BLOCK",
    "PIECE_POINTS",
    "Extent",
    "density_grid_points",
    "grid_points",
    "image_bpd",
    "image_grid",
    "log_density_grid",
    "log_density_pieces",
    "log_prob",
    "parse_extent",
    "sample",
    "sample_images",
    "sample_pieces",
    "solver_diagnostics",
    "test_mse",
    "test_nll",
]

#: ``(xmin, xmax, ymin, ymax)`` of a 2-D grid, in data units.
Extent = tuple[float, float, float, float]


def _flow_dtype_device(flow: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in itertools.chain(flow.parameters(), flow.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


_M = TypeVar("_M", bound=nn.Module)


@contextmanager
def _evaluating(flow: _M, dtype: torch.dtype | None) -> Iterator[_M]:
    """Yield ``flow`` (or a copy in ``dtype``) in eval mode with gradients off; restore the mode afterwards."""
    own_dtype, _ = _flow_dtype_device(flow)
    if dtype is not None and dtype != own_dtype:
        # A copy, never an in-place cast: the caller (e.g. a training loop) keeps its float32 weights.
        model = copy.deepcopy(flow).to(dtype=dtype).eval()
        with torch.no_grad():
            yield model
        return
    was_training = flow.training
    flow.eval()
    try:
        with torch.no_grad():
            yield flow
    finally:
        flow.train(was_training)


def _as_tensor(x: Any, dtype: torch.dtype, device: torch.device) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype)


def _check_workers(workers: int) -> int:
    return _int_at_least("workers", workers, 1)


def _map_chunks(fn: Callable[[Tensor], Tensor], chunks: list[Tensor], workers: int) -> list[Tensor]:
    """``[fn(c) for c in chunks]`` without gradients, on ``workers`` threads when more than one.

    Each worker thread runs torch with one intra-op thread (set for the duration and restored after): two threads
    each evaluating their own chunks use two cores better than one thread whose small operators are split in two
    (1.5x for a 400 x 400 grid on the 2-core development machine; ``benchmarks/engine_speed.py``). Results come back
    in chunk order and equal the serial ones exactly.
    """

    folds: dict[Any, Any] = {}  # the chunks share one fold of the weights (fused.fold_scope)

    def run(c: Tensor) -> Tensor:
        with torch.no_grad(), fold_scope(folds):  # grad mode and the scope are per thread
            return fn(c)

    if workers == 1 or len(chunks) < 2:
        return [run(c) for c in chunks]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(workers, len(chunks)), thread_name_prefix="monoflow-eval") as pool:
            return list(pool.map(run, chunks))
    finally:
        torch.set_num_threads(threads)


def _check_chunk(chunk: int) -> int:
    return _int_at_least("chunk", chunk, 1)


def log_prob(
    flow: Flow, x: Tensor | np.ndarray, chunk: int = 10_000, dtype: torch.dtype | None = None, workers: int = 1
) -> Tensor:
    """Log-density ``log p(x)`` of every point in nats, as a float64 CPU tensor of shape (N,).

    ``log p(x) = log N(F(x); 0, I) + log|det J_F(x)|`` (docs/algorithm.md §1), evaluated in chunks of ``chunk`` points.
    If the flow's log-det is not exact (``flow.logdet_is_exact`` is False afterwards) the values are unbiased
    stochastic estimates.

    Args:
        flow: the flow.
        x: points of shape (N, *event_shape).
        chunk: points per forward pass.
        dtype: evaluate in this dtype (on a copy if it differs from the flow's); ``None`` = the flow's dtype.
        workers: threads evaluating chunks in parallel (each with one intra-op thread); 1 = serial.
    """
    chunk = _check_chunk(chunk)
    workers = _check_workers(workers)
    with _evaluating(flow, dtype) as model:
        dt, dev = _flow_dtype_device(model)
        xt = _as_tensor(x, dt, dev)
        chunks = [xt[i : i + chunk] for i in range(0, xt.shape[0], chunk)]
        parts = [p.to(device="cpu", dtype=torch.float64) for p in _map_chunks(model.log_prob, chunks, workers)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def test_nll(flow: Flow, x: Tensor | np.ndarray, chunk: int = 10_000, dtype: torch.dtype | None = None) -> float:
    """Mean test negative log-likelihood in nats (docs/algorithm.md section 9.1), evaluated in chunks.

    Args:
        flow: the flow.
        x: test points (N, *event_shape).
        chunk: points per forward pass.
        dtype: evaluation dtype (``None``: the flow's own; ``torch.float64`` evaluates a float64 copy).
    """
    return float(-log_prob(flow, x, chunk=chunk, dtype=dtype).mean())


test_nll.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite the name


def test_mse(
    flow: Flow, x: Tensor | np.ndarray, y: Tensor | np.ndarray, chunk: int = 10_000, dtype: torch.dtype | None = None
) -> float:
    """Mean squared error of the flow used as a map ``x -> y`` (the 1-D fitting task, docs/algorithm.md section 9.2).

    The mean runs over points and output dimensions; the flow's forward map ``F(x)`` is the prediction.
    """
    chunk = _check_chunk(chunk)
    with _evaluating(flow, dtype) as model:
        dt, dev = _flow_dtype_device(model)
        xt, yt = _as_tensor(x, dt, dev), _as_tensor(y, dt, dev)
        if xt.shape[0] != yt.shape[0]:
            raise ValueError(f"x and y: need the same number of points, got {xt.shape[0]} and {yt.shape[0]}")
        total, count = 0.0, 0
        for i in range(0, xt.shape[0], chunk):
            y_hat, _ = model(xt[i : i + chunk])
            err = (y_hat - yt[i : i + chunk].reshape(y_hat.shape)).to(torch.float64)
            total += float((err * err).sum())
            count += err.numel()
    return total / max(count, 1)


test_mse.__test__ = False  # type: ignore[attr-defined]


def parse_extent(extent: float | tuple[float, float, float, float] | list[float]) -> Extent:
    """A grid's extent from a positive half-width ``e`` (``[-e, e]^2``) or ``(xmin, xmax, ymin, ymax)``.

    Raises:
        ValueError: a half-width that is not positive, or bounds not in increasing order.
    """
    if isinstance(extent, int | float) and not isinstance(extent, bool):
        e = float(extent)
        if not e > 0:
            raise ValueError(f"extent: a half-width must be positive, got {extent!r}")
        return (-e, e, -e, e)
    if isinstance(extent, tuple | list) and len(extent) == 4:
        xmin, xmax, ymin, ymax = (float(v) for v in extent)
        if not (xmin < xmax and ymin < ymax):
            raise ValueError(f"extent: need xmin < xmax and ymin < ymax, got {tuple(extent)}")
        return (xmin, xmax, ymin, ymax)
    raise ValueError(f"extent: a positive half-width or (xmin, xmax, ymin, ymax), got {extent!r}")


def grid_points(extent: Extent, resolution: int) -> tuple[Tensor, Tensor, Tensor]:
    """The grid of :func:`log_density_grid`: ``(xs, ys, points)`` with points (res*res, 2) row-major in y.

    Point ``i * res + j`` is ``(xs[j], ys[i])``: rows run over y from ``ymin`` to ``ymax``, columns over x.
    """
    xmin, xmax, ymin, ymax = extent
    xs = torch.linspace(xmin, xmax, resolution, dtype=torch.float64)
    ys = torch.linspace(ymin, ymax, resolution, dtype=torch.float64)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return xs, ys, torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)


def log_density_grid(
    flow: Flow,
    extent: float | tuple[float, float, float, float] = 4.0,
    resolution: int = 400,
    chunk: int = 5000,
    dtype: torch.dtype | None = torch.float64,
    workers: int = 1,
) -> tuple[np.ndarray, Extent]:
    """Log-density of a 2-D flow on a regular grid, in nats (the paper's 400 x 400 on [-4, 4]^2, section 7.1).

    Args:
        flow: a flow on 2-D samples.
        extent: half-width ``e`` (grid on ``[-e, e]^2``) or ``(xmin, xmax, ymin, ymax)``.
        resolution: points per axis, >= 2; the grid includes the extent's edges (spacing
            ``(xmax - xmin) / (resolution - 1)``).
        chunk: points per forward pass.
        dtype: evaluation dtype (float64 by default, on a copy of a float32 flow); ``None``: the flow's own.
        workers: threads evaluating chunks in parallel (see :func:`log_prob`).

    Returns:
        ``(grid, extent)``: ``grid[i, j] = log p(xs[j], ys[i])`` with ``ys`` increasing from ``ymin`` (row 0) to
        ``ymax`` and ``xs`` from ``xmin`` (column 0) to ``xmax``, as a float64 array of shape
        (resolution, resolution) (use ``origin="lower"`` to display it); and the extent as a tuple.
    """
    _check_grid(flow, extent, resolution)  # before allocating the grid
    grid = np.empty(resolution * resolution, dtype=np.float64)

    def store(start: int, values: np.ndarray) -> None:
        grid[start : start + values.shape[0]] = values

    box = log_density_pieces(flow, store, extent, resolution, chunk=chunk, dtype=dtype, workers=workers)
    return grid.reshape(resolution, resolution), box


#: Points (or samples) handed to the consumer of :func:`log_density_pieces` / :func:`sample_pieces` at a time, by
#: default: 100 chunks of 5,000, a few MB of 2-D points.
PIECE_POINTS = 500_000


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 2:
        raise ValueError(f"resolution: must be an integer >= 2, got {resolution!r}")
    return resolution


def _check_grid(flow: Flow, extent: float | tuple[float, float, float, float] | list[float], resolution: int) -> Extent:
    """The parsed extent, once the flow is known to be 2-D and the resolution an integer >= 2."""
    if tuple(getattr(flow, "event_shape", ())) != (2,):
        raise ValueError(f"flow: a density grid needs a flow on 2-D samples, got event shape {flow.event_shape}")
    _check_resolution(resolution)
    return parse_extent(extent)


def _piece_size(piece: int | None, chunk: int) -> int:
    # A whole number of chunks, so that every chunk is the one the unpieced computation would form: the results
    # then do not depend on the piece size, bit for bit. None: PIECE_POINTS, read at call time.
    piece = _int_at_least("piece", PIECE_POINTS if piece is None else piece, 1)
    return max(1, -(-piece // chunk)) * chunk


def log_density_pieces(
    flow: Flow,
    consume: Callable[[int, np.ndarray], None],
    extent: float | tuple[float, float, float, float] = 4.0,
    resolution: int = 400,
    *,
    chunk: int = 5000,
    dtype: torch.dtype | None = torch.float64,
    workers: int = 1,
    piece: int | None = None,
) -> Extent:
    """:func:`log_density_grid` a piece at a time, for grids too large to hold: memory stays bounded by ``piece``.

    The grid's points are taken in row-major order (point ``i * resolution + j`` is ``(xs[j], ys[i])``) and
    ``consume(start, values)`` receives the float64 log-densities of points ``start .. start + len(values) - 1``,
    in order. The values equal those of :func:`log_density_grid` exactly, whatever ``piece`` is.

    Args:
        flow: a flow on 2-D samples.
        consume: called with each piece's first flat index and its values.
        extent: as for :func:`log_density_grid`.
        resolution: points per axis, >= 2.
        chunk: points per forward pass.
        dtype: evaluation dtype (see :func:`log_density_grid`).
        workers: threads evaluating chunks in parallel.
        piece: points per call of ``consume`` (rounded up to whole chunks); default :data:`PIECE_POINTS`.

    Returns:
        The parsed extent ``(xmin, xmax, ymin, ymax)``.

    Raises:
        ValueError: a flow not on 2-D samples, a resolution that is not an integer >= 2, or a bad extent.
    """
    box = _check_grid(flow, extent, resolution)
    chunk = _check_chunk(chunk)
    workers = _check_workers(workers)
    step = _piece_size(piece, chunk)
    xmin, xmax, ymin, ymax = box
    xs = torch.linspace(xmin, xmax, resolution, dtype=torch.float64)
    ys = torch.linspace(ymin, ymax, resolution, dtype=torch.float64)
    total = resolution * resolution
    with _evaluating(flow, dtype) as model:
        dt, dev = _flow_dtype_device(model)
        for start in range(0, total, step):
            index = torch.arange(start, min(total, start + step))
            # The same points as grid_points(): x runs along a row, y down the rows.
            points = torch.stack([xs[index % resolution], ys[index // resolution]], dim=1).to(device=dev, dtype=dt)
            chunks = [points[i : i + chunk] for i in range(0, points.shape[0], chunk)]
            values = [p.to(device="cpu", dtype=torch.float64) for p in _map_chunks(model.log_prob, chunks, workers)]
            consume(start, torch.cat(values).numpy())
    return box


def density_grid_points(
    flow: Flow, extent: float | tuple[float, float, float, float], resolution: int
) -> tuple[Tensor, Extent]:
    """The points of :func:`log_density_grid` (``(resolution**2, 2)``, row-major in y) and the parsed extent.

    Raises:
        ValueError: a flow not on 2-D samples, a resolution that is not an integer >= 2, or a bad extent.
    """
    box = _check_grid(flow, extent, resolution)
    _, _, points = grid_points(box, resolution)
    return points, box


def sample(
    flow: Flow,
    n: int,
    chunk: int = 5000,
    temperature: float = 1.0,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Draw ``n`` samples ``F^{-1}(temperature * eps)``, ``eps ~ N(0, I)``, as a numpy array (n, *event_shape).

    Args:
        flow: the flow.
        n: number of samples, >= 0 (the paper's sample histograms use 160,000).
        chunk: samples per inverse pass.
        temperature: scale of the base noise, > 0.
        seed: seed of a dedicated generator (reproducible samples, global RNG untouched); ``None`` uses the
            global generator.
        dtype: sample in this dtype (on a copy); ``None``: the flow's own.
        workers: threads inverting chunks in parallel (see :func:`log_prob`); the base noise is drawn first, in
            chunk order, so the samples do not depend on ``workers``.
    """
    pieces: list[np.ndarray] = []
    dt = sample_pieces(
        flow, n, pieces.append, chunk=chunk, temperature=temperature, seed=seed, dtype=dtype, workers=workers
    )
    if not pieces:
        return np.zeros((0, *flow.event_shape), dtype=np.float64 if dt == torch.float64 else np.float32)
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def sample_pieces(
    flow: Flow,
    n: int,
    consume: Callable[[np.ndarray], None],
    *,
    chunk: int = 5000,
    temperature: float = 1.0,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    workers: int = 1,
    piece: int | None = None,
) -> torch.dtype:
    """:func:`sample` a piece at a time, for sample counts too large to hold: memory stays bounded by ``piece``.

    ``consume`` receives consecutive arrays of shape (m, *event_shape) whose concatenation equals
    ``sample(flow, n, ...)`` with the same arguments exactly: the base noise is drawn chunk by chunk, in order, from
    one generator, whatever ``piece`` is.

    Args:
        flow: the flow.
        n: number of samples, >= 0.
        consume: called with each piece of samples, in order.
        chunk, temperature, seed, dtype, workers: as for :func:`sample`.
        piece: samples per call of ``consume`` (rounded up to whole chunks); default :data:`PIECE_POINTS`.

    Returns:
        The dtype the samples were drawn in.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be positive, got {temperature!r}")
    chunk = _check_chunk(chunk)
    workers = _check_workers(workers)
    step = _piece_size(piece, chunk)
    with _evaluating(flow, dtype) as model:
        dt, dev = _flow_dtype_device(model)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=dev)
            generator.manual_seed(int(seed))
        for first in range(0, n, step):
            last = min(n, first + step)
            # The same draws as Flow.sample chunk by chunk (one randn per chunk, in order).
            noise = [
                temperature
                * torch.randn((min(chunk, last - start), *model.event_shape), dtype=dt, device=dev, generator=generator)
                for start in range(first, last, chunk)
            ]
            consume(torch.cat([p.to("cpu") for p in _map_chunks(model.inverse, noise, workers)]).numpy())
    return dt


#: Dequantization noise for image tests is drawn this many images at a time, whatever the evaluation's slices.
IMAGE_NOISE_BLOCK = 500


def image_bpd(
    flow: nn.Module,
    images: Tensor,
    *,
    seed: int,
    slice_size: int = IMAGE_NOISE_BLOCK,
    stop: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor | None:
    """Bits/dim of each integer image under an image flow: the test of image runs (docs/algorithm.md section 9.3).

    The flow is used as given (pass an evaluation copy in eval mode and the wanted dtype). The dequantization
    noise comes from a generator seeded with ``seed`` and is drawn :data:`IMAGE_NOISE_BLOCK` images at a time, so
    the result does not depend on ``slice_size``; the global random generator is only used by a power-series
    log-det (blocks above 64 dimensions), never for exact ones. Safe to run on a thread other than training's.

    Args:
        flow: a :class:`~monoflow_core.multiscale.MultiscaleFlow`.
        images: integer images (N, C, H, W).
        seed: seed of the dequantization noise.
        slice_size: images per forward pass.
        stop: polled between slices; returning True abandons the test (the function returns ``None``).
        progress: called after every slice with (images done, total).

    Returns:
        A float64 CPU tensor (N,) of bits/dim, or ``None`` if stopped.
    """
    from .dequantization import draw_noise

    image_flow: Any = flow  # a MultiscaleFlow (its dequantizer and bpd), typed loosely for the training copies
    dtype, device = _flow_dtype_device(flow)
    generator = torch.Generator().manual_seed(int(seed))
    total = int(images.shape[0])
    step = max(1, int(slice_size))
    parts: list[Tensor] = []
    done = 0
    with torch.no_grad():
        for block in torch.split(images, IMAGE_NOISE_BLOCK):
            noise = draw_noise(image_flow.dequantizer, block.shape, dtype, "cpu", generator)
            for start in range(0, int(block.shape[0]), step):
                if stop is not None and stop():
                    return None
                x = block[start : start + step].to(device)
                u = noise[start : start + step].to(device)
                parts.append(image_flow.bpd(x, noise=u).double().cpu())
                done += int(x.shape[0])
                if progress is not None:
                    progress(done, total)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def sample_images(
    flow: Flow,
    n: int,
    temperature: float = 1.0,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
    chunk: int = 500,
) -> np.ndarray:
    """Draw ``n`` images from an image flow as integer levels: a ``uint8``/``int64`` array (n, C, H, W).

    Continuous samples in [0, 1] are quantized to ``floor(K y)`` (clipped to [0, K-1]). For more images than fit in
    memory, quantize the pieces of :func:`sample_pieces` (with the same ``chunk``) instead: the result is the same.

    Args:
        flow: a :class:`~monoflow_core.multiscale.MultiscaleFlow`.
        n: number of images, >= 0.
        temperature: scale of the base noise, > 0 (below 1: smoother, more typical images).
        seed: seed of a dedicated generator; ``None`` uses the global one.
        dtype: sample in this dtype (on a copy); ``None``: the flow's own.
        chunk: images per inverse pass.
    """
    from .multiscale import quantize

    levels = getattr(flow, "levels", None)
    if levels is None:
        raise ValueError("sample_images: the flow is not an image flow (it has no pixel levels)")
    y = sample(flow, n, chunk=chunk, temperature=temperature, seed=seed, dtype=dtype)
    return quantize(torch.from_numpy(y), int(levels)).numpy()


def image_grid(images: np.ndarray, levels: int, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile integer images (N, C, H, W) with ``levels`` levels into one RGB picture (rows, cols, 3) ``uint8``.

    Grey images (C = 1) are repeated into three channels; levels are scaled to 0-255. Tiles are separated by
    ``padding`` pixels of mid-grey; ``columns`` defaults to ``ceil(sqrt(N))``.
    """
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[1] not in (1, 3) or a.shape[0] < 1:
        raise ValueError(f"image_grid: expected (N, 1 or 3, H, W) images, got shape {a.shape}")
    if levels < 2:
        raise ValueError(f"levels: must be >= 2, got {levels}")
    n, c, h, w = a.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    scaled = np.clip(np.rint(a.astype(np.float64) * 255.0 / (levels - 1)), 0, 255).astype(np.uint8)
    if c == 1:
        scaled = np.repeat(scaled, 3, axis=1)
    out = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), 128, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        out[top : top + h, left : left + w] = scaled[i].transpose(1, 2, 0)
    return out


def solver_diagnostics(flow: Flow) -> list[dict[str, Any]]:
    """Per implicit block, its solver settings and the summaries of its latest solves.

    Each entry: ``block`` (index in ``flow.layers``), ``kind``, ``solver``, ``tol``, ``max_iter``, and
    ``forward`` / ``inverse`` / ``backward``: :meth:`SolverStats.summary` dicts (iterations are G-evaluations
    per sample) or ``None`` where no such solve ran (e.g. the forward pass of a residual block).
    """
    out = []
    layers = list(flow.layers)
    for block, stats in zip(flow.implicit_blocks(), flow.solver_stats(), strict=True):
        out.append(
            {
                "block": next(i for i, m in enumerate(layers) if m is block),
                "kind": block.kind,
                "solver": block.solver,
                "tol": block.tol,
                "max_iter": block.max_iter,
                **{k: (None if s is None else s.summary()) for k, s in stats.items()},
            }
        )
    return out
