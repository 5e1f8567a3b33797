"""A run's whole configuration: the model (:class:`FlowConfig`) and the training (:class:`TrainConfig`).

The studio trains two kinds of run: 2-D densities (the toy data sets, with density, transport and sample views)
and image densities (bits/dim, with a live grid of samples); :attr:`RunSpec.task` tells them apart.

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
from monoflow_core.data.images import IMAGE_DATASETS
from monoflow_core.data.points import POINTS_DATA, PointSet
from monoflow_core.devices import resolve_device
from monoflow_core.families import IMPLICIT, describe_family
from monoflow_core.presets import Preset, list_presets, load_preset
from monoflow_core.training import TrainConfig

from .files import atomic_write_text

__all__ = ["BUILTIN_IMAGE_DATASETS", "DEFAULT_PRESET", "RunSpec", "image_presets", "studio_presets", "toy_presets"]

#: Image sets that ship with the code (scikit-learn's 8x8 digits); the others read files from ``data_dir``.
BUILTIN_IMAGE_DATASETS = ("digits",)

#: What the studio opens on without arguments: a small Monotone Flow on 8gaussians that shows a good density within
#: seconds (the paper's Table 1 presets are one click away in the preset list).
DEFAULT_PRESET = "quick-monotone"


@dataclass
class RunSpec:
    """The model and training configuration of one run (both validated by the core).

    ``points``: the user's own points (loaded from a file or drawn), which a run on ``data = "points"`` trains on.
    They are kept when the data set changes, so switching back to ``points`` needs no reload; a saved run
    configuration (JSON) does not hold them (checkpoints do).
    """

    model: FlowConfig
    training: TrainConfig
    name: str = "custom"
    description: str = ""
    points: PointSet | None = None

    @classmethod
    def from_preset(cls, preset: Preset | str, *, auto_device: bool = True, **training_overrides: Any) -> RunSpec:
        """The configuration of a preset (name, path or loaded :class:`Preset`), with training overrides.

        Without a ``device`` override (and with ``auto_device``) the run goes to the faster device for its task
        (:func:`monoflow_core.devices.resolve_device`: the GPU for image models when CUDA is present, the CPU for
        the 2-D models); the device menu overrides it.
        """
        p = preset if isinstance(preset, Preset) else load_preset(preset)
        if auto_device and "device" not in training_overrides:
            training_overrides = {**training_overrides, "device": resolve_device(None, p.model_config())[0]}
        training = {**p.training, **training_overrides}
        data = str(training.get("data", "")).lower()
        # Said here in the studio's words (the core's TrainConfig speaks of the CLI's --data-dir flag).
        if data in IMAGE_DATASETS and data not in BUILTIN_IMAGE_DATASETS and not training.get("data_dir"):
            raise ValueError(_needs_files(data, p.name))
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
        spec = cls.from_preset(load_preset(os.fspath(path)), auto_device=False)  # a saved run keeps its device
        spec.check_studio()
        return spec

    @property
    def task(self) -> str:
        """``"density"`` (a 2-D toy density), ``"image"`` (bits/dim) or ``"regression"`` (not shown here)."""
        return self.training.task

    @property
    def is_image(self) -> bool:
        return self.task == "image"

    def check_studio(self) -> None:
        """Raise ``ValueError`` (with what to do instead) unless the studio can train and display this run.

        The studio shows 2-D density runs (a toy data set and ``dim`` 2) and image runs (an image data set and a
        multiscale image model). The built-in image set (``digits``) needs nothing else; the others read their
        files from ``training.data_dir``, which must then be set (whether the files load is only known when the
        run is built: a loading error becomes a message and the current run is kept).
        """
        data = self.training.data
        if data == POINTS_DATA:
            if self.points is None:
                raise ValueError(
                    "data 'points' trains on your own points: load them with File > Load data... or "
                    "draw them (Draw data in the density view)"
                )
            if self.model.dim != 2 or self.model.is_image:
                raise ValueError("your own points are 2-D: they need a 2-D model (start from a 2-D preset)")
            return
        if data in IMAGE_DATASETS:
            if not self.model.is_image:
                raise ValueError(
                    f"data {data!r} is an image set but the model is a {self.model.dim}-D flow; image runs need "
                    "a multiscale image model (image_shape, blocks_per_scale): start from an image preset such "
                    "as digits-cpu"
                )
            if data not in BUILTIN_IMAGE_DATASETS and not self.training.data_dir:
                raise ValueError(_needs_files(data, self.name))
            return
        if data not in TOY_DATASETS or self.model.dim != 2 or self.model.is_image:
            raise ValueError(
                f"the studio trains 2-D densities (data one of {list(TOY_DATASETS)} with a 2-D model) or image "
                f"densities (digits, or an image set with data_dir); got data {data!r}, "
                + ("an image model" if self.model.is_image else f"dim {self.model.dim}")
            )

    def describe_model(self) -> str:
        """A short description of the architecture, e.g. ``10 monotone blocks, cpila``."""
        m = self.model
        if m.family != IMPLICIT:  # a comparison family (docs/families.md)
            return describe_family(m)
        formulation = m.formulation if isinstance(m.formulation, str) else "/".join(sorted(set(m.formulation)))
        if m.is_image:
            scales = ", ".join(str(n) for n in m.blocks_per_scale)
            fc = f" + {m.fc_blocks} FC" if m.fc_blocks else ""
            shape = "x".join(str(n) for n in m.image_shape or ())
            return f"multiscale {formulation} flow on {shape} images: [{scales}] blocks per scale{fc}, {m.activation}"
        return f"{m.blocks} {formulation} blocks, {m.activation}"

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
        return RunSpec(self.model.replace(), self.training.replace(), self.name, self.description, self.points)


def _needs_files(data: str, name: str) -> str:
    return (
        f'{name}: data {data!r} needs its files: set "data_dir" in the "training" section of the run '
        f"configuration to the folder holding them, then load it with File > Load run configuration (only "
        f"{', '.join(BUILTIN_IMAGE_DATASETS)} is built in; nothing is downloaded)"
    )


def _runs_here(preset: Preset) -> bool:
    try:
        RunSpec.from_preset(preset).check_studio()
    except ValueError:
        return False
    return True


def toy_presets() -> list[Preset]:
    """The shipped presets of 2-D toy densities."""
    return [p for p in list_presets() if p.training.get("data") in TOY_DATASETS and _runs_here(p)]


def image_presets() -> list[Preset]:
    """The shipped image presets the studio can run as they are (built-in data, e.g. digits-cpu).

    Presets of image sets that need files (mnist, cifar10, ...) are left out: they run from a saved run
    configuration whose ``training.data_dir`` points at the files.
    """
    return [p for p in list_presets() if p.training.get("data") in IMAGE_DATASETS and _runs_here(p)]


def studio_presets() -> list[Preset]:
    """Every shipped preset the studio can run: the 2-D densities, then the images."""
    return [*toy_presets(), *image_presets()]
