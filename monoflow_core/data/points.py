"""A user's own 2-D points as a training set: the held-out split, the standardisation and the batch stream.

A :class:`PointSet` is what a run on ``data = "points"`` (:data:`POINTS_DATA`) trains on, made either from a file
(:func:`load_points`, reading CSV / NPY / NPZ with :mod:`monoflow_core.data.point_files`) or from an array, such as
the points drawn with the mouse in the studio (:func:`make_point_set`). Making one:

1. **splits** the points with a seeded permutation (``numpy.random.default_rng(split_seed)``): ``round(holdout n)``
   points (at least one; :data:`DEFAULT_HOLDOUT` is 20 %) are held out for the test NLL, the rest are trained on;
2. **standardises** them with the training part's per-column mean and standard deviation,
   ``z = (x - mean) / scale``, so that any units land in the region the flow's defaults and the studio's view
   ([-4, 4]^2) are made for. Drawn points already live in that region: they keep the identity (mean 0, scale 1).

The flow models ``z``. A density in the data's own units follows from the change of variables,
``log p_x(x) = log p_z((x - mean) / scale) - sum(log scale)`` (:attr:`PointSet.log_scale`), and samples map back with
:meth:`PointSet.to_data`; the transform is part of the set and is shown with it (:meth:`PointSet.describe`).

The set travels with the run: a checkpoint stores its four float64 tensors (standardised training and held-out
points, mean and scale, as ``data.*``) and its description (JSON), and rebuilds it with
:meth:`PointSet.from_checkpoint`, which checks shapes, bounds and values first. Training batches come from
:class:`PointStream`: ``batch_size`` indices drawn uniformly, with replacement, from the training part by a seeded
numpy generator whose state is saved with the run, so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import copy
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .point_files import MAX_POINTS, ColumnChoice, PointDataError, read_point_table

__all__ = [
    "DEFAULT_HOLDOUT",
    "DEFAULT_SPLIT_SEED",
    "MIN_POINTS",
    "POINTS_DATA",
    "PointDataError",
    "PointSet",
    "PointStream",
    "load_points",
    "make_point_set",
]

#: The ``TrainConfig.data`` of a run on a user's points (the points themselves travel with the run).
POINTS_DATA = "points"

#: Fraction of the points held out for the test NLL.
DEFAULT_HOLDOUT = 0.2

#: Seed of the held-out split (the same default as ``TrainConfig.test_seed``).
DEFAULT_SPLIT_SEED = 1234

#: Fewest points a set may have: enough for a training part with a spread and a held-out part of at least one.
MIN_POINTS = 10

#: Largest absolute value accepted: squares of the deviations (the standard deviation) must not overflow float64.
MAX_ABS_VALUE = 1e150

#: The tensors a checkpoint stores, under ``data.<name>``.
TENSOR_NAMES = ("train", "test", "mean", "scale")

_TEXT_LIMIT = 200  # longest source or column name kept (they come from user files)


def _text(value: str) -> str:
    value = " ".join(str(value).split())
    return value if len(value) <= _TEXT_LIMIT else value[: _TEXT_LIMIT - 3] + "..."


@dataclass(frozen=True, eq=False)
class PointSet:
    """A user's 2-D points, split and standardised (see the module docstring).

    Attributes:
        train: standardised training points, float64 ``(n_train, 2)``.
        test: standardised held-out points, float64 ``(n_test, 2)``.
        mean: per-column mean of the raw training points, float64 ``(2,)``.
        scale: per-column standard deviation of the raw training points, float64 ``(2,)``, positive.
        source: where the points came from (a file name, or ``"drawing"``).
        columns: the names of the two columns used.
        holdout: the fraction held out.
        split_seed: the seed of the split.
    """

    train: Tensor
    test: Tensor
    mean: Tensor
    scale: Tensor
    source: str
    columns: tuple[str, str]
    holdout: float
    split_seed: int

    @property
    def n_points(self) -> int:
        return int(self.train.shape[0] + self.test.shape[0])

    @property
    def log_scale(self) -> float:
        """``sum(log scale)``: add it to an NLL in nats of the standardised points to get the NLL in data units."""
        return float(torch.log(self.scale).sum())

    @property
    def is_identity(self) -> bool:
        """Whether the transform is the identity (drawn points)."""
        return bool((self.mean == 0).all() and (self.scale == 1).all())

    def to_data(self, z: Tensor | np.ndarray) -> np.ndarray:
        """Map standardised points (e.g. model samples) back to the data's units: ``x = mean + scale z``."""
        return np.asarray(z, dtype=np.float64) * self.scale.numpy() + self.mean.numpy()

    def standardise(self, x: Tensor | np.ndarray) -> np.ndarray:
        """Map points in the data's units to the model's: ``z = (x - mean) / scale``."""
        return (np.asarray(x, dtype=np.float64) - self.mean.numpy()) / self.scale.numpy()

    def transform_text(self) -> str:
        """The transform in words, e.g. ``z = (x - mean) / scale, mean (1.2, -3), scale (0.5, 2)``."""
        if self.is_identity:
            return "identity transform (the points are used as they are)"
        m, s = self.mean.tolist(), self.scale.tolist()
        return (
            f"standardised z = (x - mean) / scale with mean ({m[0]:.4g}, {m[1]:.4g}), "
            f"scale ({s[0]:.4g}, {s[1]:.4g}) (from the training part)"
        )

    def split_text(self) -> str:
        """The split in words, e.g. ``800 to train on, 200 held out (20%, seed 1234) for the test NLL``."""
        return (
            f"{self.train.shape[0]:,} to train on, {self.test.shape[0]:,} held out ({self.holdout:.0%}, "
            f"seed {self.split_seed}) for the test NLL"
        )

    def describe(self) -> str:
        """One line: source, columns, size, split and transform."""
        return (
            f"{self.source} (columns {self.columns[0]}, {self.columns[1]}): {self.n_points:,} points, "
            f"{self.split_text()}; {self.transform_text()}"
        )

    # -- checkpoints -----------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, Tensor]:
        """The four tensors a checkpoint stores (contiguous CPU float64 copies), keyed by :data:`TENSOR_NAMES`."""
        return {
            name: getattr(self, name).detach().to("cpu", torch.float64).clone().contiguous() for name in TENSOR_NAMES
        }

    def info(self) -> dict[str, Any]:
        """The JSON description a checkpoint stores next to the tensors."""
        return {
            "source": self.source,
            "columns": list(self.columns),
            "holdout": self.holdout,
            "split_seed": self.split_seed,
        }

    @staticmethod
    def check_table(entries: dict[str, tuple[str, tuple[int, ...]]]) -> None:
        """Check a checkpoint's ``data.*`` tensor table (safetensors dtype name and shape per name) before reading.

        Raises:
            ValueError: a missing or unexpected tensor, a dtype other than float64, or a shape out of bounds.
        """
        if set(entries) != set(TENSOR_NAMES):
            missing, extra = sorted(set(TENSOR_NAMES) - set(entries)), sorted(set(entries) - set(TENSOR_NAMES))
            raise ValueError(
                f"point data: expected tensors data.{', data.'.join(TENSOR_NAMES)}"
                + (f"; missing {missing}" if missing else "")
                + (f"; unexpected {extra}" if extra else "")
            )
        for name, (dtype, shape) in entries.items():
            if dtype != "F64":
                raise ValueError(f"point data: tensor data.{name} must be float64 (F64), got {dtype}")
            if name in ("mean", "scale"):
                ok = shape == (2,)
                want = "shape [2]"
            else:
                low = 2 if name == "train" else 1
                ok = len(shape) == 2 and shape[1] == 2 and low <= shape[0] <= MAX_POINTS
                want = f"shape [n, 2] with {low} <= n <= {MAX_POINTS:,}"
            if not ok:
                raise ValueError(f"point data: tensor data.{name} must have {want}, got {list(shape)}")

    @staticmethod
    def check_info(info: Any) -> dict[str, Any]:
        """Check a checkpoint's point-set description (types and bounds); returns it.

        Raises:
            ValueError: naming the field.
        """
        if not isinstance(info, dict):
            raise ValueError(f"point data: its description must be an object, got {type(info).__name__}")
        source, columns = info.get("source"), info.get("columns")
        if not isinstance(source, str) or len(source) > _TEXT_LIMIT:
            raise ValueError(f"point data: source must be a string of at most {_TEXT_LIMIT} characters")
        if (
            not isinstance(columns, list)
            or len(columns) != 2
            or not all(isinstance(c, str) and len(c) <= _TEXT_LIMIT for c in columns)
        ):
            raise ValueError("point data: columns must be a list of two names")
        holdout = info.get("holdout")
        if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0.0 < holdout <= 0.5:
            raise ValueError(f"point data: holdout must be a number in (0, 0.5], got {holdout!r}")
        seed = info.get("split_seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(f"point data: split_seed must be an integer in [0, 2**63), got {seed!r}")
        return info

    @classmethod
    def from_checkpoint(cls, tensors: dict[str, Tensor], info: Any) -> PointSet:
        """Rebuild a set from a checkpoint's tensors (keyed by :data:`TENSOR_NAMES`) and description.

        Raises:
            ValueError: the table, the description or a value is invalid (non-finite points, a scale that is not
                positive).
        """
        cls.check_table(
            {k: ("F64" if v.dtype == torch.float64 else str(v.dtype), tuple(v.shape)) for k, v in tensors.items()}
        )
        info = cls.check_info(info)
        for name in TENSOR_NAMES:
            if not bool(torch.isfinite(tensors[name]).all()):
                raise ValueError(f"point data: tensor data.{name} holds non-finite values")
        if not bool((tensors["scale"] > 0).all()):
            raise ValueError("point data: tensor data.scale must be positive")
        return cls(
            train=tensors["train"],
            test=tensors["test"],
            mean=tensors["mean"],
            scale=tensors["scale"],
            source=info["source"],
            columns=(info["columns"][0], info["columns"][1]),
            holdout=float(info["holdout"]),
            split_seed=int(info["split_seed"]),
        )


def _check_holdout(holdout: Any) -> float:
    if isinstance(holdout, bool) or not isinstance(holdout, int | float) or not 0.0 < float(holdout) <= 0.5:
        raise PointDataError(f"holdout: the held-out fraction must lie in (0, 0.5], got {holdout!r}")
    return float(holdout)


def make_point_set(
    points: np.ndarray | Tensor,
    *,
    source: str,
    columns: tuple[str, str] = ("x1", "x2"),
    holdout: float = DEFAULT_HOLDOUT,
    split_seed: int = DEFAULT_SPLIT_SEED,
    standardise: bool = True,
) -> PointSet:
    """Split and (optionally) standardise raw 2-D points (see the module docstring).

    Args:
        points: ``(n, 2)`` finite values.
        source: where they come from (a file name, ``"drawing"``), kept with the run.
        columns: names of the two columns.
        holdout: the fraction held out for the test NLL, in (0, 0.5].
        split_seed: seed of the split (a non-negative int).
        standardise: standardise with the training part's mean and standard deviation; ``False`` keeps the
            identity (points already in the model's region, e.g. drawn on the studio's canvas).

    Raises:
        PointDataError: too few points, a non-finite or huge value, a constant column (nothing to standardise by),
            or a bad holdout / seed.
    """
    array = np.asarray(points, dtype=np.float64)
    where = _text(source)
    if array.ndim != 2 or array.shape[1] != 2:
        raise PointDataError(f"{where}: points must form an array of shape (n, 2), got {array.shape}")
    n = array.shape[0]
    if n < MIN_POINTS:
        raise PointDataError(
            f"{where}: holds {n} point{'s' if n != 1 else ''}; at least {MIN_POINTS} are needed "
            "(most to train on, some held out for the test NLL)"
        )
    if n > MAX_POINTS:
        raise PointDataError(f"{where}: holds {n:,} points; at most {MAX_POINTS:,} are used")
    if not np.isfinite(array).all():
        raise PointDataError(f"{where}: holds non-finite values; non-finite points are refused")
    biggest = float(np.abs(array).max())
    if biggest > MAX_ABS_VALUE:
        raise PointDataError(
            f"{where}: holds values up to {biggest:.3g}; values beyond {MAX_ABS_VALUE:g} cannot be "
            "standardised in float64 (rescale the data)"
        )
    holdout = _check_holdout(holdout)
    if isinstance(split_seed, bool) or not isinstance(split_seed, numbers.Integral) or not 0 <= split_seed < 2**63:
        raise PointDataError(f"split seed: must be an integer in [0, 2**63), got {split_seed!r}")
    n_test = max(1, round(holdout * n))
    order = np.random.default_rng(int(split_seed)).permutation(n)
    test_raw = array[np.sort(order[:n_test])]
    train_raw = array[np.sort(order[n_test:])]
    if standardise:
        mean = train_raw.mean(axis=0)
        scale = train_raw.std(axis=0)
        for k in range(2):
            # A spread below 1e-12 of the values' size is rounding: standardising would blow it up to noise.
            if not scale[k] > 1e-12 * max(1.0, float(np.abs(train_raw[:, k]).max())):
                raise PointDataError(
                    f"{where}: column {columns[k]!r} is constant (every training value is "
                    f"{train_raw[0, k]:.6g}); it cannot be standardised: 2-D points need a spread "
                    "in both columns"
                )
    else:
        mean, scale = np.zeros(2), np.ones(2)
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))  # noqa: E731
    return PointSet(
        train=as_tensor((train_raw - mean) / scale),
        test=as_tensor((test_raw - mean) / scale),
        mean=as_tensor(mean),
        scale=as_tensor(scale),
        source=where,
        columns=(_text(columns[0]), _text(columns[1])),
        holdout=holdout,
        split_seed=int(split_seed),
    )


