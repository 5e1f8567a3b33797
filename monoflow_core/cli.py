"""The ``monoflow`` command: train, evaluate, sample from and draw Monotone Flows from the shell.

Subcommands (``monoflow SUBCOMMAND --help`` for each):

* ``train``: train on a toy density, the 1-D staircase or images from a shipped preset (the paper's protocols,
  docs/algorithm.md §§9.1, 9.2, 9.3), with flags overriding the preset; writes ``config.json``, ``metrics.csv`` and a
  resumable ``checkpoint.safetensors`` into an output folder; Ctrl-C saves a checkpoint and exits 130. Under
  ``torchrun`` it trains data-parallel (:mod:`monoflow_core.distributed`).
* ``eval``: test NLL in nats (test MSE for the staircase, bits/dim for images) on the fixed, seeded test set.
* ``sample``: model samples as ``.npy``, a 2-D histogram ``.png`` or, for images, a ``.png`` sample grid.
* ``density``: the log-density on a grid as ``.npy`` or a heat map ``.png``.
* ``warmup``: compile the engine's kernels ahead of time (:mod:`monoflow_core.warmup`).
* ``presets``: the shipped presets.

The command adds no mathematics: it drives :class:`~monoflow_core.training.Trainer` and the functions of
:mod:`monoflow_core.evaluation`. User mistakes (a missing or corrupt file, an unknown name, a value out of range,
an unwritable path, a FIFO or device given as a file) end with one line ``monoflow: error: ...`` on stderr and
exit status 2; anything else is a bug and keeps its traceback (set ``MONOFLOW_DEBUG=1`` to get tracebacks for user
errors too).

Resources are checked before they are spent (:mod:`monoflow_core.resources`): every size (points, batch, blocks,
grid resolution, image size, threads) is compared with this machine's memory, disk and cores, and a request that
cannot fit is refused naming the flag and the estimated need. Large outputs are streamed: ``sample`` and
``density`` write ``.npy`` files a piece at a time (bounded memory; only the disk limits them) with a progress bar.
Output that is not finite (samples or log-densities of a diverged solve) is an error (exit status 1), never a file
written with exit status 0, and running out of memory anyway is one line with exit status 1. ``train`` holds an
advisory lock on its output folder (:mod:`monoflow_core.runlock`), so two runs never write into one folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast

import numpy as np
import torch

from . import __version__, evaluation
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_checkpoint_metadata
from .cli_points import holdout_fraction, point_set_from_args, points_note, refuse_point_flags_on_resume
from .config import DTYPES, FlowConfig
from .data import DATASETS, TOY_DATASETS, check_dataset_name
from .data.images import IMAGE_DATASETS, image_set_shape
from .data.point_files import looks_like_point_file
from .data.points import POINTS_DATA
from .devices import AUTO, resolve_device
from .distributed import init_from_environment
from .evaluation_policy import prepare_for_test
from .fileio import HOST_TAG, remove_stale_temporaries
from .flow import Flow
from .fused import COMPILER
from .imageio import atomic_write, colormap, write_png
from .memory_plan import plan_grad_accumulation
from .precision import PRECISIONS, arithmetic_statement, full_precision
from .presets import list_presets, load_preset
from .resources import (
    MAX_THREADS_PER_CORE,
    SEED_MAX,
    ResourceError,
    available_memory,
    check_disk,
    check_memory,
    check_training,
    max_threads,
    memory_budget,
    npy_bytes,
    points_bytes,
)
from .runlock import RunLock, RunLockedError
from .runtime import tune_allocator
from .training import TrainConfig, Trainer, TrainingError

__all__ = ["main"]

PROG = "monoflow"
#: Preset used for the 2-D densities when ``--preset`` is not given.
DEFAULT_TOY_PRESET = "paper-toy-monotone"
#: Preset used for ``--data staircase`` when ``--preset`` is not given.
DEFAULT_1D_PRESET = "paper-1d-d"
#: Preset used for each image set when ``--preset`` is not given.
DEFAULT_IMAGE_PRESETS = {
    "digits": "digits-cpu",
    "mnist": "paper-mnist",
    "cifar10": "paper-cifar10",
    "imagenet32": "paper-imagenet32",
    "imagenet64": "paper-imagenet64",
    "folder": "digits-cpu",
}
ALL_DATA = (*DATASETS, *IMAGE_DATASETS)
CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEBUG_ENV = "MONOFLOW_DEBUG"

#: Largest ``--temperature``: the paper samples at temperatures up to 1, and far beyond a few thousand the base
#: noise overflows the flow's inverse (1e300 gave all-NaN samples).
MAX_TEMPERATURE = 1000.0


class CLIError(Exception):
    """A user-facing error: printed as one ``monoflow: error:`` line, exit status ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``monoflow: error: ...``) instead of usage + message."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _describe_error(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        where = err.filename if err.filename is not None else ""
        return f"{where}: {err.strerror}" if where else err.strerror
    return str(err) or type(err).__name__


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _seed(text: str) -> int:
    """An argparse type: a seed in ``[0, SEED_MAX]`` (torch takes 64-bit seeds; the trainer adds offsets)."""
    value = _nonnegative_int(text)
    if value > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1 = {SEED_MAX}], got {text}")
    return value


def _threads(text: str) -> int:
    """An argparse type: a thread count of at most :data:`MAX_THREADS_PER_CORE` per core of this machine."""
    value = _positive_int(text)
    cap = max_threads()
    if value > cap:
        cores = os.cpu_count() or 1
        raise argparse.ArgumentTypeError(
            f"at most {cap} on this machine ({cores} CPU core{'s' if cores != 1 else ''}, {MAX_THREADS_PER_CORE} "
            f"threads per core), got {text}"
        )
    return value


