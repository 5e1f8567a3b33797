"""Spectrally normalised convolutions and the convolutional i-DenseNet G, with Jacobians by forward-mode tangents.

* :class:`SpectralConv2d`: a stride-1, zero-padded ("same") convolution whose *operator* norm on images of a fixed
  size ``(H, W)`` never exceeds ``coeff``. Like :class:`~monoflow_core.nn.lipschitz.SpectralLinear` it applies the
  soft normalisation ``W / max(1, sigma / coeff)`` (Behrmann et al. 2019). ``sigma`` is the spectral norm of the
  whole linear map ``R^{C_in H W} -> R^{C_out H W}``, not of the reshaped kernel: the kernel-matrix norm neither
  bounds nor equals it. In ``"power"`` mode it is estimated by power iteration on the operator itself, through
  ``conv2d`` and its adjoint ``conv_transpose2d`` (Gouk et al. 2021; Behrmann et al. 2019, the scheme of the
  released Residual-Flow, i-DenseNet and Monotone-Flow code); in ``"exact"`` mode it is computed from the dense
  operator matrix on every use, which only small images afford.
* :class:`ConvDenseNetG`: the convolutional i-DenseNet with learnable concatenation (Perugachi-Diaz et al. 2021)
  used as G by Monotone Flows on images (Ahn et al. 2022; docs/algorithm.md sections 7, 9.3). It evaluates G
  together with its full Jacobian over the flattened event ``(C, H, W)``, by pushing the identity tangents through
  the network alongside the primal image (docs/performance.md): one convolution per layer on a batch of
  ``B (1 + n)`` images yields both G and J, and autograd through it differentiates the exact log-det. Images are
  kept channels-last inside G (faster oneDNN convolutions; activations act along the last dimension) and the
  concatenation factors are folded into the convolution weights, so the large tangent stack is only convolved,
  multiplied by activation derivatives and concatenated.

References:
    Behrmann, Grathwohl, Chen, Duvenaud, Jacobsen. *Invertible Residual Networks*. ICML 2019.
    Gouk, Frank, Pfahringer, Cree. *Regularisation of Neural Networks by Enforcing Lipschitz Continuity*.
    Machine Learning 110, 2021.
    Perugachi-Diaz, Tomczak, Bhulai. *Invertible DenseNets with Concatenated LipSwish*. NeurIPS 2021.
    Ahn, Kim, Hong, Kim. *Invertible Monotone Operators for Normalizing Flows*. NeurIPS 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import LipschitzActivation, get_activation
from .densenet import JacobianNet, LearnableConcat, LinearMap, PreparedNet, activation_tangent, value_and_derivative
from .lipschitz import SpectralLayer, check_spectral_args, sigma_converged

__all__ = ["EXACT_CONV_MAX_NUMEL", "ConvDenseNetG", "PreparedConvNet", "SpectralConv2d", "conv_operator_matrix"]

#: Largest operator matrix (``C_out H W x C_in H W`` entries) for which ``"auto"`` computes the exact norm on every
#: use. Measured on the project's 2-core CPU (one thread, float32, sigma's value and gradient, lightly loaded; about
#: 3x more under heavy load): 2 ch 4x4 -> 8 ch (4,096 entries) 0.6-1.0 ms, 4 ch 4x4 -> 16 ch (16,384) 0.9-1.0 ms,
#: 1 ch 8x8 -> 16 ch (65,536) 1.1-1.4 ms, 20 ch 4x4 -> 16 ch (81,920) 8 ms, 100 ch 4x4 -> 16 ch (409,600) 16-22 ms,
#: against about 0.2 ms for the power-mode ``sigma``. The cost is dominated by ``eigh`` of the smaller Gram matrix
#: and grows with its size cubed. Above ~1 ms per layer per step the exact norm costs more than it buys, so only
#: tiny operators default to it.
EXACT_CONV_MAX_NUMEL = 128 * 128


def _same_padding(kernel_size: int) -> int:
    return kernel_size // 2


def conv_operator_matrix(weight: Tensor, input_shape: tuple[int, int]) -> Tensor:
    """The dense matrix of the zero-padded, stride-1 convolution ``x -> conv2d(x, weight)`` on ``(H, W)`` images.

    Built by convolving the identity basis (one image per input coordinate), so it is differentiable with respect
    to ``weight``. Rows and columns follow the flattened ``(C, H, W)`` order.

    Args:
        weight: kernel of shape ``(C_out, C_in, k, k)`` with ``k`` odd.
        input_shape: ``(H, W)``.

    Returns:
        The ``(C_out H W, C_in H W)`` operator matrix ``M`` with ``conv2d(x).flatten() = M x.flatten()``.
    """
    c_in = weight.shape[1]
    h, w = input_shape
    n_in = c_in * h * w
    eye = torch.eye(n_in, dtype=weight.dtype, device=weight.device).view(n_in, c_in, h, w)
    # Row j of the result is the image of basis vector j, i.e. column j of M.
    return F.conv2d(eye, weight, padding=_same_padding(weight.shape[-1])).reshape(n_in, -1).t()


@torch.no_grad()
def _top_singular_pair(weight: Tensor, input_shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Exact top singular vectors ``(u, v)`` of the convolution operator, as images ``(C_out,H,W)``, ``(C_in,H,W)``.

    Uses the eigendecomposition of the smaller Gram matrix (``M^T M`` or ``M M^T``), built by applying the
    convolution (or its adjoint) to the identity basis of the smaller side: on this project's CPU that is 2-4x
    cheaper than ``torch.linalg.matrix_norm(M, 2)`` and its SVD backward, and it never forms more than needed.
    """
    c_out, c_in, k, _ = weight.shape
    h, w = input_shape
    pad = _same_padding(k)
    if c_in <= c_out:
        mt = conv_operator_matrix(weight, input_shape).t()  # (n_in, n_out)
        vec = torch.linalg.eigh(mt @ mt.t()).eigenvectors[:, -1]
        v = vec.view(c_in, h, w)
        u = F.normalize(F.conv2d(v.unsqueeze(0), weight, padding=pad).flatten(), dim=0).view(c_out, h, w)
    else:
        n = c_out * h * w
        eye = torch.eye(n, dtype=weight.dtype, device=weight.device).view(n, c_out, h, w)
        m = F.conv_transpose2d(eye, weight, padding=pad).reshape(n, -1)  # M, (n_out, n_in)
        vec = torch.linalg.eigh(m @ m.t()).eigenvectors[:, -1]
        u = vec.view(c_out, h, w)
        v = F.normalize(F.conv_transpose2d(u.unsqueeze(0), weight, padding=pad).flatten(), dim=0).view(c_in, h, w)
    return u, v


