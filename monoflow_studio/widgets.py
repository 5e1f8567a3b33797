"""Small reusable widgets."""

from __future__ import annotations

import math
from typing import Any

from PySide6.QtGui import QValidator
from PySide6.QtWidgets import QDoubleSpinBox, QWidget

__all__ = ["LogSpinBox", "set_axis_label"]


def set_axis_label(axis: Any, text: str) -> None:
    """``axis.setLabel(text)`` for a pyqtgraph ``AxisItem``, skipped when it already shows ``text``.

    Setting a label re-lays out the axis and repaints it; views that refresh live set the same label again and
    again, and the GUI thread paid for each.
    """
    if axis.labelText != text:
        axis.setLabel(text)


class LogSpinBox(QDoubleSpinBox):
    """A spin box for positive values spanning decades (learning rates, tolerances).

    Shows scientific notation (``1e-06``), steps multiplicatively (``factor`` per arrow press) and refuses text
    outside ``[minimum, maximum]`` (the validator answers *Intermediate*, so an out-of-range value can never be
    committed).
    """

    def __init__(
        self, minimum: float, maximum: float, value: float, factor: float = 10**0.25, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self._factor = factor
        self.setDecimals(15)  # the base class rounds to `decimals`; keep all digits of tiny values
        self.setRange(minimum, maximum)
        self.setValue(value)
        self.setKeyboardTracking(False)  # apply on Enter / focus loss, not on every keystroke

    def textFromValue(self, value: float) -> str:  # noqa: N802 (Qt override)
        return f"{value:.3g}"

    def valueFromText(self, text: str) -> float:  # noqa: N802 (Qt override)
        try:
            return float(text)
        except ValueError:
            return self.value()

    def validate(self, text: str, pos: int) -> tuple[QValidator.State, str, int]:
        stripped = text.strip()
        try:
            value = float(stripped)
        except ValueError:
            # Partial input such as "1e" or "" may still become valid.
            ok = all(c in "0123456789.eE+-" for c in stripped)
            return (QValidator.State.Intermediate if ok else QValidator.State.Invalid), text, pos
        if not math.isfinite(value) or not self.minimum() <= value <= self.maximum():
            return QValidator.State.Intermediate, text, pos
        return QValidator.State.Acceptable, text, pos

    def fixup(self, text: str) -> str:
        return self.textFromValue(self.value())

    def stepBy(self, steps: int) -> None:  # noqa: N802 (Qt override)
        value = self.value() * self._factor**steps
        self.setValue(min(max(value, self.minimum()), self.maximum()))
        self.editingFinished.emit()
