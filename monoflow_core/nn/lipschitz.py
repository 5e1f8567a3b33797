"""Spectrally normalised (Lipschitz-constrained) linear layers.

A layer stores an unconstrained weight ``W`` and uses the soft-normalised weight
``W / max(1, sigma(W) / coeff)`` (Behrmann et al. 2019; Ahn et al. 2022, section 6 of ALGORITHM.md), so its
spectral norm is ``min(sigma, coeff) <= coeff``.

``sigma`` is computed in one of two ways:

* ``"exact"``: ``torch.linalg.matrix_norm(W, 2)`` on every use. For the small matrices of low-dimensional flows
  this costs microseconds, and it is the only way to guarantee the bound *at every moment* (power iteration
  converges from below, so a few iterations underestimate sigma and let Lip(G) exceed its bound).
* ``"power"``: ``sigma = u^T W v`` with persistent buffers ``u, v`` refined by ``update_lipschitz`` (the
  released research code's scheme; meant for large matrices where an SVD per step is too costly). The bound
  then holds up to the power iteration's convergence, which ``update_lipschitz(model, 200)`` makes tight.

``"auto"`` picks exact when the matrix has at most ``EXACT_MAX_NUMEL`` entries.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EXACT_MAX_NUMEL", "SpectralLinear", "spectral_layers", "update_lipschitz"]

#: Largest weight (in entries) for which ``"auto"`` computes the exact spectral norm on every use.
EXACT_MAX_NUMEL = 128 * 128

SPECTRAL_MODES = ("auto", "exact", "power")


class SpectralLinear(nn.Module):
    """A linear layer whose spectral norm never exceeds ``coeff``.

    Args:
        in_features: input width.
        out_features: output width.
        coeff: the Lipschitz bound of the layer, in (0, 1] for flows (any positive value is accepted).
        bias: whether to add a learnable bias.
        mode: ``"exact"``, ``"power"`` or ``"auto"`` (see the module docstring).
    """

    def __init__(
        self, in_features: int, out_features: int, coeff: float = 0.97, bias: bool = True, mode: str = "auto"
    ) -> None:
        super().__init__()
        if mode not in SPECTRAL_MODES:
            raise ValueError(f"spectral_norm: unknown mode {mode!r}; choose one of {list(SPECTRAL_MODES)}")
        if not coeff > 0:
            raise ValueError(f"coeff: must be positive, got {coeff}")
        self.in_features = in_features
        self.out_features = out_features
        self.coeff = float(coeff)
        if mode == "auto":
            mode = "exact" if in_features * out_features <= EXACT_MAX_NUMEL else "power"
        self.mode = mode
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # Power-iteration state; kept (and checkpointed) in every mode so a layer can switch modes.
        self.register_buffer("u", F.normalize(torch.randn(out_features), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(in_features), dim=0))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform weights as in ``nn.Linear``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def sigma(self) -> Tensor:
        """The spectral norm used for normalisation (differentiable with respect to the weight)."""
        if self.mode == "exact":
            return torch.linalg.matrix_norm(self.weight, ord=2)
        return torch.dot(self.u, torch.mv(self.weight, self.v))

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma / coeff)``: the weight the layer actually applies."""
        factor = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / factor

    @torch.no_grad()
    def power_iteration(self, n_iterations: int) -> None:
        """Refine the persistent singular vectors ``u, v`` by ``n_iterations`` power iterations."""
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(n_iterations):
            v = F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12)
            u = F.normalize(torch.mv(w, v), dim=0, eps=1e-12)
        self.u.copy_(u)
        self.v.copy_(v)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, coeff={self.coeff}, "
            f"mode={self.mode!r}, bias={self.bias is not None}"
        )


def spectral_layers(module: nn.Module) -> Iterator[SpectralLinear]:
    """All spectrally normalised layers inside ``module``."""
    for m in module.modules():
        if isinstance(m, SpectralLinear):
            yield m


@torch.no_grad()
def update_lipschitz(module: nn.Module, n_iterations: int = 5, include_exact: bool = False) -> None:
    """Run ``n_iterations`` power iterations on every spectrally normalised layer in ``module``.

    Call it after each optimizer step (the released code used 5) and before evaluation (200). Layers in
    ``"exact"`` mode compute their norm exactly on every use and are skipped (their vectors are refined only
    when ``include_exact`` is set, e.g. before switching them to ``"power"`` mode).

    Args:
        module: any module; layers are found recursively.
        n_iterations: power iterations per layer, >= 0.
        include_exact: also refine the vectors of exact-mode layers.
    """
    if n_iterations < 0:
        raise ValueError(f"n_iterations: must be >= 0, got {n_iterations}")
    for layer in spectral_layers(module):
        if layer.mode == "power" or include_exact:
            layer.power_iteration(n_iterations)
