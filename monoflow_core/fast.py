"""Fused exact path for stacks of small-dimensional blocks built on the project's DenseNet G.

The generic blocks (``monoflow_core.blocks``) work for any G through autograd. For the project's own
:class:`~monoflow_core.nn.densenet.DenseNetG` with a parameter-free concatenated activation (CPila, CReLU) in
small dimensions (the paper's 2-D and 1-D models) this module runs a whole run of consecutive blocks as one
``torch.autograd.Function`` with a hand-written exact backward (ALGORITHM.md section 8):

* weights: every block's spectrally normalised weights are computed *batched* over the blocks, and the
  DenseNet's concatenation weights, the activation's shift and ``1/1.06`` scale and the ``[x, -x]`` of the
  concatenated activation are folded into them, so one evaluation of G is one matrix product per layer over
  the stacked primal and tangent rows and a handful of elementwise operations, with no ``cat`` or ``where``;
* forward: Newton's method with the exact Jacobian (forward-mode tangents) on the whole batch, each sample
  frozen once it meets the tolerance; the last evaluation is at the solution and provides ``J_G(w*)`` for the
  exact log-det and every activation the backward pass needs;
* backward: the implicit-function gradient in closed form (ALGORITHM.md 4): one reverse pass through the
  tangent network carries the log-det's gradient (this is where the activation's second derivative enters),
  then ``a = g (I + J)^{-1}`` by a closed-form n x n solve, then one reverse pass through G's primal network.

Both paths agree to rounding in float64 (tests/core/test_fast.py), and the generic path remains the reference.
"""

from __future__ import annotations

import math
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .logdet import resolve_logdet_mode
from .nn.activations import CPila, CReLU
from .nn.densenet import DenseNetG
from .solvers import SolverStats, SolverWarning, effective_tolerance, resolve_method

__all__ = ["FAST_MAX_DIM", "FoldedNet", "fast_eligible", "fold_nets", "fusable_runs", "fused_inverse", "run_fused"]

#: Largest event dimension handled by the fused path (tangent cost grows with n).
FAST_MAX_DIM = 8
SQRT2 = math.sqrt(2.0)

# activation class -> (shift, output scale, kind)
_FAST_ACTIVATIONS: dict[type, tuple[float, float, str]] = {
    CPila: (CPila.shift, CPila.scale, "pila"),
    CReLU: (0.0, 1.0, "relu"),
}
_K = 5.0  # Pila's k in CPila


