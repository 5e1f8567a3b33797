"""The views of compare mode: density panels side by side at one colour scale, overlaid curves, solver summaries.

Compare mode (docs/studio.md) trains several runs on the same data, seed and batch stream. Its density panels share
their colour levels (computed from every run's latest frame), so equal colours mean equal densities across
panels; its curves draw every run in its own colour, against steps or against training seconds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from monoflow_core.families import IMPLICIT
from monoflow_core.training import EvalMetrics, StepMetrics

from ..frames import RunInfo, ViewFrame
from ..smoothing import debiased_ema
from ..theme import PlotColors, style_legend, style_plot
from ..widgets import set_axis_label
from .curves import NATS, SMOOTHING_RANGE, RunCurves
from .density import LOG_RANGE_NATS

__all__ = ["RUN_COLORS", "CompareCurvesView", "DensityPanel", "shared_levels", "solver_summary"]

#: One colour per run (runs A, B, C, D): its panel's title and its curves.
RUN_COLORS = ("#1f77b4", "#e8710a", "#2ca02c", "#9467bd")
#: What the panels show (the density is the default: equal colours are equal densities).
COMPARE_MODES = {"density": "Density p(x)", "log-density": "Log-density log p(x)"}
REDRAW_MS = 500


def run_letter(index: int) -> str:
    return chr(ord("A") + index)


def _top(frame: ViewFrame) -> float | None:
    finite = frame.log_density[np.isfinite(frame.log_density)]
    return float(finite.max()) if finite.size else None


def shared_levels(frames: Sequence[ViewFrame | None], mode: str) -> tuple[float, float] | None:
    """The colour levels of every panel: from 0 to the highest density of all frames (``density``), or the
    :data:`LOG_RANGE_NATS` nats below the highest log-density of all frames (``log-density``); None without a
    frame."""
    tops = [t for t in (_top(f) for f in frames if f is not None) if t is not None]
    if not tops:
        return None
    top = max(tops)
    if mode == "log-density":
        return top - LOG_RANGE_NATS, top
    return 0.0, float(max(np.exp(top), 1e-12))


def panel_array(frame: ViewFrame, mode: str, levels: tuple[float, float]) -> np.ndarray:
    """The heatmap of ``frame`` in ``mode`` (non-finite cells, a failed solve, at the bottom of the scale)."""
    logp = frame.log_density
    if mode == "log-density":
        lo, hi = levels
        return np.nan_to_num(np.clip(logp, lo, hi), nan=lo, posinf=hi, neginf=lo)
    return np.nan_to_num(np.exp(np.minimum(logp, np.log(levels[1]))), nan=0.0)


def solver_summary(spec_family: str, diagnostics: Sequence[dict[str, Any]], step: int) -> str:
    """One line on a run's fixed-point solves, from a frame's :func:`~monoflow_core.evaluation.solver_diagnostics`.

    Monotone blocks solve for their output in every training step (paper Sec. 4): the median over blocks of the
    median iterations per sample, the largest count and the samples that missed the tolerance. Residual blocks
    (i-DenseNet) run forward explicitly and solve only to sample; the comparison families have no implicit blocks.
    """
    if spec_family != IMPLICIT:
        return "no implicit blocks (no solver)"
    solved = [d["forward"] for d in diagnostics if d.get("forward")]
    if not solved:
        if diagnostics and all(d.get("kind") == "residual" for d in diagnostics):
            return "residual blocks: explicit forward pass, solves only to sample"
        return "solver: no training step yet"
    medians = [float(f.get("iterations_median", f["iterations_mean"])) for f in solved]
    worst = max(int(f["iterations_max"]) for f in solved)
    failed = sum(int(f.get("n_failed") or 0) for f in solved)
    text = f"solver at step {step}: median {statistics.median(medians):.3g} iterations per block, max {worst}"
    return text + (f", {failed} sample(s) missed the tolerance" if failed else ", all converged")


class DensityPanel(QWidget):
    """One run's density: its name in its colour, the heatmap (levels set by the window), and its solver line."""

    def __init__(self, index: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.index = index
        self.color = RUN_COLORS[index % len(RUN_COLORS)]
        self.title = QLabel(f"run {run_letter(index)}")
        self.title.setStyleSheet(f"font-weight: bold; color: {self.color};")
        self.title.setWordWrap(True)
        self.caption = QLabel("building...")
        self.solver = QLabel("")
        self.solver.setWordWrap(True)
        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setAspectLocked(True)
        item.setLabel("bottom", "x1")
        item.setLabel("left", "x2")
        item.getViewBox().setBorder(pg.mkPen(self.color, width=3))
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.data_scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(255, 255, 255, 110))
        self.data_scatter.setVisible(False)
        self.plot.addItem(self.data_scatter)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.title)
        layout.addWidget(self.caption)
        layout.addWidget(self.plot, 1)
        layout.addWidget(self.solver)
        self.info: RunInfo | None = None
        self.frame: ViewFrame | None = None
        self.frames_shown = 0

    def set_colors(self, colors: PlotColors) -> None:
        style_plot(self.plot, colors)

    def set_run(self, info: RunInfo) -> None:
        self.info = info
        self.frame = None
        spec = info.spec
        self.title.setText(f"{run_letter(self.index)}: {spec.name} ({spec.describe_model()})")
        self.title.setToolTip(spec.description)
        self.caption.setText(f"step {info.step}")
        self.solver.setText(solver_summary(spec.model.family, [], info.step))
        self.data_scatter.setData(pos=info.data_points)

    def set_frame(self, frame: ViewFrame) -> None:
        self.frame = frame
        self.frames_shown += 1
        nll = f"; test NLL {frame.eval.nll_nats:.3f} nats" if frame.eval is not None else ""
        self.caption.setText(f"step {frame.step}, {frame.dtype}{nll}")
        if self.info is not None and (frame.diagnostics or frame.step > 0):
            self.solver.setText(solver_summary(self.info.spec.model.family, frame.diagnostics, frame.step))

    def draw(self, mode: str, levels: tuple[float, float]) -> None:
        """Show the latest frame at ``levels`` (the window computes them from every panel's frame)."""
        frame = self.frame
        if frame is None:
            return
        xmin, xmax, ymin, ymax = frame.extent
        self.image.setImage(panel_array(frame, mode, levels), autoLevels=False, levels=levels)
        self.image.setRect(QRectF(xmin, ymin, xmax - xmin, ymax - ymin))

    @property
    def levels(self) -> tuple[float, float] | None:
        got = self.image.getLevels()
        return None if got is None else (float(got[0]), float(got[1]))

    def current_image(self) -> np.ndarray | None:
        return None if self.image.image is None else np.array(self.image.image)


