"""Pictures of 2-D densities for the benchmarks: panels of learned densities on a grid, with titles.

Shared by ``table1_figure.py`` (Table 1's runs, the layout of Figure 5 of Ahn et al., arXiv:2210.08176) and
``compare_flows.py`` (every flow family side by side). A learned panel is ``exp(log p)`` on a regular grid over
``[-4, 4]^2`` as ``monoflow density FILE.png`` draws it: the engine's own
:func:`monoflow_core.evaluation.log_density_grid` (exact log-det, float64) after the same power-iteration
tightening, divided by its peak and coloured with the CLI's viridis-like scale
(:func:`monoflow_core.imageio.colormap`). The data's panel is a histogram of 1,000,000 generator samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from monoflow_core import evaluation
from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.data import sample_toy
from monoflow_core.evaluation_policy import EVAL_POWER_ITERATIONS
from monoflow_core.imageio import colormap
from monoflow_core.nn.lipschitz import update_lipschitz

EXTENT = 4.0
DATA_SAMPLES = 1_000_000
GAP = 4  # pixels between panels
MISSING_GREY = 128
LEFT, TOP = 80, 18  # room for the row and column titles
BLACK, WHITE = (0, 0, 0), (255, 255, 255)

Label = tuple[int, int, str, tuple[int, int, int]]


def data_panel(data: str, resolution: int) -> np.ndarray:
    """The generator's density: a normalised 2-D histogram of :data:`DATA_SAMPLES` points, highest y on top."""
    points = sample_toy(data, DATA_SAMPLES, rng=12345, dtype=torch.float64).numpy()
    counts, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=resolution, range=[[-EXTENT, EXTENT]] * 2)
    image = counts.T[::-1]
    return colormap(image / max(image.max(), 1.0))


def model_panel(checkpoint: Path, resolution: int) -> np.ndarray:
    """A run's learned density exp(log p) / peak on the grid, as ``monoflow density FILE.png`` draws it."""
    flow = load_checkpoint(checkpoint).flow
    update_lipschitz(flow, EVAL_POWER_ITERATIONS)
    grid, _ = evaluation.log_density_grid(flow.eval(), extent=EXTENT, resolution=resolution, dtype=torch.float64)
    finite = np.isfinite(grid)
    top = grid[finite].max() if finite.any() else 0.0
    return colormap(np.exp(np.where(finite, grid, -np.inf) - top)[::-1])


def labelled(canvas: np.ndarray, labels: Sequence[Label]) -> np.ndarray:
    """Write the row and column titles with Pillow's built-in font, when Pillow is installed."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # the picture stays useful without titles; the README names the layout
        return canvas
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for x, y, text, colour in labels:
        draw.text((x, y), text, fill=colour)
    return np.asarray(image)


@dataclass
class Panel:
    """One panel of a picture: an RGB image (``None``: a grey panel, e.g. a run not finished yet), a caption written
    at its bottom and a note written across its middle, both in white."""

    image: np.ndarray | None = None
    caption: str | None = None
    note: str | None = None


def compose(
    panels: Sequence[Sequence[Panel]], row_titles: Sequence[str], column_titles: Sequence[str], resolution: int
) -> np.ndarray:
    """The panels (rows of ``resolution``-pixel squares) on a white canvas, titled on the left and on top.

    Returns:
        The picture, an ``(height, width, 3)`` uint8 array.
    """
    r = resolution
    height = TOP + len(row_titles) * (r + GAP)
    width = LEFT + len(column_titles) * (r + GAP)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    labels: list[Label] = []
    for j, title in enumerate(column_titles):
        x0 = LEFT + j * (r + GAP)
        labels.append((x0 + 4, 3, title, BLACK))
        for i, row_title in enumerate(row_titles):
            y0 = TOP + i * (r + GAP)
            if j == 0:
                labels.append((4, y0 + r // 2 - 5, row_title, BLACK))
            panel = panels[i][j]
            image = panel.image if panel.image is not None else np.full((r, r, 3), MISSING_GREY, dtype=np.uint8)
            canvas[y0 : y0 + r, x0 : x0 + r] = image
            if panel.caption:
                labels.append((x0 + 3, y0 + r - 13, panel.caption, WHITE))  # on the dark background
            if panel.note:
                labels.append((x0 + 4, y0 + r // 2 - 5, panel.note, WHITE))
    return labelled(canvas, labels)
