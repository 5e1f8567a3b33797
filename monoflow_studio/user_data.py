"""File > Load data...: a user's 2-D points from a CSV, NPY or NPZ file, with a column chooser where there are more
than two columns, and the run configuration that trains on them (loaded points or drawn ones).

Reading and checking are the core's (:mod:`monoflow_core.data.point_files`, :mod:`monoflow_core.data.points`): a
malformed file raises one :class:`~monoflow_core.data.PointDataError`, which the window shows as a message while the
current run goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from PySide6.QtWidgets import QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QVBoxLayout, QWidget

from monoflow_core.data.point_files import PointTable, read_point_table
from monoflow_core.data.points import POINTS_DATA, PointSet, make_point_set

from .run_spec import RunSpec

__all__ = ["DATA_FILTER", "ColumnDialog", "drawn_point_set", "load_point_file", "points_spec"]

DATA_FILTER = "2-D points (*.csv *.txt *.tsv *.npy *.npz);;All files (*)"

#: Asks which two columns to use: ``(table) -> (name, name)``, or ``None`` when the user cancels.
ColumnChooser = Callable[[PointTable], "tuple[str, str] | None"]


class ColumnDialog(QDialog):
    """Choose the two columns (x1, x2) of a file that has more than two."""

    def __init__(self, table: PointTable, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Choose two columns")
        self.first = QComboBox()
        self.second = QComboBox()
        for box in (self.first, self.second):
            for name in table.names:
                box.addItem(name, name)
        # Columns named x and y (any case) are the likely choice; else the first two.
        lower = [name.lower() for name in table.names]
        first, second = (lower.index("x"), lower.index("y")) if {"x", "y"} <= set(lower) else (0, 1)
        self.first.setCurrentIndex(first)
        self.second.setCurrentIndex(second)
        note = QLabel(
            f"{table.path.name} has {len(table.names)} columns. Choose the two that hold the points; the "
            "others are ignored (they may hold text, such as labels)."
        )
        note.setWordWrap(True)
        form = QFormLayout()
        form.addRow("Horizontal (x1)", self.first)
        form.addRow("Vertical (x2)", self.second)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addLayout(form)
        layout.addWidget(buttons)

    def columns(self) -> tuple[str, str]:
        return str(self.first.currentData()), str(self.second.currentData())


def ask_columns(parent: QWidget | None) -> ColumnChooser:
    """The column chooser of the window: a modal :class:`ColumnDialog`."""

    def ask(table: PointTable) -> tuple[str, str] | None:
        dialog = ColumnDialog(table, parent)
        return dialog.columns() if dialog.exec() == QDialog.DialogCode.Accepted else None

    return ask


def load_point_file(path: str | os.PathLike[str], choose: ColumnChooser, split_seed: int) -> PointSet | None:
    """Read a point file; with more than two columns ``choose`` picks two (``None``: the user cancelled).

    Raises:
        PointDataError: a malformed file (the message names it and the problem).
    """
    table = read_point_table(path)
    columns: tuple[str, str] | None = None
    if len(table.names) > 2:
        columns = choose(table)
        if columns is None:
            return None
    points, names = table.read(columns)
    return make_point_set(points, source=table.path.name, columns=names, split_seed=split_seed)


def drawn_point_set(points: np.ndarray, split_seed: int) -> PointSet:
    """The points drawn on the density view's canvas, used as they are (identity transform).

    Raises:
        PointDataError: too few points (or another problem :func:`make_point_set` refuses).
    """
    return make_point_set(points, source="drawing", columns=("x1", "x2"), split_seed=split_seed, standardise=False)


def points_spec(base: RunSpec, points: PointSet) -> RunSpec:
    """``base`` (a 2-D run configuration) training on ``points``."""
    return RunSpec(
        base.model.replace(),
        base.training.replace(data=POINTS_DATA),
        name=base.name,
        description=base.description,
        points=points,
    )
