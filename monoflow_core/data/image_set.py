"""The record of one image data split (:class:`ImageSet`), the readers' error type and shared argument checks."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ImageDataError", "ImageSet", "PathLike", "check_positive_int"]

PathLike = str | os.PathLike[str]


class ImageDataError(ValueError):
    """A data file is missing or malformed; the message names the file (or folder) and what is wrong."""


# eq=False: the generated __eq__ would compare tensors element-wise and fail in a bool context; identity is the
# only cheap, well-defined equality. repr=False: the default repr would print the pixels.
@dataclass(frozen=True, eq=False, repr=False)
class ImageSet:
    """One split of an image data set.

    Attributes:
        name: the data set name, one of :data:`IMAGE_DATASETS`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        images: ``uint8`` tensor of shape ``(N, C, H, W)``, contiguous, values in ``[0, levels - 1]``. It is the
            caller's own copy (never shared with the loader's cache).
        levels: number of intensity levels (17 for digits, 256 otherwise).

    Raises:
        ValueError: if ``images`` is not a contiguous 4-D uint8 tensor or ``levels`` is not in ``[2, 256]``.
    """

    name: str
    split: str
    images: Tensor
    levels: int

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else images
            raise ValueError(f"data: ImageSet.images must be a uint8 (N, C, H, W) tensor, got {got!r}")
        if not images.is_contiguous():
            raise ValueError("data: ImageSet.images must be contiguous")
        if isinstance(self.levels, bool) or not isinstance(self.levels, numbers.Integral):
            raise ValueError(f"data: ImageSet.levels must be an int, got {self.levels!r}")
        if not 2 <= int(self.levels) <= 256:
            raise ValueError(f"data: ImageSet.levels must be in [2, 256], got {self.levels}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageSet(name={self.name!r}, split={self.split!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"levels={self.levels})"
        )


def check_positive_int(n: Any, what: str) -> int:
    """``n`` as an int >= 1 (bools refused), else ``ValueError("data: <what> must be a positive int ...")``."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"data: {what} must be a positive int, got {n!r}")
    return int(n)
