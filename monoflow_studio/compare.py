"""Compare mode: two or more 2-D runs trained side by side on the same data, seed and batch stream.

Each run has its own :class:`~monoflow_studio.session.Session` (worker thread, view thread and, by default, view
process); their training steps take turns through one :class:`~monoflow_studio.fair_share.FairShare`, so each run
gets the same share of the training time and a cheap coupling step is not slowed by a costly monotone one (or the
other way round). The window shows the densities next to each other at one colour scale, the curves overlaid
against training seconds or steps, and each run's solver summary (docs/studio.md, "Compare mode").
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import pyqtgraph as pg
from PySide6.QtCore import QEvent, QObject, Qt, QTimer
from PySide6.QtGui import QAction, QCloseEvent, QKeySequence, QPalette
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QMainWindow,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from monoflow_core.families import IMPLICIT
from monoflow_core.presets import Preset
from monoflow_core.training import StepMetrics

from .fair_share import FairShare
from .frames import RunInfo, ViewFrame
from .run_spec import RunSpec, toy_presets
from .session import TRAINING, Session, SessionOptions
from .theme import plot_colors
from .views.compare import COMPARE_MODES, RUN_COLORS, CompareCurvesView, DensityPanel, run_letter, shared_levels

__all__ = ["SHARED_TRAINING", "CompareWindow", "ask_compare_preset", "compare_spec", "fair_share_text", "open_compare"]

#: The training settings every run of a comparison takes from the first: the same data (and the user's points),
#: batch stream (data, seed, batch size), held-out set and arithmetic. Each keeps its own optimiser settings
#: (learning rate, schedule, iterations), which its preset tuned for its family.
SHARED_TRAINING = ("data", "seed", "batch_size", "test_size", "test_seed", "device", "dtype", "data_dir")


def compare_spec(base: RunSpec, preset: Preset | str) -> RunSpec:
    """``preset``'s model and optimiser on ``base``'s data, seed and batch stream (:data:`SHARED_TRAINING`).

    Raises:
        ValueError: the preset is unknown, or the pair cannot train here (e.g. an image run).
    """
    spec = RunSpec.from_preset(preset)
    spec.training = spec.training.replace(**{name: getattr(base.training, name) for name in SHARED_TRAINING})
    spec.points = base.points
    spec.check_studio()
    if base.is_image or spec.is_image:
        raise ValueError("compare mode shows 2-D densities; image runs are compared by their curves one at a time")
    return spec


def fair_share_text(n: int) -> str:
    """What the status bar says about how the runs share the machine."""
    share = "half" if n == 2 else f"1/{n}"
    return f"Fair share: the runs take turns, one step at a time; each run gets {share} of the training time"


def suggested_partner(base: RunSpec) -> str:
    """The natural counterpart of ``base``: the paper's residual baseline for a monotone run (its Table 1 claim),
    else the monotone flow."""
    quick = base.name.startswith("quick")
    if base.model.family == IMPLICIT and base.model.formulation == "monotone":
        return "quick-idensenet" if quick else "paper-toy-idensenet"
    return "quick-monotone" if quick or base.model.family != IMPLICIT else "paper-toy-monotone"


def ask_compare_preset(parent: QWidget, base: RunSpec) -> str | None:
    """Ask which preset to train next to ``base`` (None: cancelled)."""
    names = [p.name for p in toy_presets()]
    wanted = suggested_partner(base)
    current = names.index(wanted) if wanted in names else 0
    name, ok = QInputDialog.getItem(
        parent,
        "Compare with a preset",
        f"Train {base.name} (A) and this preset (B) side by side on {base.training.data},\n"
        f"with the same seed ({base.training.seed}) and batch size ({base.training.batch_size}):",
        names,
        current,
        False,
    )
    return str(name) if ok and name else None


def open_compare(
    opener: QWidget,
    base: RunSpec,
    preset: str | None,
    *,
    options: SessionOptions | None = None,
    pause: Callable[[], None] | None = None,
    report: Callable[[str, str], None] | None = None,
) -> CompareWindow | None:
    """Open a compare window of ``base`` (A) and ``preset`` (B; asked with a dialog if None) next to ``opener``.

    Args:
        opener: the studio window (the compare window closes with it).
        base: run A's settings; run B takes its data, seed and batch stream (:func:`compare_spec`).
        preset: run B's preset name, or None to ask.
        options: the sessions' view options (the studio's).
        pause: pauses the studio's own run (its training would take time from the comparison), or None.
        report: ``report(level, text)`` says what happened (the studio's log and status bar).

    Returns:
        The window (shown), or None when cancelled or when the pair cannot train (said through ``report``).
    """
    say = report or (lambda _level, _text: None)
    if base.is_image:
        say("error", "compare mode shows 2-D densities: load a 2-D preset first")
        return None
    name = preset if preset is not None else ask_compare_preset(opener, base)
    if name is None:
        return None
    try:
        partner = compare_spec(base, name)
        window = CompareWindow([base, partner], options=options, opener=opener)
    except ValueError as err:
        say("error", f"cannot compare with {name}: {err}")
        return None
    window.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)  # its sessions and threads go with it
    if pause is not None:
        pause()
        say("info", "paused this run: the comparison gets the training time")
    say(
        "info",
        f"comparing {base.name} (A) and {partner.name} (B) on {base.training.data}, seed "
        f"{base.training.seed}, batch {base.training.batch_size}: press Train in the compare window",
    )
    window.show()
    return window


class CompareWindow(QMainWindow):
    """A window training ``specs`` side by side (run A, B, ...).

    Args:
        specs: two to four 2-D runs on the same data, seed and batch size (build them with :func:`compare_spec`).
        options: what each session computes for the views (the frame budgets are divided among the runs, whose
            views share the view core).
        opener: the studio window it was opened from: it closes with it (nothing outlives the studio).
    """

    def __init__(
        self, specs: Sequence[RunSpec], *, options: SessionOptions | None = None, opener: QWidget | None = None
    ) -> None:
        super().__init__(opener, Qt.WindowType.Window)
        if not 2 <= len(specs) <= len(RUN_COLORS):
            raise ValueError(f"compare mode trains 2 to {len(RUN_COLORS)} runs, got {len(specs)}")
        first = specs[0].training
        for spec in specs:
            spec.check_studio()
            if spec.is_image:
                raise ValueError("compare mode shows 2-D densities, not image runs")
            differ = [
                name for name in ("data", "seed", "batch_size") if getattr(spec.training, name) != getattr(first, name)
            ]
            if differ:
                raise ValueError(
                    f"the runs of a comparison share their data, seed and batch size; {spec.name} "
                    f"differs in {', '.join(differ)} (build it with compare_spec)"
                )
        self.specs = [s.copy() for s in specs]
        n = len(specs)
        base = options or SessionOptions()
        # The runs' views share the view core(s): each gets 1/n of the frame budget the studio gives one run.
        self.options = dataclasses.replace(
            base, frame_budget=base.frame_budget / n, thread_frame_budget=base.thread_frame_budget / n
        )
        self.gate = FairShare()
        self.sessions = [Session(spec, self.options, parent=self, gate=self.gate) for spec in self.specs]
        self.run_ids = [0] * n
        self.steps = [0] * n
        self.states = [""] * n
        self._closing = False
        self._build(n)
        for i, session in enumerate(self.sessions):
            self._connect(i, session)
        if opener is not None:
            opener.installEventFilter(self)
        self.set_dark(QApplication.palette().color(QPalette.ColorRole.Window).lightness() < 128)
        names = " vs ".join(s.name for s in self.specs)
        self.setWindowTitle(f"monoflow studio: compare {names} on {first.data}")
        self._status_timer = QTimer(self)
        self._status_timer.setInterval(500)
        self._status_timer.timeout.connect(self._update_status)
        self._status_timer.start()
        for session in self.sessions:
            session.launch()

    # -- construction ------------------------------------------------------------------------------------
    def _build(self, n: int) -> None:
        self.mode_box = QComboBox()
        for mode, title in COMPARE_MODES.items():
            self.mode_box.addItem(title, mode)
        self.mode_box.setToolTip("Every panel uses the same colour scale (computed from all runs' latest frames)")
        self.overlay_box = QCheckBox("Overlay data points")
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Show:"))
        bar.addWidget(self.mode_box)
        bar.addWidget(self.overlay_box)
        bar.addStretch(1)
        bar.addWidget(QLabel("one colour scale for all panels"))
        self.panels = [DensityPanel(i) for i in range(n)]
        row = QHBoxLayout()
        for panel in self.panels:
            row.addWidget(panel, 1)  # equal stretch: same-size panels
        # One colour bar for every panel: equal colours mean equal densities across runs.
        self.colorbar = pg.ColorBarItem(colorMap="viridis", interactive=False, width=14)
        self.colorbar.setImageItem([p.image for p in self.panels])
        self.colorbar.axis.enableAutoSIPrefix(False)  # densities are small numbers; no "(x0.001)" in the label
        self.colorbar_plot = pg.GraphicsLayoutWidget()
        self.colorbar_plot.setFixedWidth(90)
        self.colorbar_plot.addItem(self.colorbar)
        row.addWidget(self.colorbar_plot)
        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(4, 4, 4, 4)
        top_layout.addLayout(bar)
        top_layout.addLayout(row, 1)
        self.curves = CompareCurvesView()
        for i, spec in enumerate(self.specs):
            self.curves.add_run(f"{run_letter(i)} {spec.name}")
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self.curves)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.setCentralWidget(splitter)
        self.resize(560 * n + 120, 900)

        self.train_action = self._action(
            "Train both" if n == 2 else "Train all", self.toggle_training, Qt.Key.Key_Space, "Start or pause every run"
        )
        self.step_action = self._action("Step", self.step_once, "F10", "Pause and run one training step of each run")
        self.close_action = self._action(
            "Close", self.close, QKeySequence.StandardKey.Close, "Stop both runs and close the comparison"
        )
        toolbar = self.addToolBar("Compare")
        toolbar.setObjectName("compare-toolbar")
        for action in (self.train_action, self.step_action, self.close_action):
            toolbar.addAction(action)
        self.share_label = QLabel(fair_share_text(n))
        self.share_label.setToolTip(
            "The runs' training steps never run at the same time; the next step goes to "
            "the run that has used the least training time (wall clock), so the run with "
            "cheaper steps makes more of them"
        )
        self.run_labels = [QLabel("") for _ in range(n)]
        status = self.statusBar()
        status.addWidget(self.share_label, 1)
        for i, label in enumerate(self.run_labels):
            label.setStyleSheet(f"color: {self.panels[i].color}; font-weight: bold;")
            status.addPermanentWidget(label)
        self.mode_box.currentIndexChanged.connect(self._redraw)
        self.overlay_box.toggled.connect(self._on_overlay)

    def _action(
        self,
        text: str,
        slot: Callable[[], object],
        shortcut: QKeySequence | QKeySequence.StandardKey | Qt.Key | str,
        tip: str,
    ) -> QAction:
        action = QAction(text, self)
        action.setShortcut(QKeySequence(shortcut))
        action.setShortcutContext(Qt.ShortcutContext.WindowShortcut)
        action.setToolTip(f"{tip} ({action.shortcut().toString()})")
        action.triggered.connect(lambda _checked=False: slot())
        self.addAction(action)
        return action

    def _connect(self, i: int, session: Session) -> None:
        session.built.connect(functools.partial(self._on_built, i))
        session.build_failed.connect(functools.partial(self._on_message, i, "error"))
        session.metrics.connect(functools.partial(self._on_metrics, i))
        session.frame.connect(functools.partial(self._on_frame, i))
        session.state_changed.connect(functools.partial(self._on_state, i))
        session.message.connect(functools.partial(self._on_message, i))

    def set_dark(self, dark: bool) -> None:
        colors = plot_colors(dark)
        for panel in self.panels:
            panel.set_colors(colors)
        self.curves.set_colors(colors)
        self.colorbar_plot.setBackground(colors.background)
        self.colorbar.axis.setPen(colors.foreground)
        self.colorbar.axis.setTextPen(colors.foreground)

    # -- run control -------------------------------------------------------------------------------------
    @property
    def training(self) -> bool:
        return any(state == TRAINING for state in self.states)

    def toggle_training(self) -> None:
        """Train / pause every run together (a comparison compares runs that train at the same time)."""
        pause = self.training
        for session in self.sessions:
            session.pause() if pause else session.start()

    def step_once(self) -> None:
        for session in self.sessions:
            session.step_once()

    # -- session signals ---------------------------------------------------------------------------------
    def _on_built(self, i: int, info: RunInfo) -> None:
        self.run_ids[i] = info.run_id
        self.steps[i] = info.step
        self.panels[i].set_run(info)
        self.curves.restart_run(i, f"{run_letter(i)} {info.spec.name}")
        self.curves.add_metrics(i, list(info.history))

    def _on_metrics(self, i: int, batch: list[StepMetrics]) -> None:
        if batch:
            self.curves.add_metrics(i, batch)
            self.steps[i] = batch[-1].step + 1

    def _on_frame(self, i: int, frame: object) -> None:
        try:
            if not isinstance(frame, ViewFrame) or frame.run_id != self.run_ids[i]:
                return  # a late frame of a discarded run
            self.panels[i].set_frame(frame)
            if frame.eval is not None:
                self.curves.add_eval(i, frame.eval)
            self._redraw()
        finally:
            self.sessions[i].frame_consumed()

    def _on_state(self, i: int, state: str) -> None:
        self.states[i] = state
        self.train_action.setText(
            "Pause" if self.training else ("Train both" if len(self.sessions) == 2 else "Train all")
        )
        self._update_status()

    def _on_message(self, i: int, level: str, text: str) -> None:
        if level in ("info", "warning", "error"):
            self.statusBar().showMessage(
                f"{run_letter(i)} {self.specs[i].name}: {text}", 15000 if level != "info" else 6000
            )

    # -- drawing -----------------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return str(self.mode_box.currentData())

    def levels(self) -> tuple[float, float] | None:
        """The colour levels every panel shows (from all runs' latest frames)."""
        return shared_levels([p.frame for p in self.panels], self.mode)

    def _redraw(self) -> None:
        levels = self.levels()
        if levels is None:
            return
        for panel in self.panels:
            panel.draw(self.mode, levels)
        self.colorbar.setLevels(levels)
        self.colorbar.axis.setLabel("log p(x) [nats]" if self.mode == "log-density" else "p(x)")

    def _on_overlay(self, on: bool) -> None:
        for panel in self.panels:
            panel.data_scatter.setVisible(on)

    def _update_status(self) -> None:
        for i, label in enumerate(self.run_labels):
            run = self.curves.runs[i]
            seconds = run.time_s[-1] if run.time_s else 0.0
            label.setText(f"{run_letter(i)}: step {self.steps[i]}, {seconds:.1f} s {self.states[i] or 'starting'}")

    # -- closing -----------------------------------------------------------------------------------------
    def is_alive(self) -> bool:
        """Whether any run's threads still run."""
        return any(session.is_alive() for session in self.sessions)

    def shutdown(self, timeout_s: float = 15.0) -> bool:
        """Stop every run (after its current step and frame) and wait; True if all ended in time."""
        self._closing = True
        self._status_timer.stop()
        for session in self.sessions:
            session.pause()  # no run starts a new turn while the others are being stopped
        return all([session.shutdown(timeout_s=timeout_s) for session in self.sessions])

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:  # noqa: N802 (Qt override)
        """Close with the studio window that opened this one."""
        if event.type() == QEvent.Type.Close and watched is self.parent():
            self.close()
        return super().eventFilter(watched, event)

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt override)
        if not self._closing and not self.shutdown():
            self.statusBar().showMessage("a run's threads did not stop in time")
        event.accept()
        super().closeEvent(event)
