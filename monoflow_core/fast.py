"""Fused exact path for stacks of small-dimensional blocks built on the project's DenseNet G.

The generic blocks (``monoflow_core.blocks``) work for any G through autograd. For the project's own
:class:`~monoflow_core.nn.densenet.DenseNetG` with a concatenated activation (CPila, CReLU, or CLipSwish, the
i-DenseNet baseline's, whose learnable ``beta`` is folded into the weights) in small dimensions (the paper's 2-D
and 1-D models) this module runs a whole run of consecutive blocks as one ``torch.autograd.Function`` with a
hand-written exact backward (docs/performance.md):

* weights: every block's spectrally normalised weights are computed *batched* over the blocks, and the
  DenseNet's concatenation weights, the activation's shift, ``1/1.06`` scale, Pila's ``k`` (times ``log2 e``,
  for ``exp2``) or CLipSwish's ``beta`` and ``1/(1.1 * 1.004)`` (:func:`_swish_gains`), and the ``[x, -x]`` of the
  concatenated activation are folded into them; the solver's copy of the
  last layer also carries the identity, so it yields ``w + G(w)`` and ``I + J_G`` directly;
* layout: feature-major, one column per point: the primal points and their ``n`` tangent copies side by side,
  so one evaluation of G with its Jacobian is one ``W @ X`` per layer and a handful of elementwise operations,
  written in place into a per-run workspace (no ``cat``, no ``where``);
* forward: Newton's method with the exact Jacobian (forward-mode tangents), each sample frozen once it meets
  the tolerance, or once it stalls (the generic solvers' stall exit, :class:`_StallTest`); the last evaluation is
  at the solution and provides ``J_G(w*)`` for the exact log-det and every activation the backward pass needs.
  Without a backward pass, finished samples leave the batch;
* backward: the implicit-function gradient in closed form (docs/algorithm.md §6), batched over the blocks wherever
  the blocks do not depend on each other: one reverse pass through the tangent networks of all blocks carries
  the log-dets' gradient (this is where the activation's second derivative enters); the recursion
  ``a = (g_w + v) (I + J)^{-1}`` (``g_w = sqrt 2 g`` for a monotone block, ``g`` for an inverse residual one) runs
  block by block on (n, B) tensors; one reverse pass through all primal
  networks carries ``-a dG/dtheta``; each weight gradient is one batched product.

The kernels of this path come in two implementations with the same algorithm and results (to rounding):

* compiled (:mod:`monoflow_core.kernels`, Numba; CPU, float32/float64): a run's solves, log-dets and backward,
  and the fold, are one compiled call each, per sample and layer in loops, with BLAS for the layer products.
  PyTorch's per-operator cost (a few microseconds, ~3,400 operators per training step of the paper's model)
  disappears. They compile at first use (about half a minute on a new machine, then loaded from Numba's on-disk
  cache in about a second), and the fused path waits for them (:data:`KERNELS_WAIT`): a run that switched from
  one kernel set to the other at whatever step the compile happened to finish would not be reproducible bit for
  bit. :func:`kernels_ready` without ``wait`` starts the compile in a background thread ahead of time (the studio
  does at start), which is cancelled and joined before the interpreter finalises (:func:`_stop_background_compiles`);
* PyTorch (this module): feature-major batched operators as described above; also the CUDA path, and the
  fallback without Numba or with ``MONOFLOW_KERNELS=0``.

Both paths agree to rounding in float64 (tests/core/test_fast.py runs on both kernel sets,
tests/core/test_kernels.py compares them piece by piece), and the generic path remains the reference.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import math
import os
import threading
import time
import typing
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import blas, kernels
from .kernel_cache import kernel_cache_dir
from .logdet import resolve_logdet_mode
from .nn.activations import CLipSwish, CPila, CReLU
from .nn.densenet import DenseNetG
from .solvers import (
    STALL_FACTOR,
    STALL_WINDOW,
    SolverStats,
    effective_tolerance,
    resolve_method,
    warn_unconverged,
)

__all__ = [
    "FAST_MAX_DIM",
    "FoldedNet",
    "fast_eligible",
    "fold_nets",
    "fold_scope",
    "folded_runs",
    "fusable_runs",
    "fused_inverse",
    "run_fused",
]

#: Solves without a backward pass remove converged samples from the batch once 1/COMPACT_FRACTION of it converged.
COMPACT_FRACTION = 4
#: Largest event dimension handled by the fused path (tangent cost grows with n).
FAST_MAX_DIM = 8
#: Whether the compiled per-sample kernels (:mod:`monoflow_core.kernels`, Numba) run the solves on CPU when
#: available; set False (or the environment variable ``MONOFLOW_KERNELS=0``) to use the PyTorch kernels throughout.
USE_KERNELS = os.environ.get("MONOFLOW_KERNELS", "1") != "0"
#: Fewest points per part when the compiled kernels split a batch over threads (:func:`kernel_parts`).
KERNEL_PART_MIN = 128
#: Threads the compiled kernels split a batch over; None follows ``torch.get_num_threads()`` (:func:`kernel_parts`).
KERNEL_THREADS: int | None = None
#: Whether the fused path waits for the compiled kernels at its first use for a dtype (compiling or loading them in
#: the calling thread, or waiting for a background compile already under way) rather than serving with the PyTorch
#: kernels until they are ready. Waiting makes the kernel set of every step a fixed function of the settings, so two
#: identical runs, and a resumed run and a straight one, agree bit for bit; serving meanwhile switches kernel sets
#: (which agree only to rounding) at whatever step the compile finishes. The cost is the wait itself, once per dtype
#: and process: about a second from Numba's on-disk cache, half a minute or more the first time on a machine.
KERNELS_WAIT = True
SQRT2 = math.sqrt(2.0)

# activation class -> (shift, output scale, kind)
_FAST_ACTIVATIONS: dict[type, tuple[float, float, str]] = {
    CPila: (CPila.shift, CPila.scale, "pila"),
    CReLU: (0.0, 1.0, "relu"),
    CLipSwish: (0.0, 1.0 / CLipSwish.divisor, "swish"),
}
#: Activation kinds of the folded networks -> the compiled kernels' activation codes.
_KERNEL_ACTIVATIONS = {"pila": kernels.ACT_PILA, "relu": kernels.ACT_RELU, "swish": kernels.ACT_SWISH}

_K = 5.0  # Pila's k in CPila
#: Folded into Pila's pre-activations with k so that ``e^(k x)`` is one ``exp2`` (twice as fast as ``exp`` here).
_LOG2E = 1.0 / math.log(2.0)


# net -> (activation spec, weight shapes): fixed once a network is built; looked up on every forward pass
_NET_FACTS: weakref.WeakKeyDictionary[DenseNetG, tuple[Any, Any]] = weakref.WeakKeyDictionary()


def _net_facts(net: DenseNetG) -> tuple[tuple[float, float, str] | None, tuple[tuple[int, ...], ...]]:
    facts = _NET_FACTS.get(net)
    if facts is None:
        facts = _NET_FACTS[net] = (
            _activation_spec_of(net),
            tuple(tuple(lin.weight.shape) for lin in [*net.layers, net.final]),
        )
    return facts


def _activation_spec_of(net: DenseNetG) -> tuple[float, float, str] | None:
    specs = {_FAST_ACTIVATIONS.get(type(a)) for a in net.activations}
    if len(specs) != 1 or None in specs:
        return None
    if any(getattr(a, "k", _K) != _K for a in net.activations):
        return None
    return next(iter(specs))


def _activation_spec(net: DenseNetG) -> tuple[float, float, str] | None:
    """``(shift, output scale, kind)`` of the network's activation if the fused path folds it, else None."""
    return _net_facts(net)[0]


def fast_eligible(block: Any, dim: int) -> bool:
    """Whether a block can run on the fused path for inputs of event dimension ``dim``."""
    from .blocks import InverseResidualBlock, MonotoneBlock, ResidualBlock

    if not isinstance(block, MonotoneBlock | ResidualBlock | InverseResidualBlock):
        return False
    net = block.net
    if not isinstance(net, DenseNetG) or _activation_spec(net) is None or dim > FAST_MAX_DIM:
        return False
    # "hybrid" means the estimator in training: the generic path implements it.
    hybrid = block.logdet_mode == "hybrid"
    if net.in_features != dim or hybrid or resolve_logdet_mode(block.logdet_mode, dim) != "exact":
        return False
    return resolve_method(block.solver, dim) == "newton" and block.implicit_grad != "backward_solve"


def _same_architecture(a: DenseNetG, b: DenseNetG) -> bool:
    return _net_facts(a) == _net_facts(b) and [lin.mode for lin in [*a.layers, a.final]] == [
        lin.mode for lin in [*b.layers, b.final]
    ]


