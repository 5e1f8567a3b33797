"""Where the shipped data lives: presets and example models, installed as the package ``monoflow_assets``.

The repository keeps them in its top-level ``assets/`` folder; ``pyproject.toml`` installs that folder as the
package ``monoflow_assets`` (for a wheel as for an editable install), so they are found through
:mod:`importlib.resources` wherever monoflow is installed, and never by a path relative to the source tree.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

__all__ = ["ASSETS_DIR_ENV", "assets_dir"]

#: Environment variable that points at another assets folder (with ``presets/`` and ``models/`` inside).
ASSETS_DIR_ENV = "MONOFLOW_ASSETS_DIR"


def assets_dir() -> Path:
    """The folder holding ``presets/`` and ``models/``: ``$MONOFLOW_ASSETS_DIR``, else the installed package's."""
    env = os.environ.get(ASSETS_DIR_ENV)
    if env:
        return Path(env)
    try:
        return Path(str(importlib.resources.files("monoflow_assets")))
    except ModuleNotFoundError:
        # Run from a source tree that was never installed (e.g. `python -m monoflow_core` from a checkout).
        return Path(__file__).resolve().parent.parent / "assets"
