"""The studio's main window: docks, actions, status bar, persisted settings; it drives a :class:`Session`.

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
import os
import time
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QRect, QSettings, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QCloseEvent, QKeySequence, QPainter
from PySide6.QtSvg import QSvgGenerator
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QLabel,
    QMainWindow,
    QMenu,
    QMessageBox,
    QScrollArea,
    QStackedWidget,
    QWidget,
)

from monoflow_core.checkpoint import CheckpointError
from monoflow_core.data import POINTS_DATA, PointDataError, PointSet
from monoflow_core.devices import resolve_device
from monoflow_core.examples import list_examples
from monoflow_core.training import EvalMetrics, StepMetrics

from .controls import ControlsPanel
from .files import atomic_write_with
from .run_spec import RunSpec, image_presets, toy_presets
from .session import PAUSED, TRAINING, ImageFrame, RunInfo, Session, SessionOptions, TransportFrame, ViewFrame
from .settings import StudioSettings, last_dir, read_settings, remember_dir, window_layout, write_settings
from .theme import THEMES, apply_theme, plot_colors
from .user_data import DATA_FILTER, ask_columns, drawn_point_set, load_point_file, points_spec
from .views.curves import BITS_PER_DIM, NATS, CurvesView
from .views.density import DensityView
from .views.diagnostics import SolverView
from .views.log import LogView
from .views.samples import SamplesView
from .views.transport import TransportView

__all__ = ["APPLICATION", "ORGANIZATION", "MainWindow"]

ORGANIZATION = "monoflow"
APPLICATION = "monoflow-studio"

#: Solver-failure warnings are logged at most this often (seconds); every step reports them.
SOLVER_WARNING_EVERY_S = 5.0
#: Rejected (non-finite) steps logged one by one per run before only every 100th is logged.
REJECTIONS_LOGGED = 5

CHECKPOINT_FILTER = "monoflow checkpoints (*.safetensors);;All files (*)"
CONFIG_FILTER = "Run configuration (*.json);;All files (*)"
VIEW_FILTER = "PNG image (*.png);;SVG image (*.svg)"
#: Shown in the transport dock (and its tooltips) while an image run is loaded.
NO_TRANSPORT = (
    "The transport view shows how a 2-D run deforms the plane, layer by layer. An image run maps "
    "images with many dimensions: see its samples in the main view. Load a 2-D preset to use it."
)


def render_png(widget: QWidget, path: str) -> None:
    """Grab ``widget`` as a PNG file at ``path`` (raises ``OSError`` if it cannot be encoded or written)."""
    if not widget.grab().save(path, "PNG"):
        raise OSError("the image could not be encoded or written")


def render_svg(widget: QWidget, path: str, title: str = "") -> None:
    """Render ``widget`` into an SVG file at ``path`` with Qt's SVG generator (vector lines, raster images).

    pyqtgraph 0.14's own SVG exporter fails on the colour bar (ValueError in correctCoordinates); painting the
    widget into a :class:`QSvgGenerator` has no such problem. Raises ``OSError`` if the file cannot be written.
    """
    size = widget.size()
    generator = QSvgGenerator()
    generator.setFileName(path)
    generator.setSize(size)
    generator.setViewBox(QRect(0, 0, size.width(), size.height()))
    generator.setTitle(title or "monoflow studio view")
    generator.setDescription("exported by monoflow studio")
    painter = QPainter()
    if not painter.begin(generator):
        raise OSError("the SVG file could not be opened for writing")
    try:
        widget.render(painter)
    finally:
        painter.end()
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        raise OSError("the SVG file could not be written")


class MainWindow(QMainWindow):
    """The studio window.

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

    def _action(
        self, text: str, slot: Callable[[], None], shortcut: QKeySequence | str | None = None, tip: str = ""
    ) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
            # Window-wide, so Space works whichever dock has the focus.
            action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        action.setToolTip(f"{tip} ({action.shortcut().toString()})" if shortcut else tip)
        action.setStatusTip(tip)
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        self.train_action = self._action("Train", self.toggle_training, Qt.Key.Key_Space, "Start or pause training")
        self.step_action = self._action("Step", self.step_once, "F10", "Pause and run exactly one training step")
        self.reset_action = self._action(
            "Reset", self.reset_run, "Ctrl+R", "Discard the run and start afresh with the current settings"
        )
        self.open_action = self._action(
            "Open checkpoint...",
            self.open_checkpoint,
            QKeySequence.StandardKey.Open,
            "Open a checkpoint to inspect it or train it on",
        )
        self.save_ckpt_action = self._action(
            "Export checkpoint...",
            self.export_checkpoint,
            QKeySequence.StandardKey.Save,
            "Save the run as a resumable checkpoint (loadable by `monoflow eval`)",
        )
        self.evaluate_action = self._action(
            "Test now",
            self.evaluate_now,
            "Ctrl+T",
            "Image runs: test the model now, in bits/dim on the evaluation images (computed in the background; "
            "tests also run every few steps, see Controls > Tests)",
        )
        self.export_view_action = self._action(
            "Export view as PNG/SVG...", self.export_view, "Ctrl+E", "Save the main view as a PNG or SVG image"
        )
        self.export_csv_action = self._action(
            "Export curves as CSV...", self.export_curves, "Ctrl+Shift+E", "Save every run's loss and test NLL series"
        )
        self.load_data_action = self._action(
            "Load data...", self.load_data, "Ctrl+L", "Train on your own 2-D points from a CSV, NPY or NPZ file"
        )
        self.load_config_action = self._action(
            "Load run configuration...",
            self.load_config,
            "Ctrl+Shift+O",
            "Load a run configuration (or preset) from JSON",
        )
        self.save_config_action = self._action(
            "Save run configuration...", self.save_config, "Ctrl+Shift+S", "Save the current settings as JSON"
        )
        self.compare_action = self._action(
            "Compare with...",
            self.open_compare,
            "Ctrl+Shift+C",
            "Train these settings and another preset side by side (same data, seed "
            "and batches; one colour scale; time shared fairly)",
        )
        self.quit_action = self._action("Quit", self.close, QKeySequence.StandardKey.Quit, "Close the studio")
        self.quit_action.setShortcut(QKeySequence("Ctrl+Q"))  # the standard key is empty on some platforms

        menu = self.menuBar()
        file_menu = menu.addMenu("&File")
        file_menu.addAction(self.open_action)
        self._build_examples_menu(file_menu.addMenu("Open &example"))
        file_menu.addAction(self.load_data_action)
        for a in (
            self.save_ckpt_action,
            None,
            self.load_config_action,
            self.save_config_action,
            None,
            self.export_view_action,
            self.export_csv_action,
            None,
            self.quit_action,
        ):
            file_menu.addSeparator() if a is None else file_menu.addAction(a)
        run_menu = menu.addMenu("&Run")
        for a in (
            self.train_action,
            self.step_action,
            self.reset_action,
            self.evaluate_action,
            None,
            self.compare_action,
        ):
            run_menu.addSeparator() if a is None else run_menu.addAction(a)
        preset_menu = menu.addMenu("&Presets")
        preset_menu.setToolTipsVisible(True)
        self.preset_actions: list[QAction] = []
        for title, presets in (("2-D densities", toy_presets()), ("Images", image_presets())):
            if not presets:
                continue
            preset_menu.addSection(title)
            for preset in presets:
                action = QAction(preset.name, self)
                action.setStatusTip(preset.description)
                action.setToolTip(preset.description)
                action.triggered.connect(
                    lambda _c=False, p=preset: self.apply_spec(RunSpec.from_preset(p), f"preset {p.name}")
                )
                preset_menu.addAction(action)
                self.preset_actions.append(action)
        view_menu = menu.addMenu("&View")
        for dock in (self.controls_dock, self.curves_dock, self.solver_dock, self.transport_dock, self.log_dock):
            view_menu.addAction(dock.toggleViewAction())
        theme_menu = view_menu.addMenu("Theme")
        self.theme_group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for name in THEMES:
            action = QAction(name.capitalize(), self, checkable=True)
            action.triggered.connect(lambda _c=False, n=name: self.set_theme(n))
            self.theme_group.addAction(action)
            theme_menu.addAction(action)
            self.theme_actions[name] = action
        help_menu = menu.addMenu("&Help")
        about = QAction("About monoflow studio", self)
        about.triggered.connect(self._about)
        help_menu.addAction(about)

        toolbar = self.addToolBar("Run")
        toolbar.setObjectName("run-toolbar")
        for a in (
            self.train_action,
            self.step_action,
            self.reset_action,
            self.evaluate_action,
            None,
            self.open_action,
            self.save_ckpt_action,
            self.export_view_action,
        ):
            toolbar.addSeparator() if a is None else toolbar.addAction(a)

    def _build_examples_menu(self, examples_menu: QMenu) -> None:
        """File > Open example: the shipped trained models, one click each (no training needed to see them)."""
        examples_menu.setToolTipsVisible(True)
        self.example_actions: list[QAction] = []
        try:
            examples = list_examples()
        except CheckpointError as err:  # a damaged installation: say so in the menu and the log, keep the studio
            examples = []
            self._examples_problem = str(err)
        else:
            self._examples_problem = ""
        by_data: dict[str, list] = collections.defaultdict(list)
        for example in examples:
            by_data[example.data].append(example)
        for data, group in by_data.items():
            examples_menu.addSection(data)
            for example in group:
                action = QAction(example.title, self)
                tip = (
                    f"{example.preset}, {example.iterations:,} iterations; opens its density, samples and "
                    "transport at once. Training on starts Adam afresh (no optimizer state ships)."
                )
                action.setToolTip(tip)
                action.setStatusTip(tip)
                action.triggered.connect(lambda _c=False, e=example: self.open_example(e.path, e.title))
                examples_menu.addAction(action)
                self.example_actions.append(action)
        if not examples:
            empty = examples_menu.addAction(self._examples_problem or "No example models are installed")
            empty.setEnabled(False)

    def open_example(self, path: str | os.PathLike[str], title: str) -> None:
        """Open a shipped example model (a weights-only checkpoint) as the current run."""
        self.log.add(
            "info",
            f"opening example {title}: a trained model; Train continues from its weights with a fresh Adam state",
        )
        self.session.open_checkpoint(str(path))

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.step_label = QLabel("step 0")
        self.rate_label = QLabel("0.0 it/s")
        self.device_label = QLabel(f"device {self.device}")
        self.state_label = QLabel("starting")
        for w in (self.step_label, self.rate_label, self.device_label, self.state_label):
            w.setMinimumWidth(90)
            bar.addPermanentWidget(w)

    def _connect_session(self) -> None:
        s = self.session
        s.built.connect(self._on_built)
        s.build_failed.connect(self._on_build_failed)
        s.metrics.connect(self._on_metrics)
        s.frame.connect(self._on_frame)
        s.transport.connect(self._on_transport)
        s.evaluated.connect(self._on_evaluated)
        s.eval_progress.connect(self._on_eval_progress)
        s.state_changed.connect(self._on_state)
        s.message.connect(self._on_message)
        s.checkpoint_saved.connect(lambda path: self._on_message("info", f"checkpoint saved to {path}"))
        s.lr_applied.connect(lambda lr: self.log.add("info", f"learning rate now {lr:.3g} (live, no rebuild)"))

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
    # ------------------------------------------------------------------------------------------------------
    def open_checkpoint(self, path: str | None = None) -> None:
        if path is None:
            path, _ = QFileDialog.getOpenFileName(
                self, "Open checkpoint", self._last_dir("checkpoint"), CHECKPOINT_FILTER
            )
            if not path:
                return
        self._remember_dir("checkpoint", path)
        self.log.add("info", f"opening checkpoint {path}")
        self.session.open_checkpoint(path)

    def export_checkpoint(self) -> None:
        default = os.path.join(self._last_dir("checkpoint"), f"{self.spec.training.data}-step{self.step}.safetensors")
        path, _ = QFileDialog.getSaveFileName(self, "Export checkpoint", default, CHECKPOINT_FILTER)
        if not path:
            return
        self._remember_dir("checkpoint", path)
        self.session.save_checkpoint(path)  # in the worker, between two steps; the result comes as a signal

    def export_view(self) -> None:
        """Save the main view as PNG or SVG: the format follows the file's suffix (else the chosen filter)."""
        mode = self.samples.mode if self.image_mode else self.density.mode
        default = os.path.join(self._last_dir("export"), f"{self.spec.training.data}-{mode}.png")
        path, chosen = QFileDialog.getSaveFileName(self, "Export view", default, VIEW_FILTER)
        if not path:
            return
        self._remember_dir("export", path)
        suffix = Path(path).suffix.lower()
        svg = suffix == ".svg" or (suffix != ".png" and chosen.startswith("SVG"))
        widget = self.samples.plot if self.image_mode else self.density.plot
        if svg:
            title = f"monoflow studio: {self.spec.training.data}, {mode}, step {self.step}"
            self._write_file(path, lambda tmp: render_svg(widget, tmp, title), "view", suffix=".svg")
        else:
            self._write_file(path, lambda tmp: render_png(widget, tmp), "view", suffix=".png")

    def export_curves(self) -> None:
        default = os.path.join(self._last_dir("export"), f"{self.spec.training.data}-curves.csv")
        path, _ = QFileDialog.getSaveFileName(self, "Export curves", default, "CSV (*.csv);;All files (*)")
        if not path:
            return
        self._remember_dir("export", path)
        self._guard_file(lambda: self.curves.export_csv(path), path, "curves")

    def save_config(self) -> None:
        spec = self._controls_spec()
        if spec is None:
            return
        default = os.path.join(self._last_dir("config"), f"{spec.training.data}-run.json")
        path, _ = QFileDialog.getSaveFileName(self, "Save run configuration", default, CONFIG_FILTER)
        if not path:
            return
        self._remember_dir("config", path)
        self._guard_file(lambda: spec.save(path), path, "run configuration")

    def load_config(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load run configuration", self._last_dir("config"), CONFIG_FILTER)
        if not path:
            return
        self._remember_dir("config", path)
        try:
            spec = RunSpec.load(path)
        except ValueError as err:
            self._on_message("error", f"could not load run configuration: {err}")
            return
        self.apply_spec(spec, f"the configuration {Path(path).name}")

    def load_data(self, path: str | None = None) -> None:
        """Train on a file of 2-D points (a column chooser where it has more than two columns); a malformed file is
        a message and the current run goes on."""
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Load data", self._last_dir("data"), DATA_FILTER)
            if not path:
                return
        self._remember_dir("data", path)
        try:
            points = load_point_file(path, ask_columns(self), split_seed=self.spec.training.test_seed)
        except PointDataError as err:
            self._on_message("error", f"could not load data: {err}; the current run is kept")
            return
        if points is not None:
            self._train_on_points(points, f"the data {Path(path).name}")

    def use_drawing(self, drawn: object) -> None:
        """Train on the points drawn in the density view (too few: a message, the current run goes on)."""
        try:
            points = drawn_point_set(drawn, split_seed=self.spec.training.test_seed)  # type: ignore[arg-type]
        except PointDataError as err:
            self._on_message("error", f"cannot train on the drawing: {err}")
            return
        if self._train_on_points(points, "the drawn data"):
            self.density.draw_button.setChecked(False)  # back to the density, to watch it learn

    def _train_on_points(self, points: PointSet, why: str) -> bool:
        base = self._controls_spec() or self.spec
        if base.is_image:  # the user's points are 2-D: start from the 2-D default
            base = RunSpec.default()
        self.log.add("info", f"{why}: {points.describe()}")
        return self.apply_spec(points_spec(base, points), why)

    def _write_file(self, path: str, write: Callable[[str], None], what: str, suffix: str = "") -> None:
        self._guard_file(lambda: atomic_write_with(path, write, suffix=suffix), path, what)

    def _guard_file(self, fn: Callable[[], object], path: str, what: str) -> None:
        try:
            fn()
        except OSError as err:
            self._on_message("error", f"could not write {what} to {path}: {err.strerror or err}")
            return
        self._on_message("info", f"{what} saved to {path}")

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

    def _about(self) -> None:
        QMessageBox.about(
            self,
            "About monoflow studio",
            "monoflow studio: train and explore Monotone Flows (Ahn et al., NeurIPS 2022) live.",
        )

    # ------------------------------------------------------------------------------------------------------
    # session signals
    # ------------------------------------------------------------------------------------------------------
    def _on_built(self, info: RunInfo) -> None:
        self.run_id = info.run_id
        self.spec = info.spec.copy()
        self.step = info.step
        self.device = info.device
        self._rejections = 0
        self._rates.clear()
        self.controls.set_spec(info.spec)
        image = info.task == "image"
        self._set_image_mode(image)
        if image:
            self.samples.set_run(info)
        else:
            self.density.set_run(info)
            self.transport.set_run(info)
        label = f"run {info.run_id}: {info.spec.training.data}" + (
            f" ({Path(info.source).name})" if info.source != "new" else ""
        )
        self.curves.new_run(info.run_id, label, info.history, info.eval_history, unit=BITS_PER_DIM if image else NATS)
        self.solver_view.set_diagnostics([], info.step)
        self.device_label.setText(f"device {info.device}")
        self._update_title()
        self._update_status()
        text = f"{label}: {info.spec.describe_model()}, step {info.step}, on {info.device}"
        if info.source == "new":
            auto_device, reason = resolve_device(None, info.spec.model)
            text += f" ({reason})" if auto_device == info.device else " (chosen in the device menu)"
        if info.spec.points is not None and info.spec.training.data == POINTS_DATA:
            text += f"; data {info.spec.points.describe()}"
        if image:
            t = info.spec.training
            text += (
                f"; training loss in bits/dim; tests every {info.eval_every} steps on {t.eval_size} "
                f"{t.eval_split} images"
            )
        self.log.add("info", text)

    def _set_image_mode(self, image: bool) -> None:
        """Show the views of an image run (sample grid, bits/dim) or of a 2-D run (density, transport)."""
        self.image_mode = image
        self.central.setCurrentWidget(self.samples if image else self.density)
        self.transport.set_available(not image, NO_TRANSPORT)
        self.transport_dock.setToolTip(NO_TRANSPORT if image else "")
        self.evaluate_action.setVisible(image)
        self.evaluate_action.setEnabled(image)
        self.export_view_action.setStatusTip(
            "Save the sample grid as a PNG or SVG image" if image else "Save the main view as a PNG or SVG image"
        )

    def _on_build_failed(self, text: str) -> None:
        """A rebuild failed (e.g. an image set's files are missing): say why; the current run goes on as it was."""
        self._on_message("error", text)
        self.step = self._step_before_rebuild
        self.controls.set_spec(self.spec)

    def _on_evaluated(self, run_id: int, ev: EvalMetrics) -> None:
        if run_id != self.run_id:
            return
        self.curves.add_eval(ev)
        self.curves.set_test_status("")
        self._on_message("info", ev.describe())

    def _on_eval_progress(self, run_id: int, step: int, done: int, total: int) -> None:
        if run_id == self.run_id:
            self.curves.set_test_status(f"testing step {step}: {done}/{total} images" if done < total else "")

    def _on_metrics(self, batch: list[StepMetrics]) -> None:
        if not batch:
            return
        self.curves.add_metrics(batch)
        self.step = batch[-1].step + 1
        self._rates.append((time.perf_counter(), self.step))
        for m in batch:
            if m.rejected:
                self._rejections += 1
                if self._rejections <= REJECTIONS_LOGGED or self._rejections % 100 == 0:
                    self._on_message("warning", f"{m.message} (rejected steps so far: {self._rejections})")
        failed = [m for m in batch if m.solver_failed]
        now = time.perf_counter()
        if failed and now - self._last_solver_warning >= SOLVER_WARNING_EVERY_S:
            self._last_solver_warning = now
            m = failed[-1]
            self._on_message(
                "warning",
                f"step {m.step}: {m.solver_failed} sample(s) missed the solver tolerance "
                f"(max {m.solver_iterations_max} iterations); raise the iteration cap or "
                "loosen the tolerance",
            )

    def _on_frame(self, frame: ViewFrame | ImageFrame) -> None:
        try:
            if frame.run_id != self.run_id:
                return  # a late frame of a discarded run
            if isinstance(frame, ImageFrame):
                self.samples.set_frame(frame)
            else:
                self.density.set_frame(frame)
            if frame.diagnostics:
                self.solver_view.set_diagnostics(frame.diagnostics, frame.step)
            if isinstance(frame, ViewFrame) and frame.eval is not None:
                self.curves.add_eval(frame.eval)
        finally:
            self.session.frame_consumed()

    def _on_transport(self, frame: TransportFrame) -> None:
        if frame.run_id == self.run_id:
            self.transport.set_transport(frame)

    def _on_transport_visibility(self, visible: bool) -> None:
        self._transport_visible = bool(visible)
        self._update_transport()

    def _on_transport_direction(self, _direction: str) -> None:
        self._update_transport()
        self._save_view_settings()

    def _update_transport(self) -> None:
        """Tell the session which transport the view needs: its direction while visible, else none."""
        if self._closing:
            return
        wanted = self.transport.direction if self._transport_visible else None
        if wanted != self._transport_sent:
            self._transport_sent = wanted
            self.session.set_transport(wanted)

    def _on_state(self, state: str) -> None:
        self.state = state
        self.train_action.setText("Pause" if state == TRAINING else "Train")
        self.state_label.setText(state)
        self.controls.set_enabled_for_run(state in (PAUSED, TRAINING))
        if state == "stopped" and not self._closing:
            self._on_message("error", "the training worker stopped")

    def _on_message(self, level: str, text: str) -> None:
        self.log.add(level, text)
        if level in ("info", "warning", "error"):
            self.statusBar().showMessage(text, 15000 if level != "info" else 6000)

    def _update_status(self) -> None:
        self.step_label.setText(f"step {self.step}")
        rate = 0.0
        if self.state == TRAINING and len(self._rates) >= 2:
            # Rate over the last ~3 s of metric batches.
            now = self._rates[-1][0]
            old = next((r for r in self._rates if now - r[0] <= 3.0), self._rates[0])
            dt = now - old[0]
            rate = (self._rates[-1][1] - old[1]) / dt if dt > 0 else 0.0
        self.rate_label.setText(f"{rate:.1f} it/s")

    def _update_title(self) -> None:
        self.setWindowTitle(f"monoflow studio: {self.spec.name} on {self.spec.training.data}")

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
