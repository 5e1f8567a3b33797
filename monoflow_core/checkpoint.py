"""Safe, atomic, versioned checkpoints: one safetensors file per checkpoint, never a pickle.

Layout of a checkpoint file (the `safetensors <https://huggingface.co/docs/safetensors>`_ format: an 8-byte
header length, a JSON header, raw tensor bytes):

* tensors, under prefixed keys: ``flow.<name>`` (the flow's ``state_dict`` including buffers such as the
  spectral-norm vectors ``u, v`` and ActNorm's ``initialized``), and for a training run ``optim.state.<i>.<key>``
  (Adam moments), ``ema.<name>`` (EMA weights) and ``rng.torch`` / ``rng.noise`` / ``rng.cuda`` (generator
  states, uint8); a run on a user's points also stores them as ``data.train``, ``data.test``, ``data.mean`` and
  ``data.scale`` (float64, :class:`~monoflow_core.data.points.PointSet`), described by the ``points`` metadata entry;
* string metadata: ``format`` (:data:`FORMAT_TAG`), ``monoflow_version``, ``torch_version``, ``created``,
  ``dtype``, ``model_config`` (the :class:`~monoflow_core.config.FlowConfig` as JSON), and for a training run
  ``train_config`` and ``trainer_state`` (everything of :meth:`Trainer.state_dict` that is not a tensor: step,
  data-stream states, optimizer param groups, metric histories ...), plus ``metadata`` (JSON: step, data set,
  latest metrics, the caller's own entries).

Loading checks the whole file before it builds anything: the safetensors framing and tensor table, the type of
every metadata entry, both configurations (through their classes' validation), the flow's expected tensor names,
shapes and dtypes (derived from the configuration on PyTorch's ``meta`` device, which allocates no memory) against
the stored ones, and for a training run the optimizer state, the EMA weights, the random-generator states and the
trainer's bookkeeping. Only then are the tensors read and the flow rebuilt with
:func:`~monoflow_core.models.build_flow`; nothing is ever unpickled (no ``torch.load``), so a checkpoint cannot run
code, and a crafted header (``blocks = 10**9``, a width of ``10**7``, a wrong-sized generator state, metadata of
the wrong JSON type) gives one :class:`CheckpointError` naming the file and the field, not a traceback or a
gigabyte allocation. Writing is atomic: the bytes go to a temporary file in the target's directory, are flushed
and fsync'ed, and replace the target with ``os.replace``; a failure leaves any previous checkpoint intact and no
temporary file behind (and the next save removes those of killed processes, :mod:`monoflow_core.fileio`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import re
import reprlib
import stat
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .config import FlowConfig, TrainConfig
from .data.points import POINTS_DATA, PointSet, check_stream_state
from .families.size import family_state_numbers
from .fileio import atomic_write
from .flow import Flow
from .metrics import TRAINER_STATE_FORMAT, EvalMetrics, StepMetrics
from .models import build_flow


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


__all__ = [
    "FORMAT_TAG",
    "MAX_HEADER_BYTES",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "read_checkpoint_metadata",
    "save_checkpoint",
]

#: Format tag stored in every checkpoint's metadata; files without it are refused.
FORMAT_TAG = "monoflow-checkpoint/1"
_FORMAT_FAMILY = "monoflow-checkpoint/"

#: Largest JSON header monoflow writes or reads. A real header is well below a megabyte (a tensor table of a few
#: thousand entries, histories thinned to 512 records); the cap bounds what parsing a hostile header can cost, since
#: JSON of tiny containers (``[[],[],...]``) takes about 25 bytes of memory per byte of text.
MAX_HEADER_BYTES = 16 * 1024 * 1024

#: safetensors itself refuses headers above 100 MB; a larger length field means "not a safetensors file".
_SAFETENSORS_MAX_HEADER = 100_000_000

#: Deepest nesting of any JSON document of a checkpoint (real ones nest 5 deep); deeper documents are refused
#: before any code walks them recursively (``copy.deepcopy``, ``repr``) and hits Python's recursion limit.
_MAX_JSON_DEPTH = 32

#: Most dimensions of a stored tensor (the flows' tensors have at most 4).
_MAX_RANK = 8

#: Sizes of a CUDA generator state that ``torch.cuda.set_rng_state`` accepts: Philox's 8-byte seed and 8-byte
#: offset (what ``get_rng_state`` returns), or the seed alone.
_CUDA_RNG_BYTES = (16, 8)

#: ``torch.manual_seed`` takes 64-bit seeds, and the trainer adds small offsets to its seed.
_MAX_SEED = 2**63 - 1

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: safetensors dtype names monoflow reads, with their torch dtypes.
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ST_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in _ST_DTYPES.items()}

_ADAM_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_OPTIM_KEY = re.compile(r"optim\.state\.(0|[1-9][0-9]{0,8})\.([A-Za-z_][A-Za-z0-9_]*)")
_INDEX = re.compile(r"0|[1-9][0-9]{0,8}")

# Values quoted in error messages come from the file: keep them short (and never recurse into deep nesting).
_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlong = 40
_repr.maxlevel = 3


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
        points: the user's points of a run on ``data = "points"`` (stored with it), else ``None``.
    """

    path: Path
    flow: Flow
    model_config: FlowConfig
    train_config: TrainConfig | None
    metadata: dict[str, Any]
    trainer_state: dict[str, Any] | None
    points: PointSet | None = None


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
    from . import __version__

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


