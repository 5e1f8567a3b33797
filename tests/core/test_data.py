"""Toy data (docs/algorithm.md sections 9.1, 9.2): shapes, seeding, resumable streams and statistics of every generator.

The statistics are derived from the formulas of the spec (not from the implementation), with tolerances of
about five standard errors for a few thousand points, so that a wrong scale, offset, radius or orientation
fails while the seeded draws pass comfortably.
"""

import json
import math

import numpy as np
import pytest
import torch

from monoflow_core.data import (
    DATASETS,
    TOY_DATASETS,
    ToyStream,
    check_dataset_name,
    sample_staircase,
    sample_toy,
    staircase_target,
)

N = 4000


def draw(name: str, n: int = N, seed: int = 0) -> np.ndarray:
    return sample_toy(name, n, seed, dtype=torch.float64).numpy()


def wrap(angle: np.ndarray) -> np.ndarray:
    """Angle difference folded into [0, pi]."""
    return np.abs(np.angle(np.exp(1j * angle)))


def midpoint_mean(g, lo: float, hi: float, weight=None, m: int = 200_000) -> float:
    """E[g(t)] for t with density proportional to ``weight`` (uniform if None) on [lo, hi], by the midpoint
    rule."""
    t = lo + (np.arange(m) + 0.5) * (hi - lo) / m
    w = np.ones_like(t) if weight is None else weight(t)
    return float(np.sum(g(t) * w) / np.sum(w))


# ----------------------------------------------------------------------------------------------------------
# names
# ----------------------------------------------------------------------------------------------------------


def test_dataset_name_tuples():
    assert TOY_DATASETS == (
        "2spirals",
        "8gaussians",
        "checkerboard",
        "circles",
        "moons",
        "pinwheel",
        "rings",
        "swissroll",
    )
    assert (*TOY_DATASETS, "staircase") == DATASETS
    for name in DATASETS:
        assert check_dataset_name(name) == name
    assert check_dataset_name("8Gaussians") == "8gaussians"


@pytest.mark.parametrize(
    "call",
    [
        lambda: check_dataset_name("xyz"),
        lambda: sample_toy("xyz", 10, 0),
        lambda: ToyStream("xyz"),
    ],
)
def test_unknown_name_lists_valid_names(call):
    with pytest.raises(ValueError, match=r"data: unknown data set 'xyz'; choose one of") as info:
        call()
    for name in DATASETS:
        assert repr(name) in str(info.value)


def test_non_string_name_rejected():
    with pytest.raises(ValueError, match="unknown data set"):
        check_dataset_name(3)  # type: ignore[arg-type]


def test_sample_toy_rejects_staircase():
    with pytest.raises(ValueError, match="sample_staircase"):
        sample_toy("staircase", 10, 0)


# ----------------------------------------------------------------------------------------------------------
# generic behaviour of every generator
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_shape_dtype_and_finiteness(name):
    x = sample_toy(name, 1000, 0)
    assert x.shape == (1000, 2)
    assert x.dtype == torch.float32
    assert x.device.type == "cpu"
    assert torch.isfinite(x).all()
    x64 = sample_toy(name, 1000, 0, dtype=torch.float64)
    assert x64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), x)  # same draws, only the cast differs
    for n in (1, 2, 3, 5, 7, 13):
        assert sample_toy(name, n, 1).shape == (n, 2)
    assert sample_toy(name, np.int64(9), 1).shape == (9, 2)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_seeding(name):
    a = sample_toy(name, 500, 123)
    assert torch.equal(a, sample_toy(name, 500, 123))
    assert torch.equal(a, sample_toy(name, 500, np.random.default_rng(123)))
    assert not torch.allclose(a, sample_toy(name, 500, 124))
    gen = np.random.default_rng(5)
    assert not torch.allclose(sample_toy(name, 500, gen), sample_toy(name, 500, gen))  # generator advances
    assert not torch.allclose(sample_toy(name, 500), sample_toy(name, 500))  # None: fresh entropy