def _activation_spec(net: DenseNetG) -> tuple[float, float, str] | None:
    specs = {_FAST_ACTIVATIONS.get(type(a)) for a in net.activations}
    if len(specs) != 1 or None in specs:
        return None
    if any(getattr(a, "k", _K) != _K for a in net.activations):
        return None
    return next(iter(specs))


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
    return (
        [tuple(lin.weight.shape) for lin in [*a.layers, a.final]]
        == [tuple(lin.weight.shape) for lin in [*b.layers, b.final]]
        and _activation_spec(a) == _activation_spec(b)
        and [lin.mode for lin in [*a.layers, a.final]] == [lin.mode for lin in [*b.layers, b.final]]
    )


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

    The feature buffer ``U`` of one evaluation has a leading constant column (1 on the primal row, 0 on the
    tangent rows) so that biases ride in the weights: layer ``i`` computes the pre-activations of its ``2k``
    concatenated units (``k [h - shift, -h - shift]`` for CPila) as ``U[:, :1 + width_i] @ weights[i][j].T``
    and G is ``U @ final[j].T``. The concatenation weights, the activation's scale and Pila's k live in the
    weights, so the buffer holds raw activation outputs.
    """

    weights: list[Tensor]  # (nb, 2k, 1 + width_i)
    final: Tensor  # (nb, n, 1 + width_total)
    n: int
    kind: str  # "pila" or "relu"

    def tensors(self) -> list[Tensor]:
        return [*self.weights, self.final]

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor], n: int, kind: str) -> FoldedNet:
        return cls(list(tensors[:-1]), tensors[-1], n, kind)

    def block(self, j: int) -> _BlockWeights:
        """Detached, pre-transposed weights of block ``j`` for the evaluation kernels."""
        return _BlockWeights(
            [w[j].detach() for w in self.weights],
            [w[j].detach().t().contiguous() for w in self.weights],
            self.final[j].detach(),
            self.n,
            self.kind,
        )


@dataclass
class _BlockWeights:
    weights: list[Tensor]  # (2k, 1 + width_i)
    weights_t: list[Tensor]  # (1 + width_i, 2k)
    final: Tensor  # (n, 1 + width_total)
    n: int
    kind: str

    @property
    def total(self) -> int:
        return self.final.shape[1]

    def seed(self, b: int, like: Tensor) -> Tensor:
        """The first ``1 + n`` columns of the buffer: ``[1, 0]`` on the primal row, ``[0, I]`` on the tangents."""
        n = self.n
        out = torch.zeros(1 + n, b, 1 + n, dtype=like.dtype, device=like.device)
        out[0, :, 0] = 1.0
        out[1:, :, 1:] = torch.eye(n, dtype=like.dtype, device=like.device).unsqueeze(1)
        return out


def _stacked_normalized(layers: Sequence[Any]) -> Tensor:
    """Spectrally normalised weights of same-shaped layers, batched: ``W / max(1, sigma / coeff)``."""
    w = torch.stack([lin.weight for lin in layers])
    if layers[0].mode == "exact":
        sigma = torch.linalg.matrix_norm(w, ord=2)
    else:
        u = torch.stack([lin.u for lin in layers])
        v = torch.stack([lin.v for lin in layers])
        sigma = torch.einsum("bi,bij,bj->b", u, w, v)
    coeff = torch.tensor([lin.coeff for lin in layers], dtype=w.dtype, device=w.device)
    return w / torch.clamp(sigma / coeff, min=1.0)[:, None, None]


def fold_nets(nets: Sequence[DenseNetG]) -> FoldedNet:
    """Fold a stack of same-architecture DenseNet G networks (differentiable in their parameters)."""
    shift, scale, kind = _activation_spec(nets[0])  # type: ignore[misc]
    # Pila's k is folded into the pre-activations (and 1/k into the next layers' weights).
    k = _K if kind == "pila" else 1.0
    scale = scale / k
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
            block_scales.append(eta2[:, j : j + 1] * prods[:, i : i + 1] / prods[:, j + 1 : j + 2] * scale)
        cols = torch.cat([s.expand(nb, wdt) for s, wdt in zip(block_scales, widths, strict=True)], dim=1)
        layer = nets[0].final if i == depth else nets[0].layers[i]
        stack = [g.final for g in nets] if i == depth else [g.layers[i] for g in nets]
        wn = _stacked_normalized(stack) * cols[:, None, :]
        b = torch.stack([lin.bias for lin in stack])
        if layer is nets[0].final:
            weights.append(torch.cat([b.unsqueeze(2), wn], dim=2))
            break
        both_w = torch.cat([wn, -wn], dim=1) * k
        both_b = torch.cat([b - shift, -b - shift], dim=1) * k
        weights.append(torch.cat([both_b.unsqueeze(2), both_w], dim=2))
        widths.append(2 * wn.shape[1])
    return FoldedNet(weights[:-1], weights[-1], n, kind)


class _Consts:
    """0-dim constants on the right dtype/device: a tensor operand is cheaper than a Python float here."""

    _cache: typing.ClassVar[dict[tuple[torch.dtype, torch.device], dict[str, Tensor]]] = {}

    @classmethod
    def get(cls, like: Tensor) -> dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in cls._cache:
            vals = {"half": 0.5, "one": 1.0, "minus_one": -1.0}
            cls._cache[key] = {k: torch.tensor(v, dtype=like.dtype, device=like.device) for k, v in vals.items()}
        return cls._cache[key]


def _act(kind: str, h: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Activation in the folded scale and its derivative, without ``where`` (both branches meet at 0).

    For Pila the pre-activations arrive multiplied by k (folded into the weights), ``y = min(h, 0)``, and the
    value is ``k Pila(h / k) = relu(h) + y (y^2/2 - y + 1) e^y`` and the derivative
    ``Pila'(h / k) = (y^3/2 + y^2/2 - y + 1) e^y`` (Ahn et al. 2022, Pila with k = 5). The value is written
    into ``out`` when given.
    """
    if kind == "relu":
        value = torch.clamp_min(h, 0.0, out=out) if out is not None else torch.relu(h)
        return value, (h > 0).to(h.dtype)
    c = _Consts.get(h)
    y = torch.clamp_max(h, 0.0)
    e = torch.exp(y)
    b = torch.addcmul(c["one"], torch.addcmul(c["minus_one"], y, c["half"]), y)
    value = torch.addcmul(torch.relu(h), b, y * e, out=out) if out is not None else None
    if value is None:
        value = torch.addcmul(torch.relu(h), b, y * e)
    d = torch.addcmul(c["minus_one"], torch.addcmul(c["half"], y, c["half"]), y)
    deriv = torch.addcmul(c["one"], d, y).mul_(e)
    return value, deriv


