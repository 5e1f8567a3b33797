"""Lipschitz-constrained networks G for flow blocks, with Jacobians by forward-mode tangents.

Two architectures:

* :class:`DenseNetG`: the i-DenseNet network with learnable concatenation used by Monotone Flows
  (Perugachi-Diaz et al. 2021; Ahn et al. 2022, docs/algorithm.md section 7). Each dense layer computes
  ``[eta1 * x, eta2 * act(W x + b)]`` with ``sqrt(eta1^2 + eta2^2) = lip_coeff``.
* :class:`LipschitzMLP`: a plain chain of spectrally normalised linear layers and activations.

Both derive from :class:`JacobianNet`: besides ``forward`` they evaluate G *together with* its Jacobian by
propagating tangent vectors alongside the primal values (forward mode by hand: a linear layer maps tangents by
``W``, an activation multiplies them by its derivative, a concatenation concatenates). The primal row and the
tangent rows are stacked so that one matrix product per layer yields both. One such pass serves Newton's solve,
the exact log-det and the one-step implicit gradient (docs/performance.md), and it needs no double backward.

The normalised weights are computed once by :meth:`JacobianNet.prepare` and reused for every evaluation of G
inside a fixed-point solve, rather than once per evaluation.

:meth:`JacobianNet.linearize` gives G's value together with the map ``t -> J_G t`` for single directions: the
activations' derivatives at the point are kept, so each product costs the layers' linear maps and one multiplication
per activation. The power-series log-det takes its terms this way (forward-mode products, docs/gpu.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import LipschitzActivation, get_activation
from .lipschitz import SpectralLinear

__all__ = ["DenseNetG", "JacobianNet", "LearnableConcat", "LinearMap", "LipschitzMLP", "PreparedNet"]

#: A linear map of tangents: ``t -> J t`` for ``t`` shaped like G's input.
LinearMap = Callable[[Tensor], Tensor]


@dataclass
class PreparedNet:
    """Normalised weights of a :class:`JacobianNet`, computed once per pass of the flow.

    Attributes:
        weights: the applied (normalised) weight of each linear layer, in order.
        biases: their biases (``None`` where a layer has none).
        mix: per dense layer, the pair ``(eta1, eta2)`` of concatenation coefficients (empty for an MLP).
        factors: per linear layer, ``(W, s)`` with ``weights[i] = W / s`` (the parameter and its normalisation
            divisor), or empty. Evaluations that build a graph apply ``(x W^T) / s``: autograd then keeps the
            parameter itself for backward rather than a normalised copy of every weight matrix (the fully connected
            blocks of image flows have weights of tens of MiB).
    """

    weights: list[Tensor]
    biases: list[Tensor | None]
    mix: list[tuple[Tensor, Tensor]]
    factors: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    def linear(self, x: Tensor, i: int) -> Tensor:
        """Linear layer ``i`` on ``x`` (B, in): by the normalised weight, or under autograd as ``(x W^T) / s``."""
        if self.factors and torch.is_grad_enabled():
            weight, divisor = self.factors[i]
            out = F.linear(x, weight) / divisor
            bias = self.biases[i]
            return out if bias is None else out + bias
        return F.linear(x, self.weights[i], self.biases[i])


def _prepare_linears(linears: Sequence[SpectralLinear], mix: list[tuple[Tensor, Tensor]]) -> PreparedNet:
    """Normalised weights of spectrally normalised linear layers (each divisor computed once)."""
    factors: list[tuple[Tensor, Tensor]] = [(lin.weight, lin.normalization_factor()) for lin in linears]
    return PreparedNet(
        weights=[w / s for w, s in factors],
        biases=[lin.bias for lin in linears],
        mix=mix,
        factors=factors,
    )


class JacobianNet(nn.Module):
    """A network G that can return its Jacobian with its value.

    Subclasses implement :meth:`prepare`, :meth:`evaluate` and :meth:`evaluate_with_jacobian`; ``forward`` is
    ``evaluate(x, prepare())``. Inputs are ``(B, n)``; Jacobians are ``(B, n_out, n_in)``.
    """

    in_features: int

    def prepare(self) -> PreparedNet:
        raise NotImplementedError

    def evaluate(self, x: Tensor, prepared: PreparedNet) -> Tensor:
        raise NotImplementedError

    def evaluate_with_jacobian(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, Tensor]:
        """Return ``(G(x), J_G(x))`` with ``J[b, i, j] = dG_i / dx_j`` at sample ``b``."""
        raise NotImplementedError

    def lipschitz_bound(self) -> float:
        """An upper bound on Lip(G) (Euclidean norm) that holds whenever the network is evaluated."""
        raise NotImplementedError

    def linearize(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, LinearMap]:
        """``G(x)`` and the forward-mode product ``t -> J_G(x) t``, with the activations' derivatives at ``x`` kept.

        The value is computed as :meth:`evaluate` computes it, with a graph where autograd records one. The
        derivatives are computed once, without a graph; each product then costs the layers' linear maps (no bias)
        and one multiplication per activation: no derivative is recomputed and no graph is walked, unlike a
        vector-Jacobian product through autograd. The product is not differentiable (it runs without a graph).
        """
        raise NotImplementedError

    @property
    def supports_linearize(self) -> bool:
        """Whether this network implements :meth:`linearize`."""
        return type(self).linearize is not JacobianNet.linearize

    def forward(self, x: Tensor) -> Tensor:
        return self.evaluate(x, self.prepare())


def value_and_derivative(act: LipschitzActivation, h: Tensor) -> tuple[Tensor, Tensor]:
    """An activation's value at ``h`` (with a graph where autograd records one) and its derivative (without one)."""
    if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in act.parameters())):
        value = act(h)
        with torch.no_grad():
            return value, act.derivative(h)
    return act.forward_and_derivative(h)


