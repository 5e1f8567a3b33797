"""Writing a checkpoint, atomically: a flow alone, or a whole training run.

A training run is read through the :class:`TrainingRun` protocol, so that checkpoints depend on the configuration,
the flow and the models, never on the training loop. The bytes are written through
:func:`monoflow_core.fileio.atomic_write` (temporary file, fsync, ``os.replace``), and a file whose header loading
would refuse (larger than :data:`~monoflow_core.checkpoint.header.MAX_HEADER_BYTES`) is never written.
"""

from __future__ import annotations

import datetime
import json
import os
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_bytes
from torch import Tensor

from ..config import FlowConfig, TrainConfig
from ..data.points import PointSet
from ..fileio import atomic_write
from ..flow import Flow
from ..metrics import EvalMetrics
from .errors import CheckpointError
from .header import FORMAT_TAG, MAX_HEADER_BYTES


@typing.runtime_checkable
class TrainingRun(typing.Protocol):
    """What a checkpoint reads from a training run; :class:`monoflow_core.training.Trainer` is one.

    A protocol rather than the class itself, so that checkpoints depend on the configuration, the flow and the
    models, never on the training loop (which depends on checkpoints to resume).
    """

    flow: Flow
    model_config: FlowConfig
    train_config: TrainConfig
    history: Any
    eval_history: list[EvalMetrics]

    @property
    def step_count(self) -> int: ...

    @property
    def task(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def paper_protocol(self) -> float | None: ...


def _cpu_copy(t: Tensor) -> Tensor:
    # A private contiguous CPU copy: safetensors refuses tensors that share storage or are not contiguous.
    return t.detach().to("cpu").clone().contiguous()


def _flow_dtype(flow: Flow) -> torch.dtype:
    for t in (*flow.parameters(), *flow.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def _dumps(name: str, value: Any, path: Path) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {name} is not JSON-serialisable ({err})") from None


def _pack_optimizer(state: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Move the optimizer's tensors into ``tensors`` (``optim.state.<i>.<key>``); return the JSON rest."""
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.state.{int(index)}.{key}"] = _cpu_copy(value)
            else:
                plain[key] = value
        scalars[str(int(index))] = plain
    return {"param_groups": state["param_groups"], "scalars": scalars}


def _trainer_payload(
    trainer: TrainingRun, tensors: dict[str, Tensor], path: Path
) -> tuple[dict[str, str], dict[str, Any]]:
    """Split a trainer's state into tensors (added to ``tensors``) and JSON metadata entries."""
    state = trainer.state_dict()
    for name, value in state.pop("flow").items():
        tensors[f"flow.{name}"] = _cpu_copy(value)
    ema = state.pop("ema")
    if ema is not None:
        for name, value in ema.items():
            tensors[f"ema.{name}"] = _cpu_copy(value)
    tensors["rng.torch"] = _cpu_copy(state.pop("torch_rng"))
    noise_rng = state.pop("noise_rng", None)
    if noise_rng is not None:
        tensors["rng.noise"] = _cpu_copy(noise_rng)
    cuda_rng = state.pop("cuda_rng", None)
    if cuda_rng is not None:
        tensors["rng.cuda"] = _cpu_copy(cuda_rng)
    state["optimizer"] = _pack_optimizer(state["optimizer"], tensors)
    state["has_ema"] = ema is not None
    info = {
        "step": trainer.step_count,
        "data": trainer.train_config.data,
        "task": trainer.task,
        "last_step": trainer.history[-1].to_dict() if trainer.history else None,
        "last_eval": trainer.eval_history[-1].to_dict() if trainer.eval_history else None,
        "paper_protocol": trainer.paper_protocol(),
    }
    meta = {
        "train_config": _dumps("train_config", trainer.train_config.to_dict(), path),
        "trainer_state": _dumps("trainer state", state, path),
    }
    points = getattr(trainer, "points", None)
    if isinstance(points, PointSet):  # a run on a user's points carries them: data.* tensors and their description
        tensors.update({f"data.{name}": value for name, value in points.tensors().items()})
        meta["points"] = _dumps("points", points.info(), path)
    return meta, info


def save_checkpoint(
    path: str | os.PathLike[str], source: Flow | TrainingRun, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write a checkpoint of a flow, or of a whole training run, atomically.

    Args:
        path: target file (conventionally ``*.safetensors``). Its directory must exist and be writable; an
            existing file is replaced only once the new one is completely on disk.
        source: a :class:`Flow` built by :func:`build_flow` (it must carry its ``config``), or a
            :class:`~monoflow_core.training.Trainer` (resumable with ``Trainer.from_checkpoint``).
        metadata: extra JSON-serialisable entries, stored under ``"user"`` in the checkpoint's metadata.

    Returns:
        The path written.

    Raises:
        CheckpointError: the directory is missing or unwritable, the flow has no configuration, the metadata is
            not JSON-serialisable or too large (the header would exceed :data:`MAX_HEADER_BYTES`, which loading
            refuses), or writing failed (the previous file, if any, is left intact).
    """
    from .. import __version__

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    if not isinstance(source, Flow) and isinstance(source, TrainingRun):
        flow = source.flow
        config = flow.config if flow.config is not None else source.model_config
        meta, info = _trainer_payload(source, tensors, path)
    elif isinstance(source, Flow):
        flow = source
        if flow.config is None:
            raise CheckpointError(
                f"cannot write checkpoint {path}: the flow has no FlowConfig (only flows built by build_flow, "
                "whose architecture can be rebuilt from JSON, can be checkpointed)"
            )
        config = flow.config
        for name, value in flow.state_dict().items():
            tensors[f"flow.{name}"] = _cpu_copy(value)
        meta, info = {}, {}
    else:
        raise CheckpointError(
            f"cannot write checkpoint {path}: expected a Flow or a Trainer, got {type(source).__name__}"
        )
    info["user"] = metadata or {}
    meta.update(
        {
            "format": FORMAT_TAG,
            "monoflow_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": str(_flow_dtype(flow)).replace("torch.", ""),
            "model_config": _dumps("model_config", config.to_dict(), path),
            "metadata": _dumps("metadata", info, path),
        }
    )
    try:
        payload = save_bytes(tensors, metadata=meta)
    except Exception as err:  # safetensors raises several types for unsupported tensors
        raise CheckpointError(f"cannot write checkpoint {path}: serialisation failed ({err})") from err
    header_bytes = int.from_bytes(payload[:8], "little")
    if header_bytes > MAX_HEADER_BYTES:
        # Never write a file that load_checkpoint would refuse.
        raise CheckpointError(
            f"cannot write checkpoint {path}: its header would take {header_bytes:,} bytes, more than the "
            f"{MAX_HEADER_BYTES:,} a checkpoint may have (is the metadata very large?)"
        )
    _atomic_write(path, payload)
    return path


def _atomic_write(path: Path, payload: bytes) -> None:
    """Write through :func:`monoflow_core.fileio.atomic_write`, naming the checkpoint in every error."""
    if path.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CheckpointError(f"cannot write checkpoint {path}: directory {directory} does not exist")
    try:
        atomic_write(path, payload)
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoint {path}: {err.strerror or err}") from err
