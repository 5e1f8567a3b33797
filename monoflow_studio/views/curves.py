"""Curves: training loss and test values against step or training time, smoothed, with earlier runs faint.

2-D runs plot nats (train loss, test NLL); image runs plot bits/dim (train bpd, test bpd of periodic tests).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QTimer, Signal
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from monoflow_core.training import EvalMetrics, StepMetrics

from ..files import atomic_write_text
from ..smoothing import debiased_ema
from ..theme import PlotColors, style_legend, style_plot
from ..widgets import set_axis_label

__all__ = ["BITS_PER_DIM", "NATS", "SMOOTHING_RANGE", "CurvesView", "RunCurves"]

#: The smoothing weight's range (a debiased exponential moving average; 1 would freeze the curve).
SMOOTHING_RANGE: tuple[float, float] = (0.0, 0.999)

#: Units of the curves (2-D runs and image runs).
NATS, BITS_PER_DIM = "nats", "bits/dim"

#: How many earlier runs stay on the plot as faint curves.
MAX_GHOSTS = 3
#: Redraws at most this often (ms); new points only mark the plot dirty. Every redraw repaints axes in Python
#: (pyqtgraph) on the GUI thread, which competes with the worker for the GIL: 500 ms keeps that near 10%.
REDRAW_MS = 500


@dataclass
class RunCurves:
    """The recorded series of one run (plain lists; appended to from the GUI thread only)."""

    run_id: int
    label: str
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    time_s: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_nll: list[float] = field(default_factory=list)  # test values in ``unit`` (NLL in nats, or bits/dim)
    eval_time_s: list[float] = field(default_factory=list)
    unit: str = NATS
    eval_split: str = ""  # image runs: the split of the latest test
    eval_exact: bool = True  # whether the latest test's log-dets were exact (else a stochastic estimate)

    @property
    def train_name(self) -> str:
        return "train bpd" if self.unit == BITS_PER_DIM else "train loss"

    @property
    def test_name(self) -> str:
        if self.unit != BITS_PER_DIM:
            return "test NLL" if self.eval_exact else "test NLL (estimate)"
        notes = [n for n in (self.eval_split, "" if self.eval_exact else "estimate") if n]
        return "test bpd" + (f" ({', '.join(notes)})" if notes else "")

    def add_steps(self, metrics: list[StepMetrics]) -> None:
        t = self.time_s[-1] if self.time_s else 0.0
        for m in metrics:
            t += m.seconds
            self.steps.append(m.step + 1)  # x = iterations completed after this step
            self.loss.append(m.loss)
            self.time_s.append(t)

    def add_eval(self, ev: EvalMetrics) -> bool:
        """Add a test (bits/dim for image runs, else NLL in nats); False if it has no such value or repeats a
        step (the latest test of a step wins)."""
        value = ev.bpd if self.unit == BITS_PER_DIM else ev.nll_nats
        if value is None:
            return False
        if self.eval_steps and self.eval_steps[-1] == ev.step:
            if self.unit != BITS_PER_DIM:
                return False  # 2-D frames repeat the test of a paused step: keep the first
            self.eval_steps.pop()
            self.eval_nll.pop()
            self.eval_time_s.pop()
        self.eval_steps.append(ev.step)
        self.eval_nll.append(float(value))
        self.eval_time_s.append(self.time_s[-1] if self.time_s else 0.0)
        self.eval_split = ev.split
        self.eval_exact = bool(ev.exact)
        return True


class CurvesView(QWidget):
    """Train loss (raw, faint, and smoothed) and test NLL of the current run; earlier runs as faint lines.

    Signals:
        settings_changed: smoothing, log-y or x axis changed (the window persists them).
    """

    settings_changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.smoothing = QDoubleSpinBox()
        self.smoothing.setRange(*SMOOTHING_RANGE)
        self.smoothing.setDecimals(3)
        self.smoothing.setSingleStep(0.05)
        self.smoothing.setValue(0.9)
        self.smoothing.setToolTip("Debiased exponential moving average of the training loss (0 = raw)")
        self.log_y = QCheckBox("log y")
        self.x_axis = QComboBox()
        self.x_axis.addItem("step", "step")
        self.x_axis.addItem("training time (s)", "time")
        self.hover = QLabel("")
        self.test_status = QLabel("")
        self.test_status.setToolTip("A test of an image run in progress (in the background)")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Smoothing:"))
        bar.addWidget(self.smoothing)
        bar.addWidget(self.log_y)
        bar.addWidget(QLabel("x:"))
        bar.addWidget(self.x_axis)
        bar.addStretch(1)
        bar.addWidget(self.test_status)
        bar.addWidget(self.hover)

        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setLabel("left", "nats")
        item.showGrid(x=True, y=True, alpha=0.2)
        self.legend = item.addLegend(offset=(-10, 10))
        self._colors = PlotColors(dark=False)
        self.raw_curve = item.plot(name="train loss (raw)")
        self.train_curve = item.plot(name="train loss")
        self.test_curve = item.plot(name="test NLL", symbol="o", symbolSize=5)
        for c in (self.raw_curve, self.train_curve, self.test_curve):
            c.setDownsampling(auto=True, method="peak")
            c.setClipToView(True)
        self._ghost_items: list[pg.PlotDataItem] = []
        self._apply_pens()

        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(bar)
        layout.addWidget(self.plot, 1)

        self.current = RunCurves(run_id=0, label="run 0")
        self.ghosts: list[RunCurves] = []
        self._names = ("", "")
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self._redraw_if_dirty)
        self._timer.start()
        self._mouse = pg.SignalProxy(self.plot.scene().sigMouseMoved, rateLimit=20, slot=self._on_mouse)
        self.smoothing.valueChanged.connect(self._on_setting)
        self.log_y.toggled.connect(self._on_setting)
        self.x_axis.currentIndexChanged.connect(self._on_setting)

    # -- appearance --------------------------------------------------------------------------------------
    def set_colors(self, colors: PlotColors) -> None:
        self._colors = colors
        style_plot(self.plot, colors)
        style_legend(self.legend, colors)
        self._apply_pens()
        self._dirty = True

    def _apply_pens(self) -> None:
        c = self._colors
        faint = pg.mkColor(c.train)
        faint.setAlpha(c.faint_alpha)
        self.raw_curve.setPen(pg.mkPen(faint, width=1))
        self.train_curve.setPen(pg.mkPen(c.train, width=2))
        self.test_curve.setPen(pg.mkPen(c.test, width=2))
        self.test_curve.setSymbolBrush(c.test)
        self.test_curve.setSymbolPen(None)

    def _on_setting(self) -> None:
        self.plot.getPlotItem().setLogMode(y=self.log_y.isChecked())
        self._dirty = True
        self._redraw_if_dirty()
        self.settings_changed.emit()

    # -- data --------------------------------------------------------------------------------------------
    @property
    def unit(self) -> str:
        """The current run's unit: ``"nats"`` (2-D runs) or ``"bits/dim"`` (image runs)."""
        return self.current.unit

    def new_run(
        self, run_id: int, label: str, history: list[StepMetrics], evals: list[EvalMetrics], unit: str = NATS
    ) -> None:
        """Start the curves of a new run; the current one (if it has points) becomes a faint ghost (ghosts are
        drawn only next to runs of the same unit)."""
        if self.current.steps:
            self.ghosts.append(self.current)
            self.ghosts = self.ghosts[-MAX_GHOSTS:]
        self.current = RunCurves(run_id=run_id, label=label, unit=unit)
        self.current.add_steps(history)
        for ev in evals:
            self.current.add_eval(ev)
        self.test_status.setText("")
        self._rebuild_ghosts()
        self._dirty = True

    def add_metrics(self, metrics: list[StepMetrics]) -> None:
        self.current.add_steps(metrics)
        self._dirty = True

    def add_eval(self, ev: EvalMetrics) -> None:
        if self.current.add_eval(ev):
            self._dirty = True

    def set_test_status(self, text: str) -> None:
        """Say what the background test is doing (empty: none runs)."""
        self.test_status.setText(text)

    def test_points(self) -> list[tuple[int, float]]:
        """The current run's test points (step, value in :attr:`unit`)."""
        return list(zip(self.current.eval_steps, self.current.eval_nll, strict=True))

    def point_count(self) -> int:
        """Training-loss points of the current run."""
        return len(self.current.steps)

    def _x(self, run: RunCurves, evals: bool = False) -> np.ndarray:
        if self.x_axis.currentData() == "time":
            return np.asarray(run.eval_time_s if evals else run.time_s, dtype=np.float64)
        return np.asarray(run.eval_steps if evals else run.steps, dtype=np.float64)

    def _y(self, values: list[float]) -> np.ndarray:
        y = np.asarray(values, dtype=np.float64)
        # Non-finite losses (rejected steps) would break the plot's auto-range; they are gaps instead.
        return np.where(np.isfinite(y), y, np.nan)

    def _visible_ghosts(self) -> list[RunCurves]:
        return [g for g in self.ghosts if g.unit == self.current.unit]

    def _rebuild_ghosts(self) -> None:
        item = self.plot.getPlotItem()
        for g in self._ghost_items:
            item.removeItem(g)
        self._ghost_items = []
        for _run in self._visible_ghosts():
            ghost = pg.PlotDataItem()
            ghost.setDownsampling(auto=True, method="peak")
            ghost.setClipToView(True)
            item.addItem(ghost)
            self._ghost_items.append(ghost)

    def _redraw_if_dirty(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        w = float(self.smoothing.value())
        run = self.current
        loss = self._y(run.loss)
        self.raw_curve.setData(self._x(run), loss, connect="finite")
        self.train_curve.setData(self._x(run), debiased_ema(loss, w), connect="finite")
        self.test_curve.setData(self._x(run, evals=True), self._y(run.eval_nll), connect="finite")
        grey = pg.mkColor(self._colors.foreground)
        grey.setAlpha(self._colors.faint_alpha)
        for ghost, g in zip(self._ghost_items, self._visible_ghosts(), strict=True):
            ghost.setPen(pg.mkPen(grey, width=1))
            ghost.setData(self._x(g), debiased_ema(self._y(g.loss), w), connect="finite")
        item = self.plot.getPlotItem()
        set_axis_label(item.getAxis("bottom"), "training time (s)" if self.x_axis.currentData() == "time" else "step")
        names = (run.train_name, run.test_name)
        if names != self._names:
            self._names = names
            item.setLabel("left", run.unit)
            for curve, name in (
                (self.raw_curve, f"{names[0]} (raw)"),
                (self.train_curve, names[0]),
                (self.test_curve, names[1]),
            ):
                curve.opts["name"] = name
                label = self.legend.getLabel(curve)
                if label is not None:
                    label.setText(name)
            self.legend.updateSize()

    def legend_names(self) -> list[str]:
        """The legend's entries, in order (after the latest redraw)."""
        return [label.text for _sample, label in self.legend.items]

    def _on_mouse(self, event: tuple[QPointF]) -> None:
        pos = event[0]
        vb = self.plot.getPlotItem().vb
        if not self.plot.sceneBoundingRect().contains(pos) or not self.current.steps:
            return
        x = vb.mapSceneToView(pos).x()
        xs = self._x(self.current)
        i = int(np.clip(np.searchsorted(xs, x), 0, len(xs) - 1))
        run = self.current
        text = f"step {run.steps[i]}: {run.train_name} {run.loss[i]:.4f}"
        if run.eval_steps:
            ex = self._x(run, evals=True)
            j = int(np.clip(np.searchsorted(ex, x), 0, len(ex) - 1))
            text += f"; {run.test_name} {run.eval_nll[j]:.4f} (step {run.eval_steps[j]})"
        self.hover.setText(text)

    # -- export ------------------------------------------------------------------------------------------
    def to_csv(self) -> str:
        """All runs' series as CSV: ``run,series,step,time_s,value,unit``.

        2-D runs: series ``train_loss`` and ``test_nll`` in nats; image runs: ``train_bpd`` and ``test_bpd`` in
        bits/dim.
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "series", "step", "time_s", "value", "unit"])
        for run in [*self.ghosts, self.current]:
            train, test = ("train_bpd", "test_bpd") if run.unit == BITS_PER_DIM else ("train_loss", "test_nll")
            for s, t, v in zip(run.steps, run.time_s, run.loss, strict=True):
                writer.writerow([run.label, train, s, f"{t:.6f}", repr(float(v)), run.unit])
            for s, t, v in zip(run.eval_steps, run.eval_time_s, run.eval_nll, strict=True):
                writer.writerow([run.label, test, s, f"{t:.6f}", repr(float(v)), run.unit])
        return buf.getvalue()

    def export_csv(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_csv` atomically (``OSError`` if the path is unwritable)."""
        atomic_write_text(path, self.to_csv())
