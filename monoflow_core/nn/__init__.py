"""Neural-network building blocks: activations, Lipschitz layers and the G networks."""

from .activations import ACTIVATIONS, CLipSwish, CPila, CReLU, LipSwish, Pila, get_activation
from .conv import ConvDenseNetG, SpectralConv2d
from .densenet import DenseNetG, JacobianNet, LipschitzMLP
from .lipschitz import SpectralLayer, SpectralLinear, spectral_layers, update_lipschitz

__all__ = [
    "ACTIVATIONS",
    "CLipSwish",
    "CPila",
    "CReLU",
    "ConvDenseNetG",
    "DenseNetG",
    "JacobianNet",
    "LipSwish",
    "LipschitzMLP",
    "Pila",
    "SpectralConv2d",
    "SpectralLayer",
    "SpectralLinear",
    "get_activation",
    "spectral_layers",
    "update_lipschitz",
]
