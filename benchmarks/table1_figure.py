"""The learned densities of Table 1 as one picture (the layout of Figure 5 of Ahn et al., arXiv:2210.08176).

One column per toy data set; the rows are the data's density (a histogram of 1,000,000 generator samples), then the
density learned by Monotone Flows and by our i-DenseNet, read from the final checkpoints of ``benchmarks/table1.py``
(its run folders), drawn by the panels of ``density_figure.py`` (``exp(log p)`` on a grid over ``[-4, 4]^2``, as
``monoflow density`` draws it). A run that has not finished yet is drawn as a grey panel.

Usage::

    python benchmarks/table1_figure.py [--iterations 50000] [--seed 0] [--resolution 160] [--out docs/table1.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from density_figure import Panel, compose, data_panel, model_panel

from monoflow_core.data import TOY_DATASETS
from monoflow_core.imageio import write_png

ROWS = (("data", "Data"), ("monotone", "Monotone"), ("idensenet", "i-DenseNet"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50_000, help="the runs' length (their folder names)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (their folder names)")
    parser.add_argument("--runs-dir", default=str(common.RESULTS_DIR / "table1_runs"), help="table1.py's run folders")
    parser.add_argument("--resolution", type=int, default=160, help="pixels per panel side")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" / "table1.png"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = args.resolution
    sets = list(TOY_DATASETS)
    cells: dict[tuple[str, str], Panel] = {}
    summary = []
    for data in sets:
        for model, _ in ROWS:
            if model == "data":
                cells[model, data] = Panel(data_panel(data, r))
                continue
            folder = Path(args.runs_dir) / f"{data}-{model}-seed{args.seed}-it{args.iterations}"
            result = folder / "result.json"
            if result.is_file():
                nll = json.loads(result.read_text())["fixed_nll_nats"]
                cells[model, data] = Panel(model_panel(folder / "checkpoint.safetensors", r), caption=f"{nll:.3f} nats")
                summary.append(f"{data}/{model}: {nll:.4f} nats")
            else:
                cells[model, data] = Panel(note="not run yet")
                summary.append(f"{data}/{model}: not run yet")
    panels = [[cells[model, data] for data in sets] for model, _ in ROWS]
    picture = compose(panels, [title for _, title in ROWS], sets, r)
    out = write_png(args.out, picture)
    print("\n".join(summary))
    print(f"wrote {out} ({picture.shape[1]} x {picture.shape[0]} pixels)")


if __name__ == "__main__":
    main()
