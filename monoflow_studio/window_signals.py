"""The main window's answers to its session's signals: :class:`SessionSignals`, one of :class:`MainWindow`'s base
classes.

A new run switches the views to its kind (2-D: density and transport; images: sample grid and bits/dim); metrics,
frames, tests and messages go to the views, the log and the status bar. Frames of a discarded run are dropped, and
the session is told when a frame is on screen (it computes the next one only then).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from monoflow_core.data import POINTS_DATA
from monoflow_core.devices import resolve_device
from monoflow_core.training import EvalMetrics, StepMetrics

from .frames import ImageFrame, RunInfo, TransportFrame, ViewFrame
from .run_spec import RunSpec
from .session_options import PAUSED, TRAINING
from .views.curves import BITS_PER_DIM, NATS

if TYPE_CHECKING:  # annotations only
    from PySide6.QtGui import QAction
    from PySide6.QtWidgets import QDockWidget, QLabel, QStackedWidget

    from .controls import ControlsPanel
    from .session import Session
    from .views.curves import CurvesView
    from .views.density import DensityView
    from .views.diagnostics import SolverView
    from .views.log import LogView
    from .views.samples import SamplesView
    from .views.transport import TransportView

__all__ = ["NO_TRANSPORT", "REJECTIONS_LOGGED", "SOLVER_WARNING_EVERY_S", "SessionSignals"]

#: Solver-failure warnings are logged at most this often (seconds); every step reports them.
SOLVER_WARNING_EVERY_S = 5.0
#: Rejected (non-finite) steps logged one by one per run before only every 100th is logged.
REJECTIONS_LOGGED = 5
#: Shown in the transport dock (and its tooltips) while an image run is loaded.
NO_TRANSPORT = (
    "The transport view shows how a 2-D run deforms the plane, layer by layer. An image run maps "
    "images with many dimensions: see its samples in the main view. Load a 2-D preset to use it."
)


class SessionSignals:
    """Connects the session's signals to the views (a base class of :class:`~monoflow_studio.main_window.MainWindow`,
    which sets the attributes declared here before :meth:`_connect_session`)."""

    # Set by MainWindow.
    session: Session
    spec: RunSpec
    step: int
    state: str
    run_id: int
    device: str
    image_mode: bool
    _closing: bool
    _rejections: int
    _last_solver_warning: float
    _rates: collections.deque[tuple[float, int]]
    _transport_sent: str | None
    _transport_visible: bool
    _step_before_rebuild: int
    central: QStackedWidget
    controls: ControlsPanel
    density: DensityView
    samples: SamplesView
    curves: CurvesView
    solver_view: SolverView
    transport: TransportView
    log: LogView
    transport_dock: QDockWidget
    train_action: QAction
    evaluate_action: QAction
    export_view_action: QAction
    step_label: QLabel
    rate_label: QLabel
    device_label: QLabel
    state_label: QLabel
    _save_view_settings: Callable[[], None]

    def _connect_session(self) -> None:
        s = self.session
        s.built.connect(self._on_built)
        s.build_failed.connect(self._on_build_failed)
        s.metrics.connect(self._on_metrics)
        s.frame.connect(self._on_frame)
        s.transport.connect(self._on_transport)
        s.evaluated.connect(self._on_evaluated)
        s.eval_progress.connect(self._on_eval_progress)
        s.state_changed.connect(self._on_state)
        s.message.connect(self._on_message)
        s.checkpoint_saved.connect(lambda path: self._on_message("info", f"checkpoint saved to {path}"))
        s.lr_applied.connect(lambda lr: self.log.add("info", f"learning rate now {lr:.3g} (live, no rebuild)"))

    def _on_built(self, info: RunInfo) -> None:
        self.run_id = info.run_id
        self.spec = info.spec.copy()
        self.step = info.step
        self.device = info.device
        self._rejections = 0
        self._rates.clear()
        self.controls.set_spec(info.spec)
        image = info.task == "image"
        self._set_image_mode(image)
        if image:
            self.samples.set_run(info)
        else:
            self.density.set_run(info)
            self.transport.set_run(info)
        label = f"run {info.run_id}: {info.spec.training.data}" + (
            f" ({Path(info.source).name})" if info.source != "new" else ""
        )
        self.curves.new_run(info.run_id, label, info.history, info.eval_history, unit=BITS_PER_DIM if image else NATS)
        self.solver_view.set_diagnostics([], info.step)
        self.device_label.setText(f"device {info.device}")
        self._update_title()
        self._update_status()
        text = f"{label}: {info.spec.describe_model()}, step {info.step}, on {info.device}"
        if info.source == "new":
            auto_device, reason = resolve_device(None, info.spec.model)
            text += f" ({reason})" if auto_device == info.device else " (chosen in the device menu)"
        if info.spec.points is not None and info.spec.training.data == POINTS_DATA:
            text += f"; data {info.spec.points.describe()}"
        if image:
            t = info.spec.training
            text += (
                f"; training loss in bits/dim; tests every {info.eval_every} steps on {t.eval_size} "
                f"{t.eval_split} images"
            )
        self.log.add("info", text)

    def _set_image_mode(self, image: bool) -> None:
        """Show the views of an image run (sample grid, bits/dim) or of a 2-D run (density, transport)."""
        self.image_mode = image
        self.central.setCurrentWidget(self.samples if image else self.density)
        self.transport.set_available(not image, NO_TRANSPORT)
        self.transport_dock.setToolTip(NO_TRANSPORT if image else "")
        self.evaluate_action.setVisible(image)
        self.evaluate_action.setEnabled(image)
        self.export_view_action.setStatusTip(
            "Save the sample grid as a PNG or SVG image" if image else "Save the main view as a PNG or SVG image"
        )

    def _on_build_failed(self, text: str) -> None:
        """A rebuild failed (e.g. an image set's files are missing): say why; the current run goes on as it was."""
        self._on_message("error", text)
        self.step = self._step_before_rebuild
        self.controls.set_spec(self.spec)

    def _on_evaluated(self, run_id: int, ev: EvalMetrics) -> None:
        if run_id != self.run_id:
            return
        self.curves.add_eval(ev)
        self.curves.set_test_status("")
        self._on_message("info", ev.describe())

    def _on_eval_progress(self, run_id: int, step: int, done: int, total: int) -> None:
        if run_id == self.run_id:
            self.curves.set_test_status(f"testing step {step}: {done}/{total} images" if done < total else "")

    def _on_metrics(self, batch: list[StepMetrics]) -> None:
        if not batch:
            return
        self.curves.add_metrics(batch)
        self.step = batch[-1].step + 1
        self._rates.append((time.perf_counter(), self.step))
        for m in batch:
            if m.rejected:
                self._rejections += 1
                if self._rejections <= REJECTIONS_LOGGED or self._rejections % 100 == 0:
                    self._on_message("warning", f"{m.message} (rejected steps so far: {self._rejections})")
        failed = [m for m in batch if m.solver_failed]
        now = time.perf_counter()
        if failed and now - self._last_solver_warning >= SOLVER_WARNING_EVERY_S:
            self._last_solver_warning = now
            m = failed[-1]
            self._on_message(
                "warning",
                f"step {m.step}: {m.solver_failed} sample(s) missed the solver tolerance "
                f"(max {m.solver_iterations_max} iterations); raise the iteration cap or "
                "loosen the tolerance",
            )

    def _on_frame(self, frame: ViewFrame | ImageFrame) -> None:
        try:
            if frame.run_id != self.run_id:
                return  # a late frame of a discarded run
            if isinstance(frame, ImageFrame):
                self.samples.set_frame(frame)
            else:
                self.density.set_frame(frame)
            if frame.diagnostics:
                self.solver_view.set_diagnostics(frame.diagnostics, frame.step)
            if isinstance(frame, ViewFrame) and frame.eval is not None:
                self.curves.add_eval(frame.eval)
        finally:
            self.session.frame_consumed()

    def _on_transport(self, frame: TransportFrame) -> None:
        if frame.run_id == self.run_id:
            self.transport.set_transport(frame)

    def _on_transport_visibility(self, visible: bool) -> None:
        self._transport_visible = bool(visible)
        self._update_transport()

    def _on_transport_direction(self, _direction: str) -> None:
        self._update_transport()
        self._save_view_settings()

    def _update_transport(self) -> None:
        """Tell the session which transport the view needs: its direction while visible, else none."""
        if self._closing:
            return
        wanted = self.transport.direction if self._transport_visible else None
        if wanted != self._transport_sent:
            self._transport_sent = wanted
            self.session.set_transport(wanted)

    def _on_state(self, state: str) -> None:
        self.state = state
        self.train_action.setText("Pause" if state == TRAINING else "Train")
        self.state_label.setText(state)
        self.controls.set_enabled_for_run(state in (PAUSED, TRAINING))
        if state == "stopped" and not self._closing:
            self._on_message("error", "the training worker stopped")

    def _on_message(self, level: str, text: str) -> None:
        self.log.add(level, text)
        if level in ("info", "warning", "error"):
            self.statusBar().showMessage(text, 15000 if level != "info" else 6000)

    def _update_status(self) -> None:
        self.step_label.setText(f"step {self.step}")
        rate = 0.0
        if self.state == TRAINING and len(self._rates) >= 2:
            # Rate over the last ~3 s of metric batches.
            now = self._rates[-1][0]
            old = next((r for r in self._rates if now - r[0] <= 3.0), self._rates[0])
            dt = now - old[0]
            rate = (self._rates[-1][1] - old[1]) / dt if dt > 0 else 0.0
        self.rate_label.setText(f"{rate:.1f} it/s")

    def _update_title(self) -> None:
        self.setWindowTitle(f"monoflow studio: {self.spec.name} on {self.spec.training.data}")
