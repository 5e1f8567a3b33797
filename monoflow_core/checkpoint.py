"""Safe, atomic, versioned checkpoints: one safetensors file per checkpoint, never a pickle.

Layout of a checkpoint file (the `safetensors <https://huggingface.co/docs/safetensors>`_ format: an 8-byte
header length, a JSON header, raw tensor bytes):

* tensors, under prefixed keys: ``flow.<name>`` (the flow's ``state_dict`` including buffers such as the
  spectral-norm vectors ``u, v`` and ActNorm's ``initialized``), and for a training run ``optim.state.<i>.<key>``
  (Adam moments), ``ema.<name>`` (EMA weights) and ``rng.torch`` / ``rng.cuda`` (generator states, uint8);
* string metadata: ``format`` (:data:`FORMAT_TAG`), ``monoflow_version``, ``torch_version``, ``created``,
  ``dtype``, ``model_config`` (the :class:`~monoflow_core.config.FlowConfig` as JSON), and for a training run
  ``train_config`` and ``trainer_state`` (everything of :meth:`Trainer.state_dict` that is not a tensor: step,
  data-stream states, optimizer param groups, metric histories ...), plus ``metadata`` (JSON: step, data set,
  latest metrics, the caller's own entries).

Loading rebuilds the flow from its JSON configuration with :func:`~monoflow_core.models.build_flow` and copies
the weights in; nothing is ever unpickled (no ``torch.load``), so a checkpoint cannot run code. Writing is
atomic: the bytes go to a temporary file in the target's directory, are flushed and fsync'ed, and replace the
target with ``os.replace``; a failure leaves any previous checkpoint intact and no temporary file behind.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor

from .config import FlowConfig
from .fileio import atomic_write
from .flow import Flow
from .models import build_flow

if TYPE_CHECKING:
    from .training import TrainConfig, Trainer

__all__ = [
    "FORMAT_TAG",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
]

#: Format tag stored in every checkpoint's metadata; files without it are refused.
FORMAT_TAG = "monoflow-checkpoint/1"
_FORMAT_FAMILY = "monoflow-checkpoint/"

#: safetensors itself refuses headers above 100 MB; a larger length field means "not a safetensors file".
MAX_HEADER_BYTES = 100_000_000

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path and the problem."""


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
    """

    path: Path
    flow: Flow
    model_config: FlowConfig
    train_config: TrainConfig | None
    metadata: dict[str, Any]
    trainer_state: dict[str, Any] | None


# --------------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------------


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


def _trainer_payload(
    trainer: Trainer, tensors: dict[str, Tensor], path: Path
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
    return meta, info


def save_checkpoint(
    path: str | os.PathLike[str], source: Flow | Trainer, *, metadata: dict[str, Any] | None = None
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
            not JSON-serialisable, or writing failed (the previous file, if any, is left intact).
    """
    from . import __version__
    from .training import Trainer

    path = Path(path)
    tensors: dict[str, Tensor] = {}
    if isinstance(source, Trainer):
        flow = source.flow
        config = flow.config if flow.config is not None else source.model_config
        meta, info = _trainer_payload(source, tensors, path)
    elif isinstance(source, Flow):
        flow = source
        config = flow.config
        if config is None:
            raise CheckpointError(
                f"cannot write checkpoint {path}: the flow has no FlowConfig (only flows built by build_flow, "
                "whose architecture can be rebuilt from JSON, can be checkpointed)"
            )
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


# --------------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------------


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {problem}")


def _sniff(head: bytes) -> str:
    """Name what a file that is not safetensors looks like, for the error message."""
    if head.startswith(b"PK"):
        return "it is a zip archive (e.g. a torch.save .pt file), not a safetensors file; it was not unpickled"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"c", b"]", b"}"):
        return "it looks like a Python pickle, not a safetensors file; refused without unpickling"
    return "not a safetensors file (invalid header length)"


