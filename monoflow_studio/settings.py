"""The studio's persisted preferences as one typed record, read from and written to ``QSettings``.

Every preference has one name, one type, one default and one rule for what is valid, here. A stored value that is
missing, of the wrong type or outside its range (an older version's file, a hand edit) falls back to the default
instead of reaching a widget. The ``QSettings`` keys are the ones earlier versions wrote, so preferences survive
an upgrade.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings

from .theme import THEMES
from .views.curves import SMOOTHING_RANGE
from .views.density import MODES as DENSITY_MODES
from .views.samples import MODES as IMAGE_MODES
from .views.samples import SAMPLE_COUNTS, TEMPERATURE_RANGE
from .views.transport import DIRECTION_LABELS

__all__ = ["StudioSettings", "last_dir", "read_settings", "remember_dir", "window_layout", "write_settings"]


@dataclass(frozen=True)
class StudioSettings:
    """The preferences the studio restores at start-up.

    Attributes:
        theme: ``"system"``, ``"light"`` or ``"dark"``.
        density_mode: what the 2-D view shows (``density``, ``log-density``, ``samples``, ``data``).
        overlay: whether the data are drawn over the density.
        show_samples: whether model samples are drawn over the density.
        smoothing: the loss curve's smoothing weight, in the curves view's ``SMOOTHING_RANGE``.
        log_y: whether the loss axis is logarithmic.
        transport_direction: ``"forward"`` (data to noise) or ``"inverse"``.
        images_mode: what the image view shows (``samples`` or ``data``).
        images_count: images per sample grid, one of the view's offered counts.
        images_temperature: the image samples' temperature, in the samples view's ``TEMPERATURE_RANGE``.
    """

    theme: str = "system"
    density_mode: str = "density"
    overlay: bool = False
    show_samples: bool = False
    smoothing: float = 0.9
    log_y: bool = False
    transport_direction: str = "forward"
    images_mode: str = "samples"
    images_count: int = 64
    images_temperature: float = 1.0


def _choice(options: tuple[str, ...] | list[str]) -> Callable[[Any], str | None]:
    return lambda v: str(v) if str(v) in options else None


def _flag(v: Any) -> bool | None:
    # QSettings' INI backend hands booleans back as the strings "true" / "false".
    if isinstance(v, bool):
        return v
    return {"true": True, "false": False}.get(str(v).lower())


def _number_in(lo: float, hi: float) -> Callable[[Any], float | None]:
    def parse(v: Any) -> float | None:
        try:
            x = float(v)
        except (TypeError, ValueError):
            return None
        return x if math.isfinite(x) and lo <= x <= hi else None

    return parse


def _count(v: Any) -> int | None:
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n if n in SAMPLE_COUNTS else None


# field -> (QSettings key, parser returning None for an invalid stored value)
_FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "theme": ("theme", _choice(THEMES)),
    "density_mode": ("view/mode", _choice(DENSITY_MODES)),
    "overlay": ("view/overlay", _flag),
    "show_samples": ("view/samples", _flag),
    "smoothing": ("curves/smoothing", _number_in(*SMOOTHING_RANGE)),
    "log_y": ("curves/log_y", _flag),
    "transport_direction": ("transport/direction", _choice(list(DIRECTION_LABELS))),
    "images_mode": ("images/mode", _choice(IMAGE_MODES)),
    "images_count": ("images/count", _count),
    "images_temperature": ("images/temperature", _number_in(*TEMPERATURE_RANGE)),
}
assert set(_FIELDS) == {f.name for f in dataclasses.fields(StudioSettings)}


def read_settings(store: QSettings, defaults: StudioSettings | None = None) -> StudioSettings:
    """The stored preferences; each missing or invalid value is replaced by its value in ``defaults``."""
    values: dict[str, Any] = dataclasses.asdict(defaults or StudioSettings())
    for name, (key, parse) in _FIELDS.items():
        raw = store.value(key)
        parsed = None if raw is None else parse(raw)
        if parsed is not None:
            values[name] = parsed
    return StudioSettings(**values)


def write_settings(store: QSettings, settings: StudioSettings, *fields: str) -> None:
    """Stores ``fields`` of ``settings`` (all of them when none are named).

    Raises:
        ValueError: a value that :func:`read_settings` would refuse (a bug in the caller, not a user error).
    """
    for name in fields or tuple(_FIELDS):
        key, parse = _FIELDS[name]
        value = getattr(settings, name)
        if parse(value) is None:
            raise ValueError(f"studio settings: {name} = {value!r} is not a valid value")
        store.setValue(key, value)


def window_layout(store: QSettings) -> tuple[QByteArray | bytes | None, QByteArray | bytes | None]:
    """The saved window geometry and dock state (each None when absent or not a byte array)."""
    geometry, state = store.value("window/geometry"), store.value("window/state")
    return (
        geometry if isinstance(geometry, QByteArray | bytes) else None,
        state if isinstance(state, QByteArray | bytes) else None,
    )


def last_dir(store: QSettings, kind: str) -> str:
    """The folder a file dialog of ``kind`` (e.g. ``"checkpoints"``) last used; the home folder at first."""
    return str(store.value(f"dirs/{kind}", str(Path.home())))


def remember_dir(store: QSettings, kind: str, path: str) -> None:
    """Remembers the folder of ``path`` for the next file dialog of ``kind``."""
    store.setValue(f"dirs/{kind}", str(Path(path).parent))
