"""The main view of image runs: a live grid of model samples (or of training images), one pixel per data pixel."""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Signal
from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from monoflow_core.evaluation import image_grid

from ..frames import ImageFrame, RunInfo
from ..theme import PlotColors

__all__ = ["SAMPLE_COUNTS", "TEMPERATURE_RANGE", "SamplesView"]

#: What the grid shows.
MODES = ("samples", "data")
MODE_LABELS = {"samples": "Model samples", "data": "Training images"}
#: Images per grid offered (square numbers: full grids).
SAMPLE_COUNTS = (16, 36, 64, 100, 144)
#: The sample temperature's range (the scale of the base noise).
TEMPERATURE_RANGE: tuple[float, float] = (0.05, 2.0)


class SamplesView(QWidget):
    """A tiled grid of images (pyqtgraph ``ImageItem``, RGB, row 0 at the top), zoomable with the mouse.

    The grid of model samples is computed by the session's view thread (:class:`ImageFrame`) from the run's
    evaluation weights with fixed base noise, so successive grids show the same latent points as the model
    learns. The training images come once per run (:class:`RunInfo`); tiling them here is plain numpy.

    Signals:
        settings_changed: the mode, the sample count or the temperature changed (the window persists them).
        samples_changed(n, temperature): the model samples asked for changed (the window tells the session).
    """

    settings_changed = Signal()
    samples_changed = Signal(int, float)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.mode_box = QComboBox()
        for mode in MODES:
            self.mode_box.addItem(MODE_LABELS[mode], mode)
        self.mode_box.setToolTip(
            "Model samples (live while training) or training images, to compare them (a view setting: applies at once)"
        )
        self.count_box = QComboBox()
        for n in SAMPLE_COUNTS:
            self.count_box.addItem(str(n), n)
        self.count_box.setCurrentIndex(SAMPLE_COUNTS.index(64))
        self.count_box.setToolTip("Images in the grid (model samples are drawn in the background)")
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(*TEMPERATURE_RANGE)
        self.temperature.setSingleStep(0.05)
        self.temperature.setDecimals(2)
        self.temperature.setValue(1.0)
        self.temperature.setKeyboardTracking(False)
        self.temperature.setToolTip(
            "Scale of the base noise of the samples: 1 draws from the model; below 1 gives "
            "smoother, more typical images (a view setting: new samples come at once)"
        )
        self.caption = QLabel("")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Show:"))
        bar.addWidget(self.mode_box)
        bar.addWidget(QLabel("Images:"))
        bar.addWidget(self.count_box)
        self.temperature_label = QLabel("Temperature:")
        bar.addWidget(self.temperature_label)
        bar.addWidget(self.temperature)
        bar.addStretch(1)
        bar.addWidget(self.caption)

        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setAspectLocked(True)
        item.hideAxis("left")
        item.hideAxis("bottom")
        item.invertY(True)  # image row 0 at the top
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        layout.addWidget(self.plot, 1)

        self._frame: ImageFrame | None = None
        self._run: RunInfo | None = None
        self._shown: np.ndarray | None = None
        self.frames_shown = 0
        self.mode_box.currentIndexChanged.connect(self._on_mode)
        self.count_box.currentIndexChanged.connect(self._on_samples)
        self.temperature.valueChanged.connect(self._on_samples)

    # -- settings ----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return str(self.mode_box.currentData())

    def set_mode(self, mode: str) -> None:
        if mode in MODES:
            self.mode_box.setCurrentIndex(MODES.index(mode))

    @property
    def count(self) -> int:
        return int(self.count_box.currentData())

    def set_count(self, n: int) -> None:
        """Choose the offered count nearest to ``n``."""
        best = min(range(len(SAMPLE_COUNTS)), key=lambda i: abs(SAMPLE_COUNTS[i] - n))
        self.count_box.setCurrentIndex(best)

    def _on_mode(self) -> None:
        samples = self.mode == "samples"
        self.temperature.setEnabled(samples)
        self.temperature_label.setEnabled(samples)
        tip = "" if samples else " (model samples only: the training images have no temperature)"
        self.temperature_label.setToolTip(tip.strip())
        self._redraw()
        self.settings_changed.emit()

    def _on_samples(self) -> None:
        self.samples_changed.emit(self.count, float(self.temperature.value()))
        self._redraw()  # the data grid follows the count at once; the samples when the session sends them
        self.settings_changed.emit()

    def set_colors(self, colors: PlotColors) -> None:
        self.plot.setBackground(colors.background)

    # -- data --------------------------------------------------------------------------------------------
    def set_run(self, info: RunInfo) -> None:
        """A new image run: its training images; the samples come with the run's first frame."""
        self._run = info
        self._frame = None
        self._redraw()

    def set_frame(self, frame: ImageFrame) -> None:
        self._frame = frame
        self.frames_shown += 1
        self._redraw()

    def current_grid(self) -> np.ndarray | None:
        """The RGB picture shown, ``uint8`` (rows, cols, 3), or None before there is one."""
        return self._shown

    def _grid(self) -> tuple[np.ndarray, str, str] | None:
        """The picture, a short caption and its tooltip (the caption stays short: it shares the bar)."""
        if self.mode == "data":
            run = self._run
            if run is None or run.data_images is None or not len(run.data_images):
                return None
            images = run.data_images[: self.count]
            return (
                image_grid(images, run.levels),
                f"{run.spec.training.data} (train)",
                f"the first {len(images)} images of the training split, {run.levels} levels",
            )
        f = self._frame
        if f is None:
            return None
        return (
            f.grid,
            f"step {f.step}",
            (
                f"{f.images.shape[0]} samples at step {f.step}, temperature "
                f"{f.temperature:.2f}, fixed base noise (seed {f.seed}); sampled in "
                f"{f.seconds:.2f} s"
            ),
        )

    def _redraw(self) -> None:
        got = self._grid()
        if got is None:
            self.caption.setText("sampling..." if self._run is not None and self.mode == "samples" else "")
            self._shown = None
            self.image.clear()
            return
        grid, caption, tip = got
        self.caption.setToolTip(tip)
        reshaped = self._shown is None or self._shown.shape != grid.shape
        self._shown = grid
        self.image.setImage(grid, autoLevels=False, levels=(0, 255))
        if reshaped:  # a new layout: fit it; otherwise keep the user's zoom
            self.plot.getPlotItem().getViewBox().autoRange(padding=0.01)
        self.caption.setText(caption)