# --------------------------------------------------------------------------------------------------------------
# reading the header
# --------------------------------------------------------------------------------------------------------------


def _fail(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {problem}")


def _short(value: Any) -> str:
    """A bounded one-line rendering of a value read from a file, for error messages."""
    return _repr.repr(value)


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value: Any) -> str:
    """The JSON name of a value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, computed without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        if depth <= _MAX_JSON_DEPTH:  # deeper than the limit: already refused, no need to walk on
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _sniff(head: bytes) -> str:
    """Name what a file that is not safetensors looks like, for the error message."""
    if head.startswith(b"PK"):
        return "it is a zip archive (e.g. a torch.save .pt file), not a safetensors file; it was not unpickled"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"c", b"]", b"}"):
        return "it looks like a Python pickle, not a safetensors file; refused without unpickling"
    return "not a safetensors file (invalid header length)"


@dataclass(frozen=True)
class _Entry:
    """One tensor of the file's table: safetensors dtype name and shape."""

    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.dtype} {list(self.shape)}"


@dataclass
class _Header:
    """A checked safetensors header: the tensor table and the (all-string) metadata."""

    tensors: dict[str, _Entry]
    meta: dict[str, str]


def _tensor_entry(path: Path, key: str, entry: Any) -> tuple[_Entry, int]:
    """Check one entry of the tensor table; return it and the end of its data."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _fail(path, f"corrupted header (tensor {_short(key)} has no valid data_offsets)")
    dtype, shape = entry.get("dtype"), entry.get("shape")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise _fail(path, f"tensor {_short(key)}: unsupported dtype {_short(dtype)}")
    if not isinstance(shape, list) or len(shape) > _MAX_RANK or not all(_is_int(s) and s >= 0 for s in shape):
        raise _fail(path, f"tensor {_short(key)}: invalid shape {_short(shape)}")
    nbytes = math.prod(shape) * _ST_DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise _fail(
            path,
            f"corrupted header (tensor {_short(key)}: {dtype} {_short(shape)} needs {nbytes} bytes, its data_offsets "
            f"span {offsets[1] - offsets[0]})",
        )
    return _Entry(dtype, tuple(shape)), offsets[1]


def _read_header(path: Path) -> _Header:
    """Validate the file's safetensors framing, tensor table, metadata types and format tag."""
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "it is a directory, not a checkpoint file")
    try:
        # Non-blocking open: a FIFO planted as a checkpoint would otherwise block until some process writes to it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise _fail(path, "not a regular file (a FIFO, device or socket cannot hold a checkpoint)")
            size = info.st_size
            head = fh.read(8)
            if len(head) < 8:
                raise _fail(path, f"file is only {size} bytes: empty or truncated")
            n = int.from_bytes(head, "little")
            if n < 2 or n > _SAFETENSORS_MAX_HEADER:
                raise _fail(path, _sniff(head))
            if n > MAX_HEADER_BYTES and 8 + n <= size:
                raise _fail(
                    path,
                    f"its header claims {n:,} bytes, more than the {MAX_HEADER_BYTES:,} of any monoflow checkpoint "
                    "(refused unread)",
                )
            raw = fh.read(min(n, MAX_HEADER_BYTES + 1))
    except OSError as err:
        raise _fail(path, err.strerror or str(err)) from err
    if len(raw) < n:
        if raw[:1] == b"{":
            raise _fail(path, f"truncated: the file ends inside its header ({size} bytes, header needs {8 + n})")
        raise _fail(path, _sniff(head))
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail(path, "not a safetensors file (its header is not JSON) or corrupted") from None
    if not isinstance(header, dict):
        raise _fail(path, "not a safetensors file (its header is not a JSON object)")
    tensors: dict[str, _Entry] = {}
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        tensors[key], stop = _tensor_entry(path, key, entry)
        end = max(end, stop)
    if 8 + n + end > size:
        raise _fail(path, f"truncated: expected {8 + n + end} bytes, the file has {size}")
    meta = header.get("__metadata__")
    tag = meta.get("format") if isinstance(meta, dict) else None
    if tag != FORMAT_TAG:
        if isinstance(tag, str) and tag.startswith(_FORMAT_FAMILY):
            raise _fail(path, f"format {_short(tag)} is not supported by this monoflow (it reads {FORMAT_TAG!r})")
        raise _fail(
            path,
            f"not a monoflow checkpoint (a safetensors file without the {FORMAT_TAG!r} format tag, "
            "perhaps written by another program)",
        )
    assert isinstance(meta, dict)
    for key, value in meta.items():
        # safetensors metadata maps strings to strings; JSON documents are stored as JSON text.
        if not isinstance(value, str):
            raise _fail(path, f"metadata entry {_short(key)} must be a string, got {_kind(value)}")
    return _Header(tensors, meta)


