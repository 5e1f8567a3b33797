"""Dequantization: turning discrete pixels into continuous data a flow can model.

A flow has a density ``p`` on ``[0, 1)^D``; pixels ``x`` take one of ``K`` levels (256 for 8-bit images, 17 for
scikit-learn's digits). With noise ``u in [0, 1)^D`` drawn from ``q(u | x)`` and ``y = (x + u) / K``,

    log P(x) >= E_q[ log p(y) - D log K - log q(u | x) ]

(Theis et al. 2016; Ho et al. 2019, "Flow++"). Uniform dequantization takes ``q = 1`` (docs/algorithm.md section 9.3);
variational dequantization (VDQ) learns ``q`` with a small conditional flow, and the reported number is then
this bound (an ELBO), never the exact likelihood. bits/dim = ``-bound / (D ln 2)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEQUANTIZATIONS",
    "ConditionalCoupling",
    "UniformDequantizer",
    "VariationalDequantizer",
    "draw_noise",
]

DEQUANTIZATIONS = ("uniform", "variational")


def draw_noise(
    dequantizer: nn.Module,
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The raw noise a dequantizer consumes: ``U[0, 1)`` (uniform) or ``N(0, I)`` (variational).

    Drawing it outside the dequantizer lets a trainer draw one global batch's noise and split it across
    gradient-accumulation chunks or data-parallel processes, with the same result as one big batch.
    """
    if getattr(dequantizer, "noise_kind", "uniform") == "normal":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator)
    return torch.rand(shape, dtype=dtype, device=device, generator=generator)


class _Dequantizer(nn.Module):
    """What both dequantizers share: ``levels`` K (>= 2) and turning images and noise into floats."""

    noise_kind: str

    def __init__(self, levels: int) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"levels: must be >= 2, got {levels}")
        self.levels = int(levels)

    def _inputs(
        self, x: Tensor, dtype: torch.dtype, noise: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``x`` as floats of ``dtype`` and the raw noise: ``noise`` if given, else drawn (:func:`draw_noise`)."""
        xf = x.to(dtype=dtype)
        return xf, draw_noise(self, xf.shape, dtype, xf.device, generator) if noise is None else noise.to(dtype)

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class UniformDequantizer(_Dequantizer):
    """``y = (x + u) / K`` with ``u ~ U[0, 1)^D``; ``log q(u | x) = 0``.

    Args:
        levels: number of intensity levels K (>= 2).
    """

    def __init__(self, levels: int = 256) -> None:
        super().__init__(levels)

    noise_kind = "uniform"

    def forward(
        self,
        x: Tensor,
        dtype: torch.dtype = torch.float32,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(y, log q(u | x))``: continuous data in [0, 1) and the noise's log-density (zeros), in nats.

        Args:
            x: integer images (B, C, H, W) in [0, K-1].
            dtype: floating dtype of the result.
            noise: pre-drawn ``u ~ U[0, 1)`` of x's shape (see :func:`draw_noise`); drawn here if ``None``.
            generator: random generator for drawing the noise here.
        """
        xf, u = self._inputs(x, dtype, noise, generator)
        return (xf + u) / self.levels, xf.new_zeros(xf.shape[0])


class ConditionalCoupling(nn.Module):
    """Checkerboard affine coupling conditioned on the image (Dinh et al. 2017; Ho et al. 2019).

    ``h' = m h + (1 - m) (h exp(s) + t)`` with ``(s, t) = NN([m h, context])`` and ``s`` bounded by ``tanh``;
    log-det ``sum (1 - m) s``. The last layer starts at zero, so the coupling starts as the identity.

    Args:
        channels: channels of the noise (= image channels).
        hidden: hidden channels of the conditioning network.
        parity: which checkerboard squares stay fixed (0 or 1).
    """

    def __init__(self, channels: int, hidden: int = 32, parity: int = 0) -> None:
        super().__init__()
        self.parity = int(parity) % 2
        self.net = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2 * channels, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def mask(self, h: Tensor) -> Tensor:
        rows = torch.arange(h.shape[2], device=h.device).view(-1, 1)
        cols = torch.arange(h.shape[3], device=h.device).view(1, -1)
        return ((rows + cols) % 2 == self.parity).to(h.dtype).expand(1, 1, -1, -1)

    def forward(self, h: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
        m = self.mask(h)
        s_raw, t = self.net(torch.cat([m * h, context], dim=1)).chunk(2, dim=1)
        s = torch.tanh(s_raw) * (1 - m)
        out = m * h + (1 - m) * (h * torch.exp(s) + t)
        return out, s.reshape(h.shape[0], -1).sum(dim=1)


class VariationalDequantizer(_Dequantizer):
    """Variational dequantization: ``u = sigmoid(f(eps; x))``, ``eps ~ N(0, I)``, f a small conditional flow.

    The flow f is ``blocks`` checkerboard affine couplings conditioned on the image (the paper's VDQ uses a
    3-block conditional flow; docs/algorithm.md section 9.3). ``log q(u | x) = log N(eps) - log|det df/deps| -
    sum log sigmoid'(h)``, all exact.

    Args:
        channels: image channels.
        levels: number of intensity levels K.
        blocks: couplings in the conditional flow.
        hidden: hidden channels of each coupling's network.
    """

    def __init__(self, channels: int, levels: int = 256, blocks: int = 3, hidden: int = 32) -> None:
        super().__init__(levels)
        if blocks < 1:
            raise ValueError(f"vdq_blocks: must be >= 1, got {blocks}")
        self.couplings = nn.ModuleList(ConditionalCoupling(channels, hidden, parity=i) for i in range(blocks))

    noise_kind = "normal"

    def forward(
        self,
        x: Tensor,
        dtype: torch.dtype = torch.float32,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Return ``(y, log q(u | x))`` with ``y = (x + u) / K`` in (0, 1), log-density in nats.

        Args:
            x: integer images (B, C, H, W) in [0, K-1].
            dtype: floating dtype of the result.
            noise: pre-drawn ``eps ~ N(0, I)`` of x's shape (see :func:`draw_noise`); drawn here if ``None``.
            generator: random generator for drawing the noise here.
        """
        xf, eps = self._inputs(x, dtype, noise, generator)
        context = 2.0 * xf / (self.levels - 1) - 1.0
        flat = eps.reshape(eps.shape[0], -1)
        log_q = -0.5 * (flat * flat).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2.0 * math.pi)
        h = eps
        for coupling in self.couplings:
            h, logdet = coupling(h, context)
            log_q = log_q - logdet
        # log sigmoid'(h) = log sigmoid(h) + log sigmoid(-h)
        log_q = log_q - (F.logsigmoid(h) + F.logsigmoid(-h)).reshape(h.shape[0], -1).sum(dim=1)
        u = torch.sigmoid(h)
        return (xf + u) / self.levels, log_q
