"""The ``monoflow`` argument parser: every subcommand, its options and help text."""

from __future__ import annotations

import argparse
from typing import NoReturn

from .. import __version__
from ..precision import CUDNN_BENCHMARK, PRECISIONS
from ..resources import MAX_THREADS_PER_CORE
from .datasets import ALL_DATA, DEFAULT_1D_PRESET, DEFAULT_TOY_PRESET
from .density import _cmd_density
from .errors import PROG, CLIError
from .evaluate import _cmd_eval
from .options import (
    MAX_TEMPERATURE,
    _add_dtype_option,
    _add_runtime_options,
    _add_workers_option,
    _dtype,
    _finite_float,
    _formulation,
    _nonnegative_int,
    _positive_int,
    _seed,
    _temperature,
    _threads,
)
from .points import holdout_fraction
from .sample import _cmd_sample
from .train import _cmd_train
from .utility import _cmd_presets, _cmd_warmup


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``monoflow: error: ...``) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


_TRAIN_EPILOG = f"""\
presets and overrides:
  Training starts from a preset: {DEFAULT_TOY_PRESET!r} for the 2-D densities and {DEFAULT_1D_PRESET!r} for
  'staircase' unless --preset names another (see 'monoflow presets'; a path to a JSON file of the same shape,
  such as a previous run's config.json, works too). Flags given explicitly override the preset; --data always
  sets the training data. A 2-D preset cannot train on 'staircase' and a 1-D preset cannot train on a 2-D
  density: that is an error naming a preset that fits.

output folder (--out DIR, created if missing):
  config.json             the model and training configuration and the preset's name (preset-shaped)
  metrics.csv             iteration,wall_seconds,train_loss,test_nll (test_mse for 'staircase'): one row per
                          fresh-sample test every --eval-every iterations (--eval-size points; the paper's
                          protocol), then a final row with the fixed held-out test (--test-size points).
                          train_loss is the mean training loss (nats, or MSE) since the previous row.
  checkpoint.safetensors  every --checkpoint-every iterations, at the end and on Ctrl-C
  A folder that already holds a checkpoint is refused unless --resume or --force is given. One run at a time
  writes into a folder: while a run holds its lock file (.monoflow-train.lock, removed at the end), a second
  'monoflow train' into the same folder is refused; the system releases the lock of a run that crashed or was
  killed, so the next run takes the folder over.

sizes:
  Sizes are checked against this machine before any work: a batch, test, model (--blocks, or an image folder's
  image size) or thread count that cannot fit is refused with the estimated memory it would need.

your own points (--data FILE):
  A .csv (header optional), .npy (an (n, k) array) or .npz file of 2-D points; --columns picks two of more
  columns. Rows with a non-finite value are refused (the error names the first). The points are split with the
  run's test seed (--holdout of them, default 20%, for the test NLL: every test uses them, there are no fresh
  samples) and standardised with the training part's mean and standard deviation; the flow models the
  standardised points and the checkpoint keeps them with their transform (eval, sample and density print it).

Ctrl-C stops after the current iteration, saves the checkpoint and exits with status 130 (a second Ctrl-C stops
at once). --resume CHECKPOINT continues that run up to --iterations in total and appends to metrics.csv; only
--iterations, --lr, --solver, --tol, --precision, --cudnn-benchmark, --eval-every, --eval-size, --checkpoint-every,
--device and --threads may change on resume.

examples:
  monoflow train --data 8gaussians --out runs/8g
  monoflow train --data moons --preset paper-toy-idensenet --iterations 5000 --out runs/moons-res
  monoflow train --data staircase --preset paper-1d-a --out runs/stairs-a
  monoflow train --data my_points.csv --columns x,y --iterations 5000 --out runs/mine
  monoflow train --resume runs/8g/checkpoint.safetensors --iterations 60000
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``monoflow`` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Monotone Flows (Ahn et al., NeurIPS 2022): train, evaluate, sample and draw from the shell.",
        epilog="Run 'monoflow COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    # -- train
    p = sub.add_parser(
        "train",
        help="train a flow on a toy density or the 1-D staircase",
        description="Train a Monotone Flow (or a residual / inverse-residual baseline) with the paper's protocol.",
        epilog=_TRAIN_EPILOG,
        formatter_class=fmt,
    )
    g = p.add_argument_group("data and preset")
    g.add_argument(
        "--data",
        metavar="NAME",
        help=f"training data: one of {', '.join(ALL_DATA)}, or a .csv, .npy or "
        ".npz file of your own 2-D points (required unless --resume)",
    )
    g.add_argument(
        "--columns",
        metavar="A,B",
        help="--data FILE with more than two columns: the two to use, by name "
        "(a CSV header, an NPZ key) or position, e.g. x,y or 0,2",
    )
    g.add_argument(
        "--holdout",
        type=holdout_fraction,
        metavar="F",
        help="--data FILE: fraction of the points held "
        "out for the test NLL, in (0, 0.5] (default 0.2; split with the run's test seed)",
    )
    g.add_argument(
        "--data-dir",
        metavar="DIR",
        help="folder holding an image set's files (mnist, cifar10, imagenet32, imagenet64, folder; digits is built in)",
    )
    g.add_argument(
        "--preset",
        metavar="NAME",
        help=f"preset name or JSON path (default {DEFAULT_TOY_PRESET} for 2-D "
        f"data, {DEFAULT_1D_PRESET} for staircase, digits-cpu for digits and folder, paper-<set> for the "
        "other image sets)",
    )
    g = p.add_argument_group("model (override the preset)")
    g.add_argument(
        "--formulation",
        type=_formulation,
        metavar="F",
        help="monotone | residual | inverse_residual, or a comma-separated list with one per block",
    )
    g.add_argument("--activation", metavar="A", help="activation of G: cpila, clipswish, lipswish, crelu, pila")
    g.add_argument("--blocks", type=_positive_int, metavar="N", help="number of flow blocks")
    g.add_argument(
        "--lipschitz", type=_finite_float, metavar="C", help="Lipschitz coefficient of each layer of G, in (0, 1)"
    )
    g.add_argument("--solver", metavar="S", help="fixed-point solver: auto, newton, anderson, picard")
    g.add_argument("--tol", type=_finite_float, metavar="T", help="relative solver tolerance, in (0, 1)")
    g = p.add_argument_group("training (override the preset)")
    g.add_argument("--iterations", type=_positive_int, metavar="N", help="total training iterations")
    g.add_argument("--batch-size", type=_positive_int, metavar="B", help="fresh samples per iteration")
    g.add_argument("--lr", type=_finite_float, metavar="LR", help="Adam learning rate")
    g.add_argument("--seed", type=_seed, metavar="S", help="seed of the weights and the data stream")
    g.add_argument(
        "--device",
        metavar="D",
        help="auto (default: the GPU for image models when CUDA is present, "
        "the CPU for vector models), cpu, cuda or cuda:N",
    )
    g.add_argument(
        "--eval-every", type=_nonnegative_int, metavar="N", help="a fresh-sample test every N iterations (0: none)"
    )
    g.add_argument("--eval-size", type=_positive_int, metavar="N", help="points per fresh-sample test")
    g.add_argument(
        "--test-size",
        type=_positive_int,
        metavar="N",
        help="points of the fixed held-out test at the end (staircase: of every test)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=_nonnegative_int,
        metavar="N",
        help="write the checkpoint every N iterations (0: only at the end)",
    )
    g.add_argument(
        "--grad-accumulation",
        type=_positive_int,
        metavar="K",
        help="split each batch into K micro-batches (same update, less memory)",
    )
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        type=str.lower,
        help="arithmetic of G in training: auto (default: TF32 off), highest, or tf32 (CUDA float32 "
        "products and convolutions in TF32, solves stop at its floor); tests always run in full "
        "precision (docs/precision.md)",
    )
    g.add_argument(
        "--cudnn-benchmark",
        choices=CUDNN_BENCHMARK,
        type=str.lower,
        help="cuDNN autotuning in training steps: auto (default: on only for image models on CUDA whose solves "
        "keep a fixed batch shape), on, or off (docs/precision.md)",
    )
    g = p.add_argument_group("run")
    g.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (required for a new run; default on --resume: the checkpoint's folder)",
    )
    g.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    g.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    g.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help="torch intra-op threads (default 1: fastest for these small matrices; at most "
        f"{MAX_THREADS_PER_CORE} per core)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (test results still go to stderr)")
    p.set_defaults(handler=_cmd_train)

    # -- eval
    p = sub.add_parser(
        "eval",
        help="test NLL (nats), test MSE or test bits/dim of a checkpoint on the fixed held-out set",
        description="Test a checkpoint on its fixed, seeded held-out set: the mean negative log-likelihood in nats "
        "(2-D densities), the mean squared error (staircase) or bits/dim on the whole test split (images; exact "
        "log-det where the blocks have <= 64 dimensions, else the power-series estimate with its standard error). "
        "Uses the run's EMA weights if it kept them.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors checkpoint")
    p.add_argument(
        "--test-size",
        type=_positive_int,
        metavar="N",
        help="held-out points (default: the run's test_size; staircase: eval_size)",
    )
    p.add_argument("--seed", type=_seed, metavar="S", help="seed of the held-out set (default: the run's test_seed)")
    p.add_argument(
        "--data", metavar="NAME", help="data set to test on (required for a flow-only checkpoint; default: the run's)"
    )
    p.add_argument("--data-dir", metavar="DIR", help="image sets: folder holding the files (default: the run's)")
    p.add_argument(
        "--split",
        choices=("test", "validation"),
        help="image sets: split to test on (default: the run's eval_split, test)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object: bpd (images), nll_nats (or mse), n_test, seconds, exact, dtype, data, ...",
    )
    _add_dtype_option(p, "float64 on the CPU, the training dtype for image flows and on GPUs")
    _add_runtime_options(p)
    p.set_defaults(handler=_cmd_eval)

    # -- sample
    p = sub.add_parser(
        "sample",
        help="draw samples to .npy, a 2-D histogram .png or an image grid .png",
        description="Draw samples F^-1(T * eps), eps ~ N(0, I). Image flows: FILE.png is a grid of the N sampled "
        "images, FILE.npy their integer levels (N, C, H, W). Other flows: FILE.npy: a float array of shape (N, dim); "
        "FILE.png: a histogram of 2-D samples on [-extent, extent]^2 (a viridis-like colour scale of the counts, "
        "highest y at the top).",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors checkpoint")
    p.add_argument("--n", type=_positive_int, required=True, metavar="N", help="number of samples")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, .npy or .png")
    p.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        metavar="T",
        help=f"scale of the base noise, in (0, {MAX_TEMPERATURE:g}] (default 1)",
    )
    p.add_argument("--seed", type=_seed, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument(
        "--resolution",
        type=_positive_int,
        default=200,
        metavar="R",
        help=".png only: histogram bins per axis (default 200)",
    )
    p.add_argument(
        "--extent",
        type=_finite_float,
        default=4.0,
        metavar="E",
        help=".png only: half-width of the histogram's square (default 4)",
    )
    _add_workers_option(p, "; image flows sample serially")
    _add_dtype_option(p, "the training dtype, float32 for the shipped presets")
    _add_runtime_options(p)
    p.set_defaults(handler=_cmd_sample)

    # -- density
    p = sub.add_parser(
        "density",
        help="log-density on a grid to .npy, or a heat map .png (2-D flows)",
        description="Evaluate log p(x) in nats on an R x R grid over [-extent, extent]^2 (the paper draws 400 x 400 "
        "on [-4, 4]^2). FILE.npy: the (R, R) array of log-densities in --dtype, row 0 = lowest y, column 0 = lowest x. "
        "FILE.png: the density exp(log p) divided by its peak, viridis-like colours, highest y at the top.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors checkpoint of a 2-D flow")
    p.add_argument(
        "--resolution", type=_positive_int, default=400, metavar="R", help="grid points per axis, >= 2 (default 400)"
    )
    p.add_argument(
        "--extent", type=_finite_float, default=4.0, metavar="E", help="half-width of the square grid (default 4)"
    )
    p.add_argument("--out", required=True, metavar="FILE", help="output file, .npy or .png")
    _add_workers_option(p)
    _add_dtype_option(p, "the training dtype, float32 for the shipped presets")
    _add_runtime_options(p)
    p.set_defaults(handler=_cmd_density)

    # -- warmup
    p = sub.add_parser(
        "warmup",
        help="compile the engine's kernels now (e.g. while building an image), so that no run waits for them",
        description="Compile the engine's compiled CPU kernels (or load them from the cache) ahead of time. The first "
        "process on a machine otherwise compiles them before its first step (half a minute to a few minutes); they "
        "are cached per user (MONOFLOW_CACHE_DIR overrides the folder) and later processes load them in about a "
        "second. In an image, run this as the user who will run monoflow, on the kind of CPU that will run it.",
    )
    p.add_argument("--dtype", type=_dtype, metavar="DT", help="float32 or float64 only (default: both)")
    p.add_argument(
        "--solve-only",
        action="store_true",
        help="only the kernels of densities, samples and tests (not those of training)",
    )
    p.set_defaults(handler=_cmd_warmup)

    # -- presets
    p = sub.add_parser(
        "presets",
        help="list the shipped presets",
        description="List the shipped presets: name and description, one per line.",
    )
    p.set_defaults(handler=_cmd_presets)
    return parser