class SpectralConv2d(SpectralLayer):
    """A stride-1 "same" convolution whose operator norm on ``(H, W)`` images never exceeds ``coeff``.

    The applied kernel is ``W / max(1, sigma / coeff)`` with ``sigma`` the spectral norm of the convolution as a
    linear map on images of shape ``input_shape`` with zero padding ``k // 2`` (Behrmann et al. 2019; Gouk et al.
    2021). That norm grows (weakly) with the image size, so the bound is tied to ``input_shape`` and ``forward``
    rejects other sizes.

    ``sigma`` modes:

    * ``"power"``: ``sigma = <u, conv(v)>`` with persistent buffers ``u`` of shape ``(C_out, H, W)`` and ``v`` of
      shape ``(C_in, H, W)``, refined by :meth:`power_iteration` (``update_lipschitz``). Power iteration
      converges from below, so between refinements the bound holds only approximately.
    * ``"exact"``: the operator's exact spectral norm on every use. Its value is ``<u*, conv(v*)>`` for the exact
      top singular pair ``(u*, v*)`` (from the Gram matrix of the dense operator, see :func:`conv_operator_matrix`),
      whose gradient ``u* v*^T`` (pulled back to the kernel) is the exact gradient of a simple top singular value.
      Only affordable for small operators.
    * ``"auto"``: exact when the operator matrix has at most :data:`EXACT_CONV_MAX_NUMEL` entries, else power.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size ``k`` (1 or 3 in the models); padding is ``k // 2``.
        input_shape: the spatial size ``(H, W)`` the layer is normalised for.
        coeff: the Lipschitz bound of the layer.
        bias: whether to add a learnable per-channel bias.
        mode: ``"exact"``, ``"power"`` or ``"auto"``.
    """

    # Power-iteration buffers (registered in ``set_input_shape``); declared so that attribute access types as a Tensor.
    u: Tensor
    v: Tensor

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_shape: tuple[int, int],
        coeff: float = 0.97,
        bias: bool = True,
        mode: str = "auto",
    ) -> None:
        super().__init__()
        check_spectral_args(mode, coeff)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: must be a positive odd integer (same padding), got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.padding = _same_padding(kernel_size)
        self.coeff = float(coeff)
        self.requested_mode = mode
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()
        # Sets input_shape, the resolved mode and the power-iteration buffers u, v (kept, and checkpointed, in
        # every mode so that a layer can switch modes).
        self.set_input_shape(*input_shape)

    def reset_parameters(self) -> None:
        """Kaiming-uniform kernel and uniform bias, as in ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**2
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def operator_numel(self) -> int:
        """Entries of the dense operator matrix, ``C_out H W x C_in H W``."""
        h, w = self.input_shape
        return self.out_channels * self.in_channels * (h * w) ** 2

    def set_input_shape(self, height: int, width: int) -> None:
        """Normalise for images of size ``(height, width)``: resets ``u``, ``v`` and re-resolves an ``"auto"`` mode."""
        if height < 1 or width < 1:
            raise ValueError(f"input_shape: must be positive, got {(height, width)}")
        self.input_shape = (int(height), int(width))
        mode = self.requested_mode
        if mode == "auto":
            mode = "exact" if self.operator_numel <= EXACT_CONV_MAX_NUMEL else "power"
        self.mode = mode
        dtype, device = self.weight.dtype, self.weight.device
        u = F.normalize(torch.randn(self.out_channels * height * width, dtype=dtype, device=device), dim=0)
        v = F.normalize(torch.randn(self.in_channels * height * width, dtype=dtype, device=device), dim=0)
        # Assigning to an existing buffer name replaces the buffer (new shape included).
        self.register_buffer("u", u.view(self.out_channels, height, width))
        self.register_buffer("v", v.view(self.in_channels, height, width))

    def sigma(self) -> Tensor:
        """The operator norm used for normalisation (differentiable with respect to the weight)."""
        if self.mode == "exact":
            u, v = _top_singular_pair(self.weight.detach(), self.input_shape)
        else:
            u, v = self.u, self.v
        return torch.sum(u * F.conv2d(v.unsqueeze(0), self.weight, padding=self.padding)[0])

    @torch.no_grad()
    def power_iteration(self, n_iterations: int, tol: float | None = None) -> int:
        """Refine ``u``, ``v`` by up to ``n_iterations`` power iterations on the full convolution operator.

        One iteration is ``v <- normalize(conv^T(u))``, ``u <- normalize(conv(v))``; the adjoint of a zero-padded
        stride-1 convolution is ``conv_transpose2d`` with the same kernel and padding.

        Args:
            n_iterations: the most iterations to run.
            tol: if given, stop once the relative change of the estimate ``|conv(v)|`` is at most ``tol`` (the
                first step compares with the current ``<u, conv(v)>``, so converged vectors stop after one).

        Returns:
            The number of iterations run.
        """
        w = self.weight.detach()
        pad = self.padding
        u, v = self.u.unsqueeze(0), self.v.unsqueeze(0)
        # The tolerance costs one host sync per iteration; without it the loop stays asynchronous.
        previous = float(torch.sum(u * F.conv2d(v, w, padding=pad))) if tol is not None else 0.0
        done = 0
        for _ in range(n_iterations):
            v = F.conv_transpose2d(u, w, padding=pad)
            v = v / torch.linalg.vector_norm(v).clamp_min(1e-12)
            wv = F.conv2d(v, w, padding=pad)
            norm = torch.linalg.vector_norm(wv)
            u = wv / norm.clamp_min(1e-12)
            done += 1
            if tol is not None:
                current = float(norm)
                if sigma_converged(previous, current, tol):
                    break
                previous = current
        self.u.copy_(u[0])
        self.v.copy_(v[0])
        return done

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, *self.input_shape):
            raise ValueError(
                f"SpectralConv2d expects inputs of shape (batch, {self.in_channels}, {self.input_shape[0]}, "
                f"{self.input_shape[1]}) (its norm bound holds for that size only), got {tuple(x.shape)}"
            )
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_shape={self.input_shape}, coeff={self.coeff}, mode={self.mode!r}, bias={self.bias is not None}"
        )


def _conv_nhwc(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """Same-padded convolution of channels-last images ``(N, H, W, C)``, returning channels-last ``(N, H, W, C')``.

    G keeps its images channels-last internally: ``conv2d`` on the ``channels_last`` view runs 3-4x faster on
    this project's CPU (oneDNN; measured 80 vs 283 ms for 4,160 images 65 -> 16 channels at 8x8, float32), and the
    activations, which concatenate along the last dimension, then act along channels without moving data.
    """
    out = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=_same_padding(weight.shape[-1]))
    # For degenerate shapes (one channel or one pixel) conv2d may answer in NCHW: make the NHWC view contiguous.
    return out.permute(0, 2, 3, 1).contiguous()


def _conv_stacked(s: Tensor, weight: Tensor, bias: Tensor | None, batch: int) -> Tensor:
    """Convolve a channels-last stack of ``batch (1 + m)`` images (per sample: the primal, then ``m`` tangents).

    The bias is added to the primal images only: tangents are differences and ignore offsets.
    """
    out = _conv_nhwc(s, weight)
    if bias is not None:
        # In place on the primal rows only (a strided view): conv2d's backward does not need its output.
        out.view(batch, -1, *out.shape[1:])[:, 0].add_(bias)
    return out


def _activation_stacked(act: LipschitzActivation, s: Tensor, batch: int) -> Tensor:
    """Apply an activation to a channels-last stack: the primal images by value, the tangents by the derivative.

    A concatenated activation maps a tangent ``t`` to ``[f1'(x) t, f2'(x) t]``: the per-sample derivative is
    broadcast over the tangents and the expansion axis. The primal row of that product is then overwritten with
    the activation's value (allowed: ``mul`` saves its inputs, not its output), which spares a concatenation of
    the whole stack.
    """
    h, w, c = s.shape[1:]
    s5 = s.view(batch, -1, h, w, c)
    e = act.expansion
    value, deriv = act.forward_and_derivative(s5[:, 0])
    out = (deriv.view(batch, 1, h, w, e, c) * s5.unsqueeze(-2)).view(batch, -1, h, w, e * c)
    out[:, 0] = value
    return out.view(-1, h, w, e * c)


@dataclass
class PreparedConvNet(PreparedNet):
    """:class:`PreparedNet` of a :class:`ConvDenseNetG`, plus the weights with the concatenation factors folded in.

    Attributes:
        folded: per convolution, the normalised weight with each input channel multiplied by the factor its
            feature block carries in the concatenation (a product of etas). The network then concatenates the
            *unscaled* features, and no ``eta * features`` product over the (large) tangent stack is needed.
    """

    folded: list[Tensor] = field(default_factory=list)


class ConvDenseNetG(LearnableConcat, JacobianNet):
    """Convolutional i-DenseNet G with learnable concatenation (Perugachi-Diaz et al. 2021; Ahn et al. 2022).

    Each of the ``depth`` dense layers maps its input (``width`` channels) to ``growth / expansion`` channels with
    a ``kernel_size`` Lipschitz convolution of bound ``coeff``, applies the activation along channels (a
    concatenated one doubles them to ``growth``) and concatenates ``[eta1 * input, eta2 * new]`` along channels,
    ``(eta1, eta2) = lip_coeff * e / |e|`` with ``e = softplus(K) + 0.1``. A final ``final_kernel`` Lipschitz
    convolution maps back to ``in_channels``. Lip(G) <= coeff * lip_coeff^depth, with every convolution bounded on
    images of size ``input_shape``. The paper's image model: depth 3, growth 172 (3x3 convolutions to 86 channels,
    CPila).

    The event is the image ``(C, H, W)``; its flattened dimension ``in_features = C H W`` indexes Jacobians.
    ``evaluate`` and ``evaluate_with_jacobian`` accept images ``(B, C, H, W)`` or flattened events ``(B, C H W)``
    and return G in the same layout.

    Args:
        in_channels: channels ``C`` of the event.
        input_shape: spatial size ``(H, W)`` of the event.
        depth: number of dense layers.
        growth: channels added per dense layer.
        activation: registry name of the activation (``"cpila"``, ``"clipswish"``, ...).
        coeff: Lipschitz bound of each convolution.
        lip_coeff: norm of ``(eta1, eta2)``.
        learnable_concat: whether ``K`` may be trained (the trainer may also switch it on later).
        spectral_mode: ``"auto"``, ``"exact"`` or ``"power"`` (see :class:`SpectralConv2d`).
        kernel_size: kernel of the dense layers' convolutions.
        final_kernel: kernel of the final convolution.
        jacobian_chunk: default number of tangent directions per pass of :meth:`evaluate_with_jacobian`
            (``None``: all ``n`` at once).
    """

    def __init__(
        self,
        in_channels: int,
        input_shape: tuple[int, int],
        depth: int = 3,
        growth: int = 172,
        activation: str = "cpila",
        coeff: float = 0.9,
        lip_coeff: float = 0.98,
        learnable_concat: bool = True,
        spectral_mode: str = "auto",
        kernel_size: int = 3,
        final_kernel: int = 3,
        jacobian_chunk: int | None = None,
    ) -> None:
        super().__init__()
        h, w = (int(d) for d in input_shape)
        self.in_channels = in_channels
        self.input_shape = (h, w)
        self.in_features = in_channels * h * w
        self.coeff = float(coeff)
        self.lip_coeff = float(lip_coeff)
        self.jacobian_chunk = jacobian_chunk
        self.activations = nn.ModuleList()
        self.layers = nn.ModuleList()
        width = in_channels
        for _ in range(depth):
            act = get_activation(activation)
            hidden = max(1, growth // act.expansion)
            self.layers.append(SpectralConv2d(width, hidden, kernel_size, (h, w), coeff, mode=spectral_mode))
            self.activations.append(act)
            width += hidden * act.expansion
        self.final = SpectralConv2d(width, in_channels, final_kernel, (h, w), coeff, mode=spectral_mode)
        self.init_concat(depth, learnable_concat)

    def prepare(self) -> PreparedConvNet:
        convs = [*self.layers, self.final]
        weights = [conv.normalized_weight() for conv in convs]
        mix = self.mix_coefficients()
        pairs = [(mix[i, 0], mix[i, 1]) for i in range(mix.shape[0])]
        return PreparedConvNet(
            weights=weights,
            biases=[conv.bias for conv in convs],
            mix=pairs,
            folded=self._fold(weights, pairs),
        )

    def _fold(self, weights: list[Tensor], mix: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """Fold the concatenation factors into the input channels of each convolution (see PreparedConvNet).

        With ``s_l = [eta1_l s_{l-1}, eta2_l F_l]``, the factor of each channel of ``s_l`` is
        ``scale_l = [eta1_l scale_{l-1}, eta2_l 1]`` with ``scale_0 = 1``; layer ``l + 1`` applies
        ``W_{l+1} diag(scale_l)`` to the unscaled ``[x, F_1, ..., F_l]``.
        """
        folded = [weights[0]]
        scale = torch.ones(self.in_channels, dtype=weights[0].dtype, device=weights[0].device)
        for (eta1, eta2), weight in zip(mix, weights[1:], strict=True):
            added = weight.shape[1] - scale.shape[0]
            scale = torch.cat([eta1 * scale, eta2.expand(added)])
            folded.append(weight * scale.view(1, -1, 1, 1))
        return folded

    def _folded(self, prepared: PreparedNet) -> list[Tensor]:
        if isinstance(prepared, PreparedConvNet) and prepared.folded:
            return prepared.folded
        return self._fold(prepared.weights, prepared.mix)

    def _as_images(self, x: Tensor) -> tuple[Tensor, bool]:
        """``x`` as ``(B, C, H, W)`` images, and whether it came flattened."""
        c, (h, w) = self.in_channels, self.input_shape
        if x.dim() == 4 and tuple(x.shape[1:]) == (c, h, w):
            return x, False
        if x.dim() == 2 and x.shape[1] == self.in_features:
            return x.reshape(x.shape[0], c, h, w), True
        raise ValueError(
            f"ConvDenseNetG expects images of shape (batch, {c}, {h}, {w}) or flattened events of shape "
            f"(batch, {self.in_features}), got {tuple(x.shape)}"
        )

    def evaluate(self, x: Tensor, prepared: PreparedNet) -> Tensor:
        images, flat = self._as_images(x)
        weights = self._folded(prepared)
        s = images.permute(0, 2, 3, 1)  # channels-last, see _conv_nhwc
        for i, act in enumerate(self.activations):
            s = torch.cat([s, act(_conv_nhwc(s, weights[i], prepared.biases[i]))], dim=-1)
        out = _conv_nhwc(s, weights[-1], prepared.biases[-1]).permute(0, 3, 1, 2)
        # flattened events are in (C, H, W) order, as the Jacobian's columns and rows
        return out.reshape(x.shape[0], -1) if flat else out.contiguous()

    def linearize(self, x: Tensor, prepared: PreparedNet) -> tuple[Tensor, LinearMap]:
        """``G(x)`` and ``t -> J_G(x) t`` for single tangents (see :meth:`JacobianNet.linearize`).

        A product convolves the tangent by each layer's kernel (no bias), multiplies it by the activation's
        derivative kept from the value's pass and concatenates, channels-last as :meth:`evaluate`.
        """
        images, flat = self._as_images(x)
        weights = self._folded(prepared)
        s = images.permute(0, 2, 3, 1)  # channels-last, see _conv_nhwc
        derivs: list[Tensor] = []
        for i, act in enumerate(self.activations):
            new, deriv = value_and_derivative(
                cast(LipschitzActivation, act), _conv_nhwc(s, weights[i], prepared.biases[i])
            )
            derivs.append(deriv)
            s = torch.cat([s, new], dim=-1)
        out = _conv_nhwc(s, weights[-1], prepared.biases[-1]).permute(0, 3, 1, 2)
        value = out.reshape(x.shape[0], -1) if flat else out.contiguous()
        frozen = [w.detach() for w in weights]
        acts = [cast(LipschitzActivation, act) for act in self.activations]

        def jvp(t: Tensor) -> Tensor:
            with torch.no_grad():
                tangent_images, tangent_flat = self._as_images(t)
                ts = tangent_images.permute(0, 2, 3, 1)
                for i, act in enumerate(acts):
                    ts = torch.cat([ts, activation_tangent(act, derivs[i], _conv_nhwc(ts, frozen[i]))], dim=-1)
                o = _conv_nhwc(ts, frozen[-1]).permute(0, 3, 1, 2)
                return o.reshape(t.shape[0], -1) if tangent_flat else o.contiguous()

        return value, jvp

    def evaluate_with_jacobian(
        self, x: Tensor, prepared: PreparedNet, chunk: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return ``(G(x), J)`` with ``J[b, i, j] = dG_i / dx_j`` over the flattened ``(C, H, W)`` event.

        The ``n = C H W`` identity tangents travel with the primal image as one batch of ``B (1 + m)`` images per
        pass (``m`` = ``chunk`` directions, default :attr:`jacobian_chunk` or all ``n``): a convolution maps
        tangents by its kernel (bias on the primal only), the activation multiplies them by its derivative, the
        concatenation concatenates. Smaller chunks cap the size of each pass (each recomputes the primal); under
        autograd all passes stay alive for the backward.

        Returns:
            ``G(x)`` in the layout of ``x`` and ``J`` of shape ``(B, n, n)``, both differentiable.
        """
        images, flat = self._as_images(x)
        batch, n = images.shape[0], self.in_features
        c, (height, width) = self.in_channels, self.input_shape
        chunk = chunk if chunk is not None else self.jacobian_chunk
        chunk = n if chunk is None else max(1, min(int(chunk), n))
        weights = self._folded(prepared)
        primal = images.permute(0, 2, 3, 1).unsqueeze(1)  # (B, 1, H, W, C), channels-last
        # Basis vector j of the flattened (C, H, W) event, laid out channels-last.
        eye = torch.eye(n, dtype=images.dtype, device=images.device).view(n, c, height, width).permute(0, 2, 3, 1)
        value: Tensor | None = None
        columns: list[Tensor] = []
        for start in range(0, n, chunk):
            seeds = eye[start : start + chunk]
            m = seeds.shape[0]
            s = torch.cat([primal, seeds.expand(batch, *seeds.shape)], dim=1).view(batch * (1 + m), height, width, c)
            for i, act in enumerate(self.activations):
                h = _conv_stacked(s, weights[i], prepared.biases[i], batch)
                s = torch.cat([s, _activation_stacked(cast(LipschitzActivation, act), h, batch)], dim=-1)
            out = _conv_stacked(s, weights[-1], prepared.biases[-1], batch)
            # Back to the (C, H, W) order of the event: (B, 1 + m, n).
            out = out.view(batch, 1 + m, height, width, c).permute(0, 1, 4, 2, 3).reshape(batch, 1 + m, n)
            if value is None:
                value = out[:, 0]
            # Tangent row j holds column j of J.
            columns.append(out[:, 1:].transpose(1, 2))
        assert value is not None
        jac = columns[0] if len(columns) == 1 else torch.cat(columns, dim=2)
        return (value if flat else value.view_as(images)), jac
