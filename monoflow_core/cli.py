"""The ``monoflow`` command: train, evaluate, sample from and draw Monotone Flows from the shell.

Subcommands (``monoflow SUBCOMMAND --help`` for each):

* ``train``: train on a toy density, the 1-D staircase or images from a shipped preset (the paper's protocols,
  ALGORITHM.md 7.1 / 7.2 / 7.3), with flags overriding the preset; writes ``config.json``, ``metrics.csv`` and a
  resumable ``checkpoint.safetensors`` into an output folder; Ctrl-C saves a checkpoint and exits 130. Under
  ``torchrun`` it trains data-parallel (:mod:`monoflow_core.distributed`).
* ``eval``: test NLL in nats (test MSE for the staircase, bits/dim for images) on the fixed, seeded test set.
* ``sample``: model samples as ``.npy``, a 2-D histogram ``.png`` or, for images, a ``.png`` sample grid.
* ``density``: the log-density on a grid as ``.npy`` or a heat map ``.png``.
* ``presets``: the shipped presets.

The command adds no mathematics: it drives :class:`~monoflow_core.training.Trainer` and the functions of
:mod:`monoflow_core.evaluation`. User mistakes (a missing or corrupt file, an unknown name, a value out of range,
an unwritable path) end with one line ``monoflow: error: ...`` on stderr and exit status 2; anything else is a
bug and keeps its traceback (set ``MONOFLOW_DEBUG=1`` to get tracebacks for user errors too).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np
import torch

from . import __version__, evaluation
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, read_checkpoint_metadata
from .data import DATASETS, TOY_DATASETS, check_dataset_name
from .data.images import IMAGE_DATASETS
from .distributed import init_from_environment
from .flow import Flow
from .imageio import atomic_write, colormap, write_png
from .nn.lipschitz import update_lipschitz
from .presets import list_presets, load_preset
from .runtime import tune_allocator
from .training import DTYPES, EVAL_POWER_ITERATIONS, TrainConfig, Trainer, TrainingError

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


def _add_workers_option(p: argparse.ArgumentParser, note: str = "") -> None:
    p.add_argument("--workers", type=_positive_int, default=1, metavar="W",
                   help="threads evaluating chunks of 5,000 points in parallel, one intra-op thread each "
                        f"(default 1; 2 used the 2-core development machine best){note}")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--threads``, shared by the subcommands that evaluate a checkpoint."""
    p.add_argument("--device", default="cpu", metavar="D", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=_positive_int, default=1, metavar="N", help="torch intra-op threads (default 1)")


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


def _eval_dtype(device: torch.device, flow: Flow) -> torch.dtype:
    # As the Trainer does: float64 on the CPU (about as fast as float32 there and every solve converges),
    # the flow's own dtype elsewhere and for image flows (float64 convolutions are slow on CPUs).
    if getattr(flow, "levels", None) is not None:
        return flow.dtype
    return torch.float64 if device.type == "cpu" else flow.dtype


def _load(path: str, device: str) -> Checkpoint:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise CLIError(f"--device: invalid device {device!r} ({_one_line(str(err))}); e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device: {device!r} requested but CUDA is not available on this machine")
    return load_checkpoint(path, map_location=dev)


def _evaluation_flow(ckpt: Checkpoint) -> Flow:
    """The weights to evaluate: the EMA weights if the run kept them, with tightened power-iteration norms.

    Mirrors :meth:`Trainer.evaluate` (EMA copy, then ``EVAL_POWER_ITERATIONS`` power iterations on layers in
    ``"power"`` spectral mode; exact-mode layers are untouched). The checkpoint's flow is modified in place.
    """
    flow = ckpt.flow
    ema = ckpt.trainer_state.get("ema") if ckpt.trainer_state is not None else None
    if ema is not None:
        flow.load_state_dict(ema)
    update_lipschitz(flow, EVAL_POWER_ITERATIONS)
    return flow.eval()


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
    raise CLIError(f"--data: unknown data set {name!r}; choose one of {list(ALL_DATA)}")


def _data_kind(data: str) -> str:
    """The kind of preset a canonical data name needs: ``"image"``, ``"2-D density"`` or ``"1-D staircase"``."""
    if data in IMAGE_DATASETS:
        return "image"
    return "2-D density" if data in TOY_DATASETS else "1-D staircase"


