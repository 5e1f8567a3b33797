"""The optional dependency of the comparison families: zuko, and the one-line message when it is missing."""

from __future__ import annotations

import importlib

__all__ = ["INSTALL_HINT", "MissingDependencyError", "require_zuko"]

#: How to install what the comparison families need.
INSTALL_HINT = "pip install 'monoflow[compare]' (or pip install zuko)"


class MissingDependencyError(ModuleNotFoundError, ValueError):
    """An optional package a requested feature needs is not installed.

    Also a ``ValueError``, so that the command line and the studio report it as they report a bad setting: one
    line saying what to install.
    """


def require_zuko(family: str) -> None:
    """Import zuko, or raise :class:`MissingDependencyError` naming the family and how to install it.

    Called before anything of :mod:`.build` or :mod:`.layers` (which import zuko) is used, so a missing zuko is
    reported the same way whether or not those modules were imported earlier in the process.
    """
    try:
        importlib.import_module("zuko")
    except ImportError:
        raise MissingDependencyError(
            f"family {family!r} needs the optional package zuko, which is not installed: {INSTALL_HINT}",
            name="zuko",
        ) from None
