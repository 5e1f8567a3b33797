"""Which blocks the fused path takes (eligibility), in which runs, and the activations it folds."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..logdet import resolve_logdet_mode
from ..nn.activations import CLipSwish, CPila, CReLU
from ..nn.densenet import DenseNetG
from ..solvers import resolve_method

#: Largest event dimension handled by the fused path (tangent cost grows with n).
FAST_MAX_DIM = 8
SQRT2 = math.sqrt(2.0)

# activation class -> (shift, output scale, kind)
_FAST_ACTIVATIONS: dict[type, tuple[float, float, str]] = {
    CPila: (CPila.shift, CPila.scale, "pila"),
    CReLU: (0.0, 1.0, "relu"),
    CLipSwish: (0.0, 1.0 / CLipSwish.divisor, "swish"),
}

_K = 5.0  # Pila's k in CPila
#: Folded into Pila's pre-activations with k so that ``e^(k x)`` is one ``exp2`` (twice as fast as ``exp`` here).
_LOG2E = 1.0 / math.log(2.0)


# net -> (activation spec, weight shapes): fixed once a network is built; looked up on every forward pass
_NET_FACTS: weakref.WeakKeyDictionary[DenseNetG, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _net_facts(net: DenseNetG) -> tuple[tuple[float, float, str] | None, tuple[tuple[int, ...], ...]]:
    facts = _NET_FACTS.get(net)
    if facts is None:
        facts = _NET_FACTS[net] = (
            _activation_spec_of(net),
            tuple(tuple(lin.weight.shape) for lin in [*net.layers, net.final]),
        )
    return facts


def _activation_spec_of(net: DenseNetG) -> tuple[float, float, str] | None:
    specs = {_FAST_ACTIVATIONS.get(type(a)) for a in net.activations}
    if len(specs) != 1 or None in specs:
        return None
    if any(getattr(a, "k", _K) != _K for a in net.activations):
        return None
    return next(iter(specs))


def _activation_spec(net: DenseNetG) -> tuple[float, float, str] | None:
    """``(shift, output scale, kind)`` of the network's activation if the fused path folds it, else None."""
    return _net_facts(net)[0]


def fast_eligible(block: Any, dim: int) -> bool:
    """Whether a block can run on the fused path for inputs of event dimension ``dim``."""
    from ..blocks import InverseResidualBlock, MonotoneBlock, ResidualBlock

    if not isinstance(block, MonotoneBlock | ResidualBlock | InverseResidualBlock):
        return False
    net = block.net
    if not isinstance(net, DenseNetG) or _activation_spec(net) is None or dim > FAST_MAX_DIM:
        return False
    # "hybrid" means the estimator in training: the generic path implements it.
    hybrid = block.logdet_mode == "hybrid"
    if net.in_features != dim or hybrid or resolve_logdet_mode(block.logdet_mode, dim) != "exact":
        return False
    return resolve_method(block.solver, dim) == "newton" and block.implicit_grad != "backward_solve"


def _same_architecture(a: DenseNetG, b: DenseNetG) -> bool:
    return _net_facts(a) == _net_facts(b) and [lin.mode for lin in [*a.layers, a.final]] == [
        lin.mode for lin in [*b.layers, b.final]
    ]


def fusable_runs(blocks: Sequence[Any], dim: int) -> list[tuple[int, int]]:
    """Maximal index ranges ``[start, stop)`` of consecutive eligible blocks of one architecture."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, blk in enumerate(blocks):
        ok = fast_eligible(blk, dim)
        if ok and start is not None and not _same_architecture(blocks[start].net, blk.net):
            runs.append((start, i))
            start = i
        elif ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(blocks)))
    return runs


@dataclass
class _Plan:
    blocks: list[Any]
    n: int
    kind: str
