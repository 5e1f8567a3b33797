"""Shipped example models: the trained flows of our Table 1 reproduction, ready to open without training.

Each example is a weights-only checkpoint (no optimizer state, no random-number state) in the shipped assets'
``models/`` folder, written by ``benchmarks/export_examples.py`` from the final checkpoints of
``benchmarks/table1.py``. Its metadata (under ``"user"``) records the data set, the preset, the number of
iterations it was trained for and its test NLL in nats, so a listing needs no model to be built.

Every command and the studio open an example like any checkpoint (``monoflow eval``, ``sample``, ``density``;
*File > Open example* in the studio). Training on from one starts a new run from its weights: Adam's moment
estimates start at zero (they were not shipped), so the first steps take the size of a fresh Adam's steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assets import assets_dir
from .checkpoint import CheckpointError, read_checkpoint_metadata, save_checkpoint
from .flow import Flow

__all__ = ["Example", "examples_dir", "find_example", "list_examples", "write_example"]

#: The suffix every shipped example carries.
EXAMPLE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Example:
    """One shipped model.

    Attributes:
        name: the file's stem, e.g. ``"8gaussians-monotone"``.
        path: the weights-only checkpoint.
        data: the toy data set it was trained on.
        model: ``"monotone"`` or ``"idensenet"``.
        preset: the preset it was trained with.
        iterations: training iterations.
        test_nll_nats: test NLL in nats on a fixed held-out set (exact log-det, float64); NaN when unrecorded.
    """

    name: str
    path: Path
    data: str
    model: str
    preset: str
    iterations: int
    test_nll_nats: float

    @property
    def title(self) -> str:
        """A menu label, e.g. ``"8gaussians: Monotone (2.843 nats)"``."""
        family = {"monotone": "Monotone", "idensenet": "i-DenseNet"}.get(self.model, self.model)
        nll = "" if math.isnan(self.test_nll_nats) else f" ({self.test_nll_nats:.3f} nats)"
        return f"{self.data}: {family}{nll}"


def examples_dir() -> Path:
    """The folder the shipped example models are read from."""
    return assets_dir() / "models"


def _describe(path: Path) -> Example:
    """An :class:`Example` from a checkpoint's header alone (no tensors are read)."""
    user: Any = read_checkpoint_metadata(path).get("user")
    if not isinstance(user, dict):
        raise CheckpointError(f"example {path}: its metadata has no 'user' object describing the example")
    try:
        return Example(
            name=path.stem,
            path=path,
            data=str(user["data"]),
            model=str(user["model"]),
            preset=str(user["preset"]),
            iterations=int(user["iterations"]),
            test_nll_nats=float(user.get("test_nll_nats", math.nan)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"example {path}: metadata field {err} missing or of the wrong type") from None


def list_examples() -> list[Example]:
    """Every shipped example, sorted by data set then model (an empty list when none ship)."""
    folder = examples_dir()
    if not folder.is_dir():
        return []
    found = [_describe(p) for p in sorted(folder.glob(f"*{EXAMPLE_SUFFIX}"))]
    return sorted(found, key=lambda e: (e.data, e.model))


def find_example(name: str) -> Example:
    """The shipped example called ``name`` (a file stem such as ``"moons-monotone"``).

    Raises:
        KeyError: no example has that name; the message lists the names that exist.
    """
    for example in list_examples():
        if example.name == name:
            return example
    names = ", ".join(e.name for e in list_examples()) or "none ship with this installation"
    raise KeyError(f"no example model {name!r}; the examples are: {names}")


def write_example(
    path: str | Path,
    flow: Flow,
    *,
    data: str,
    model: str,
    preset: str,
    iterations: int,
    test_nll_nats: float,
    extra: dict[str, Any] | None = None,
) -> Example:
    """Write ``flow`` as a weights-only example checkpoint (no optimizer or random-number state) and describe it.

    Args:
        path: the file to write (``*.safetensors``), atomically.
        flow: a flow built by :func:`monoflow_core.models.build_flow` (it carries its configuration).
        data: the toy data set it was trained on.
        model: the model family's short name (``"monotone"``, ``"idensenet"``).
        preset: the preset it was trained with.
        iterations: training iterations.
        test_nll_nats: its test NLL in nats.
        extra: further JSON-serialisable facts to record (e.g. how the NLL was measured).

    Returns:
        The written example, read back from its header.
    """
    metadata = {
        "data": data,
        "model": model,
        "preset": preset,
        "iterations": int(iterations),
        "test_nll_nats": float(test_nll_nats),
        **(extra or {}),
    }
    written = save_checkpoint(path, flow, metadata=metadata)
    return _describe(Path(written))