def _read_header(path: Path) -> dict[str, Any]:
    """Validate the file's safetensors framing and format tag; return the JSON header."""
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "it is a directory, not a checkpoint file")
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(path, f"file is only {size} bytes: empty or truncated")
            n = int.from_bytes(head, "little")
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _fail(path, _sniff(head))
            raw = fh.read(n)
    except OSError as err:
        raise _fail(path, err.strerror or str(err)) from err
    if len(raw) < n:
        if raw[:1] == b"{":
            raise _fail(path, f"truncated: the file ends inside its header ({size} bytes, header needs {8 + n})")
        raise _fail(path, _sniff(head))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise _fail(path, "not a safetensors file (its header is not JSON) or corrupted") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (its header is not a JSON object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise _fail(path, f"corrupted header (tensor {key!r} has no valid data_offsets)") from None
    if 8 + n + end > size:
        raise _fail(path, f"truncated: expected {8 + n + end} bytes, the file has {size}")
    meta = header.get("__metadata__")
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != FORMAT_TAG:
        if isinstance(tag, str) and tag.startswith(_FORMAT_FAMILY):
            raise _fail(path, f"format {tag!r} is not supported by this monoflow (it reads {FORMAT_TAG!r})")
        raise _fail(
            path,
            f"not a monoflow checkpoint (a safetensors file without the {FORMAT_TAG!r} format tag, "
            "perhaps written by another program)",
        )
    return header


def _json_field(path: Path, meta: dict[str, str], key: str, required: bool = True) -> Any:
    if key not in meta:
        if required:
            raise _fail(path, f"metadata entry {key!r} is missing")
        return None
    try:
        return json.loads(meta[key])
    except ValueError:
        raise _fail(path, f"metadata entry {key!r} is not valid JSON") from None


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a checkpoint (format, versions, step, data set, metrics, configs) without its tensors.

    Reads only the file's header, so it is cheap enough for a file dialog. Configurations are returned as
    dicts under ``"model_config"`` and ``"train_config"``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    path = Path(path)
    meta = _read_header(path)["__metadata__"]
    out = _metadata_dict(path, meta)
    out["model_config"] = _json_field(path, meta, "model_config")
    out["train_config"] = _json_field(path, meta, "train_config", required=False)
    return out


def _metadata_dict(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    info = _json_field(path, meta, "metadata", required=False) or {}
    for key in ("format", "monoflow_version", "torch_version", "created", "dtype"):
        if key in meta:
            info[key] = meta[key]
    return info


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; never unpickles anything.

    The flow is rebuilt from the stored :class:`FlowConfig` with :func:`build_flow` (inside
    ``torch.random.fork_rng``, so loading leaves the caller's random stream alone) and its weights are copied
    in with a strict ``load_state_dict``.

    Args:
        path: the checkpoint file.
        map_location: device for the flow (and the trainer state's tensors are loaded on the CPU).

    Returns:
        A :class:`Checkpoint`; the flow is in eval mode.

    Raises:
        CheckpointError: the file is missing, a directory, truncated, not a safetensors file (a pickle, a zip,
            random bytes), a safetensors file without monoflow's format tag, or its contents do not match its
            configuration.
    """
    from .training import TrainConfig

    path = Path(path)
    header = _read_header(path)
    meta: dict[str, str] = header["__metadata__"]
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors' own errors (SafetensorError, ...) for corrupted files
        raise _fail(path, f"corrupted safetensors data ({err})") from err
    try:
        model_config = FlowConfig.from_dict(_json_field(path, meta, "model_config"))
        tc = _json_field(path, meta, "train_config", required=False)
        train_config = TrainConfig.from_dict(tc) if tc is not None else None
    except ValueError as err:
        raise _fail(path, f"invalid stored configuration ({err})") from err
    dtype_name = meta.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise _fail(path, f"unsupported dtype {dtype_name!r}")
    flow_state = {k[len("flow.") :]: v for k, v in tensors.items() if k.startswith("flow.")}
    with torch.random.fork_rng(devices=[]):
        flow = build_flow(model_config).to(dtype=_DTYPES[dtype_name])
    try:
        flow.load_state_dict(flow_state, strict=True)
    except RuntimeError as err:
        raise _fail(path, f"the stored weights do not match the stored configuration ({err})") from err
    flow = flow.to(map_location).eval()
    trainer_state = None
    packed = _json_field(path, meta, "trainer_state", required=False)
    if packed is not None:
        if "rng.torch" not in tensors:
            raise _fail(path, "the training state has no random-generator state ('rng.torch')")
        try:
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
        except (KeyError, TypeError, ValueError) as err:
            raise _fail(path, f"malformed training state ({err!r})") from err
    return Checkpoint(
        path=path,
        flow=flow,
        model_config=model_config,
        train_config=train_config,
        metadata=_metadata_dict(path, meta),
        trainer_state=trainer_state,
    )
