"""monoflow_core: an exact, fast PyTorch engine for Monotone Flows (Ahn et al., NeurIPS 2022).

The public surface is deliberately small; everything else lives in submodules (``solvers``, ``logdet``,
``nn``, ...). This package never imports Qt.
"""

from .blocks import ActNorm, InverseResidualBlock, MonotoneBlock, PositiveScale, ResidualBlock
from .config import FlowConfig
from .flow import Flow
from .models import build_flow
from .nn.activations import CLipSwish, CPila, CReLU, LipSwish, Pila
from .nn.lipschitz import update_lipschitz

__version__ = "0.1.0"

__all__ = [
    "ActNorm",
    "CLipSwish",
    "CPila",
    "CReLU",
    "Flow",
    "FlowConfig",
    "InverseResidualBlock",
    "LipSwish",
    "MonotoneBlock",
    "Pila",
    "PositiveScale",
    "ResidualBlock",
    "__version__",
    "build_flow",
    "update_lipschitz",
]