def _act_second(kind: str, h: Tensor) -> Tensor:
    """Derivative of ``_act``'s derivative with respect to its (folded) input: ``(y^3/2 + 2 y^2) e^y``.

    (``Pila''(x) = k (y^3/2 + 2 y^2) e^y`` with ``y = k x``; the chain rule through ``x = h / k`` takes the k.)
    """
    if kind == "relu":
        return torch.zeros_like(h)
    y = torch.clamp(h, max=0.0)
    return (0.5 * y + 2.0) * y * y * torch.exp(y)


@dataclass
class _Cache:
    """Everything the backward pass needs from one evaluation of G with tangents."""

    buf: Tensor  # (1 + n, B, 1 + width_total) raw features, primal row first
    pre: list[Tensor]  # per layer, primal pre-activations (B, 2k)
    deriv: list[Tensor]  # per layer, activation derivatives at pre (B, 2k)
    tangent_pre: list[Tensor]  # per layer, tangent pre-activations (n, B, 2k)


def evaluate_with_jacobian(net: _BlockWeights, w: Tensor, seed: Tensor | None = None) -> tuple[Tensor, Tensor, _Cache]:
    """G(w) (B, n), J_G(w) (B, n, n) and the cache, without autograd.

    ``J[b, i, t] = dG_i / dw_t``; ``seed`` is ``net.seed(B, w)``, passed in to reuse it across a solve.
    """
    b, n = w.shape
    total = net.total
    buf = w.new_empty(1 + n, b, total)
    buf[:, :, : 1 + n] = net.seed(b, w) if seed is None else seed
    buf[0, :, 1 : 1 + n] = w
    flat = buf.view((1 + n) * b, total)
    pre, deriv, tangent_pre = [], [], []
    width = 1 + n
    for weight_t in net.weights_t:
        m = weight_t.shape[1]
        hh = torch.mm(flat[:, :width], weight_t).view(1 + n, b, m)
        h0 = hh[0]
        th = hh[1:]
        _, d = _act(net.kind, h0, out=buf[0, :, width : width + m])
        torch.mul(th, d, out=buf[1:, :, width : width + m])
        pre.append(h0)
        deriv.append(d)
        tangent_pre.append(th)
        width += m
    # W.t() (a transposed view) rather than a contiguous W^T: 3x faster for this thin product in MKL here.
    out = torch.mm(flat, net.final.t()).view(1 + n, b, n)
    return out[0], out[1:].permute(1, 2, 0), _Cache(buf, pre, deriv, tangent_pre)


def evaluate(net: _BlockWeights, w: Tensor) -> Tensor:
    """G(w) alone (no autograd)."""
    b, n = w.shape
    buf = w.new_empty(b, net.total)
    buf[:, 0] = 1.0
    buf[:, 1 : 1 + n] = w
    width = 1 + n
    for weight_t in net.weights_t:
        m = weight_t.shape[1]
        _act(net.kind, torch.mm(buf[:, :width], weight_t), out=buf[:, width : width + m])
        width += m
    return torch.mm(buf, net.final.t())


