"""The main window's file commands: :class:`WindowFiles`, one of :class:`MainWindow`'s base classes.

Checkpoints (open, export), run configurations (load, save), the user's 2-D points (a file or a drawing), and
exports of the main view (PNG, SVG) and of the curves (CSV). Writes are atomic; a file that cannot be read or
written becomes a message in the log and the status bar, and the current run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QRect
from PySide6.QtGui import QPainter
from PySide6.QtSvg import QSvgGenerator
from PySide6.QtWidgets import QFileDialog, QWidget

from monoflow_core.data import PointDataError, PointSet

from .files import atomic_write_with
from .run_spec import RunSpec
from .user_data import DATA_FILTER, ask_columns, drawn_point_set, load_point_file, points_spec

if TYPE_CHECKING:  # annotations only
    from .session import Session
    from .views.curves import CurvesView
    from .views.density import DensityView
    from .views.log import LogView
    from .views.samples import SamplesView

__all__ = ["CHECKPOINT_FILTER", "CONFIG_FILTER", "VIEW_FILTER", "WindowFiles", "render_png", "render_svg"]

CHECKPOINT_FILTER = "monoflow checkpoints (*.safetensors);;All files (*)"
CONFIG_FILTER = "Run configuration (*.json);;All files (*)"
VIEW_FILTER = "PNG image (*.png);;SVG image (*.svg)"


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


class WindowFiles:
    """The File menu's commands (a base class of :class:`~monoflow_studio.main_window.MainWindow`, which provides the
    attributes and the methods declared here)."""

    # Set by MainWindow.
    session: Session
    spec: RunSpec
    step: int
    image_mode: bool
    log: LogView
    curves: CurvesView
    density: DensityView
    samples: SamplesView
    _last_dir: Callable[[str], str]
    _remember_dir: Callable[[str, str], None]
    _on_message: Callable[[str, str], None]
    _controls_spec: Callable[[], RunSpec | None]
    apply_spec: Callable[[RunSpec, str], bool]

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
