"""The command line, settings persistence, and the PySide6 / pyqtgraph repaint guard."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import BUILD_TIMEOUT_MS, TEST_OPTIONS, WAIT_MS, tiny_spec

from monoflow_studio.app import build_parser, main, spec_from_args
from monoflow_studio.main_window import MainWindow
from monoflow_studio.session import PAUSED


def test_cli_defaults_to_the_quick_preset_on_8gaussians_and_offers_the_paper_ones():
    spec = spec_from_args(build_parser().parse_args([]))
    assert spec.name == "quick-monotone" and spec.training.data == "8gaussians"
    assert spec.model.blocks == 6 and spec.model.formulation == "monotone" and spec.model.logdet == "exact"
    assert spec.training.lr == 0.02 and spec.training.ema == 0.95 and spec.training.warmup_iterations == 0
    spec = spec_from_args(build_parser().parse_args(["--preset", "paper-toy-monotone"]))
    assert spec.model.blocks == 10 and spec.training.lr == 0.001
    spec = spec_from_args(build_parser().parse_args(["--preset", "paper-toy-idensenet", "--data", "moons"]))
    assert spec.model.formulation == "residual" and spec.training.data == "moons"


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "no-such-set"])
    assert exit_info.value.code == 2
    assert main(["--preset", "no-such-preset"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.safetensors")]) == 2


def test_entry_point_is_importable_without_qt():
    code = (
        "import sys; import monoflow_studio.__main__ as m; assert callable(m.main); "
        "assert not any(k.startswith(('PySide6', 'pyqtgraph')) for k in sys.modules); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_settings_persist_window_and_view_state(qtbot):
    first = MainWindow(tiny_spec(), theme="light")
    qtbot.addWidget(first)
    first.density.set_mode("log-density")
    first.curves.smoothing.setValue(0.5)
    first.resize(640, 480)  # within the offscreen platform's 800 x 600 screen
    first.close()
    second = MainWindow(tiny_spec())
    qtbot.addWidget(second)
    assert second.density.mode == "log-density"
    assert second.curves.smoothing.value() == 0.5
    assert (second.size().width(), second.size().height()) == (640, 480)
    assert second.settings.value("theme") == "light"
    qtbot.waitUntil(lambda: second.state in ("paused", "training"), timeout=WAIT_MS)


def test_filled_curve_repaint_soak(qapp):
    """3,000 repaints of a filled curve: PySide6 6.12.0 + pyqtgraph 0.14.0 crash here ("none_dealloc")."""
    import numpy as np
    import pyqtgraph as pg

    widget = pg.PlotWidget()
    widget.resize(200, 120)
    x = np.linspace(0, 1, 200)
    curve = widget.plot(x, np.sin(6 * x), fillLevel=0, brush=(80, 160, 255, 120))
    widget.show()
    painted = 0
    for i in range(3000):
        if i % 100 == 0:
            curve.setData(x, np.sin(6 * x + i / 100), fillLevel=0, brush=(80, 160, 255, 120))
        # grab() renders the whole scene, filled curve included; repaint() of an unexposed offscreen widget would
        # not paint at all.
        painted += not widget.grab().isNull()
    assert painted == 3000
    widget.close()


def test_the_heap_is_frozen_once_the_first_run_is_built(qtbot, monkeypatch) -> None:
    """Full collections skip everything alive at start-up (torch, Qt, pyqtgraph): no 150-330 ms GIL pauses."""
    import gc

    from monoflow_studio.app import freeze_heap_after_first_build

    calls: list[int] = []
    real_freeze = gc.freeze

    def freeze() -> None:
        real_freeze()
        calls.append(gc.get_freeze_count())

    monkeypatch.setattr(gc, "freeze", freeze)
    gc.unfreeze()
    try:
        window = MainWindow(tiny_spec(), options=TEST_OPTIONS, theme="light")
        qtbot.addWidget(window)
        freeze_heap_after_first_build(window)
        window.show()
        qtbot.waitUntil(lambda: window.state == PAUSED, timeout=BUILD_TIMEOUT_MS)
        qtbot.waitUntil(lambda: len(calls) == 1, timeout=WAIT_MS)
        assert calls[0] > 10_000  # the process's start-up objects
        window.session.step_once()
        qtbot.waitUntil(lambda: window.step >= 1, timeout=BUILD_TIMEOUT_MS)
        window.session.reset(tiny_spec())
        qtbot.waitUntil(lambda: window.state == PAUSED and window.step == 0, timeout=BUILD_TIMEOUT_MS)
        assert len(calls) == 1  # once, not at every build or step
    finally:
        gc.unfreeze()