@pytest.mark.parametrize("name", DATASETS)
def test_stream_is_fresh_deterministic_and_resumable(name):
    def as_tuple(out):
        return out if isinstance(out, tuple) else (out,)

    stream = ToyStream(name, seed=7)
    first = as_tuple(stream.sample(300))
    second = as_tuple(stream.sample(300))
    for a, b in zip(first, second, strict=True):
        assert not torch.allclose(a, b)
    # the first draw of a stream is the seeded one-shot draw
    one_shot = sample_staircase(300, 7) if name == "staircase" else sample_toy(name, 300, 7)
    for a, b in zip(first, as_tuple(one_shot), strict=True):
        assert torch.equal(a, b)
    # replaying the same call sequence gives the same points
    replay = ToyStream(name, seed=7)
    for expected in (first, second):
        for a, b in zip(expected, as_tuple(replay.sample(300)), strict=True):
            assert torch.equal(a, b)

    state = json.loads(json.dumps(stream.state_dict()))  # must survive JSON
    assert state["name"] == name and state["seed"] == 7
    nxt = [as_tuple(stream.sample(n, dtype=torch.float64)) for n in (50, 211)]
    resumed = ToyStream(name, seed=999)
    resumed.load_state_dict(state)
    assert resumed.seed == 7
    for expected, n in zip(nxt, (50, 211), strict=True):
        got = as_tuple(resumed.sample(n, dtype=torch.float64))
        for a, b in zip(expected, got, strict=True):
            assert b.dtype == torch.float64
            assert torch.equal(a, b)


def test_stream_shapes_and_state_checks():
    x, y = ToyStream("staircase", 0).sample(64)
    assert x.shape == y.shape == (64, 1)
    assert x.dtype == y.dtype == torch.float32
    assert ToyStream("moons", 0).sample(64, dtype=torch.float64).shape == (64, 2)
    state = ToyStream("moons", 0).state_dict()
    with pytest.raises(ValueError, match="moons"):
        ToyStream("rings", 0).load_state_dict(state)
    with pytest.raises(ValueError):
        ToyStream("moons", 0).load_state_dict({"name": "moons"})
    bad = json.loads(json.dumps(state))
    bad["rng"]["bit_generator"] = "MT19937"
    with pytest.raises(ValueError, match="MT19937"):
        ToyStream("moons", 0).load_state_dict(bad)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            ToyStream("moons", seed)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None])
def test_n_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="positive int"):
        sample_toy("moons", bad, 0)
    with pytest.raises(ValueError, match="positive int"):
        sample_staircase(bad, 0)
    with pytest.raises(ValueError, match="positive int"):
        ToyStream("rings").sample(bad)


