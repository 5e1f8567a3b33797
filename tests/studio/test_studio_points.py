"""Your own 2-D data in the studio: File > Load data... (with a column chooser), drawing points with the mouse on the
density view's canvas (brush, density, undo, clear), and such a run's checkpoint reopening with its data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WAIT_MS
from PySide6.QtCore import QPointF, Qt
from PySide6.QtWidgets import QFileDialog, QMessageBox

from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.data.point_files import read_point_table
from monoflow_studio import window_files as window_files_module
from monoflow_studio.session import PAUSED
from monoflow_studio.user_data import ColumnDialog, load_point_file


def to_pixels(window, x, y):
    """Viewport pixel of the plot point ``(x, y)``."""
    plot = window.density.plot
    scene = plot.getPlotItem().getViewBox().mapViewToScene(QPointF(x, y))
    return plot.mapFromScene(scene)


def stroke(window, qtbot, path):
    """A scripted left-button stroke through ``path`` (plot coordinates): press, moves, release; returns the
    viewport pixels it went through."""
    viewport = window.density.plot.viewport()
    pixels = [to_pixels(window, *path[0])]
    qtbot.mousePress(viewport, Qt.MouseButton.LeftButton, pos=pixels[0])
    for x, y in path[1:]:
        pixels.append(to_pixels(window, x, y))
        qtbot.mouseMove(viewport, pixels[-1])
    qtbot.mouseRelease(viewport, Qt.MouseButton.LeftButton, pos=to_pixels(window, *path[-1]))
    return [(p.x(), p.y()) for p in pixels]


def line(x0, y0, x1, y1, n=25):
    return [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t) for t in np.linspace(0.0, 1.0, n)]


def start_drawing(window, qtbot):
    window.density.draw_button.click()
    qtbot.waitUntil(lambda: window.density.drawing.active, timeout=WAIT_MS)
    assert not window.density.image.isVisible()  # an empty canvas


def near_segment(points, a, b):
    """Distance of each point to the segment ``a``-``b``."""
    a, b = np.asarray(a), np.asarray(b)
    t = np.clip(((points - a) @ (b - a)) / ((b - a) @ (b - a)), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1)


def test_a_mouse_stroke_adds_points_and_undo_removes_them(window, qtbot):
    start_drawing(window, qtbot)
    model = window.density.drawing.model
    window.density.drawing.brush.setValue(0.2)
    window.density.drawing.density.setValue(5)
    pixels = stroke(window, qtbot, line(-3.0, -2.0, 3.0, -2.0))
    first = model.points.copy()
    # About one dab every half radius over 6 units: ~60 dabs of 5 points, all close to the horizontal line.
    # (The message records what the stroke went through, should this fail again: once, under load, it added 20.)
    plot = window.density.plot
    seen = (
        f"{first.shape[0]} points; stroke pixels {pixels}; viewport {plot.viewport().size()}; "
        f"view range {plot.getPlotItem().getViewBox().viewRange()}"
    )
    assert 150 <= first.shape[0] <= 400, seen
    assert near_segment(first, (-3, -2), (3, -2)).max() < 0.2 * 3  # within 6 sigma of the stroke
    assert first[:, 0].min() < -2.5 and first[:, 0].max() > 2.5
    assert window.density.drawing.count_label.text() == f"{first.shape[0]:,} points"

    window.density.drawing.density.setValue(20)  # a denser brush: more points per dab
    stroke(window, qtbot, line(0.0, 1.0, 0.0, 3.0))
    both = model.points
    second = both[first.shape[0] :]
    assert second.shape[0] > 0 and near_segment(second, (0, 1), (0, 3)).max() < 0.6
    assert second.shape[0] / 2.0 > first.shape[0] / 6.0  # per unit of length

    window.density.drawing.undo_button.click()
    np.testing.assert_array_equal(model.points, first)  # the last stroke, exactly
    window.density.drawing.clear_button.click()
    assert model.count == 0 and not window.density.drawing.use_button.isEnabled()
    window.density.drawing.undo_button.click()  # Clear is undone too
    np.testing.assert_array_equal(model.points, first)
    window.density.drawing.undo_button.click()
    assert model.count == 0 and not window.density.drawing.undo_button.isEnabled()


def test_drawn_data_becomes_the_run_and_its_checkpoint_keeps_it(window, qtbot, monkeypatch, tmp_path):
    start_drawing(window, qtbot)
    stroke(window, qtbot, line(-2.0, -1.0, 2.0, 1.0))
    stroke(window, qtbot, line(-2.0, 1.0, 2.0, -1.0))
    drawn = window.density.drawing.model.points.copy()
    run = window.run_id
    window.density.drawing.use_button.click()
    qtbot.waitUntil(lambda: window.run_id == run + 1 and window.state == PAUSED, timeout=WAIT_MS)
    assert window.spec.training.data == "points" and not window.density.drawing.active
    points = window.spec.points
    assert points.is_identity and points.source == "drawing"
    assert "held out (20%)" in window.density.caption.text()
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.step >= 3, timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)
    target = tmp_path / "drawn.safetensors"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    with qtbot.waitSignal(window.session.checkpoint_saved, timeout=WAIT_MS):
        window.save_ckpt_action.trigger()
    stored = load_checkpoint(target).points
    both = np.concatenate([stored.train.numpy(), stored.test.numpy()])
    np.testing.assert_array_equal(np.sort(both, axis=0), np.sort(drawn, axis=0))

    # The checkpoint reopens with its data: the run trains on the stored points, the overlay shows them.
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: QMessageBox.StandardButton.Discard)
    window.apply_spec(type(window.spec).default(), "preset")
    qtbot.waitUntil(lambda: window.spec.training.data == "8gaussians" and window.state == PAUSED, timeout=WAIT_MS)
    run = window.run_id
    window.open_checkpoint(str(target))
    qtbot.waitUntil(lambda: window.run_id > run and window.state == PAUSED, timeout=WAIT_MS)
    assert window.spec.training.data == "points"
    torch.testing.assert_close(window.spec.points.train, stored.train, rtol=0, atol=0)
    shown = np.stack(window.density.data_scatter.getData(), axis=1)
    assert len(shown) > 0 and {tuple(r) for r in shown} <= {tuple(r) for r in stored.train.numpy()}


def test_too_few_drawn_points_are_a_message(window, qtbot):
    start_drawing(window, qtbot)
    window.density.drawing.density.setValue(1)
    viewport = window.density.plot.viewport()
    qtbot.mouseClick(viewport, Qt.MouseButton.LeftButton, pos=to_pixels(window, 0.5, 0.5))  # one dab, one point
    assert window.density.drawing.model.count == 1
    run = window.run_id
    window.density.drawing.use_button.click()
    assert "cannot train on the drawing" in window.log.toPlainText() and "at least 10" in window.log.toPlainText()
    assert window.run_id == run and window.spec.training.data == "8gaussians"


def write_table(path, n=300):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 2)) * [2.0, 0.5] + [100.0, -20.0]
    rows = [f"{a},{b},label{i % 2}" for i, (a, b) in enumerate(x)]
    path.write_text("x,y,label\n" + "\n".join(rows) + "\n")
    return x


def test_loading_a_file_asks_for_columns_and_trains(window, qtbot, monkeypatch, tmp_path):
    write_table(tmp_path / "mine.csv")
    asked = []

    def chooser(parent):
        def choose(table):
            asked.append(list(table.names))
            return "x", "y"

        return choose

    monkeypatch.setattr(window_files_module, "ask_columns", chooser)
    monkeypatch.setattr(QFileDialog, "getOpenFileName", lambda *a, **k: (str(tmp_path / "mine.csv"), ""))
    run = window.run_id
    window.load_data_action.trigger()
    qtbot.waitUntil(lambda: window.run_id == run + 1 and window.state == PAUSED, timeout=WAIT_MS)
    assert asked == [["x", "y", "label"]]
    points = window.spec.points
    assert window.spec.training.data == "points" and points.columns == ("x", "y")
    np.testing.assert_allclose(points.to_data(points.train).mean(axis=0), points.mean.numpy())
    assert abs(float(points.mean[0]) - 100.0) < 0.5  # standardised with the file's own mean
    log = window.log.toPlainText()
    assert "mine.csv (columns x, y): 300 points, 240 to train on, 60 held out" in log and "mean (" in log
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.step >= 3, timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)
    batch = window.session.submit(lambda t: t.points.train.shape).result(timeout=10)
    assert tuple(batch) == (240, 2)


def test_a_cancelled_column_choice_keeps_the_run(window, qtbot, monkeypatch, tmp_path):
    write_table(tmp_path / "mine.csv")
    monkeypatch.setattr(window_files_module, "ask_columns", lambda parent: lambda table: None)
    run = window.run_id
    window.load_data(str(tmp_path / "mine.csv"))
    qtbot.wait(200)
    assert window.run_id == run and window.spec.training.data == "8gaussians"


BAD = {
    "empty.csv": b"",
    "one-column.csv": b"1\n2\n3\n4\n",
    "text.csv": b"x,y\n1,2\n3,four\n",
    "nan.csv": b"x,y\n1,2\nnan,3\n",
    "pickle.npy": b"\x80\x04\x95" + b"\x00" * 64,
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_malformed_file_is_a_message_and_the_run_goes_on(window, qtbot, name, tmp_path):
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.step == 1, timeout=WAIT_MS)
    path = tmp_path / name
    path.write_bytes(BAD[name])
    run = window.run_id
    window.load_data(str(path))
    assert "could not load data" in window.statusBar().currentMessage() and name in window.log.toPlainText()
    assert "the current run is kept" in window.log.toPlainText()
    qtbot.wait(200)
    assert window.run_id == run and window.step == 1 and window.spec.training.data == "8gaussians"
    window.step_action.trigger()  # the run trains on
    qtbot.waitUntil(lambda: window.step == 2, timeout=WAIT_MS)


def test_the_column_dialog_offers_every_column(qtbot, tmp_path):
    write_table(tmp_path / "mine.csv")
    table = read_point_table(tmp_path / "mine.csv")
    dialog = ColumnDialog(table)
    qtbot.addWidget(dialog)
    assert [dialog.first.itemText(i) for i in range(dialog.first.count())] == ["x", "y", "label"]
    assert dialog.columns() == ("x", "y")  # named x and y
    dialog.first.setCurrentIndex(1)
    dialog.second.setCurrentIndex(0)
    assert dialog.columns() == ("y", "x")
    chosen = load_point_file(tmp_path / "mine.csv", lambda t: dialog.columns(), split_seed=1)
    assert chosen.columns == ("y", "x")
    (tmp_path / "ids.csv").write_text("id,Y,X\n" + "".join(f"{i},{i % 7},{i % 5}\n" for i in range(30)))
    ids = ColumnDialog(read_point_table(tmp_path / "ids.csv"))
    qtbot.addWidget(ids)
    assert ids.columns() == ("X", "Y")  # columns named x and y, in that order, rather than the first two


def test_switching_to_a_toy_set_and_back_keeps_the_points(window, qtbot, monkeypatch, tmp_path):
    write_table(tmp_path / "mine.csv")
    monkeypatch.setattr(window_files_module, "ask_columns", lambda parent: lambda table: ("x", "y"))
    run = window.run_id
    window.load_data(str(tmp_path / "mine.csv"))
    qtbot.waitUntil(lambda: window.run_id == run + 1 and window.state == PAUSED, timeout=WAIT_MS)
    loaded = window.spec.points
    combo = window.controls.data
    combo.setCurrentIndex(combo.findData("moons"))
    qtbot.waitUntil(lambda: window.run_id == run + 2 and window.state == PAUSED, timeout=WAIT_MS)
    assert window.spec.training.data == "moons"
    combo.setCurrentIndex(combo.findData("points"))
    qtbot.waitUntil(lambda: window.run_id == run + 3 and window.state == PAUSED, timeout=WAIT_MS)
    assert window.spec.training.data == "points" and window.spec.points is loaded
    axis = window.density.plot.getPlotItem().getAxis("bottom")
    assert axis.labelText == "x (standardised)"
