"""The multiscale image flow of Residual Flows / Monotone Flows (Chen et al. 2019; Ahn et al. 2022).

See docs/algorithm.md §8 and §9.3.

Layout, for an image of shape (C, H, W) with pixels dequantized into [0, 1):

    logit transform (alpha)
    per scale s = 1..S:  n_s x [implicit block with a conv DenseNet G, ActNorm]  then (except after the last
                         scale) squeeze 2x2 and, optionally, factor out half of the channels
    fc_blocks x [implicit block with a fully connected DenseNet G on the flattened image, ActNorm]

The base density is a standard normal on all D dimensions: the factored-out parts and the final tensor are
flattened and concatenated into z of shape (B, D).

Discrete data: :meth:`MultiscaleFlow.log_prob_bound` returns the dequantization bound
``log p(y) - D log K - log q(u | x)`` (nats per image) and :meth:`MultiscaleFlow.bpd` the bits/dim
``-bound / (D ln 2)`` (docs/algorithm.md section 9.3). With uniform dequantization ``log q = 0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from .dequantization import draw_noise
from .flow import Flow, _Invertible
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
        """Map images in [0, 1] to ``(z, log|det dz/dx|)``, z of shape (B, D).

        Raises:
            TypeError, ValueError: ``x`` is not a tensor of the flow's dtype and device of shape (B, C, H, W).
        """
        self._check(x, "forward")
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
        """Map base samples (B, D) or (B, C, H, W) back to images in [0, 1].

        Raises:
            TypeError, ValueError: ``z`` is not a tensor of the flow's dtype and device of shape (B, D) or
                (B, C, H, W).
        """
        self._check(z, "inverse", ((self.dim,), self.event_shape))
        b = z.shape[0]
        flat = z.reshape(b, -1)
        sizes = [math.prod(s) for s in self._piece_shapes]
        pieces = list(torch.split(flat, sizes, dim=1))
        x = pieces.pop().reshape(b, *self._piece_shapes[-1])
        factor_index = len(pieces) - 1
        for kind, arg in reversed(self.plan):
            if kind == "layer":
                x = cast(_Invertible, self.layers[arg]).inverse(x)
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
        self._check_levels(x, noise, "log_prob_bound")
        y, log_q = self.dequantizer(x, dtype=self.dtype, noise=noise, generator=generator)
        return self.log_prob(y) - self.dim * math.log(self.levels) - log_q

    def bpd(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Bits per dimension of integer images, ``-bound / (D ln 2)``, shape (B,)."""
        self._check_levels(x, noise, "bpd")
        return -self.log_prob_bound(x, noise, generator) / (self.dim * math.log(2.0))

    def _check_levels(self, x: Any, noise: Any, where: str) -> None:
        """Reject integer images (and raw noise) the dequantizer cannot take, before any kernel runs.

        ``x`` must be a tensor of integer levels (any integer or floating dtype: the dequantizer converts it) on
        the flow's device, of shape (B, C, H, W); ``noise``, if given, a floating tensor of that shape and device.
        Attribute reads only (no tensor operation or host sync): it runs on every training step.

        Raises:
            TypeError: not a tensor, or a bool/complex one.
            ValueError: a tensor on another device or of another shape.
        """
        device = self._anchor.device
        head = f"{type(self).__name__}.{where}"
        expected = (
            f"{head}: expected x, a torch.Tensor of integer levels on {device} with shape "
            f"(N, {', '.join(map(str, self.event_shape))})"
        )
        if not isinstance(x, Tensor):
            raise TypeError(f"{expected}, got {type(x).__name__}")
        if x.dtype == torch.bool or x.dtype.is_complex:
            raise TypeError(f"{expected}, got {str(x.dtype).removeprefix('torch.')}")
        if x.device != device:
            raise ValueError(f"{expected}, got a tensor on {x.device}")
        if x.shape[1:] != self.event_shape:
            raise ValueError(f"{expected}, got shape {tuple(x.shape)}")
        if noise is None:
            return
        if not isinstance(noise, Tensor) or not noise.dtype.is_floating_point:
            what = str(noise.dtype).removeprefix("torch.") if isinstance(noise, Tensor) else type(noise).__name__
            raise TypeError(f"{head}: noise must be a floating torch.Tensor (or None), got {what}")
        if noise.device != device or noise.shape != x.shape:
            raise ValueError(
                f"{head}: noise must be on {device} with the shape of x {tuple(x.shape)}, got "
                f"{tuple(noise.shape)} on {noise.device}"
            )

    def draw_noise(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """Raw dequantization noise for a batch of integer images of ``shape``."""
        return draw_noise(self.dequantizer, shape, self.dtype, self.device, generator)

    @torch.no_grad()
    def sample_images(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` images as integer levels (B, C, H, W), int64 in [0, K-1]."""
        return quantize(self.sample(n, temperature=temperature, generator=generator), self.levels)
