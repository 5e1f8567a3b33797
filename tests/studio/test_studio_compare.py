"""Compare mode: runs side by side on the same data, seed and batches, one colour scale, overlaid curves, fair turns,
clean stop (docs/studio.md, "Compare mode")."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from conftest import BUILD_TIMEOUT_MS, TEST_OPTIONS, WAIT_MS, tiny_spec

from monoflow_studio.compare import SHARED_TRAINING, CompareWindow, compare_spec, fair_share_text
from monoflow_studio.fair_share import FairShare
from monoflow_studio.run_spec import RunSpec
from monoflow_studio.session import PAUSED, TRAINING
from monoflow_studio.views.compare import shared_levels, solver_summary


def partner(base: RunSpec, preset: str) -> RunSpec:
    """``preset`` on ``base``'s data, seed and batches, shrunk like the suite's tiny monotone model."""
    spec = compare_spec(base, preset)
    spec.model = spec.model.replace(blocks=2, **({"hidden": [16, 16]} if spec.model.family != "implicit" else {}))
    return spec


@pytest.fixture
def make_compare(qtbot):
    def make(specs: list[RunSpec]) -> CompareWindow:
        window = CompareWindow(specs, options=TEST_OPTIONS)
        qtbot.addWidget(window)  # closed (every run stopped) at teardown
        window.show()
        qtbot.waitUntil(
            lambda: all(s == PAUSED for s in window.states) and all(p.frames_shown >= 1 for p in window.panels),
            timeout=BUILD_TIMEOUT_MS,
        )
        return window

    return make


@pytest.mark.parametrize(
    ("preset", "solver_text"),
    [
        ("toy-realnvp", "no implicit blocks"),  # a comparison family (zuko)
        ("quick-idensenet", "residual blocks"),  # the paper's residual baseline
    ],
)
def test_two_runs_train_side_by_side_at_one_colour_scale(preset, solver_text, make_compare, qtbot):
    if preset.startswith("toy-"):
        pytest.importorskip("zuko")
    a = tiny_spec()
    window = make_compare([a, partner(a, preset)])
    configs = [
        s.submit(
            lambda t: (t.train_config.data, t.train_config.seed, t.train_config.batch_size, t.model_config.family)
        ).result(timeout=10)
        for s in window.sessions
    ]
    assert configs[0][:3] == configs[1][:3], "same data, seed and batch size"
    assert configs[1][3] == window.specs[1].model.family

    window.train_action.trigger()
    qtbot.waitUntil(lambda: all(s == TRAINING for s in window.states), timeout=WAIT_MS)
    qtbot.waitUntil(lambda: min(window.steps) >= 5, timeout=WAIT_MS)
    shown = [p.frames_shown for p in window.panels]
    qtbot.waitUntil(
        lambda: all(p.frames_shown >= n + 2 for p, n in zip(window.panels, shown, strict=True)), timeout=WAIT_MS
    )
    window.train_action.trigger()
    qtbot.waitUntil(lambda: all(s == PAUSED for s in window.states), timeout=WAIT_MS)
    window._redraw()

    # One colour scale: every panel at the levels of the highest density of both frames.
    frames = [p.frame for p in window.panels]
    assert all(f is not None and f.step > 0 for f in frames)
    tops = [float(np.nanmax(f.log_density)) for f in frames]
    expected = (0.0, float(np.exp(max(tops))))
    for panel in window.panels:
        assert panel.levels == pytest.approx(expected)
        image = panel.current_image()
        assert image is not None and np.isfinite(image).all() and image.max() <= expected[1] * (1 + 1e-9)
    window.mode_box.setCurrentIndex(window.mode_box.findData("log-density"))
    assert window.panels[0].levels == window.panels[1].levels == pytest.approx((max(tops) - 12.0, max(tops)))

    # The curves show both runs, each against its own training seconds or its steps.
    names = window.curves.legend_names()
    assert any(window.specs[0].name in n for n in names) and any(window.specs[1].name in n for n in names)
    window.curves._redraw_if_dirty()
    for i in range(2):
        run = window.curves.runs[i]
        assert len(run.steps) >= 5 and run.eval_nll, "train loss and test NLL of both runs"
        x_time, _ = window.curves.curve_data(i)
        np.testing.assert_allclose(x_time, run.time_s)
        assert np.all(np.diff(x_time) > 0)
    window.curves.x_axis.setCurrentIndex(window.curves.x_axis.findData("step"))
    np.testing.assert_array_equal(window.curves.curve_data(1)[0], window.curves.runs[1].steps)

    # Solver diagnostics for the monotone run; the partner says what it has instead.
    assert window.panels[0].solver.text().startswith("solver at step")
    assert solver_text in window.panels[1].solver.text()
    assert window.share_label.text() == fair_share_text(2) and "half of the training time" in fair_share_text(2)
    assert "step" in window.run_labels[1].text()


def test_closing_while_training_stops_every_thread(make_compare, qtbot):
    a = tiny_spec()
    window = make_compare([a, partner(a, "quick-idensenet")])
    window.train_action.trigger()
    qtbot.waitUntil(lambda: min(window.steps) >= 2, timeout=WAIT_MS)
    assert window.is_alive()
    window.close()
    assert not window.is_alive(), "worker and view threads of both runs end with the window"
    assert window.gate.shares == 0, "both workers left the turn-taking gate"


def test_the_studio_opens_a_comparison_and_it_closes_with_the_studio(window, qtbot, monkeypatch):
    from monoflow_studio import compare as compare_module

    asked: list[str] = []

    def ask(_parent, base):
        asked.append(base.name)
        return "quick-idensenet"

    monkeypatch.setattr(compare_module, "ask_compare_preset", ask)
    assert window.compare_action in window.menuBar().actions()[1].menu().actions()  # Run > Compare with...
    window.train_action.trigger()
    qtbot.waitUntil(lambda: window.state == TRAINING, timeout=WAIT_MS)
    compare = window.open_compare()
    assert asked == [window.spec.name] and isinstance(compare, CompareWindow)
    qtbot.waitUntil(lambda: window.state == PAUSED, timeout=WAIT_MS)  # the studio's run yields the machine
    a, b = compare.specs
    assert b.name == "quick-idensenet"
    assert a.model == window.spec.model
    for name in SHARED_TRAINING:
        assert getattr(b.training, name) == getattr(a.training, name)
    assert b.training.lr == RunSpec.from_preset("quick-idensenet").training.lr, "B keeps its preset's optimiser"
    qtbot.waitUntil(lambda: all(s == PAUSED for s in compare.states), timeout=BUILD_TIMEOUT_MS)
    compare.train_action.trigger()
    qtbot.waitUntil(lambda: min(compare.steps) >= 1, timeout=WAIT_MS)
    window.close()
    assert not compare.is_alive(), "the comparison's runs stop with the studio window"


def test_compare_spec_and_window_refuse_what_cannot_be_compared(qtbot):
    base = tiny_spec(data="moons", seed=3)
    base.training = base.training.replace(batch_size=64)
    b = compare_spec(base, "quick-idensenet")
    assert (b.training.data, b.training.seed, b.training.batch_size) == ("moons", 3, 64)
    other = b.copy()
    other.training = other.training.replace(seed=4)
    with pytest.raises(ValueError, match="seed"):
        CompareWindow([base, other], options=TEST_OPTIONS)
    with pytest.raises(ValueError, match="2 to"):
        CompareWindow([base], options=TEST_OPTIONS)


def test_shared_levels_and_solver_summary():
    from monoflow_studio.frames import ViewFrame

    def frame(top: float) -> ViewFrame:
        logp = np.full((4, 4), top - 5.0)
        logp[1, 2] = top
        logp[0, 0] = np.nan  # a failed cell does not decide the scale
        return ViewFrame(
            run_id=1,
            step=1,
            log_density=logp,
            extent=(-1, 1, -1, 1),
            samples=np.zeros((0, 2)),
            sample_hist=np.zeros((2, 2)),
            diagnostics=[],
            eval=None,
            seconds=0.0,
        )

    assert shared_levels([None, None], "density") is None
    assert shared_levels([frame(-1.0), frame(-3.0)], "density") == pytest.approx((0.0, np.exp(-1.0)))
    assert shared_levels([frame(-3.0), None, frame(-2.0)], "log-density") == pytest.approx((-14.0, -2.0))
    fwd = [
        {
            "kind": "monotone",
            "forward": {"iterations_mean": m, "iterations_median": m, "iterations_max": x, "n_failed": f},
        }
        for m, x, f in ((3.0, 4, 0), (5.0, 9, 2), (4.0, 6, 0))
    ]
    text = solver_summary("implicit", fwd, 7)
    assert "median 4 iterations" in text and "max 9" in text and "2 sample(s) missed" in text
    assert "all converged" in solver_summary("implicit", fwd[:1], 7)
    residual = [{"kind": "residual", "forward": None}]
    assert solver_summary("implicit", residual, 7).startswith("residual blocks")
    assert solver_summary("realnvp", [], 7) == "no implicit blocks (no solver)"


def _would_wait(gate: FairShare, key: str, polls: int = 5) -> bool:
    """Whether ``key`` would have to wait for its turn (it gives up after a few polls instead of waiting)."""
    left = [polls]

    def wanted() -> bool:
        left[0] -= 1
        return left[0] >= 0

    got = gate.acquire(key, wanted)
    if got:
        gate.release(key, 0.0)
    return not got


def test_fair_share_gives_the_next_turn_to_the_run_that_used_least_time():
    gate = FairShare(max_lead_s=1.0, poll_s=0.001)
    active = {"a": True, "b": True}
    for key in active:
        gate.join(key, lambda k=key: active[k])
    assert gate.acquire("a")
    assert _would_wait(gate, "b"), "one step at a time"
    gate.release("a", 0.5)
    assert _would_wait(gate, "a"), "a has used more time: b's turn"
    assert gate.acquire("b")
    gate.release("b", 0.2)
    assert _would_wait(gate, "a") and not _would_wait(gate, "b")
    active["b"] = False
    assert not _would_wait(gate, "a"), "a paused run does not hold the others back"
    assert gate.acquire("a")
    gate.release("a", 10.0)
    active["b"] = True
    assert gate.acquire("b")
    gate.release("b", 0.0)
    assert gate.used("b") == pytest.approx(gate.used("a") - 1.0), "back from a pause: at most max_lead_s to catch up"
    gate.leave("a")
    gate.leave("b")
    assert gate.shares == 0


def test_fair_share_alternates_two_threads_by_time_used():
    """Two threads whose steps 'cost' 1 and 3 units (counted, not timed): the cheap one makes about 3 steps per
    expensive one, and neither runs while the other holds its turn."""
    gate = FairShare(poll_s=0.001)
    order: list[str] = []
    holding = threading.Lock()
    overlap = []
    stop = threading.Event()
    for key in ("cheap", "dear"):
        gate.join(key, lambda: not stop.is_set())

    def run(key: str, cost: float) -> None:
        while not stop.is_set():
            if not gate.acquire(key, lambda: not stop.is_set()):
                return
            if not holding.acquire(blocking=False):  # held by the other thread's turn
                overlap.append(key)
            else:
                order.append(key)  # the "step"
                holding.release()
            gate.release(key, cost)
            if len(order) >= 200:
                stop.set()

    threads = [threading.Thread(target=run, args=("cheap", 1.0)), threading.Thread(target=run, args=("dear", 3.0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not overlap
    cheap, dear = order.count("cheap"), order.count("dear")
    assert abs(cheap * 1.0 - dear * 3.0) <= 3.0, (cheap, dear)
