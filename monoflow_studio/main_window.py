"""The studio's main window: docks, status bar, persisted settings and run controls; it drives a :class:`Session`.

The window never runs model code: it posts commands to the session and displays what the session's signals
carry. It follows the kind of run it shows: 2-D runs show the density view (centre) and the transport dock, image
runs the sample grid (centre), curves in bits/dim and periodic tests; the switch happens when a run is built.

Errors (a corrupt checkpoint, an unwritable export path, a diverging run, a solver that misses its
tolerance) become a line in the log and in the status bar; a dialog appears only where the user must decide
(discarding a run to apply a rebuild setting, choosing a file).
"""

from __future__ import annotations

import collections
import dataclasses

from PySide6.QtCore import QSettings, Qt, QTimer
from PySide6.QtGui import QCloseEvent
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QLabel,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QStackedWidget,
    QWidget,
)

from .controls import ControlsPanel
from .run_spec import RunSpec
from .session import TRAINING, Session, SessionOptions
from .settings import StudioSettings, last_dir, read_settings, remember_dir, window_layout, write_settings
from .theme import THEMES, apply_theme, plot_colors
from .views.curves import CurvesView
from .views.density import DensityView
from .views.diagnostics import SolverView
from .views.log import LogView
from .views.samples import SamplesView
from .views.transport import TransportView
from .window_files import WindowFiles
from .window_menus import WindowMenus
from .window_signals import NO_TRANSPORT, SessionSignals

__all__ = ["APPLICATION", "NO_TRANSPORT", "ORGANIZATION", "MainWindow"]

ORGANIZATION = "monoflow"
APPLICATION = "monoflow-studio"


