"""Operators the fused path's PyTorch kernels issue: one training step and one no-gradient evaluation, counted.

On the PyTorch kernels (``MONOFLOW_KERNELS=0``'s path, the CUDA path's) each operator costs a few microseconds of
dispatch, so their count is what a step costs there; it does not depend on the machine's load. The paper's toy model
(10 monotone blocks, DenseNet G 3x16, CPila, float32, seed 0): one training step on 500 points (forward and
backward) and a no-gradient log-density of 5,000 points, each counted with a ``TorchDispatchMode`` (every aten
operator). Runs on revisions before the package ``monoflow_core.fused`` too (their module ``monoflow_core.fast``).

Usage: ``PYTHONPATH=. python benchmarks/fused_operators.py`` (prints one JSON line).
"""

from __future__ import annotations

import json

import torch

import monoflow_core as mc
from monoflow_core.syncs import OperatorCounter


def main() -> None:
    torch.set_num_threads(1)
    try:
        from monoflow_core.fused import SETTINGS

        SETTINGS.use_kernels = False
    except ImportError:  # revisions before the package
        from monoflow_core import fast

        fast.USE_KERNELS = False
    torch.manual_seed(0)
    flow = mc.build_flow()
    x = torch.randn(500, 2) * 2
    grid = torch.randn(5000, 2) * 2
    flow.log_prob(x).mean().backward()  # (one step outside the count: a first call does one-time work)
    with OperatorCounter() as train:
        flow.log_prob(x).mean().backward()
    with torch.no_grad(), OperatorCounter() as evaluation:
        flow.log_prob(grid)
    iterations = [int(s["forward"].iterations.max()) for s in flow.solver_stats()]
    print(
        json.dumps(
            {
                "ops_train_step": train.ops,
                "ops_nograd_5000": evaluation.ops,
                "max_newton_iterations_per_block": iterations,
            }
        )
    )


if __name__ == "__main__":
    main()
