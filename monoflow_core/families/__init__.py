"""Comparison flow families: Real NVP, Glow, NSF, MAF and a CNF (FFJORD) beside the paper's implicit blocks.

The paper compares Monotone Flows with Real NVP, Glow and FFJORD (Ahn et al. 2022, Table 2, arXiv:2210.08176).
These families are built from the optional package `zuko <https://github.com/probabilists/zuko>`_
(``pip install 'monoflow[compare]'``) and are first-class flows of the engine: a
:class:`~monoflow_core.config.FlowConfig` with ``family`` set builds one with
:func:`~monoflow_core.models.build_flow`, and the trainer, checkpoints, the command line and the studio take it
like any other flow. docs/families.md describes each family, its source and the sizes of the shipped presets.

This package's ``__init__`` and :mod:`.names`, :mod:`.size` and :mod:`.dependency` import nothing heavy and never
zuko itself, so configurations naming a family validate (and checkpoints' headers are checked) without zuko;
:mod:`.build` and :mod:`.layers` need it.
"""

from .dependency import MissingDependencyError, require_zuko
from .names import COMPARISON_FAMILIES, FAMILIES, IMPLICIT, describe_family

__all__ = ["COMPARISON_FAMILIES", "FAMILIES", "IMPLICIT", "MissingDependencyError", "describe_family", "require_zuko"]
