"""The studio's typed preferences: round trip, old keys, and invalid stored values falling back to defaults."""

from __future__ import annotations

import dataclasses

import pytest
from PySide6.QtCore import QSettings

from monoflow_studio.settings import StudioSettings, read_settings, write_settings


def store(tmp_path) -> QSettings:
    return QSettings(str(tmp_path / "studio.ini"), QSettings.Format.IniFormat)


def test_round_trip_through_the_ini_backend(tmp_path):
    wanted = StudioSettings(
        theme="dark",
        density_mode="log-density",
        overlay=True,
        show_samples=True,
        smoothing=0.5,
        log_y=True,
        transport_direction="inverse",
        images_mode="data",
        images_count=100,
        images_temperature=0.7,
    )
    s = store(tmp_path)
    write_settings(s, wanted)
    s.sync()
    assert read_settings(store(tmp_path)) == wanted  # a fresh reader: the values went through the file


def test_keys_written_by_earlier_versions_are_read(tmp_path):
    s = store(tmp_path)
    for key, value in {
        "theme": "light",
        "view/mode": "data",
        "view/overlay": "true",
        "curves/log_y": "true",
        "curves/smoothing": "0.25",
        "images/count": "36",
        "transport/direction": "inverse",
    }.items():
        s.setValue(key, value)
    got = read_settings(s)
    assert (
        got.theme,
        got.density_mode,
        got.overlay,
        got.log_y,
        got.smoothing,
        got.images_count,
        got.transport_direction,
    ) == ("light", "data", True, True, 0.25, 36, "inverse")


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("theme", "purple", "theme"),
        ("view/mode", "3d", "density_mode"),
        ("view/overlay", "maybe", "overlay"),
        ("curves/smoothing", "1.5", "smoothing"),
        ("curves/smoothing", "nan", "smoothing"),
        ("images/count", "65", "images_count"),
        ("images/count", "many", "images_count"),
        ("images/temperature", "0", "images_temperature"),
        ("transport/direction", "sideways", "transport_direction"),
    ],
)
def test_an_invalid_stored_value_falls_back_to_the_default(tmp_path, key, value, field):
    s = store(tmp_path)
    s.setValue(key, value)
    defaults = StudioSettings(images_count=16)
    assert getattr(read_settings(s, defaults), field) == getattr(defaults, field)


def test_writing_an_invalid_value_is_refused_and_writes_nothing(tmp_path):
    s = store(tmp_path)
    with pytest.raises(ValueError, match="smoothing"):
        write_settings(s, dataclasses.replace(StudioSettings(), smoothing=2.0), "smoothing")
    assert s.value("curves/smoothing") is None


def test_writing_named_fields_leaves_the_others_alone(tmp_path):
    s = store(tmp_path)
    write_settings(s, StudioSettings(theme="dark", log_y=True))
    write_settings(s, StudioSettings(theme="light"), "theme")
    got = read_settings(s)
    assert got.theme == "light" and got.log_y is True
