"""Transport of space: how the flow deforms a regular grid, layer by layer (one polyline per grid line)."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSlider, QVBoxLayout, QWidget

from ..frames import RunInfo, TransportFrame
from ..theme import PlotColors, style_plot

__all__ = ["DIRECTION_LABELS", "TransportView"]

DIRECTION_LABELS = {"forward": "data -> latent", "inverse": "latent -> data"}
DIRECTION_TIP = "Push the regular grid from data to latent space, or from latent to data space"
STAGE_TIP = "Number of layers applied to the grid (0: the regular grid)"
#: Horizontal and vertical grid lines are drawn in these colours (both readable on light and dark backgrounds).
LINE_COLORS = (QColor(74, 163, 255), QColor(255, 140, 60))


class TransportView(QWidget):
    """The regular grid after a chosen number of layers, in the chosen direction.

    The session sends every stage at once (:class:`TransportFrame`), so moving the stage slider only redraws:
    the GUI thread never runs the model.

    Signals:
        direction_changed: the user chose another direction (``"forward"`` or ``"inverse"``).
    """

    direction_changed = Signal(str)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.direction_box = QComboBox()
        for key, label in DIRECTION_LABELS.items():
            self.direction_box.addItem(label, key)
        self.direction_box.setToolTip(DIRECTION_TIP)
        self.stage_slider = QSlider(Qt.Orientation.Horizontal)
        self.stage_slider.setRange(0, 0)
        self.stage_slider.setPageStep(1)
        self.stage_slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.stage_slider.setToolTip(STAGE_TIP)
        self.stage_label = QLabel("stage 0")
        self.stage_label.setMinimumWidth(150)
        self.caption = QLabel("")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Direction:"))
        bar.addWidget(self.direction_box)
        bar.addWidget(QLabel("Layers:"))
        bar.addWidget(self.stage_slider, 1)
        bar.addWidget(self.stage_label)
        bar.addWidget(self.caption)

        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setAspectLocked(True)
        self.lines: list[pg.PlotDataItem] = []
        self.unavailable = QLabel("")
        self.unavailable.setWordWrap(True)
        self.unavailable.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.unavailable.hide()
        self._available = True
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.unavailable, 1)

        self._frame: TransportFrame | None = None
        self.run_id = 0
        self.frames_shown = 0
        self._set_axis_labels()
        self.direction_box.currentIndexChanged.connect(self._on_direction)
        self.stage_slider.valueChanged.connect(self._redraw)

    # -- settings ----------------------------------------------------------------------------------------
    @property
    def direction(self) -> str:
        return str(self.direction_box.currentData())

    def set_direction(self, direction: str) -> None:
        keys = list(DIRECTION_LABELS)
        if direction in keys:
            self.direction_box.setCurrentIndex(keys.index(direction))

    @property
    def stage(self) -> int:
        return int(self.stage_slider.value())

    def set_colors(self, colors: PlotColors) -> None:
        style_plot(self.plot, colors)

    def _set_axis_labels(self) -> None:
        item = self.plot.getPlotItem()
        src, dst = ("x", "z") if self.direction == "forward" else ("z", "x")
        at_end = self._frame is not None and self.stage == len(self._frame.stages) - 1
        name = dst if at_end else (src if self.stage == 0 else "h")
        item.setLabel("bottom", f"{name}1")
        item.setLabel("left", f"{name}2")

    def _on_direction(self) -> None:
        self._frame = None  # the other direction's stages come from the session
        self._clear()
        self.direction_changed.emit(self.direction)

    @property
    def available(self) -> bool:
        """Whether the view shows transports (2-D runs), as set by :meth:`set_available`."""
        return self._available

    def set_available(self, available: bool, reason: str = "") -> None:
        """Enable the view (2-D runs) or disable it with ``reason`` shown in place of the plot and as tooltips."""
        self._available = bool(available)
        self.plot.setVisible(available)
        self.unavailable.setVisible(not available)
        self.unavailable.setText(reason)
        self.direction_box.setEnabled(available)
        self.stage_slider.setEnabled(available)
        self.direction_box.setToolTip(DIRECTION_TIP if available else reason)
        self.stage_slider.setToolTip(STAGE_TIP if available else reason)
        if not available:
            self._frame = None
            self._clear()
            self.stage_label.setText("")

    # -- data --------------------------------------------------------------------------------------------
    def set_run(self, info: RunInfo) -> None:
        """A new run: the old run's grid goes; the new one comes with its first frame."""
        self.run_id = info.run_id
        self._frame = None
        self._clear()

    def set_transport(self, frame: TransportFrame) -> None:
        """Show a transport frame (ignored if it is another run's or another direction's)."""
        if frame.run_id != self.run_id or frame.direction != self.direction:
            return
        last = len(frame.stages) - 1
        follow_end = self._frame is None or self.stage >= self.stage_slider.maximum()
        self._frame = frame
        self.frames_shown += 1
        self.stage_slider.blockSignals(True)
        self.stage_slider.setRange(0, last)
        if follow_end:
            self.stage_slider.setValue(last)
        self.stage_slider.blockSignals(False)
        self._redraw()

    def current_lines(self) -> np.ndarray | None:
        """The drawn grid lines, shape (lines, points, 2), or None before the first frame."""
        if self._frame is None or not self.lines:
            return None
        out = []
        for line in self.lines:
            x, y = line.getData()
            if x is None or y is None:
                return None
            out.append(np.column_stack([x, y]))
        return np.stack(out)

    def _clear(self) -> None:
        for line in self.lines:
            line.setData([], [])
        self.caption.setText("")
        self.stage_label.setText("waiting for the model...")

    def _ensure_lines(self, count: int) -> None:
        while len(self.lines) < count:
            line = pg.PlotDataItem(connect="finite", antialias=False)
            self.plot.addItem(line)
            self.lines.append(line)
        for extra in self.lines[count:]:
            self.plot.removeItem(extra)
        del self.lines[count:]
        half = count // 2
        for i, line in enumerate(self.lines):
            line.setPen(pg.mkPen(LINE_COLORS[0 if i < half else 1], width=1))

    def _redraw(self) -> None:
        frame = self._frame
        self._set_axis_labels()
        if frame is None:
            return
        k = min(self.stage, len(frame.stages) - 1)
        grid = frame.stages[k]
        self._ensure_lines(grid.shape[0])
        for line, pts in zip(self.lines, grid, strict=True):
            line.setData(pts[:, 0], pts[:, 1])
        space = ("data", "latent") if frame.direction == "forward" else ("latent", "data")
        if k == 0:
            what = f"regular grid ({space[0]} space)"
        elif k == len(frame.stages) - 1:
            what = f"all {k} layers ({space[1]} space)"
        else:
            what = f"{k} layers (last: {frame.layer_names[k - 1]})"
        self.stage_label.setText(f"{k}/{len(frame.stages) - 1}: {what}")
        self.caption.setText(f"step {frame.step}")
