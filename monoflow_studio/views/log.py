"""The log dock: a read-only, bounded, timestamped message list."""

from __future__ import annotations

import time

from PySide6.QtWidgets import QPlainTextEdit, QWidget

__all__ = ["LogView"]


class LogView(QPlainTextEdit):
    """Timestamped messages; keeps the last ``max_lines`` lines so a long session never grows unbounded."""

    def __init__(self, parent: QWidget | None = None, max_lines: int = 5000) -> None:
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(max_lines)

    def add(self, level: str, text: str) -> None:
        prefix = "" if level == "info" else f"[{level}] "
        self.appendPlainText(f"{time.strftime('%H:%M:%S')} {prefix}{text}")