def load_points(
    path: str | os.PathLike[str],
    columns: Sequence[ColumnChoice] | None = None,
    *,
    holdout: float = DEFAULT_HOLDOUT,
    split_seed: int = DEFAULT_SPLIT_SEED,
) -> PointSet:
    """Read a CSV, NPY or NPZ file of 2-D points into a split, standardised :class:`PointSet`.

    Args:
        path: the file (see :mod:`monoflow_core.data.point_files` for what each format may hold).
        columns: the two columns (names or positions); required when the file has more than two.
        holdout: the fraction held out for the test NLL, in (0, 0.5].
        split_seed: seed of the split.

    Raises:
        PointDataError: one message naming the file and the problem (missing, empty, oversized, malformed, a
            missing or ambiguous column choice, text where a number belongs, a non-finite row, a constant column).
    """
    table = read_point_table(path)
    points, names = table.read(columns)
    return make_point_set(points, source=Path(path).name, columns=names, holdout=holdout, split_seed=split_seed)


# ----------------------------------------------------------------------------------------------------------
# the training stream
# ----------------------------------------------------------------------------------------------------------


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
        raise ValueError(f"data: PointStream seed must be a non-negative int, got {seed!r}")
    return int(seed)


def check_stream_state(state: Any, size: int) -> None:
    """Check a :meth:`PointStream.state_dict` (e.g. from a checkpoint) against a training part of ``size`` points.

    Raises:
        ValueError: a malformed state, one of another stream or size, or an invalid generator state.
    """
    if not isinstance(state, dict) or not {"name", "seed", "size", "rng"} <= state.keys():
        raise ValueError("data: PointStream state must be an object with keys 'name', 'seed', 'size', 'rng'")
    if state["name"] != POINTS_DATA:
        raise ValueError(f"data: state belongs to a {state['name']!r} stream, not to a {POINTS_DATA!r} one")
    _check_seed(state["seed"])
    if state["size"] != size or isinstance(state["size"], bool):
        raise ValueError(f"data: state was saved for {state['size']!r} training points, this set has {size}")
    rng = state["rng"]
    if not isinstance(rng, dict) or rng.get("bit_generator") != "PCG64":
        raise ValueError("data: the PointStream generator state must be a PCG64 state")
    try:
        np.random.default_rng(0).bit_generator.state = copy.deepcopy(rng)
    except Exception as err:  # numpy raises several types for a malformed generator state
        raise ValueError(f"data: invalid generator state in a PointStream state ({err})") from None


