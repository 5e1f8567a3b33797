"""Files: checkpoint export and open, view / curves / configuration exports, and their error paths."""

from __future__ import annotations

import csv
import io
import json
from xml.etree import ElementTree

import numpy as np
import pytest
import torch
from conftest import WAIT_MS, tiny_spec
from PySide6.QtWidgets import QFileDialog

from monoflow_core import evaluation
from monoflow_core.checkpoint import load_checkpoint
from monoflow_studio.run_spec import RunSpec
from monoflow_studio.session import PAUSED

UNWRITABLE = "/nonexistent-monoflow-dir/sub/file"


def patch_dialog(monkeypatch, name: str, path: str) -> None:
    monkeypatch.setattr(QFileDialog, name, lambda *args, **kwargs: (path, ""))


def train_a_little(window, qtbot, steps: int = 4) -> None:
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.step >= steps, timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)


def test_exported_checkpoint_loads_and_matches_the_window_model(window, qtbot, monkeypatch, tmp_path):
    train_a_little(window, qtbot)
    target = tmp_path / "run.safetensors"
    patch_dialog(monkeypatch, "getSaveFileName", str(target))
    with qtbot.waitSignal(window.session.checkpoint_saved, timeout=WAIT_MS):
        window.save_ckpt_action.trigger()
    assert "checkpoint saved" in window.log.toPlainText()
    points = torch.linspace(-3, 3, 50, dtype=torch.float64).reshape(25, 2)
    ours = window.session.submit(lambda t: evaluation.log_prob(t.flow, points).numpy()).result(timeout=10)
    ckpt = load_checkpoint(target)
    theirs = evaluation.log_prob(ckpt.flow, points).numpy()
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6)
    assert ckpt.trainer_state is not None and ckpt.trainer_state["step"] == window.step


def test_open_checkpoint_populates_views_and_trains_on(window, qtbot, monkeypatch, tmp_path):
    train_a_little(window, qtbot, steps=6)
    target = tmp_path / "run.safetensors"
    window.session.save_checkpoint(str(target))
    qtbot.waitUntil(target.exists, timeout=WAIT_MS)
    steps = window.step
    run = window.run_id
    window.reset_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.step == 0
    run = window.run_id
    patch_dialog(monkeypatch, "getOpenFileName", str(target))
    window.open_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.step == steps
    assert window.curves.point_count() == steps, "the checkpoint's history fills the curves"
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == steps + 1, timeout=WAIT_MS)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x80\x04\x95garbage-pickle"])
def test_corrupt_checkpoint_gives_a_message_and_keeps_the_run(window, qtbot, monkeypatch, tmp_path, content):
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    run = window.run_id
    patch_dialog(monkeypatch, "getOpenFileName", str(bad))
    window.open_action.trigger()
    qtbot.waitUntil(lambda: "could not open checkpoint" in window.log.toPlainText(), timeout=WAIT_MS)
    assert "could not open checkpoint" in window.statusBar().currentMessage()
    assert window.run_id == run and window.step == 1, "the current run is untouched"
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 2, timeout=WAIT_MS)


def test_unwritable_paths_give_messages(window, qtbot, monkeypatch):
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    for action, name in (
        (window.export_csv_action, "curves"),
        (window.export_view_action, "view"),
        (window.save_config_action, "run configuration"),
    ):
        patch_dialog(monkeypatch, "getSaveFileName", UNWRITABLE + ".x")
        action.trigger()
        assert f"could not write {name}" in window.statusBar().currentMessage()
    patch_dialog(monkeypatch, "getSaveFileName", UNWRITABLE + ".safetensors")
    window.save_ckpt_action.trigger()
    qtbot.waitUntil(lambda: "could not export checkpoint" in window.log.toPlainText(), timeout=WAIT_MS)
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 2, timeout=WAIT_MS)