def _inv_small(a: Tensor) -> Tensor:
    """Batched inverse, closed form for 1x1 and 2x2."""
    n = a.shape[-1]
    if n == 1:
        return 1.0 / a
    if n == 2:
        det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
        inv = torch.stack([a[:, 1, 1], -a[:, 0, 1], -a[:, 1, 0], a[:, 0, 0]], dim=1) / det[:, None]
        return inv.view(-1, 2, 2)
    return torch.linalg.inv(a)


def _logabsdet(a: Tensor) -> Tensor:
    n = a.shape[-1]
    if n == 1:
        return torch.log(torch.abs(a[:, 0, 0]))
    if n == 2:
        return torch.log(torch.abs(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]))
    return torch.linalg.slogdet(a).logabsdet


def _reverse_full(
    net: _BlockWeights, cache: _Cache, cot_g: Tensor | None, cot_jac: Tensor, grads: list[Tensor]
) -> Tensor:
    """Reverse pass through G and its tangents: add to the weight gradients ``grads``; return dL/dw."""
    n = net.n
    buf = cache.buf
    b, total = buf.shape[1], buf.shape[2]
    flat = buf.view((1 + n) * b, total)
    cot_out = buf.new_empty(1 + n, b, n)
    if cot_g is None:
        cot_out[0].zero_()
    else:
        cot_out[0] = cot_g
    cot_out[1:] = cot_jac.permute(2, 0, 1)
    co = cot_out.view((1 + n) * b, n)
    grads[-1] += torch.mm(co.t(), flat)
    cot_buf = torch.mm(co, net.final).view(1 + n, b, total)
    width = total
    for i in reversed(range(len(net.weights))):
        weight = net.weights[i]
        m = weight.shape[0]
        width -= m
        cn = cot_buf[:, :, width : width + m]
        d = cache.deriv[i]
        ch = torch.empty_like(cn)
        ch[0] = cn[0] * d + (cn[1:] * cache.tangent_pre[i]).sum(0) * _act_second(net.kind, cache.pre[i])
        torch.mul(cn[1:], d, out=ch[1:])
        ch2 = ch.view((1 + n) * b, m)
        grads[i] += torch.mm(ch2.t(), flat[:, :width])
        cot_buf[:, :, :width] += torch.mm(ch2, weight).view(1 + n, b, width)
    return cot_buf[0, :, 1 : 1 + n]


def _reverse_primal(net: _BlockWeights, cache: _Cache, cot_g: Tensor, grads: list[Tensor]) -> None:
    """Reverse pass through G's primal network only (adds to the weight gradients ``grads``)."""
    prim = cache.buf[0]
    grads[-1] += torch.mm(cot_g.t(), prim)
    c = torch.mm(cot_g, net.final)
    width = prim.shape[1]
    for i in reversed(range(len(net.weights))):
        weight = net.weights[i]
        m = weight.shape[0]
        width -= m
        ch = c[:, width : width + m] * cache.deriv[i]
        grads[i] += torch.mm(ch.t(), prim[:, :width])
        c[:, :width] += torch.mm(ch, weight)


