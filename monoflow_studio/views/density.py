"""The main view: the learned density (or log-density), the model's samples or the data, as a heatmap."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget

from ..frames import RunInfo, ViewFrame
from ..theme import PlotColors, style_plot
from ..widgets import set_axis_label
from .draw import DrawingPanel

__all__ = ["DensityView"]

#: What the heatmap shows.
MODES = ("density", "log-density", "samples", "data")
MODE_LABELS = {
    "density": "Density p(x)",
    "log-density": "Log-density log p(x)",
    "samples": "Model samples (histogram)",
    "data": "Data (histogram)",
}
#: The log-density is shown over this many nats below its maximum (deep tails would flatten the colours).
LOG_RANGE_NATS = 12.0


class DensityView(QWidget):
    """Heatmap (pyqtgraph ``ImageItem``, row-major, with a colour bar) plus an optional point overlay.

    Signals:
        settings_changed: the mode or the overlay changed (the window persists them).
    """

    settings_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode_box = QComboBox()
        for mode in MODES:
            self.mode_box.addItem(MODE_LABELS[mode], mode)
        self.mode_box.setToolTip("What the heatmap shows (a view setting: applies at once)")
        self.overlay_box = QCheckBox("Overlay data points")
        self.samples_box = QCheckBox("Overlay model samples")
        self.caption = QLabel("")
        # A caption whose width follows its text would re-lay out the whole window, and repaint every plot, each
        # time the step count gains a digit or the text changes: its width is fixed, from a long typical text.
        self.caption.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.caption.setMinimumWidth(self.caption.fontMetrics().horizontalAdvance("step 1,000,000, float64 (drawn) "))
        self.draw_button = QPushButton("Draw data")
        self.draw_button.setCheckable(True)
        self.draw_button.setToolTip("Draw your own 2-D points with the mouse on an empty canvas, then train on them")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Show:"))
        bar.addWidget(self.mode_box)
        bar.addWidget(self.overlay_box)
        bar.addWidget(self.samples_box)
        bar.addStretch(1)
        bar.addWidget(self.caption)
        bar.addWidget(self.draw_button)

        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setAspectLocked(True)
        item.setLabel("bottom", "x1")
        item.setLabel("left", "x2")
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(colorMap="viridis", interactive=False, width=14)
        self.colorbar.setImageItem(self.image, insert_in=item)
        self.colorbar.axis.enableAutoSIPrefix(False)  # densities are small numbers; no "(x0.001)" in the label
        self.data_scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(255, 255, 255, 110))
        self.sample_scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(255, 120, 60, 140))
        self.plot.addItem(self.data_scatter)
        self.plot.addItem(self.sample_scatter)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        #: The drawing mode's toolbar and canvas (hidden until Draw data is pressed).
        self.drawing = DrawingPanel(self.plot)
        layout.addWidget(self.drawing)
        layout.addWidget(self.plot, 1)
        self._note = ""  # what the run's data are (a user's points: the held-out split), after the step

        self._frame: ViewFrame | None = None
        self._run: RunInfo | None = None
        self.frames_shown = 0
        self.mode_box.currentIndexChanged.connect(self._on_setting)
        self.overlay_box.toggled.connect(self._on_setting)
        self.samples_box.toggled.connect(self._on_setting)
        self.draw_button.toggled.connect(self._on_draw_toggled)

    # -- settings ----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return str(self.mode_box.currentData())

    def set_mode(self, mode: str) -> None:
        if mode in MODES:
            self.mode_box.setCurrentIndex(MODES.index(mode))

    def _on_setting(self) -> None:
        self._redraw()
        self.settings_changed.emit()

    def set_colors(self, colors: PlotColors) -> None:
        style_plot(self.plot, colors)
        self.colorbar.axis.setPen(colors.foreground)
        self.colorbar.axis.setTextPen(colors.foreground)
        self.drawing.set_colors(colors.dark)

    def _on_draw_toggled(self, on: bool) -> None:
        """Drawing mode: an empty canvas (the heatmap and the overlays hidden) that takes the mouse."""
        self.drawing.set_active(on)
        self.image.setVisible(not on)
        self.colorbar.setVisible(not on)
        self.draw_button.setText("Back to the density" if on else "Draw data")
        for widget in (self.mode_box, self.overlay_box, self.samples_box):
            widget.setEnabled(not on)
        self._redraw()

    # -- data --------------------------------------------------------------------------------------------
    def set_run(self, info: RunInfo) -> None:
        """A new run: data overlay and data histogram; the heatmap waits for the run's first frame."""
        self._run = info
        self._frame = None
        points = info.spec.points if info.spec.training.data == "points" else None
        self._note = ""
        self.caption.setToolTip("")
        labels = ("x1", "x2")
        if points is not None and not points.is_identity:
            labels = (f"{points.columns[0]} (standardised)", f"{points.columns[1]} (standardised)")
        item = self.plot.getPlotItem()
        item.setLabel("bottom", labels[0])
        item.setLabel("left", labels[1])
        if points is not None:
            # Short (the bar has little room); the transform and the whole split are in the tooltip and the log.
            self._note = f"; {points.test.shape[0]:,} of {points.n_points:,} held out ({points.holdout:.0%})"
            self.caption.setToolTip(f"{points.describe()}. The test NLL is measured on the held-out points.")
        self.data_scatter.setData(pos=info.data_points)
        self._redraw()

    def set_frame(self, frame: ViewFrame) -> None:
        self._frame = frame
        self.frames_shown += 1
        self._redraw()

    def current_image(self) -> np.ndarray | None:
        """The array the heatmap shows now (row-major, row 0 at the bottom), or None."""
        return None if self.image.image is None else np.array(self.image.image)

    def _array(self) -> tuple[np.ndarray, tuple[float, float], str, tuple[float, float, float, float]] | None:
        frame, run = self._frame, self._run
        mode = self.mode
        if mode == "data":
            if run is None:
                return None
            extent = frame.extent if frame is not None else (-4.0, 4.0, -4.0, 4.0)
            hist = run.data_hist
            return hist, (0.0, float(max(hist.max(), 1.0))), "data count", extent
        if frame is None:
            return None
        if mode == "samples":
            hist = frame.sample_hist
            return hist, (0.0, float(max(hist.max(), 1.0))), "sample count", frame.extent
        logp = frame.log_density
        finite = logp[np.isfinite(logp)]
        top = float(finite.max()) if finite.size else 0.0
        if mode == "log-density":
            # Non-finite cells (a failed solve) are shown at the bottom of the scale rather than as holes.
            shown = np.nan_to_num(np.clip(logp, top - LOG_RANGE_NATS, top), nan=top - LOG_RANGE_NATS)
            return shown, (top - LOG_RANGE_NATS, top), "log p(x) [nats]", frame.extent
        dens = np.nan_to_num(np.exp(np.minimum(logp, top)), nan=0.0)
        return dens, (0.0, float(max(np.exp(top), 1e-12))), "p(x)", frame.extent

    def _redraw(self) -> None:
        drawing = self.drawing.active
        self.data_scatter.setVisible(self.overlay_box.isChecked() and not drawing)
        self.sample_scatter.setVisible(self.samples_box.isChecked() and not drawing)
        if drawing:
            self.caption.setText("drawing: drag to paint points, click for one dab")
            return
        frame, run = self._frame, self._run
        # (which dtype computed the picture: the training dtype, while the run's test NLL is float64; before a new
        # run's first frame, the run's own step and note rather than the previous run's caption)
        if frame is not None:
            caption = f"step {frame.step}, {frame.dtype}"
        else:
            caption = f"step {run.step if run is not None else 0}"
        self.caption.setText(caption + self._note)
        # Scatter updates cost GUI time (Python): only for a visible overlay.
        if self.samples_box.isChecked() and self._frame is not None:
            self.sample_scatter.setData(pos=self._frame.samples[:1000])
        got = self._array()
        if got is None:
            return
        array, levels, label, (xmin, xmax, ymin, ymax) = got
        self.image.setImage(array, autoLevels=False)
        self.image.setRect(QRectF(xmin, ymin, xmax - xmin, ymax - ymin))
        self.colorbar.setLevels(levels)
        set_axis_label(self.colorbar.axis, label)
