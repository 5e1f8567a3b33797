"""Toy data sets of the Monotone Flows paper: eight 2-D densities and the 1-D staircase regression task.

The 2-D densities are those of Table 1 of Ahn et al., "Invertible Monotone Operators for Normalizing Flows"
(NeurIPS 2022), which took them unchanged from the FFJORD code base (Grathwohl et al., ICLR 2019,
``lib/toy_data.py``), also used by Residual Flows (Chen et al., NeurIPS 2019) and i-DenseNets (Perugachi-Diaz
et al., NeurIPS 2021). docs/algorithm.md section 9.1 spells each one out; this module follows it line by line:

* ``swissroll``: scikit-learn ``make_swiss_roll(n, noise=1.0)``, columns 0 and 2, divided by 5;
* ``circles``: scikit-learn ``make_circles(n, factor=0.5, noise=0.08)``, times 3;
* ``rings``: 4 concentric circles of radii 1, 0.75, 0.5, 0.25 with evenly spaced angles, times 3, shuffled,
  plus N(0, 0.08^2) noise;
* ``moons``: scikit-learn ``make_moons(n, noise=0.1)``, times 2, plus (-1, -0.2);
* ``8gaussians``: 8 centres at 45-degree steps on the circle of radius 4, plus N(0, 0.5^2 I), divided by
  1.414;
* ``pinwheel``: 5 arms of N(0, diag(0.3^2, 0.1^2)) + (1, 0) rotated by 2 pi c / 5 + 0.25 exp(f0), times 2,
  shuffled;
* ``2spirals``: two interleaved spirals ``t (-cos t, sin t)`` with ``t = sqrt(U) 3 pi``, divided by 3, plus
  N(0, 0.1^2) noise;
* ``checkerboard``: uniform on the 8 "black" squares of a 4 x 4 board of side-2 squares on [-4, 4]^2.

The 1-D task is the staircase of the paper's Figure 4 (docs/algorithm.md section 9.2): ``x ~ U(-2, 2)`` and
``y(x) = t(x + 2) + t(x + 1) + t(x) + t(x - 1)`` with
``t(w) = min(max(max(0, a w), min((w - (1 - a)) / a, 1)), 1)``, ``a = 0.05``.

All randomness comes from a :class:`numpy.random.Generator` (an integer seed is turned into
``numpy.random.default_rng(seed)``); the scikit-learn generators receive an integer ``random_state`` drawn
from it, so a seed reproduces every point. Points are computed in float64 with numpy and returned as CPU
:class:`torch.Tensor` of the requested floating dtype (float32 by default). :class:`ToyStream` wraps a seeded
generator whose state can be saved to JSON and restored, so a training run resumes with the same fresh draws.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "STAIRCASE_SLOPE_A",
    "TOY_DATASETS",
    "ToyStream",
    "check_dataset_name",
    "sample_staircase",
    "sample_toy",
    "staircase_target",
]

#: Names of the eight 2-D toy densities (docs/algorithm.md section 9.1), in the order of the paper's Table 1.
TOY_DATASETS: tuple[str, ...] = (
    "2spirals",
    "8gaussians",
    "checkerboard",
    "circles",
    "moons",
    "pinwheel",
    "rings",
    "swissroll",
)

#: Every data set name this package knows: the 2-D densities plus the 1-D ``"staircase"`` task (7.2).
DATASETS: tuple[str, ...] = (*TOY_DATASETS, "staircase")

#: Slope ``a`` of the staircase treads (the risers have slope ``1 / a = 20``), docs/algorithm.md section 9.2
STAIRCASE_SLOPE_A: float = 0.05

RngLike = np.random.Generator | int | None


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------


def check_dataset_name(name: str) -> str:
    """Validates a data set name.

    Args:
        name: one of :data:`DATASETS` (matched case-insensitively).

    Returns:
        The canonical (lower-case) name.

    Raises:
        ValueError: if ``name`` is not a known data set; the message lists the valid names.
    """
    if isinstance(name, str) and name.lower() in DATASETS:
        return name.lower()
    raise ValueError(f"data: unknown data set {name!r}; choose one of {list(DATASETS)}")


def _check_n(n: Any) -> int:
    """Returns ``n`` as a python int; raises ValueError unless it is a positive integer (bools rejected)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"data: the number of points n must be a positive int, got {n!r}")
    return int(n)


