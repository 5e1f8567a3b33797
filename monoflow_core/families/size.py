"""Sizes of the comparison families' flows, counted from their configuration without building them.

Used by the memory estimates of :mod:`monoflow_core.resources` and by the checkpoint loader, which refuses a
stored configuration whose flow would hold more numbers than the file stores before it builds anything. The
counts follow the structure :mod:`.build` gives each family (zuko's networks); tests/core/test_families.py
compares them with built flows.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import FlowConfig

__all__ = ["ODE_TIME_FREQUENCIES", "family_size", "family_state_numbers", "family_widths"]

#: Frequencies of the CNF's time embedding (zuko's ``FFJTransform`` default): ``f(t, x)`` sees ``x`` and the
#: ``cos`` and ``sin`` of ``k pi t`` for ``k = 1..3``.
ODE_TIME_FREQUENCIES = 3


def _mlp(n_in: int, n_out: int, hidden: Sequence[int]) -> tuple[int, int]:
    """Parameters and modules of an MLP (zuko's ``MLP`` or ``MaskedMLP``): linear layers, an activation after
    each hidden one, and the sequential container."""
    widths = [n_in, *hidden, n_out]
    params = sum(a * b + b for a, b in pairwise(widths))
    return params, 1 + (len(widths) - 1) + len(hidden)


def family_widths(config: FlowConfig, block: int) -> tuple[int, int]:
    """Input and output widths of block ``block``'s network (hyper-network, MADE or ODE network)."""
    d, family = config.dim, config.family
    if family in ("realnvp", "glow"):
        # Real NVP alternates halves (zuko conditions on the even coordinates first); Glow keeps the odd ones.
        conditioning = (d + 1) // 2 if family == "realnvp" and block % 2 == 0 else d // 2
        return conditioning, 2 * (d - conditioning)  # a shift and a scale per transformed coordinate
    if family == "maf":
        return d, 2 * d
    if family == "nsf":
        return d, d * (3 * config.bins - 1)  # widths, heights (bins each) and inner derivatives (bins - 1)
    return d + 2 * ODE_TIME_FREQUENCIES, d  # cnf


def _block_size(config: FlowConfig, block: int) -> tuple[int, int, int]:
    """``(parameters, buffer elements, modules)`` of block ``block``."""
    d, family = config.dim, config.family
    n_in, n_out = family_widths(config, block)
    params, modules = _mlp(n_in, n_out, config.hidden)
    modules += 2  # the layer and zuko's lazy transformation inside it
    if family in ("realnvp", "glow"):
        buffers = d  # the coupling mask
    elif family in ("maf", "nsf"):
        buffers = d + params - (n_out + sum(config.hidden))  # the order; a mask per weight matrix
    else:
        buffers = 2 + ODE_TIME_FREQUENCIES  # the integration times and the time frequencies
    if family == "glow":
        params += 2 * d + d * d  # ActNorm; the packed L and U
        buffers += 1 + d  # ActNorm's flag; the permutation
        modules += 2
    return params, buffers, modules


def family_size(config: FlowConfig) -> tuple[int, int, int]:
    """``(parameters, buffer elements, modules)`` of ``build_flow(config)`` for a comparison family.

    Blocks differ only by their parity (Real NVP's alternating halves), so the count costs the same for any
    number of blocks.
    """
    even, odd = (config.blocks + 1) // 2, config.blocks // 2
    first, second = _block_size(config, 0), _block_size(config, 1)
    params, buffers, modules = (even * a + odd * b for a, b in zip(first, second, strict=True))
    return params, buffers + 1, modules + 2  # the flow (its anchor buffer) and its layer list


def family_state_numbers(config: FlowConfig) -> int:
    """Elements of the flow's ``state_dict`` (parameters and persistent buffers): what a checkpoint of it stores."""
    params, buffers, _ = family_size(config)
    return params + buffers - 1  # (the flow's dtype anchor is not saved)
