"""The checks of a training run's state: everything resuming will read, before any of it is read.

The optimizer (one Adam group over every parameter, per-parameter moments of the parameters' shapes), the EMA
weights, the random-generator states, the data streams, the metric histories and the trainer's bookkeeping, and
for a run on a user's points the stored points; each is checked against the flow's plan
(:mod:`monoflow_core.checkpoint.plan`) and the stored configuration.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data.points import POINTS_DATA, PointSet, check_stream_state
from ..metrics import TRAINER_STATE_FORMAT, StepMetrics
from .errors import _clip, _fail, _is_int, _is_number, _kind, _short
from .header import _Entry
from .metadata import _check_eval_record, _check_record, _json_field, _Stored
from .plan import _compare, _FlowPlan

#: Sizes of a CUDA generator state that ``torch.cuda.set_rng_state`` accepts: Philox's 8-byte seed and 8-byte
#: offset (what ``get_rng_state`` returns), or the seed alone.
_CUDA_RNG_BYTES = (16, 8)


_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_OPTIM_KEY = re.compile(r"optim\.state\.(0|[1-9][0-9]{0,8})\.([A-Za-z_][A-Za-z0-9_]*)")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")


def _require(path: Path, ok: bool, field: str, what: str, value: Any) -> None:
    if not ok:
        raise _fail(path, f"trainer_state: {field}: must be {what}, got {_short(value)}")


def _check_rng(path: Path, tensors: dict[str, _Entry], key: str, sizes: tuple[int, ...], required: bool) -> None:
    entry = tensors.get(key)
    if entry is None:
        if required:
            raise _fail(path, f"the training state has no random-generator state ({key!r})")
        return
    if entry.dtype != "U8" or len(entry.shape) != 1 or entry.shape[0] not in sizes:
        want = " or ".join(_Entry("U8", (n,)).describe() for n in sizes)
        raise _fail(path, f"tensor {key!r}: a generator state must be {want}, got {entry.describe()}")


def _check_stream(path: Path, field: str, state: Any, train: TrainConfig) -> None:
    """A data-stream state as the trainer's stream will read it."""
    from ..data import ToyStream

    if train.data == POINTS_DATA:
        return  # checked with the stored points (_check_points), whose size it must match
    if train.task == "image":
        # ImageStream.load_state_dict's checks (the set's name, split and size are checked against the data
        # when the trainer loads it).
        keys = {"name", "split", "size", "seed", "epoch", "position"}
        _require(
            path, isinstance(state, dict) and keys <= state.keys(), field, f"an object with keys {sorted(keys)}", state
        )
        for key in ("size", "seed", "epoch", "position"):
            _require(path, _is_int(state[key]) and state[key] >= 0, f"{field}.{key}", "an integer >= 0", state[key])
        _require(path, state["position"] <= state["size"], f"{field}.position", "at most its size", state["position"])
        return
    try:
        # The trainer's own parser on a throwaway stream: exactly what resuming will accept.
        ToyStream(train.data, 0).load_state_dict(state)
    except Exception as err:  # numpy raises several types for a malformed generator state
        raise _fail(path, f"trainer_state: {field}: {_clip(str(err) or repr(err))}") from None