def _check_dtype(dtype: Any) -> torch.dtype:
    """Returns ``dtype`` if it is a floating torch dtype, else raises TypeError."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"data: dtype must be a floating-point torch.dtype, got {dtype!r}")
    return dtype


def _as_generator(rng: RngLike) -> np.random.Generator:
    """Turns ``rng`` into a numpy Generator: a Generator is used as is (and advanced), an int is a seed for
    ``numpy.random.default_rng``, ``None`` gives fresh OS entropy."""
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if int(rng) < 0:
            raise ValueError(f"data: a seed must be a non-negative int, got {rng!r}")
        return np.random.default_rng(int(rng))
    kind = type(rng).__name__
    raise TypeError(f"data: rng must be a numpy.random.Generator, an int seed or None, got {kind}")


def _sklearn_seed(gen: np.random.Generator) -> int:
    """Draws an integer ``random_state`` for scikit-learn (any value a legacy RandomState accepts)."""
    return int(gen.integers(0, 2**32))


def _to_tensor(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# the eight 2-D generators (numpy float64 arrays of shape (n, 2))
# ----------------------------------------------------------------------------------------------------------


def _swissroll(n: int, gen: np.random.Generator) -> np.ndarray:
    """sklearn ``make_swiss_roll(n, noise=1.0)``, columns 0 and 2, divided by 5 (FFJORD ``swissroll``)."""
    from sklearn.datasets import make_swiss_roll  # lazy: importing scikit-learn costs ~1.5 s

    x, _ = make_swiss_roll(n_samples=n, noise=1.0, random_state=_sklearn_seed(gen))
    return x[:, [0, 2]] / 5.0


def _circles(n: int, gen: np.random.Generator) -> np.ndarray:
    """sklearn ``make_circles(n, factor=0.5, noise=0.08)`` times 3: radii 3 and 1.5 (FFJORD ``circles``)."""
    from sklearn.datasets import make_circles

    x, _ = make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=_sklearn_seed(gen))
    return x * 3.0


def _rings(n: int, gen: np.random.Generator) -> np.ndarray:
    """4 concentric circles of radii (1, 0.75, 0.5, 0.25) times 3 with evenly spaced angles, ``n // 4`` points
    on each of the three outer ones and the rest on the innermost, shuffled, plus N(0, 0.08^2) noise (FFJORD
    ``rings``)."""
    q = n // 4
    counts = (q, q, q, n - 3 * q)
    radii = (1.0, 0.75, 0.5, 0.25)
    parts = []
    for count, radius in zip(counts, radii, strict=True):
        angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
        parts.append(np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius)
    x = np.concatenate(parts, axis=0) * 3.0
    x = x[gen.permutation(n)]
    return x + gen.normal(scale=0.08, size=x.shape)


def _moons(n: int, gen: np.random.Generator) -> np.ndarray:
    """sklearn ``make_moons(n, noise=0.1)`` times 2 plus (-1, -0.2) (FFJORD ``moons``)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.1, random_state=_sklearn_seed(gen))
    return x * 2.0 + np.array([-1.0, -0.2])


def _eight_gaussians(n: int, gen: np.random.Generator) -> np.ndarray:
    """8 centres at 45-degree steps on the circle of radius 4, each point centre + N(0, 0.5^2 I), everything
    divided by 1.414 (FFJORD ``8gaussians``; 1.414, not sqrt(2), as in the reference code)."""
    angle = np.arange(8) * (np.pi / 4.0)
    centres = 4.0 * np.stack([np.cos(angle), np.sin(angle)], axis=1)
    idx = gen.integers(0, 8, size=n)
    x = centres[idx] + 0.5 * gen.standard_normal((n, 2))
    return x / 1.414


