"""Invertible layers for image flows: logit transform, squeeze, per-channel ActNorm, flattening adapter for G.

These are the non-implicit pieces of the multiscale architecture of Residual Flows / Monotone Flows (Chen et al.
2019; Ahn et al. 2022, docs/algorithm.md §9.3). Each layer follows the block protocol: ``forward(x) -> (y, logdet)``
with ``logdet`` of shape (B,) in nats, and ``inverse(y) -> x``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .blocks import InitFlag
from .nn.densenet import JacobianNet, PreparedNet

__all__ = ["ActNorm2d", "FlatG", "LogitTransform", "Squeeze", "squeeze2d", "unsqueeze2d"]


class LogitTransform(nn.Module):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for pixels ``x`` in [0, 1] (Dinh et al. 2017; docs/algorithm.md §9.3).

    ``alpha`` keeps the logit finite at 0 and 1: the paper uses 0.05 (1e-6 for MNIST). The log-det is
    ``sum log(1 - 2 alpha) - log s - log(1 - s)`` with ``s = alpha + (1 - 2 alpha) x``.

    Args:
        alpha: boundary margin in [0, 0.5).
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"logit_alpha: must lie in [0, 0.5), got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1.0 - 2.0 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        per = math.log(1.0 - 2.0 * self.alpha) - torch.log(s) - torch.log1p(-s)
        return y, per.reshape(x.shape[0], -1).sum(dim=1)

    def inverse(self, y: Tensor) -> Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1.0 - 2.0 * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


def squeeze2d(x: Tensor) -> Tensor:
    """Space-to-depth by 2x2: (B, C, H, W) -> (B, 4C, H/2, W/2) (Dinh et al. 2017)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze2d`: (B, 4C, H, W) -> (B, C, 2H, 2W)."""
    b, c4, h, w = x.shape
    c = c4 // 4
    x = x.reshape(b, c, 2, 2, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h * 2, w * 2)


class Squeeze(nn.Module):
    """The 2x2 squeeze as a flow layer (a permutation: log-det 0)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"squeeze: height and width must be even, got {tuple(x.shape[2:])}")
        return squeeze2d(x), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return unsqueeze2d(y)


class ActNorm2d(nn.Module):
    """Per-channel ActNorm ``y = (x + b) * exp(s)`` for (B, C, H, W) tensors (Kingma & Dhariwal 2018).

    The first forward pass in training mode sets ``b = -mean`` and ``s = -0.5 log max(var, 0.2)`` per channel
    from its batch (docs/algorithm.md section 7). Log-det ``H W sum_c s_c``.

    Args:
        channels: number of channels C.
        data_init: initialise from the first training batch (otherwise start at the identity).
    """

    initialized: Tensor  # a boolean buffer, registered in __init__

    def __init__(self, channels: int, data_init: bool = True) -> None:
        super().__init__()
        self.channels = channels
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._flag = InitFlag()

    @property
    def is_initialized(self) -> bool:
        """Whether the data-dependent initialisation has run (no host synchronisation once known)."""
        return self._flag.read(self.initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation from a batch (B, C, H, W)."""
        per_channel = x.transpose(0, 1).reshape(self.channels, -1)
        self.bias.copy_(-per_channel.mean(dim=1))
        var = per_channel.var(dim=1, unbiased=False) if per_channel.shape[1] > 1 else torch.ones_like(self.bias)
        self.log_scale.copy_(-0.5 * torch.log(torch.clamp(var, min=0.2)))
        self.initialized.fill_(True)
        self._flag.wrote(self.initialized, True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.is_initialized:
            self.initialize(x)
        y = (x + self.bias.view(1, -1, 1, 1)) * torch.exp(self.log_scale).view(1, -1, 1, 1)
        return y, (self.log_scale.sum() * (x.shape[2] * x.shape[3])).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale).view(1, -1, 1, 1) - self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class FlatG(JacobianNet):
    """Runs a vector G (e.g. :class:`~monoflow_core.nn.densenet.DenseNetG`) on flattened (B, C, H, W) inputs.

    The fully connected blocks at the end of the multiscale flow (Chen et al. 2019; docs/algorithm.md §9.3) act on
    the whole image as one vector; the Jacobian is that of the flattened map, in (C, H, W) order.

    Args:
        net: a :class:`JacobianNet` on vectors of length ``C * H * W``.
        event_shape: the (C, H, W) shape of one sample.
    """

    def __init__(self, net: JacobianNet, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = net
        self.event_shape = tuple(event_shape)
        self.in_features = math.prod(self.event_shape)
        if net.in_features != self.in_features:
            raise ValueError(f"FlatG: net takes {net.in_features} features, the event shape has {self.in_features}")

    def prepare(self) -> PreparedNet:
        return self.net.prepare()

    def evaluate(self, x: Tensor, prepared: PreparedNet) -> Tensor:
        return self.net.evaluate(x.reshape(x.shape[0], -1), prepared).reshape(x.shape)

    def evaluate_with_jacobian(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, Tensor]:
        g, jac = self.net.evaluate_with_jacobian(x.reshape(x.shape[0], -1), prepared)
        return g.reshape(x.shape), jac

    def lipschitz_bound(self) -> float:
        return self.net.lipschitz_bound()
