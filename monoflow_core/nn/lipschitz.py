"""Spectrally normalised (Lipschitz-constrained) linear layers.

A layer stores an unconstrained weight ``W`` and uses the soft-normalised weight
``W / max(1, sigma(W) / coeff)`` (Behrmann et al. 2019; Ahn et al. 2022, section 6 of docs/algorithm.md), so its
spectral norm is ``min(sigma, coeff) <= coeff``.

``sigma`` is computed in one of two ways:

* ``"exact"``: ``torch.linalg.matrix_norm(W, 2)`` on every use. For the small matrices of low-dimensional flows
  this costs microseconds, and it is the only way to guarantee the bound *at every moment* (power iteration
  converges from below, so a few iterations underestimate sigma and let Lip(G) exceed its bound).
* ``"power"``: ``sigma = u^T W v`` with persistent buffers ``u, v`` refined by ``update_lipschitz`` (the
  released research code's scheme; meant for large matrices where an SVD per step is too costly). The bound
  then holds up to the power iteration's convergence, which ``update_lipschitz(model, 200)`` makes tight.

``"auto"`` picks exact when the matrix has at most ``EXACT_MAX_NUMEL`` entries.

Every such layer derives from :class:`SpectralLayer` (here :class:`SpectralLinear`; the convolutional
:class:`~monoflow_core.nn.conv.SpectralConv2d` lives in ``conv.py``), so that :func:`spectral_layers` and
:func:`update_lipschitz` find all of them without this module importing the convolutional one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EXACT_MAX_NUMEL", "SpectralLayer", "SpectralLinear", "spectral_layers", "update_lipschitz"]

#: Largest weight (in entries) for which ``"auto"`` computes the exact spectral norm on every use.
EXACT_MAX_NUMEL = 128 * 128

SPECTRAL_MODES = ("auto", "exact", "power")


def check_spectral_args(mode: str, coeff: float) -> None:
    """Validate the ``mode`` and ``coeff`` arguments shared by all spectral layers."""
    if mode not in SPECTRAL_MODES:
        raise ValueError(f"spectral_norm: unknown mode {mode!r}; choose one of {list(SPECTRAL_MODES)}")
    if not coeff > 0:
        raise ValueError(f"coeff: must be positive, got {coeff}")


def sigma_converged(previous: float, current: float, tol: float | None) -> bool:
    """Whether a power-iteration estimate of sigma changed by at most ``tol`` (relative) in one step."""
    return tol is not None and abs(current - previous) <= tol * abs(current)


class SpectralLayer(nn.Module):
    """Base class of the spectrally normalised layers: the soft normalisation ``W / max(1, sigma / coeff)``.

    A subclass stores an unconstrained ``weight``, the bound ``coeff`` and a resolved ``mode`` (``"exact"`` or
    ``"power"``), and implements :meth:`sigma` (the spectral norm of the layer's *operator*, differentiable with
    respect to the weight) and :meth:`power_iteration` (refinement of its persistent singular vectors).
    """

    weight: nn.Parameter
    coeff: float
    mode: str

    def sigma(self) -> Tensor:
        """The spectral norm used for normalisation (differentiable with respect to the weight)."""
        raise NotImplementedError

    def normalization_factor(self) -> Tensor:
        """``max(1, sigma / coeff)``, the divisor of the weight (differentiable with respect to the weight).

        Raises:
            ValueError: the weight holds NaN or inf where the exact spectral norm's decomposition refuses it (a
                diverged optimizer step or a bad checkpoint), instead of a linear-algebra error from inside it.
        """
        try:
            sigma = self.sigma()
        except torch.linalg.LinAlgError as err:
            # Checked only here, on the way out: a finiteness test on every use would cost a host sync per layer.
            if bool(torch.isfinite(self.weight.detach()).all()):
                raise
            raise ValueError(
                f"{type(self).__name__}({self.extra_repr()}): its weight {tuple(self.weight.shape)} contains "
                "non-finite values (NaN or inf), so its spectral norm is undefined; the parameters diverged (e.g. "
                "a learning rate too large) or were loaded so: restore finite weights, e.g. from a checkpoint"
            ) from err
        return torch.clamp(sigma / self.coeff, min=1.0)

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma / coeff)``: the weight the layer actually applies (see :meth:`normalization_factor`)."""
        return self.weight / self.normalization_factor()

    def power_iteration(self, n_iterations: int, tol: float | None = None) -> int:
        """Refine the persistent singular vectors; return the number of iterations run.

        Args:
            n_iterations: the most iterations to run.
            tol: if given, stop once the relative change of the sigma estimate is at most ``tol``.
        """
        raise NotImplementedError


