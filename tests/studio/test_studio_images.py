"""Image mode: image runs train in bits/dim with a live sample grid and background tests, and the studio switches
between image and 2-D views as runs are built."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BUILD_TIMEOUT_MS, WAIT_MS, tiny_spec
from PySide6.QtWidgets import QFileDialog, QMessageBox

from monoflow_core.config import FlowConfig
from monoflow_core.data import TOY_DATASETS
from monoflow_core.presets import load_preset
from monoflow_studio.main_window import NO_TRANSPORT, MainWindow
from monoflow_studio.run_spec import RunSpec, studio_presets
from monoflow_studio.session import PAUSED, SessionOptions

#: Frames after every step (the tests watch them); 64 samples as in the app.
IMAGE_OPTIONS = SessionOptions(frame_min_interval_s=0.2, image_frame_min_steps=1, eval_chunk=16, view_process=False)
#: digits: 8x8 grey images with 17 levels; 64 samples tile into 8 x 8 tiles of 8 pixels plus 1-pixel padding.
IMAGE_SHAPE, LEVELS, GRID_SHAPE = (1, 8, 8), 17, (73, 73, 3)


def tiny_image_spec(**training: object) -> RunSpec:
    """digits-cpu shrunk to 2 scales of 1 block, growth 8, batch 16 and 32 test images (same code paths)."""
    preset = load_preset("digits-cpu")
    spec = RunSpec.from_preset(preset, **{"batch_size": 16, "eval_size": 32, "eval_every": 0, **training})
    spec.model = FlowConfig.from_dict(
        {**preset.model, "blocks_per_scale": [1, 1], "fc_blocks": 0, "growth": 8, "image_shape": list(IMAGE_SHAPE)}
    )
    return spec


@pytest.fixture
def image_window(qtbot) -> MainWindow:
    window = MainWindow(tiny_image_spec(), options=IMAGE_OPTIONS, theme="light")
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.state == PAUSED and window.samples.frames_shown >= 1, timeout=BUILD_TIMEOUT_MS)
    return window


def discard_without_asking(monkeypatch) -> None:
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)


def assert_image_mode(window: MainWindow) -> None:
    controls = window.controls
    assert window.image_mode and window.central.currentWidget() is window.samples
    assert window.curves.unit == "bits/dim"
    assert window.evaluate_action.isVisible() and window.evaluate_action.isEnabled()
    # Controls without meaning for images are hidden or disabled, with the reason as tooltip.
    assert not window.transport.available and not window.transport.direction_box.isEnabled()
    assert window.transport.direction_box.toolTip() == NO_TRANSPORT
    assert not controls.data.isEnabled() and "Presets menu" in controls.data.toolTip()
    assert not controls._rebuild_form.isRowVisible(controls.blocks)
    assert controls._rebuild_form.isRowVisible(controls.blocks_per_scale)
    assert controls.tests.isVisibleTo(controls)


def test_image_run_trains_in_bits_per_dim_with_sample_grids_and_tests(image_window, qtbot):
    window = image_window
    assert_image_mode(window)
    assert window.controls.blocks_per_scale.text() == "1, 1"
    first = window.samples.current_grid()
    assert first is not None and first.shape == GRID_SHAPE

    shown = window.samples.frames_shown
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 2 and window.samples._frame.step == 2, timeout=WAIT_MS)
    assert window.samples.frames_shown > shown
    frame = window.samples._frame
    assert frame.images.shape == (64, *IMAGE_SHAPE) and frame.grid.shape == GRID_SHAPE
    assert frame.grid.dtype == np.uint8 and frame.images.min() >= 0 and frame.images.max() <= LEVELS - 1
    assert np.array_equal(window.samples.current_grid(), frame.grid)
    # The training loss is in bits/dim (a few bits per pixel at the start; nats per image would be ~100x more).
    losses = window.curves.current.loss
    assert len(losses) == 2 and all(1.0 < v < 8.0 for v in losses)
    assert window.session.submit(lambda t: t.history[-1].loss).result(timeout=10) == losses[-1]
    window.curves._redraw_if_dirty()
    assert window.curves.plot.getPlotItem().getAxis("left").labelText == "bits/dim"
    assert window.curves.legend_names()[1] == "train bpd"

    # A test on demand, computed off the GUI thread: the same number as the core's Trainer.evaluate().
    window.evaluate_action.trigger()
    qtbot.waitUntil(lambda: bool(window.curves.test_points()), timeout=WAIT_MS)
    [(step, bpd)] = window.curves.test_points()
    assert step == 2
    core = window.session.submit(lambda t: t.evaluate()).result(timeout=WAIT_MS / 1000)
    assert bpd == pytest.approx(core.bpd, abs=1e-6)
    assert core.describe() in window.log.toPlainText()
    assert "bits/dim on 32 test images" in window.statusBar().currentMessage()
    window.curves._redraw_if_dirty()
    assert window.curves.legend_names()[2] == "test bpd (test)", "exact log-det: no 'estimate' in the legend"
    assert window.session.submit(lambda t: len(t.eval_history)).result(timeout=10) == 1, "recorded for checkpoints"

    # Periodic tests while training: "Test every" applies live, no rebuild.
    run = window.run_id
    window.controls.eval_every.setValue(3)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: any(s == 3 for s, _ in window.curves.test_points()), timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)
    assert window.run_id == run and window.spec.training.eval_every == 3
    assert window.curves.current.steps[-1] >= 3


def test_image_checkpoint_round_trip(image_window, qtbot, monkeypatch, tmp_path):
    window = image_window
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    window.evaluate_action.trigger()
    qtbot.waitUntil(lambda: bool(window.curves.test_points()), timeout=WAIT_MS)
    target = tmp_path / "digits.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    with qtbot.waitSignal(window.session.checkpoint_saved, timeout=WAIT_MS):
        window.save_ckpt_action.trigger()
    points = window.curves.test_points()

    run = window.run_id
    window.reset_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.step == 0 and not window.curves.test_points()
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(target), ""))
    window.open_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 2, timeout=WAIT_MS)
    assert_image_mode(window)
    assert window.step == 1 and window.curves.test_points() == points, "the test history comes back"
    qtbot.waitUntil(lambda: window.samples._frame is not None and window.samples._frame.step == 1, timeout=WAIT_MS)
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 2, timeout=WAIT_MS)

    # Exports of an image run: the sample grid, the curves in bits/dim, the configuration.
    png, csv_path, config = tmp_path / "grid.png", tmp_path / "curves.csv", tmp_path / "run.json"
    for action, path in (
        (window.export_view_action, png),
        (window.export_csv_action, csv_path),
        (window.save_config_action, config),
    ):
        monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, p=path, **k: (str(p), ""))
        action.trigger()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "run,series,step,time_s,value,unit"
    assert any(",train_bpd,1," in r and r.endswith(",bits/dim") for r in rows)
    assert any(",test_bpd,1," in r for r in rows)
    saved = RunSpec.load(config)
    assert saved.is_image and saved.model.blocks_per_scale == [1, 1] and saved.training.data == "digits"


def test_switching_between_image_and_toy_runs(image_window, qtbot, monkeypatch, tmp_path):
    window = image_window
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    discard_without_asking(monkeypatch)

    # Blocks per scale: an impossible value is refused with the core's reason; a valid one rebuilds.
    controls = window.controls
    run = window.run_id
    controls.blocks_per_scale.setText("1, 1, 1, 1, 1")
    controls.blocks_per_scale.editingFinished.emit()
    assert "divisible by 2^(scales - 1)" in window.statusBar().currentMessage()
    assert controls.blocks_per_scale.text() == "1, 1" and window.run_id == run
    controls.blocks_per_scale.setText("2")
    controls.blocks_per_scale.editingFinished.emit()
    qtbot.waitUntil(lambda: window.run_id == run + 1, timeout=WAIT_MS)
    assert window.spec.model.blocks_per_scale == [2]
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)

    # An image set whose files cannot be read: a clear message, and the current run goes on untouched.
    run = window.run_id
    missing = RunSpec.from_preset("paper-mnist", data_dir=str(tmp_path / "missing"), device="cpu")
    window.apply_spec(missing, "preset paper-mnist")
    qtbot.waitUntil(lambda: "could not build paper-mnist" in window.log.toPlainText(), timeout=WAIT_MS)
    assert "no such directory" in window.statusBar().currentMessage()
    assert "the current run is kept" in window.statusBar().currentMessage()
    assert window.run_id == run and window.step == 1
    assert controls.blocks_per_scale.text() == "2", "the controls show the current run again"
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 2, timeout=WAIT_MS)

    # Back to a 2-D run: the density and transport views return.
    window.apply_spec(tiny_spec(), "a 2-D run")
    qtbot.waitUntil(lambda: window.run_id == run + 1 and window.density.frames_shown >= 1, timeout=WAIT_MS)
    assert not window.image_mode and window.central.currentWidget() is window.density
    assert window.density.current_image() is not None
    assert window.transport.available and window.transport.direction_box.isEnabled()
    assert not window.evaluate_action.isVisible()
    assert window.curves.unit == "nats" and not window.curves._visible_ghosts(), "no bits/dim ghost on nats"
    assert controls.data.isEnabled() and controls.data.count() == len(TOY_DATASETS)
    assert controls._rebuild_form.isRowVisible(controls.blocks) and not controls.tests.isVisibleTo(controls)

    # The Presets menu offers digits-cpu (the full preset: built and sampled, not trained here).
    names = [a.text() for a in window.preset_actions]
    assert "digits-cpu" in names and "paper-mnist" not in names
    frames = window.samples.frames_shown
    window.preset_actions[names.index("digits-cpu")].trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 2 and window.samples.frames_shown > frames, timeout=BUILD_TIMEOUT_MS)
    assert_image_mode(window)
    assert window.spec.name == "digits-cpu" and controls.blocks_per_scale.text() == "2, 2, 2"
    assert window.samples.current_grid().shape == GRID_SHAPE


def test_check_studio_accepts_digits_and_refuses_image_sets_without_files(tmp_path):
    spec = RunSpec.from_preset("digits-cpu")
    spec.check_studio()
    assert spec.is_image and "multiscale" in spec.describe_model()
    with pytest.raises(ValueError, match="'mnist' needs its files: set \"data_dir\"") as err:
        RunSpec.from_preset("paper-mnist")
    assert "--data-dir" not in str(err.value), "the studio's words, not the CLI's"
    mnist = RunSpec.from_preset("paper-mnist", data_dir=str(tmp_path))
    mnist.check_studio()  # accepted: whether the files load is known when the run is built
    mnist.training.data_dir = None
    with pytest.raises(ValueError, match="needs its files"):
        mnist.check_studio()
    toy_model = RunSpec.from_preset("digits-cpu")
    toy_model.model = RunSpec.default().model
    with pytest.raises(ValueError, match="image preset such as digits-cpu"):
        toy_model.check_studio()
    image_model = RunSpec.default()
    image_model.model = spec.model
    with pytest.raises(ValueError, match="an image model"):
        image_model.check_studio()
    names = [p.name for p in studio_presets()]
    assert "digits-cpu" in names and "paper-toy-monotone" in names and "paper-mnist" not in names
