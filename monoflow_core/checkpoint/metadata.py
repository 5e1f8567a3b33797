"""The metadata of a checkpoint: its JSON entries parsed and checked, without reading any tensor.

Both configurations are validated by their own classes (:class:`~monoflow_core.config.FlowConfig`,
:class:`~monoflow_core.config.TrainConfig`), plus what a resumed run would trip over (seeds beyond 64 bits, the
``meta`` device, a data set that needs another kind of flow); the ``metadata`` entry's known fields and its step and
test records are type-checked against the metrics dataclasses. :func:`read_checkpoint_metadata` is the public
header-only reader (cheap enough for a file dialog).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import FlowConfig, TrainConfig
from ..metrics import EvalMetrics, StepMetrics
from .errors import _clip, _fail, _is_int, _is_number, _kind, _short
from .header import _DTYPES, _MAX_JSON_DEPTH, _Header, _json_depth, _read_header

#: ``torch.manual_seed`` takes 64-bit seeds, and the trainer adds small offsets to its seed.
_MAX_SEED = 2**63 - 1


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
