"""The controls dock: every setting of a run, split into *live* settings and *rebuild* settings.

Live settings (learning rate, solver, tolerance, iteration cap; for image runs the test schedule) are applied to
the running trainer between two steps. Rebuild settings (data set, formulation, activation, Lipschitz coefficient,
blocks, G size, batch size, seed, device) need a fresh model; the window asks before discarding a run for them.
Every numeric field takes its limits from the core's ranges (:mod:`monoflow_core.bounds`, the tables the
configurations validate against), so an out-of-range value cannot be entered; where the core sets no limit (counts
have no maximum, a learning rate no minimum above 0) the box has its own.

The panel follows the kind of run it shows: image runs replace "Blocks" by "Blocks per scale" and "FC blocks",
show the test settings, and keep their data set (it is chosen with a preset or a run configuration, since a 2-D
density and an image set need different models).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PySide6.QtCore import QPointF, QRegularExpression, Signal
from PySide6.QtGui import QColor, QIcon, QPainter, QPixmap, QRegularExpressionValidator
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QLabel,
    QLineEdit,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from monoflow_core.bounds import INTERVALS, MINIMUM
from monoflow_core.config import FORMULATIONS
from monoflow_core.data import TOY_DATASETS, sample_toy
from monoflow_core.families import IMPLICIT, describe_family
from monoflow_core.nn.activations import ACTIVATIONS
from monoflow_core.solvers import DEFAULT_TOL, METHODS

from .run_spec import RunSpec
from .widgets import LogSpinBox

__all__ = ["LIVE_FIELDS", "REBUILD_FIELDS", "ControlsPanel", "dataset_icon"]

LIVE_FIELDS = ("lr", "solver", "tol", "max_iter", "eval_every", "eval_size")
REBUILD_FIELDS = (
    "data",
    "formulation",
    "activation",
    "lipschitz",
    "blocks",
    "blocks_per_scale",
    "fc_blocks",
    "depth",
    "growth",
    "batch_size",
    "seed",
    "device",
)
#: Fields shown only for one kind of run (the others apply to both).
DENSITY_ONLY = ("blocks",)
IMAGE_ONLY = ("blocks_per_scale", "fc_blocks", "eval_every", "eval_size")
#: Fields of the paper's implicit family only: a comparison flow (Real NVP, Glow, ...) has no G network, no
#: Lipschitz bound and no fixed-point solves, so these rows are hidden for it rather than shown doing nothing.
IMPLICIT_ONLY = ("formulation", "activation", "lipschitz", "depth", "growth", "solver", "tol", "max_iter")
#: ...except the tolerance, which a continuous flow uses for its ODE solver.
CNF_FIELDS = ("tol",)

TOL_TIP = "relative solver tolerance (never below 10 machine epsilons)"
DATA_TIP = "one of the eight 2-D toy densities of the paper (Table 1)"
IMAGE_DATA_TIP = (
    "image runs keep their data set (a 2-D density needs another model): choose another run from the "
    "Presets menu or with File > Load run configuration"
)


#: Decimals of the Lipschitz coefficient's box: its range is the core's open interval (0, 1) at this resolution.
LIPSCHITZ_DECIMALS = 3
#: Resolution at the core's ends in the log-scale boxes, which show three significant digits (the tolerance's upper
#: end is the core's open 1 less this: 0.999; its lower end is the studio's, the solvers' default DEFAULT_TOL).
LOG_RESOLUTION = 1e-3
#: The learning rates the studio offers (the core accepts any lr > 0; these are the box's own limits).
LR_LIMITS = (1e-6, 1.0)


def core_range(
    name: str, resolution: float, limits: tuple[float | None, float | None] = (None, None)
) -> tuple[float, float]:
    """A box's range for the configuration field ``name``: the core's interval (:data:`monoflow_core.bounds.INTERVALS`)
    at the box's ``resolution`` (an open end moves one step inwards), or the studio's own ``limits`` where given.

    Raises:
        ValueError: an end is unbounded in the core and the studio gives no limit there, or a limit of the studio
            lies outside the core's interval.
    """
    interval = INTERVALS[name]
    core_low, core_high = interval.inside(resolution)
    low = limits[0] if limits[0] is not None else core_low
    high = limits[1] if limits[1] is not None else core_high
    if low is None or high is None:
        raise ValueError(f"{name}: the core's range is unbounded; the control needs its own limit there")
    if low not in interval or high not in interval:
        raise ValueError(f"{name}: the control's range [{low:g}, {high:g}] leaves the core's ({interval.rule()})")
    return low, high


def dataset_icon(name: str, size: int = 40) -> QIcon:
    """A thumbnail of a toy data set: 1,500 points drawn on a ``size`` pixel square (data, not model code)."""
    pts = sample_toy(name, 1500, rng=0, dtype=torch.float64).numpy()
    pix = QPixmap(size, size)
    pix.fill(QColor("#202124"))
    painter = QPainter(pix)
    painter.setPen(QColor(120, 190, 255, 150))
    scaled = (np.clip(pts, -4.0, 4.0) + 4.0) / 8.0 * (size - 1)
    for x, y in scaled:
        painter.drawPoint(QPointF(float(x), float(size - 1 - y)))
    painter.end()
    return QIcon(pix)


def available_devices() -> list[str]:
    """CPU, and each CUDA device when this torch build sees one."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return devices