def _temperature(text: str) -> float:
    """An argparse type: a temperature in ``(0, MAX_TEMPERATURE]``."""
    value = _finite_float(text)
    if not 0.0 < value <= MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must lie in (0, {MAX_TEMPERATURE:g}], got {text}")
    return value


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _require_regular_file(flag: str, path: str | os.PathLike[str], what: str) -> None:
    """Refuse a path that exists but is not a regular file, before anything opens it.

    Opening a FIFO blocks until a writer appears (the command would hang for ever), and a device can be endless
    (``/dev/zero``). A missing or unreadable path passes: the reader then reports it in its own words.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the path
        return
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
    raise CLIError(f"{flag} {path}: is {kind}, not a regular file; give {what}")


def _nonempty_path(flag: str, text: str) -> str:
    """``text`` unless it is empty or blank: ``Path("")`` means the current folder, which nobody names that way."""
    if not text.strip():
        raise CLIError(f"{flag}: empty path; name a folder or file (use '.' for the current folder)")
    return text


def _add_workers_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument(
        "--workers",
        type=_threads,
        default=1,
        metavar="W",
        help="threads evaluating chunks of 5,000 points in parallel, one intra-op thread each "
        f"(default 1; 2 used the 2-core development machine best){note}",
    )


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, shared by the subcommands that evaluate a checkpoint."""
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda or cuda:N")
    p.add_argument(
        "--threads",
        type=_threads,
        default=1,
        metavar="N",
        help=f"torch intra-op threads (default 1; at most {MAX_THREADS_PER_CORE} per core)",
    )


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _formulation(text: str) -> str | list[str]:
    """``monotone`` or a comma-separated list with one formulation per block (``residual,inverse_residual``)."""
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"invalid formulation list {text!r}")
    return parts[0] if len(parts) == 1 else parts


def _check_output_path(path: Path, suffixes: Sequence[str], what: str) -> str:
    """The lower-case suffix of ``path`` if allowed, and its folder exists; else a clear error (before work)."""
    if path.is_dir():
        raise CLIError(f"--out {path}: is a directory; give a file name ending in {' or '.join(suffixes)}")
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise CLIError(
            f"--out {path}: unsupported file type {path.suffix or '(none)'!r} for {what}; "
            f"use one of {', '.join(suffixes)}"
        )
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"--out {path}: cannot write there, folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CLIError(f"--out {path}: cannot write there, folder {parent} is not writable")
    return suffix


def _save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, buffer.getvalue())


class _NpyWriter:
    """A ``.npy`` file written piece by piece, for arrays too large to hold: the header first, then the rows.

    The bytes go to a temporary file next to the target, renamed over it by :meth:`commit`, so an interrupted or
    failed write (a full disk, non-finite samples, Ctrl-C) leaves no partial file and keeps an older one. Plain
    sequential writes rather than a memory map: a disk that fills up is then an ``OSError`` (ENOSPC), not a
    ``SIGBUS`` that kills the process. The file's bytes equal ``np.save`` of the whole array.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.size = math.prod(int(s) for s in shape)
        self.written = 0
        # Named as atomic_write names its temporary files, so that a write killed with SIGKILL (which no cleanup
        # survives) leaves a file the next write of the same target removes.
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{HOST_TAG}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
        self.tmp = Path(tmp)
        self._fh = os.fdopen(fd, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)}
        try:
            try:
                np.lib.format.write_array_header_1_0(self._fh, header)
            except ValueError:  # a header over 64 KiB needs format 2.0 (what np.save falls back to as well)
                np.lib.format.write_array_header_2_0(self._fh, header)
        except BaseException:
            self.abort()
            raise

    def write(self, values: np.ndarray) -> None:
        """Append ``values``' elements in C order, converted to the file's dtype (rows, or any run of elements)."""
        block = np.ascontiguousarray(values, dtype=self.dtype)
        if self.written + block.size > self.size:
            raise AssertionError(f"npy writer: {self.written + block.size} elements for a file of {self.size}")
        self._fh.write(block.data)  # the array's own buffer: no copy of a piece that may be hundreds of MB
        self.written += block.size

    def commit(self) -> None:
        """Flush, fsync and rename the file into place (every element must have been written)."""
        if self.written != self.size:
            raise AssertionError(f"npy writer: {self.written} of {self.size} elements written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close and remove the temporary file (idempotent)."""
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def _dtype(text: str) -> torch.dtype:
    """An argparse type: ``float32`` or ``float64``, the dtype that computes a command's output."""
    dtype = DTYPES.get(text.strip().lower())
    if dtype is None:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPES)}, got {text!r}")
    return dtype


def _add_dtype_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--dtype",
        type=_dtype,
        metavar="DT",
        help=f"float32 or float64: the dtype the output is computed in (default: {default}); the output states it",
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _picture_dtype(args: argparse.Namespace, flow: Flow) -> torch.dtype:
    """The dtype of samples and density grids: ``--dtype``, by default the flow's training dtype (float32 unless
    the run trained in float64). A picture or a sample set does not need float64's last digits; a reported
    likelihood does, and ``eval`` keeps float64 (:meth:`~monoflow_core.training.Trainer.evaluation_dtype`)."""
    return cast(torch.dtype, args.dtype) if args.dtype is not None else flow.dtype


def _png_text(dtype: torch.dtype) -> dict[str, str]:
    """The ``tEXt`` metadata of the command's pictures: the program and the dtype that computed the picture."""
    return {"Software": f"{PROG} {__version__}", "monoflow:dtype": _dtype_name(dtype)}


def _load(path: str, device: str, flag: str = "checkpoint") -> Checkpoint:
    _require_regular_file(flag, path, "a .safetensors checkpoint file")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device: invalid device {device!r} ({_one_line(str(err))}); e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {device!r} requested but CUDA is not available on this machine")
    return load_checkpoint(path, map_location=dev)


