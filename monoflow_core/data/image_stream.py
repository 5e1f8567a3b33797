"""The seeded, resumable stream of training batches over an :class:`~monoflow_core.data.images.ImageSet`."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .image_set import ImageSet, check_positive_int

__all__ = ["ImageStream"]

# ----------------------------------------------------------------------------------------------------------
# the training stream
# ----------------------------------------------------------------------------------------------------------


class ImageStream:
    """Seeded, resumable stream of training batches: epochs of a seeded permutation (numpy Generator).

    Epoch ``e`` visits the images in the order ``numpy.random.default_rng([seed, e]).permutation(N)``; batches
    are consecutive slices of that order and continue into the next epoch's permutation when one runs out, so
    every epoch shows every image exactly once. Because each permutation is a pure function of ``(seed, e)``,
    the whole state is ``(seed, epoch, position)``: :meth:`state_dict` is a few ints (not a permutation of a
    million indices) and a resumed stream continues bit for bit.

    Args:
        images: the split to draw from (not copied; batches are gathered from ``images.images``).
        seed: a non-negative int.

    Raises:
        ValueError: an empty image set or a negative / non-integer seed.
    """

    def __init__(self, images: ImageSet, seed: int = 0) -> None:
        if not isinstance(images, ImageSet):
            raise TypeError(f"data: ImageStream needs an ImageSet, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError(f"data: ImageStream needs a non-empty image set, {images!r} is empty")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
            raise ValueError(f"data: ImageStream seed must be a non-negative int, got {seed!r}")
        self.images: ImageSet = images
        self.seed: int = int(seed)
        self._epoch: int = 0
        self._position: int = 0
        self._perm: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"ImageStream({self.images.name!r}/{self.images.split!r}, n={len(self.images)}, seed={self.seed}, "
            f"epoch={self._epoch}, position={self._position})"
        )

    @property
    def epoch(self) -> int:
        """Number of completed passes over the set (the epoch the next index comes from)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been handed out."""
        return self._position

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._perm = rng.permutation(len(self.images)).astype(np.int64)
        return self._perm

    def next_indices(self, n: int) -> np.ndarray:
        """Returns the next ``n`` indices (int64), continuing across epoch boundaries.

        Args:
            n: a positive int (may exceed the set size; the batch then spans several epochs).
        """
        n = check_positive_int(n, "the batch size n")
        size = len(self.images)
        parts: list[np.ndarray] = []
        remaining = n
        while remaining:
            take = min(remaining, size - self._position)
            parts.append(self._permutation()[self._position : self._position + take])
            self._position += take
            remaining -= take
            if self._position == size:
                self._epoch += 1
                self._position = 0
                self._perm = None
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def sample(self, n: int) -> Tensor:
        """Returns the next ``n`` images, a new ``uint8`` tensor of shape ``(n, C, H, W)``."""
        return self.images.images[torch.from_numpy(self.next_indices(n))]

    def state_dict(self) -> dict[str, Any]:
        """Returns the stream's position as a JSON-serialisable dict of plain ints and strings."""
        return {
            "name": self.images.name,
            "split": self.images.split,
            "size": len(self.images),
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict` (possibly after a JSON round trip).

        Args:
            state: the dict from :meth:`state_dict`; its seed replaces this stream's seed.

        Raises:
            ValueError: a malformed state, or one saved for a set of another name, split or size.
        """
        keys = {"name", "split", "size", "seed", "epoch", "position"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"data: ImageStream.load_state_dict expects a dict with keys {sorted(keys)}")
        ints = {}
        for key in ("size", "seed", "epoch", "position"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
                raise ValueError(f"data: ImageStream state {key!r} must be a non-negative int, got {value!r}")
            ints[key] = int(value)
        here = (self.images.name, self.images.split, len(self.images))
        saved = (state["name"], state["split"], ints["size"])
        if saved != here:
            raise ValueError(f"data: state belongs to a stream over {saved} (name, split, size), this one is {here}")
        if ints["position"] > ints["size"]:
            raise ValueError(f"data: ImageStream state position {ints['position']} exceeds the size {ints['size']}")
        self.seed = ints["seed"]
        self._epoch, self._position = ints["epoch"], ints["position"]
        if self._position == ints["size"]:
            self._epoch, self._position = self._epoch + 1, 0
        self._perm = None