# --------------------------------------------------------------------------------------------------------------
# checking the metadata
# --------------------------------------------------------------------------------------------------------------


def _json_field(path: Path, meta: dict[str, str], key: str, required: bool = True) -> Any:
    """Parse the JSON document stored under ``key`` (``None`` when absent and not required)."""
    if key not in meta:
        if required:
            raise _fail(path, f"metadata entry {key!r} is missing")
        return None
    try:
        value = json.loads(meta[key])
    except (ValueError, RecursionError):
        raise _fail(path, f"metadata entry {key!r} is not valid JSON") from None
    if _json_depth(value) > _MAX_JSON_DEPTH:
        raise _fail(path, f"metadata entry {key!r} nests deeper than {_MAX_JSON_DEPTH} levels")
    return value


def _config(path: Path, meta: dict[str, str], key: str, cls: type[Any], required: bool) -> Any:
    """The configuration stored under ``key``, validated by its class (``None`` when absent and optional)."""
    data = _json_field(path, meta, key, required)
    if data is None and not required:
        return None
    try:
        return cls.from_dict(data)
    except (ValueError, TypeError, OverflowError, RecursionError) as err:
        raise _fail(path, f"invalid stored configuration {key} ({_clip(str(err))})") from None


def _check_train_config(path: Path, model: FlowConfig, train: TrainConfig) -> None:
    """What TrainConfig's own validation leaves open and a resumed run would trip over."""
    for name in ("seed", "test_seed"):
        if getattr(train, name) > _MAX_SEED:
            raise _fail(path, f"train_config: {name}: must be below 2**63 (torch takes 64-bit seeds)")
    if torch.device(train.device).type == "meta":
        raise _fail(path, "train_config: device: 'meta' holds no data; train on 'cpu' or 'cuda'")
    task = train.task
    if task == "image" and not model.is_image:
        raise _fail(path, f"model_config: image_shape: data set {train.data!r} needs an image flow, got null")
    if task != "image":
        dim = 2 if task == "density" else 1
        if model.is_image or model.dim != dim:
            raise _fail(
                path,
                f"model_config: dim: data set {train.data!r} needs a flow on {dim}-D samples, the configuration "
                f"describes {'an image flow' if model.is_image else f'{model.dim}-D samples'}",
            )