class ControlsPanel(QWidget):
    """Widgets for a :class:`RunSpec`.

    Signals:
        live_changed(name, value): a live setting changed (``lr``, ``solver``, ``tol`` or ``max_iter``).
        rebuild_changed(name): a rebuild setting changed; the window decides whether to rebuild.
    """

    live_changed = Signal(str, object)
    rebuild_changed = Signal(str)

    def __init__(self, spec: RunSpec, parent: QWidget | None = None, *, default_eval_every: int = 100) -> None:
        super().__init__(parent)
        self._base = spec.copy()
        self.widgets: dict[str, QWidget] = {}
        self._image: bool | None = None  # the kind of run shown (None before the first set_spec)
        self._enabled = True
        self._icons: dict[str, QIcon] = {}

        self.data = QComboBox()
        self.data.setIconSize(self.data.iconSize() * 2)
        self.formulation = self._combo(FORMULATIONS)
        self.activation = self._combo(tuple(ACTIVATIONS))
        self.lipschitz = QDoubleSpinBox()
        self.lipschitz.setDecimals(LIPSCHITZ_DECIMALS)  # first: the box rounds its range to its decimals
        self.lipschitz.setRange(*core_range("lipschitz", 10.0**-LIPSCHITZ_DECIMALS))
        self.lipschitz.setSingleStep(0.01)
        self.blocks = self._spin(MINIMUM["blocks"], 32)
        self.blocks_per_scale = QLineEdit()
        self.blocks_per_scale.setValidator(
            QRegularExpressionValidator(QRegularExpression(r"\s*\d{1,2}(\s*,\s*\d{1,2})*\s*"))
        )
        self.blocks_per_scale.setPlaceholderText("e.g. 2, 2, 2")
        self._blocks_per_scale_text = ""
        self.fc_blocks = self._spin(MINIMUM["fc_blocks"], 32)
        self.depth = self._spin(MINIMUM["depth"], 8)
        self.growth = self._spin(MINIMUM["growth"], 128)
        self.batch_size = self._spin(MINIMUM["batch_size"], 20000, step=50)
        self.seed = self._spin(MINIMUM["seed"], 2**31 - 1)
        self.device = self._combo(tuple(available_devices()))
        self.lr = LogSpinBox(*core_range("lr", LOG_RESOLUTION, LR_LIMITS), 1e-3)
        self.solver = self._combo(METHODS)
        self.tol = LogSpinBox(*core_range("tol", LOG_RESOLUTION, (DEFAULT_TOL, None)), 1e-6, factor=10.0)
        self.max_iter = self._spin(MINIMUM["max_iter"], 100000, step=10)
        self.max_iter.setKeyboardTracking(False)
        self.eval_every = self._spin(MINIMUM["eval_every"], 1_000_000, step=50)
        self.eval_every.setSpecialValueText(f"auto (every {default_eval_every})")
        self.eval_size = self._spin(MINIMUM["eval_size"], 1_000_000, step=50)

        rebuild = QGroupBox("Model and data: a change rebuilds the run")
        self._rebuild_form = QFormLayout(rebuild)
        self._add_rows(
            self._rebuild_form,
            (
                ("Data set", "data", DATA_TIP),
                ("Formulation", "formulation", "monotone (the paper), residual (i-DenseNet) or inverse residual"),
                ("Activation", "activation", "activation of G; CPila for the Monotone Flow, CLipSwish for i-DenseNet"),
                ("Lipschitz coeff.", "lipschitz", "Lipschitz bound of each linear layer of G, in (0, 1)"),
                ("Blocks", "blocks", "number of flow blocks (the paper: 10)"),
                (
                    "Blocks per scale",
                    "blocks_per_scale",
                    "image runs: flow blocks at each scale, comma-separated (one scale per entry; each scale after the "
                    "first halves the height and width, so 8x8 images allow up to 4 scales); press Enter to apply",
                ),
                ("FC blocks", "fc_blocks", "image runs: fully connected blocks after the last scale (the paper: 4)"),
                ("G depth", "depth", "dense layers of the DenseNet G (the paper: 3)"),
                ("G growth", "growth", "features each dense layer adds (the paper: 16)"),
                ("Batch size", "batch_size", "fresh samples per iteration (the paper: 500)"),
                ("Seed", "seed", "seed of the weights and of the data stream"),
                ("Device", "device", "where the model trains"),
            ),
        )
        live = QGroupBox("Live: applies at once, even while training")
        self._live_form = QFormLayout(live)
        self._add_rows(
            self._live_form,
            (
                ("Learning rate", "lr", "Adam's base learning rate (applies from the next step)"),
                ("Solver", "solver", "fixed-point solver of the implicit blocks (auto picks Newton in 2-D)"),
                ("Tolerance", "tol", TOL_TIP),
                ("Iteration cap", "max_iter", "solver iterations before a sample is flagged as not converged"),
            ),
        )
        self.tests = QGroupBox("Tests: apply from the next test")
        self._add_rows(
            QFormLayout(self.tests),
            (
                (
                    "Test every",
                    "eval_every",
                    f"steps between two bits/dim tests, computed in the background (auto: every {default_eval_every} "
                    "steps); Run > Test now tests at once",
                ),
                ("Test images", "eval_size", "images of the evaluation split per test (at most the whole split)"),
            ),
        )
        self.note = QLabel("")
        self.note.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addWidget(rebuild)
        layout.addWidget(live)
        layout.addWidget(self.tests)
        layout.addWidget(self.note)
        layout.addStretch(1)

        self.set_spec(spec)
        self._connect()

    # -- construction helpers ----------------------------------------------------------------------------
    def _add_rows(self, form: QFormLayout, rows: tuple[tuple[str, str, str], ...]) -> None:
        """Add ``(label, attribute, tooltip)`` rows of existing widgets to a form and register them."""
        for label, name, tip in rows:
            widget = getattr(self, name)
            widget.setToolTip(tip)
            form.addRow(label, widget)
            self.widgets[name] = widget

    @staticmethod
    def _combo(items: tuple[str, ...]) -> QComboBox:
        box = QComboBox()
        for item in items:
            box.addItem(item, item)
        return box

    @staticmethod
    def _spin(low: int, high: int, step: int = 1) -> QSpinBox:
        box = QSpinBox()
        box.setRange(low, high)
        box.setSingleStep(step)
        box.setKeyboardTracking(False)  # one change per committed value, not per keystroke
        return box

    def _connect(self) -> None:
        for name in REBUILD_FIELDS:
            w = self.widgets[name]
            if isinstance(w, QComboBox):
                w.currentIndexChanged.connect(lambda _i, n=name: self.rebuild_changed.emit(n))
            elif isinstance(w, QLineEdit):
                w.editingFinished.connect(lambda n=name: self._on_text_committed(n))
            else:
                w.valueChanged.connect(lambda _v, n=name: self.rebuild_changed.emit(n))
        self.lr.valueChanged.connect(lambda v: self.live_changed.emit("lr", float(v)))
        self.tol.valueChanged.connect(lambda v: self.live_changed.emit("tol", float(v)))
        self.max_iter.valueChanged.connect(lambda v: self.live_changed.emit("max_iter", int(v)))
        self.solver.currentIndexChanged.connect(lambda _i: self.live_changed.emit("solver", self.solver.currentData()))
        self.eval_every.valueChanged.connect(lambda v: self.live_changed.emit("eval_every", int(v)))
        self.eval_size.valueChanged.connect(lambda v: self.live_changed.emit("eval_size", int(v)))

    def _on_text_committed(self, name: str) -> None:
        """A text field lost the focus or got Enter: a rebuild only if its text really changed."""
        text = self.blocks_per_scale.text().strip()
        if name == "blocks_per_scale" and text != self._blocks_per_scale_text:
            self.rebuild_changed.emit(name)

    @staticmethod
    def _format_list(values: list[int]) -> str:
        return ", ".join(str(v) for v in values)

    def _parse_blocks_per_scale(self) -> list[int]:
        text = self.blocks_per_scale.text().strip()
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values:
            raise ValueError(f"blocks_per_scale: a comma-separated list of block counts, e.g. 2, 2, 2; got {text!r}")
        return values

    # -- the kind of run ---------------------------------------------------------------------------------
    @property
    def image_mode(self) -> bool:
        """Whether the panel shows an image run."""
        return bool(self._image)

    def _dataset_icon(self, name: str) -> QIcon:
        if name not in self._icons:
            self._icons[name] = dataset_icon(name)
        return self._icons[name]

    def _set_mode(self, image: bool, data: str) -> None:
        """Show the fields of an image run or of a 2-D run (and the data sets it can switch to)."""
        self.data.blockSignals(True)
        try:
            if image != self._image or (image and self.data.findData(data) < 0):
                self.data.clear()
                if image:
                    self.data.addItem(data, data)
                else:
                    for name in TOY_DATASETS:
                        self.data.addItem(self._dataset_icon(name), name, name)
        finally:
            self.data.blockSignals(False)
        self._image = image
        for name in DENSITY_ONLY:
            self._rebuild_form.setRowVisible(self.widgets[name], not image)
        for name in ("blocks_per_scale", "fc_blocks"):
            self._rebuild_form.setRowVisible(self.widgets[name], image)
        self.tests.setVisible(image)
        self.data.setToolTip(IMAGE_DATA_TIP if image else DATA_TIP)
        self.data.setEnabled(not image and self._enabled)

    def _set_family(self, family: str) -> None:
        """Show only the fields that apply to the run's flow family."""
        for name in IMPLICIT_ONLY:
            shown = family == IMPLICIT or (family == "cnf" and name in CNF_FIELDS)
            form = self._live_form if name in LIVE_FIELDS else self._rebuild_form
            form.setRowVisible(self.widgets[name], shown)
        if family == "cnf":
            self.tol.setToolTip("relative and absolute tolerance of the continuous flow's ODE solver")
        else:
            self.tol.setToolTip(TOL_TIP)

    # -- spec <-> widgets --------------------------------------------------------------------------------
    def set_spec(self, spec: RunSpec) -> None:
        """Show ``spec`` without emitting change signals (it becomes the base of :meth:`spec`)."""
        self._base = spec.copy()
        m, t = spec.model, spec.training
        self._set_mode(spec.is_image, t.data)
        self._set_family(m.family)
        self._blocks_per_scale_text = self._format_list(list(m.blocks_per_scale))
        self.blocks_per_scale.setText(self._blocks_per_scale_text)
        values: dict[str, Any] = {
            "data": t.data,
            "formulation": m.formulation if isinstance(m.formulation, str) else m.formulation[0],
            "activation": m.activation,
            "lipschitz": m.lipschitz,
            "blocks": m.blocks,
            "depth": m.depth,
            "growth": m.growth,
            "batch_size": t.batch_size,
            "seed": t.seed,
            "device": t.device,
            "lr": t.lr,
            "solver": m.solver,
            "tol": m.tol,
            "max_iter": m.max_iter,
            "fc_blocks": m.fc_blocks,
            "eval_every": t.eval_every,
            "eval_size": t.eval_size,
        }
        for name, value in values.items():
            w = self.widgets[name]
            w.blockSignals(True)
            try:
                if isinstance(w, QComboBox):
                    index = w.findData(value)
                    if index < 0:  # e.g. a checkpoint trained on a device this machine lacks
                        w.addItem(str(value), value)
                        index = w.count() - 1
                    w.setCurrentIndex(index)
                else:
                    w.setValue(value)
            finally:
                w.blockSignals(False)
        mixed = isinstance(m.formulation, list) and len(set(m.formulation)) > 1
        notes = ["This model mixes formulations per block; the combo shows the first."] if mixed else []
        if m.family != IMPLICIT:
            notes.append(
                f"Comparison flow (zuko) {describe_family(m)}: its architecture comes from the preset; "
                "the fields of the implicit flows are hidden."
            )
        if spec.is_image:
            shape = "x".join(str(v) for v in m.image_shape or ())
            notes.append(
                f"Image run on {t.data} ({shape}, {m.levels} levels, {m.dequantization} dequantization): "
                "training loss and tests in bits/dim. Data set and image shape come from the preset."
            )
        self.note.setText("\n".join(notes))

    def spec(self) -> RunSpec:
        """The run configuration the widgets describe (fields without a widget keep the base spec's values).

        Raises:
            ValueError: the core refuses the combination (its message names the field).
        """
        base = self._base
        image = base.is_image
        formulation: str | list[str] = self.formulation.currentData()
        if isinstance(base.model.formulation, list) and self.formulation.currentData() == base.model.formulation[0]:
            formulation = list(base.model.formulation)  # keep a per-block list the combo cannot show
        architecture: dict[str, Any] = (
            {"blocks_per_scale": self._parse_blocks_per_scale(), "fc_blocks": int(self.fc_blocks.value())}
            if image
            else {"blocks": int(self.blocks.value())}
        )
        model = base.model.replace(
            formulation=formulation
            if not isinstance(formulation, list) or len(formulation) == self.blocks.value()
            else self.formulation.currentData(),
            activation=self.activation.currentData(),
            lipschitz=float(self.lipschitz.value()),
            depth=int(self.depth.value()),
            growth=int(self.growth.value()),
            solver=self.solver.currentData(),
            tol=float(self.tol.value()),
            max_iter=int(self.max_iter.value()),
            **architecture,
        )
        tests: dict[str, Any] = (
            {"eval_every": int(self.eval_every.value()), "eval_size": int(self.eval_size.value())} if image else {}
        )
        training = base.training.replace(
            data=base.training.data if image else self.data.currentData(),
            batch_size=int(self.batch_size.value()),
            seed=int(self.seed.value()),
            device=self.device.currentData(),
            lr=float(self.lr.value()),
            **tests,
        )
        return RunSpec(model, training, name=base.name, description=base.description, points=base.points)

    def set_enabled_for_run(self, enabled: bool) -> None:
        """Enable or disable the controls (e.g. while a run is being built); an image run's data set stays off."""
        self._enabled = enabled
        for w in self.widgets.values():
            w.setEnabled(enabled)
        self.data.setEnabled(enabled and not self.image_mode)

    def widget(self, name: str) -> QWidget:
        return self.widgets[name]
