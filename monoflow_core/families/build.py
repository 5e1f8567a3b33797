"""Building the comparison families from a :class:`~monoflow_core.config.FlowConfig` (docs/families.md).

Each family is a :class:`ComparisonFlow` (a :class:`~monoflow_core.flow.Flow`) over the standard normal base
density, whose layers (:mod:`.layers`) wrap zuko's transformations; their sizes come from ``blocks``, ``hidden``
(the widths of every hyper-network or ODE network) and, for the spline flow, ``bins``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..blocks import ActNorm
from ..flow import Flow
from .dependency import require_zuko
from .names import FAMILY_INFO

if TYPE_CHECKING:
    from ..config import FlowConfig

__all__ = ["ComparisonFlow", "build_family_flow"]


class ComparisonFlow(Flow):
    """A flow of a comparison family (:data:`~monoflow_core.families.names.COMPARISON_FAMILIES`).

    The same interface as every :class:`~monoflow_core.flow.Flow` (``forward``, ``inverse``, ``log_prob``,
    ``sample``); it has no implicit blocks, so :meth:`solver_stats` is empty and :attr:`logdet_is_exact` is True
    (every layer's log-determinant is exact; the CNF's up to its ODE tolerance). The fused path of
    :mod:`monoflow_core.fused` serves implicit blocks only and is off.

    Args:
        layers: the family's layers (:mod:`.layers`, and ActNorm for Glow).
        config: the configuration they were built from (its ``family`` names the family).
    """

    def __init__(self, layers: list[nn.Module], config: FlowConfig) -> None:
        super().__init__(layers, (config.dim,), config=config)
        self.family = config.family
        self.fast_path = False

    def set_solver_options(
        self, *, solver: str | None = None, tol: float | None = None, max_iter: int | None = None
    ) -> None:
        """As :meth:`Flow.set_solver_options`; ``tol`` is also the ODE tolerance of a CNF's layers."""
        super().set_solver_options(solver=solver, tol=tol, max_iter=max_iter)
        if tol is not None:
            from .layers import ContinuousFlow

            for layer in self.layers:
                if isinstance(layer, ContinuousFlow):
                    layer.tol = float(tol)

    def extra_repr(self) -> str:
        return f"family={self.family}"


def _hidden(config: FlowConfig) -> tuple[int, ...]:
    return tuple(config.hidden)


def _realnvp(config: FlowConfig) -> list[nn.Module]:
    """``blocks`` affine couplings with alternating halves (zuko's ``RealNVP``; its base density is not used)."""
    import zuko

    from .layers import AffineCoupling

    flow = zuko.flows.RealNVP(config.dim, transforms=config.blocks, hidden_features=_hidden(config))
    return [AffineCoupling(t) for t in flow.transform.transforms]


def _glow(config: FlowConfig) -> list[nn.Module]:
    """``blocks`` steps of ActNorm, LU mixing and an affine coupling (Kingma & Dhariwal 2018, Figure 2a).

    The coupling always transforms the same half: the learned mixing before it decides what that half holds.
    """
    from zuko.flows.coupling import GeneralCouplingTransform

    from .layers import AffineCoupling, LUMixing

    mask = torch.arange(config.dim) % 2 == 1  # the conditioning coordinates (a copy per block: a buffer each)
    layers: list[nn.Module] = []
    for _ in range(config.blocks):
        coupling = GeneralCouplingTransform(config.dim, mask=mask.clone(), hidden_features=_hidden(config))
        layers += [ActNorm(config.dim), LUMixing(config.dim), AffineCoupling(coupling)]
    return layers


def _maf(config: FlowConfig) -> list[nn.Module]:
    """``blocks`` affine MADE transforms, orders alternating (zuko's ``MAF``)."""
    import zuko

    from .layers import Autoregressive

    flow = zuko.flows.MAF(config.dim, transforms=config.blocks, hidden_features=_hidden(config))
    return [Autoregressive(t) for t in flow.transform.transforms]


def _nsf(config: FlowConfig) -> list[nn.Module]:
    """``blocks`` autoregressive rational-quadratic spline transforms of ``bins`` bins on [-5, 5], identity
    outside (zuko's ``NSF``; in 2-D, autoregressive is the same as coupling)."""
    import zuko

    from .layers import Autoregressive

    flow = zuko.flows.NSF(config.dim, transforms=config.blocks, bins=config.bins, hidden_features=_hidden(config))
    return [Autoregressive(t) for t in flow.transform.transforms]


def _cnf(config: FlowConfig) -> list[nn.Module]:
    """``blocks`` stacked continuous flows, each an ODE network (ELU MLP of widths ``hidden``) with exact traces."""
    from zuko.flows.continuous import FFJTransform

    from .layers import ContinuousFlow

    return [
        ContinuousFlow(FFJTransform(config.dim, hidden_features=_hidden(config), exact=True), config.tol)
        for _ in range(config.blocks)
    ]


_BUILDERS: dict[str, Callable[[FlowConfig], list[nn.Module]]] = {
    "realnvp": _realnvp,
    "glow": _glow,
    "nsf": _nsf,
    "maf": _maf,
    "cnf": _cnf,
}
assert set(_BUILDERS) == set(FAMILY_INFO)


def build_family_flow(config: FlowConfig) -> ComparisonFlow:
    """The flow of a comparison family (``config`` validated, ``config.family`` not ``"implicit"``).

    Inside ``torch.device("meta")`` (the checkpoint loader's shape-only build) the layers are built on the CPU and
    moved to the meta device: zuko computes its coupling and autoregressive masks from values, which meta tensors
    do not have. The loader first checks that the sizes are those of the stored tensors
    (:func:`~monoflow_core.families.size.family_state_numbers`), so this allocates no more than the file holds.

    Raises:
        MissingDependencyError: zuko is not installed (the message says how to install it).
    """
    require_zuko(config.family)
    builder = _BUILDERS[config.family]
    if torch.empty(0).device.type == "meta":
        with torch.device("cpu"):
            layers = builder(config)
        return ComparisonFlow(layers, config).to("meta")
    return ComparisonFlow(builder(config), config)
