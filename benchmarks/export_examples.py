"""Ship the finished Table 1 runs as example models: weights-only checkpoints in ``assets/models/``.

For every finished run of ``benchmarks/table1.py`` (a ``result.json`` in its folder) this writes
``assets/models/<data>-<model>.safetensors``: the final weights only (float32, no optimizer, RNG or history), with
the data set, preset, iterations and fixed-set test NLL (nats) in the metadata. The studio lists them under
*File > Open example*; ``monoflow eval|sample|density`` open them like any checkpoint.

Usage::

    python benchmarks/export_examples.py [--iterations 50000] [--seed 0] [--runs-dir ...] [--out assets/models]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.examples import write_example


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=50_000, help="the runs' length (their folder names)")
    parser.add_argument("--seed", type=int, default=0, help="the runs' seed (their folder names)")
    parser.add_argument("--runs-dir", default=str(common.RESULTS_DIR / "table1_runs"), help="table1.py's run folders")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets" / "models"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-seed{args.seed}-it{args.iterations}"
    written = 0
    for folder in sorted(Path(args.runs_dir).glob(f"*{suffix}")):
        result_path = folder / "result.json"
        if not result_path.is_file():
            print(f"{folder.name}: not finished, skipped")
            continue
        result = json.loads(result_path.read_text())
        flow = load_checkpoint(folder / "checkpoint.safetensors").flow
        target = out / f"{result['data']}-{result['model']}.safetensors"
        example = write_example(
            target,
            flow,
            data=result["data"],
            model=result["model"],
            preset=result["preset"],
            iterations=result["iterations"],
            test_nll_nats=result["fixed_nll_nats"],
            extra={
                "test_nll_stderr_nats": result["fixed_nll_stderr_nats"],
                "test_points": result["fixed_n_test"],
                "paper_protocol_nll_nats": result["paper_protocol_nll_nats"],
                "seed": args.seed,
                "measured": "fixed seeded held-out set, exact log-det, float64; benchmarks/table1.py",
            },
        )
        written += 1
        print(f"{example.title}: {target} ({target.stat().st_size / 1024:.0f} KiB)")
    print(f"wrote {written} example model(s) to {out}")


if __name__ == "__main__":
    main()