class PointStream:
    """Seeded, resumable batches from a :class:`PointSet`'s training part: uniform draws with replacement.

    ``sample(n)`` draws ``n`` indices with ``Generator.integers`` of ``numpy.random.default_rng(seed)``, so a
    sequence of batches is a pure function of the seed and the batch sizes; :meth:`state_dict` saves the generator
    so that a resumed run continues with the same draws.

    Args:
        points: the set (only its training part is drawn from).
        seed: a non-negative int (the run's seed).
    """

    def __init__(self, points: PointSet, seed: int = 0) -> None:
        self.points = points
        self.seed = _check_seed(seed)
        self._gen = np.random.default_rng(self.seed)

    def __repr__(self) -> str:
        return f"PointStream(n={self.points.train.shape[0]}, seed={self.seed})"

    def sample(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """The next ``n`` training points (standardised), a new tensor of ``dtype`` and shape ``(n, 2)``."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
            raise ValueError(f"data: the number of points n must be a positive int, got {n!r}")
        index = self._gen.integers(0, self.points.train.shape[0], size=int(n))
        return self.points.train[torch.from_numpy(index)].to(dtype)

    def state_dict(self) -> dict[str, Any]:
        """The stream's state as plain JSON (``name``, ``seed``, ``size`` and the numpy generator state)."""
        rng = copy.deepcopy(self._gen.bit_generator.state)
        return {
            "name": POINTS_DATA,
            "seed": self.seed,
            "size": int(self.points.train.shape[0]),
            "rng": {
                k: (
                    {kk: int(vv) for kk, vv in v.items()}
                    if isinstance(v, dict)
                    else (int(v) if isinstance(v, numbers.Integral) else v)
                )
                for k, v in rng.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (possibly after a JSON round trip).

        Raises:
            ValueError: see :func:`check_stream_state`.
        """
        check_stream_state(state, int(self.points.train.shape[0]))
        self._gen.bit_generator.state = copy.deepcopy(state["rng"])
        self.seed = int(state["seed"])