def _newton(
    net: _BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str
) -> tuple[Tensor, Tensor, _Cache, SolverStats]:
    """Solve ``w + sign G(w) = rhs`` by safeguarded Newton on the whole batch, freezing converged samples.

    The final evaluation is at the returned point for every sample, so its Jacobian and cache are exact there.
    The hot loop avoids Python-scalar arithmetic and per-entry indexing (each costs an operator dispatch).
    """
    b, n = rhs.shape
    tol = effective_tolerance(tol, rhs.dtype)
    tol_t = torch.tensor(tol, dtype=rhs.dtype, device=rhs.device)
    scale = 1.0 + rhs.abs().amax(dim=1)
    # eye_cols[t] is the t-th column of I, broadcast over the batch: the columns of A = I +- J.
    eye_cols = torch.eye(n, dtype=rhs.dtype, device=rhs.device).unsqueeze(1)
    plus = sign > 0
    seed = net.seed(b, rhs)
    w = rhs
    conv = torch.zeros(b, dtype=torch.bool, device=rhs.device)
    iterations = torch.zeros(b, dtype=torch.long, device=rhs.device)
    prev_res: Tensor | None = None
    prev_f = rhs
    it = 0
    while True:
        it += 1
        g, jac, cache = evaluate_with_jacobian(net, w, seed)
        fw = rhs - g if plus else rhs + g
        r = w - fw
        res = r.abs().amax(dim=1).div_(scale)
        iterations += ~conv
        conv = conv | torch.le(res, tol_t)
        if it >= max_iter or bool(conv.all()):
            break
        cols = jac.permute(2, 0, 1)  # cols[t] = column t of J_G, shape (B, n)
        a_cols = eye_cols + cols if plus else eye_cols - cols
        if n == 2:
            # Cramer's rule with 2-D cross products: x0 = [r, c1] / [c0, c1], x1 = [c0, r] / [c0, c1].
            c0, c1 = a_cols[0], a_cols[1]
            lhs = torch.stack((r, c0, c0))
            rhs_ = torch.stack((c1, r, c1))
            cross = lhs[..., 0] * rhs_[..., 1] - lhs[..., 1] * rhs_[..., 0]
            step = (cross[:2] / cross[2]).t()
        elif n == 1:
            step = r / a_cols[0]
        else:
            step = torch.linalg.solve(a_cols.permute(1, 2, 0), r)
        cand = w - step
        # Safeguard: where the residual grew, take the plain contracting step from the previous point.
        if prev_res is not None:
            worse = res > prev_res
            if bool(worse.any()):
                cand = torch.where(worse.unsqueeze(1), prev_f, cand)
                fw = torch.where(worse.unsqueeze(1), prev_f, fw)
                res = torch.where(worse, prev_res, res)
        prev_f, prev_res = fw, res
        w = torch.where(conv.unsqueeze(1), w, cand)
    stats = SolverStats("newton", iterations, res, conv, it, tol, max_iter)
    if stats.n_failed:
        warnings.warn(
            f"{label}: {stats.n_failed} of {b} samples did not converge within {max_iter} newton iterations "
            f"(worst relative residual {float(res.max()):.3g}, tolerance {tol:.3g})",
            SolverWarning,
            stacklevel=4,
        )
    return w, jac, cache, stats


