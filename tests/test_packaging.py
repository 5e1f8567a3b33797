"""The package list in pyproject.toml covers every package, and the shipped assets are found through it."""

from __future__ import annotations

from pathlib import Path

import pytest

from monoflow_core.assets import assets_dir

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("monoflow_core", "monoflow_studio")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found <= listed, f"packages missing from pyproject.toml's [tool.setuptools] packages: {found - listed}"
    assert config["package-dir"]["monoflow_assets"] == "assets"


def test_assets_resolve_to_the_shipped_folder():
    folder = assets_dir()
    # The installed package's folder holds what the repository's assets/ holds (the same folder in an editable
    # install, a copy in a wheel install).
    shipped = {p.relative_to(ROOT / "assets").as_posix() for p in (ROOT / "assets").rglob("*.json")}
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*.json")}
    assert shipped and shipped == found