def _pinwheel(n: int, gen: np.random.Generator) -> np.ndarray:
    """5 arms; features N(0, diag(0.3^2, 0.1^2)) + (1, 0), rotated by ``2 pi c / 5 + 0.25 exp(f0)``, times 2,
    shuffled (FFJORD ``pinwheel``).

    Each arm gets ``n // 5`` points; when 5 does not divide ``n`` the first ``n % 5`` arms get one more, so
    that exactly ``n`` points come back. The rotation follows the reference code, which multiplies the feature
    *row* vector by ``[[cos, -sin], [sin, cos]]``: ``p = (f0 cos + f1 sin, -f0 sin + f1 cos)``, i.e. the angle
    is measured clockwise. (Its mirror image would have the same NLL; we keep the reference's orientation.)
    """
    num_arms = 5
    counts = np.full(num_arms, n // num_arms)
    counts[: n % num_arms] += 1
    labels = np.repeat(np.arange(num_arms), counts)
    f = gen.standard_normal((n, 2)) * np.array([0.3, 0.1])
    f[:, 0] += 1.0
    angle = 2.0 * np.pi * labels / num_arms + 0.25 * np.exp(f[:, 0])
    c, s = np.cos(angle), np.sin(angle)
    x = np.stack([f[:, 0] * c + f[:, 1] * s, -f[:, 0] * s + f[:, 1] * c], axis=1)
    return 2.0 * x[gen.permutation(n)]


def _two_spirals(n: int, gen: np.random.Generator) -> np.ndarray:
    """``t = sqrt(U) * 540 * 2 pi / 360``, ``d = (-cos(t) t + 0.5 U', sin(t) t + 0.5 U'')`` (fresh uniforms
    for each coordinate, as in the reference code), stack ``d`` and ``-d``, divide by 3, plus N(0, 0.1^2)
    noise (FFJORD ``2spirals``).

    Not shuffled (the spec does not shuffle): the first ``ceil(n / 2)`` rows are one spiral and the rest the
    other. For odd ``n`` the last point of ``-d`` is dropped so exactly ``n`` points come back.
    """
    half = (n + 1) // 2
    t = np.sqrt(gen.random((half, 1))) * 540.0 * (2.0 * np.pi) / 360.0
    dx = -np.cos(t) * t + gen.random((half, 1)) * 0.5
    dy = np.sin(t) * t + gen.random((half, 1)) * 0.5
    d = np.hstack([dx, dy])
    x = np.vstack([d, -d])[:n] / 3.0
    return x + gen.standard_normal(x.shape) * 0.1


def _checkerboard(n: int, gen: np.random.Generator) -> np.ndarray:
    """``x1 ~ U(-2, 2)``, ``x2 = U(0, 1) - 2 randint{0, 1} + (floor(x1) mod 2)``, both times 2 (FFJORD
    ``checkerboard``): uniform on the 8 squares of side 2 in [-4, 4]^2 with ``floor(x1/2) + floor(x2/2)``
    even."""
    x1 = gen.random(n) * 4.0 - 2.0
    x2 = gen.random(n) - gen.integers(0, 2, size=n) * 2.0
    x2 = x2 + np.mod(np.floor(x1), 2.0)
    return np.stack([x1, x2], axis=1) * 2.0


_GENERATORS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "2spirals": _two_spirals,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "swissroll": _swissroll,
}