class SpectralLinear(SpectralLayer):
    """A linear layer whose spectral norm never exceeds ``coeff``.

    Args:
        in_features: input width.
        out_features: output width.
        coeff: the Lipschitz bound of the layer, in (0, 1] for flows (any positive value is accepted).
        bias: whether to add a learnable bias.
        mode: ``"exact"``, ``"power"`` or ``"auto"`` (see the module docstring).
    """

    # Power-iteration buffers (registered in ``__init__``); declared so that attribute access types as a Tensor.
    u: Tensor
    v: Tensor

    def __init__(
        self, in_features: int, out_features: int, coeff: float = 0.97, bias: bool = True, mode: str = "auto"
    ) -> None:
        super().__init__()
        check_spectral_args(mode, coeff)
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

    @torch.no_grad()
    def power_iteration(self, n_iterations: int, tol: float | None = None) -> int:
        """Refine the persistent singular vectors ``u, v`` by up to ``n_iterations`` power iterations.

        Args:
            n_iterations: the most iterations to run.
            tol: if given, stop once the relative change of the estimate ``|W v|`` is at most ``tol`` (the
                first step compares with the current ``u^T W v``, so converged vectors stop after one).

        Returns:
            The number of iterations run.
        """
        w = self.weight.detach()
        u, v = self.u, self.v
        # The tolerance costs one host sync per iteration; without it the loop stays asynchronous.
        previous = float(torch.dot(u, torch.mv(w, v))) if tol is not None else 0.0
        done = 0
        for _ in range(n_iterations):
            v = F.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12)
            wv = torch.mv(w, v)
            u = F.normalize(wv, dim=0, eps=1e-12)
            done += 1
            if tol is not None:
                current = float(torch.linalg.vector_norm(wv))
                if sigma_converged(previous, current, tol):
                    break
                previous = current
        self.u.copy_(u)
        self.v.copy_(v)
        return done

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, coeff={self.coeff}, "
            f"mode={self.mode!r}, bias={self.bias is not None}"
        )


def spectral_layers(module: nn.Module) -> Iterator[SpectralLayer]:
    """All spectrally normalised layers (linear and convolutional) inside ``module``."""
    for m in module.modules():
        if isinstance(m, SpectralLayer):
            yield m


@torch.no_grad()
def update_lipschitz(
    module: nn.Module,
    n_iterations: int = 5,
    include_exact: bool = False,
    *,
    tol: float | None = None,
    layers: Sequence[SpectralLayer] | None = None,
) -> None:
    """Run ``n_iterations`` power iterations on every spectrally normalised layer in ``module``.

    Call it after each optimizer step (the released code used 5) and before evaluation (200). Layers in
    ``"exact"`` mode compute their norm exactly on every use and are skipped (their vectors are refined only
    when ``include_exact`` is set, e.g. before switching them to ``"power"`` mode).

    Args:
        module: any module; layers are found recursively.
        n_iterations: power iterations per layer, >= 0.
        include_exact: also refine the vectors of exact-mode layers.
        tol: if given, each layer stops early once its sigma estimate changes by at most ``tol`` (relative);
            e.g. ``update_lipschitz(model, 200, tol=1e-6)`` before evaluation.
        layers: ``module``'s spectral layers (:func:`spectral_layers`), listed once by a caller that updates them
            after every step (a training loop): walking the module tree costs more than the exact-norm layers' no-op.
    """
    if n_iterations < 0:
        raise ValueError(f"n_iterations: must be >= 0, got {n_iterations}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol: must be >= 0, got {tol}")
    for layer in spectral_layers(module) if layers is None else layers:
        if layer.mode == "power" or include_exact:
            layer.power_iteration(n_iterations, tol=tol)