def _newton_compacting(
    weights: _BlockWeights, rhs: Tensor, sign: float, block: Any, label: str
) -> tuple[Tensor, Tensor, SolverStats]:
    """Newton through the generic solver (per-sample compaction); returns ``(w, J_G(w), stats)``."""
    from .solvers import solve

    eye = torch.eye(weights.n, dtype=rhs.dtype, device=rhs.device)

    def fmap(w: Tensor, idx: Tensor) -> Tensor:
        return rhs[idx] - sign * evaluate(weights, w)

    def newton_map(w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        g, jac, _ = evaluate_with_jacobian(weights, w)
        return rhs[idx] - sign * g, eye + sign * jac

    w, stats, a_mat = solve(
        fmap, rhs, method="newton", tol=block.tol, max_iter=block.max_iter, newton_map=newton_map, label=label
    )
    assert a_mat is not None
    return w, (a_mat - eye) * sign, stats


def _fused_forward(x: Tensor, plan: _Plan, net: FoldedNet, keep: bool) -> tuple[Tensor, Tensor, list[Any]]:
    """Forward through the run; with ``keep``, the per-block records the backward pass needs."""
    records = []
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    eye = torch.eye(plan.n, dtype=x.dtype, device=x.device)
    for j, block in enumerate(plan.blocks):
        kind = block.kind
        weights = net.block(j)
        if kind == "residual":
            g, jac, cache = evaluate_with_jacobian(weights, x)
            logdet = _logabsdet(eye + jac)
            y = x + g
        else:
            rhs = SQRT2 * x if kind == "monotone" else x
            label = f"{type(block).__name__} forward solve"
            if keep:
                w, jac, cache, block.forward_stats = _newton(weights, rhs, 1.0, block.tol, block.max_iter, label)
            else:
                # Without a backward pass no cache is needed, so converged samples drop out of the batch.
                w, jac, block.forward_stats = _newton_compacting(weights, rhs, 1.0, block, label)
            if kind == "monotone":
                logdet = _logabsdet(eye - jac) - _logabsdet(eye + jac)
                y = SQRT2 * w - x
            else:
                logdet = -_logabsdet(eye + jac)
                y = w
        block.last_logdet_exact = True
        if keep:
            records.append((kind, jac, cache, weights))
        total = total + logdet
        x = y
    return x, total, records


class _FusedBlocks(torch.autograd.Function):
    """A run of blocks as one autograd node with the exact implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        net = FoldedNet.from_tensors([t.detach() for t in tensors], plan.n, plan.kind)
        y, total, records = _fused_forward(x, plan, net, keep=True)
        ctx.net = net
        ctx.records = records
        return y, total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        net: FoldedNet = ctx.net
        grads = [torch.zeros_like(t) for t in net.tensors()]
        gy = grad_z
        gl = grad_logdet
        n = net.n
        eye = torch.eye(n, dtype=gy.dtype, device=gy.device)
        for j in reversed(range(len(ctx.records))):
            kind, jac, cache, weights = ctx.records[j]
            gj = [grad[j] for grad in grads]
            inv_plus = _inv_small(eye + jac)
            if kind == "residual":
                cot_jac = gl[:, None, None] * inv_plus.transpose(1, 2)
                gy = gy + _reverse_full(weights, cache, gy, cot_jac, gj)
                continue
            if kind == "monotone":
                inv_minus = _inv_small(eye - jac)
                cot_jac = -gl[:, None, None] * (inv_minus + inv_plus).transpose(1, 2)
                gw = SQRT2 * gy + _reverse_full(weights, cache, None, cot_jac, gj)
            else:
                cot_jac = -gl[:, None, None] * inv_plus.transpose(1, 2)
                gw = gy + _reverse_full(weights, cache, None, cot_jac, gj)
            # a = gw (I + J)^{-1}: the implicit-function gradient with respect to the solve's right-hand side.
            a = torch.bmm(gw.unsqueeze(1), inv_plus).squeeze(1)
            _reverse_primal(weights, cache, -a, gj)
            gy = SQRT2 * a - gy if kind == "monotone" else a
        return (gy, None, *grads)


@dataclass
class _Plan:
    blocks: list[Any]
    n: int
    kind: str


def run_fused(blocks: Sequence[Any], x: Tensor) -> tuple[Tensor, Tensor]:
    """Run eligible blocks (same architecture) on ``x``; returns ``(y, summed logdet)``, differentiable."""
    nets = [blk.net for blk in blocks]
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for g in nets for p in g.parameters())
    )
    if not needs_grad:
        with torch.no_grad():
            folded = fold_nets(nets)
            plan = _Plan(list(blocks), folded.n, folded.kind)
            y, logdet, _ = _fused_forward(x, plan, folded, keep=False)
        return y, logdet
    folded = fold_nets(nets)
    plan = _Plan(list(blocks), folded.n, folded.kind)
    return _FusedBlocks.apply(x, plan, *folded.tensors())


def fused_inverse(block: Any, y: Tensor) -> Tensor:
    """Inverse of one eligible block without autograd (sampling): Newton with the folded kernel."""

    with torch.no_grad():
        net = fold_nets([block.net]).block(0)
        if block.kind == "inverse_residual":
            return y + evaluate(net, y)
        sign = -1.0 if block.kind == "monotone" else 1.0
        rhs = SQRT2 * y if block.kind == "monotone" else y
        w, _, block.inverse_stats = _newton_compacting(
            net, rhs, sign, block, f"{type(block).__name__} inverse solve"
        )
        return SQRT2 * w - y if block.kind == "monotone" else w
