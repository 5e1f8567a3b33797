"""cuDNN's autotuning (``torch.backends.cudnn.benchmark``) is part of the precision policy: on where a run's
convolutions meet fixed shapes on CUDA, decided, stated and overridable like the rest of the policy. The decision is
tested on the CPU: it depends on the device, the model and the solves' shapes, not on a GPU being present."""

import dataclasses
import types

import pytest
import torch

import monoflow_core.solvers as solvers
from monoflow_core import FlowConfig
from monoflow_core.config import TrainConfig
from monoflow_core.precision import (
    arithmetic_statement,
    cudnn_benchmark_mode,
    resolve_cudnn_benchmark,
    resolve_precision,
)
from monoflow_core.training import Trainer


@pytest.mark.parametrize(
    ("requested", "device", "convolutions", "fixed", "on", "why"),
    [
        ("auto", "cuda", True, True, True, "fixed shapes"),
        ("auto", "cuda:1", True, False, False, "change the batch's shape"),
        ("auto", "cuda", False, True, False, "no convolutions"),
        ("auto", "cpu", True, True, False, "no cuDNN"),
        ("ON", "cuda", False, False, True, "requested"),
        ("off", "cuda", True, True, False, "requested"),
        ("on", "cpu", True, True, False, "requested on, but the cpu has no cuDNN"),
    ],
)
def test_the_policy_decides_per_device_model_and_shapes(requested, device, convolutions, fixed, on, why):
    decided, reason = resolve_cudnn_benchmark(requested, device, convolutions=convolutions, fixed_shapes=fixed)
    assert decided is on and reason.startswith("on" if on else "off") and why in reason
    policy = resolve_precision(
        "auto", device, torch.float32, benchmark=requested, convolutions=convolutions, fixed_shapes=fixed
    )
    assert policy.cudnn_benchmark is on and policy.cudnn_benchmark_reason == reason
    assert f"cuDNN benchmark {reason}" in policy.describe()
    assert (policy.to_dict()["cudnn_benchmark"], policy.to_dict()["cudnn_benchmark_reason"]) == (on, reason)


def test_the_override_is_a_validated_training_setting():
    assert TrainConfig().cudnn_benchmark == "auto"
    assert TrainConfig(cudnn_benchmark="Off").cudnn_benchmark == "off"
    assert TrainConfig.from_json(TrainConfig(cudnn_benchmark="on").to_json()).cudnn_benchmark == "on"
    with pytest.raises(
        ValueError, match=r"cudnn_benchmark: unknown value 'yes'; choose one of \['auto', 'on', 'off'\]"
    ):
        TrainConfig(cudnn_benchmark="yes")
    with pytest.raises(ValueError, match="cudnn_benchmark"):
        resolve_cudnn_benchmark(True, "cuda", convolutions=True, fixed_shapes=True)


@pytest.mark.parametrize(
    ("task", "fixed", "requested", "on"),
    [
        ("image", True, "auto", True),
        ("image", False, "auto", False),
        ("density", True, "auto", False),
        ("density", True, "on", True),
    ],
)
def test_a_trainer_on_cuda_asks_with_its_model_and_its_solves_shapes(monkeypatch, task, fixed, requested, on):
    # The trainer's own resolution (Trainer._resolve_precision reads only device, dtype and task), for a CUDA run
    # described by a stand-in: the inputs are its model's kind and the solves' default shape on that device.
    monkeypatch.setattr(solvers, "default_fixed_shape", lambda device: fixed and device.type == "cuda")
    run = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32, task=task)
    policy = Trainer._resolve_precision(run, "auto", requested)
    assert policy.cudnn_benchmark is on
    # The same run on the CPU: never (there is no cuDNN), whatever was asked.
    run.device = torch.device("cpu")
    assert not Trainer._resolve_precision(run, "auto", requested).cudnn_benchmark


def test_training_steps_set_the_flag_and_restore_it_evaluations_state_it():
    trainer = Trainer(
        FlowConfig(blocks=1, depth=2, growth=8),
        TrainConfig(batch_size=16, eval_size=20, test_size=20, concat_learnable_from=None, cudnn_benchmark="on"),
    )
    assert not trainer.precision.cudnn_benchmark  # asked for, but the CPU has no cuDNN: off, and the log says so
    assert "requested on, but the cpu has no cuDNN" in trainer.precision.describe()
    seen = []
    trainer.loss_transform = lambda loss: seen.append(torch.backends.cudnn.benchmark) or loss
    with cudnn_benchmark_mode(True):  # a flag left on by someone else: the policy's "off" holds in the step
        trainer.step()
        assert torch.backends.cudnn.benchmark is True  # and is restored after it
        with cudnn_benchmark_mode(False):
            # A policy with autotuning (a CUDA image run's): on in the step, back to the caller's setting after.
            trainer.precision = dataclasses.replace(trainer.precision, cudnn_benchmark=True)
            trainer.step()
            assert torch.backends.cudnn.benchmark is False
            assert arithmetic_statement(torch.float64, "cpu")["cudnn_benchmark"] is False  # eval --json's statement
    assert seen == [False, True]
    trainer.set_precision(cudnn_benchmark="OFF")
    assert trainer.train_config.cudnn_benchmark == "off" and trainer.train_config.precision == "auto"
    assert trainer.precision.cudnn_benchmark_reason == "off: the cpu has no cuDNN"
