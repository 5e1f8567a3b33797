"""The main window's actions, menus and toolbar: :class:`WindowMenus`, one of :class:`MainWindow`'s base classes.

Every command of the studio is a :class:`QAction` with a window-wide shortcut and a tip; the menus (File, Run,
Presets, View, Help) and the toolbar only arrange them. File > Open example lists the shipped trained models.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import QDockWidget, QMenu, QMessageBox

from monoflow_core.checkpoint import CheckpointError
from monoflow_core.examples import list_examples

from .run_spec import RunSpec, image_presets, toy_presets
from .theme import THEMES

if TYPE_CHECKING:  # annotations only
    from .session import Session
    from .views.log import LogView

__all__ = ["WindowMenus"]


class WindowMenus:
    """Builds the window's actions, menus and toolbar (a base class of :class:`~monoflow_studio.main_window.MainWindow`,
    whose constructor calls :meth:`_build_actions` once its docks exist)."""

    # Set by MainWindow before the actions are built.
    session: Session
    log: LogView
    controls_dock: QDockWidget
    curves_dock: QDockWidget
    solver_dock: QDockWidget
    transport_dock: QDockWidget
    log_dock: QDockWidget

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

    def _about(self) -> None:
        QMessageBox.about(
            self,
            "About monoflow studio",
            "monoflow studio: train and explore Monotone Flows (Ahn et al., NeurIPS 2022) live.",
        )