def _check_type(value: Any, hint: Any) -> bool:
    """Whether a parsed JSON value fits a (simple) type hint of a metrics dataclass."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)  # NaN and inf are legitimate metrics (a rejected step's loss)
    if hint is str:
        return isinstance(value, str)
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_check_type(value, arm) for arm in typing.get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, hint) if isinstance(hint, type) else True


# ``cls: type`` rather than ``type[Any]``: mypy does not see a ``type[...]`` as Hashable (which functools.cache needs).
@functools.cache
def _field_hints(cls: type) -> dict[str, Any]:
    # Resolving the annotations (strings under ``from __future__ import annotations``) is slow: once per class.
    return typing.get_type_hints(cls)


def _check_record(path: Path, where: str, record: Any, cls: type) -> None:
    """A step or test record as :meth:`from_dict` of ``cls`` (a metrics dataclass) will read it."""
    if not isinstance(record, dict):
        raise _fail(path, f"{where}: must be an object, got {_kind(record)}")
    hints = _field_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in record:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(path, f"{where}: field {f.name!r} is missing")
            continue
        if not _check_type(record[f.name], hints[f.name]):
            raise _fail(path, f"{where}: field {f.name!r} has the wrong type ({_kind(record[f.name])})")


def _check_eval_record(path: Path, where: str, record: Any) -> None:

    _check_record(path, where, record, EvalMetrics)
    # The headline value (EvalMetrics.value) reads the first of these that is set.
    if all(record.get(k) is None for k in ("bpd", "nll_nats", "mse")):
        raise _fail(path, f"{where}: holds no result (bpd, nll_nats and mse are all null)")


def _check_info(path: Path, info: Any) -> dict[str, Any]:
    """The ``metadata`` entry: a JSON object with typed known fields (the caller's own under ``"user"``)."""

    if info is None:
        return {}
    if not isinstance(info, dict):
        raise _fail(path, f"metadata: must be an object, got {_kind(info)}")
    checks: dict[str, tuple[str, Callable[[Any], bool]]] = {
        "step": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
        "data": ("a string", lambda v: isinstance(v, str)),
        "task": ("a string", lambda v: isinstance(v, str)),
        "paper_protocol": ("a number or null", lambda v: v is None or _is_number(v)),
        "user": ("an object", lambda v: isinstance(v, dict)),
    }
    for key, (what, ok) in checks.items():
        if key in info and not ok(info[key]):
            raise _fail(path, f"metadata: {key}: must be {what}, got {_short(info[key])}")
    if info.get("last_step") is not None:
        _check_record(path, "metadata: last_step", info["last_step"], StepMetrics)
    if info.get("last_eval") is not None:
        _check_eval_record(path, "metadata: last_eval", info["last_eval"])
    return info


@dataclass
class _Stored:
    """A checkpoint's header with its metadata parsed and checked."""

    header: _Header
    model_config: FlowConfig
    train_config: TrainConfig | None
    dtype_name: str
    info: dict[str, Any]


def _read_stored(path: Path) -> _Stored:
    """Read and check the header and every metadata entry (no tensor data is read)."""

    header = _read_header(path)
    meta = header.meta
    model_config = _config(path, meta, "model_config", FlowConfig, required=True)
    train_config = _config(path, meta, "train_config", TrainConfig, required=False)
    if train_config is not None:
        _check_train_config(path, model_config, train_config)
    dtype_name = meta.get("dtype", "float32")
    if dtype_name not in _DTYPES:
        raise _fail(path, f"unsupported dtype {_short(dtype_name)} (metadata entry 'dtype')")
    info = _check_info(path, _json_field(path, meta, "metadata", required=False))
    return _Stored(header, model_config, train_config, dtype_name, info)


def read_checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a checkpoint (format, versions, step, data set, metrics, configs) without its tensors.

    Reads only the file's header, so it is cheap enough for a file dialog; its metadata is checked as by
    :func:`load_checkpoint` (the tensors are not). Configurations are returned as dicts under ``"model_config"``
    and ``"train_config"``.

    Raises:
        CheckpointError: as :func:`load_checkpoint`.
    """
    path = Path(path)
    stored = _read_stored(path)
    out = _metadata_dict(stored)
    out["model_config"] = stored.model_config.to_dict()
    out["train_config"] = stored.train_config.to_dict() if stored.train_config is not None else None
    return out


def _metadata_dict(stored: _Stored) -> dict[str, Any]:
    info = dict(stored.info)
    for key in ("format", "monoflow_version", "torch_version", "created", "dtype"):
        if key in stored.header.meta:
            info[key] = stored.header.meta[key]
    return info


# --------------------------------------------------------------------------------------------------------------
# the flow's expected tensors, from its configuration, on the meta device
# --------------------------------------------------------------------------------------------------------------


class _BuildTooLarge(BaseException):
    """Raised inside the meta build once it has done more work than the stored tensors can account for.

    A BaseException so that no ``except Exception`` of a module constructor can swallow it.
    """


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value
    raise TypeError("no tensor argument")


# Initialisers that only fill values: on the meta device there are none to fill, and PyTorch runs them there
# through its Python reference kernels (milliseconds per call, and a first call that imports sympy).
_FILL_ONLY = frozenset(
    {
        nn.init.uniform_,
        nn.init.normal_,
        nn.init.trunc_normal_,
        nn.init.kaiming_uniform_,
        nn.init.kaiming_normal_,
        nn.init.xavier_uniform_,
        nn.init.xavier_normal_,
        nn.init.orthogonal_,
        Tensor.uniform_,
        Tensor.normal_,
    }
)


class _MetaBuild(TorchFunctionMode):
    """Shape-only construction: counts torch calls (aborting past ``budget``) and skips value computations.

    Used inside ``torch.device("meta")``, where every tensor is a shape without storage. Random draws and
    initialisers become plain ``empty`` tensors and ``F.normalize`` (the spectral layers' power-iteration vectors)
    returns an empty tensor of its input's shape and dtype: the same shapes and dtypes, without PyTorch's slow
    Python meta kernels. Every other call runs unchanged.
    """

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        self.calls += 1
        if self.calls > self.budget:
            raise _BuildTooLarge
        kwargs = dict(kwargs or {})
        if func is F.normalize:
            t = _first_tensor(args, kwargs)
            return torch.empty(t.shape, dtype=t.dtype)
        if func in _FILL_ONLY:
            return _first_tensor(args, kwargs)
        if func is torch.randn or func is torch.rand:
            kwargs.pop("generator", None)
            return torch.empty(*args, **kwargs)
        return func(*args, **kwargs)


@dataclass
class _FlowPlan:
    """The flow a configuration describes: every state tensor, and the parameters in optimizer order."""

    tensors: dict[str, _Entry]
    parameters: list[str]


def _count_guard(path: Path, config: FlowConfig, stored: dict[str, _Entry]) -> None:
    """Refuse layer counts and widths that the stored flow tensors cannot hold, before anything loops over them.

    Lower bounds only: every block holds at least one tensor, and some tensor of the flow holds at least one
    number per dimension of the samples (an ActNorm, a first weight, a convolution's power-iteration vector).
    """
    n = len(stored)
    counts: list[tuple[str, int, int]] = []  # (field, value, largest value the file can account for)
    if config.is_image:
        counts.append(("blocks_per_scale / fc_blocks", sum(config.blocks_per_scale) + config.fc_blocks, n))
        # Unused by image flows, but formulations() still makes a list of that many entries.
        counts.append(("blocks", config.blocks, max(n, 10_000)))
        if config.dequantization == "variational":
            counts.append(("vdq_blocks", config.vdq_blocks, n))
        counts.append(("depth", config.depth, n))
    else:
        counts.append(("blocks", config.blocks, n))
        if config.g == "densenet":
            counts.append(("depth", config.depth, n))
        else:
            counts.append(("hidden", len(config.hidden), n))
    if config.family != "implicit":  # a comparison family: one network of len(hidden) + 1 layers per block
        counts.append(("hidden", len(config.hidden), n))
    for field, value, limit in counts:
        if value > limit:
            raise _fail(
                path,
                f"the stored flow tensors do not match model_config: {field} = {_short(value)} needs more layers "
                f"than the {n} flow tensors stored can hold",
            )
    numbers = sum(math.prod(entry.shape) for entry in stored.values())
    setting: list[int] | int | None
    if config.is_image:
        # Each factor-out halves the channels left; the narrowest scale still holds that many numbers a sample.
        halvings = len(config.blocks_per_scale) - 1 if config.factor_out else 0
        field, setting, width = "image_shape", config.image_shape, config.dim >> halvings
    else:
        field, setting, width = "dim", config.dim, config.dim
    if config.family != "implicit":
        # Comparison families are built on the CPU even in the shape-only build (zuko computes its masks from
        # values): sizes beyond what the file stores are refused first, so that build allocates no more than it.
        need = family_state_numbers(config)
        if need > numbers:
            raise _fail(
                path,
                f"the stored flow tensors do not match model_config: family {config.family!r} with blocks = "
                f"{_short(config.blocks)}, hidden = {_short(config.hidden)}, bins = {_short(config.bins)} holds "
                f"{need} numbers, more than the {numbers} stored",
            )
    if width > numbers:
        raise _fail(
            path,
            f"the stored flow tensors do not match model_config: {field} = {_short(setting)} needs tensors of more "
            f"than the {numbers} numbers stored",
        )


def _flow_plan(path: Path, config: FlowConfig, dtype: torch.dtype, stored: dict[str, _Entry]) -> _FlowPlan:
    """Names, shapes and dtypes of the flow ``config`` describes, without allocating any of it.

    The flow is built on the ``meta`` device; its construction is aborted once it has made far more torch calls
    than the ``stored`` flow tensors could need (a layer count the count guard does not know about).
    """
    _count_guard(path, config, stored)
    # A real flow makes about 3 torch calls per state tensor; 64 leaves room for any module's construction.
    mode = _MetaBuild(budget=64 * (len(stored) + 1) + 4096)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), mode:
            flow = build_flow(config)
    except _BuildTooLarge:
        raise _fail(
            path,
            f"model_config describes a flow far larger than its {len(stored)} stored tensors (blocks = "
            f"{_short(config.blocks)}, depth = {_short(config.depth)}, blocks_per_scale = "
            f"{_short(config.blocks_per_scale)}, fc_blocks = {_short(config.fc_blocks)})",
        ) from None
    except Exception as err:  # whatever the builder refuses, the stored configuration is the problem
        problem = _clip(str(err) or repr(err))
        raise _fail(path, f"model_config: cannot build the flow it describes ({problem})") from None
    tensors = {}
    for name, t in flow.state_dict().items():
        # Module.to(dtype) converts the floating-point tensors only (ActNorm's 'initialized' stays bool).
        tensors[name] = _Entry(_ST_NAMES.get(dtype if t.is_floating_point() else t.dtype, str(t.dtype)), tuple(t.shape))
    return _FlowPlan(tensors, [name for name, _ in flow.named_parameters()])


def _compare(path: Path, prefix: str, expected: dict[str, _Entry], found: dict[str, _Entry], source: str) -> None:
    """Refuse unless ``found`` (the file's ``prefix*`` tensors) has exactly the names, shapes and dtypes expected."""
    problems = []
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    for label, names in (("missing", missing), ("unexpected", extra)):
        if names:
            more = " ..." if len(names) > 3 else ""
            problems.append(f"{label} {', '.join(_short(prefix + n) for n in names[:3])}{more}")
    for name, want in expected.items():
        have = found.get(name)
        if have is not None and have != want:
            problems.append(f"{_short(prefix + name)} is {have.describe()}, {source} gives {want.describe()}")
            if len(problems) >= 3:
                break
    if problems:
        raise _fail(path, f"the stored {prefix[:-1]} tensors do not match {source}: {'; '.join(problems)}")


# --------------------------------------------------------------------------------------------------------------
# checking a training state
# --------------------------------------------------------------------------------------------------------------


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
    from .data import ToyStream

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
