"""The learned densities of Table 1 as one picture (the layout of Figure 5 of Ahn et al., arXiv:2210.08176).

One column per toy data set; the rows are the data's density (a histogram of 1,000,000 generator samples), then the
density learned by Monotone Flows and by our i-DenseNet, read from the final checkpoints of ``benchmarks/table1.py``
(its run folders). Every learned panel is ``exp(log p)`` on a regular grid over ``[-4, 4]^2``, computed by the
engine's own :func:`monoflow_core.evaluation.log_density_grid` (exact log-det, float64) after the same
power-iteration tightening as ``monoflow density``, divided by its peak and coloured with the CLI's viridis-like
scale (:func:`monoflow_core.imageio.colormap`). A run that has not finished yet is drawn as a grey panel.

Usage::

    python benchmarks/table1_figure.py [--iterations 50000] [--seed 0] [--resolution 160] [--out docs/table1.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from monoflow_core import evaluation
from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.data import TOY_DATASETS, sample_toy
from monoflow_core.evaluation_policy import EVAL_POWER_ITERATIONS
from monoflow_core.imageio import colormap, write_png
from monoflow_core.nn.lipschitz import update_lipschitz

EXTENT = 4.0
DATA_SAMPLES = 1_000_000
ROWS = (("data", "Data"), ("monotone", "Monotone"), ("idensenet", "i-DenseNet"))
GAP = 4  # pixels between panels
MISSING_GREY = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50_000, help="the runs' length (their folder names)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (their folder names)")
    parser.add_argument("--runs-dir", default=str(common.RESULTS_DIR / "table1_runs"), help="table1.py's run folders")
    parser.add_argument("--resolution", type=int, default=160, help="pixels per panel side")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "table1.png"))
    return parser.parse_args(argv)


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


def labelled(canvas: np.ndarray, labels: list[tuple[int, int, str, tuple[int, int, int]]]) -> np.ndarray:
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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = args.resolution
    sets = list(TOY_DATASETS)
    left, top = 80, 18  # room for the row and column titles
    height = top + len(ROWS) * (r + GAP)
    width = left + len(sets) * (r + GAP)
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    labels: list[tuple[int, int, str, tuple[int, int, int]]] = []
    black, white = (0, 0, 0), (255, 255, 255)
    summary = []
    for j, data in enumerate(sets):
        x0 = left + j * (r + GAP)
        labels.append((x0 + 4, 3, data, black))
        for i, (model, title) in enumerate(ROWS):
            y0 = top + i * (r + GAP)
            if j == 0:
                labels.append((4, y0 + r // 2 - 5, title, black))
            if model == "data":
                panel = data_panel(data, r)
            else:
                folder = Path(args.runs_dir) / f"{data}-{model}-seed{args.seed}-it{args.iterations}"
                result = folder / "result.json"
                if result.is_file():
                    panel = model_panel(folder / "checkpoint.safetensors", r)
                    nll = json.loads(result.read_text())["fixed_nll_nats"]
                    labels.append((x0 + 3, y0 + r - 13, f"{nll:.3f} nats", white))  # on the dark background
                    summary.append(f"{data}/{model}: {nll:.4f} nats")
                else:
                    panel = np.full((r, r, 3), MISSING_GREY, dtype=np.uint8)
                    labels.append((x0 + 4, y0 + r // 2 - 5, "not run yet", white))
                    summary.append(f"{data}/{model}: not run yet")
            canvas[y0 : y0 + r, x0 : x0 + r] = panel
    out = write_png(args.out, labelled(canvas, labels))
    print("\n".join(summary))
    print(f"wrote {out} ({width} x {height} pixels)")


if __name__ == "__main__":
    main()