def _require_finite_weights(flow: Flow, path: Path) -> None:
    """Refuse a flow whose weights hold NaN or infinities (before a solver or a norm computation trips on them).

    Training never saves such weights (it rejects non-finite steps): a file holding them is damaged, and every
    sample, density or training step from it would be NaN.
    """
    for name, tensor in (*flow.named_parameters(), *flow.named_buffers()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CLIError(f"{path}: the weights hold NaN or infinite values ({name}); the checkpoint is damaged")


def _evaluation_flow(ckpt: Checkpoint) -> Flow:
    """The weights to evaluate: the EMA weights if the run kept them, with tightened power-iteration norms.

    The same preparation as every test (:func:`~monoflow_core.evaluation_policy.prepare_for_test`: eval mode,
    power-iterated spectral norms tightened). The checkpoint's flow is modified in place.
    """
    flow = ckpt.flow
    ema = ckpt.trainer_state.get("ema") if ckpt.trainer_state is not None else None
    if ema is not None:
        flow.load_state_dict(ema)
    _require_finite_weights(flow, ckpt.path)
    return prepare_for_test(flow)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------------------------------------------
# metrics.csv
# --------------------------------------------------------------------------------------------------------------


def _metrics_header(task: str) -> str:
    if task == "image":
        return "iteration,wall_seconds,train_bpd,test_bpd"
    last = "test_nll" if task == "density" else "test_mse"
    return f"iteration,wall_seconds,train_loss,{last}"


def _data_name(name: str) -> str:
    """Canonical name of any training data set (toy, staircase or image), or a CLI error listing them."""
    if isinstance(name, str) and name.lower() in IMAGE_DATASETS:
        return name.lower()
    if isinstance(name, str) and name.lower() in DATASETS:
        return check_dataset_name(name)
    if isinstance(name, str) and name and looks_like_point_file(name):
        return POINTS_DATA  # a file of the user's own 2-D points (cli_points)
    raise CLIError(
        f"--data: unknown data set {name!r}; choose one of {list(ALL_DATA)}, or give a .csv, .npy or "
        ".npz file of 2-D points"
    )


def _data_kind(data: str) -> str:
    """The kind of preset a canonical data name needs: ``"image"``, ``"2-D density"`` or ``"1-D staircase"``."""
    if data in IMAGE_DATASETS:
        return "image"
    return "2-D density" if data in TOY_DATASETS or data == POINTS_DATA else "1-D staircase"


def _default_preset(data: str) -> str:
    """The preset ``train`` uses for a canonical data name when ``--preset`` is not given."""
    if data in IMAGE_DATASETS:
        return DEFAULT_IMAGE_PRESETS[data]
    return DEFAULT_TOY_PRESET if data in TOY_DATASETS or data == POINTS_DATA else DEFAULT_1D_PRESET


def _preset_kind(preset: Any) -> str:
    data = str(preset.training.get("data", ""))
    if data in IMAGE_DATASETS or preset.model.get("image_shape") is not None:
        return "image"
    return "1-D staircase" if preset.model.get("dim", 2) == 1 else "2-D density"


class _MetricsFile:
    """``metrics.csv``: one row per test; each row is a single write, flushed at once (no torn files)."""

    def __init__(self, path: Path, task: str, resume_step: int | None) -> None:
        self.path = path
        self.header = _metrics_header(task)
        self.wall_offset = 0.0
        if resume_step is None or not path.exists():
            atomic_write(path, self.header + "\n")
            return
        lines = path.read_text().splitlines()
        if not lines or lines[0].strip() != self.header:
            raise CLIError(
                f"{path}: unexpected header {lines[0] if lines else '(empty file)'!r} (expected {self.header!r}); "
                "move the file away to resume"
            )
        kept = [lines[0]]
        for line in lines[1:]:
            if not line.strip():
                continue
            fields = line.split(",")
            try:
                iteration, wall = int(fields[0]), float(fields[1])
            except (ValueError, IndexError):
                raise CLIError(f"{path}: malformed row {line!r}; move the file away to resume") from None
            if iteration > resume_step:
                # Rows written after the checkpoint (a run killed between checkpoints) are replayed by the resumed
                # run, so they are dropped rather than duplicated.
                continue
            kept.append(line)
            self.wall_offset = wall
        if len(kept) != len(lines):
            atomic_write(path, "\n".join(kept) + "\n")

    def append(self, iteration: int, wall_seconds: float, train_loss: float, test_value: float) -> None:
        row = f"{iteration},{wall_seconds:.3f},{train_loss:.8g},{test_value:.8g}\n"
        with self.path.open("a") as fh:
            fh.write(row)
            fh.flush()


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------

_MODEL_FLAGS = (
    ("formulation", "formulation"),
    ("activation", "activation"),
    ("blocks", "blocks"),
    ("lipschitz", "lipschitz"),
    ("solver", "solver"),
    ("tol", "tol"),
)
_TRAIN_FLAGS = (
    ("iterations", "iterations"),
    ("batch_size", "batch_size"),
    ("lr", "lr"),
    ("seed", "seed"),
    ("device", "device"),
    ("eval_every", "eval_every"),
    ("eval_size", "eval_size"),
    ("checkpoint_every", "checkpoint_every"),
    ("test_size", "test_size"),
    ("data_dir", "data_dir"),
    ("grad_accumulation", "grad_accumulation"),
    ("precision", "precision"),
)


def _config_document(preset_name: str, description: str, trainer: Trainer) -> str:
    """``config.json``: shaped like a preset file, so ``--preset DIR/config.json`` repeats the run."""
    model = trainer.flow.config if trainer.flow.config is not None else trainer.model_config
    doc = {
        "name": preset_name,
        "description": description,
        "preset": preset_name,
        "monoflow_version": __version__,
        "model": model.to_dict(),
        "training": trainer.train_config.to_dict(),
        # What the run's "precision" resolved to on its device (docs/precision.md); presets ignore this key.
        "precision": trainer.precision.to_dict(),
    }
    return json.dumps(doc, indent=2) + "\n"


def _new_run(args: argparse.Namespace) -> tuple[Trainer, Path, str, str]:
    if args.data is None:
        raise CLIError(f"train: --data is required unless --resume is given; choose one of {list(ALL_DATA)}")
    data = _data_name(args.data)
    need, default = _data_kind(data), _default_preset(data)
    preset_name = args.preset or default
    if preset_name.endswith(".json"):  # load_preset opens only names ending in .json (or regular files)
        _require_regular_file("--preset", preset_name, "a preset name or a JSON file")
    try:
        preset = load_preset(preset_name)
    except UnicodeDecodeError as err:  # a ValueError, but one that names neither the file nor the flag
        raise CLIError(f"--preset {preset_name}: not a UTF-8 text file ({err.reason} at byte {err.start})") from None
    kind = _preset_kind(preset)
    if kind != need:
        raise CLIError(
            f"--preset {preset_name!r} is a {kind} preset and cannot train on --data {data!r}: use a {need} preset "
            f"such as {default!r}, or omit --preset"
        )
    model_changes = {key: getattr(args, attr) for attr, key in _MODEL_FLAGS if getattr(args, attr) is not None}
    train_changes: dict[str, Any] = {
        key: getattr(args, attr) for attr, key in _TRAIN_FLAGS if getattr(args, attr) is not None
    }
    train_changes["data"] = data
    if need == "image" and args.test_size is not None:
        train_changes["eval_size"] = args.test_size  # images: every test uses eval_size images of the test split
    if need == "1-D staircase" and args.test_size is not None:
        # The trainer's fixed regression test set has eval_size points (the paper's 10,000 for both tests).
        if args.eval_size is not None and args.eval_size != args.test_size:
            raise CLIError(
                "--test-size and --eval-size: the staircase task uses one test size for the fixed and the fresh "
                f"tests; got {args.test_size} and {args.eval_size}"
            )
        train_changes["eval_size"] = args.test_size
    model_config = preset.model_config(**model_changes)
    # The device: --device, or the faster one for this task (monoflow_core.devices); said on stderr.
    device, reason = resolve_device(args.device, model_config)
    train_changes["device"] = device
    train_config = preset.train_config(**train_changes)
    args.device_reason = reason  # said when training starts (errors before that stay one line)
    source = f"preset {preset_name!r}"
    _check_seeds(train_config, source)
    train_config, unfit = _plan_memory(args, model_config, train_config)

    out = Path(_nonempty_path("--out", args.out))
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    _check_folder_free(args, out, None)
    # Before the trainer loads data or builds the model: a request that cannot fit is refused while nothing has
    # been spent (the folder is not even created yet).
    _check_training_resources(args, model_config, train_config, source)
    if unfit is not None:  # the coarser checks above passed, but not even one image per micro-batch fits
        raise unfit
    points = point_set_from_args(args, data, train_config)
    trainer = Trainer(model_config, train_config, points=points)
    return trainer, out, preset.name, preset.description


def _plan_memory(
    args: argparse.Namespace, model: FlowConfig, train: TrainConfig
) -> tuple[TrainConfig, ResourceError | None]:
    """Image runs without ``--grad-accumulation``: split each batch into as many micro-batches as the device's
    memory needs (:func:`~monoflow_core.memory_plan.plan_grad_accumulation`), said when training starts.

    Returns the training configuration and, when not even one image per micro-batch fits, the error to raise once
    the other resource checks (whose messages name a too-large model or images first) have passed.
    """
    if train.task != "image" or args.grad_accumulation is not None:
        return train, None
    budget = memory_budget(train.device) if torch.device(train.device).type == "cuda" else available_memory()
    if budget is None:
        return train, None
    c, h, w = image_set_shape(train.data, train.data_dir)
    try:
        plan = plan_grad_accumulation(model.replace(image_shape=[c, h, w]), train, budget)
    except ResourceError as err:
        return train, err
    if plan.grad_accumulation == train.grad_accumulation:
        return train, None
    args.memory_note = f"memory: {plan.describe()}"
    return train.replace(grad_accumulation=plan.grad_accumulation), None


def _check_seeds(config: TrainConfig, source: str) -> None:
    """Refuse seeds beyond 64 bits coming from a preset or checkpoint (the flags are checked when parsed): torch
    would fail deep in the run with an ``OverflowError`` that names no setting."""
    for field_name, advice in (("seed", "; override it with --seed"), ("test_seed", "")):
        value = getattr(config, field_name)
        if value > SEED_MAX:
            raise CLIError(
                f"{field_name} {value} (from the {source}): must be an integer in [0, 2**63 - 1 = {SEED_MAX}]{advice}"
            )


def _check_folder_free(args: argparse.Namespace, out: Path, source: Path | None) -> None:
    """Refuse to overwrite a checkpoint in ``out`` without ``--force`` (``source``: the checkpoint resumed).

    Checked before the run is set up, and again once the folder is locked: another run may have written its
    first checkpoint in between.
    """
    target = out / CHECKPOINT_NAME
    if args.force or not target.exists():
        return
    if source is None:
        raise CLIError(
            f"--out {out}: already holds a checkpoint ({target}); continue it with "
            f"'monoflow train --resume {target} --iterations N', or pass --force to start over and overwrite it"
        )
    if target.resolve() != source.resolve():
        raise CLIError(
            f"--out {out}: already holds another checkpoint ({target}); choose another folder or pass --force "
            "to overwrite it"
        )


def _setting(args: argparse.Namespace, attr: str, flag: str, value: Any, source: str) -> str:
    """How a message names a setting: the flag as given (``--batch-size 64``), or its value and origin."""
    given = getattr(args, attr, None)
    if given is not None:
        return f"{flag} {given}"
    return f"{attr} {value} (from the {source}; override it with {flag})"


def _check_training_resources(args: argparse.Namespace, model: FlowConfig, train: TrainConfig, source: str) -> None:
    """Refuse a run whose model, batch or tests cannot fit in memory (:func:`resources.check_training`).

    Image runs learn their image shape from the data first (headers only: no image is decoded), so that a
    folder of large photos is refused by the size of the model it would need.
    """
    labels = {
        "blocks": _setting(args, "blocks", "--blocks", model.blocks, source),
        "batch_size": _setting(args, "batch_size", "--batch-size", train.batch_size, source),
        "eval_size": _setting(args, "eval_size", "--eval-size", train.eval_size, source),
        "test_size": _setting(args, "test_size", "--test-size", train.test_size, source),
    }
    hints: dict[str, str] = {}
    if train.task == "regression" and args.test_size is not None:
        labels["eval_size"] = f"--test-size {args.test_size}"  # the staircase's one test size
    if train.task == "image":
        c, h, w = image_set_shape(train.data, train.data_dir)
        model = model.replace(image_shape=[c, h, w])
        where = f" in {train.data_dir}" if train.data_dir else ""
        labels["blocks"] = f"--data {train.data} (images of {w} x {h} pixels, {c} channel{'s' if c > 1 else ''}{where})"
        hints["blocks"] = (
            "resize the images (the shipped image models train on 8 x 8 to 64 x 64 pixels) or use a smaller model"
        )
    check_training(model, train, labels, hints=hints)


def _check_unchanged(args: argparse.Namespace, trainer: Trainer, preset_name: str | None) -> None:
    """On ``--resume``, refuse flags that would change the architecture or the data stream."""
    model = trainer.model_config
    tc = trainer.train_config
    refuse_point_flags_on_resume(args)
    checks: list[tuple[str, Any, Any]] = []
    if args.data is not None:
        checks.append(("--data", _data_name(args.data), tc.data))
    if args.preset is not None:
        checks.append(("--preset", args.preset, preset_name))
    if args.formulation is not None:
        given = args.formulation if isinstance(args.formulation, list) else [args.formulation] * model.blocks
        checks.append(("--formulation", [f.lower() for f in given], model.formulations()))
    if args.activation is not None:
        checks.append(("--activation", args.activation.lower(), model.activation))
    for flag, attr, stored in (
        ("--blocks", "blocks", model.blocks),
        ("--lipschitz", "lipschitz", model.lipschitz),
        ("--batch-size", "batch_size", tc.batch_size),
        ("--seed", "seed", tc.seed),
        ("--test-size", "test_size", tc.test_size),
    ):
        if getattr(args, attr) is not None:
            checks.append((flag, getattr(args, attr), stored))
    for flag, given, stored in checks:
        if given != stored:
            raise CLIError(
                f"{flag}: cannot change when resuming (the checkpoint's run uses {stored!r}, got {given!r}); "
                "start a new run in another --out folder instead. On resume only --iterations, --lr, --solver, "
                "--tol, --precision, --eval-every, --eval-size, --checkpoint-every, --device and --threads may "
                "change"
            )


def _apply_resume_changes(args: argparse.Namespace, trainer: Trainer) -> None:
    """The flags that may change on ``--resume`` (iterations, test settings, lr, solver), applied to ``trainer``.

    Shared by rank 0 (:func:`_resume_run`) and the other data-parallel processes (:func:`_train_worker`), so
    that every process takes the same optimizer steps.
    """
    cfg = trainer.train_config
    for attr in ("iterations", "eval_every", "eval_size", "checkpoint_every"):
        value = getattr(args, attr)
        if value is not None:
            setattr(cfg, attr, value)
    cfg.validate()
    if args.lr is not None:
        trainer.set_lr(args.lr)
        cfg.lr = trainer.base_lr  # so config.json and the checkpoint record the rate now in use
    if args.solver is not None or args.tol is not None:
        # Validate with the configuration's rules (tol in (0, 1), a known solver) before changing the blocks.
        checked = trainer.model_config.replace(
            **{k: v for k, v in (("solver", args.solver), ("tol", args.tol)) if v is not None}
        )
        trainer.set_solver(
            solver=checked.solver if args.solver is not None else None,
            tol=checked.tol if args.tol is not None else None,
        )
    if args.precision is not None:
        trainer.set_precision(args.precision)


def _resume_run(args: argparse.Namespace) -> tuple[Trainer, Path, str, str]:
    source = Path(_nonempty_path("--resume", args.resume))
    out = Path(_nonempty_path("--out", args.out)) if args.out is not None else source.parent
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    _require_regular_file("--resume", source, "a .safetensors checkpoint file")
    ckpt = load_checkpoint(source)
    _require_finite_weights(ckpt.flow, source)
    # Without --device a resumed run stays on the checkpoint's device; --device auto picks one for its task.
    device = None
    if args.device is not None:
        device, args.device_reason = resolve_device(args.device, ckpt.model_config)
    trainer = Trainer.from_checkpoint(ckpt, device=device)
    stored_user = ckpt.metadata.get("user")
    user: dict[str, Any] = stored_user if isinstance(stored_user, dict) else {}
    preset_name = str(user.get("preset", "")) or None
    description = str(user.get("description", ""))
    _check_unchanged(args, trainer, preset_name)
    _apply_resume_changes(args, trainer)
    cfg = trainer.train_config
    if trainer.task != "image":
        # The model is loaded already; the tests' points are not (image tests are capped by their split). The
        # sizes come from --eval-size or from the checkpoint, whose header may have been edited.
        sizes = [("eval_size", "--eval-size", "a fresh-sample test")]
        if trainer.task == "density":
            sizes.append(("test_size", "--test-size", "the fixed held-out test"))
        for attr, flag, what in sizes:
            n = getattr(cfg, attr)
            label = f"{flag} {n}" if getattr(args, attr) is not None else f"{attr} {n} (from the checkpoint {source})"
            check_memory(label, points_bytes(n, trainer.flow.dim), what, hint=f"use a smaller {flag}")
    _check_seeds(cfg, f"checkpoint {source}")
    _check_folder_free(args, out, source)
    # The folder is created only once there is work to do (_cmd_train): a no-op resume leaves no trace.
    return trainer, out, preset_name or "(unknown preset)", description


@contextlib.contextmanager
def _streaming(writer: _NpyWriter | None, bar: Any) -> Iterator[None]:
    """The body streams pieces into ``writer`` (if any): commit the file when it finishes, abort it (no partial
    file is left) when it raises or is interrupted, and close the progress bar either way."""
    try:
        yield
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()


@contextlib.contextmanager
def _graceful_sigint(on_first: Callable[[], None]) -> Iterator[None]:
    """First Ctrl-C: ``on_first()`` (finish the current iteration, then stop); second: KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal pressed
        if pressed:
            raise KeyboardInterrupt
        pressed = True
        on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _configured_device(args: argparse.Namespace) -> str:
    """The device a ``train`` run uses without ``--device``: the checkpoint's (``--resume``) or the preset's.

    Only needed under ``torchrun`` (``WORLD_SIZE`` > 1), where the device picks the backend (nccl / gloo) and each
    process's GPU before the run is built; a plain run takes it from the preset or checkpoint as usual. Falling
    back to ``"cpu"`` there would silently train a CUDA preset (paper-mnist, paper-cifar10, ...) on the CPU.
    Anything unreadable gives ``"cpu"``; the run itself then reports the problem.

    Raises:
        CLIError: the configured device is CUDA and this machine has none (as a plain run would report).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return "cpu"
    device = "cpu"
    try:
        if args.resume:
            # the header alone: no tensors are read to learn one string
            stored = read_checkpoint_metadata(Path(args.resume))["train_config"]
            device = str(stored.get("device", "cpu")) if isinstance(stored, dict) else "cpu"
        elif args.data is not None:
            default = _default_preset(_data_name(args.data))
            device = str(load_preset(args.preset or default).training.get("device", "cpu"))
        cuda = torch.device(device).type == "cuda"
    except (CLIError, CheckpointError, ValueError, OSError, RuntimeError):
        return "cpu"
    if cuda and not torch.cuda.is_available():
        raise CLIError(
            f"device: {device!r} requested (by the preset or checkpoint) but CUDA is not available on "
            "this machine; pass --device cpu"
        )
    return device


def _cmd_train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    # Under torchrun: join the process group; every process trains, only rank 0 writes and prints.
    requested = None if args.device is not None and args.device.strip().lower() == AUTO else args.device
    dist_context, device = init_from_environment(requested or _configured_device(args))
    if dist_context.active:
        args.device = device
        args.no_progress = args.no_progress or not dist_context.is_main
        if not dist_context.is_main:
            return _train_worker(args)
    resuming = args.resume is not None  # --resume "" is an error of its own, not a new run
    trainer, out, preset_name, description = _resume_run(args) if resuming else _new_run(args)
    start, target = trainer.step_count, trainer.train_config.iterations
    if resuming and start >= target:
        print(
            f"the checkpoint is already at iteration {start} (--iterations {target}): nothing to train; "
            "pass a larger --iterations to continue",
            file=sys.stderr,
        )
        return EXIT_OK
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    try:
        lock.acquire()
    except RunLockedError as err:
        raise CLIError(f"{'--out' if args.out is not None else '--resume'} {err}") from None
    with lock:
        if lock.warning:
            print(f"warning: {lock.warning}", file=sys.stderr)
        # Again under the lock: a run that held the folder a moment ago may have left its checkpoint here.
        _check_folder_free(args, out, Path(args.resume) if resuming else None)
        return _train_in_folder(args, trainer, out, preset_name, description)


def _train_in_folder(args: argparse.Namespace, trainer: Trainer, out: Path, preset_name: str, description: str) -> int:
    """The training loop of :func:`_cmd_train`, writing into ``out`` (created and locked by the caller)."""
    cfg = trainer.train_config
    task = trainer.task
    ckpt_path = out / CHECKPOINT_NAME
    start = trainer.step_count
    target = cfg.iterations
    metrics = _MetricsFile(out / METRICS_NAME, task, start if args.resume else None)
    atomic_write(out / CONFIG_NAME, _config_document(preset_name, description, trainer))
    metadata = {"preset": preset_name, "description": description}
    loss_unit = {"density": "nats", "image": "bits/dim"}.get(task, "MSE")

    stop = False
    pending: list[float] = []
    t0 = time.perf_counter()

    def wall() -> float:
        return metrics.wall_offset + time.perf_counter() - t0

    last_mean = [math.nan]

    def mean_pending() -> float:
        # Mean training loss since the previous row; a row with no new iteration repeats the previous mean.
        if pending:
            last_mean[0] = sum(pending) / len(pending)
            pending.clear()
        return last_mean[0]

    from tqdm import tqdm

    print(
        f"training {cfg.data} from preset {preset_name} "
        f"({'resuming at' if args.resume else 'starting at'} iteration {start}, target {target}) into {out}",
        file=sys.stderr,
    )
    reason = getattr(args, "device_reason", "requested" if args.device else "the checkpoint's")
    print(f"device: {trainer.device} ({reason})", file=sys.stderr)
    if getattr(args, "memory_note", None):
        print(args.memory_note, file=sys.stderr)
    if trainer.points is not None:
        print(f"points: {trainer.points.describe()}", file=sys.stderr)
    print(trainer.precision.describe(), file=sys.stderr)
    bar = tqdm(
        total=target,
        initial=start,
        desc=f"train {cfg.data}",
        unit="it",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=args.no_progress,
    )

    def note(text: str) -> None:
        if args.no_progress:
            print(text, file=sys.stderr)
        else:
            bar.write(text, file=sys.stderr)

    def request_stop() -> None:  # runs in the signal handler: only set a flag (no I/O, no locks)
        nonlocal stop
        stop = True

    def callback(step: Any, ev: Any) -> bool | None:
        if math.isfinite(step.loss):
            pending.append(step.loss)
        if step.rejected:
            note(f"warning: {step.message}")
        bar.update(1)
        bar.set_postfix_str(f"loss {step.loss:.4f} {loss_unit}", refresh=False)
        if ev is not None:
            metrics.append(trainer.step_count, wall(), mean_pending(), ev.value)
            note(ev.describe() + f" ({ev.seconds:.2f} s)")
        if stop:
            note("Ctrl-C: stopping after this iteration and saving the checkpoint (press Ctrl-C again to stop at once)")
            return False
        return None

    interrupted = False
    summary = None
    try:
        with _graceful_sigint(request_stop):
            # Periodic checkpoints, and one when the run ends or Ctrl-C stops it, are Trainer.run's job.
            summary = trainer.run(target - start, callback, checkpoint_path=ckpt_path, checkpoint_metadata=metadata)
        interrupted = summary.stopped_early
    except KeyboardInterrupt:  # a second Ctrl-C, inside a step: Trainer.run did not get to save
        interrupted = True
    except TrainingError as err:
        bar.close()
        saved = f"; the last periodic checkpoint is {ckpt_path}" if ckpt_path.exists() else ""
        raise CLIError(f"{_one_line(str(err))}{saved}", code=EXIT_FAILURE) from None
    finally:
        bar.close()

    seconds = time.perf_counter() - t0
    steps_run = trainer.step_count - start
    if interrupted:
        if summary is None:
            trainer.save_checkpoint(ckpt_path, metadata=metadata)
        print(
            f"interrupted at iteration {trainer.step_count} of {target} after {seconds:.1f} s; "
            f"checkpoint saved to {ckpt_path}",
            file=sys.stderr,
        )
        print(f"resume with: monoflow train --resume {ckpt_path} --iterations {target}", file=sys.stderr)
        return EXIT_INTERRUPTED

    rate = steps_run / seconds if seconds > 0 else math.inf
    plural = "" if steps_run == 1 else "s"
    print(
        f"trained {_fmt_int(steps_run)} iteration{plural} in {seconds:.1f} s ({rate:.1f} it/s); "
        f"iteration {trainer.step_count} of {target}"
    )
    if summary is not None and summary.paper_protocol is not None and task != "image":
        what = "test NLL" if task == "density" else "test MSE"
        unit = " nats" if task == "density" else ""
        print(
            f"paper protocol: {what} {summary.paper_protocol:.4f}{unit} (mean of the last "
            f"{summary.paper_protocol_tests} fresh-sample tests of {_fmt_int(cfg.eval_size)} points)"
        )
    try:
        final = trainer.evaluate(fixed=True, record=True)
    except KeyboardInterrupt:
        print(f"interrupted during the final test; checkpoint saved to {ckpt_path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    metrics.append(trainer.step_count, wall(), mean_pending(), final.value)
    trainer.save_checkpoint(ckpt_path, metadata=metadata)  # now with the final test in its metadata
    print(_describe_test(final, cfg.data))
    print(f"wrote {out / CONFIG_NAME}, {out / METRICS_NAME} and {ckpt_path}")
    return EXIT_OK


def _train_worker(args: argparse.Namespace) -> int:
    """A data-parallel process other than rank 0: the same steps, no files, no output (rank 0 writes them)."""
    if args.resume:
        trainer = Trainer.from_checkpoint(load_checkpoint(Path(args.resume)), device=args.device)
        # As rank 0 does: a new --lr (or --tol, --solver) must reach every process, else the ranks' Adam steps
        # differ and their parameters drift apart.
        _apply_resume_changes(args, trainer)
    else:
        data = _data_name(args.data)
        preset = load_preset(args.preset or _default_preset(data))
        model_changes = {key: getattr(args, attr) for attr, key in _MODEL_FLAGS if getattr(args, attr) is not None}
        train_changes = {key: getattr(args, attr) for attr, key in _TRAIN_FLAGS if getattr(args, attr) is not None}
        train_changes["data"] = data
        train_config = preset.train_config(**train_changes)
        trainer = Trainer(
            preset.model_config(**model_changes), train_config, points=point_set_from_args(args, data, train_config)
        )
    trainer.run(max(0, trainer.train_config.iterations - trainer.step_count))
    return EXIT_OK


def _describe_test(ev: Any, data: str) -> str:
    if ev.bpd is not None:
        return f"{ev.describe()}; {ev.dtype}; {ev.seconds:.2f} s"
    points = f"{_fmt_int(ev.n_test)} {'held-out' if data == POINTS_DATA else f'fixed {data}'} points"
    if ev.nll_nats is not None:
        err = f" +- {ev.nll_stderr_nats:.4f}" if ev.nll_stderr_nats is not None else ""
        logdet = "exact log-det" if ev.exact else "estimated log-det (unbiased, stochastic)"
        return f"test NLL {ev.nll_nats:.4f}{err} nats ({points}, {logdet}, {ev.dtype}; {ev.seconds:.2f} s)"
    return f"test MSE {ev.mse:.4g} ({points}, {ev.dtype}; {ev.seconds:.2f} s)"


# --------------------------------------------------------------------------------------------------------------
# eval / sample / density / presets
# --------------------------------------------------------------------------------------------------------------


def _cmd_eval(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    ckpt = _load(args.checkpoint, args.device)
    stored = ckpt.train_config
    if args.data is not None:
        data = _data_name(args.data)
    elif stored is not None:
        data = stored.data
    else:
        raise CLIError(
            f"{args.checkpoint}: holds a flow only (no training configuration); pass --data NAME, one of "
            f"{list(ALL_DATA)}"
        )
    if data == POINTS_DATA and (args.data is not None or ckpt.points is None):
        raise CLIError(
            f"--data {args.data}: a run on your own points is tested on the held-out points stored in "
            "its checkpoint; omit --data"
            if ckpt.points is not None
            else f"--data {args.data}: {args.checkpoint} holds no points of its own (only checkpoints of runs "
            "on a point file do)"
        )
    if args.split is not None and data not in IMAGE_DATASETS:
        raise CLIError(
            f"--split {args.split}: only image data sets have splits; {data!r} is tested on its fixed, seeded "
            "held-out set (choose it with --seed and --test-size)"
        )
    flow = _evaluation_flow(ckpt)
    if stored is not None:
        base = stored
    else:
        dtype = str(ckpt.metadata.get("dtype", "float32"))
        base = TrainConfig(data=data, dtype=dtype if dtype in DTYPES else "float32")
    changes: dict[str, Any] = {"data": data, "device": args.device, "ema": None}
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.split is not None:
        changes["eval_split"] = args.split
    if args.seed is not None:
        changes["test_seed"] = args.seed
    if args.test_size is not None:
        changes["eval_size" if data in ("staircase", *IMAGE_DATASETS) else "test_size"] = args.test_size
    elif data in IMAGE_DATASETS:
        changes["eval_size"] = 10**9  # the whole split
    test_config = base.replace(**changes)
    if test_config.test_seed > SEED_MAX:
        raise CLIError(
            f"test_seed {test_config.test_seed} (from the checkpoint {args.checkpoint}): must be an integer "
            f"in [0, 2**63 - 1 = {SEED_MAX}]; override it with --seed"
        )
    if data not in IMAGE_DATASETS:  # image tests are capped by their split, which is loaded anyway
        n = test_config.test_size if test_config.task == "density" else test_config.eval_size
        label = (
            f"--test-size {args.test_size}"
            if args.test_size is not None
            else (f"test_size {n} (the run's; override it with --test-size)")
        )
        # the evaluation copy (float64 by default)
        copy = sum(t.numel() for t in (*flow.parameters(), *flow.buffers())) * 8
        check_memory(label, points_bytes(n, flow.dim) + copy, "the held-out test", hint="use a smaller --test-size")
    # The trainer's evaluate() is the one implementation of the held-out test (float64 copy, seeded).
    trainer = Trainer(ckpt.model_config, test_config, flow=flow, points=ckpt.points if data == POINTS_DATA else None)
    result = trainer.evaluate(fixed=True, dtype=args.dtype)
    with full_precision():  # the arithmetic evaluate() ran in (docs/precision.md)
        arith = arithmetic_statement(getattr(torch, result.dtype), trainer.device)
    step = ckpt.metadata.get("step")
    if isinstance(step, int):
        # The evaluation trainer starts at step 0; report the checkpoint's iteration (image results print it).
        result.step = step
    if args.json:
        doc: dict[str, Any] = {"data": data}
        if result.bpd is not None:
            doc["bpd"] = _jsonable(result.bpd)
            doc["bpd_stderr"] = _jsonable(result.bpd_stderr)
            doc["split"] = result.split
            doc["dequantization"] = result.dequantization
            doc["nll_nats"] = _jsonable(result.nll_nats)
        elif result.nll_nats is not None:
            doc["nll_nats"] = _jsonable(result.nll_nats)
            doc["nll_stderr_nats"] = _jsonable(result.nll_stderr_nats)
        else:
            doc["mse"] = _jsonable(result.mse)
        if ckpt.points is not None and result.nll_nats is not None:
            doc["points"] = {
                "source": ckpt.points.source,
                "mean": ckpt.points.mean.tolist(),
                "scale": ckpt.points.scale.tolist(),
                "log_scale": ckpt.points.log_scale,
                "nll_nats_data_units": _jsonable(result.nll_nats + ckpt.points.log_scale),
            }
        doc.update(
            {
                "n_test": result.n_test,
                "seconds": result.seconds,
                "exact": result.exact,
                "test_seed": test_config.test_seed,
                "dtype": result.dtype,
                "precision": arith,
                "step": step,
                "checkpoint": str(args.checkpoint),
            }
        )
        print(json.dumps(doc, allow_nan=False))
    else:
        at = f" at iteration {step}" if step is not None else ""
        print(f"{args.checkpoint}{at}: {_describe_test(result, data)} [test seed {test_config.test_seed}]")
        if ckpt.points is not None and result.nll_nats is not None:
            print(
                f"points: {ckpt.points.describe()}; in the data's units the test NLL is "
                f"{result.nll_nats + ckpt.points.log_scale:.4f} nats"
            )
    return EXIT_OK


def _progress(total: int, unit: str, desc: str, piece: int | None = None) -> Any:
    """A progress bar on stderr for work of more than one piece (default size: ``evaluation.PIECE_POINTS``); a
    single piece is done at once, and a bar would only add lines to the output."""
    from tqdm import tqdm

    piece = evaluation.PIECE_POINTS if piece is None else piece
    return tqdm(
        total=total, unit=unit, desc=desc, file=sys.stderr, dynamic_ncols=True, unit_scale=True, disable=total <= piece
    )


def _refuse_non_finite(values: np.ndarray, done: int, what: str, cause: str) -> None:
    """Stop with exit status 1 if ``values`` hold a NaN or an infinity: never report success for such output."""
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise CLIError(
            f"{bad:,} of the first {done + values.shape[0]:,} {what} are not finite (NaN or infinite: {cause}); "
            "nothing was written",
            code=EXIT_FAILURE,
        )


def _numpy_dtype(dtype: torch.dtype) -> np.dtype[Any]:
    return torch.empty(0, dtype=dtype).numpy().dtype


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
    from .multiscale import quantize

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


def _cmd_warmup(args: argparse.Namespace) -> int:
    from .kernel_cache import kernel_cache_dir
    from .warmup import warm_up

    dtypes = [args.dtype] if args.dtype is not None else [torch.float32, torch.float64]
    results = warm_up(dtypes, train=not args.solve_only)
    if not results:
        print(
            f"{PROG}: the compiled kernels are unavailable here (Numba or a BLAS is missing, or MONOFLOW_KERNELS=0); "
            "nothing to prepare: the PyTorch kernels serve",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    for r in results:
        what = "training and solver" if r.kit == "train" else "solver"
        state = "ready" if r.ready else "FAILED (the PyTorch kernels serve instead)"
        print(f"{_dtype_name(r.dtype)} {what} kernels: {state} ({r.seconds:.1f} s)")
    print(f"cache folder: {kernel_cache_dir()}")
    return EXIT_OK if all(r.ready for r in results) else EXIT_FAILURE


def _cmd_presets(args: argparse.Namespace) -> int:
    presets = list_presets()
    if not presets:
        print("no presets found", file=sys.stderr)
        return EXIT_FAILURE
    width = max(len(p.name) for p in presets)
    for p in presets:
        print(f"{p.name:<{width}}  {p.description}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# the parser
# --------------------------------------------------------------------------------------------------------------

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
--iterations, --lr, --solver, --tol, --precision, --eval-every, --eval-size, --checkpoint-every, --device and
--threads may change on resume.

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


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _kernel_notice(text: str) -> None:
    """Print a notice of the compiled kernels (``monoflow_core.fused.COMPILER.notice``) on stderr, above any
    progress bar."""
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr)


def _error(message: str, stream: TextIO | None = None) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=stream or sys.stderr)


def _out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` reports exhausted memory: Python's, torch's CPU allocator's or a CUDA device's."""
    if isinstance(err, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(err)
    return "can't allocate memory" in text or "not enough memory" in text


def main(argv: list[str] | None = None) -> int:
    """Run the ``monoflow`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0: success; 1: training diverged or nothing to list; 2: a user error (one ``monoflow: error:`` line on
    stderr); 130: interrupted by Ctrl-C (a training run saves its checkpoint first).
    """
    tune_allocator()  # mid-sized temporaries from the heap, not fresh mmaps (monoflow_core.runtime)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CLIError as err:
        _error(str(err))
        return err.code
    except SystemExit as exc:  # --help, --version
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_USAGE)
    if args.command == "train" and args.resume is None and args.out is None:
        _error("train: --out DIR is required for a new run (see 'monoflow train --help')")
        return EXIT_USAGE
    debug = bool(os.environ.get(DEBUG_ENV))
    previous_notice = COMPILER.notice
    COMPILER.notice = _kernel_notice  # say when the kernels are compiled, and when they are ready
    try:
        return int(args.handler(args))
    except CLIError as err:
        if debug:
            raise
        _error(str(err))
        return err.code
    except (CheckpointError, ValueError, OSError) as err:
        if debug:
            raise
        _error(_describe_error(err))
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as err:
        # Sizes are checked up front (monoflow_core.resources), but those checks are estimates: a request that
        # passed them and still exhausted memory is reported as such, in one line, rather than as a crash.
        if debug or not _out_of_memory(err):
            raise
        _error(
            f"out of memory ({_one_line(str(err)) or type(err).__name__}); use smaller sizes (--n, --batch-size, "
            "--test-size, --resolution, ...)"
        )
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        COMPILER.notice = previous_notice


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