class MainWindow(WindowMenus, WindowFiles, SessionSignals, QMainWindow):
    """The studio window.

    Its commands, menus and toolbar come from :class:`~monoflow_studio.window_menus.WindowMenus`, its file commands
    from :class:`~monoflow_studio.window_files.WindowFiles`, and its answers to the session's signals from
    :class:`~monoflow_studio.window_signals.SessionSignals`; this class builds the docks and holds the settings and
    the run controls.

    Args:
        spec: the first run's configuration (default: the paper's Monotone preset on 8gaussians).
        options: what the worker computes for the views and how often (tests use a small grid).
        settings: where window state and last folders persist (default: ``QSettings(ORGANIZATION,
            APPLICATION)``).
        theme: ``system``, ``light`` or ``dark``; ``None`` uses the persisted choice (default ``system``).
    """

    def __init__(
        self,
        spec: RunSpec | None = None,
        *,
        options: SessionOptions | None = None,
        settings: QSettings | None = None,
        theme: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings if settings is not None else QSettings(ORGANIZATION, APPLICATION)
        spec = spec if spec is not None else RunSpec.default()
        self.spec = spec.copy()  # the configuration of the run the session holds now
        self.step = 0
        self.state = ""
        self.run_id = 0
        self.device = spec.training.device
        self.image_mode = False
        self._step_before_rebuild = 0
        self._rates: collections.deque[tuple[float, int]] = collections.deque(maxlen=64)
        self._rejections = 0
        self._last_solver_warning = -1e9
        self._closing = False
        self._restoring = False
        self._theme = "system"  # set_theme() sets it; kept so that saving the view settings keeps the theme

        options = self._with_sample_settings(options or SessionOptions())
        self.options = options
        self.session = Session(spec, options, parent=self)
        self._build_views(spec)
        self._build_actions()
        self._build_status_bar()
        self._set_image_mode(spec.is_image)  # until the first run is built
        self._connect_session()
        self._restore_settings()
        self.set_theme(theme if theme is not None else read_settings(self.settings).theme)
        self._update_title()
        self._rate_timer = QTimer(self)
        self._rate_timer.setInterval(500)
        self._rate_timer.timeout.connect(self._update_status)
        self._rate_timer.start()
        self.log.add("info", f"monoflow studio: {spec.name} on {spec.training.data}; press Space to train")
        self.session.launch()

    # ------------------------------------------------------------------------------------------------------
    # construction
    # ------------------------------------------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(name)  # saveState / restoreState identify docks by object name
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _with_sample_settings(self, options: SessionOptions) -> SessionOptions:
        """The persisted sample-grid settings, so the first grid is already drawn with them."""
        wanted = StudioSettings(images_count=options.image_samples, images_temperature=options.sample_temperature)
        stored = read_settings(self.settings, wanted)
        return dataclasses.replace(
            options, image_samples=stored.images_count, sample_temperature=stored.images_temperature
        )

    def _build_views(self, spec: RunSpec) -> None:
        self.density = DensityView()
        self.samples = SamplesView()
        self.central = QStackedWidget()
        self.central.addWidget(self.density)
        self.central.addWidget(self.samples)
        self.setCentralWidget(self.central)
        self.controls = ControlsPanel(spec, default_eval_every=self.options.default_eval_every)
        scroll = QScrollArea()
        scroll.setWidget(self.controls)
        scroll.setWidgetResizable(True)
        self.curves = CurvesView()
        self.solver_view = SolverView()
        self.transport = TransportView()
        self.log = LogView()
        left, right, bottom = (
            Qt.DockWidgetArea.LeftDockWidgetArea,
            Qt.DockWidgetArea.RightDockWidgetArea,
            Qt.DockWidgetArea.BottomDockWidgetArea,
        )
        self.controls_dock = self._dock("Controls", "controls", scroll, left)
        self.curves_dock = self._dock("Curves", "curves", self.curves, right)
        self.solver_dock = self._dock("Solver diagnostics", "solver", self.solver_view, right)
        # A tab behind the solver diagnostics: the session computes the transport only while it is visible.
        self.transport_dock = self._dock("Transport", "transport", self.transport, right)
        self.tabifyDockWidget(self.solver_dock, self.transport_dock)
        self.solver_dock.raise_()
        self._transport_sent: str | None = None
        self._transport_visible = False
        self.log_dock = self._dock("Log", "log", self.log, bottom)
        self.resize(1500, 900)
        self.resizeDocks([self.controls_dock], [330], Qt.Orientation.Horizontal)
        self.resizeDocks([self.curves_dock], [520], Qt.Orientation.Horizontal)
        self.resizeDocks([self.log_dock], [120], Qt.Orientation.Vertical)
        self.controls.live_changed.connect(self._on_live_changed)
        self.controls.rebuild_changed.connect(self._on_rebuild_changed)
        self.density.settings_changed.connect(self._save_view_settings)
        self.samples.settings_changed.connect(self._save_view_settings)
        self.samples.samples_changed.connect(lambda n, t: self.session.set_samples(n, t))
        self.curves.settings_changed.connect(self._save_view_settings)
        self.transport.direction_changed.connect(self._on_transport_direction)
        self.transport_dock.visibilityChanged.connect(self._on_transport_visibility)
        self.density.drawing.use_requested.connect(self.use_drawing)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.step_label = QLabel("step 0")
        self.rate_label = QLabel("0.0 it/s")
        self.device_label = QLabel(f"device {self.device}")
        self.state_label = QLabel("starting")
        for w in (self.step_label, self.rate_label, self.device_label, self.state_label):
            w.setMinimumWidth(90)
            bar.addPermanentWidget(w)

    # ------------------------------------------------------------------------------------------------------
    # settings and theme
    # ------------------------------------------------------------------------------------------------------
    def _restore_settings(self) -> None:
        stored = read_settings(self.settings)
        self._restoring = True  # restoring one view setting must not save the others' defaults over theirs
        geometry, state = window_layout(self.settings)
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)
        self.density.set_mode(stored.density_mode)
        self.density.overlay_box.setChecked(stored.overlay)
        self.density.samples_box.setChecked(stored.show_samples)
        self.curves.smoothing.setValue(stored.smoothing)
        self.curves.log_y.setChecked(stored.log_y)
        self.transport.set_direction(stored.transport_direction)
        self.samples.set_mode(stored.images_mode)
        self.samples.blockSignals(True)  # the session already has these (SessionOptions)
        try:
            self.samples.set_count(self.options.image_samples)
            self.samples.temperature.setValue(self.options.sample_temperature)
        finally:
            self.samples.blockSignals(False)
        self._restoring = False

    def _view_settings(self) -> StudioSettings:
        """The preferences as the views show them now."""
        return StudioSettings(
            theme=self._theme,
            density_mode=self.density.mode,
            overlay=self.density.overlay_box.isChecked(),
            show_samples=self.density.samples_box.isChecked(),
            smoothing=float(self.curves.smoothing.value()),
            log_y=self.curves.log_y.isChecked(),
            transport_direction=self.transport.direction,
            images_mode=self.samples.mode,
            images_count=self.samples.count,
            images_temperature=float(self.samples.temperature.value()),
        )

    def _save_view_settings(self) -> None:
        if not self._restoring:
            write_settings(self.settings, self._view_settings())

    def _save_settings(self) -> None:
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.setValue("window/state", self.saveState())
        self._save_view_settings()
        self.settings.sync()

    def _last_dir(self, kind: str) -> str:
        return last_dir(self.settings, kind)

    def _remember_dir(self, kind: str, path: str) -> None:
        remember_dir(self.settings, kind, path)

    def set_theme(self, mode: str) -> None:
        """Switch between the system, light and dark themes (persisted)."""
        if mode not in THEMES:
            mode = "system"
        app = QApplication.instance()
        dark = apply_theme(app, mode) if isinstance(app, QApplication) else False
        colors = plot_colors(dark)
        for view in (self.density, self.samples, self.curves, self.solver_view, self.transport):
            view.set_colors(colors)
        self.theme_actions[mode].setChecked(True)
        self._theme = mode
        write_settings(self.settings, StudioSettings(theme=mode), "theme")

    # ------------------------------------------------------------------------------------------------------
    # run control
    # ------------------------------------------------------------------------------------------------------
    def toggle_training(self) -> None:
        """Train / Pause."""
        if self.state == TRAINING:
            self.session.pause()
        else:
            self.session.start()

    def step_once(self) -> None:
        self.session.step_once()

    def evaluate_now(self) -> None:
        """Image runs: a bits/dim test of the model as it is now, in the background."""
        if not self.image_mode:
            self._on_message("info", "2-D runs are tested with every view frame (test NLL in the curves)")
            return
        self.curves.set_test_status(f"test of step {self.step} queued")
        self.session.evaluate_now()

    def reset_run(self) -> None:
        """Discard the run; a fresh model with the settings shown in the controls (paused)."""
        spec = self._controls_spec()
        if spec is not None:
            self._rebuild(spec, keep_running=False, why="reset")

    def apply_spec(self, spec: RunSpec, why: str) -> bool:
        """Show ``spec`` in the controls and rebuild with it, asking first if that discards a run."""
        try:
            spec.check_studio()
        except ValueError as err:
            self._on_message("error", str(err))
            return False
        if not self._confirm_discard(why):
            return False
        self.controls.set_spec(spec)
        self._rebuild(spec, keep_running=self.state == TRAINING, why=why)
        return True

    def _controls_spec(self) -> RunSpec | None:
        try:
            return self.controls.spec()
        except ValueError as err:
            self._on_message("error", f"invalid settings: {err}")
            self.controls.set_spec(self.spec)
            return None

    def _confirm_discard(self, why: str) -> bool:
        """Ask before discarding a run that has trained (the user must decide: a dialog)."""
        if self.step == 0:
            return True
        answer = QMessageBox.question(
            self,
            "Discard the current run?",
            f"Applying {why} needs a new model: the current run (step {self.step}) will be discarded.\n"
            "Export a checkpoint first if you want to keep it.",
            QMessageBox.StandardButton.Discard | QMessageBox.StandardButton.Cancel,
            QMessageBox.StandardButton.Cancel,
        )
        return answer == QMessageBox.StandardButton.Discard

    def _rebuild(self, spec: RunSpec, keep_running: bool, why: str) -> None:
        self.log.add("info", f"{why}: building a new model")
        self._step_before_rebuild = self.step
        self.step = 0
        self.session.reset(spec, keep_running=keep_running)

    def _on_rebuild_changed(self, name: str) -> None:
        spec = self._controls_spec()
        if spec is None:
            return
        if not self._confirm_discard(f"the new {name.replace('_', ' ')}"):
            self.controls.set_spec(self.spec)  # revert the widget: the run goes on unchanged
            self._on_message("info", f"{name.replace('_', ' ')} change cancelled; the run goes on")
            return
        self._rebuild(spec, keep_running=self.state == TRAINING, why=f"new {name.replace('_', ' ')}")

    def _on_live_changed(self, name: str, value: object) -> None:
        if name == "lr":
            self.session.set_lr(float(value))  # type: ignore[arg-type]
            self.spec.training = self.spec.training.replace(lr=float(value))  # type: ignore[arg-type]
            return
        if name in ("eval_every", "eval_size"):
            self.session.set_evaluation(**{name: int(value)})  # type: ignore[call-overload]
            self.spec.training = self.spec.training.replace(**{name: int(value)})  # type: ignore[call-overload]
            every = self.spec.training.eval_every or self.options.default_eval_every
            self.log.add(
                "info",
                f"tests now every {every} steps on {self.spec.training.eval_size} "
                f"{self.spec.training.eval_split} images (live, from the next test)",
            )
            return
        self.session.set_solver(**{name: value})
        self.spec.model = self.spec.model.replace(**{name: value})
        self.log.add("info", f"solver {name.replace('_', ' ')} now {value} (live, no rebuild)")

    # ------------------------------------------------------------------------------------------------------
    # files
    def open_compare(self, preset: str | None = None) -> QWidget | None:
        """Run > Compare with...: the current settings (A) and ``preset`` (B; asked if None) side by side in a
        compare window (:mod:`monoflow_studio.compare`); this window's run pauses meanwhile."""
        from .compare import open_compare

        return open_compare(
            self,
            self._controls_spec() or self.spec,
            preset,
            options=self.options,
            pause=self.session.pause if self.state == TRAINING else None,
            report=self._on_message,
        )

    # ------------------------------------------------------------------------------------------------------
    # closing
    # ------------------------------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Save the window state and stop the worker (it finishes its current step, then ends)."""
        self._closing = True
        self._save_settings()
        self._rate_timer.stop()
        if not self.session.shutdown(timeout_s=15.0):
            self.log.add("error", "the training worker did not stop in time")
        event.accept()
        super().closeEvent(event)
