"""Draw data with the mouse: a mode of the density view that paints 2-D points on an empty canvas.

A stroke (press, drag, release; a click is a stroke of one dab) lays *dabs* along the mouse's path, one every half
brush radius whatever the speed of the mouse, and each dab scatters ``density`` points from a normal distribution of
standard deviation half the brush radius around it. The canvas is the density view's square, [-4, 4]^2 by default:
the region the model's views cover, so drawn points are used as they are (the identity transform,
:func:`monoflow_core.data.points.make_point_set` with ``standardise=False``). Every stroke, and Clear, is one step
of Undo. The dabs' randomness comes from a generator seeded once per canvas, so a scripted stroke is reproducible.

:class:`DrawingModel` holds the points and the undo history (no Qt); :class:`DrawingPanel` is the toolbar and the
pyqtgraph items, wired to the model.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, Signal
from PySide6.QtGui import QPainter, QPen
from PySide6.QtWidgets import QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QSpinBox, QWidget

__all__ = ["DrawingModel", "DrawingPanel"]

#: Seed of the dabs' scatter (fixed: the same strokes give the same points).
DRAW_SEED = 0
#: Most points a drawing may hold (a drawn set is small; this bounds a long stroke with a dense brush).
MAX_DRAWN_POINTS = 200_000


class DrawingModel:
    """Points drawn in strokes, with Undo (of a stroke or a Clear) and a seeded scatter.

    Args:
        extent: half-width of the square canvas; points outside it are dropped.
        seed: seed of the scatter.
    """

    def __init__(self, extent: float = 4.0, seed: int = DRAW_SEED) -> None:
        self.extent = float(extent)
        self.radius = 0.3
        self.density = 8
        self._rng = np.random.default_rng(seed)
        self._strokes: list[np.ndarray] = []  # finished strokes, oldest first
        self._undo: list[list[np.ndarray]] = []  # stroke lists before each action
        self._current: list[np.ndarray] | None = None
        self._last: tuple[float, float] | None = None
        self._carry = 0.0  # path length since the last dab

    @property
    def points(self) -> np.ndarray:
        """All drawn points, float64 ``(n, 2)`` (the stroke in progress included)."""
        parts = [*self._strokes, *(self._current or [])]
        return np.concatenate(parts) if parts else np.zeros((0, 2))

    @property
    def count(self) -> int:
        return int(sum(p.shape[0] for p in self._strokes) + sum(p.shape[0] for p in self._current or []))

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    def _dab(self, x: float, y: float) -> None:
        assert self._current is not None
        if self.count >= MAX_DRAWN_POINTS:
            return
        spread = self._rng.normal(scale=self.radius / 2.0, size=(self.density, 2)) + np.array([x, y])
        inside = np.all(np.abs(spread) <= self.extent, axis=1)
        self._current.append(spread[inside])

    def begin(self, x: float, y: float) -> None:
        """Start a stroke at ``(x, y)`` with a first dab."""
        self._current = []
        self._last = (x, y)
        self._carry = 0.0
        self._dab(x, y)

    def extend(self, x: float, y: float) -> None:
        """Continue the stroke to ``(x, y)``: a dab every half radius along the straight segment."""
        if self._current is None or self._last is None:
            self.begin(x, y)
            return
        x0, y0 = self._last
        length = math.hypot(x - x0, y - y0)
        step = self.radius / 2.0
        travelled = step - self._carry  # the first dab of this segment
        while travelled <= length:
            t = travelled / length
            self._dab(x0 + t * (x - x0), y0 + t * (y - y0))
            travelled += step
        self._carry = (self._carry + length) % step if length else self._carry
        self._last = (x, y)

    def end(self) -> None:
        """Finish the stroke: it becomes one step of Undo (an empty stroke leaves no trace)."""
        if self._current is None:
            return
        stroke = np.concatenate(self._current) if self._current else np.zeros((0, 2))
        self._current, self._last = None, None
        if stroke.shape[0]:
            self._undo.append(list(self._strokes))
            self._strokes.append(stroke)

    def clear(self) -> None:
        """Remove every point (one step of Undo)."""
        self.end()
        if self._strokes:
            self._undo.append(list(self._strokes))
            self._strokes = []

    def undo(self) -> None:
        """Undo the last stroke or Clear."""
        self.end()
        if self._undo:
            self._strokes = self._undo.pop()


class _Canvas(pg.GraphicsObject):
    """A transparent item over the canvas square that turns left-button drags and clicks into strokes.

    pyqtgraph hands mouse drags and clicks to the topmost item that accepts them, in the item's coordinates, which
    here are the plot's data coordinates; the view box, below it, no longer pans while drawing.
    """

    def __init__(self, panel: DrawingPanel) -> None:
        super().__init__()
        self._panel = panel
        self.setZValue(100)

    def boundingRect(self) -> QRectF:  # noqa: N802 (Qt override)
        e = self._panel.model.extent
        return QRectF(-e, -e, 2 * e, 2 * e)

    def paint(self, painter: QPainter, *args: object) -> None:
        pen = QPen(self._panel.frame_color)
        pen.setCosmetic(True)
        pen.setStyle(Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.drawRect(self.boundingRect())

    def mouseDragEvent(self, ev: object) -> None:  # noqa: N802 (pyqtgraph override)
        if ev.button() != Qt.MouseButton.LeftButton:  # type: ignore[attr-defined]
            ev.ignore()  # type: ignore[attr-defined]
            return
        ev.accept()  # type: ignore[attr-defined]
        model = self._panel.model
        if ev.isStart():  # type: ignore[attr-defined]
            start: QPointF = ev.buttonDownPos()  # type: ignore[attr-defined]
            model.begin(start.x(), start.y())
        pos: QPointF = ev.pos()  # type: ignore[attr-defined]
        model.extend(pos.x(), pos.y())
        if ev.isFinish():  # type: ignore[attr-defined]
            model.end()
        self._panel.refresh()

    def mouseClickEvent(self, ev: object) -> None:  # noqa: N802 (pyqtgraph override)
        if ev.button() != Qt.MouseButton.LeftButton:  # type: ignore[attr-defined]
            return
        ev.accept()  # type: ignore[attr-defined]
        pos: QPointF = ev.pos()  # type: ignore[attr-defined]
        self._panel.model.begin(pos.x(), pos.y())
        self._panel.model.end()
        self._panel.refresh()


class DrawingPanel(QWidget):
    """The drawing toolbar (brush size, density, Undo, Clear, Train on drawing) and its canvas items on ``plot``.

    Signals:
        use_requested(points): Train on drawing was pressed; ``points`` is the ``(n, 2)`` array drawn.
        active_changed(active): the drawing mode was switched on or off.
    """

    use_requested = Signal(object)
    active_changed = Signal(bool)

    def __init__(self, plot: pg.PlotWidget, extent: float = 4.0, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.plot = plot
        self.model = DrawingModel(extent)
        self.frame_color = pg.mkColor(128, 128, 128)
        self.active = False

        self.brush = QDoubleSpinBox()
        self.brush.setRange(0.02, 2.0)
        self.brush.setSingleStep(0.05)
        self.brush.setDecimals(2)
        self.brush.setValue(self.model.radius)
        self.brush.setToolTip("Brush radius in the plot's units (the canvas spans [-4, 4] on each axis)")
        self.density = QSpinBox()
        self.density.setRange(1, 200)
        self.density.setValue(self.model.density)
        self.density.setToolTip("Points each dab of the brush scatters (a dab every half radius along a stroke)")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("Undo the last stroke or Clear")
        self.clear_button = QPushButton("Clear")
        self.clear_button.setToolTip("Remove every drawn point (Undo brings them back)")
        self.use_button = QPushButton("Train on drawing")
        self.use_button.setToolTip(
            "Make the drawn points the run's data: a new model trains on them (20% are held "
            "out for the test NLL) and checkpoints keep them"
        )
        self.count_label = QLabel("")
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(QLabel("Brush"))
        row.addWidget(self.brush)
        row.addWidget(QLabel("Density"))
        row.addWidget(self.density)
        row.addWidget(self.undo_button)
        row.addWidget(self.clear_button)
        row.addStretch(1)
        row.addWidget(self.count_label)
        row.addWidget(self.use_button)

        # Added to the plot on the first switch to drawing: until then the live density view carries no extra items.
        self.canvas = _Canvas(self)
        self.scatter = pg.ScatterPlotItem(size=4, pen=None, brush=pg.mkBrush(40, 110, 220, 170))
        self.scatter.setZValue(50)
        self._added = False
        self.brush.valueChanged.connect(lambda v: setattr(self.model, "radius", float(v)))
        self.density.valueChanged.connect(lambda v: setattr(self.model, "density", int(v)))
        self.undo_button.clicked.connect(self.undo)
        self.clear_button.clicked.connect(self.clear)
        self.use_button.clicked.connect(lambda: self.use_requested.emit(self.model.points.copy()))
        self.setVisible(False)
        self.refresh()

    def set_colors(self, dark: bool) -> None:
        """Points and the canvas frame in the theme's colours."""
        self.scatter.setBrush(pg.mkBrush(110, 180, 255, 190) if dark else pg.mkBrush(30, 90, 200, 170))
        self.frame_color = pg.mkColor(150, 150, 150) if dark else pg.mkColor(120, 120, 120)
        self.canvas.update()

    def set_active(self, active: bool) -> None:
        """Switch the drawing mode: the canvas takes the mouse (no panning) and shows the whole square."""
        self.active = bool(active)
        if self.active and not self._added:
            for item in (self.canvas, self.scatter):
                self.plot.addItem(item)
            self._added = True
        self.setVisible(self.active)
        self.canvas.setVisible(self.active)
        self.scatter.setVisible(self.active)
        box = self.plot.getPlotItem().getViewBox()
        box.setMouseEnabled(x=not self.active, y=not self.active)
        if self.active:
            e = self.model.extent
            box.setRange(xRange=(-e, e), yRange=(-e, e), padding=0.02)
        self.active_changed.emit(self.active)

    def undo(self) -> None:
        self.model.undo()
        self.refresh()

    def clear(self) -> None:
        self.model.clear()
        self.refresh()

    def refresh(self) -> None:
        """Show the drawn points and the buttons' states."""
        points = self.model.points
        self.scatter.setData(pos=points)
        n = points.shape[0]
        self.count_label.setText(f"{n:,} point{'s' if n != 1 else ''}")
        self.undo_button.setEnabled(self.model.can_undo)
        self.clear_button.setEnabled(n > 0)
        self.use_button.setEnabled(n > 0)