def _check_param_groups(path: Path, groups: Any, n_params: int) -> None:
    _require(
        path,
        isinstance(groups, list) and len(groups) == 1,
        "optimizer.param_groups",
        "a list of one group (the trainer's Adam has one)",
        groups,
    )
    group = groups[0]
    _require(path, isinstance(group, dict), "optimizer.param_groups[0]", "an object", group)
    params = group.get("params")
    _require(
        path,
        params == list(range(n_params)) and all(_is_int(p) for p in params),
        "optimizer.param_groups[0].params",
        f"the parameter indices 0..{n_params - 1}",
        params,
    )
    where = "optimizer.param_groups[0]"
    for key in ("lr", "eps", "weight_decay"):
        value = group.get(key)
        _require(
            path,
            _is_number(value) and math.isfinite(value) and value >= 0,
            f"{where}.{key}",
            "a finite number >= 0",
            value,
        )
    betas = group.get("betas")
    _require(
        path,
        isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
        f"{where}.betas",
        "two numbers in [0, 1)",
        betas,
    )
    for key in ("amsgrad", "maximize", "decoupled_weight_decay"):
        _require(path, isinstance(group.get(key, False), bool), f"{where}.{key}", "true or false", group.get(key))
    for key in ("foreach", "fused"):
        _require(
            path,
            group.get(key) is None or isinstance(group.get(key), bool),
            f"{where}.{key}",
            "true, false or null",
            group.get(key),
        )
    # The trainer never sets these; they make Adam demand CUDA graphs or autograd through the step.
    for key in ("capturable", "differentiable"):
        _require(path, group.get(key, False) is False, f"{where}.{key}", "false", group.get(key))
    _require(
        path,
        not (group.get("foreach") and group.get("fused")),
        f"{where}.fused",
        "false when foreach is true",
        group.get("fused"),
    )


def _check_optimizer(path: Path, packed: Any, tensors: dict[str, _Entry], plan: _FlowPlan) -> None:
    """The Adam state: one group over every parameter, complete per-parameter states of the parameters' shapes."""
    _require(path, isinstance(packed, dict), "optimizer", "an object", packed)
    n_params = len(plan.parameters)
    _check_param_groups(path, packed.get("param_groups"), n_params)
    amsgrad = packed["param_groups"][0].get("amsgrad", False)
    per_param: dict[int, dict[str, Any]] = {}
    scalars = packed.get("scalars", {})
    _require(path, isinstance(scalars, dict), "optimizer.scalars", "an object", scalars)
    for index, entry in scalars.items():
        _require(
            path,
            _INDEX.fullmatch(index) is not None and int(index) < n_params,
            "optimizer.scalars",
            f"keyed by parameter indices 0..{n_params - 1}",
            index,
        )
        _require(
            path,
            isinstance(entry, dict) and set(entry) <= {"step"},
            f"optimizer.scalars.{index}",
            "an object with at most a 'step'",
            entry,
        )
        if "step" in entry:
            step = entry["step"]
            _require(
                path,
                _is_number(step) and math.isfinite(step) and step >= 0,
                f"optimizer.scalars.{index}.step",
                "a finite number >= 0",
                step,
            )
        per_param.setdefault(int(index), {}).update(entry)
    for key, entry in tensors.items():
        if not key.startswith("optim."):
            continue
        match = _OPTIM_KEY.fullmatch(key)
        if match is None or int(match[1]) >= n_params:
            raise _fail(path, f"unexpected tensor {_short(key)} (the flow has {n_params} parameters)")
        index, name = int(match[1]), match[2]
        param = plan.tensors[plan.parameters[index]]
        if name == "step":
            ok = entry.shape == () and entry.dtype in ("F32", "F64")
            want = "a float32 or float64 scalar"
        elif name in _ADAM_MOMENTS:
            ok = entry == param
            want = f"{param.describe()} like parameter {plan.parameters[index]!r}"
        else:
            raise _fail(path, f"unexpected tensor {_short(key)} (Adam keeps {', '.join(_ADAM_MOMENTS)} and step)")
        if not ok:
            raise _fail(path, f"tensor {_short(key)}: must be {want}, got {entry.describe()}")
        per_param.setdefault(index, {})[name] = entry
    needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    for index, state in sorted(per_param.items()):
        if state and not needed <= state.keys():
            missing = sorted(needed - state.keys())
            raise _fail(path, f"optimizer state of parameter {index}: {', '.join(missing)} missing")


#: Entries of :meth:`Trainer.state_dict` that a checkpoint stores as tensors, never in the JSON trainer state.
_TENSOR_STATE = {
    "flow": "flow.*",
    "ema": "ema.*",
    "torch_rng": "rng.torch",
    "noise_rng": "rng.noise",
    "cuda_rng": "rng.cuda",
}


