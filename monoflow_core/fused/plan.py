"""Which blocks the fused path takes (eligibility), in which runs, and the activations it folds."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias, TypeGuard, cast

from torch import Tensor, nn

from ..blocks import InverseResidualBlock, MonotoneBlock, ResidualBlock
from ..logdet import resolve_logdet_mode
from ..nn.activations import CLipSwish, CPila, CReLU
from ..nn.densenet import DenseNetG
from ..nn.lipschitz import SpectralLinear
from ..solvers import resolve_method

__all__ = [
    "FAST_MAX_DIM",
    "LOG2E",
    "PILA_K",
    "SQRT2",
    "ActivationSpec",
    "FusedBlock",
    "RunPlan",
    "activation_spec",
    "bias_of",
    "fast_eligible",
    "fusable_runs",
    "linears",
    "net_of",
]

#: Largest event dimension handled by the fused path (tangent cost grows with n).
FAST_MAX_DIM = 8
SQRT2 = math.sqrt(2.0)
#: Pila's k in CPila.
PILA_K = 5.0
#: Folded into Pila's pre-activations with k so that ``e^(k x)`` is one ``exp2`` (twice as fast as ``exp`` here).
LOG2E = 1.0 / math.log(2.0)

#: The blocks the fused path runs (with a :class:`~monoflow_core.nn.densenet.DenseNetG` as G, see
#: :func:`fast_eligible`).
FusedBlock: TypeAlias = MonotoneBlock | ResidualBlock | InverseResidualBlock


class ActivationSpec(NamedTuple):
    """A concatenated activation the fused path folds: its input shift, its output scale, and its kind."""

    shift: float
    scale: float
    kind: str  # "pila", "relu" or "swish"


_FUSED_ACTIVATIONS: dict[type, ActivationSpec] = {
    CPila: ActivationSpec(CPila.shift, CPila.scale, "pila"),
    CReLU: ActivationSpec(0.0, 1.0, "relu"),
    CLipSwish: ActivationSpec(0.0, 1.0 / CLipSwish.divisor, "swish"),
}


def linears(net: DenseNetG) -> list[SpectralLinear]:
    """The spectrally normalised layers of ``net``: the dense layers, then the final one."""
    return list(_NET_FACTS.layers(net))


def _linears_of(net: DenseNetG) -> tuple[SpectralLinear, ...]:
    return tuple(cast(SpectralLinear, lin) for lin in [*net.layers, net.final])


def bias_of(lin: SpectralLinear) -> Tensor:
    """The bias of a layer of the project's DenseNet G (which always has one: the fold carries it in its weights)."""
    assert lin.bias is not None, "the fused path folds layers with a bias"
    return lin.bias


def net_of(block: FusedBlock) -> DenseNetG:
    """The G of a block that :func:`fast_eligible` accepted."""
    return cast(DenseNetG, block.net)


class _NetFacts:
    """What the fused path looks up about a network on every forward pass, fixed once the network is built: its
    activation spec and its weight shapes, and its linear layers (kept per network while it lives; walking the
    modules' attributes cost more than the lookups, ~30 per training step)."""

    def __init__(self) -> None:
        self._facts: weakref.WeakKeyDictionary[DenseNetG, tuple[ActivationSpec | None, tuple[tuple[int, ...], ...]]] = (
            weakref.WeakKeyDictionary()
        )
        self._layers: weakref.WeakKeyDictionary[DenseNetG, tuple[SpectralLinear, ...]] = weakref.WeakKeyDictionary()

    def get(self, net: DenseNetG) -> tuple[ActivationSpec | None, tuple[tuple[int, ...], ...]]:
        facts = self._facts.get(net)
        if facts is None:
            shapes = tuple(tuple(lin.weight.shape) for lin in self.layers(net))
            facts = self._facts[net] = (_activation_spec_of(net), shapes)
        return facts

    def layers(self, net: DenseNetG) -> tuple[SpectralLinear, ...]:
        found = self._layers.get(net)
        if found is None:
            found = self._layers[net] = _linears_of(net)
        return found


_NET_FACTS = _NetFacts()


def _activation_spec_of(net: DenseNetG) -> ActivationSpec | None:
    specs = {_FUSED_ACTIVATIONS.get(type(a)) for a in net.activations}
    if len(specs) != 1 or None in specs:
        return None
    if any(getattr(a, "k", PILA_K) != PILA_K for a in net.activations):
        return None
    return next(iter(specs))


def activation_spec(net: DenseNetG) -> ActivationSpec | None:
    """The network's activation if the fused path folds it, else None."""
    return _NET_FACTS.get(net)[0]


def fast_eligible(block: nn.Module, dim: int) -> TypeGuard[FusedBlock]:
    """Whether a block can run on the fused path for inputs of event dimension ``dim``.

    A monotone, residual or inverse residual block whose G is the project's DenseNet G with a folded activation, in
    at most :data:`FAST_MAX_DIM` dimensions, with the exact log-det, Newton's method and the one-step implicit
    gradient.
    """
    if not isinstance(block, MonotoneBlock | ResidualBlock | InverseResidualBlock):
        return False
    net = block.net
    if not isinstance(net, DenseNetG) or activation_spec(net) is None or dim > FAST_MAX_DIM:
        return False
    # "hybrid" means the estimator in training: the generic path implements it.
    hybrid = block.logdet_mode == "hybrid"
    if net.in_features != dim or hybrid or resolve_logdet_mode(block.logdet_mode, dim) != "exact":
        return False
    return resolve_method(block.solver, dim) == "newton" and block.implicit_grad != "backward_solve"


def _same_architecture(a: DenseNetG, b: DenseNetG) -> bool:
    return _NET_FACTS.get(a) == _NET_FACTS.get(b) and [lin.mode for lin in _NET_FACTS.layers(a)] == [
        lin.mode for lin in _NET_FACTS.layers(b)
    ]


def fusable_runs(blocks: Sequence[nn.Module], dim: int) -> list[tuple[int, int]]:
    """Maximal index ranges ``[start, stop)`` of consecutive eligible blocks of one architecture."""
    runs: list[tuple[int, int]] = []
    start: int | None = None
    first: FusedBlock | None = None  # the block at ``start``
    for i, blk in enumerate(blocks):
        if fast_eligible(blk, dim):
            if first is not None and start is not None and not _same_architecture(net_of(first), net_of(blk)):
                runs.append((start, i))
                start, first = i, blk
            elif start is None:
                start, first = i, blk
        elif start is not None:
            runs.append((start, i))
            start = first = None
    if start is not None:
        runs.append((start, len(blocks)))
    return runs


@dataclass
class RunPlan:
    """A run of eligible blocks of one architecture, with its dimension and activation kind."""

    blocks: list[FusedBlock]
    n: int
    kind: str
