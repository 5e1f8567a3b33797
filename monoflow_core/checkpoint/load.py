"""Loading a checkpoint: every check first, then the tensors are read and the flow is rebuilt.

Nothing is ever unpickled. The header and metadata (:mod:`~monoflow_core.checkpoint.metadata`), the flow's tensor
table against its shape-only plan (:mod:`~monoflow_core.checkpoint.plan`) and a training run's state
(:mod:`~monoflow_core.checkpoint.trainer_state`) are checked before any tensor is read; then the flow is built
with :func:`~monoflow_core.models.build_flow` and its weights copied in strictly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from ..config import FlowConfig, TrainConfig
from ..data.points import PointSet
from ..flow import Flow
from ..models import build_flow
from .errors import _clip, _fail, _short
from .header import _DTYPES, _ST_NAMES, _Entry
from .metadata import _json_field, _metadata_dict, _read_stored
from .plan import _compare, _flow_plan
from .trainer_state import _check_points, _check_trainer_state


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        path: the file it was read from.
        flow: the rebuilt flow with its weights (in eval mode; on ``map_location``).
        model_config: the flow's configuration.
        train_config: the training configuration, or ``None`` for a flow-only checkpoint.
        metadata: format tag, versions, creation time, dtype, step, data set, latest metrics and the caller's
            own entries (under ``"user"``).
        trainer_state: the :meth:`Trainer.state_dict` to resume from (tensors restored), or ``None``.
        points: the user's points of a run on ``data = "points"`` (stored with it), else ``None``.
    """

    path: Path
    flow: Flow
    model_config: FlowConfig
    train_config: TrainConfig | None
    metadata: dict[str, Any]
    trainer_state: dict[str, Any] | None
    points: PointSet | None = None


def _unpack_optimizer(packed: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in packed.get("scalars", {}).items()}
    for key, value in tensors.items():
        if key.startswith("optim.state."):
            index, name = key[len("optim.state.") :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    groups = []
    for group in packed["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _check_tensor_names(path: Path, tensors: dict[str, _Entry], training: bool) -> None:
    allowed = ("flow.", "ema.", "optim.", "data.") if training else ("flow.",)
    rngs = ("rng.torch", "rng.noise", "rng.cuda") if training else ()
    for key in tensors:
        if not key.startswith(allowed) and key not in rngs:
            what = "" if training else " (a flow-only checkpoint holds flow.* tensors)"
            raise _fail(path, f"unexpected tensor {_short(key)}{what}")


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles anything.

    Everything is checked before anything is built or any tensor is read: the header, every metadata entry's
    type and range (configurations through their classes' validation), the flow's tensor names, shapes and
    dtypes against those its configuration gives (derived on the ``meta`` device, without allocating), and for a
    training run the optimizer, EMA, generator and bookkeeping state. Then the flow is rebuilt from the stored
    :class:`FlowConfig` with :func:`build_flow` (inside ``torch.random.fork_rng``, so loading leaves the caller's
    random stream alone) and its weights are copied in with a strict ``load_state_dict``.

    Args:
        path: the checkpoint file.
        map_location: device for the flow (and the trainer state's tensors are loaded on the CPU).

    Returns:
        A :class:`Checkpoint`; the flow is in eval mode.

    Raises:
        CheckpointError: the file is missing, a directory, truncated, not a safetensors file (a pickle, a zip,
            random bytes), a safetensors file without monoflow's format tag, or any of its contents is malformed
            or does not match its configuration; the message names the file and the field.
    """
    path = Path(path)
    stored = _read_stored(path)
    meta, tensors_table = stored.header.meta, stored.header.tensors
    packed = _json_field(path, meta, "trainer_state", required=False)
    training = packed is not None
    _check_tensor_names(path, tensors_table, training)
    dtype = _DTYPES[stored.dtype_name]
    flow_table = {k[len("flow.") :]: v for k, v in tensors_table.items() if k.startswith("flow.")}
    plan = _flow_plan(path, stored.model_config, dtype, flow_table)
    _compare(path, "flow.", plan.tensors, flow_table, "the stored configuration")
    if training:
        if stored.train_config is not None and stored.train_config.dtype != stored.dtype_name:
            raise _fail(
                path, f"dtype {stored.dtype_name!r} differs from train_config.dtype {stored.train_config.dtype!r}"
            )
        _check_trainer_state(path, packed, stored, plan)
    points_info = _check_points(path, stored, packed)

    # Everything is consistent: only now are the tensors read and the flow built.
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors' own errors (SafetensorError, ...) for corrupted files
        raise _fail(path, f"corrupted safetensors data ({_clip(str(err))})") from err
    # safetensors parses the header on its own: make sure it read the table that was checked.
    if len(tensors) != len(tensors_table):
        raise _fail(path, "corrupted safetensors data (its tensors differ from the header)")
    for key, tensor in tensors.items():
        if tensors_table.get(key) != _Entry(_ST_NAMES.get(tensor.dtype, str(tensor.dtype)), tuple(tensor.shape)):
            raise _fail(path, f"corrupted safetensors data (tensor {_short(key)} differs from the header)")
    for key in ("rng.torch", "rng.noise"):
        # The right size is not enough: the Mersenne Twister refuses some states (all zeros, for one); try it on
        # a throwaway generator rather than on the trainer's.
        if training and key in tensors:
            try:
                torch.Generator().set_state(tensors[key])
            except RuntimeError as err:
                raise _fail(path, f"tensor {key!r}: not a valid generator state ({_clip(str(err))})") from None
    flow_state = {k[len("flow.") :]: v for k, v in tensors.items() if k.startswith("flow.")}
    with torch.random.fork_rng(devices=[]):
        flow = build_flow(stored.model_config).to(dtype=dtype)
    try:
        flow.load_state_dict(flow_state, strict=True)
    except RuntimeError as err:
        raise _fail(path, f"the stored weights do not match the stored configuration ({_clip(str(err))})") from err
    flow = flow.to(map_location).eval()
    trainer_state = None
    if training:
        trainer_state = dict(packed)
        trainer_state["flow"] = flow_state
        trainer_state["optimizer"] = _unpack_optimizer(packed["optimizer"], tensors)
        has_ema = bool(trainer_state.pop("has_ema", False))
        trainer_state["ema"] = (
            {k[len("ema.") :]: v for k, v in tensors.items() if k.startswith("ema.")} if has_ema else None
        )
        trainer_state["torch_rng"] = tensors["rng.torch"]
        if "rng.cuda" in tensors:
            trainer_state["cuda_rng"] = tensors["rng.cuda"]
        if "rng.noise" in tensors:
            trainer_state["noise_rng"] = tensors["rng.noise"]
    points = None
    if points_info is not None:
        try:
            points = PointSet.from_checkpoint(
                {k[len("data.") :]: v for k, v in tensors.items() if k.startswith("data.")}, points_info
            )
        except ValueError as err:
            raise _fail(path, str(err)) from None
    return Checkpoint(
        path=path,
        flow=flow,
        model_config=stored.model_config,
        train_config=stored.train_config,
        metadata=_metadata_dict(stored),
        trainer_state=trainer_state,
        points=points,
    )
