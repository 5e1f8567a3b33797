"""``monoflow train``: the training loop with its progress bar, metrics, checkpoints and Ctrl-C.

Under ``torchrun`` every process trains (:mod:`monoflow_core.distributed`) and only rank 0 writes and prints. The
first Ctrl-C finishes the current iteration, saves the checkpoint and exits 130; a second stops at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint
from ..devices import AUTO
from ..distributed import init_from_environment
from ..imageio import atomic_write
from ..presets import load_preset
from ..runlock import RunLock, RunLockedError
from ..training import Trainer, TrainingError
from .datasets import _data_name, _default_preset
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, CLIError, _one_line
from .options import _set_threads
from .points import point_set_from_args
from .report import _describe_test, _fmt_int
from .run_folder import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME, _check_folder_free, _config_document, _MetricsFile
from .train_setup import _MODEL_FLAGS, _TRAIN_FLAGS, _apply_resume_changes, _configured_device, _new_run, _resume_run


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
