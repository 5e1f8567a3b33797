"""The files of a training run's output folder: ``config.json``, ``metrics.csv`` and the checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import __version__
from ..imageio import atomic_write
from ..training import Trainer
from .errors import CLIError

CHECKPOINT_NAME = "checkpoint.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.csv"


def _metrics_header(task: str) -> str:
    if task == "image":
        return "iteration,wall_seconds,train_bpd,test_bpd"
    last = "test_nll" if task == "density" else "test_mse"
    return f"iteration,wall_seconds,train_loss,{last}"


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
