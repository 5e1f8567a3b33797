"""The run ``monoflow train`` starts: a new one from a preset and flags, or one resumed from a checkpoint.

Every setting is checked before anything is spent: the preset's kind against the data, seeds, the memory a model,
batch and tests need (:mod:`monoflow_core.resources`; image runs split batches into micro-batches to fit,
:mod:`monoflow_core.memory_plan`), a checkpoint already in the output folder, and on ``--resume`` the flags that
may not change.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, load_checkpoint, read_checkpoint_metadata
from ..config import FlowConfig
from ..data.images import image_set_shape
from ..devices import resolve_device
from ..memory_plan import plan_grad_accumulation
from ..presets import load_preset
from ..resources import (
    SEED_MAX,
    ResourceError,
    available_memory,
    check_memory,
    check_training,
    memory_budget,
    points_bytes,
)
from ..training import TrainConfig, Trainer
from .datasets import ALL_DATA, _data_kind, _data_name, _default_preset, _preset_kind
from .errors import CLIError
from .loading import _require_finite_weights
from .paths import _nonempty_path, _require_regular_file
from .points import point_set_from_args, refuse_point_flags_on_resume
from .run_folder import _check_folder_free

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
    ("cudnn_benchmark", "cudnn_benchmark"),
)


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
                "--tol, --precision, --cudnn-benchmark, --eval-every, --eval-size, --checkpoint-every, --device and "
                "--threads may change"
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
    if args.precision is not None or args.cudnn_benchmark is not None:
        trainer.set_precision(args.precision, cudnn_benchmark=args.cudnn_benchmark)


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