def _default_preset(data: str) -> str:
    """The preset ``train`` uses for a canonical data name when ``--preset`` is not given."""
    if data in IMAGE_DATASETS:
        return DEFAULT_IMAGE_PRESETS[data]
    return DEFAULT_TOY_PRESET if data in TOY_DATASETS else DEFAULT_1D_PRESET


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

_MODEL_FLAGS = (("formulation", "formulation"), ("activation", "activation"), ("blocks", "blocks"),
                ("lipschitz", "lipschitz"), ("solver", "solver"), ("tol", "tol"))
_TRAIN_FLAGS = (("iterations", "iterations"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                ("device", "device"), ("eval_every", "eval_every"), ("eval_size", "eval_size"),
                ("checkpoint_every", "checkpoint_every"), ("test_size", "test_size"), ("data_dir", "data_dir"),
                ("grad_accumulation", "grad_accumulation"))


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
    }
    return json.dumps(doc, indent=2) + "\n"


def _new_run(args: argparse.Namespace) -> tuple[Trainer, Path, str, str]:
    if args.data is None:
        raise CLIError(f"train: --data is required unless --resume is given; choose one of {list(ALL_DATA)}")
    data = _data_name(args.data)
    need, default = _data_kind(data), _default_preset(data)
    preset_name = args.preset or default
    preset = load_preset(preset_name)
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
    train_config = preset.train_config(**train_changes)

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    ckpt_path = out / CHECKPOINT_NAME
    if ckpt_path.exists() and not args.force:
        raise CLIError(
            f"--out {out}: already holds a checkpoint ({ckpt_path}); continue it with "
            f"'monoflow train --resume {ckpt_path} --iterations N', or pass --force to start over and overwrite it"
        )
    trainer = Trainer(model_config, train_config)
    out.mkdir(parents=True, exist_ok=True)
    return trainer, out, preset.name, preset.description


def _check_unchanged(args: argparse.Namespace, trainer: Trainer, preset_name: str | None) -> None:
    """On ``--resume``, refuse flags that would change the architecture or the data stream."""
    model = trainer.model_config
    tc = trainer.train_config
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
                "--tol, --eval-every, --eval-size, --checkpoint-every, --device and --threads may change"
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
        trainer.set_solver(solver=checked.solver if args.solver is not None else None,
                           tol=checked.tol if args.tol is not None else None)


def _resume_run(args: argparse.Namespace) -> tuple[Trainer, Path, str, str]:
    source = Path(args.resume)
    ckpt = load_checkpoint(source)
    trainer = Trainer.from_checkpoint(ckpt, device=args.device)
    user = ckpt.metadata.get("user") if isinstance(ckpt.metadata.get("user"), dict) else {}
    preset_name = str(user.get("preset", "")) or None
    description = str(user.get("description", ""))
    _check_unchanged(args, trainer, preset_name)
    _apply_resume_changes(args, trainer)
    out = Path(args.out) if args.out is not None else source.parent
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out}: exists and is not a directory")
    target = out / CHECKPOINT_NAME
    if target.exists() and not args.force and target.resolve() != source.resolve():
        raise CLIError(
            f"--out {out}: already holds another checkpoint ({target}); choose another folder or pass --force "
            "to overwrite it"
        )
    out.mkdir(parents=True, exist_ok=True)
    return trainer, out, preset_name or "(unknown preset)", description


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
        raise CLIError(f"device: {device!r} requested (by the preset or checkpoint) but CUDA is not available on "
                       "this machine; pass --device cpu")
    return device


