"""Evaluation helpers: grid orientation against a closed-form Gaussian, normalisation, dtypes, samples, metrics."""

import math

import numpy as np
import pytest
import torch

from monoflow_core import ActNorm, FlowConfig, build_flow
from monoflow_core.evaluation import (
    log_density_grid,
    log_prob,
    sample,
    solver_diagnostics,
    test_mse,
    test_nll,
)
from monoflow_core.flow import Flow

torch.set_num_threads(1)

# ActNorm z = (x + b) * exp(s) makes x ~ N(-b, diag(exp(-2 s))): mean (1, -0.5), standard deviations (0.5, 2).
MEAN = np.array([1.0, -0.5])
STD = np.array([0.5, 2.0])


def gaussian_flow(dtype=torch.float64) -> Flow:
    norm = ActNorm(2, data_init=False).to(dtype)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor(-MEAN))
        norm.log_scale.copy_(torch.tensor(-np.log(STD)))
    return Flow([norm], (2,)).to(dtype)


def gaussian_log_density(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    zx, zy = (x - MEAN[0]) / STD[0], (y - MEAN[1]) / STD[1]
    return -0.5 * (zx**2 + zy**2) - math.log(2 * math.pi) - math.log(STD[0] * STD[1])


def test_grid_orientation_and_values_match_a_shifted_anisotropic_gaussian():
    extent = (-3.0, 5.0, -6.0, 4.0)
    grid, box = log_density_grid(gaussian_flow(), extent=extent, resolution=41)
    assert grid.shape == (41, 41) and grid.dtype == np.float64 and box == extent
    xs, ys = np.linspace(-3, 5, 41), np.linspace(-6, 4, 41)
    expected = gaussian_log_density(xs[None, :], ys[:, None])  # row i = y_i, column j = x_j
    np.testing.assert_allclose(grid, expected, atol=1e-12)
    # A transposed grid would put the narrow axis (x, sigma 0.5) along the rows: check the peak and widths.
    i, j = np.unravel_index(np.argmax(grid), grid.shape)
    assert ys[i] == pytest.approx(-0.5, abs=0.13) and xs[j] == pytest.approx(1.0, abs=0.1)
    assert grid[i, j] - grid[i, j + 2] > grid[i, j] - grid[i + 2, j]


def test_grid_extent_as_half_width_and_bad_arguments():
    _, box = log_density_grid(gaussian_flow(), extent=2.5, resolution=3)
    assert box == (-2.5, 2.5, -2.5, 2.5)
    with pytest.raises(ValueError, match="extent"):
        log_density_grid(gaussian_flow(), extent=-1.0)
    with pytest.raises(ValueError, match="extent"):
        log_density_grid(gaussian_flow(), extent=(1.0, 0.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="resolution"):
        log_density_grid(gaussian_flow(), resolution=1)
    with pytest.raises(ValueError, match="2-D"):
        log_density_grid(build_flow(FlowConfig(dim=1, blocks=1, growth=4)))


def test_grid_density_of_a_monotone_flow_integrates_to_one_and_keeps_the_flow_float32():
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=2, growth=8))
    flow.train()
    params = [p.detach().clone() for p in flow.parameters()]
    grid, (xmin, xmax, ymin, ymax) = log_density_grid(flow, extent=8.0, resolution=161)
    dx, dy = (xmax - xmin) / 160, (ymax - ymin) / 160
    assert float(np.exp(grid).sum() * dx * dy) == pytest.approx(1.0, abs=5e-3)
    # Evaluated on a float64 copy: the flow keeps its dtype, its mode and its weights.
    assert all(p.dtype == torch.float32 for p in flow.parameters())
    assert flow._anchor.dtype == torch.float32 and flow.training
    assert all(torch.equal(p, q) for p, q in zip(flow.parameters(), params, strict=True))
    grid32, _ = log_density_grid(flow, extent=8.0, resolution=161, dtype=None)
    np.testing.assert_allclose(grid32, grid, atol=1e-3)


