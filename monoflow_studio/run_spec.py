"""A run's whole configuration: the model (:class:`FlowConfig`) and the training (:class:`TrainConfig`).

A run configuration saves to JSON in the same shape as the shipped presets (``name``, ``description``, ``model``,
``training``), so a saved run loads with :func:`monoflow_core.presets.load_preset` and vice versa.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from monoflow_core.config import FlowConfig
from monoflow_core.data import TOY_DATASETS
from monoflow_core.presets import Preset, list_presets, load_preset
from monoflow_core.training import TrainConfig

from .files import atomic_write_text

__all__ = ["DEFAULT_PRESET", "RunSpec", "toy_presets"]

#: What the studio opens on without arguments: the paper's Monotone Flow on 8gaussians (Table 1).
DEFAULT_PRESET = "paper-toy-monotone"


@dataclass
class RunSpec:
    """The model and training configuration of one run (both validated by the core)."""

    model: FlowConfig
    training: TrainConfig
    name: str = "custom"
    description: str = ""

    @classmethod
    def from_preset(cls, preset: Preset | str, **training_overrides: Any) -> RunSpec:
        """The configuration of a preset (name, path or loaded :class:`Preset`), with training overrides."""
        p = preset if isinstance(preset, Preset) else load_preset(preset)
        return cls(p.model_config(), p.train_config(**training_overrides), name=p.name, description=p.description)

    @classmethod
    def default(cls) -> RunSpec:
        """The paper's Monotone preset on 8gaussians."""
        return cls.from_preset(DEFAULT_PRESET)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunSpec:
        """Read a run configuration (or any preset file).

        Raises:
            ValueError: unreadable file, malformed JSON or invalid settings (the core's message).
        """
        spec = cls.from_preset(load_preset(os.fspath(path)))
        spec.check_studio()
        return spec

    def check_studio(self) -> None:
        """Raise ``ValueError`` unless this is a 2-D density run (the only kind the studio displays)."""
        if self.training.data not in TOY_DATASETS or self.model.dim != 2:
            raise ValueError(
                f"the studio trains 2-D densities: data must be one of {list(TOY_DATASETS)} with dim 2, "
                f"got data {self.training.data!r}, dim {self.model.dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "model": self.model.to_dict(),
            "training": self.training.to_dict(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the configuration as JSON, atomically (raises ``OSError`` if the path is unwritable)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def copy(self) -> RunSpec:
        return RunSpec(self.model.replace(), self.training.replace(), self.name, self.description)


def toy_presets() -> list[Preset]:
    """The shipped presets the studio can run (2-D toy densities)."""
    return [p for p in list_presets() if p.model.get("dim", 2) == 2 and p.training.get("data") in TOY_DATASETS]
