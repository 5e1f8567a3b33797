"""Transport of space: grid lines and the layer-by-layer positions of points through a flow."""

import numpy as np
import pytest
import torch

from monoflow_core import ActNorm, FlowConfig, build_flow
from monoflow_core.flow import Flow
from monoflow_core.transport import grid_lines, transport_stages

torch.set_num_threads(1)


def small_flow(dtype=torch.float64) -> Flow:
    torch.manual_seed(3)
    flow = build_flow(FlowConfig(blocks=2)).to(dtype)
    # An ActNorm in the middle: a layer with no solver, and a non-identity map.
    norm = ActNorm(2, data_init=False).to(dtype)
    with torch.no_grad():
        norm.bias.copy_(torch.tensor([0.3, -0.2]))
        norm.log_scale.copy_(torch.tensor([0.2, -0.4]))
    return Flow([flow.layers[0], norm, flow.layers[1]], (2,)).to(dtype)


def test_grid_lines_shape_and_layout():
    lines = grid_lines(extent=3.0, n_lines=5, points_per_line=11)
    assert lines.shape == (10, 11, 2) and lines.dtype == np.float64
    assert np.allclose(lines[:5, :, 1], np.linspace(-3, 3, 5)[:, None]), "horizontal lines: constant y"
    assert np.allclose(lines[5:, :, 0], np.linspace(-3, 3, 5)[:, None]), "vertical lines: constant x"
    assert lines.min() == -3.0 and lines.max() == 3.0
    assert grid_lines().shape == (34, 200, 2)
    with pytest.raises(ValueError):
        grid_lines(n_lines=1)
    with pytest.raises(ValueError):
        grid_lines(extent=0.0)


def test_forward_stages_end_at_the_flow_output():
    flow = small_flow()
    x = torch.as_tensor(grid_lines(n_lines=5, points_per_line=20).reshape(-1, 2))
    stages = transport_stages(flow, x, "forward", chunk=33)
    assert len(stages) == len(flow.layers) + 1
    assert all(s.shape == (200, 2) and np.isfinite(s).all() for s in stages)
    np.testing.assert_array_equal(stages[0], x.numpy())
    with torch.no_grad():
        z = flow(x)[0].numpy()
    np.testing.assert_allclose(stages[-1], z, atol=1e-6)
    assert not np.allclose(stages[1], stages[0]), "each layer moves the points"


def test_inverse_stages_end_at_the_flow_inverse_and_round_trip():
    flow = small_flow()
    z = torch.randn(150, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    stages = transport_stages(flow, z, "inverse", chunk=40)
    assert len(stages) == len(flow.layers) + 1
    with torch.no_grad():
        x = flow.inverse(z).numpy()
    np.testing.assert_allclose(stages[-1], x, atol=1e-6)
    back = transport_stages(flow, stages[-1], "forward")
    np.testing.assert_allclose(back[-1], z.numpy(), atol=1e-5)
    # Stage k of the inverse pass is stage K - k of the forward pass of its end point.
    for k, s in enumerate(stages):
        np.testing.assert_allclose(back[len(stages) - 1 - k], s, atol=1e-5)


def test_dtype_copy_leaves_the_flow_alone():
    flow = small_flow(torch.float32)
    flow.train()
    pts = np.random.default_rng(1).normal(size=(64, 2))
    for dtype in (torch.float32, torch.float64, None):
        stages = transport_stages(flow, pts, dtype=dtype)
        assert len(stages) == 4 and all(s.dtype == np.float64 for s in stages)
    assert flow.dtype == torch.float32 and flow.training, "the caller's flow keeps its dtype and mode"
    assert torch.is_grad_enabled() and all(p.grad is None for p in flow.parameters())
    with pytest.raises(ValueError):
        transport_stages(flow, pts, direction="sideways")
    with pytest.raises(ValueError):
        transport_stages(flow, np.zeros((3, 3)))