def test_samples_have_the_right_shape_distribution_and_seeding():
    flow = gaussian_flow()
    a = sample(flow, 20_000, chunk=3000, seed=3)
    assert a.shape == (20_000, 2) and a.dtype == np.float64
    np.testing.assert_allclose(a.mean(axis=0), MEAN, atol=0.05)
    np.testing.assert_allclose(a.std(axis=0), STD, rtol=0.03)
    np.testing.assert_array_equal(a, sample(flow, 20_000, chunk=5000, seed=3))
    hot = sample(flow, 20_000, temperature=0.5, seed=4)
    np.testing.assert_allclose(hot.std(axis=0), 0.5 * STD, rtol=0.03)
    assert sample(flow, 0).shape == (0, 2)
    assert sample(gaussian_flow(torch.float32), 5, dtype=torch.float64, seed=0).dtype == np.float64


def test_test_nll_and_log_prob_match_the_closed_form():
    flow = gaussian_flow()
    x = torch.randn(5000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = gaussian_log_density(x[:, 0].numpy(), x[:, 1].numpy())
    lp = log_prob(flow, x, chunk=700)
    assert lp.shape == (5000,) and lp.dtype == torch.float64
    np.testing.assert_allclose(lp.numpy(), expected, atol=1e-12)
    assert test_nll(flow, x.numpy(), chunk=999) == pytest.approx(-expected.mean(), abs=1e-10)


def test_test_mse_of_a_known_map():
    flow = gaussian_flow()  # F(x) = (x + b) * exp(s), elementwise
    x = torch.linspace(-2, 2, 101, dtype=torch.float64).reshape(-1, 1).repeat(1, 2)
    y = torch.zeros_like(x)
    fx = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    assert test_mse(flow, x, y, chunk=17) == pytest.approx(float((fx**2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="same number"):
        test_mse(flow, x, y[:5])


def test_solver_diagnostics_per_block():
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=2, growth=8, actnorm=True)).double()
    assert [d["forward"] for d in solver_diagnostics(flow)] == [None, None]
    x = torch.randn(64, 2, dtype=torch.float64)
    with torch.no_grad():
        z, _ = flow(x)
        flow.inverse(z)
    diag = solver_diagnostics(flow)
    assert [d["block"] for d in diag] == [0, 2]  # ActNorms sit at indices 1 and 3
    for d in diag:
        assert d["kind"] == "monotone" and d["backward"] is None
        assert d["forward"]["batch"] == 64 and d["forward"]["n_failed"] == 0
        assert d["inverse"]["iterations_max"] >= 1


def test_parallel_chunks_equal_serial_and_restore_threads(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from monoflow_core import evaluation

    pools = []

    class Pool(ThreadPoolExecutor):  # records that the parallel path really ran
        def __init__(self, *args, **kwargs):
            pools.append(kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(evaluation, "ThreadPoolExecutor", Pool)
    torch.manual_seed(5)
    flow = build_flow(FlowConfig(blocks=3, depth=2, growth=8))
    x = torch.randn(700, 2) * 2
    serial = log_prob(flow, x, chunk=100)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the workers' one thread, so a missing restore shows
    try:
        parallel = log_prob(flow, x, chunk=100, workers=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, parallel) and torch.isfinite(serial).all()
    assert pools == [2]
    # the workers run without autograd, like the serial path
    np.testing.assert_array_equal(sample(flow, 900, chunk=200, seed=1), sample(flow, 900, chunk=200, seed=1, workers=2))
    grid, _ = log_density_grid(flow, resolution=20, chunk=50, workers=2)
    np.testing.assert_array_equal(grid, log_density_grid(flow, resolution=20, chunk=50)[0])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            log_prob(flow, x, workers=bad)
    with pytest.raises(ValueError, match="temperature"):
        sample(flow, 10, temperature=0.0)
