"""Shipped run presets: JSON files with a model (:class:`FlowConfig`) and a training protocol (``TrainConfig``).

Presets live in the repository's ``assets/presets/``, installed as package data (one ``NAME.json`` each, with keys
``name``, ``description``, ``model`` and ``training``). :func:`load_preset` accepts a preset name or the path of any
JSON file of that shape.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import assets_dir
from .config import FlowConfig

__all__ = ["MAX_PRESET_DEPTH", "Preset", "list_presets", "load_preset", "preset_dir"]

#: Environment variable that points at an alternative presets folder.
PRESET_DIR_ENV = "MONOFLOW_PRESET_DIR"

#: Deepest nesting of objects and arrays a preset may use. A preset is three levels deep (the document, its
#: ``training`` object, the ``betas`` list); the bound leaves room to grow and keeps every later walk over the
#: values (validation, copies, error messages) far from Python's recursion limit.
MAX_PRESET_DEPTH = 32


def _nesting_error(data: Any, path: Path) -> str | None:
    """Where ``data`` nests deeper than :data:`MAX_PRESET_DEPTH` (e.g. ``"model.blocks[0][0]"``), or None.

    Iterative (an explicit stack), so that the check itself cannot hit the recursion limit.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_PRESET_DEPTH:
            return (
                f"preset: {path} nests objects and arrays more than {MAX_PRESET_DEPTH} levels deep "
                f"(at {where or 'the top level'})"
            )
        if isinstance(value, dict):
            stack.extend((item, f"{where}.{key}" if where else str(key), depth + 1) for key, item in value.items())
        else:
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
    return None


def preset_dir() -> Path:
    """The folder the shipped presets are read from (``$MONOFLOW_PRESET_DIR`` overrides it).

    The presets ship as package data (:func:`monoflow_core.assets.assets_dir`), so a wheel install finds them too.
    """
    env = os.environ.get(PRESET_DIR_ENV)
    if env:
        return Path(env)
    return assets_dir() / "presets"


@dataclass
class Preset:
    """A named model and training protocol."""

    name: str
    description: str
    model: dict[str, Any]
    training: dict[str, Any]

    def model_config(self, **overrides: Any) -> FlowConfig:
        """The validated model configuration, with ``overrides`` applied."""
        return FlowConfig.from_dict({**self.model, **overrides})

    def train_config(self, **overrides: Any) -> Any:
        """The validated ``TrainConfig``, with ``overrides`` applied."""
        from .training import TrainConfig

        return TrainConfig.from_dict({**self.training, **overrides})


def list_presets() -> list[Preset]:
    """All shipped presets, sorted by name."""
    folder = preset_dir()
    if not folder.is_dir():
        return []
    return [load_preset(p) for p in sorted(folder.glob("*.json"))]


def load_preset(name_or_path: str | os.PathLike[str]) -> Preset:
    """Load a preset by name (``"paper-toy-monotone"``) or from a JSON file path.

    Raises:
        ValueError: unknown name (the message lists the shipped ones), unreadable or malformed file (including one
            nested more than :data:`MAX_PRESET_DEPTH` levels deep).
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".json") or path.is_file()):
        path = preset_dir() / f"{text}.json"
        if not path.is_file():
            names = sorted(p.stem for p in preset_dir().glob("*.json"))
            raise ValueError(f"preset: unknown preset {text!r}; choose one of {names}")
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise ValueError(f"preset: cannot read {path}: {err.strerror or err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"preset: {path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    except RecursionError:  # the decoder recurses once per level: thousands of levels exhaust the stack
        raise ValueError(f"preset: {path} nests objects and arrays more than {MAX_PRESET_DEPTH} levels deep") from None
    problem = _nesting_error(data, path)
    if problem is not None:
        raise ValueError(problem)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("model"), dict)
        or not isinstance(data.get("training"), dict)
    ):
        raise ValueError(f"preset: {path} must be a JSON object with 'model' and 'training' objects")
    return Preset(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        model=data["model"],
        training=data["training"],
    )