def test_rng_and_dtype_types_checked():
    with pytest.raises(TypeError, match="rng"):
        sample_toy("moons", 10, "seed")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="rng"):
        sample_toy("moons", 10, np.random.RandomState(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        sample_toy("moons", 10, -1)
    with pytest.raises(TypeError, match="dtype"):
        sample_toy("moons", 10, 0, dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        sample_staircase(10, 0, dtype=np.float32)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# statistics that pin each formula
# ----------------------------------------------------------------------------------------------------------


def assert_in_box(x: np.ndarray, half_width: float = 4.5) -> None:
    assert np.abs(x).max() <= half_width, np.abs(x).max(axis=0)


def test_8gaussians_clusters():
    x = draw("8gaussians")
    assert_in_box(x, 4.9)
    angle = np.arange(8) * np.pi / 4
    centres = 4.0 / 1.414 * np.stack([np.cos(angle), np.sin(angle)], axis=1)  # radius ~2.83
    label = np.argmin(((x[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(label, minlength=8)
    assert np.all(np.abs(counts - N / 8) < 5 * math.sqrt(N / 8 * 7 / 8)), counts
    sigma = 0.5 / 1.414
    resid = x - centres[label]
    for k in range(8):
        np.testing.assert_allclose(x[label == k].mean(0), centres[k], atol=0.08)
    assert resid.std(axis=0) == pytest.approx([sigma, sigma], rel=0.05)
    # overall: mean 0, per-coordinate variance (16 * 1/2 + 0.25) / 1.414^2
    overall_std = math.sqrt(16 * 0.5 + 0.25) / 1.414
    np.testing.assert_allclose(x.mean(0), 0.0, atol=5 * overall_std / math.sqrt(N))
    assert x.std(axis=0) == pytest.approx([overall_std] * 2, rel=0.04)


def test_circles_radii():
    x = draw("circles")
    assert_in_box(x)
    r = np.linalg.norm(x, axis=1)
    outer = r > 2.25
    assert outer.mean() == pytest.approx(0.5, abs=0.02)
    sigma = 3 * 0.08  # sklearn noise is added before the factor 3
    # E|R e + noise| ~ R + sigma^2 / (2 R)
    assert r[outer].mean() == pytest.approx(3.0 + sigma**2 / 6, abs=0.03)
    assert r[~outer].mean() == pytest.approx(1.5 + sigma**2 / 3, abs=0.03)
    assert r[outer].std() == pytest.approx(sigma, rel=0.12)
    assert r[~outer].std() == pytest.approx(sigma, rel=0.12)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.15)


def test_rings_radii_counts_spacing_and_shuffle():
    n = 4003  # not divisible by 4: the innermost ring takes the 3 extra points
    x = draw("rings", n)
    assert_in_box(x, 3.6)
    radii = np.array([3.0, 2.25, 1.5, 0.75])
    r = np.linalg.norm(x, axis=1)
    label = np.argmin(np.abs(r[:, None] - radii[None]), axis=1)
    counts = np.bincount(label, minlength=4)
    np.testing.assert_array_equal(counts, [1000, 1000, 1000, 1003])  # rings are 4.7 noise sd apart
    for k, radius in enumerate(radii):
        assert r[label == k].mean() == pytest.approx(radius, abs=0.015)
        assert r[label == k].std() == pytest.approx(0.08, rel=0.12)
    # evenly spaced angles: bin counts on the outer ring are far flatter than a uniform draw's
    phi = np.arctan2(x[label == 0, 1], x[label == 0, 0])
    hist = np.histogram(phi, bins=50, range=(-np.pi, np.pi))[0]
    assert hist.var() < 0.3 * (counts[0] / 50), hist
    # shuffled: each ring is about a quarter of any block of rows
    for block in (slice(0, 1000), slice(3000, 4003)):
        frac = np.bincount(label[block], minlength=4) / len(label[block])
        np.testing.assert_allclose(frac, 0.25, atol=0.07)


def distance_to_half_circle(u: np.ndarray, centre: tuple[float, float], upper: bool) -> np.ndarray:
    """Distance of each row of ``u`` to the upper (or lower) half of the unit circle around ``centre``."""
    w = u - np.asarray(centre)
    on_side = w[:, 1] >= 0 if upper else w[:, 1] <= 0
    to_arc = np.abs(np.linalg.norm(w, axis=1) - 1.0)
    end = np.array([1.0, 0.0])
    to_ends = np.minimum(np.linalg.norm(w - end, axis=1), np.linalg.norm(w + end, axis=1))
    return np.where(on_side, to_arc, to_ends)


def test_moons_box_mean_and_curves():
    x = draw("moons")
    # noise-free moons span x in [-3, 3], y in [-1.2, 1.8]; noise std 0.2 after the factor 2
    assert x[:, 0].min() > -4.0 and x[:, 0].max() < 4.0
    assert x[:, 1].min() > -2.2 and x[:, 1].max() < 2.8
    assert x[:, 0].min() < -2.8 and x[:, 0].max() > 2.8
    # mean: outer moon (0, 2/pi), inner (1, 1/2 - 2/pi) -> (0.5, 0.25); times 2 plus (-1, -0.2) -> (0, 0.3)
    np.testing.assert_allclose(x.mean(0), [0.0, 0.3], atol=5 * 1.8 / math.sqrt(N))
    # undo the affine map; every point lies near one of the two semicircles
    u = (x - np.array([-1.0, -0.2])) / 2.0
    d_outer = distance_to_half_circle(u, centre=(0.0, 0.0), upper=True)
    d_inner = distance_to_half_circle(u, centre=(1.0, 0.5), upper=False)
    d = np.minimum(d_outer, d_inner)
    assert np.median(d) < 0.09  # |N(0, 0.1)| has median 0.067
    assert (d_outer < d_inner).mean() == pytest.approx(0.5, abs=0.03)


def test_checkerboard_black_squares_uniform():
    x = draw("checkerboard")
    assert np.all(np.abs(x) <= 4.0)
    col = np.floor(x[:, 0] / 2).astype(int)  # in {-2, -1, 0, 1}
    row = np.floor(x[:, 1] / 2).astype(int)
    assert np.all((col + row) % 2 == 0)  # only the "black" squares
    squares = [(c, r) for c in range(-2, 2) for r in range(-2, 2) if (c + r) % 2 == 0]
    assert len(squares) == 8
    tol = 5 * math.sqrt(N / 8 * 7 / 8)
    for c, r in squares:
        inside = (col == c) & (row == r)
        assert abs(inside.sum() - N / 8) < tol, (c, r, inside.sum())
        # uniform within the square: centred, std 2 / sqrt(12)
        np.testing.assert_allclose(x[inside].mean(0), [2 * c + 1, 2 * r + 1], atol=0.13)
        np.testing.assert_allclose(x[inside].std(0), 2 / math.sqrt(12), rtol=0.1)


def test_pinwheel_arms_and_orientation():
    x = draw("pinwheel")
    assert np.abs(x).max() < 5.0
    assert np.quantile(np.abs(x), 0.999) < 4.5
    np.testing.assert_allclose(x.mean(0), 0.0, atol=5 * 1.5 / math.sqrt(N))  # 5-fold symmetry
    # |p| = 2 |f| with f0 ~ N(1, 0.3^2), f1 ~ N(0, 0.1^2): E|p|^2 = 4 (1 + 0.09 + 0.01)
    r = np.linalg.norm(x, axis=1)
    assert np.mean(r**2) == pytest.approx(4.4, abs=0.12)
    # angle of a point = -(2 pi c / 5 + 0.25 exp(f0)) - atan(f1 / f0) (reference orientation), f0 ~ |p| / 2
    phi = np.arctan2(x[:, 1], x[:, 0])
    pred = 0.25 * np.exp(r / 2)
    arms = 2 * np.pi * np.arange(5) / 5
    res_cw = wrap(phi[:, None] + arms[None] + pred[:, None])
    res_ccw = wrap(phi[:, None] - arms[None] - pred[:, None])
    assert np.median(res_cw.min(1)) < 0.1
    assert np.median(res_ccw.min(1)) > 0.18
    frac = np.bincount(res_cw.argmin(1), minlength=5) / N
    np.testing.assert_allclose(frac, 0.2, atol=0.03)
    # shuffled: every arm is present in the first 500 rows
    assert np.bincount(res_cw[:500].argmin(1), minlength=5).min() > 60


def test_2spirals_moments_and_geometry():
    x = draw("2spirals")
    assert_in_box(x, 4.0)
    t_max = 540 * 2 * math.pi / 360  # 3 pi; t = sqrt(U) t_max has density 2 t / t_max^2

    def dens(t: np.ndarray) -> np.ndarray:
        return t

    ea = midpoint_mean(lambda t: -np.cos(t) * t, 0, t_max, dens)
    eb = midpoint_mean(lambda t: np.sin(t) * t, 0, t_max, dens)
    ea2 = midpoint_mean(lambda t: (np.cos(t) * t) ** 2, 0, t_max, dens)
    eb2 = midpoint_mean(lambda t: (np.sin(t) * t) ** 2, 0, t_max, dens)
    # first half is d / 3 + noise with d = (A + 0.5 U, B + 0.5 U'), second half -d / 3 + noise. The 0.5 U offset
    # moves the half-means by only 0.083 against a spread of 1.6, hence more points for this one check (cheap).
    big = draw("2spirals", 24_000, seed=1)
    half = big[:12_000]
    mean_d = np.array([ea + 0.25, eb + 0.25]) / 3
    tol = 4 * half.std(0) / math.sqrt(len(half))  # about 0.06
    np.testing.assert_allclose(half.mean(0), mean_d, atol=tol.max())
    np.testing.assert_allclose(big[12_000:].mean(0), -mean_d, atol=tol.max())
    # rows i and i + n/2 share d: their sum is the noise alone, N(0, 2 * 0.1^2)
    pair = x[: N // 2] + x[N // 2 :]
    np.testing.assert_allclose(pair.mean(0), 0.0, atol=0.02)
    np.testing.assert_allclose(pair.std(0), 0.1 * math.sqrt(2), rtol=0.06)
    # overall second moment: E[(A + 0.5 U)^2] / 9 + 0.01 = (E A^2 + 0.5 E A + 1/12) / 9 + 0.01
    var = np.array([(ea2 + 0.5 * ea + 1 / 12) / 9, (eb2 + 0.5 * eb + 1 / 12) / 9]) + 0.01
    np.testing.assert_allclose(x.std(0), np.sqrt(var), rtol=0.05)
    # geometry: 3 |p| ~ t and the angle of d is pi - t, that of -d is -t
    r = 3 * np.linalg.norm(x, axis=1)
    phi = np.arctan2(x[:, 1], x[:, 0])
    far = r > 3
    assert np.median(wrap(phi - (np.pi - r))[: N // 2][far[: N // 2]]) < 0.35
    assert np.median(wrap(phi + r)[N // 2 :][far[N // 2 :]]) < 0.35
    assert np.median(wrap(phi + r)[: N // 2][far[: N // 2]]) > 1.0


def test_swissroll_moments():
    x = draw("swissroll")
    assert_in_box(x, 4.5)
    # make_swiss_roll: t ~ U(1.5 pi, 4.5 pi), (x, z) = t (cos t, sin t) + N(0, I); then / 5
    lo, hi = 1.5 * np.pi, 4.5 * np.pi
    # closed forms: E[t cos t] = 6 pi / (3 pi) = 2, E[t sin t] = 2 / (3 pi)
    assert midpoint_mean(lambda t: t * np.cos(t), lo, hi) == pytest.approx(2.0, abs=1e-6)
    mean = np.array([2.0, 2 / (3 * np.pi)]) / 5
    second = (
        np.array(
            [
                midpoint_mean(lambda t: (t * np.cos(t)) ** 2, lo, hi) + 1.0,
                midpoint_mean(lambda t: (t * np.sin(t)) ** 2, lo, hi) + 1.0,
            ]
        )
        / 25
    )
    std = np.sqrt(second - mean**2)
    np.testing.assert_allclose(x.mean(0), mean, atol=5 * std.max() / math.sqrt(N))
    np.testing.assert_allclose(x.std(0), std, rtol=0.05)
    r = 5 * np.linalg.norm(x, axis=1)  # ~ t in [4.71, 14.14] plus unit noise
    assert np.quantile(r, 0.01) > 3.0 and np.quantile(r, 0.99) < 15.5
    assert np.quantile(r, 0.05) < 6.5 and np.quantile(r, 0.95) > 13.0


# ----------------------------------------------------------------------------------------------------------
# staircase (docs/algorithm.md section 9.2)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y"),
    [
        (-2.0, 0.0),
        (2.0, 4.0),
        (-3.0, 0.0),
        (3.0, 4.0),
        (-1.0, 1.0),
        (0.0, 2.0),
        (1.0, 3.0),
        (-1.5, 0.05 * 0.5),  # tread: a w with w = x + 2
        (0.5, 2.0 + 0.05 * 0.5),
        (-1.06, 0.05 * 0.94),  # just before the riser of the first step
        (-1.01, 0.8),  # on the riser: (w - 0.95) / 0.05 with w = 0.99
        (0.99, 2.8),
        (1.99, 3.8),
    ],
)
def test_staircase_values(x, y):
    out = staircase_target(torch.tensor([x], dtype=torch.float64))
    assert float(out) == pytest.approx(y, abs=1e-12)


def test_staircase_slopes_steps_and_dtype():
    a = 0.05
    riser = torch.tensor([-1.02, -0.02, 0.98, 1.98], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(staircase_target(riser).sum(), riser)
    torch.testing.assert_close(g, torch.full_like(g, 1 / a))  # slope 20
    tread = torch.tensor([-1.5, -0.5, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(staircase_target(tread).sum(), tread)
    torch.testing.assert_close(g, torch.full_like(g, a))
    # risers start at w = 1 / (1 + a) before each step end at -1, 0, 1, 2
    grid = torch.linspace(-2, 2, 40_001, dtype=torch.float64)
    y = staircase_target(grid)
    assert torch.all(y[1:] >= y[:-1])
    slope = torch.diff(y) / torch.diff(grid)
    steep = (slope > 1.0).nonzero().squeeze(1)
    mids = grid[steep]
    for end in (-1.0, 0.0, 1.0, 2.0):
        near = mids[(mids > end - 0.2) & (mids <= end)]
        assert float(near.min()) == pytest.approx(end - 1 + 1 / (1 + a), abs=2e-4)
        assert float(near.max()) == pytest.approx(end, abs=2e-4)
    assert len(mids) == pytest.approx(4 * (1 - 1 / (1 + a)) / 1e-4, abs=8)
    assert staircase_target(torch.zeros(3, 1)).dtype == torch.float32
    assert staircase_target(torch.zeros(3, 1)).shape == (3, 1)


def test_sample_staircase():
    x, y = sample_staircase(3000, 0)
    assert x.shape == y.shape == (3000, 1)
    assert x.dtype == y.dtype == torch.float32
    assert float(x.min()) >= -2.0 and float(x.max()) < 2.0
    assert float(x.mean()) == pytest.approx(0.0, abs=5 * (4 / math.sqrt(12)) / math.sqrt(3000))
    assert float(x.std()) == pytest.approx(4 / math.sqrt(12), rel=0.05)
    torch.testing.assert_close(y, staircase_target(x.double()).float())
    x64, y64 = sample_staircase(3000, 0, dtype=torch.float64)
    assert x64.dtype == y64.dtype == torch.float64
    torch.testing.assert_close(x64.float(), x)
    x2, y2 = sample_staircase(3000, 0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.allclose(x, sample_staircase(3000, 1)[0])
    assert float(y.min()) >= 0.0 and float(y.max()) <= 4.0
