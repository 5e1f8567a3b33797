"""Light and dark themes: a Fusion palette for the widgets and matching colours for the pyqtgraph plots."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication

__all__ = ["THEMES", "PlotColors", "apply_theme", "plot_colors"]

THEMES = ("system", "light", "dark")


class PlotColors:
    """Colours of plot backgrounds, axes and curves for one theme."""

    def __init__(self, dark: bool) -> None:
        self.dark = dark
        self.background = QColor("#1e1f22") if dark else QColor("#ffffff")
        self.foreground = QColor("#c8c8c8") if dark else QColor("#303030")
        self.train = QColor("#4aa3ff")
        self.test = QColor("#ff9f40")
        self.faint_alpha = 60


def _system_is_dark(app: QApplication) -> bool:
    hints = app.styleHints()
    scheme = getattr(hints, "colorScheme", None)  # Qt >= 6.5
    if scheme is not None:
        value = scheme()
        if value == Qt.ColorScheme.Dark:
            return True
        if value == Qt.ColorScheme.Light:
            return False
    # Unknown scheme (e.g. the offscreen platform): judge by the default palette's window colour.
    return app.style().standardPalette().color(QPalette.ColorRole.Window).lightness() < 128


def _dark_palette() -> QPalette:
    p = QPalette()
    base, window, text = QColor("#1e1f22"), QColor("#2b2d30"), QColor("#dfe1e5")
    role = QPalette.ColorRole
    for r, c in (
        (role.Window, window),
        (role.WindowText, text),
        (role.Base, base),
        (role.AlternateBase, window),
        (role.ToolTipBase, window),
        (role.ToolTipText, text),
        (role.Text, text),
        (role.Button, window),
        (role.ButtonText, text),
        (role.BrightText, QColor("#ff6b6b")),
        (role.Highlight, QColor("#3574f0")),
        (role.HighlightedText, QColor("#ffffff")),
        (role.Link, QColor("#589df6")),
        (role.PlaceholderText, QColor("#8c8f94")),
    ):
        p.setColor(r, c)
    disabled = QPalette.ColorGroup.Disabled
    for r in (role.WindowText, role.Text, role.ButtonText):
        p.setColor(disabled, r, QColor("#6f737a"))
    return p


def apply_theme(app: QApplication, mode: str = "system") -> bool:
    """Apply ``mode`` (``system``, ``light`` or ``dark``) to the application; return whether it is dark."""
    if mode not in THEMES:
        raise ValueError(f"theme: unknown value {mode!r}; choose one of {list(THEMES)}")
    app.setStyle("Fusion")  # the one style whose palette is fully honoured on every platform
    dark = _system_is_dark(app) if mode == "system" else mode == "dark"
    app.setPalette(_dark_palette() if dark else app.style().standardPalette())
    return dark


def plot_colors(dark: bool) -> PlotColors:
    return PlotColors(dark)


def style_plot(plot: Any, colors: PlotColors) -> None:
    """Background, and the left and bottom axes' lines and labels, of a pyqtgraph ``PlotWidget``."""
    plot.setBackground(colors.background)
    item = plot.getPlotItem()
    for name in ("left", "bottom"):
        item.getAxis(name).setPen(colors.foreground)
        item.getAxis(name).setTextPen(colors.foreground)


def style_legend(legend: Any, colors: PlotColors) -> None:
    """Text colour and a translucent backdrop of a pyqtgraph legend, so it stays readable where it covers a
    curve."""
    legend.setLabelTextColor(colors.foreground)
    backdrop = QColor(colors.background)
    backdrop.setAlpha(200)
    legend.setBrush(backdrop)