class CompareCurvesView(QWidget):
    """The training loss (smoothed) and test NLL of every run, one colour per run, against steps or seconds.

    Training seconds are each run's own: the wall-clock time of its steps (the fair axis, since the runs take
    turns and a monotone step costs more than a coupling step).
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.x_axis = QComboBox()
        self.x_axis.addItem("training time (s)", "time")
        self.x_axis.addItem("step", "step")
        self.x_axis.setToolTip(
            "Training seconds are the fair axis: each run gets the same share of the training "
            "time, and a monotone step costs more than a coupling step"
        )
        self.smoothing = QDoubleSpinBox()
        self.smoothing.setRange(*SMOOTHING_RANGE)
        self.smoothing.setDecimals(3)
        self.smoothing.setSingleStep(0.05)
        self.smoothing.setValue(0.9)
        self.smoothing.setToolTip("Debiased exponential moving average of the training loss (0 = raw)")
        self.log_y = QCheckBox("log y")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("x:"))
        bar.addWidget(self.x_axis)
        bar.addWidget(QLabel("Smoothing:"))
        bar.addWidget(self.smoothing)
        bar.addWidget(self.log_y)
        bar.addStretch(1)
        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setLabel("left", NATS)
        item.showGrid(x=True, y=True, alpha=0.2)
        self.legend = item.addLegend(offset=(-10, 10))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        layout.addWidget(self.plot, 1)
        self.runs: list[RunCurves] = []
        self.train_items: list[pg.PlotDataItem] = []
        self.test_items: list[pg.PlotDataItem] = []
        self._colors = PlotColors(dark=False)
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()
        self.x_axis.currentIndexChanged.connect(self._on_setting)
        self.smoothing.valueChanged.connect(self._on_setting)
        self.log_y.toggled.connect(self._on_setting)

    def set_colors(self, colors: PlotColors) -> None:
        self._colors = colors
        style_plot(self.plot, colors)
        style_legend(self.legend, colors)

    def add_run(self, label: str) -> int:
        """A new series pair (train loss, test NLL) in the next run colour; returns its index."""
        index = len(self.runs)
        color = RUN_COLORS[index % len(RUN_COLORS)]
        self.runs.append(RunCurves(run_id=index, label=label))
        item = self.plot.getPlotItem()
        train = item.plot(name=f"{label}: train loss", pen=pg.mkPen(color, width=2))
        test = item.plot(
            name=f"{label}: test NLL",
            pen=pg.mkPen(color, width=2, style=Qt.PenStyle.DashLine),
            symbol="o",
            symbolSize=6,
            symbolBrush=color,
            symbolPen=None,
        )
        for curve in (train, test):
            curve.setDownsampling(auto=True, method="peak")
            curve.setClipToView(True)
        self.train_items.append(train)
        self.test_items.append(test)
        return index

    def restart_run(self, index: int, label: str) -> None:
        """Run ``index`` was (re)built: its series start empty under ``label``."""
        self.runs[index] = RunCurves(run_id=index, label=label)
        for curve, name in (
            (self.train_items[index], f"{label}: train loss"),
            (self.test_items[index], f"{label}: test NLL"),
        ):
            curve.opts["name"] = name
            legend_label = self.legend.getLabel(curve)
            if legend_label is not None:
                legend_label.setText(name)
        self._dirty = True

    def add_metrics(self, index: int, metrics: list[StepMetrics]) -> None:
        self.runs[index].add_steps(metrics)
        self._dirty = True

    def add_eval(self, index: int, ev: EvalMetrics) -> None:
        if self.runs[index].add_eval(ev):
            self._dirty = True

    def legend_names(self) -> list[str]:
        return [label.text for _sample, label in self.legend.items]

    def curve_data(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The x values of run ``index``'s train curve and test points as drawn (after the latest redraw)."""
        train_x, _ = self.train_items[index].getData()
        test_x, _ = self.test_items[index].getData()
        empty = np.zeros(0)
        return (empty if train_x is None else train_x), (empty if test_x is None else test_x)

    def _on_setting(self) -> None:
        self.plot.getPlotItem().setLogMode(y=self.log_y.isChecked())
        self._dirty = True
        self._redraw_if_dirty()

    def _x(self, run: RunCurves, evals: bool) -> np.ndarray:
        if self.x_axis.currentData() == "time":
            return np.asarray(run.eval_time_s if evals else run.time_s, dtype=np.float64)
        return np.asarray(run.eval_steps if evals else run.steps, dtype=np.float64)

    def _redraw_if_dirty(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        w = float(self.smoothing.value())
        for run, train, test in zip(self.runs, self.train_items, self.test_items, strict=True):
            loss = np.asarray(run.loss, dtype=np.float64)
            loss = np.where(np.isfinite(loss), loss, np.nan)
            train.setData(self._x(run, False), debiased_ema(loss, w), connect="finite")
            test.setData(self._x(run, True), np.asarray(run.eval_nll, dtype=np.float64), connect="finite")
        set_axis_label(
            self.plot.getPlotItem().getAxis("bottom"),
            "training time of the run (s)" if self.x_axis.currentData() == "time" else "step",
        )
