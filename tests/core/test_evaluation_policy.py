"""The rules of a reported test (monoflow_core.evaluation_policy): its dtype and the evaluation copy."""

from __future__ import annotations

import torch

from monoflow_core.config import FlowConfig
from monoflow_core.evaluation_policy import evaluation_copy, evaluation_dtype
from monoflow_core.models import build_flow

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_likelihoods_test_in_float64_on_the_cpu_and_images_in_their_training_dtype():
    assert evaluation_dtype("density", CPU, torch.float32) == torch.float64
    assert evaluation_dtype("regression", CPU, torch.float32) == torch.float64
    assert evaluation_dtype("image", CPU, torch.float32) == torch.float32
    assert evaluation_dtype("density", CUDA, torch.float32) == torch.float32
    assert evaluation_dtype("image", CPU, torch.float32, torch.float64) == torch.float64  # --dtype wins


def test_the_evaluation_copy_is_detached_in_eval_mode_and_leaves_the_flow_alone():
    flow = build_flow(FlowConfig(blocks=1, growth=8, spectral_norm="power"))
    flow.train()
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    copy = evaluation_copy(flow, torch.float64)
    assert not copy.training and next(copy.parameters()).dtype == torch.float64
    assert all(torch.equal(before[k], v) for k, v in flow.state_dict().items())  # power iterations ran on the copy
    assert any(not torch.equal(before[k].double(), v) for k, v in copy.state_dict().items() if "u" in k.split(".")[-1])
