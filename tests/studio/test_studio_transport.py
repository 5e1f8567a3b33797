"""The transport view: the deformed grid arrives from the session (never computed in the GUI thread)."""

from __future__ import annotations

import numpy as np
from conftest import TEST_OPTIONS, WAIT_MS

from monoflow_studio.session import PAUSED

N_LINES = 2 * TEST_OPTIONS.transport_lines


def show_transport(window, qtbot) -> None:
    window.transport_dock.show()
    window.transport_dock.raise_()
    qtbot.waitUntil(lambda: window._transport_sent == window.transport.direction, timeout=WAIT_MS)


def test_transport_view_shows_the_trained_grid_and_the_slider_picks_a_stage(window, qtbot):
    show_transport(window, qtbot)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.step >= 4, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: window.transport._frame is not None and window.transport._frame.step > 0, timeout=WAIT_MS)
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)

    view = window.transport
    n_layers = window.session.submit(lambda t: len(t.flow.layers)).result(timeout=10)
    assert view.stage_slider.maximum() == n_layers
    assert view.stage == n_layers, "the slider starts at the end of the flow"
    end = view.current_lines()
    assert end is not None and end.shape == (N_LINES, TEST_OPTIONS.transport_points, 2)
    assert np.isfinite(end).all()
    assert len(view.lines) == N_LINES

    view.stage_slider.setValue(0)
    start = view.current_lines()
    assert start is not None and start.shape == end.shape
    assert not np.allclose(start, end), "moving the slider changes the drawn grid"
    # Stage 0 is the regular grid: horizontal lines have a constant y.
    np.testing.assert_allclose(start[0, :, 1], -TEST_OPTIONS.grid_extent)
    assert "regular grid" in view.stage_label.text()
    view.stage_slider.setValue(1)
    assert not np.allclose(view.current_lines(), start)


def test_transport_direction_change_is_computed_on_demand_while_paused(window, qtbot):
    show_transport(window, qtbot)
    qtbot.waitUntil(lambda: window.transport.current_lines() is not None, timeout=WAIT_MS)
    shown = window.transport.frames_shown
    forward_end = window.transport.current_lines()
    window.transport.set_direction("inverse")
    assert window.state == PAUSED
    qtbot.waitUntil(lambda: window.transport.frames_shown > shown, timeout=WAIT_MS)
    assert window.transport._frame.direction == "inverse"
    inverse_end = window.transport.current_lines()
    assert inverse_end is not None and np.isfinite(inverse_end).all()
    assert not np.allclose(inverse_end, forward_end)
    assert window.settings.value("transport/direction") == "inverse"


def test_hidden_transport_view_is_not_computed(window, qtbot):
    window.transport_dock.hide()
    qtbot.waitUntil(lambda: window._transport_sent is None, timeout=WAIT_MS)
    frames = window.density.frames_shown
    shown = window.transport.frames_shown
    window.step_action.trigger()
    qtbot.waitUntil(lambda: window.density.frames_shown > frames, timeout=WAIT_MS)
    assert window.transport.frames_shown == shown