def test_exports_write_view_curves_and_config(window, qtbot, monkeypatch, tmp_path):
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1 and window.density.frames_shown >= 2, timeout=WAIT_MS)
    png = tmp_path / "view.png"
    patch_dialog(monkeypatch, "getSaveFileName", str(png))
    window.export_view_action.trigger()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_path = tmp_path / "curves.csv"
    patch_dialog(monkeypatch, "getSaveFileName", str(csv_path))
    window.export_csv_action.trigger()
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert rows and rows[0]["series"] == "train_loss" and rows[0]["step"] == "1"
    config = tmp_path / "run.json"
    patch_dialog(monkeypatch, "getSaveFileName", str(config))
    window.save_config_action.trigger()
    saved = RunSpec.load(config)
    assert saved.model.to_dict() == window.spec.model.to_dict()
    assert json.loads(config.read_text())["training"]["batch_size"] == 128
    assert not list(tmp_path.glob(".*tmp")), "no temporary files left behind"


def test_load_config_rebuilds_with_it(window, qtbot, monkeypatch, tmp_path):
    spec = window.spec.copy()
    spec.training = spec.training.replace(data="rings", seed=5)
    path = tmp_path / "rings.json"
    spec.save(path)
    run = window.run_id
    patch_dialog(monkeypatch, "getOpenFileName", str(path))
    window.load_config_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.spec.training.data == "rings" and window.controls.seed.value() == 5
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    patch_dialog(monkeypatch, "getOpenFileName", str(bad))
    window.load_config_action.trigger()
    assert "could not load run configuration" in window.statusBar().currentMessage()


def test_export_view_as_svg(window, qtbot, monkeypatch, tmp_path):
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1 and window.density.frames_shown >= 2, timeout=WAIT_MS)
    svg = tmp_path / "view.svg"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(svg), "SVG image (*.svg)"))
    window.export_view_action.trigger()
    assert "view saved" in window.statusBar().currentMessage()
    root = ElementTree.parse(svg).getroot()
    assert root.tag.rsplit("}", 1)[-1] == "svg"
    assert svg.stat().st_size > 5000 and len(list(root.iter())) > 20, "the plot, not an empty page"
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"
    # The suffix decides the format: a .png path writes a PNG even with the SVG filter chosen.
    png = tmp_path / "view.png"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(png), "SVG image (*.svg)"))
    window.export_view_action.trigger()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_export_view_as_svg_to_an_unwritable_path_gives_a_message(window, qtbot, monkeypatch):
    patch_dialog(monkeypatch, "getSaveFileName", UNWRITABLE + ".svg")
    window.export_view_action.trigger()  # no exception escapes
    assert "could not write view" in window.statusBar().currentMessage()
    assert "could not write view" in window.log.toPlainText()


def test_open_example_menu_shows_a_trained_model_and_trains_on(make_window, qtbot, monkeypatch, tmp_path):
    from monoflow_core.assets import ASSETS_DIR_ENV, assets_dir
    from monoflow_core.examples import write_example
    from monoflow_core.training import Trainer

    source = Trainer(tiny_spec().model, tiny_spec(data="moons").training)
    source.run(2)
    (tmp_path / "presets").symlink_to(assets_dir() / "presets")
    (tmp_path / "models").mkdir()
    write_example(
        tmp_path / "models" / "moons-monotone.safetensors",
        source.flow,
        data="moons",
        model="monotone",
        preset="paper-toy-monotone",
        iterations=2,
        test_nll_nats=3.5,
    )
    monkeypatch.setenv(ASSETS_DIR_ENV, str(tmp_path))
    window = make_window()
    assert [a.text() for a in window.example_actions] == ["moons: Monotone (3.500 nats)"]
    run = window.run_id
    window.example_actions[0].trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.spec.training.data == "moons", "the example's data set comes with it"
    assert "fresh Adam state" in window.log.toPlainText()
    points = torch.randn(20, 2, dtype=torch.float64)
    ours = window.session.submit(lambda t: evaluation.log_prob(t.flow, points).numpy()).result(timeout=10)
    np.testing.assert_allclose(ours, evaluation.log_prob(source.flow, points).numpy(), rtol=0, atol=1e-6)
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
