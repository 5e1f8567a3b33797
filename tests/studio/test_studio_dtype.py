"""The studio's frames say which dtype drew them, and the kernels' notices reach the window once it exists."""

from __future__ import annotations

import numpy as np
import torch

import monoflow_core as mc
from monoflow_core import evaluation
from monoflow_studio.app import KernelNotices
from monoflow_studio.view_process import VIEW_DTYPE, compute_density


def test_density_frames_are_drawn_in_the_training_dtype_and_say_so():
    torch.manual_seed(0)
    flow = mc.build_flow(mc.FlowConfig(blocks=2)).eval()
    result = compute_density(flow, np.zeros((3, 2)), extent=3.0, resolution=12, chunk=500, n_samples=50)
    assert result is not None
    assert torch.float32 == VIEW_DTYPE and result.dtype == "float32"
    grid, _ = evaluation.density_grid_points(flow, 3.0, 12)
    as32 = evaluation.log_prob(flow, grid, dtype=torch.float32).reshape(12, 12).numpy()
    as64 = evaluation.log_prob(flow, grid, dtype=torch.float64).reshape(12, 12).numpy()
    np.testing.assert_allclose(result.log_density, as32, rtol=0, atol=1e-5)
    assert not np.array_equal(result.log_density, as64)  # (computed in float32, not float64)


def test_kernel_notices_are_held_until_the_window_connects_then_passed_on():
    notices = KernelNotices()
    notices("compiling")
    shown: list[str] = []
    notices.connect(shown.append)
    assert shown == ["compiling"]
    notices("ready")
    assert shown == ["compiling", "ready"]
