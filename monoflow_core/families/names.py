"""The names of the flow families, their sources, and a one-line description of a configured model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import FlowConfig

__all__ = ["COMPARISON_FAMILIES", "FAMILIES", "FAMILY_INFO", "IMPLICIT", "FamilyInfo", "describe_family"]

#: The paper's family: monotone, residual or inverse-residual blocks around a Lipschitz G (``formulation``).
IMPLICIT = "implicit"


@dataclass(frozen=True)
class FamilyInfo:
    """What a comparison family is and where it comes from.

    Attributes:
        label: the family's usual name.
        layer: what one of its ``blocks`` is.
        source: the paper that introduced it.
    """

    label: str
    layer: str
    source: str


#: The comparison families (docs/families.md), all built from zuko.
FAMILY_INFO: dict[str, FamilyInfo] = {
    "realnvp": FamilyInfo(
        "Real NVP",
        "affine couplings",
        "Dinh, Sohl-Dickstein & Bengio, Density estimation using Real NVP, ICLR 2017, arXiv:1605.08803",
    ),
    "glow": FamilyInfo(
        "Glow",
        "steps (ActNorm, LU 1x1 mixing, affine coupling)",
        "Kingma & Dhariwal, Glow: Generative flow with invertible 1x1 convolutions, NeurIPS 2018, arXiv:1807.03039",
    ),
    "nsf": FamilyInfo(
        "Neural spline flow",
        "rational-quadratic spline autoregressive transforms",
        "Durkan, Bekasov, Murray & Papamakarios, Neural spline flows, NeurIPS 2019, arXiv:1906.04032",
    ),
    "maf": FamilyInfo(
        "MAF",
        "affine MADE transforms",
        "Papamakarios, Pavlakou & Murray, Masked autoregressive flow for density estimation, "
        "NeurIPS 2017, arXiv:1705.07057",
    ),
    "cnf": FamilyInfo(
        "CNF (FFJORD)",
        "continuous flows (ODEs)",
        "Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, FFJORD: Free-form continuous dynamics "
        "for scalable reversible generative models, ICLR 2019, arXiv:1810.01367",
    ),
}

#: Every family a :class:`~monoflow_core.config.FlowConfig` may name, the default (implicit) first.
FAMILIES: tuple[str, ...] = (IMPLICIT, *FAMILY_INFO)

#: The families other than the paper's.
COMPARISON_FAMILIES: tuple[str, ...] = tuple(FAMILY_INFO)


def describe_family(config: FlowConfig) -> str:
    """A short description of a comparison family's model, e.g. ``"Real NVP: 8 affine couplings, MLP 24x24"``."""
    info = FAMILY_INFO[config.family]
    width = "x".join(str(h) for h in config.hidden)
    extra = f", {config.bins} bins" if config.family == "nsf" else ""
    return f"{info.label}: {config.blocks} {info.layer}, MLP {width}{extra}"
