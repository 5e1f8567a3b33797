"""The studio's default device: the faster one for the task, said in the status bar and the log."""

from __future__ import annotations

import torch

from monoflow_studio.run_spec import RunSpec


def test_presets_open_on_the_faster_device(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RunSpec.from_preset("paper-toy-monotone").training.device == "cpu"  # the fused CPU kernels
    assert RunSpec.from_preset("digits-cpu").training.device == "cuda"  # an image model, with a GPU here
    assert RunSpec.from_preset("digits-cpu", device="cpu").training.device == "cpu"  # an explicit choice wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert RunSpec.from_preset("digits-cpu").training.device == "cpu"
    # A saved run configuration keeps the device it names.
    spec = RunSpec.from_preset("digits-cpu")
    spec.training = spec.training.replace(device="cuda:1")
    path = tmp_path / "run.json"
    spec.save(path)
    assert RunSpec.load(path).training.device == "cuda:1"


def test_window_says_the_device_and_why(make_window):
    window = make_window()
    assert window.device_label.text() == "device cpu"
    assert "on cpu (auto: a 2-D vector model" in window.log.toPlainText()
