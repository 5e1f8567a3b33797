"""The compiled kernels' codes for the fused path's activations and block kinds, and each block kind's setup."""

from __future__ import annotations

from . import kernels
from .plan import SQRT2

#: Activation kinds of the folded networks -> the compiled kernels' activation codes.
_KERNEL_ACTIVATIONS = {"pila": kernels.ACT_PILA, "relu": kernels.ACT_RELU, "swish": kernels.ACT_SWISH}

# The compiled kernels (monoflow_core.fused.kernels): per block of a run, how its solve and log-det are set up.
# kind -> (mode, rhs scale, output weight of the solution, output weight of the input, log|det A|, log|det(2I - A)|)
_KERNEL_FORWARD = {
    "residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 1.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, -1.0, 1.0),
    "inverse_residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, -1.0, 0.0),
}
# the inverses (no log-det): x = y + G(y) for an inverse residual block, otherwise solve w + sign G(w) = rhs
_KERNEL_INVERSE = {
    "inverse_residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 0.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, 0.0, 0.0),
    "residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, 0.0, 0.0),
}


_KERNEL_KINDS = {
    "residual": kernels.KIND_RESIDUAL,
    "monotone": kernels.KIND_MONOTONE,
    "inverse_residual": kernels.KIND_INVERSE_RESIDUAL,
}
