"""Which data ``--data`` names, and which preset trains on it by default.

A data set name (a toy density, the staircase, an image set) or a file of the user's own 2-D points
(:mod:`monoflow_core.cli.points`); each kind of data needs a preset of its kind (2-D density, 1-D staircase,
image).
"""

from __future__ import annotations

from typing import Any

from ..data import DATASETS, TOY_DATASETS, check_dataset_name
from ..data.images import IMAGE_DATASETS
from ..data.point_files import looks_like_point_file
from ..data.points import POINTS_DATA
from .errors import CLIError

#: Preset used for the 2-D densities when ``--preset`` is not given.
DEFAULT_TOY_PRESET = "paper-toy-monotone"
#: Preset used for ``--data staircase`` when ``--preset`` is not given.
DEFAULT_1D_PRESET = "paper-1d-d"
#: Preset used for each image set when ``--preset`` is not given.
DEFAULT_IMAGE_PRESETS = {
    "digits": "digits-cpu",
    "mnist": "paper-mnist",
    "cifar10": "paper-cifar10",
    "imagenet32": "paper-imagenet32",
    "imagenet64": "paper-imagenet64",
    "folder": "digits-cpu",
}
ALL_DATA = (*DATASETS, *IMAGE_DATASETS)


def _data_name(name: str) -> str:
    """Canonical name of any training data set (toy, staircase or image), or a CLI error listing them."""
    if isinstance(name, str) and name.lower() in IMAGE_DATASETS:
        return name.lower()
    if isinstance(name, str) and name.lower() in DATASETS:
        return check_dataset_name(name)
    if isinstance(name, str) and name and looks_like_point_file(name):
        return POINTS_DATA  # a file of the user's own 2-D points (monoflow_core.cli.points)
    raise CLIError(
        f"--data: unknown data set {name!r}; choose one of {list(ALL_DATA)}, or give a .csv, .npy or "
        ".npz file of 2-D points"
    )


def _data_kind(data: str) -> str:
    """The kind of preset a canonical data name needs: ``"image"``, ``"2-D density"`` or ``"1-D staircase"``."""
    if data in IMAGE_DATASETS:
        return "image"
    return "2-D density" if data in TOY_DATASETS or data == POINTS_DATA else "1-D staircase"


def _default_preset(data: str) -> str:
    """The preset ``train`` uses for a canonical data name when ``--preset`` is not given."""
    if data in IMAGE_DATASETS:
        return DEFAULT_IMAGE_PRESETS[data]
    return DEFAULT_TOY_PRESET if data in TOY_DATASETS or data == POINTS_DATA else DEFAULT_1D_PRESET


def _preset_kind(preset: Any) -> str:
    data = str(preset.training.get("data", ""))
    if data in IMAGE_DATASETS or preset.model.get("image_shape") is not None:
        return "image"
    return "1-D staircase" if preset.model.get("dim", 2) == 1 else "2-D density"
