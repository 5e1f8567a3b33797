"""Neural-network building blocks: activations, Lipschitz layers and the G networks."""

from .activations import ACTIVATIONS, CLipSwish, CPila, CReLU, LipSwish, Pila, get_activation
from .densenet import DenseNetG, JacobianNet, LipschitzMLP
from .lipschitz import SpectralLinear, update_lipschitz

__all__ = [
    "ACTIVATIONS",
    "CLipSwish",
    "CPila",
    "CReLU",
    "DenseNetG",
    "JacobianNet",
    "LipSwish",
    "LipschitzMLP",
    "Pila",
    "SpectralLinear",
    "get_activation",
    "update_lipschitz",
]