def _check_trainer_state(path: Path, packed: Any, stored: _Stored, plan: _FlowPlan) -> None:
    """Everything :meth:`Trainer.load_state_dict` will read, checked against the flow and the configuration."""

    train = stored.train_config
    if train is None:
        raise _fail(path, "trainer_state without train_config: a training state needs its configuration")
    if not isinstance(packed, dict):
        raise _fail(path, f"trainer_state: must be an object, got {_kind(packed)}")
    for key, tensor in _TENSOR_STATE.items():
        # A JSON stand-in would reach the trainer where a tensor is expected (or replace a missing one).
        if key in packed:
            raise _fail(path, f"trainer_state: {key}: is stored as tensor {tensor!r}, not in the JSON state")
    _require(
        path, packed.get("format") == TRAINER_STATE_FORMAT, "format", repr(TRAINER_STATE_FORMAT), packed.get("format")
    )
    _require(path, _is_int(packed.get("step")) and packed["step"] >= 0, "step", "an integer >= 0", packed.get("step"))
    base_lr = packed.get("base_lr")
    _require(
        path, _is_number(base_lr) and math.isfinite(base_lr) and base_lr > 0, "base_lr", "a finite number > 0", base_lr
    )
    for key in ("ema_updates", "consecutive_rejections", "rejected_total"):
        if key in packed:
            _require(path, _is_int(packed[key]) and packed[key] >= 0, key, "an integer >= 0", packed[key])
    has_ema = packed.get("has_ema", False)
    _require(path, isinstance(has_ema, bool), "has_ema", "true or false", has_ema)
    _check_stream(path, "stream", packed.get("stream"), train)
    if packed.get("eval_stream") is not None:
        _check_stream(path, "eval_stream", packed["eval_stream"], train)
    for key, check in (
        ("history", lambda where, r: _check_record(path, where, r, StepMetrics)),
        ("eval_history", lambda where, r: _check_eval_record(path, where, r)),
    ):
        records = packed.get(key, [])
        _require(path, isinstance(records, list), key, "a list", records)
        for i, record in enumerate(records):
            check(f"trainer_state: {key}[{i}]", record)
    _check_optimizer(path, packed.get("optimizer"), stored.header.tensors, plan)
    tensors = stored.header.tensors
    _check_rng(path, tensors, "rng.torch", (torch.get_rng_state().numel(),), required=True)
    _check_rng(path, tensors, "rng.noise", (torch.Generator().get_state().numel(),), required=False)
    _check_rng(path, tensors, "rng.cuda", _CUDA_RNG_BYTES, required=False)
    ema = {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")}
    if has_ema:
        _compare(path, "ema.", plan.tensors, ema, "the flow's tensors")
    elif ema:
        raise _fail(path, f"unexpected tensor {_short('ema.' + next(iter(ema)))} (trainer_state has no EMA)")


def _check_points(path: Path, stored: _Stored, packed: Any) -> dict[str, Any] | None:
    """A run on a user's points: its ``data.*`` tensors (table), their description and the batch stream's state.

    Returns the checked description (``None`` for any other checkpoint, which must hold no point data).
    """
    table = {k[len("data.") :]: (e.dtype, e.shape) for k, e in stored.header.tensors.items() if k.startswith("data.")}
    wants = packed is not None and stored.train_config is not None and stored.train_config.data == POINTS_DATA
    if not wants:
        if table:
            raise _fail(
                path,
                f"unexpected tensor {_short('data.' + next(iter(table)))} (only a run on "
                f"{POINTS_DATA!r} stores point data)",
            )
        if "points" in stored.header.meta:
            raise _fail(path, f"unexpected metadata entry 'points' (only a run on {POINTS_DATA!r} stores points)")
        return None
    if not table:
        raise _fail(
            path,
            f"a run on {POINTS_DATA!r} must store its points (tensors data.train, data.test, "
            "data.mean, data.scale); none are there",
        )
    try:
        PointSet.check_table(table)
        info = PointSet.check_info(_json_field(path, stored.header.meta, "points", required=True))
        check_stream_state(packed.get("stream"), table["train"][1][0])
    except ValueError as err:
        raise _fail(path, f"trainer_state: stream: {err}" if str(err).startswith("data:") else str(err)) from None
    return info
