"""The ``auto`` device and the automatic ``--grad-accumulation`` of the command line."""

import json

import pytest
from cli_helpers import assert_user_error, run

from monoflow_core.cli import train_setup
from monoflow_core.devices import resolve_device
from monoflow_core.memory_plan import HEADROOM, plan_grad_accumulation
from monoflow_core.presets import load_preset


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_device_by_task(cuda):
    image = load_preset("digits-cpu").model_config()
    toy = load_preset("paper-toy-monotone").model_config()
    device, reason = resolve_device(None, image, cuda_available=cuda)
    assert device == ("cuda" if cuda else "cpu") and reason.startswith("auto")
    assert resolve_device("auto", toy, cuda_available=cuda)[0] == "cpu"  # fused CPU kernels, tiny G
    assert resolve_device("AUTO", image, cuda_available=cuda)[0] == device
    # an explicit device always wins
    assert resolve_device("cpu", image, cuda_available=True) == ("cpu", "requested")
    assert resolve_device("cuda:1", toy, cuda_available=False) == ("cuda:1", "requested")


def test_train_without_device_says_which_and_records_it(tmp_path):
    out = tmp_path / "toy"
    code, _, err = run(
        [
            "train",
            "--data",
            "8gaussians",
            "--iterations",
            "1",
            "--batch-size",
            "16",
            "--eval-every",
            "0",
            "--test-size",
            "64",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "device: cpu (auto: a 2-D vector model" in err
    assert json.loads((out / "config.json").read_text())["training"]["device"] == "cpu"


def _digits_budget(k: int) -> int:
    """A memory budget for which digits-cpu at batch 64 needs ``k`` micro-batches."""
    preset = load_preset("digits-cpu")
    train = preset.train_config()
    plan = plan_grad_accumulation(preset.model_config(), train, 10**15)
    micro = -(-train.batch_size // k)
    return int((plan.resident + micro * plan.per_image + plan.per_image // 2) / HEADROOM)


def test_train_splits_the_batch_when_memory_is_short(tmp_path, monkeypatch):
    # A fake budget (the host's available memory, as for a CPU run): the batch of 64 digits is split in 4, said
    # on stderr and recorded in config.json; an explicit --grad-accumulation is left alone.
    monkeypatch.setattr(train_setup, "available_memory", lambda: _digits_budget(4))
    out = tmp_path / "auto"
    code, _, err = run(
        [
            "train",
            "--data",
            "digits",
            "--iterations",
            "1",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "memory: --grad-accumulation 4 (micro-batches of 16)" in err
    assert json.loads((out / "config.json").read_text())["training"]["grad_accumulation"] == 4
    out2 = tmp_path / "explicit"
    code, _, err = run(
        [
            "train",
            "--data",
            "digits",
            "--iterations",
            "1",
            "--eval-every",
            "0",
            "--device",
            "cpu",
            "--grad-accumulation",
            "2",
            "--out",
            out2,
            "--no-progress",
        ]
    )
    assert code == 0, err
    assert "memory:" not in err
    assert json.loads((out2 / "config.json").read_text())["training"]["grad_accumulation"] == 2


def test_train_refuses_a_step_that_cannot_fit_one_image(tmp_path, monkeypatch):
    monkeypatch.setattr(train_setup, "available_memory", lambda: 1000)
    code, _, err = run(
        ["train", "--data", "digits", "--iterations", "1", "--device", "cpu", "--out", tmp_path / "r", "--no-progress"]
    )
    assert_user_error(code, err, "--batch-size 64", "per image", "not even one image per micro-batch fits")
    assert not (tmp_path / "r").exists()
