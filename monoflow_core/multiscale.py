"""The multiscale image flow of Residual Flows / Monotone Flows (Chen et al. 2019; Ahn et al. 2022, ALGORITHM.md 7.3).

Layout, for an image of shape (C, H, W) with pixels dequantized into [0, 1):

    logit transform (alpha)
    per scale s = 1..S:  n_s x [implicit block with a conv DenseNet G, ActNorm]  then (except after the last
                         scale) squeeze 2x2 and, optionally, factor out half of the channels
    fc_blocks x [implicit block with a fully connected DenseNet G on the flattened image, ActNorm]

The base density is a standard normal on all D dimensions: the factored-out parts and the final tensor are
flattened and concatenated into z of shape (B, D).

Discrete data: :meth:`MultiscaleFlow.log_prob_bound` returns the dequantization bound
``log p(y) - D log K - log q(u | x)`` (nats per image) and :meth:`MultiscaleFlow.bpd` the bits/dim
``-bound / (D ln 2)`` (ALGORITHM.md 7.3). With uniform dequantization ``log q = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .dequantization import draw_noise
from .flow import Flow
from .image_layers import Squeeze

if TYPE_CHECKING:
    from .config import FlowConfig

__all__ = ["MultiscaleFlow", "quantize"]


def quantize(y: Tensor, levels: int) -> Tensor:
    """Continuous pixels in [0, 1] to integer levels ``floor(K y)`` clipped to [0, K-1] (int64)."""
    return torch.clamp(torch.floor(y * levels), 0, levels - 1).to(torch.int64)


class MultiscaleFlow(Flow):
    """A flow over images with squeezes, optional factor-out and a dequantizer for discrete pixels.

    Args:
        layers: every invertible layer, in order (the logit transform first).
        plan: the forward program: ``("layer", i)`` applies ``layers[i]``; ``("factor", k)`` keeps the first
            ``k`` channels and sends the rest to the base density.
        event_shape: (C, H, W) of one image.
        dequantizer: a module ``(x_int, dtype) -> (y, log q(u | x))``.
        levels: number of pixel levels K.
        config: the configuration the flow was built from.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        plan: Sequence[tuple[str, int]],
        event_shape: Sequence[int],
        dequantizer: nn.Module,
        levels: int,
        config: FlowConfig | None = None,
    ) -> None:
        super().__init__(layers, event_shape, config=config)
        self.plan = [(str(k), int(v)) for k, v in plan]
        self.dequantizer = dequantizer
        self.levels = int(levels)
        # Shapes of the factored-out pieces and the final tensor, worked out once from the plan.
        self._piece_shapes = self._trace_shapes()
        self.fast_path = False  # the fused kernel is for vectors; image blocks take the generic path

    @torch.no_grad()
    def _trace_shapes(self) -> list[tuple[int, ...]]:
        c, h, w = self.event_shape
        shape = (c, h, w)
        pieces: list[tuple[int, ...]] = []
        for kind, arg in self.plan:
            if kind == "factor":
                pieces.append((shape[0] - arg, *shape[1:]))
                shape = (arg, *shape[1:])
            elif isinstance(self.layers[arg], Squeeze):
                shape = (shape[0] * 4, shape[1] // 2, shape[2] // 2)
        pieces.append(shape)
        return pieces

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Map images in [0, 1] to ``(z, log|det dz/dx|)``, z of shape (B, D)."""
        self._check(x)
        b = x.shape[0]
        total = torch.zeros(b, dtype=x.dtype, device=x.device)
        outs: list[Tensor] = []
        for kind, arg in self.plan:
            if kind == "layer":
                x, logdet = self.layers[arg](x)
                total = total + logdet
            else:
                outs.append(x[:, arg:].reshape(b, -1))
                x = x[:, :arg]
        outs.append(x.reshape(b, -1))
        return torch.cat(outs, dim=1), total

    def inverse(self, z: Tensor) -> Tensor:
        """Map base samples (B, D) or (B, C, H, W) back to images in [0, 1]."""
        b = z.shape[0]
        flat = z.reshape(b, -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"expected base samples with {self.dim} dimensions, got {tuple(z.shape)}")
        sizes = [math.prod(s) for s in self._piece_shapes]
        pieces = list(torch.split(flat, sizes, dim=1))
        x = pieces.pop().reshape(b, *self._piece_shapes[-1])
        factor_index = len(pieces) - 1
        for kind, arg in reversed(self.plan):
            if kind == "layer":
                x = self.layers[arg].inverse(x)
            else:
                piece = pieces[factor_index].reshape(b, *self._piece_shapes[factor_index])
                x = torch.cat([x, piece], dim=1)
                factor_index -= 1
        return x

    def log_prob_bound(
        self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """Dequantization lower bound on ``log P(x)`` of integer images, in nats per image, shape (B,).

        A single-sample estimate of ``E_q[log p(y) - D log K - log q(u | x)]`` (uniform dequantization: the
        standard reported number; variational: an ELBO). ``noise`` is the dequantizer's raw noise
        (:func:`~monoflow_core.dequantization.draw_noise`), drawn with ``generator`` if ``None``.
        """
        y, log_q = self.dequantizer(x, dtype=self.dtype, noise=noise, generator=generator)
        return self.log_prob(y) - self.dim * math.log(self.levels) - log_q

    def bpd(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Bits per dimension of integer images, ``-bound / (D ln 2)``, shape (B,)."""
        return -self.log_prob_bound(x, noise, generator) / (self.dim * math.log(2.0))

    def draw_noise(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Raw dequantization noise for a batch of integer images of ``shape``."""
        return draw_noise(self.dequantizer, shape, self.dtype, self.device, generator)

    @torch.no_grad()
    def sample_images(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` images as integer levels (B, C, H, W), int64 in [0, K-1]."""
        return quantize(self.sample(n, temperature=temperature, generator=generator), self.levels)