def activation_tangent(act: LipschitzActivation, deriv: Tensor, t: Tensor) -> Tensor:
    """A tangent ``t`` through an activation whose derivative is ``deriv`` (features along the last dimension).

    A concatenated activation maps ``t`` to ``[f1'(x) t, f2'(x) t]``: ``deriv`` holds ``[f1'(x), f2'(x)]``.
    """
    e = act.expansion
    if e == 1:
        return deriv * t
    c = t.shape[-1]
    return (deriv.view(*t.shape[:-1], e, c) * t.unsqueeze(-2)).view(*t.shape[:-1], e * c)


def _linear_stacked(s: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Apply a linear layer to a stack ``s = [primal; tangents]`` of shape (B, 1 + d, width).

    The bias is added to the primal row only: tangents are differences and ignore offsets.
    """
    out = torch.matmul(s, weight.t())
    if bias is None:
        return out
    pad = torch.zeros(s.shape[1] - 1, bias.shape[0], dtype=bias.dtype, device=bias.device)
    return out + torch.cat([bias.unsqueeze(0), pad], dim=0)


def _activation_stacked(act: LipschitzActivation, s: Tensor) -> Tensor:
    """Apply an activation to a stack: the primal row by value, the tangent rows by the derivative."""
    h, th = s[:, :1], s[:, 1:]
    value, deriv = act.forward_and_derivative(h)
    if act.expansion > 1:
        th = th.repeat(1, 1, act.expansion)
    return torch.cat([value, deriv * th], dim=1)


def _identity_tangents(x: Tensor) -> Tensor:
    """The stack ``[x; I]`` of shape (B, 1 + n, n) that seeds a full-Jacobian forward-mode pass."""
    b, n = x.shape
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    return torch.cat([x.unsqueeze(1), eye], dim=1)


def _check_width(x: Tensor, n: int) -> None:
    if x.dim() != 2 or x.shape[1] != n:
        raise ValueError(f"G expects inputs of shape (batch, {n}), got {tuple(x.shape)}")


class LearnableConcat:
    """The learnable concatenation of i-DenseNet (Perugachi-Diaz et al. 2021), shared by the dense and conv G.

    Dense layer ``i`` outputs ``[eta1 * input, eta2 * new]`` with ``(eta1, eta2) = lip_coeff * e / |e|``,
    ``e = softplus(K_i) + 0.1``, so that ``sqrt(eta1^2 + eta2^2) = lip_coeff`` (docs/algorithm.md section 7).
    """

    lip_coeff: float
    concat_k: nn.Parameter
    coeff: float  # the Lipschitz bound of each (linear or conv) layer
    layers: nn.ModuleList  # the dense layers (the final layer is separate)

    def init_concat(self, depth: int, learnable: bool) -> None:
        """Create ``K`` (depth, 2), all ones as in i-DenseNet (eta1 = eta2 = lip_coeff / sqrt(2) at the start)."""
        self.concat_k = nn.Parameter(torch.ones(depth, 2), requires_grad=learnable)

    def set_concat_learnable(self, learnable: bool) -> None:
        """Freeze or release the concatenation weights ``K`` (the learnable-concatenation schedule)."""
        self.concat_k.requires_grad_(learnable)

    def mix_coefficients(self) -> Tensor:
        """``(depth, 2)`` tensor of ``(eta1, eta2)``, each row of Euclidean norm ``lip_coeff``."""
        e = F.softplus(self.concat_k) + 0.1
        return self.lip_coeff * e / torch.linalg.vector_norm(e, dim=1, keepdim=True)

    def lipschitz_bound(self) -> float:
        """``coeff * lip_coeff^depth``: each dense layer scales by at most ``lip_coeff``, the final by ``coeff``."""
        return self.coeff * self.lip_coeff ** len(self.layers)


class DenseNetG(LearnableConcat, JacobianNet):
    """i-DenseNet G with learnable concatenation (Perugachi-Diaz et al. 2021; Ahn et al. 2022).

    Widths for the paper's 2-D model (depth 3, growth 16, CPila): 2 -> 18 -> 34 -> 50 -> 2. Each dense layer
    maps its input to ``growth / expansion`` features with a Lipschitz linear layer of bound ``coeff``,
    applies the activation (a concatenated one doubles the width to ``growth``), and concatenates
    ``[eta1 * input, eta2 * new]``; ``(eta1, eta2) = lip_coeff * e / |e|`` with ``e = softplus(K) + 0.1``.
    A final Lipschitz linear layer maps back to ``n``. Lip(G) <= coeff * lip_coeff^depth.

    Args:
        n: event dimension (input and output width).
        depth: number of dense layers.
        growth: features added per dense layer.
        activation: registry name of the activation (``"cpila"``, ``"clipswish"``, ...).
        coeff: Lipschitz bound of each linear layer (the paper's "linear coefficient", 0.9).
        lip_coeff: norm of ``(eta1, eta2)`` (the paper's concatenation coefficient, 0.98).
        learnable_concat: whether ``K`` may be trained (the trainer may also switch it on later).
        spectral_mode: ``"auto"``, ``"exact"`` or ``"power"`` (see :class:`SpectralLinear`).
    """

    def __init__(
        self,
        n: int,
        depth: int = 3,
        growth: int = 16,
        activation: str = "cpila",
        coeff: float = 0.9,
        lip_coeff: float = 0.98,
        learnable_concat: bool = True,
        spectral_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = n
        self.coeff = float(coeff)
        self.lip_coeff = float(lip_coeff)
        self.activations = nn.ModuleList()
        self.layers = nn.ModuleList()
        width = n
        for _ in range(depth):
            act = get_activation(activation)
            hidden = max(1, growth // act.expansion)
            self.layers.append(SpectralLinear(width, hidden, coeff, mode=spectral_mode))
            self.activations.append(act)
            width += hidden * act.expansion
        self.final = SpectralLinear(width, n, coeff, mode=spectral_mode)
        self.init_concat(depth, learnable_concat)

    def prepare(self) -> PreparedNet:
        linears = [cast(SpectralLinear, lin) for lin in [*self.layers, self.final]]
        mix = self.mix_coefficients()
        return _prepare_linears(linears, [(mix[i, 0], mix[i, 1]) for i in range(mix.shape[0])])

    def evaluate(self, x: Tensor, prepared: PreparedNet) -> Tensor:
        _check_width(x, self.in_features)
        for i, act in enumerate(self.activations):
            new = act(prepared.linear(x, i))
            eta1, eta2 = prepared.mix[i]
            x = torch.cat([eta1 * x, eta2 * new], dim=-1)
        return prepared.linear(x, len(prepared.weights) - 1)

    def evaluate_with_jacobian(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, Tensor]:
        _check_width(x, self.in_features)
        s = _identity_tangents(x)
        for i, act in enumerate(self.activations):
            new = _activation_stacked(
                cast(LipschitzActivation, act), _linear_stacked(s, prepared.weights[i], prepared.biases[i])
            )
            eta1, eta2 = prepared.mix[i]
            s = torch.cat([eta1 * s, eta2 * new], dim=-1)
        out = _linear_stacked(s, prepared.weights[-1], prepared.biases[-1])
        return out[:, 0], out[:, 1:].transpose(1, 2)

    def linearize(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, LinearMap]:
        _check_width(x, self.in_features)
        derivs: list[Tensor] = []
        for i, act in enumerate(self.activations):
            new, deriv = value_and_derivative(cast(LipschitzActivation, act), prepared.linear(x, i))
            derivs.append(deriv)
            eta1, eta2 = prepared.mix[i]
            x = torch.cat([eta1 * x, eta2 * new], dim=-1)
        value = prepared.linear(x, len(prepared.weights) - 1)
        weights = [w.detach() for w in prepared.weights]
        mix = [(a.detach(), b.detach()) for a, b in prepared.mix]
        acts = [cast(LipschitzActivation, act) for act in self.activations]

        def jvp(t: Tensor) -> Tensor:
            with torch.no_grad():
                for i, act in enumerate(acts):
                    new = activation_tangent(act, derivs[i], F.linear(t, weights[i]))
                    eta1, eta2 = mix[i]
                    t = torch.cat([eta1 * t, eta2 * new], dim=-1)
                return F.linear(t, weights[-1])

        return value, jvp


class LipschitzMLP(JacobianNet):
    """A Lipschitz MLP ``n -> hidden[0] -> ... -> n`` with spectrally normalised layers.

    Args:
        n: event dimension.
        hidden: widths of the hidden linear layers (before any activation expansion).
        activation: registry name of the activation.
        coeff: Lipschitz bound of each linear layer; Lip(G) <= coeff^(len(hidden) + 1).
        spectral_mode: ``"auto"``, ``"exact"`` or ``"power"``.
    """

    def __init__(
        self,
        n: int,
        hidden: Sequence[int] = (64, 64),
        activation: str = "lipswish",
        coeff: float = 0.9,
        spectral_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.in_features = n
        self.coeff = float(coeff)
        self.layers = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = n
        for h in hidden:
            act = get_activation(activation)
            self.layers.append(SpectralLinear(width, h, coeff, mode=spectral_mode))
            self.activations.append(act)
            width = h * act.expansion
        self.layers.append(SpectralLinear(width, n, coeff, mode=spectral_mode))

    def prepare(self) -> PreparedNet:
        return _prepare_linears([cast(SpectralLinear, lin) for lin in self.layers], [])

    def evaluate(self, x: Tensor, prepared: PreparedNet) -> Tensor:
        _check_width(x, self.in_features)
        for i, act in enumerate(self.activations):
            x = act(prepared.linear(x, i))
        return prepared.linear(x, len(prepared.weights) - 1)

    def evaluate_with_jacobian(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, Tensor]:
        _check_width(x, self.in_features)
        s = _identity_tangents(x)
        for i, act in enumerate(self.activations):
            s = _activation_stacked(
                cast(LipschitzActivation, act), _linear_stacked(s, prepared.weights[i], prepared.biases[i])
            )
        out = _linear_stacked(s, prepared.weights[-1], prepared.biases[-1])
        return out[:, 0], out[:, 1:].transpose(1, 2)

    def linearize(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, LinearMap]:
        _check_width(x, self.in_features)
        derivs: list[Tensor] = []
        for i, act in enumerate(self.activations):
            x, deriv = value_and_derivative(cast(LipschitzActivation, act), prepared.linear(x, i))
            derivs.append(deriv)
        value = prepared.linear(x, len(prepared.weights) - 1)
        weights = [w.detach() for w in prepared.weights]
        acts = [cast(LipschitzActivation, act) for act in self.activations]

        def jvp(t: Tensor) -> Tensor:
            with torch.no_grad():
                for i, act in enumerate(acts):
                    t = activation_tangent(act, derivs[i], F.linear(t, weights[i]))
                return F.linear(t, weights[-1])

        return value, jvp

    def lipschitz_bound(self) -> float:
        return self.coeff ** len(self.layers)
