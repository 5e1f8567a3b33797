"""Solver diagnostics: per-block forward-solve iterations (mean and max), residuals and non-converged counts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHeaderView,
    QLabel,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..theme import PlotColors, style_plot

__all__ = ["SolverView"]

COLUMNS = ("block", "kind", "solver", "iters", "iters max", "residual", "tol", "failed")
#: Header tooltips: what the numbers mean.
TIPS = {
    "iters": "mean evaluations of G per sample in the latest training step's forward solve",
    "iters max": "the most evaluations of G any sample of that step needed",
    "residual": "largest relative residual |w + G(w) - rhs|_inf / (1 + |rhs|_inf) after the solve",
    "tol": "the relative tolerance the solve used: the one set, or 10 x the machine epsilon of the training "
    "dtype if that is larger (1.19e-06 in float32)",
    "failed": "samples whose residual missed the tolerance within the iteration cap (not converged)",
}


class SolverView(QWidget):
    """A bar chart (mean iterations, max as markers) and a table, from the latest training step's solves."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.summary = QLabel("No training step yet.")
        self.summary.setWordWrap(True)
        self.plot = pg.PlotWidget()
        item = self.plot.getPlotItem()
        item.setLabel("left", "forward iterations / sample")
        item.setLabel("bottom", "block")
        item.showGrid(y=True, alpha=0.2)
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.6, brush="#4aa3ff")
        self.max_marks = pg.ScatterPlotItem(symbol="t", size=9, brush="#ff9f40", pen=None)
        item.addItem(self.bars)
        item.addItem(self.max_marks)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        for j, col in enumerate(COLUMNS):
            if col in TIPS:
                self.table.horizontalHeaderItem(j).setToolTip(TIPS[col])
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        # Sized once per update (resizeColumnsToContents below): with ResizeToContents every setItem re-measured its
        # column, and a 10-block table cost ~35 ms of the GUI thread per frame.
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.summary)
        layout.addWidget(self.plot, 2)
        layout.addWidget(self.table, 1)
        self.rows: list[dict[str, Any]] = []
        self._ticks: list[list[tuple[int, str]]] = []

    def set_colors(self, colors: PlotColors) -> None:
        style_plot(self.plot, colors)

    def set_diagnostics(self, diagnostics: list[dict[str, Any]], step: int) -> None:
        """Show :func:`monoflow_core.evaluation.solver_diagnostics` entries (blocks without a forward solve,
        e.g. residual blocks, are listed with empty iteration columns)."""
        self.rows = []
        for d in diagnostics:
            fwd = d.get("forward") or {}
            self.rows.append(
                {
                    "block": d["block"],
                    "kind": d["kind"],
                    "solver": fwd.get("method", d["solver"]),
                    "iters": fwd.get("iterations_mean"),
                    "iters max": fwd.get("iterations_max"),
                    "residual": fwd.get("residual_max"),
                    "tol": fwd.get("tol"),
                    "failed": fwd.get("n_failed"),
                }
            )
        solved = [r for r in self.rows if r["iters"] is not None]
        x = np.arange(len(solved), dtype=np.float64)
        self.bars.setOpts(x=x, height=[r["iters"] for r in solved], width=0.6)
        ticks = [[(i, str(r["block"])) for i, r in enumerate(solved)]]
        if ticks != self._ticks:  # (new ticks re-lay out the axis: only when the blocks change)
            self._ticks = ticks
            self.plot.getPlotItem().getAxis("bottom").setTicks(ticks)
        self.max_marks.setData(x=x, y=[r["iters max"] for r in solved])
        self._fill_table()
        failed = sum(r["failed"] or 0 for r in self.rows)
        if not self.rows:
            self.summary.setText("No implicit blocks (or no training step yet).")
        elif failed:
            self.summary.setText(
                f"step {step}: {failed} sample(s) missed the solver tolerance; raise the iteration "
                "cap or loosen the tolerance."
            )
        else:
            self.summary.setText(f"step {step}: every block's forward solve converged.")

    def _fill_table(self) -> None:
        """Write the rows into the table, reusing its items and touching only cells whose text changed."""
        table = self.table
        changed = table.rowCount() != len(self.rows)
        table.setRowCount(len(self.rows))
        for i, row in enumerate(self.rows):
            for j, col in enumerate(COLUMNS):
                v = row[col]
                text = "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                item = table.item(i, j)
                if item is None:
                    table.setItem(i, j, QTableWidgetItem(text))
                    changed = True
                elif item.text() != text:
                    item.setText(text)
                    changed = True
        if changed:
            table.resizeColumnsToContents()

    def failed_total(self) -> int:
        return int(sum(r["failed"] or 0 for r in self.rows))
