"""Studio test fixtures: headless Qt, isolated QSettings, and a tiny model so the suite stays fast on 2 cores."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")  # before Qt is imported anywhere

from collections.abc import Callable, Iterator

import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from PySide6.QtCore import QSettings

from monoflow_studio.app import configure_process
from monoflow_studio.main_window import MainWindow
from monoflow_studio.run_spec import RunSpec
from monoflow_studio.session import PAUSED, SessionOptions

configure_process()  # the app's own process settings (1 ms GIL switch interval, torch threads)

#: Bounded waits (ms): the first window of a process also pays torch's one-off lazy imports (~5 s here).
BUILD_TIMEOUT_MS = 30_000
WAIT_MS = 20_000


def tiny_spec(**training: object) -> RunSpec:
    """The paper's Monotone preset shrunk to 2 blocks and batch 128 (the studio code paths are identical)."""
    spec = RunSpec.default()
    spec.model = spec.model.replace(blocks=2)
    spec.training = spec.training.replace(batch_size=128, test_size=5000, **training)
    return spec


#: Small, frequent frames: the tests watch several of them. Frames in the view thread: a view process per window
#: would add its start-up (importing torch, seconds) to every test; tests/studio/test_view_process.py covers it.
TEST_OPTIONS = SessionOptions(
    grid_resolution=48,
    frame_min_interval_s=0.3,
    n_samples=500,
    eval_points=500,
    data_points=300,
    hist_bins=40,
    view_process=False,
)


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Point every QSettings of the test at a fresh temporary folder (never the user's real settings)."""
    folder = str(tmp_path_factory.mktemp("qsettings"))
    QSettings.setDefaultFormat(QSettings.Format.IniFormat)
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, folder)
    # QSettings(organization, application), the window's default, always uses the native format (setDefaultFormat
    # does not apply to that constructor): isolate it too.
    QSettings.setPath(QSettings.Format.NativeFormat, QSettings.Scope.UserScope, folder)
    yield folder


@pytest.fixture
def make_window(qtbot) -> Callable[..., MainWindow]:
    """Factory: a studio window on the tiny model, shown offscreen, with its first run built (paused)."""

    def make(spec: RunSpec | None = None, options: SessionOptions = TEST_OPTIONS) -> MainWindow:
        window = MainWindow(spec or tiny_spec(), options=options, theme="light")
        qtbot.addWidget(window)  # closed (worker stopped) at teardown
        window.show()
        qtbot.waitUntil(lambda: window.state == PAUSED and window.density.frames_shown >= 1, timeout=BUILD_TIMEOUT_MS)
        return window

    return make


@pytest.fixture
def window(make_window) -> MainWindow:
    return make_window()
