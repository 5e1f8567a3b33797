"""Shared test settings: one intra-op thread (tiny matrices; avoids oversubscribing the 2-core CI machine)."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import torch

torch.set_num_threads(1)

from monoflow_core import fused  # noqa: E402

# Compile (or load from Numba's on-disk cache) the engine's compiled kernels before any test runs, so that every
# test sees the same kernels from its first step and no background compile competes with timing-sensitive tests.
for _dtype in (torch.float32, torch.float64):
    fused.kernels_ready(_dtype, wait=True)