def fusable_runs(blocks: Sequence[Any], dim: int) -> list[tuple[int, int]]:
    """Maximal index ranges ``[start, stop)`` of consecutive eligible blocks of one architecture."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, blk in enumerate(blocks):
        ok = fast_eligible(blk, dim)
        if ok and start is not None and not _same_architecture(blocks[start].net, blk.net):
            runs.append((start, i))
            start = i
        elif ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(blocks)))
    return runs


@dataclass
class FoldedNet:
    """Folded weights of a stack of ``nb`` DenseNet G networks (index ``j`` = block ``j`` of a run).

    The feature buffer of one evaluation (:class:`_Workspace`) has a leading bias row (1 on primal columns, 0 on
    tangent columns), so biases ride in the weights: layer ``i`` computes the pre-activations of its ``2k``
    concatenated units (``k [h - shift, -h - shift]`` for CPila) as ``weights[i][j] @ X[:1 + width_i]`` and G is
    ``final[j] @ X``. The concatenation weights, the activation's scale and Pila's k live in the weights, so the
    buffer holds raw activation outputs.
    """

    weights: list[Tensor]  # (nb, 2k, 1 + width_i)
    final: Tensor  # (nb, n, 1 + width_total)
    n: int
    kind: str  # "pila", "relu" or "swish"

    def tensors(self) -> list[Tensor]:
        return [*self.weights, self.final]

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], n: int, kind: str) -> FoldedNet:
        return cls(list(tensors[:-1]), tensors[-1], n, kind)

    def select(self, j: int) -> FoldedNet:
        """The fold of block ``j`` alone (a one-block stack of views)."""
        return FoldedNet([w[j : j + 1] for w in self.weights], self.final[j : j + 1], self.n, self.kind)

    def reversed(self) -> FoldedNet:
        """The fold of the same blocks in reverse order (copies)."""
        return FoldedNet([w.flip(0) for w in self.weights], self.final.flip(0), self.n, self.kind)

    def block(self, j: int) -> _BlockWeights:
        """Detached weights of block ``j`` for the feature-major evaluation kernels."""
        return _BlockWeights([w[j].detach() for w in self.weights], self.final[j].detach(), self.n, self.kind)


@dataclass
class _BlockWeights:
    weights: list[Tensor]  # (2k, 1 + width_i): left operands of the feature-major products
    final: Tensor  # (n, 1 + width_total)
    n: int
    kind: str

    @property
    def total(self) -> int:
        return self.final.shape[1]

    def map_weights(self, sign: float) -> Tensor:
        """Final weights of the map ``w + sign G(w)``: the identity rides on the input rows of the buffer.

        With them the last product yields ``w + sign G(w)`` on the primal columns and ``I + sign J_G`` on the
        tangent columns, i.e. the Newton residual's value and Jacobian without further operations.
        """
        eye = torch.zeros_like(self.final)
        eye[:, 1 : 1 + self.n] = torch.eye(self.n, dtype=eye.dtype, device=eye.device)
        return eye.add_(self.final) if sign > 0 else eye.sub_(self.final)


def _singular_pair(layers: Sequence[Any], w: Tensor) -> tuple[Tensor, Tensor]:
    """Batched vectors ``u, v`` with ``sigma = u^T W v``: the exact top singular pair (``"exact"`` mode, from an
    SVD outside autograd: the value and gradient ``u v^T`` of ``matrix_norm(W, 2)``) or the power-iteration
    buffers (``"power"`` mode)."""
    with torch.no_grad():
        if layers[0].mode == "exact":
            left, _, right_h = torch.linalg.svd(w.detach(), full_matrices=False)
            return left[..., 0], right_h[..., 0, :]
        return torch.stack([lin.u for lin in layers]), torch.stack([lin.v for lin in layers])


class _FoldLayer(torch.autograd.Function):
    """One layer position of the fold, batched over the blocks, with a hand-written backward.

    Forward: ``wn = W / max(1, sigma / coeff) * cols`` (soft spectral normalisation, docs/algorithm.md section 7, with
    ``sigma = u^T W v``, then the DenseNet's column scales); a hidden layer becomes
    ``[[k (b - shift), k wn], [k (-b - shift), -k wn]]`` (the concatenated activation's two halves), the final
    layer ``[b, wn]``. Autograd through these ~12 operators per layer cost more than the arithmetic; the
    backward here is the same chain rule in a few batched operations (checked against autograd in float64 by
    the fused-versus-generic tests).

    ``gain`` (nb,), if given, replaces the constant ``k`` of a hidden layer by a per-block factor that is itself
    differentiated: CLipSwish's learnable ``beta`` (see :func:`_swish_gains`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        w: Tensor,
        b: Tensor,
        cols: Tensor,
        u: Tensor,
        v: Tensor,
        coeff: Tensor,
        hidden: bool,
        shift: float,
        k: float,
        gain: Tensor | None = None,
    ) -> Tensor:
        # u^T W v (einsum measured 60 us here, two bmm 22 us)
        sigma = torch.bmm(torch.bmm(u.unsqueeze(1), w), v.unsqueeze(2)).view(-1)
        ratio = sigma / coeff
        s = torch.clamp(ratio, min=1.0)
        raw = w / s[:, None, None]
        wn = raw * cols[:, None, :]
        nb, m, width = w.shape
        if hidden and gain is not None:
            out = w.new_empty(nb, 2 * m, 1 + width)
            g1, g2 = gain[:, None], gain[:, None, None]
            torch.mul(torch.sub(b, shift), g1, out=out[:, :m, 0])
            torch.mul(torch.add(b, shift), g1, out=out[:, m:, 0]).neg_()
            torch.mul(wn, g2, out=out[:, :m, 1:])
            torch.mul(wn, g2, out=out[:, m:, 1:]).neg_()
        elif hidden:
            out = w.new_empty(nb, 2 * m, 1 + width)
            torch.mul(torch.sub(b, shift), k, out=out[:, :m, 0])
            torch.mul(torch.add(b, shift), -k, out=out[:, m:, 0])
            torch.mul(wn, k, out=out[:, :m, 1:])
            torch.mul(wn, -k, out=out[:, m:, 1:])
        else:
            out = torch.cat([b.unsqueeze(2), wn], dim=2)
        ctx.save_for_backward(w, raw, cols, u, v, coeff, s, ratio, *((b, wn, gain) if gain is not None else ()))
        ctx.hidden, ctx.k, ctx.shift = hidden, k, shift
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, raw, cols, u, v, coeff, s, ratio, *extra = ctx.saved_tensors
        m = w.shape[1]
        g_gain = None
        if ctx.hidden and extra:
            # out = gain [[b - shift, wn], [-b - shift, -wn]]: the gain's gradient pairs grad with that matrix
            b, wn, gain = extra
            shift = ctx.shift
            top0, bot0, d_wn = grad[:, :m, 0], grad[:, m:, 0], grad[:, :m, 1:] - grad[:, m:, 1:]
            g_gain = (top0 * (b - shift) - bot0 * (b + shift)).sum(1) + (d_wn * wn).sum((1, 2))
            g_b = (top0 - bot0).mul_(gain[:, None])
            g_wn = d_wn.mul_(gain[:, None, None])
        elif ctx.hidden:
            k = ctx.k
            g_b = (grad[:, :m, 0] - grad[:, m:, 0]).mul_(k)
            g_wn = (grad[:, :m, 1:] - grad[:, m:, 1:]).mul_(k)
        else:
            g_b, g_wn = grad[:, :, 0], grad[:, :, 1:]
        g_cols = (g_wn * raw).sum(1)
        g_raw = g_wn * cols[:, None, :]
        # raw = W / s, s = max(1, sigma / coeff) (clamp passes its gradient where ratio >= 1, as torch.clamp)
        g_sigma = (g_raw * w).sum((1, 2)).div_(s * s * coeff).neg_() * (ratio >= 1.0).to(w.dtype)
        g_w = g_raw / s[:, None, None] + g_sigma[:, None, None] * (u[:, :, None] * v[:, None, :])
        return g_w, g_b, g_cols, None, None, None, None, None, None, g_gain


def fold_nets(nets: Sequence[DenseNetG]) -> FoldedNet:
    """Fold a stack of same-architecture DenseNet G networks (differentiable in their parameters).

    With the compiled kernels ready (CPU, exact spectral norms) the fold is one compiled call each way
    (:class:`_KernelFold`); otherwise it is the PyTorch computation below, whose autograd is the reference.
    """
    if _kernel_fold_applies(nets):
        return _kernel_fold(nets)
    return fold_nets_torch(nets)


def _swish_gains(nets: Sequence[DenseNetG]) -> Tensor:
    """CLipSwish's ``beta = softplus(beta_raw)`` of every block and dense layer, (nb, depth), differentiable.

    The fold multiplies a hidden layer's pre-activations by ``beta`` (``h = beta z``), so that the activation kernels
    evaluate one fixed function, ``h sigmoid(h) = beta swish_beta(z)`` (LipSwish, Chen et al. 2019, section 4.1;
    CLipSwish, Perugachi-Diaz et al. 2021, section 3.2), and the later layers' column scales carry the remaining
    ``1 / (1.1 * 1.004 * beta)``. ``beta`` thus enters the folded weights only, and its gradient (including the
    exact log-det's second-order terms) flows back through the fold like the weights' own.
    """
    raw = torch.stack([a.beta_raw for g in nets for a in g.activations])
    return F.softplus(raw).view(len(nets), len(nets[0].activations))


def fold_nets_torch(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` in PyTorch operators (autograd through them)."""
    shift, scale, kind = _activation_spec(nets[0])  # type: ignore[misc]
    # Pila's k (times log2 e, for exp2) is folded into the pre-activations and 1/k into the next layers' weights;
    # CLipSwish's learnable beta likewise, per block and layer (_swish_gains).
    k = _K * _LOG2E if kind == "pila" else 1.0
    scale = scale / k
    gains = _swish_gains(nets) if kind == "swish" else None
    scales = scale / gains if gains is not None else None  # (nb, depth): the output scale of each layer
    depth = len(nets[0].layers)
    n = nets[0].in_features
    ref = nets[0].layers[0].weight
    lip = torch.tensor([g.lip_coeff for g in nets], dtype=ref.dtype, device=ref.device)
    e = F.softplus(torch.stack([g.concat_k for g in nets])) + 0.1  # (nb, depth, 2)
    mix = lip[:, None, None] * e / torch.linalg.vector_norm(e, dim=2, keepdim=True)
    eta1, eta2 = mix[..., 0], mix[..., 1]  # (nb, depth)
    nb = len(nets)
    ones = torch.ones(nb, 1, dtype=ref.dtype, device=ref.device)
    # prods[:, i] = prod_{l < i} eta1_l: how much the input block is scaled when it reaches layer i.
    prods = torch.cat([ones, torch.cumprod(eta1, dim=1)], dim=1)  # (nb, depth + 1)
    weights = []
    widths = [n]
    for i in range(depth + 1):
        # Scale of each feature block at the input of layer i: the input, then the new features of layer j < i.
        block_scales = [prods[:, i : i + 1]]
        for j in range(i):
            out_scale = scale if scales is None else scales[:, j : j + 1]
            block_scales.append(eta2[:, j : j + 1] * prods[:, i : i + 1] / prods[:, j + 1 : j + 2] * out_scale)
        cols = torch.cat([s.expand(nb, wdt) for s, wdt in zip(block_scales, widths, strict=True)], dim=1)
        hidden = i < depth
        stack = [g.layers[i] for g in nets] if hidden else [g.final for g in nets]
        w = torch.stack([lin.weight for lin in stack])
        u, v = _singular_pair(stack, w)
        coeff = torch.tensor([lin.coeff for lin in stack], dtype=w.dtype, device=w.device)
        b = torch.stack([lin.bias for lin in stack])
        gain = gains[:, i] if gains is not None and hidden else None
        weights.append(_FoldLayer.apply(w, b, cols, u, v, coeff, hidden, shift, k, gain))
        if not hidden:
            break
        widths.append(2 * w.shape[1])
    return FoldedNet(weights[:-1], weights[-1], n, kind)


def _kernel_fold_applies(nets: Sequence[DenseNetG]) -> bool:
    ref = nets[0].layers[0].weight
    spec = _activation_spec(nets[0])
    return (
        USE_KERNELS
        and kernels.AVAILABLE
        and ref.device.type == "cpu"
        and ref.dtype in (torch.float32, torch.float64)
        and spec is not None
        and spec[2] in _KERNEL_ACTIVATIONS
        and all(lin.mode == "exact" and lin.bias is not None for lin in [*nets[0].layers, nets[0].final])
        and kernels_ready(ref.dtype, wait=KERNELS_WAIT, backward=torch.is_grad_enabled())
    )


class _KernelFold(torch.autograd.Function):
    """:func:`fold_nets` as one compiled call each way (:func:`monoflow_core.kernels.fold_forward`).

    Inputs and output are flat, one row per block with the layers side by side (``layout`` has the offsets), so that
    one compiled version serves networks of every depth. ``gains`` and ``scales`` (nb, depth, float64) are each
    block's and hidden layer's pre-activation factor and output scale (constants for Pila and ReLU; CLipSwish's
    ``beta`` and ``1 / (1.1 * 1.004 * beta)``, differentiated, see :func:`_swish_gains`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, meta: tuple[Any, ...], concat_k: Tensor, wflat: Tensor, bflat: Tensor, gains: Tensor, scales: Tensor
    ) -> Tensor:
        lip, coeff, shift, layout = meta
        rows, cols, woffs, boffs, ooffs, voffs, out_size, v_size = layout
        nb = concat_k.shape[0]
        out = wflat.new_empty(nb, out_size)
        uflat = wflat.new_empty(bflat.shape)
        vflat = wflat.new_empty(nb, v_size)
        sig = wflat.new_empty(len(rows), nb)
        kernels.fold_forward(
            concat_k.detach().numpy(),
            lip,
            coeff,
            wflat.detach().numpy(),
            bflat.detach().numpy(),
            rows,
            cols,
            woffs,
            boffs,
            ooffs,
            voffs,
            gains.detach().numpy(),
            shift,
            scales.detach().numpy(),
            out.numpy(),
            uflat.numpy(),
            vflat.numpy(),
            sig.numpy(),
        )
        ctx.save_for_backward(concat_k, wflat, bflat, gains, scales)
        ctx.extra = (meta, uflat, vflat, sig)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        concat_k, wflat, bflat, gains, scales = ctx.saved_tensors
        (lip, coeff, shift, layout), uflat, vflat, sig = ctx.extra
        rows, cols, woffs, boffs, ooffs, voffs, _, _ = layout
        gw = torch.empty_like(wflat)
        gb = torch.empty_like(bflat)
        gk = torch.empty_like(concat_k)
        g_gains = torch.empty_like(gains)
        g_scales = torch.empty_like(scales)
        kernels.fold_backward(
            concat_k.detach().numpy(),
            lip,
            coeff,
            wflat.detach().numpy(),
            bflat.detach().numpy(),
            rows,
            cols,
            woffs,
            boffs,
            ooffs,
            voffs,
            gains.detach().numpy(),
            shift,
            scales.detach().numpy(),
            grad.contiguous().numpy(),
            uflat.numpy(),
            vflat.numpy(),
            sig.numpy(),
            gw.numpy(),
            gb.numpy(),
            gk.numpy(),
            g_gains.numpy(),
            g_scales.numpy(),
        )
        needs = ctx.needs_input_grad
        return None, gk, gw, gb, g_gains if needs[4] else None, g_scales if needs[5] else None


def _fold_layout(layers: Sequence[Any]) -> tuple[Any, ...]:
    """Shapes and offsets of one block's layers in :class:`_KernelFold`'s flat rows (see ``kernels.fold_forward``)."""
    rows = np.array([lin.weight.shape[0] for lin in layers], dtype=np.int64)
    cols = np.array([lin.weight.shape[1] for lin in layers], dtype=np.int64)
    outs = [(2 if i < len(layers) - 1 else 1) * r * (1 + c) for i, (r, c) in enumerate(zip(rows, cols, strict=True))]

    def offsets(sizes: Any) -> Any:
        return np.cumsum([0, *list(sizes)[:-1]]).astype(np.int64)

    return (
        rows,
        cols,
        offsets(rows * cols),
        offsets(rows),
        offsets(outs),
        offsets(cols),
        int(sum(outs)),
        int(cols.sum()),
    )


def _kernel_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` on the compiled kernels (differentiable through :class:`_KernelFold`)."""
    shift, scale, kind = _activation_spec(nets[0])  # type: ignore[misc]
    k = _K * _LOG2E if kind == "pila" else 1.0
    ref = nets[0].layers[0].weight
    nb, depth = len(nets), len(nets[0].layers)
    if kind == "swish":  # (float64: the fold's arithmetic with them is in float64, as with Pila's constant k)
        gains = _swish_gains(nets).to(torch.float64)
        scales = scale / gains
    else:
        gains = torch.full((nb, depth), k, dtype=torch.float64)
        scales = torch.full((nb, depth), scale / k, dtype=torch.float64)
    np_dtype = torch.empty(0, dtype=ref.dtype).numpy().dtype
    layers = [[*g.layers, g.final] for g in nets]
    positions = range(len(layers[0]))
    layout = _fold_layout(layers[0])
    wflat = torch.cat([torch.stack([row[i].weight for row in layers]).reshape(nb, -1) for i in positions], dim=1)
    bflat = torch.cat([torch.stack([row[i].bias for row in layers]) for i in positions], dim=1)
    lip = np.array([g.lip_coeff for g in nets], dtype=np_dtype)
    coeff = np.array([[row[i].coeff for row in layers] for i in positions], dtype=np_dtype)
    meta = (lip, coeff, shift, layout)
    out = _KernelFold.apply(meta, torch.stack([g.concat_k for g in nets]), wflat, bflat, gains, scales)
    return _folded_from_flat(out, layout, nets[0].in_features, kind)


def _folded_from_flat(out: Tensor, layout: tuple[Any, ...], n: int, kind: str) -> FoldedNet:
    """The :class:`FoldedNet` whose tensors are views of :class:`_KernelFold`'s flat output ``out``."""
    rows, cols, _, _, ooffs, _, _, _ = layout
    last = len(rows) - 1
    tensors = []
    for i in range(len(rows)):
        height = int(rows[i]) * (2 if i < last else 1)
        size = height * (1 + int(cols[i]))
        tensors.append(out[:, ooffs[i] : ooffs[i] + size].view(out.shape[0], height, 1 + int(cols[i])))
    return FoldedNet(tensors[:-1], tensors[-1], n, kind)


def _fold_key(nets: Sequence[DenseNetG]) -> tuple[Any, ...]:
    """Identity and version of the nets and of every tensor a fold reads, and the settings it folds in."""
    key: list[Any] = []
    for g in nets:
        key.append(id(g))
        for t in (*g.parameters(), *g.buffers()):
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key.extend((lin.mode, lin.coeff) for lin in [*g.layers, g.final])
        key.append(g.lip_coeff)
    return tuple(key)


_FOLD_SCOPE = threading.local()


@contextmanager
def fold_scope(cache: dict[Any, Any] | None = None) -> Iterator[dict[Any, Any]]:
    """Within this scope (on this thread) :func:`cached_fold` folds each run of blocks once.

    One evaluation (a density grid, a batch of samples) calls the fused path once per chunk and per block; folding
    costs a few milliseconds (exact spectral norms), which the scope saves after the first chunk. Folds are not
    kept beyond the scope: an optimizer may update parameters in place without bumping their version counters
    (the fused Adam kernel does not), so a fold remembered across evaluations could be stale. The weights must
    not change inside the scope. ``cache`` lets worker threads of one evaluation share the folds; a nested scope
    keeps the outer one's.
    """
    outer = getattr(_FOLD_SCOPE, "cache", None)
    _FOLD_SCOPE.cache = outer if outer is not None else ({} if cache is None else cache)
    try:
        yield _FOLD_SCOPE.cache
    finally:
        _FOLD_SCOPE.cache = outer


def cached_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` without autograd; inside a :func:`fold_scope`, each run of nets is folded once."""
    cache = getattr(_FOLD_SCOPE, "cache", None)
    key = _fold_key(nets) if cache is not None else None
    if cache is not None and key in cache:
        return cache[key][1]
    with torch.no_grad():
        folded = fold_nets(nets)
    if cache is not None:
        cache[key] = (list(nets), folded)  # the nets stay referenced, so their ids are not reused in the scope
    return folded


@contextmanager
def folded_runs(layers: Sequence[Any], dim: int) -> Iterator[None]:
    """A :func:`fold_scope` in which every run of fused blocks among ``layers`` is folded at once, up front.

    The transport view (and the inverse pass where the compiled kernels do not serve) takes the blocks one at a time
    (``cached_fold([block.net])``), and on the PyTorch path folding one block costs nearly as much as folding ten (a
    few milliseconds of small operators and spectral norms). Here each run is folded in one batch and filed under its
    own key (for :func:`fused_inverse_run`) and each block's slice under the block's, so the per-block calls find it.
    Without gradients only (the fold is made under ``no_grad``).
    """
    with fold_scope() as cache:
        for start, stop in fusable_runs(layers, dim):
            nets = [blk.net for blk in layers[start:stop]]
            keys = [_fold_key([g]) for g in nets]
            if len(nets) > 1 and not all(k in cache for k in keys):
                with torch.no_grad():
                    folded = fold_nets(nets)
                cache[_fold_key(nets)] = (nets, folded)  # (for fused_inverse_run)
                for j, (g, k) in enumerate(zip(nets, keys, strict=True)):
                    cache[k] = ([g], folded.select(j))
        yield


class _Consts:
    """Stacked constants on the right dtype/device, made once per dtype and device.

    ``horner`` holds the stacked coefficients (highest degree first, each of shape (2, 1, 1)) of two cubics in the
    folded variable ``y = min(h, 0)`` (see :func:`_activate`): ``y p(y / c)`` for the value and the derivative's
    polynomial.
    """

    _cache: typing.ClassVar[dict[tuple[torch.dtype, torch.device], dict[str, Any]]] = {}

    @classmethod
    def get(cls, like: Tensor) -> dict[str, Any]:
        key = (like.dtype, like.device)
        if key not in cls._cache:
            c = _LOG2E

            def col(a: float, b: float) -> Tensor:
                return torch.tensor([a, b], dtype=like.dtype, device=like.device).view(2, 1, 1)

            cls._cache[key] = {
                "horner": (col(0.5 / c**2, 0.5 / c**3), col(-1.0 / c, 0.5 / c**2), col(1.0, -1.0 / c), col(0.0, 1.0)),
            }
        return cls._cache[key]


class _Workspace:
    """Preallocated buffers of one or more blocks' evaluations of G with tangents, feature-major, and their views.

    ``x[j]`` holds block ``j``'s features, one row per feature and one column per point: columns ``[0, B)`` are
    the primal points, columns ``[(1 + t) B, (2 + t) B)`` the tangents along input direction ``t``. Row 0 is the
    bias row (1 on primal columns, 0 on tangents), rows ``1 .. n`` the input (``w`` and the identity), then each
    layer's activation outputs. Per layer ``i``: ``h[i]`` the pre-activations (primal and tangent columns),
    ``y[i] = min(h, 0)`` and ``e[i]`` its exponential on the primal columns, ``q[i]`` the stacked value and
    derivative polynomials times ``e`` (``q[i][:, 1]`` is the activation's derivative). ``out[j]`` is
    ``[w + sign G(w), I + sign J_G(w)]`` as an (n, (1 + n) B) matrix (see :meth:`_BlockWeights.map_weights`).
    The compiled kernels write only what their backward pass reads: ``x``, ``h``, ``e``, ``q[i][:, 1]`` and
    ``out`` (:func:`monoflow_core.kernels._evaluate`); ``y`` and the value polynomial stay unwritten.

    Every evaluation writes in place (``out=``), so the last evaluation of a solve stays there for the backward
    pass, and the views an evaluation needs are made once per block instead of once per iteration. The
    backward pass reads the same buffers batched over the blocks.
    """

    def __init__(self, net: _BlockWeights | FoldedNet, count: int, b: int, like: Tensor) -> None:
        n = net.n
        widths = [w.shape[-2] for w in net.weights]
        total = net.final.shape[-1]
        cols = (1 + n) * b
        self.n, self.b, self.count = n, b, count
        self.x = like.new_empty(count, total, cols)
        seed = self.x[:, : 1 + n]
        seed.zero_()
        seed[:, 0, :b] = 1.0
        for t in range(n):
            seed[:, 1 + t, (1 + t) * b : (2 + t) * b] = 1.0
        # Stacked over the layers (a DenseNet G has the same number of units in every layer), so that the compiled
        # kernels (monoflow_core.kernels) fill them in one call; the per-layer lists are views.
        depth, m = len(widths), widths[0]
        self.h_all = like.new_empty(depth, count, m, cols)
        self.y_all = like.new_empty(depth, count, m, b)
        self.e_all = like.new_empty(depth, count, m, b)
        self.q_all = like.new_empty(depth, count, 2, m, b)
        self.h, self.y, self.e, self.q = (list(t.unbind(0)) for t in (self.h_all, self.y_all, self.e_all, self.q_all))
        self.out = like.new_empty(count, n, cols)
        self._views: dict[int, _BlockViews] = {}

    def d(self, i: int) -> Tensor:
        """Activation derivatives of layer ``i``, (count, m, B)."""
        return self.q[i][:, 1]

    def jacobian_maps(self) -> Tensor:
        """``I + sign J_G`` of every block as a (count, n, n, B) stack (``[j, i, t, k] = dF_i/dw_t`` at point k)."""
        return self.out[:, :, self.b :].view(self.count, self.n, self.n, self.b)

    def block(self, j: int) -> _BlockViews:
        if j not in self._views:
            self._views[j] = _BlockViews(self, j)
        return self._views[j]


#: Workspaces whose autograd graph is gone, by shape, for the next training forward (at most _POOL_KEEP each).
_POOL: dict[tuple[Any, ...], list[_Workspace]] = {}
_POOL_LOCK = threading.Lock()
_POOL_KEEP = 2


def _workspace_key(net: FoldedNet, b: int, like: Tensor) -> tuple[Any, ...]:
    return (
        len(net.final),
        b,
        like.dtype,
        like.device,
        net.n,
        tuple(w.shape[-2] for w in net.weights),
        net.final.shape[-1],
    )


def _acquire_workspace(net: FoldedNet, b: int, like: Tensor) -> tuple[_Workspace, tuple[Any, ...]]:
    """A workspace for a training forward: a pooled one whose previous graph is gone, else a new one.

    Reusing saves the allocations and the ~400 views of a 10-block run every step. A workspace returns to the pool
    only when the autograd node that holds it is destroyed (see :func:`_release_with`), so a graph that is still
    alive (a second backward with ``retain_graph``, two forwards before one backward) never sees its buffers
    overwritten. Returns the workspace and its pool key.
    """
    key = _workspace_key(net, b, like)
    with _POOL_LOCK:
        free = _POOL.get(key)
        if free:
            return free.pop(), key
    return _Workspace(net, len(net.final), b, like), key


def _release_with(holder: Any, ws: _Workspace, key: tuple[Any, ...]) -> None:
    """Return ``ws`` to the pool when ``holder`` (a token kept by the autograd node) is garbage collected."""

    def release() -> None:
        with _POOL_LOCK:
            free = _POOL.setdefault(key, [])
            if len(free) < _POOL_KEEP:
                free.append(ws)

    weakref.finalize(holder, release)


class _GraphToken:
    """Lives exactly as long as the autograd node of one fused run (a weak-referenceable marker)."""


class _BlockViews:
    """The views of one block's slice of a :class:`_Workspace` that :func:`evaluate_with_jacobian` writes."""

    def __init__(self, ws: _Workspace, j: int) -> None:
        n, b = ws.n, ws.b
        x = ws.x[j]
        self.w_rows = x[1 : 1 + n, :b]
        self.x_in, self.x_act, self.x_tan = [], [], []
        self.h, self.h_p, self.h_t, self.y, self.e, self.q, self.q_value, self.d_u = [], [], [], [], [], [], [], []
        width = 1 + n
        for i in range(len(ws.h)):
            m = ws.h[i].shape[1]
            h = ws.h[i][j]
            self.x_in.append(x[:width])
            self.x_act.append(x[width : width + m, :b])
            self.x_tan.append(x[width : width + m, b:].view(m, n, b))
            self.h.append(h)
            self.h_p.append(h[:, :b])
            self.h_t.append(h[:, b:].view(m, n, b))
            self.y.append(ws.y[i][j])
            self.e.append(ws.e[i][j])
            q = ws.q[i][j]
            self.q.append(q)
            self.q_value.append(q[0])
            self.d_u.append(q[1].unsqueeze(1))
            width += m
        self.x = x
        self.out = ws.out[j]
        self.out_p = self.out[:, :b]
        self.jacobian_map = self.out[:, b:].view(n, n, b)
        # For the closed-form 2 x 2 Newton step: the entries of the Jacobian map and scratch for the step.
        self.entries = _entries(self.jacobian_map) if n == 2 else ()
        self.scratch = x.new_empty(3, b) if n == 2 else None


def _activate(kind: str, v: _BlockViews, i: int, c: dict[str, Any]) -> None:
    """Activation of layer ``i``'s primal pre-activations, in place: value into ``x``, ``y, e, q`` alongside.

    For Pila the pre-activations arrive as ``h = c k x`` (``k = 5``, ``c = log2 e``, folded into the weights).
    With ``y = min(h, 0)`` and ``e = 2^y = e^(k min(x, 0))`` the stored value is
    ``c k Pila(x) = relu(h) + y p(y / c) e`` with ``p(u) = u^2/2 - u + 1``, and the derivative is
    ``Pila'(x) = (u^3/2 + u^2/2 - u + 1) e`` at ``u = y / c`` (Ahn et al. 2022, Pila). Both cubics are evaluated
    in one stacked Horner scheme; no ``where`` is needed because the branches meet at 0 with two derivatives.

    For CLipSwish the pre-activations arrive as ``h = beta z`` (:func:`_swish_gains`); the stored value is
    ``h sigmoid(h)`` and its derivative ``s (1 + h (1 - s))`` with ``s = sigmoid(h)``, which goes into ``e``
    (the second derivative, :func:`_second`, reads it; ``y`` and the value polynomial stay unwritten).
    """
    hp = v.h_p[i]
    if kind == "relu":
        torch.clamp_min(hp, 0.0, out=v.x_act[i])
        v.q[i][1].copy_(hp > 0)
        return
    if kind == "swish":
        sig, d = v.e[i], v.q[i][1]
        torch.sigmoid(hp, out=sig)
        torch.mul(sig, -1.0, out=d).add_(1.0).mul_(hp).add_(1.0).mul_(sig)  # s (1 + h (1 - s))
        torch.mul(hp, sig, out=v.x_act[i])
        return
    a3, a2, a1, a0 = c["horner"]
    y, q = v.y[i], v.q[i]
    torch.clamp_max(hp, 0.0, out=y)
    torch.exp2(y, out=v.e[i])
    # (a mul and an in-place add: a ternary op broadcasting a (2, 1, 1) operand is 3x slower here)
    torch.mul(y, a3, out=q).add_(a2)
    torch.addcmul(a1, q, y, out=q)
    torch.addcmul(a0, q, y, out=q).mul_(v.e[i])
    torch.clamp_min(hp, 0.0, out=v.x_act[i]).add_(v.q_value[i])


def _second(kind: str, h: Tensor, y: Tensor, e: Tensor) -> Tensor | None:
    """Derivative of the activation's derivative with respect to the folded input ``h``; None for ReLU.

    ``dPila'(x)/dh = Pila''(x) / (c k) = (u^3/2 + 2 u^2) e / c`` with ``u = y / c``
    (``Pila''(x) = k (u^3/2 + 2 u^2) e^u``). For the folded swish ``h sigmoid(h)`` (``e`` holds ``s = sigmoid(h)``
    there): ``s (1 - s) (2 + h (1 - 2 s))``.
    """
    if kind == "relu":
        return None
    if kind == "swish":
        spread = torch.mul(e, -2.0).add_(1.0).mul_(h).add_(2.0)  # 2 + h (1 - 2 s)
        return torch.mul(e, -1.0).add_(1.0).mul_(e).mul_(spread)
    c = _LOG2E
    return torch.mul(y, 0.5 / c**4).add_(2.0 / c**3).mul_(y).mul_(y).mul_(e)


def evaluate_with_jacobian(net: _BlockWeights, w: Tensor, v: _BlockViews, final: Tensor) -> None:
    """The map ``w + sign G(w)`` and its Jacobian at the points ``w`` (n, B), written into the views ``v``.

    Each layer is one matrix product over the stacked primal and tangent columns (forward-mode tangents,
    docs/performance.md); ``final`` is :meth:`_BlockWeights.map_weights` (``sign``), so ``v.out_p`` receives
    ``w + sign G(w)`` and ``v.jacobian_map`` receives ``I + sign J_G(w)``.
    """
    c = _Consts.get(w)
    v.w_rows.copy_(w)
    for i, weight in enumerate(net.weights):
        torch.mm(weight, v.x_in[i], out=v.h[i])
        _activate(net.kind, v, i, c)
        torch.mul(v.h_t[i], v.d_u[i], out=v.x_tan[i])
    torch.mm(final, v.x, out=v.out)


def _activation_value(kind: str, h: Tensor, out: Tensor) -> None:
    """The value alone of :func:`_activate` (``relu(h) + y p(y / c) e``, or ``h sigmoid(h)``), written into ``out``."""
    if kind == "relu":
        torch.clamp_min(h, 0.0, out=out)
        return
    if kind == "swish":
        torch.mul(h, torch.sigmoid(h), out=out)
        return
    c = _LOG2E
    y = torch.clamp_max(h, 0.0)
    q = torch.mul(y, 0.5 / c**2).add_(-1.0 / c).mul_(y).add_(1.0).mul_(y).mul_(torch.exp2(y))
    torch.clamp_min(h, 0.0, out=out).add_(q)


def evaluate(net: _BlockWeights, w: Tensor, final: Tensor) -> Tensor:
    """``final`` applied to G's features at the points ``w`` (n, B), e.g. ``w + G(w)``; no tangents, no autograd."""
    n, b = w.shape
    x = w.new_empty(net.total, b)
    x[0] = 1.0
    x[1 : 1 + n] = w
    width = 1 + n
    for weight in net.weights:
        m = weight.shape[0]
        _activation_value(net.kind, torch.mm(weight, x[:width]), x[width : width + m])
        width += m
    return torch.mm(final, x)


# Small n x n algebra on (..., n, n, B) stacks (the batch last, as the feature-major kernels produce them).


def _entries(a: Tensor) -> tuple[Tensor, ...]:
    """The entries of 2 x 2 matrices in (..., 2, 2, B): ``a00, a01, a10, a11``, each (..., B)."""
    row0, row1 = a.unbind(-3)
    return (*row0.unbind(-2), *row1.unbind(-2))


def _det2(a00: Tensor, a01: Tensor, a10: Tensor, a11: Tensor) -> Tensor:
    return torch.addcmul(a00 * a11, a01, a10, value=-1.0)


def _max_abs(r: Tensor) -> Tensor:
    """``max_i |r_i|`` per point (column) of an (n, B) residual.

    (``linalg.vector_norm(r, inf, dim=0)`` measured 125 us at B = 500 here; ``abs().amax(0)`` 6 us, also a little
    faster than ``maximum`` of the unbound rows.)
    """
    return r.abs().amax(dim=0)


def _newton_step(
    w: Tensor, a: Tensor, r: Tensor, entries: tuple[Tensor, ...] = (), scratch: Tensor | None = None
) -> Tensor:
    """``w - a^{-1} r`` per point (columns); for n = 2 by Cramer's rule in a handful of fused operations.

    ``entries`` (``a00, a01, a10, a11`` as views) and ``scratch`` (3, B) may be passed to skip their creation.
    """
    n = a.shape[0]
    if n == 1:
        return torch.addcdiv(w, r, a[0], value=-1.0)
    if n != 2:
        return w - torch.linalg.solve(a.permute(2, 0, 1), r.t()).t()
    a00, a01, a10, a11 = entries or _entries(a)
    buf = r.new_empty(3, r.shape[1]) if scratch is None else scratch
    r0, r1 = r.unbind(0)
    # rows 0, 1: the adjugate times r; row 2: det(a)
    torch.mul(a11, r0, out=buf[0]).addcmul_(a01, r1, value=-1.0)
    torch.mul(a00, r1, out=buf[1]).addcmul_(a10, r0, value=-1.0)
    torch.mul(a00, a11, out=buf[2]).addcmul_(a01, a10, value=-1.0)
    return torch.addcdiv(w, buf[:2], buf[2], value=-1.0)


def _inv_small(a: Tensor) -> Tensor:
    """Inverse of every (n, n) matrix of an (..., n, n, B) stack; closed form for n = 1 and 2."""
    n = a.shape[-2]
    if n == 1:
        return a.reciprocal()
    if n == 2:
        a00, a01, a10, a11 = _entries(a)
        inv = torch.stack((a11, -a01, -a10, a00), dim=-2).div_(_det2(a00, a01, a10, a11).unsqueeze(-2))
        return inv.unflatten(-2, (2, 2))
    return torch.linalg.inv(a.movedim(-1, -3)).movedim(-3, -1)


def _logabsdet(a: Tensor) -> Tensor:
    """``log|det|`` of every (n, n) matrix of an (..., n, n, B) stack, shape (..., B)."""
    n = a.shape[-2]
    if n == 1:
        return torch.log(torch.abs(a[..., 0, 0, :]))
    if n == 2:
        return torch.log(torch.abs(_det2(*_entries(a))))
    return torch.linalg.slogdet(a.movedim(-1, -3)).logabsdet


def _rejected(res: Tensor, prev: tuple[Tensor, ...] | None, plain: Tensor | None) -> Tensor | None:
    """The points just evaluated that :func:`_safeguard` rejects: a Newton candidate whose residual grew compared
    with ``prev`` (the previous accepted ``(w, r, res)``); a plain step (marked in ``plain``) is always accepted.
    None before there is anything to compare with."""
    if prev is None:
        return None
    worse = res > prev[2]
    if plain is not None:
        worse = worse.logical_and_(plain.logical_not())
    return worse


def _safeguard(
    w: Tensor,
    r: Tensor,
    res: Tensor,
    cand: Tensor,
    prev: tuple[Tensor, ...] | None,
    plain: Tensor | None,
    worse: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor | None]:
    """Guard Newton's candidates ``cand`` from the points ``w`` (residuals ``r``, norms ``res``).

    Where a Newton step made the residual grow (compared with ``prev``, the previous accepted ``(w, r, res)``),
    it is discarded for the plain contracting step from the previous point, ``w_prev - r_prev``. That plain step
    (marked in ``plain``) is accepted without comparison next time, so no sample stalls on one point or cycles.
    ``worse``: :func:`_rejected` of these arguments if already computed. Returns the guarded candidates and the new
    ``(prev, plain)``.
    """
    if prev is None:
        return cand, (w, r, res), None
    if worse is None:
        worse = _rejected(res, prev, plain)
        assert worse is not None
    if bool(worse.any()):
        cand = torch.where(worse, prev[0] - prev[1], cand)
        prev = tuple(torch.where(worse, old, new) for old, new in zip(prev, (w, r, res), strict=True))
        return cand, prev, worse
    return cand, (w, r, res), None


class _StallTest:
    """The stall exit of the generic solvers (:data:`~monoflow_core.solvers.STALL_WINDOW`,
    :data:`~monoflow_core.solvers.STALL_FACTOR`, docs/solvers.md "Stall exit") for the fused Newton solves.

    A point whose Euclidean residual ``|r|_2`` has not fallen below ``STALL_FACTOR`` times its value at the last such
    decrease for ``STALL_WINDOW`` iterations stops, as not converged. A rejected Newton candidate (:func:`_rejected`)
    is no progress, and a point stops only at an accepted point (after a rejected candidate it first takes the plain
    step), so the evaluation kept for the log-det and the backward pass is always at a point the solve accepted.
    Kept as squares (``|r|_2^2`` against ``STALL_FACTOR^2`` times the reference), which is the same test without a
    square root. The compiled kernels apply the same rule (:func:`monoflow_core.kernels.solve_run`).
    """

    def __init__(self, b: int, like: Tensor) -> None:
        #: ``STALL_FACTOR^2 |r|_2^2`` at each point's last decrease (the bar its next merit must get under)
        self.bar = like.new_full((b,), math.inf)
        #: the iteration of each point's last decrease (0: none yet)
        self.last = torch.zeros(b, dtype=torch.long, device=like.device)

    def update(self, r: Tensor, rejected: Tensor | None, it: int) -> Tensor | None:
        """Record the residuals ``r`` (n, B) of iteration ``it``; the points that stall now, or None while none can.

        (Before ``STALL_WINDOW`` iterations no point can have gone that long without a decrease: the mask is not
        formed, which saves its operators in the usual solve of a few iterations.)
        """
        merit = torch.linalg.vecdot(r, r, dim=0)
        better = merit < self.bar  # False for a NaN residual
        accepted = None if rejected is None else rejected.logical_not()
        if accepted is not None:
            better.logical_and_(accepted)
        self.bar = torch.where(better, merit.mul_(STALL_FACTOR * STALL_FACTOR), self.bar)
        self.last = torch.where(better, it, self.last)
        if it < STALL_WINDOW:
            return None
        stuck = self.last <= it - STALL_WINDOW
        return stuck if accepted is None else stuck.logical_and_(accepted)

    def select(self, keep: Tensor) -> None:
        """Keep the points at the positions ``keep`` (a compacting solve)."""
        self.bar, self.last = self.bar.index_select(0, keep), self.last.index_select(0, keep)


def _newton(
    net: _BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, v: _BlockViews
) -> tuple[Tensor, SolverStats]:
    """Solve ``w + sign G(w) = rhs`` (points as columns of ``rhs``) by safeguarded Newton, freezing samples.

    Every sample stops moving once its relative residual ``|w + sign G(w) - rhs|_inf / (1 + |rhs|_inf)`` meets
    the tolerance, or once it stalls (:class:`_StallTest`), so the final evaluation (kept in the views ``v``) is at
    the returned point for every sample: its Jacobian and activations are exact there for the log-det and the
    backward pass. The hot loop avoids Python-scalar arithmetic and per-entry indexing (each costs an operator
    dispatch).
    """
    b = rhs.shape[1]
    tol = effective_tolerance(tol, rhs.dtype)
    threshold = rhs.abs().amax(dim=0).add_(1.0).mul_(tol)
    final = net.map_weights(sign)
    w = rhs
    conv: Tensor | None = None
    stalled: Tensor | None = None
    history: list[Tensor] = []  # the finished (converged or stalled) samples after each iteration
    prev: tuple[Tensor, ...] | None = None  # (w, r, res) of the previous accepted iterate
    plain: Tensor | None = None  # samples whose current point came from a plain step
    stall = _StallTest(b, rhs)
    it = 0
    while True:
        it += 1
        evaluate_with_jacobian(net, w, v, final)
        r = torch.sub(v.out_p, rhs)
        res = _max_abs(r)
        ok = res <= threshold
        rejected = _rejected(res, prev, plain)
        stuck = stall.update(r, rejected, it)
        conv = ok if conv is None else conv | ok
        if stuck is not None:
            stalled = stuck if stalled is None else stalled | stuck
        done = conv if stalled is None else conv | stalled
        history.append(done)
        if it >= max_iter or bool(done.all()):
            break
        cand = _newton_step(w, v.jacobian_map, r, v.entries, v.scratch)
        cand, prev, plain = _safeguard(w, r, res, cand, prev, plain, rejected)
        w = torch.where(done, w, cand)
    stuck_at_end = None if stalled is None else stalled.logical_and(conv.logical_not())
    stats = _stats(history, res / threshold * tol, conv, it, tol, max_iter, stuck_at_end)
    _warn_unconverged(stats, label)
    return w, stats


def _newton_compact(
    net: _BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, want_jacobian: bool
) -> tuple[Tensor, Tensor | None, SolverStats]:
    """:func:`_newton` without a backward pass: finished samples leave the batch (no autograd, no buffers kept).

    Returns ``(w, I + sign J_G(w) or None, stats)``. A sample that converged or stalled stops moving at once (as in
    :func:`_newton`); it is written out and removed from the batch once at least ``1/COMPACT_FRACTION`` of the batch
    has finished (removal costs a few index operations, so a handful of early finishers ride along frozen).
    Its Jacobian map comes from an evaluation at the returned point. Stragglers are cheap: the batch shrinks to
    the samples that still need work.
    """
    n, b = rhs.shape
    tol = effective_tolerance(tol, rhs.dtype)
    threshold = rhs.abs().amax(dim=0).add_(1.0).mul_(tol)
    final = net.map_weights(sign)
    w_out = torch.empty_like(rhs)
    a_out = rhs.new_empty(n, n, b) if want_jacobian else None
    iterations = torch.empty(b, dtype=torch.long, device=rhs.device)
    residual = rhs.new_empty(b)
    converged = torch.zeros(b, dtype=torch.bool, device=rhs.device)
    stalled = torch.zeros(b, dtype=torch.bool, device=rhs.device)
    active = torch.arange(b, device=rhs.device)
    w, target, thr = rhs, rhs, threshold
    seen: Tensor | None = None  # finished (frozen: converged or stalled) samples of the current batch
    conv: Tensor | None = None  # those of them that converged
    first: Tensor | None = None  # the iteration at which each of them finished
    prev: tuple[Tensor, ...] | None = None
    plain: Tensor | None = None
    stall = _StallTest(b, rhs)
    v = _Workspace(net, 1, b, rhs).block(0)
    it = 0
    while True:
        it += 1
        m = w.shape[1]
        if v.out_p.shape[1] != m:
            v = _Workspace(net, 1, m, rhs).block(0)
        evaluate_with_jacobian(net, w, v, final)
        r = torch.sub(v.out_p, target)
        res = _max_abs(r)
        ok = res <= thr
        rejected = _rejected(res, prev, plain)
        stuck = stall.update(r, rejected, it)
        now = ok if stuck is None else ok.logical_or(stuck)
        if seen is None:
            n_seen = int(now.sum())
            if n_seen:
                seen, conv, first = now, ok, torch.where(now, it, 0)
        else:
            assert conv is not None and first is not None
            new = now.logical_and(seen.logical_not())
            seen = seen.logical_or(now)
            conv = conv.logical_or(ok)
            first = torch.where(new, it, first)
            n_seen = int(seen.sum())
        a = v.jacobian_map
        last = it >= max_iter
        if last or n_seen == m or n_seen * COMPACT_FRACTION >= m:
            done = torch.ones_like(ok) if last else seen
            assert done is not None
            pos = done.nonzero().squeeze(1)
            ids = active.index_select(0, pos)
            w_out.index_copy_(1, ids, w.index_select(1, pos))
            if a_out is not None:
                a_out.index_copy_(2, ids, a.index_select(2, pos))
            its = torch.full_like(ids, it) if first is None else torch.where(seen, first, it).index_select(0, pos)
            iterations.index_copy_(0, ids, its)
            residual.index_copy_(0, ids, res.index_select(0, pos).div_(thr.index_select(0, pos)).mul_(tol))
            if seen is None or conv is None:
                converged.index_copy_(0, ids, ok.index_select(0, pos))
            else:
                converged.index_copy_(0, ids, conv.index_select(0, pos))
                stalled.index_copy_(0, ids, seen.logical_and(conv.logical_not()).index_select(0, pos))
            if last or n_seen == m:
                break
            assert seen is not None
            keep = seen.logical_not().nonzero().squeeze(1)
            active = active.index_select(0, keep)
            w, target, thr = w.index_select(1, keep), target.index_select(1, keep), thr.index_select(0, keep)
            r, res, a = r.index_select(1, keep), res.index_select(0, keep), a.index_select(2, keep)
            if prev is not None:
                prev = (prev[0].index_select(1, keep), prev[1].index_select(1, keep), prev[2].index_select(0, keep))
            if plain is not None:
                plain = plain.index_select(0, keep)
            if rejected is not None:
                rejected = rejected.index_select(0, keep)
            stall.select(keep)
            seen = conv = first = None
        views = (v.entries, v.scratch) if a is v.jacobian_map else ((), None)  # a may be a compacted copy
        cand, prev, plain = _safeguard(w, r, res, _newton_step(w, a, r, *views), prev, plain, rejected)
        w = cand if seen is None else torch.where(seen, w, cand)
    stats = SolverStats("newton", iterations, residual, converged, it, tol, max_iter, stalled=stalled)
    _warn_unconverged(stats, label)
    return w_out, a_out, stats


def _stats(
    history: list[Tensor],
    residual: Tensor,
    conv: Tensor,
    it: int,
    tol: float,
    max_iter: int,
    stalled: Tensor | None = None,
) -> SolverStats:
    """Per-sample statistics from the finished masks of each iteration (evaluations until converged or stalled)."""
    if len(history) > 1:
        iterations = torch.stack(history[:-1]).logical_not().sum(0).add_(1)
    else:
        iterations = torch.ones_like(conv, dtype=torch.long)
    if stalled is None:
        stalled = torch.zeros_like(conv)
    return SolverStats("newton", iterations, residual, conv, it, tol, max_iter, stalled=stalled)


def _warn_unconverged(stats: SolverStats, label: str) -> None:
    """The generic solvers' :class:`SolverWarning` (:func:`monoflow_core.solvers.warn_unconverged`), issued at the
    caller of the fused path's entry point."""
    warn_unconverged(stats, label, stacklevel=6)


class _ReverseLayout:
    """Where every cotangent of the backward pass lives, and the weight blocks that carry them down.

    All cotangents of one pass sit in one buffer ``C`` (blocks, K, columns) with rows
    ``[G's outputs (n); layer L-1's pre-activations; ...; layer 0's]``. The cotangent of layer ``i``'s *outputs*
    is then one product ``M_i^T C[:, :K_i]``, where ``M_i`` stacks the columns that read those outputs in the final
    layer and in every later layer (``K_i`` = their rows). That replaces accumulating into a cotangent of the whole
    feature buffer (a strided in-place ``baddbmm_`` per layer, 3-4x slower here) by products with fresh outputs.
    """

    def __init__(self, net: FoldedNet) -> None:
        n = net.n
        weights = [w.detach() for w in net.weights]
        final = net.final.detach()
        self.m = [w.shape[1] for w in weights]
        starts = [w.shape[2] for w in weights]  # layer i's outputs start at row width_i of the feature buffer
        depth = len(weights)
        self.offset = [0] * depth  # row of layer i's pre-activation cotangents in C
        rows = n
        for i in reversed(range(depth)):
            self.offset[i] = rows
            rows += self.m[i]
        self.rows = rows
        self.reader: list[Tensor] = []  # M_i, (blocks, K_i, m_i)
        for i in range(depth):
            cols = slice(starts[i], starts[i] + self.m[i])
            self.reader.append(
                torch.cat([final[:, :, cols], *(weights[j][:, :, cols] for j in reversed(range(i + 1, depth)))], dim=1)
            )
        inputs = slice(1, 1 + n)  # the input rows (w); the bias row has no cotangent worth computing
        self.input_reader = torch.cat(
            [final[:, :, inputs], *(weights[j][:, :, inputs] for j in reversed(range(depth)))], dim=1
        )


def _reverse_tangents(net: FoldedNet, ws: _Workspace, lay: _ReverseLayout, c: Tensor) -> Tensor:
    """Reverse pass through G and its tangents of every block at once; returns dL/dw, (blocks, n, B).

    ``c[:, :n]`` holds each block's cotangent of ``[G, J_G]``; the pre-activation cotangents of every layer
    (primal and tangent columns) are written below it (:class:`_ReverseLayout`). The tangent path is where the
    activation's second derivative enters (the log-det's gradient). Batched over blocks: nothing here depends on
    the other blocks' gradients.
    """
    n, b, nb = ws.n, ws.b, ws.count
    for i in reversed(range(len(net.weights))):
        m = lay.m[i]
        cx = torch.bmm(lay.reader[i].transpose(1, 2), c[:, : lay.offset[i]])
        cx_t = cx[:, :, b:].view(nb, m, n, b)
        slot = c[:, lay.offset[i] : lay.offset[i] + m]
        d = ws.d(i)
        torch.mul(cx_t, d.unsqueeze(2), out=slot[:, :, b:].view(nb, m, n, b))
        torch.mul(cx[:, :, :b], d, out=slot[:, :, :b])
        d2 = _second(net.kind, ws.h[i][:, :, :b], ws.y[i], ws.e[i])
        if d2 is not None:
            h_t = ws.h[i][:, :, b:].view(nb, m, n, b)
            # sum_t c_t * ht_t, as a chain of fused products (a reduction across the middle dimension is slow)
            paired = torch.mul(cx_t[:, :, 0], h_t[:, :, 0])
            for t_ in range(1, n):
                paired.addcmul_(cx_t[:, :, t_], h_t[:, :, t_])
            slot[:, :, :b].addcmul_(paired, d2)
    return torch.bmm(lay.input_reader.transpose(1, 2), c[:, :, :b])


def _reverse_primals(ws: _Workspace, lay: _ReverseLayout, c: Tensor) -> None:
    """Reverse pass through every block's primal network; ``c[:, :n]`` (blocks, n, B) holds the cotangents of G.

    Writes each layer's pre-activation cotangents below them (:class:`_ReverseLayout`, primal columns only).
    """
    for i in reversed(range(len(lay.m))):
        m = lay.m[i]
        cx = torch.bmm(lay.reader[i].transpose(1, 2), c[:, : lay.offset[i]])
        torch.mul(cx, ws.d(i), out=c[:, lay.offset[i] : lay.offset[i] + m])


@dataclass
class _Plan:
    blocks: list[Any]
    n: int
    kind: str


def _row_combination(m: Tensor, g: Tensor) -> Tensor:
    """``g^T M`` per point: ``out[t] = sum_i g[i] M[i, t]`` for an (n, n, B) stack and (n, B) vectors.

    (A chain of fused products: a reduction over the leading dimension of these small stacks is slower here.)
    """
    out = m[0] * g[0]
    for i in range(1, m.shape[0]):
        out.addcmul_(m[i], g[i])
    return out


def _logdet_terms(kinds: Sequence[str], a: Tensor) -> tuple[Tensor, list[int], Tensor | None]:
    """The pieces of each block's log-det in terms of its Jacobian map ``a = I + J_G`` (blocks, n, n, B).

    Returns ``(sign, mono, a_minus)``: the log-det is ``sign_j log|det A_j|`` (+1 residual, -1 inverse residual and
    monotone; docs/algorithm.md §3) plus ``log|det(2I - A_j)| = log|det(I - J)|`` for the monotone blocks
    ``mono``, whose ``2I - A`` stack is ``a_minus`` (None without monotone blocks).
    """
    sign = torch.tensor([1.0 if k == "residual" else -1.0 for k in kinds], dtype=a.dtype, device=a.device)
    mono = [j for j, k in enumerate(kinds) if k == "monotone"]
    if not mono:
        return sign, mono, None
    two = 2.0 * torch.eye(a.shape[1], dtype=a.dtype, device=a.device).unsqueeze(2)
    return sign, mono, torch.sub(two, a if len(mono) == len(kinds) else a[mono])


def _logdet_sum(kinds: Sequence[str], a: Tensor) -> Tensor:
    """Summed log-dets of blocks of the given kinds from their Jacobian maps (see :func:`_logdet_terms`)."""
    sign, _, a_minus = _logdet_terms(kinds, a)
    total = (_logabsdet(a) * sign.unsqueeze(1)).sum(0)
    return total if a_minus is None else total + _logabsdet(a_minus).sum(0)


def _block_solve(block: Any, weights: _BlockWeights, x: Tensor, v: _BlockViews | None) -> tuple[Tensor, Tensor | None]:
    """One block on points ``x`` (n, B): ``(y, I + J_G at the solution, or None)``; records solver stats.

    With views ``v`` the final evaluation stays in the workspace for the backward pass (and the log-det, computed
    for all blocks at once); without (no gradient needed) converged samples leave the solve early and the
    Jacobian map is returned.
    """
    kind = block.kind
    b = x.shape[1]
    if kind == "residual":
        view = _Workspace(weights, 1, b, x).block(0) if v is None else v
        evaluate_with_jacobian(weights, x, view, weights.map_weights(1.0))
        return view.out_p, view.jacobian_map if v is None else None
    rhs = SQRT2 * x if kind == "monotone" else x
    label = f"{type(block).__name__} forward solve"
    a = None
    if v is None:
        w, a, block.forward_stats = _newton_compact(weights, rhs, 1.0, block.tol, block.max_iter, label, True)
    else:
        w, block.forward_stats = _newton(weights, rhs, 1.0, block.tol, block.max_iter, label, v)
    return (SQRT2 * w - x if kind == "monotone" else w), a


def _fused_forward(x: Tensor, plan: _Plan, net: FoldedNet, ws: _Workspace | None) -> tuple[Tensor, Tensor]:
    """Forward through the run on points ``x`` (n, B): ``(y, summed log-det)``.

    With a workspace ``ws`` (training), every block evaluates into its own slice of it, where the backward pass
    finds it; without, the solves drop converged samples and nothing is kept.
    """
    maps: list[Tensor] = []  # without a workspace: each block's Jacobian map, as the solves return them
    for j, block in enumerate(plan.blocks):
        x, a = _block_solve(block, net.block(j), x, ws.block(j) if ws is not None else None)
        block.last_logdet_exact = True
        if a is not None:
            maps.append(a)
    kinds = [blk.kind for blk in plan.blocks]
    return x, _logdet_sum(kinds, ws.jacobian_maps() if ws is not None else torch.stack(maps))


# The compiled kernels (monoflow_core.kernels): per block of a run, how its solve and log-det are set up.
# kind -> (mode, rhs scale, output weight of the solution, output weight of the input, log|det A|, log|det(2I - A)|)
_KERNEL_FORWARD = {
    "residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 1.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, -1.0, 1.0),
    "inverse_residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, -1.0, 0.0),
}
# the inverses (no log-det): x = y + G(y) for an inverse residual block, otherwise solve w + sign G(w) = rhs
_KERNEL_INVERSE = {
    "inverse_residual": (kernels.MODE_EVALUATE, 1.0, 1.0, 0.0, 0.0, 0.0),
    "monotone": (kernels.MODE_SOLVE, SQRT2, SQRT2, -1.0, 0.0, 0.0),
    "residual": (kernels.MODE_SOLVE, 1.0, 1.0, 0.0, 0.0, 0.0),
}


def kernels_apply(x: Tensor, net: FoldedNet, backward: bool = True) -> bool:
    """Whether the compiled kernels serve points ``x`` with the folded weights ``net`` (CPU, float32/64).

    They serve once compiled for ``x``'s dtype and for what the caller needs (:func:`kernels_ready`; ``backward``:
    a forward pass whose backward pass follows, else a solve without gradients). The first call waits for them
    (:data:`KERNELS_WAIT`); without waiting the PyTorch kernels serve until they are ready.
    """
    return (
        USE_KERNELS
        and kernels.AVAILABLE
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and net.kind in _KERNEL_ACTIVATIONS
        and kernels_ready(x.dtype, wait=KERNELS_WAIT, backward=backward)
    )


#: The compiled kernels of a dtype come in two sets, each compiled when first needed: "solve" (the fold's forward
#: and the solves: all that densities, samples and tests need) and "train" (the "solve" set, the fold's backward
#: and the runs' backward). Every kernel takes the formulation (block kind), the dimension and the architecture as
#: arguments, so one compiled version per dtype serves them all; there is nothing finer to leave out. The cost of
#: each piece is measured by ``benchmarks/first_run.py`` (``benchmarks/results/first_run.md``).
KERNEL_SETS = {
    "solve": ("fold_forward", "solve_run"),
    "train": ("fold_forward", "solve_run", "fold_backward", "backward_run"),
}
#: Rough cold compile time of each set, in seconds (low, high), quoted by the kernels' notices. On the 2-core
#: development machine (float32): the solvers' set 56 s and the training set 90 s at a load average of about 4, and
#: 175 s and 163-235 s at a load average of 8-11 (``benchmarks/results/first_run.md``); the low ends are a guess for
#: an idle machine of that kind.
KERNEL_COMPILE_SECONDS = {"solve": (30, 180), "train": (50, 300)}

# (dtype, kernel set) -> "compiling" | "ready" | "failed"
_KERNEL_STATE: dict[tuple[torch.dtype, str], str] = {}
_KERNEL_LOCK = threading.Lock()

#: Called with one line of text when this process starts to compile kernels that the on-disk cache does not hold
#: (with a rough duration), and again when they are ready; ``None`` (the library's default) says nothing. The
#: command line prints the lines on stderr and the studio shows them in its status bar. It may be called from a
#: background compile thread.
kernel_notice: Callable[[str], None] | None = None


def kernels_ready(dtype: torch.dtype, wait: bool = False, backward: bool = True) -> bool:
    """Whether the compiled kernels are ready for ``dtype``; the first call starts compiling them.

    ``backward``: the kernels of training too (the "train" set of :data:`KERNEL_SETS`), else only those of solves
    without gradients ("solve": densities, samples, tests), which compile in about 60% of the time. Compiling takes
    half a minute or more the first time on a machine (Numba then caches the machine code on disk, in the folder of
    :mod:`monoflow_core.kernel_cache`, and later processes load it in about a second); :data:`kernel_notice` hears
    of it. Without ``wait`` it runs in a background thread and this returns at once (False until done): a caller
    can start it ahead of the first use. ``wait=True`` compiles (or loads) in the calling thread, or waits for the
    background compile under way, and returns when done; the fused path itself waits (:data:`KERNELS_WAIT`). A
    failure to compile is reported once as a warning and leaves the PyTorch kernels in charge for that dtype and
    set. Once the interpreter has begun to shut down no background compile starts (:func:`_stop_background_compiles`).
    """
    if not (USE_KERNELS and kernels.AVAILABLE):
        return False
    key = (dtype, "train" if backward else "solve")
    with _KERNEL_LOCK:
        state = _KERNEL_STATE.get(key)
        if state is None and not backward and _KERNEL_STATE.get((dtype, "train")) == "ready":
            _KERNEL_STATE[key] = state = "ready"  # (the "train" set holds the "solve" set)
        if state is None:
            if not wait:
                if _SHUTDOWN.is_set():
                    return False  # (it would be cancelled before its first piece anyway)
                _KERNEL_STATE[key] = "compiling"
                thread = threading.Thread(
                    target=_compile_in_background, args=key, name=f"monoflow-kernels-{dtype}-{key[1]}", daemon=True
                )
                _COMPILE_THREADS.append(thread)
                thread.start()
                return False
            _KERNEL_STATE[key] = state = "compiling"
        elif state == "compiling" and not wait:
            return False
    if state == "compiling" and wait:
        with _KERNEL_COMPILE_LOCK:  # the thread compiling (if any) holds it until done
            if _KERNEL_STATE.get(key) == "compiling":
                _compile_kernels(*key)
    return _KERNEL_STATE.get(key) == "ready"


_KERNEL_COMPILE_LOCK = threading.RLock()
#: Set once the interpreter has begun to shut down: background compiles stop at their next piece.
_SHUTDOWN = threading.Event()
#: Background compile threads started by :func:`kernels_ready` (joined at exit).
_COMPILE_THREADS: list[threading.Thread] = []
#: ``active`` is True in a background compile thread (whose work :data:`_SHUTDOWN` cancels).
_BACKGROUND = threading.local()


class _CompileCancelledError(Exception):
    """Raised between the pieces of a background compile once the interpreter has begun to shut down."""


def _compile_in_background(dtype: torch.dtype, kit: str) -> None:
    """The body of a background compile thread: :func:`_compile_kernels`, cancellable by :data:`_SHUTDOWN`."""
    _BACKGROUND.active = True
    _compile_kernels(dtype, kit)


def _check_not_cancelled() -> None:
    """Between two pieces of a compile: stop a background one if the interpreter has begun to shut down."""
    if getattr(_BACKGROUND, "active", False) and _SHUTDOWN.is_set():
        raise _CompileCancelledError


@atexit.register
def _stop_background_compiles() -> None:
    """Cancel the background compiles and wait for their threads to end, before the interpreter finalises.

    At finalisation Python ends every daemon thread still running the next time it needs the interpreter, by
    unwinding its stack without running it (``pthread_exit``). A thread inside PyTorch's autograd engine (the
    warm-up differentiates the fold) or any other C++ code that calls back into Python then ends the whole process
    with ``terminate called without an active exception`` (exit status 134), after the program's work is done.
    A compile cannot be interrupted inside one piece (one kernel's compilation by Numba), so this waits for the
    piece under way (only while a compile is in progress: from a few seconds to half a minute on a slow machine)
    and the thread stops before the next one. ``atexit`` runs after the program's non-daemon threads have ended and
    before finalisation; the threads are daemon threads so that this hook, not the interpreter, decides when they
    are joined (after cancelling: a non-daemon thread would be joined first, after its whole compile).
    """
    with _KERNEL_LOCK:  # (kernels_ready starts threads under it: none starts after this)
        _SHUTDOWN.set()
        threads = list(_COMPILE_THREADS)
    for thread in threads:
        if thread is not threading.current_thread():
            thread.join()


def _cache_stamp(dtype: torch.dtype, kit: str) -> tuple[Path, str]:
    """A marker file in the kernels' cache folder, and the text it holds once ``kit`` of ``dtype`` was compiled
    there: the sources' sizes and modification times (what Numba's cache checks) and Numba's version."""
    import numba

    sources = [Path(kernels.__file__), Path(blas.__file__)]
    text = " ".join([numba.__version__, *(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources)])
    name = f"monoflow-kernels-{str(dtype).replace('torch.', '')}-{kit}.stamp"
    return kernel_cache_dir() / name, text


def _expect_compile(dtype: torch.dtype, kit: str) -> bool:
    """Whether the kernels of ``kit`` in ``dtype`` will be compiled rather than loaded from the on-disk cache (as
    far as this process can tell: compiled here already, or the cache folder's marker of an earlier compile)."""
    if all(
        any(_signature_dtype(sig) == dtype for sig in getattr(getattr(kernels, name), "overloads", ()))
        for name in KERNEL_SETS[kit]
    ):
        return False
    for held_by in ("solve", "train") if kit == "solve" else ("train",):  # (the "train" set holds the "solve" set)
        try:
            path, text = _cache_stamp(dtype, held_by)
            if path.read_text() == text:
                return False
        except OSError:
            pass
    return True


def _signature_dtype(sig: Any) -> torch.dtype | None:
    """The torch dtype of a compiled kernel's signature (that of its first floating-point array)."""
    for arg in sig:
        name = str(getattr(arg, "dtype", ""))
        if name in ("float32", "float64"):
            return getattr(torch, name)  # type: ignore[no-any-return]
    return None


def _notify(text: str) -> None:
    if kernel_notice is not None:
        kernel_notice(text)


def _compile_kernels(dtype: torch.dtype, kit: str = "train") -> None:
    """Compile (or load from Numba's cache) the kernels of set ``kit`` for ``dtype``, through the engine's calls.

    A tiny problem with deterministic weights (no random numbers: this may run in a background thread, and the
    global generator belongs to the user), 2 dimensions, 2 layers of 4 units. Every kernel takes its sizes as
    arguments, so these compiled versions serve every architecture of the dtype. A background compile cancelled at
    shutdown leaves the state "compiling" (a later caller that waits compiles in its own thread).
    """
    key = (dtype, kit)
    with _KERNEL_COMPILE_LOCK:
        if _KERNEL_STATE.get(key) != "compiling":
            return
        what = f"{'training' if kit == 'train' else 'solver'} kernels for {str(dtype).replace('torch.', '')}"
        announced = _expect_compile(dtype, kit)
        if announced:
            low, high = KERNEL_COMPILE_SECONDS[kit]
            if kit == "train" and _KERNEL_STATE.get((dtype, "solve")) == "ready":  # (the rest of the set only)
                low, high = low - KERNEL_COMPILE_SECONDS["solve"][0], high - KERNEL_COMPILE_SECONDS["solve"][1]
            _notify(
                f"monoflow: compiling the {what} (first use with this cache; about {low}-{high} s, once: later "
                f"runs load them from {kernel_cache_dir()})"
            )
        t0 = time.perf_counter()
        try:
            kernels.limit_blas_threads()
            # A caller that waits may be inside no_grad or inference_mode (an evaluation's first use); the warm-up
            # differentiates the fold, as training does, so that its backward is compiled too.
            with torch.inference_mode(False), torch.enable_grad():
                _run_kernels_once(dtype, backward=kit == "train")
        except _CompileCancelledError:
            return
        except Exception as error:  # any failure leaves the PyTorch kernels in charge
            _KERNEL_STATE[key] = "failed"
            warnings.warn(
                f"monoflow: the compiled kernels for {dtype} are unavailable ({error!r}); the PyTorch "
                "kernels serve instead",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        _KERNEL_STATE[key] = "ready"
        if kit == "train":
            _KERNEL_STATE[(dtype, "solve")] = "ready"
        seconds = time.perf_counter() - t0
        with suppress(OSError):  # (a cache folder that cannot be written only costs the notices' accuracy)
            path, text = _cache_stamp(dtype, kit)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if announced:
            _notify(f"monoflow: the {what} are ready (compiled in {seconds:.0f} s)")
        elif seconds >= 5.0:  # (a busy machine, or a cache whose marker was gone)
            _notify(f"monoflow: the {what} are ready (prepared in {seconds:.0f} s)")


def _run_kernels_once(dtype: torch.dtype, backward: bool = True) -> None:
    """Call every compiled kernel of a set once in ``dtype`` on a tiny deterministic problem (see
    :func:`_compile_kernels`): the fold's forward and a solve, then with ``backward`` the fold's backward, a training
    solve and the run's backward.

    Each call is one piece of the compile (Numba compiles a kernel at its first call); a background compile checks
    for shutdown before each (:func:`_check_not_cancelled`), so no piece, and no autograd pass, starts once the
    interpreter is shutting down.
    """
    from types import SimpleNamespace

    def ramp(*shape: int, scale: float = 0.1) -> Tensor:
        return torch.sin(torch.arange(math.prod(shape), dtype=dtype)).mul_(scale).view(shape)

    n, m, depth = 2, 4, 2
    shapes = [(m, n), (m, n + 2 * m), (n, n + 4 * m)]  # (rows, cols) of each linear layer (widths 2, 10, 18)
    linears = [SimpleNamespace(weight=torch.empty(r, c)) for r, c in shapes]
    layout = _fold_layout(linears)
    sizes = [r * c for r, c in shapes]
    wflat = ramp(1, sum(sizes)).requires_grad_(backward)
    bflat = ramp(1, sum(r for r, _ in shapes)).requires_grad_(backward)
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    meta = (np.ones(1, np_dtype) * 0.98, np.full((depth + 1, 1), 0.9, np_dtype), 0.2, layout)
    gains = torch.full((1, depth), _K * _LOG2E, dtype=torch.float64)
    scales = torch.full((1, depth), 1.0 / 1.06 / (_K * _LOG2E), dtype=torch.float64)
    _check_not_cancelled()
    out = _KernelFold.apply(
        meta, torch.ones(1, depth, 2, dtype=dtype, requires_grad=backward), wflat, bflat, gains, scales
    )
    if backward:
        _check_not_cancelled()
        torch.autograd.grad(out.sum(), [wflat, bflat])
    net = _folded_from_flat(out.detach(), layout, n, "pila")
    block = SimpleNamespace(tol=1e-6, max_iter=20, kind="monotone")
    x = ramp(4, n, scale=1.0)
    setup = [_KERNEL_FORWARD["monotone"]]
    if backward:
        ws = _Workspace(net, 1, 4, x)
        _check_not_cancelled()
        _kernel_run(x, [block], net, setup, [1.0], ["warm-up"], [ws], [(0, 4)])
    _check_not_cancelled()
    _kernel_run(x, [block], net, setup, [1.0], ["warm-up"], None, [(0, 4)])
    if backward:
        _check_not_cancelled()
        _kernel_backward(net, [ws], [(0, 4)], ["monotone"], torch.zeros_like(x), torch.zeros(4, dtype=dtype))


def _kernel_weights(net: FoldedNet, signs: Sequence[float]) -> tuple[Any, Any, Any, Any]:
    """The fold as the kernels read it: each block's hidden weights flattened into one row (layer ``i`` from
    ``offs[i]`` as (m, widths[i])), the offsets, the widths each layer reads, and each block's map weights
    ``[0, I, 0] + sign final`` (nb, n, T) (see :meth:`_BlockWeights.map_weights`). In NumPy: these few small
    operations cost a fraction of PyTorch's per-operator overhead."""
    final = net.final.detach().numpy()
    nb, n, _ = final.shape
    hidden = [wi.detach().numpy() for wi in net.weights]
    flat = np.concatenate([wi.reshape(nb, -1) for wi in hidden], axis=1)
    sizes = [wi.shape[1] * wi.shape[2] for wi in hidden]
    offs = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    widths = np.array([wi.shape[2] for wi in hidden], dtype=np.int64)
    fw = final * np.asarray(signs, dtype=final.dtype).reshape(nb, 1, 1)
    fw[:, :, 1 : 1 + n] += np.eye(n, dtype=final.dtype)
    return flat, offs, widths, fw


def kernel_parts(b: int) -> list[tuple[int, int]]:
    """How the compiled kernels split a batch of ``b`` points: ``(start, count)`` parts, one per thread.

    As many parts as :data:`KERNEL_THREADS`, or PyTorch's intra-op threads (``torch.get_num_threads()``), each of
    at least :data:`KERNEL_PART_MIN` points: the points are independent (only the weight gradients are summed), and
    the kernels release the GIL, so the parts run in parallel. On the 2-core development VM two parts made a training
    step only about 10% faster (its cores behave like one core's two hyperthreads; ``engine_speed.md``). The studio
    gives training one thread (its view process has the other core); the command line's ``--threads`` and the
    benchmarks set it explicitly.
    """
    parts = max(1, min(KERNEL_THREADS or torch.get_num_threads(), b // KERNEL_PART_MIN))
    bounds = [round(i * b / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1] - bounds[i]) for i in range(parts)]


#: Points per compiled call in a no-gradient evaluation: a part of a batch (a chunk of a density grid or of samples,
#: typically 5,000 points) is solved in slices of this many, whose buffers stay in the CPU's caches. On the
#: development VM a 400 x 400 grid and 160,000 samples took about 17% less time in slices of 750 to 2,500 points
#: than in one slice of 5,000 (``engine_speed.md``).
KERNEL_NO_GRAD_POINTS = 1024

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_SCRATCH = threading.local()


def _scratch(size: int, dtype: Any) -> Any:
    """This thread's scratch array for the kernels' no-gradient solves, of at least ``size`` elements of ``dtype``
    (kept and grown: a fresh one per call would pay page faults on every chunk of an evaluation)."""
    key = np.dtype(dtype).str
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.shape[0] < size:
        buf = np.empty(size, dtype)
        if buf.nbytes <= _SCRATCH_KEEP_BYTES:  # (an unchunked huge batch does not pin its memory afterwards)
            buffers[key] = buf
    return buf


#: Largest scratch array a thread keeps between calls (evaluations come in chunks of a few thousand points).
_SCRATCH_KEEP_BYTES = 64 * 1024 * 1024


def _in_parallel(task: Any, count: int) -> None:
    """Run ``task(i)`` for ``i < count``: ``i = 0`` in this thread, the others in the module's thread pool.

    Each task's BLAS products run on its own thread alone (:func:`monoflow_core.blas.single_threaded`): the parts
    are the parallelism.
    """
    global _EXECUTOR
    if count == 1:
        _single_threaded(task, 0)
        return
    with _KERNEL_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                max_workers=os.cpu_count() or 2, thread_name_prefix="monoflow-kernel"
            )
    futures = [_EXECUTOR.submit(_single_threaded, task, i) for i in range(1, count)]
    try:
        _single_threaded(task, 0)
    finally:
        # every part has finished (even when one failed) before its buffers can be reused
        concurrent.futures.wait(futures)
    for future in futures:
        future.result()  # re-raises a part's error


def _single_threaded(task: Any, i: int) -> None:
    with blas.single_threaded():
        task(i)


def _kernel_run(
    x: Tensor,
    blocks: Sequence[Any],
    net: FoldedNet,
    setup: Sequence[tuple[float, ...]],
    signs: Sequence[float],
    labels: Sequence[str],
    spaces: Sequence[_Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: tuple[Any, ...] | None = None,
) -> tuple[Tensor, Tensor, list[SolverStats]]:
    """Run blocks on points ``x`` (B, n) with the compiled kernels: ``(y (B, n), summed log-det (B,), stats)``.

    ``setup`` holds each block's row of :data:`_KERNEL_FORWARD` (or of an inverse's setup). The batch runs in
    ``parts`` (default :func:`kernel_parts`), in parallel; with workspaces ``spaces`` (one per part) every block's
    final evaluation stays there for the backward pass, without them the kernel uses scratch of its own.
    ``weights``: :func:`_kernel_weights` of ``net`` and ``signs`` if already made.
    """
    x = x.detach().contiguous()
    b = x.shape[0]
    nb = len(blocks)
    parts = kernel_parts(b) if parts is None else parts
    flat, offs, widths, fw = weights if weights is not None else _kernel_weights(net, signs)
    np_dtype = x.numpy().dtype
    table = np.array(setup, dtype=np.float64)
    tols = np.array([effective_tolerance(blk.tol, x.dtype) for blk in blocks], dtype=np_dtype)
    caps = np.array([int(blk.max_iter) for blk in blocks], dtype=np.int64)
    y = torch.empty_like(x)
    logdet = x.new_empty(b)
    iterations = torch.empty(nb, b, dtype=torch.int64)
    residual = x.new_empty(nb, b)
    converged = torch.empty(nb, b, dtype=torch.bool)
    stalled = torch.empty(nb, b, dtype=torch.bool)
    int_type = kernels.exp2_bits(np_dtype)
    common = (
        x.numpy(),
        flat,
        offs,
        widths,
        net.weights[0].shape[1],
        fw,
        _KERNEL_ACTIVATIONS[net.kind],
        table[:, 0].astype("int64"),
        *(table[:, c].astype(np_dtype) for c in range(1, 6)),
        tols,
        caps,
        y.numpy(),
        logdet.numpy(),
        iterations.numpy(),
        residual.numpy(),
        converged.numpy(),
        stalled.numpy(),
        spaces is not None,
    )
    constants = (kernels.constants(np_dtype), kernels.exp2_coefficients(np_dtype), COMPACT_FRACTION)
    empty = [np.empty((0,) * d, np_dtype) for d in (3, 4, 4, 5, 3)]  # (the kernel's own scratch serves)

    def run(i: int) -> None:
        start, count = parts[i]
        if spaces is not None:  # a training forward: the part's own workspace, in one call
            ws = spaces[i]
            space = [t.numpy() for t in (ws.x, ws.h_all, ws.e_all, ws.q_all, ws.out)]
            scratch = empty[0].reshape(-1)
            sub = max(1, count)
        else:  # slices that stay in cache, in this thread's scratch
            space = empty
            sub = max(1, min(count, KERNEL_NO_GRAD_POINTS))
            size = kernels.scratch_size(fw.shape[2], len(net.weights), net.weights[0].shape[1], fw.shape[1], sub)
            scratch = _scratch(size, np_dtype)
        for at in range(start, start + count, sub):
            n_at = min(sub, start + count - at)
            kernels.solve_run(*common, *space, np.empty(n_at, int_type), *constants, at, n_at, scratch)

    _in_parallel(run, len(parts))
    evaluations = iterations.numpy().max(axis=1)
    failed = b - converged.numpy().sum(axis=1)
    stats = []
    for j in range(nb):
        st = SolverStats(
            "newton",
            iterations[j],
            residual[j],
            converged[j],
            int(evaluations[j]),
            float(tols[j]),
            int(caps[j]),
            stalled=stalled[j],
        )
        if failed[j]:
            _warn_unconverged(st, labels[j])
        stats.append(st)
    return y, logdet, stats


def _kernel_forward(
    x: Tensor,
    plan: _Plan,
    net: FoldedNet,
    spaces: Sequence[_Workspace] | None,
    parts: Sequence[tuple[int, int]] | None = None,
    weights: tuple[Any, ...] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`_fused_forward` by the compiled kernels, on points ``x`` (B, n): ``(y (B, n), summed log-det)``."""
    blocks = plan.blocks
    labels = [f"{type(blk).__name__} forward solve" for blk in blocks]
    y, logdet, stats = _kernel_run(
        x,
        blocks,
        net,
        [_KERNEL_FORWARD[blk.kind] for blk in blocks],
        [1.0] * len(blocks),
        labels,
        spaces,
        parts,
        weights,
    )
    for blk, st in zip(blocks, stats, strict=True):
        if blk.kind != "residual":
            blk.forward_stats = st
        blk.last_logdet_exact = True
    return y, logdet


_KERNEL_KINDS = {
    "residual": kernels.KIND_RESIDUAL,
    "monotone": kernels.KIND_MONOTONE,
    "inverse_residual": kernels.KIND_INVERSE_RESIDUAL,
}


def _kernel_backward(
    net: FoldedNet,
    spaces: Sequence[_Workspace],
    parts: Sequence[tuple[int, int]],
    kinds: Sequence[str],
    grad_z: Tensor,
    grad_logdet: Tensor,
    weights: tuple[Any, ...] | None = None,
) -> list[Tensor | None]:
    """:meth:`_FusedBlocks.backward` by the compiled kernel, part by part in parallel: the gradients of ``x``,
    (plan) and the folded tensors (each part's weight gradients summed). ``weights``: the forward's
    :func:`_kernel_weights`."""
    flat, offs, widths, fw = weights if weights is not None else _kernel_weights(net, [1.0] * len(kinds))
    grad_flat = net.final.new_empty((len(parts), *flat.shape))
    grad_fw = net.final.new_empty((len(parts), *fw.shape))
    grad_x = torch.empty(grad_z.shape, dtype=grad_z.dtype)
    codes = np.array([_KERNEL_KINDS[k] for k in kinds], dtype=np.int64)
    common = (
        flat,
        offs,
        widths,
        net.weights[0].shape[1],
        fw,
        _KERNEL_ACTIVATIONS[net.kind],
        codes,
        grad_z.detach().contiguous().numpy(),
        grad_logdet.detach().contiguous().numpy(),
    )
    cst = kernels.constants(grad_flat.numpy().dtype)

    def run(i: int) -> None:
        ws = spaces[i]
        kernels.backward_run(
            *common,
            *(t.numpy() for t in (ws.x, ws.h_all, ws.e_all, ws.q_all, ws.out)),
            grad_x.numpy(),
            grad_flat[i].numpy(),
            grad_fw[i].numpy(),
            cst,
            *parts[i],
        )

    _in_parallel(run, len(parts))
    if len(parts) > 1:
        grad_flat, grad_fw = grad_flat.sum(0), grad_fw.sum(0)
    else:
        grad_flat, grad_fw = grad_flat[0], grad_fw[0]
    grads: list[Tensor | None] = [grad_x, None]
    start = 0
    for wi in net.weights:
        size = wi.shape[1] * wi.shape[2]
        grads.append(grad_flat[:, start : start + size].view(wi.shape))
        start += size
    grads.append(grad_fw)
    return grads


class _FusedBlocks(torch.autograd.Function):
    """A run of blocks as one autograd node with the exact implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        net = FoldedNet.from_tensors([t.detach() for t in tensors], plan.n, plan.kind)
        ctx.token = _GraphToken()
        ctx.compiled = kernels_apply(x, net, backward=True)
        if ctx.compiled:
            # one workspace per part of the batch (the parts run in parallel, kernel_parts)
            ctx.parts = kernel_parts(x.shape[0])
            ctx.spaces = []
            for _, count in ctx.parts:
                ws, key = _acquire_workspace(net, count, x)
                _release_with(ctx.token, ws, key)
                ctx.spaces.append(ws)
            ctx.weights = _kernel_weights(net, [1.0] * len(plan.blocks))
            y, total = _kernel_forward(x, plan, net, ctx.spaces, ctx.parts, ctx.weights)
        else:
            xt = x.detach().t().contiguous()  # (the PyTorch kernels' feature-major layout)
            ws, key = _acquire_workspace(net, xt.shape[1], xt)
            _release_with(ctx.token, ws, key)
            yt, total = _fused_forward(xt, plan, net, ws)
            y = yt.t().contiguous()
            ctx.ws = ws
        ctx.net = net
        ctx.kinds = [blk.kind for blk in plan.blocks]
        return y, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        net: FoldedNet = ctx.net
        kinds: list[str] = ctx.kinds
        if ctx.compiled:
            return (*_kernel_backward(net, ctx.spaces, ctx.parts, kinds, grad_z, grad_logdet, ctx.weights),)
        ws: _Workspace = ctx.ws
        n, b, nb = ws.n, ws.b, ws.count
        a_all = ws.jacobian_maps()  # I + J_G at each block's solution
        inv_all = _inv_small(a_all)
        # d(summed log-det)/dJ of every block at once (the log-det's gradient is the same for all blocks):
        # residual (I + J)^-T, inverse residual -(I + J)^-T, monotone -((I - J)^-T + (I + J)^-T).
        sign, mono, a_minus = _logdet_terms(kinds, a_all)
        dlog = inv_all * sign.view(nb, 1, 1, 1)
        if a_minus is not None:
            dlog[mono] -= _inv_small(a_minus)
        lay = _ReverseLayout(net)
        cols = (1 + n) * b
        c = ws.x.new_empty(nb, lay.rows, cols)  # pass 1: the log-det's cotangents (tangent and primal columns)
        torch.mul(dlog.transpose(1, 2), grad_logdet, out=c[:, :n, b:].view(nb, n, n, b))
        c[:, :n, :b].zero_()
        v_all = _reverse_tangents(net, ws, lay, c)  # dL/dw through each block's log-det
        # The sequential part: the implicit-function gradient through each solve (docs/algorithm.md §6), block by block.
        gy = grad_z.t().contiguous()
        c2 = ws.x.new_empty(nb, lay.rows, b)  # pass 2: cotangents of G(w) in the first n rows, filled below
        for j in reversed(range(nb)):
            kind, inv, v = kinds[j], inv_all[j], v_all[j]
            if kind == "residual":
                # y = x + G(x): dL/dx = gy (I + J) + v; G's weights see the cotangent gy.
                c2[j, :n] = gy
                gy = _row_combination(a_all[j], gy).add_(v)
                continue
            gw = torch.add(v, gy, alpha=SQRT2) if kind == "monotone" else v.add_(gy)
            # a = gw (I + J)^{-1} with respect to the solve's right-hand side; the parameters receive -a dG/dtheta.
            a = _row_combination(inv, gw)
            torch.neg(a, out=c2[j, :n])
            gy = torch.sub(a, gy, alpha=1.0 / SQRT2).mul_(SQRT2) if kind == "monotone" else a
        _reverse_primals(ws, lay, c2)
        c[:, :, :b].add_(c2)  # both passes' cotangents of the primal columns
        # (X C^T)^T rather than C X^T: the same numbers, 25% faster here for these long reductions
        grads = []
        for w, offset, m in zip(net.weights, lay.offset, lay.m, strict=True):
            grads.append(torch.bmm(ws.x[:, : w.shape[2]], c[:, offset : offset + m].transpose(1, 2)).transpose(1, 2))
        grads.append(torch.bmm(ws.x, c[:, :n].transpose(1, 2)).transpose(1, 2))
        return (gy.t(), None, *grads)


def run_fused(blocks: Sequence[Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run eligible blocks (same architecture) on ``x`` (B, n); returns ``(y, summed logdet)``, differentiable."""
    nets = [blk.net for blk in blocks]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for g in nets for p in g.parameters())
    )
    if not needs_grad:
        with torch.no_grad():
            folded = cached_fold(nets)
            plan = _Plan(list(blocks), folded.n, folded.kind)
            if kernels_apply(x, folded, backward=False):
                return _kernel_forward(x, plan, folded, None)
            y, logdet = _fused_forward(x.t().contiguous(), plan, folded, None)
        return y.t(), logdet
    folded = fold_nets(nets)
    plan = _Plan(list(blocks), folded.n, folded.kind)
    return _FusedBlocks.apply(x, plan, *folded.tensors())


def fused_inverse_run(blocks: Sequence[Any], y: Tensor) -> Tensor:
    """Inverse of a run of eligible blocks (same architecture; the last block first) on ``y`` (B, n), without
    autograd: one compiled call for the whole run where the kernels serve (as :func:`run_fused` forward), else block
    by block (:func:`fused_inverse`). Inside :func:`folded_runs` the run's fold is made once per scope."""
    if len(blocks) > 1:
        with torch.no_grad():
            folded = cached_fold([blk.net for blk in blocks])
            if kernels_apply(y, folded, backward=False):
                order = list(reversed(blocks))
                signs = [-1.0 if blk.kind == "monotone" else 1.0 for blk in order]
                labels = [f"{type(blk).__name__} inverse solve" for blk in order]
                x, _, stats = _kernel_run(
                    y, order, folded.reversed(), [_KERNEL_INVERSE[blk.kind] for blk in order], signs, labels, None
                )
                for blk, st in zip(order, stats, strict=True):
                    if blk.kind != "inverse_residual":
                        blk.inverse_stats = st
                return x
    for blk in reversed(blocks):
        y = fused_inverse(blk, y)
    return y


def fused_inverse(block: Any, y: Tensor) -> Tensor:
    """Inverse of one eligible block on ``y`` (B, n) without autograd (sampling): Newton on the folded kernel."""
    with torch.no_grad():
        folded = cached_fold([block.net])
        if kernels_apply(y, folded, backward=False):
            sign = -1.0 if block.kind == "monotone" else 1.0
            x, _, (stats,) = _kernel_run(
                y,
                [block],
                folded,
                [_KERNEL_INVERSE[block.kind]],
                [sign],
                [f"{type(block).__name__} inverse solve"],
                None,
            )
            if block.kind != "inverse_residual":
                block.inverse_stats = stats
            return x
        net = folded.block(0)
        yt = y.t().contiguous()
        if block.kind == "inverse_residual":
            return evaluate(net, yt, net.map_weights(1.0)).t()
        sign = -1.0 if block.kind == "monotone" else 1.0
        rhs = SQRT2 * yt if block.kind == "monotone" else yt
        label = f"{type(block).__name__} inverse solve"
        w, _, block.inverse_stats = _newton_compact(net, rhs, sign, block.tol, block.max_iter, label, False)
        return (SQRT2 * w - yt).t() if block.kind == "monotone" else w.t()
