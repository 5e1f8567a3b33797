"""Memory, disk and thread budgets and the size estimates behind the command's up-front refusals."""

import os
import resource

import pytest

from monoflow_core import FlowConfig, build_flow
from monoflow_core import resources as res
from monoflow_core.presets import list_presets
from monoflow_core.training import TrainConfig

GIB = 1 << 30


def _built_size(config):
    flow = build_flow(config)
    return (
        sum(p.numel() for p in flow.parameters()),
        sum(b.numel() for b in flow.buffers()),
        len(list(flow.modules())),
    )


@pytest.mark.parametrize(
    "config",
    [
        FlowConfig(),  # the paper's 2-D toy model
        FlowConfig(blocks=3, g="mlp", hidden=[7, 9], activation="lipswish", actnorm=True, actnorm_input=True),
        FlowConfig(dim=1, blocks=2, formulation=["inverse_residual", "residual"], activation="clipswish"),
        FlowConfig(
            image_shape=[3, 8, 8],
            blocks_per_scale=[1, 2],
            fc_blocks=1,
            growth=8,
            fc_growth=6,
            actnorm=True,
            factor_out=True,
        ),
        FlowConfig(image_shape=[1, 8, 12], blocks_per_scale=[2, 0], fc_blocks=2, depth=2, growth=4, fc_growth=4),
    ],
    ids=["toy", "mlp-actnorm", "1d-list", "image-factor-out", "image-fc"],
)
def test_model_size_counts_what_build_flow_builds(config):
    size = res.model_size(config)
    assert (size.parameters, size.buffers, size.modules) == _built_size(config)


def test_model_size_scales_with_blocks_and_image_area():
    one, many = res.model_size(FlowConfig(blocks=1)), res.model_size(FlowConfig(blocks=1000))
    assert many.parameters == 1000 * one.parameters
    small = res.model_size(FlowConfig(image_shape=[3, 8, 8], blocks_per_scale=[1, 1], fc_blocks=1))
    large = res.model_size(FlowConfig(image_shape=[3, 800, 800], blocks_per_scale=[1, 1], fc_blocks=1))
    # the fully connected block's last layer maps all C*H*W values to all of them: quadratic in the area
    assert large.parameters > 1000**2 * small.parameters / 10


def test_check_memory_names_the_setting_and_both_sizes(monkeypatch):
    res.check_memory("--n 5", 100, "it", budget=100)  # exactly fits
    monkeypatch.setattr(res, "available_memory", lambda: None)
    res.check_memory("--n 5", 10**30, "it")  # an unknown budget refuses nothing
    with pytest.raises(res.ResourceError) as info:
        res.check_memory("--batch-size 7", 3 * GIB, "a training step", budget=GIB, hint="try less")
    text = str(info.value)
    assert text.startswith("--batch-size 7: a training step needs about 3 GiB")
    assert "only 1 GiB is available" in text and text.endswith("try less")
    assert isinstance(info.value, ValueError)  # the command's handler prints ValueErrors as one line


def test_check_disk_refuses_what_the_disk_cannot_hold(tmp_path):
    res.check_disk("--n 1", 10, tmp_path, "one sample")
    with pytest.raises(res.ResourceError, match=r"--n 9: writing 9 samples takes .* of disk space but only"):
        res.check_disk("--n 9", 1 << 80, tmp_path, "9 samples")


def test_threads_are_capped_per_core():
    cores = os.cpu_count() or 1
    assert res.max_threads() == res.MAX_THREADS_PER_CORE * cores
    assert res.check_threads("--threads", res.max_threads()) == res.max_threads()
    with pytest.raises(res.ResourceError, match="--threads 100000"):
        res.check_threads("--threads", 100000)


def test_available_memory_respects_the_address_space_limit(monkeypatch):
    limit = 3 * GIB
    monkeypatch.setattr(resource, "getrlimit", lambda which: (limit, limit))
    budget = res.available_memory()
    assert budget is not None and budget <= limit


def test_format_bytes():
    assert res.format_bytes(512) == "512 B"
    assert res.format_bytes(1536) == "1.5 KiB"
    assert res.format_bytes(3 * GIB) == "3 GiB"
    assert res.format_bytes(745 * 2**40) == "745 TiB"
    assert res.format_bytes(2**60) == "1,024 PiB"
    assert res.format_bytes(2**90) == "1.1e+12 PiB"


def _preset_configs():
    shapes = {
        "digits": [1, 8, 8],
        "mnist": [1, 28, 28],
        "cifar10": [3, 32, 32],
        "imagenet32": [3, 32, 32],
        "imagenet64": [3, 64, 64],
        "folder": [1, 8, 8],
    }
    for preset in list_presets():
        data = preset.training.get("data")
        extra = {"data_dir": "/data"} if data in shapes and data != "digits" else {}
        train = preset.train_config(**extra)
        model = preset.model_config()
        if data in shapes:
            model = model.replace(image_shape=shapes[data])
        yield preset.name, model, train


def test_shipped_presets_fit_the_machines_they_were_made_for():
    # No false refusals: every preset passes at its own settings with 64 GiB of host memory and an 80 GiB GPU.
    for name, model, train in _preset_configs():
        try:
            res.check_training(model, train, {}, budgets=(64 * GIB, 80 * GIB))
        except res.ResourceError as err:
            pytest.fail(f"{name}: {err}")


def test_check_training_names_the_phase_that_does_not_fit():
    model, train = FlowConfig(blocks=2), TrainConfig(batch_size=64, eval_size=200, test_size=500)
    budgets = (GIB, GIB)
    res.check_training(model, train, {}, budgets=budgets)
    cases = [
        (model, train.replace(batch_size=10**11), "batch_size", "--grad-accumulation"),
        (model, train.replace(eval_size=10**11), "eval_size", "--eval-size"),
        (model, train.replace(test_size=10**11), "test_size", "--test-size"),
        (FlowConfig(blocks=10**9), train, "blocks", "--blocks"),
    ]
    for m, t, key, advice in cases:
        with pytest.raises(res.ResourceError) as info:
            res.check_training(m, t, {key: f"LABEL-{key}"}, budgets=budgets)
        assert str(info.value).startswith(f"LABEL-{key}: ") and advice in str(info.value), str(info.value)
    # grad accumulation shrinks the step's activations
    big = train.replace(batch_size=2_000_000)
    per_step = res.training_needs(model, big)["batch_size"].device
    split = res.training_needs(model, big.replace(grad_accumulation=100))["batch_size"].device
    assert split < per_step / 50
    # the staircase's test set is eval_size points; test_size is unused there
    stairs = TrainConfig(data="staircase", test_size=10**11)
    assert res.training_needs(FlowConfig(dim=1, blocks=1), stairs)["test_size"].host == 0


def test_cuda_runs_check_the_device_and_the_host_separately():
    model = FlowConfig(blocks=2)
    train = TrainConfig(device="cuda", batch_size=10**9)
    with pytest.raises(res.ResourceError, match="on cuda"):
        res.check_training(model, train, {}, budgets=(10**15, GIB))
    res.check_training(model, train.replace(batch_size=64), {}, budgets=(GIB, GIB))