def sample_toy(name: str, n: int, rng: RngLike = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Draws ``n`` points from one of the eight 2-D toy densities of docs/algorithm.md section 9.1

    The densities are those of the Monotone Flows paper's Table 1 (Ahn et al. 2022), i.e. FFJORD's and
    Residual Flows' toy data (see the module docstring for each formula).

    Args:
        name: one of :data:`TOY_DATASETS` (case-insensitive).
        n: number of points, a positive int.
        rng: a :class:`numpy.random.Generator` (advanced in place), an int seed (``default_rng(seed)``; the
            same seed gives the same points) or ``None`` for fresh OS entropy.
        dtype: floating torch dtype of the result.

    Returns:
        A CPU tensor of shape ``(n, 2)`` and dtype ``dtype``, lying roughly in [-4, 4]^2.

    Raises:
        ValueError: for an unknown name, for ``"staircase"`` (use :func:`sample_staircase`), or if ``n`` is
            not a positive int.
        TypeError: for an ``rng`` or ``dtype`` of the wrong kind.
    """
    key = check_dataset_name(name)
    if key not in _GENERATORS:
        valid = list(TOY_DATASETS)
        raise ValueError(f"data: {key!r} is not a 2-D toy density (use sample_staircase); choose one of {valid}")
    n = _check_n(n)
    dtype = _check_dtype(dtype)
    gen = _as_generator(rng)
    x = _GENERATORS[key](n, gen)
    assert x.shape == (n, 2), x.shape
    return _to_tensor(x, dtype)


# ----------------------------------------------------------------------------------------------------------
# the 1-D staircase (docs/algorithm.md section 9.2)
# ----------------------------------------------------------------------------------------------------------


def _step(w: Tensor, a: float) -> Tensor:
    """One stair ``t(w) = min(max(max(0, a w), min((w - (1 - a)) / a, 1)), 1)``: 0 for ``w <= 0``, slope ``a``
    up to ``w = 1 / (1 + a)``, slope ``1 / a`` up to ``w = 1``, then 1."""
    tread = torch.clamp(a * w, min=0.0)
    riser = torch.clamp((w - (1.0 - a)) / a, max=1.0)
    return torch.clamp(torch.maximum(tread, riser), max=1.0)


def staircase_target(x: Tensor, a: float = STAIRCASE_SLOPE_A) -> Tensor:
    """The staircase regression target of the paper's Figure 4 (docs/algorithm.md section 9.2).

    ``y(x) = t(x + 2) + t(x + 1) + t(x) + t(x - 1)`` with
    ``t(w) = min(max(max(0, a w), min((w - (1 - a)) / a, 1)), 1)``: on [-2, 2] it climbs from ``y(-2) = 0`` to
    ``y(2) = 4`` in four steps that end at ``x = -1, 0, 1, 2``; the treads have slope ``a`` and the risers
    (of width ``a / (1 + a)`` just before each step end) slope ``1 / a = 20``. Pure torch, elementwise, works
    on any shape, dtype and device and is differentiable almost everywhere.

    Args:
        x: input tensor (any shape).
        a: tread slope; the paper uses 0.05.

    Returns:
        ``y(x)``, same shape, dtype and device as ``x``.
    """
    return _step(x + 2.0, a) + _step(x + 1.0, a) + _step(x, a) + _step(x - 1.0, a)


def sample_staircase(n: int, rng: RngLike = None, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Draws ``n`` (x, y) pairs of the 1-D staircase task (Ahn et al. 2022, Figure 4; docs/algorithm.md section 9.2).

    Args:
        n: number of points, a positive int.
        rng: a :class:`numpy.random.Generator`, an int seed or ``None`` (as in :func:`sample_toy`).
        dtype: floating torch dtype of the results.

    Returns:
        ``(x, y)``: CPU tensors of shape ``(n, 1)``, ``x ~ U(-2, 2)`` and ``y = staircase_target(x)``
        (computed in float64, then cast).

    Raises:
        ValueError: if ``n`` is not a positive int.
        TypeError: for an ``rng`` or ``dtype`` of the wrong kind.
    """
    n = _check_n(n)
    dtype = _check_dtype(dtype)
    gen = _as_generator(rng)
    x = torch.from_numpy(gen.uniform(-2.0, 2.0, size=(n, 1)))
    y = staircase_target(x)
    return x.to(dtype), y.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# resumable stream
# ----------------------------------------------------------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Recursively converts numpy scalars / containers to plain python objects (JSON-serialisable)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist())
    return obj


class ToyStream:
    """A seeded, resumable stream of fresh draws from one data set.

    Every :meth:`sample` call returns new points; the sequence is a deterministic function of the seed and of
    the sequence of call sizes (not of dtypes: points are always drawn in float64, then cast). The first
    call of ``ToyStream(name, seed).sample(n)`` equals ``sample_toy(name, n, seed)`` (or
    ``sample_staircase(n, seed)``). :meth:`state_dict` / :meth:`load_state_dict` save and restore the numpy
    generator state so that a resumed run continues with exactly the draws it would have had.

    Args:
        name: one of :data:`DATASETS` (case-insensitive).
        seed: a non-negative int seed for ``numpy.random.default_rng``.

    Raises:
        ValueError: for an unknown name or a negative / non-integer seed.
    """

    def __init__(self, name: str, seed: int = 0) -> None:
        self.name: str = check_dataset_name(name)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
            raise ValueError(f"data: ToyStream seed must be a non-negative int, got {seed!r}")
        self.seed: int = int(seed)
        self._gen: np.random.Generator = np.random.default_rng(self.seed)

    def __repr__(self) -> str:
        return f"ToyStream(name={self.name!r}, seed={self.seed})"

    def sample(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor | tuple[Tensor, Tensor]:
        """Draws ``n`` fresh points.

        Args:
            n: number of points, a positive int.
            dtype: floating torch dtype of the result.

        Returns:
            A ``(n, 2)`` tensor for a 2-D toy density; for ``"staircase"`` an ``(x, y)`` tuple of ``(n, 1)``
            tensors.
        """
        if self.name == "staircase":
            return sample_staircase(n, self._gen, dtype)
        return sample_toy(self.name, n, self._gen, dtype)

    def state_dict(self) -> dict[str, Any]:
        """Returns the stream's state as a JSON-serialisable dict (``name``, ``seed`` and the numpy
        ``bit_generator.state`` under ``rng``; PCG64 state words are python ints of up to 128 bits)."""
        return {
            "name": self.name,
            "seed": self.seed,
            "rng": _plain(copy.deepcopy(self._gen.bit_generator.state)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict` (possibly after a JSON round trip), so that the next
        :meth:`sample` continues identically.

        Args:
            state: the dict from :meth:`state_dict`.

        Raises:
            ValueError: if the state is malformed or belongs to a stream of another data set.
        """
        if not isinstance(state, dict) or not {"name", "rng"} <= state.keys():
            raise ValueError("data: ToyStream.load_state_dict expects a dict with keys 'name', 'seed', 'rng'")
        name = check_dataset_name(state["name"])
        if name != self.name:
            raise ValueError(f"data: state belongs to a {name!r} stream, this stream draws {self.name!r}")
        rng_state = copy.deepcopy(state["rng"])
        bit_name = rng_state.get("bit_generator") if isinstance(rng_state, dict) else None
        expected = type(self._gen.bit_generator).__name__
        if bit_name != expected:
            raise ValueError(f"data: state holds a {bit_name!r} generator, expected {expected!r}")
        try:
            self._gen.bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as exc:
            raise ValueError(f"data: invalid generator state in ToyStream state dict: {exc}") from exc
        seed = state.get("seed", self.seed)
        self.seed = int(seed) if isinstance(seed, numbers.Integral) else self.seed