def _cmd_train(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    # Under torchrun: join the process group; every process trains, only rank 0 writes and prints.
    dist_context, device = init_from_environment(args.device or _configured_device(args))
    if dist_context.active:
        args.device = device
        args.no_progress = args.no_progress or not dist_context.is_main
        if not dist_context.is_main:
            return _train_worker(args)
    trainer, out, preset_name, description = _resume_run(args) if args.resume else _new_run(args)
    cfg = trainer.train_config
    task = trainer.task
    ckpt_path = out / CHECKPOINT_NAME
    start = trainer.step_count
    target = cfg.iterations
    if args.resume and start >= target:
        print(
            f"the checkpoint is already at iteration {start} (--iterations {target}): nothing to train; "
            "pass a larger --iterations to continue",
            file=sys.stderr,
        )
        return EXIT_OK
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
        if cfg.checkpoint_every and trainer.step_count % cfg.checkpoint_every == 0:
            trainer.save_checkpoint(ckpt_path, metadata=metadata)
        if stop:
            note("Ctrl-C: stopping after this iteration and saving the checkpoint (press Ctrl-C again to stop at once)")
            return False
        return None

    interrupted = False
    summary = None
    try:
        with _graceful_sigint(request_stop):
            summary = trainer.run(target - start, callback)
        interrupted = summary.stopped_early
    except KeyboardInterrupt:
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
        trainer.save_checkpoint(ckpt_path, metadata=metadata)
        print(
            f"interrupted at iteration {trainer.step_count} of {target} after {seconds:.1f} s; "
            f"checkpoint saved to {ckpt_path}",
            file=sys.stderr,
        )
        print(f"resume with: monoflow train --resume {ckpt_path} --iterations {target}", file=sys.stderr)
        return EXIT_INTERRUPTED

    trainer.save_checkpoint(ckpt_path, metadata=metadata)
    rate = steps_run / seconds if seconds > 0 else math.inf
    plural = "" if steps_run == 1 else "s"
    print(f"trained {_fmt_int(steps_run)} iteration{plural} in {seconds:.1f} s ({rate:.1f} it/s); "
          f"iteration {trainer.step_count} of {target}")
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
        trainer = Trainer(preset.model_config(**model_changes), preset.train_config(**train_changes))
    trainer.run(max(0, trainer.train_config.iterations - trainer.step_count))
    return EXIT_OK


def _describe_test(ev: Any, data: str) -> str:
    if ev.bpd is not None:
        return f"{ev.describe()}; {ev.seconds:.2f} s"
    points = f"{_fmt_int(ev.n_test)} fixed {data} points"
    if ev.nll_nats is not None:
        err = f" +- {ev.nll_stderr_nats:.4f}" if ev.nll_stderr_nats is not None else ""
        logdet = "exact log-det" if ev.exact else "estimated log-det (unbiased, stochastic)"
        return f"test NLL {ev.nll_nats:.4f}{err} nats ({points}, {logdet}; {ev.seconds:.2f} s)"
    return f"test MSE {ev.mse:.4g} ({points}; {ev.seconds:.2f} s)"


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
    # The trainer's evaluate() is the one implementation of the held-out test (float64 copy, seeded).
    trainer = Trainer(ckpt.model_config, test_config, flow=flow)
    result = trainer.evaluate(fixed=True)
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
        doc.update(
            {
                "n_test": result.n_test,
                "seconds": result.seconds,
                "exact": result.exact,
                "test_seed": test_config.test_seed,
                "dtype": result.dtype,
                "step": step,
                "checkpoint": str(args.checkpoint),
            }
        )
        print(json.dumps(doc, allow_nan=False))
    else:
        at = f" at iteration {step}" if step is not None else ""
        print(f"{args.checkpoint}{at}: {_describe_test(result, data)} [test seed {test_config.test_seed}]")
    return EXIT_OK


def _cmd_sample(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    out = Path(args.out)
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
    t0 = time.perf_counter()
    samples = evaluation.sample(
        flow, args.n, temperature=args.temperature, seed=args.seed, dtype=_eval_dtype(flow.device, flow),
        workers=args.workers,
    )
    seconds = time.perf_counter() - t0
    if suffix == ".npy":
        _save_npy(out, samples.reshape(samples.shape[0], -1))
        what = f"{_fmt_int(args.n)} samples ({flow.dim}-D, float array {args.n} x {flow.dim})"
    else:
        e = args.extent
        if not e > 0:
            raise CLIError(f"--extent: must be positive, got {e}")
        counts, _, _ = np.histogram2d(
            samples[:, 0], samples[:, 1], bins=args.resolution, range=[[-e, e], [-e, e]]
        )
        # counts[i, j]: x bin i, y bin j -> image rows from the highest y (top) to the lowest.
        image = counts.T[::-1]
        peak = image.max()
        write_png(out, colormap(image / peak if peak > 0 else image))
        inside = int(counts.sum())
        what = (
            f"a {args.resolution} x {args.resolution} histogram of {_fmt_int(args.n)} samples on [-{e:g}, {e:g}]^2 "
            f"({_fmt_int(inside)} inside)"
        )
    print(f"wrote {what} to {out} (temperature {args.temperature:g}, seed {args.seed}; sampling took {seconds:.2f} s)")
    return EXIT_OK


def _sample_images(args: argparse.Namespace, flow: Flow, out: Path, suffix: str) -> int:
    t0 = time.perf_counter()
    images = evaluation.sample_images(
        flow, args.n, temperature=args.temperature, seed=args.seed, dtype=_eval_dtype(flow.device, flow)
    )
    seconds = time.perf_counter() - t0
    levels = int(flow.levels)  # type: ignore[attr-defined]
    shape = " x ".join(str(s) for s in images.shape[1:])
    if suffix == ".npy":
        _save_npy(out, images.astype(np.uint8 if levels <= 256 else np.int64))
        what = f"{_fmt_int(args.n)} images ({shape}, integer levels 0-{levels - 1})"
    else:
        write_png(out, evaluation.image_grid(images, levels))
        what = f"a grid of {_fmt_int(args.n)} sampled images ({shape}, {levels} levels)"
    print(f"wrote {what} to {out} (temperature {args.temperature:g}, seed {args.seed}; sampling took {seconds:.2f} s)")
    return EXIT_OK


def _cmd_density(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    out = Path(args.out)
    suffix = _check_output_path(out, (".npy", ".png"), "a density grid")
    ckpt = _load(args.checkpoint, args.device)
    flow = _evaluation_flow(ckpt)
    if flow.event_shape != (2,):
        raise CLIError(
            f"{args.checkpoint}: holds a flow on {flow.dim}-D samples; density grids need a 2-D flow (a toy density)"
        )
    t0 = time.perf_counter()
    grid, (xmin, xmax, ymin, ymax) = evaluation.log_density_grid(
        flow, extent=args.extent, resolution=args.resolution, dtype=_eval_dtype(flow.device, flow),
        workers=args.workers,
    )
    seconds = time.perf_counter() - t0
    finite = grid[np.isfinite(grid)]
    if suffix == ".npy":
        _save_npy(out, grid)
    else:
        top = finite.max() if finite.size else 0.0
        density = np.exp(np.where(np.isfinite(grid), grid, -np.inf) - top)  # in [0, 1], 1 at the peak
        write_png(out, colormap(density[::-1]))  # row 0 of the picture = highest y
    r = args.resolution
    cell = (xmax - xmin) / (r - 1) * (ymax - ymin) / (r - 1)
    mass = float(np.exp(finite).sum() * cell) if finite.size else math.nan
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
    print(
        f"wrote the {r} x {r} log-density grid on [{xmin:g}, {xmax:g}] x [{ymin:g}, {ymax:g}] to {out} "
        f"(log p from {lo:.3f} to {hi:.3f} nats; probability mass on the grid about {mass:.3f}; {seconds:.2f} s)"
    )
    return EXIT_OK


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
  A folder that already holds a checkpoint is refused unless --resume or --force is given.

Ctrl-C stops after the current iteration, saves the checkpoint and exits with status 130 (a second Ctrl-C stops
at once). --resume CHECKPOINT continues that run up to --iterations in total and appends to metrics.csv; only
--iterations, --lr, --solver, --tol, --eval-every, --eval-size, --checkpoint-every, --device and --threads may
change on resume.

examples:
  monoflow train --data 8gaussians --out runs/8g
  monoflow train --data moons --preset paper-toy-idensenet --iterations 5000 --out runs/moons-res
  monoflow train --data staircase --preset paper-1d-a --out runs/stairs-a
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
    g.add_argument("--data", metavar="NAME", help=f"training data: one of {', '.join(ALL_DATA)} (required unless "
                   "--resume)")
    g.add_argument("--data-dir", metavar="DIR", help="folder holding an image set's files (mnist, cifar10, "
                   "imagenet32, imagenet64, folder; digits is built in)")
    g.add_argument("--preset", metavar="NAME", help=f"preset name or JSON path (default {DEFAULT_TOY_PRESET} for 2-D "
                   f"data, {DEFAULT_1D_PRESET} for staircase, digits-cpu for digits and folder, paper-<set> for the "
                   "other image sets)")
    g = p.add_argument_group("model (override the preset)")
    g.add_argument("--formulation", type=_formulation, metavar="F",
                   help="monotone | residual | inverse_residual, or a comma-separated list with one per block")
    g.add_argument("--activation", metavar="A", help="activation of G: cpila, clipswish, lipswish, crelu, pila")
    g.add_argument("--blocks", type=_positive_int, metavar="N", help="number of flow blocks")
    g.add_argument("--lipschitz", type=_finite_float, metavar="C",
                   help="Lipschitz coefficient of each layer of G, in (0, 1)")
    g.add_argument("--solver", metavar="S", help="fixed-point solver: auto, newton, anderson, picard")
    g.add_argument("--tol", type=_finite_float, metavar="T", help="relative solver tolerance, in (0, 1)")
    g = p.add_argument_group("training (override the preset)")
    g.add_argument("--iterations", type=_positive_int, metavar="N", help="total training iterations")
    g.add_argument("--batch-size", type=_positive_int, metavar="B", help="fresh samples per iteration")
    g.add_argument("--lr", type=_finite_float, metavar="LR", help="Adam learning rate")
    g.add_argument("--seed", type=_nonnegative_int, metavar="S", help="seed of the weights and the data stream")
    g.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--eval-every", type=_nonnegative_int, metavar="N",
                   help="a fresh-sample test every N iterations (0: none)")
    g.add_argument("--eval-size", type=_positive_int, metavar="N", help="points per fresh-sample test")
    g.add_argument("--test-size", type=_positive_int, metavar="N",
                   help="points of the fixed held-out test at the end (staircase: of every test)")
    g.add_argument("--checkpoint-every", type=_nonnegative_int, metavar="N",
                   help="write the checkpoint every N iterations (0: only at the end)")
    g.add_argument("--grad-accumulation", type=_positive_int, metavar="K",
                   help="split each batch into K micro-batches (same update, less memory)")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="output folder (required for a new run; default on --resume: the "
                   "checkpoint's folder)")
    g.add_argument("--resume", metavar="CHECKPOINT", help="continue the run saved in CHECKPOINT")
    g.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    g.add_argument("--threads", type=_positive_int, default=1, metavar="N",
                   help="torch intra-op threads (default 1: fastest for these small matrices)")
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
    p.add_argument("--test-size", type=_positive_int, metavar="N",
                   help="held-out points (default: the run's test_size; staircase: eval_size)")
    p.add_argument("--seed", type=_nonnegative_int, metavar="S", help="seed of the held-out set (default: the run's "
                   "test_seed)")
    p.add_argument("--data", metavar="NAME", help="data set to test on (required for a flow-only checkpoint; "
                   "default: the run's)")
    p.add_argument("--data-dir", metavar="DIR", help="image sets: folder holding the files (default: the run's)")
    p.add_argument("--split", choices=("test", "validation"), help="image sets: split to test on (default: the "
                   "run's eval_split, test)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: bpd (images), nll_nats (or mse), n_test, seconds, exact, data, ...")
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
    p.add_argument("--temperature", type=_finite_float, default=1.0, metavar="T",
                   help="scale of the base noise, > 0 (default 1)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--resolution", type=_positive_int, default=200, metavar="R",
                   help=".png only: histogram bins per axis (default 200)")
    p.add_argument("--extent", type=_finite_float, default=4.0, metavar="E",
                   help=".png only: half-width of the histogram's square (default 4)")
    _add_workers_option(p, "; image flows sample serially")
    _add_runtime_options(p)
    p.set_defaults(handler=_cmd_sample)

    # -- density
    p = sub.add_parser(
        "density",
        help="log-density on a grid to .npy, or a heat map .png (2-D flows)",
        description="Evaluate log p(x) in nats on an R x R grid over [-extent, extent]^2 (the paper draws 400 x 400 "
        "on [-4, 4]^2). FILE.npy: the (R, R) float64 array of log-densities, row 0 = lowest y, column 0 = lowest x. "
        "FILE.png: the density exp(log p) divided by its peak, viridis-like colours, highest y at the top.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors checkpoint of a 2-D flow")
    p.add_argument("--resolution", type=_positive_int, default=400, metavar="R",
                   help="grid points per axis, >= 2 (default 400)")
    p.add_argument("--extent", type=_finite_float, default=4.0, metavar="E",
                   help="half-width of the square grid (default 4)")
    p.add_argument("--out", required=True, metavar="FILE", help="output file, .npy or .png")
    _add_workers_option(p)
    _add_runtime_options(p)
    p.set_defaults(handler=_cmd_density)

    # -- presets
    p = sub.add_parser("presets", help="list the shipped presets", description="List the shipped presets: name and "
                       "description, one per line.")
    p.set_defaults(handler=_cmd_presets)
    return parser


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------


def _error(message: str, stream: TextIO | None = None) -> None:
    print(f"{PROG}: error: {_one_line(message)}", file=stream or sys.stderr)


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
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
