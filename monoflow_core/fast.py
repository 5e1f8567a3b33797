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
#: Folded into Pila's pre-activations with k so that ``e^(k x)`` is one ``exp2`` (twice as fast as ``exp`` here).
_LOG2E = 1.0 / math.log(2.0)


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
    # Pila's k (times log2 e, for exp2) is folded into the pre-activations and 1/k into the next layers' weights.
    k = _K * _LOG2E if kind == "pila" else 1.0
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


def _fold_key(nets: Sequence[DenseNetG]) -> tuple[Any, ...]:
    """Identity and version of every tensor a fold reads: any change (an optimizer step, a load) changes it."""
    key: list[Any] = []
    for g in nets:
        for t in (*g.parameters(), *g.buffers()):
            key.append((t.data_ptr(), t._version, t.dtype, t.device))
        key.extend((lin.mode, lin.coeff) for lin in [*g.layers, g.final])
        key.append(g.lip_coeff)
    return tuple(key)


def cached_fold(nets: Sequence[DenseNetG]) -> FoldedNet:
    """:func:`fold_nets` without autograd, remembered on the first net until any input tensor changes.

    Evaluations (density grids, sampling) call the fused path once per chunk and per block; folding costs a
    few milliseconds (exact spectral norms), which this skips while the weights stay the same.
    """
    key = _fold_key(nets)
    owner = nets[0]
    cached = owner.__dict__.get("_monoflow_fold")
    if cached is not None and cached[0] == key and cached[1] == len(nets):
        return cached[2]
    with torch.no_grad():
        folded = fold_nets(nets)
    owner.__dict__["_monoflow_fold"] = (key, len(nets), folded)
    return folded


class _Consts:
    """Constants on the right dtype/device, made once: a tensor operand is cheaper than a Python float here.

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


@dataclass
class _Eval:
    """One evaluation of G with its tangents, feature-major (what the backward pass reads).

    ``x`` holds the features, one row per feature and one column per point: columns ``[0, B)`` are the primal
    points, columns ``[(1 + t) B, (2 + t) B)`` the tangents along input direction ``t``. Row 0 is the bias row
    (1 on primal columns, 0 on tangents), rows ``1 .. n`` the input (``w`` and the identity), then each layer's
    activation outputs. Per layer: ``h`` the pre-activations (primal and tangent columns), ``y = min(h, 0)``
    and ``e`` its exponential on the primal columns, ``d`` the activation's derivative there. ``out`` is
    ``[w + sign G(w), I + sign J_G(w)]`` as an (n, (1 + n) B) matrix (see :meth:`_BlockWeights.map_weights`).
    """

    x: Tensor
    h: list[Tensor]
    y: list[Tensor]
    e: list[Tensor]
    d: list[Tensor]
    out: Tensor

    def jacobian_map(self, n: int) -> Tensor:
        """``I + sign J_G(w)`` as an (n, n, B) stack: ``[i, t, k] = d(w + sign G(w))_i / dw_t`` at point k."""
        b = self.out.shape[1] // (1 + n)
        return self.out[:, b:].view(n, n, b)


def _activate(kind: str, hp: Tensor, out: Tensor, c: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Activation of the primal pre-activations ``hp`` (value written into ``out``); returns ``(y, e, d)``.

    For Pila the pre-activations arrive as ``h = c k x`` (``k = 5``, ``c = log2 e``, folded into the weights).
    With ``y = min(h, 0)`` and ``e = 2^y = e^(k min(x, 0))`` the stored value is
    ``c k Pila(x) = relu(h) + y p(y / c) e`` with ``p(u) = u^2/2 - u + 1``, and the derivative is
    ``Pila'(x) = (u^3/2 + u^2/2 - u + 1) e`` at ``u = y / c`` (Ahn et al. 2022, Pila). Both cubics are evaluated
    in one stacked Horner scheme; no ``where`` is needed because the branches meet at 0 with two derivatives.
    """
    if kind == "relu":
        torch.clamp_min(hp, 0.0, out=out)
        return hp, hp, (hp > 0).to(hp.dtype)
    a3, a2, a1, a0 = c["horner"]
    y = torch.clamp_max(hp, 0.0)
    e = torch.exp2(y)
    # (a mul and an in-place add: a ternary op broadcasting a (2, 1, 1) operand is 3x slower here)
    q = torch.mul(y, a3).add_(a2)
    q = torch.addcmul(a1, q, y)
    q = torch.addcmul(a0, q, y).mul_(e)
    torch.clamp_min(hp, 0.0, out=out).add_(q[0])
    return y, e, q[1]


def _second(kind: str, y: Tensor, e: Tensor) -> Tensor | None:
    """Derivative of the activation's derivative with respect to the folded input ``h``; None for ReLU.

    ``dPila'(x)/dh = Pila''(x) / (c k) = (u^3/2 + 2 u^2) e / c`` with ``u = y / c``
    (``Pila''(x) = k (u^3/2 + 2 u^2) e^u``).
    """
    if kind == "relu":
        return None
    c = _LOG2E
    return torch.mul(y, 0.5 / c**4).add_(2.0 / c**3).mul_(y).mul_(y).mul_(e)


def evaluate_with_jacobian(net: _BlockWeights, w: Tensor, x: Tensor, final: Tensor) -> _Eval:
    """The map ``w + sign G(w)`` and its Jacobian at the points ``w`` (n, B), into the feature buffer ``x``.

    ``x`` is a (features, (1 + n) B) buffer whose first ``1 + n`` rows already hold the seed (bias row and the
    identity on the tangent columns, :func:`_seed`); ``w`` is copied into the primal input rows. Each layer is
    one matrix product over the stacked primal and tangent columns (forward-mode tangents, ALGORITHM.md 8);
    ``final`` is :meth:`_BlockWeights.map_weights` (``sign``) or ``net.final`` for G and J_G themselves.
    """
    n, b = w.shape
    c = _Consts.get(w)
    x[1 : 1 + n, :b] = w
    hs, ys, es, ds = [], [], [], []
    width = 1 + n
    for weight in net.weights:
        m = weight.shape[0]
        h = torch.mm(weight, x[:width])
        y, e, d = _activate(net.kind, h[:, :b], x[width : width + m, :b], c)
        torch.mul(h[:, b:].view(m, n, b), d.unsqueeze(1), out=x[width : width + m, b:].view(m, n, b))
        hs.append(h)
        ys.append(y)
        es.append(e)
        ds.append(d)
        width += m
    return _Eval(x, hs, ys, es, ds, torch.mm(final, x))


def evaluate(net: _BlockWeights, w: Tensor, final: Tensor) -> Tensor:
    """``final`` applied to G's features at the points ``w`` (n, B), e.g. ``w + G(w)``; no tangents, no autograd."""
    n, b = w.shape
    c = _Consts.get(w)
    x = w.new_empty(net.total, b)
    x[0] = 1.0
    x[1 : 1 + n] = w
    width = 1 + n
    for weight in net.weights:
        m = weight.shape[0]
        _activate(net.kind, torch.mm(weight, x[:width]), x[width : width + m], c)
        width += m
    return torch.mm(final, x)


def _seed(n: int, b: int, like: Tensor, count: int | None = None, total: int | None = None) -> Tensor:
    """A feature buffer (or ``count`` of them) with the seed rows filled: bias row, identity on tangents."""
    shape = (total, (1 + n) * b) if count is None else (count, total, (1 + n) * b)
    x = like.new_empty(shape)
    seed = x[..., : 1 + n, :]
    seed.zero_()
    seed[..., 0, :b] = 1.0
    for t in range(n):
        seed[..., 1 + t, (1 + t) * b : (2 + t) * b] = 1.0
    return x


# Small n x n algebra on (n, n, B) stacks (the batch last, as the feature-major kernels produce them).


def _solve_small(a: Tensor, r: Tensor) -> Tensor:
    """``s`` with ``a[:, :, k] s[:, k] = r[:, k]`` for every point k; closed form for n = 1 and 2."""
    n = a.shape[0]
    if n == 1:
        return r / a[0]
    if n == 2:
        a00, a01, a10, a11 = a.reshape(4, -1).unbind(0)
        r0, r1 = r.unbind(0)
        det = torch.addcmul(a00 * a11, a01, a10, value=-1.0)
        s = torch.stack((torch.addcmul(a11 * r0, a01, r1, value=-1.0), torch.addcmul(a00 * r1, a10, r0, value=-1.0)))
        return s.div_(det)
    return torch.linalg.solve(a.permute(2, 0, 1), r.t()).t()


def _inv_small(a: Tensor) -> Tensor:
    """Inverse of every (n, n) slice of an (n, n, B) stack; closed form for n = 1 and 2."""
    n = a.shape[0]
    if n == 1:
        return 1.0 / a
    if n == 2:
        a00, a01, a10, a11 = a.reshape(4, -1).unbind(0)
        det = torch.addcmul(a00 * a11, a01, a10, value=-1.0)
        return torch.stack((a11, -a01, -a10, a00)).div_(det).view(2, 2, -1)
    return torch.linalg.inv(a.permute(2, 0, 1)).permute(1, 2, 0)


def _logabsdet(a: Tensor) -> Tensor:
    """``log|det|`` of every (n, n) slice of an (n, n, B) stack."""
    n = a.shape[0]
    if n == 1:
        return torch.log(torch.abs(a[0, 0]))
    if n == 2:
        a00, a01, a10, a11 = a.reshape(4, -1).unbind(0)
        return torch.log(torch.abs(torch.addcmul(a00 * a11, a01, a10, value=-1.0)))
    return torch.linalg.slogdet(a.permute(2, 0, 1)).logabsdet


def _eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device).unsqueeze(2)


def _newton(
    net: _BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, x: Tensor
) -> tuple[Tensor, _Eval, SolverStats]:
    """Solve ``w + sign G(w) = rhs`` (points as columns of ``rhs``) by safeguarded Newton, freezing samples.

    Every sample stops moving once its relative residual ``|w + sign G(w) - rhs|_inf / (1 + |rhs|_inf)`` meets
    the tolerance, so the final evaluation (kept in the feature buffer ``x``) is at the returned point for every
    sample: its Jacobian and activations are exact there for the log-det and the backward pass. The hot loop
    avoids Python-scalar arithmetic and per-entry indexing (each costs an operator dispatch).
    """
    n, b = rhs.shape
    tol = effective_tolerance(tol, rhs.dtype)
    threshold = rhs.abs().amax(dim=0).add_(1.0).mul_(tol)
    final = net.map_weights(sign)
    w = rhs
    conv: Tensor | None = None
    history: list[Tensor] = []
    prev: tuple[Tensor, ...] | None = None  # (w, r, res) of the previous accepted iterate
    plain: Tensor | None = None  # samples whose current point came from a plain step
    it = 0
    while True:
        it += 1
        ev = evaluate_with_jacobian(net, w, x, final)
        r = torch.sub(ev.out[:, :b], rhs)
        res = r.abs().amax(dim=0)
        ok = res <= threshold
        conv = ok if conv is None else conv | ok
        history.append(conv)
        if it >= max_iter or bool(conv.all()):
            break
        cand = w - _solve_small(ev.jacobian_map(n), r)
        # Safeguard: where a Newton step made the residual grow, discard it and take the plain (contracting)
        # step from the previous point; that plain step is accepted without comparison, so nothing stalls.
        if prev is not None:
            worse = res > prev[2]
            if plain is not None:
                worse = worse.logical_and_(plain.logical_not())
            if bool(worse.any()):
                cand = torch.where(worse, prev[0] - prev[1], cand)
                prev = tuple(torch.where(worse, old, new) for old, new in zip(prev, (w, r, res), strict=True))
                plain = worse
            else:
                prev, plain = (w, r, res), None
        else:
            prev = (w, r, res)
        w = torch.where(conv, w, cand)
    stats = _stats(history, res / threshold * tol, conv, it, tol, max_iter)
    _warn_unconverged(stats, label, b)
    return w, ev, stats


def _newton_compact(
    net: _BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, want_jacobian: bool
) -> tuple[Tensor, Tensor | None, SolverStats]:
    """:func:`_newton` without a backward pass: converged samples leave the batch (no autograd, no buffers kept).

    Returns ``(w, I + sign J_G(w) or None, stats)``. Each sample's Jacobian map comes from the evaluation at which
    it converged, i.e. at the returned point. Dropping converged samples makes stragglers cheap: the batch
    shrinks to the samples that still need work.
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
    active = torch.arange(b, device=rhs.device)
    w, target, thr = rhs, rhs, threshold
    prev: tuple[Tensor, ...] | None = None
    plain: Tensor | None = None
    buf = _seed(n, b, rhs, total=net.total)
    it = 0
    while True:
        it += 1
        m = w.shape[1]
        if buf.shape[1] != (1 + n) * m:
            buf = _seed(n, m, rhs, total=net.total)
        ev = evaluate_with_jacobian(net, w, buf, final)
        r = torch.sub(ev.out[:, :m], target)
        res = r.abs().amax(dim=0)
        ok = res <= thr
        n_ok = int(ok.sum())
        a = ev.jacobian_map(n)
        if n_ok or it >= max_iter:
            done = ok if it < max_iter else torch.ones_like(ok)
            pos = done.nonzero().squeeze(1)
            ids = active.index_select(0, pos)
            w_out.index_copy_(1, ids, w.index_select(1, pos))
            if a_out is not None:
                a_out.index_copy_(2, ids, a.index_select(2, pos))
            iterations.index_fill_(0, ids, it)
            residual.index_copy_(0, ids, res.index_select(0, pos).div_(thr.index_select(0, pos)).mul_(tol))
            converged.index_copy_(0, ids, ok.index_select(0, pos))
            if it >= max_iter or n_ok == m:
                break
            keep = ok.logical_not().nonzero().squeeze(1)
            active = active.index_select(0, keep)
            w, target, thr = w.index_select(1, keep), target.index_select(1, keep), thr.index_select(0, keep)
            r, res, a = r.index_select(1, keep), res.index_select(0, keep), a.index_select(2, keep)
            if prev is not None:
                prev = (prev[0].index_select(1, keep), prev[1].index_select(1, keep), prev[2].index_select(0, keep))
            if plain is not None:
                plain = plain.index_select(0, keep)
        cand = w - _solve_small(a, r)
        if prev is not None:  # the safeguard of _newton
            worse = res > prev[2]
            if plain is not None:
                worse = worse.logical_and_(plain.logical_not())
            if bool(worse.any()):
                cand = torch.where(worse, prev[0] - prev[1], cand)
                prev = tuple(torch.where(worse, old, new) for old, new in zip(prev, (w, r, res), strict=True))
                plain = worse
            else:
                prev, plain = (w, r, res), None
        else:
            prev = (w, r, res)
        w = cand
    stats = SolverStats("newton", iterations, residual, converged, it, tol, max_iter)
    _warn_unconverged(stats, label, b)
    return w_out, a_out, stats


def _stats(history: list[Tensor], residual: Tensor, conv: Tensor, it: int, tol: float, max_iter: int) -> SolverStats:
    """Per-sample statistics from the convergence masks of each iteration (evaluations until converged)."""
    if len(history) > 1:
        iterations = torch.stack(history[:-1]).logical_not().sum(0).add_(1)
    else:
        iterations = torch.ones_like(conv, dtype=torch.long)
    return SolverStats("newton", iterations, residual, conv, it, tol, max_iter)


def _warn_unconverged(stats: SolverStats, label: str, b: int) -> None:
    if stats.n_failed:
        warnings.warn(
            f"{label}: {stats.n_failed} of {b} samples did not converge within {stats.max_iter} newton iterations "
            f"(worst relative residual {float(stats.residual.max()):.3g}, tolerance {stats.tol:.3g})",
            SolverWarning,
            stacklevel=5,
        )


def _reverse_tangent(net: _BlockWeights, ev: _Eval, cot_out: Tensor, slots: list[Tensor]) -> Tensor:
    """Reverse pass through G and its tangents for the cotangent ``cot_out`` of ``ev.out``; returns dL/dw (n, B).

    Writes the cotangent of each layer's pre-activations (primal and tangent columns) into ``slots``; the
    weight gradients are formed from them later, one batched product per layer for the whole run. The
    tangent path is where the activation's second derivative enters (the log-det's gradient).
    """
    n = net.n
    b = ev.d[0].shape[1]
    cot_x = torch.mm(net.final.t(), cot_out)
    width = cot_x.shape[0]
    for i in reversed(range(len(net.weights))):
        weight = net.weights[i]
        m = weight.shape[0]
        width -= m
        cx = cot_x[width : width + m]
        slot = slots[i]
        d = ev.d[i]
        cx_t = cx[:, b:].view(m, n, b)
        torch.mul(cx_t, d.unsqueeze(1), out=slot[:, b:].view(m, n, b))
        torch.mul(cx[:, :b], d, out=slot[:, :b])
        d2 = _second(net.kind, ev.y[i], ev.e[i])
        if d2 is not None:
            slot[:, :b].addcmul_((cx_t * ev.h[i][:, b:].view(m, n, b)).sum(1), d2)
        if i:
            cot_x[:width].addmm_(weight.t(), slot)
        else:  # only the primal input rows matter below the first layer
            return torch.addmm(cot_x[1 : 1 + n, :b], weight[:, 1 : 1 + n].t(), slot[:, :b])
    raise AssertionError("G has at least one layer")


def _reverse_primal(net: _BlockWeights, ev: _Eval, cot_g: Tensor, slots: list[Tensor]) -> None:
    """Reverse pass through G's primal network for the cotangent ``cot_g`` (n, B) of G(w).

    Adds the pre-activation cotangents into the primal columns of ``slots`` (the weight gradients need
    nothing else: they are products with the same feature buffer).
    """
    b = cot_g.shape[1]
    cot = torch.mm(net.final.t(), cot_g)
    width = cot.shape[0]
    for i in reversed(range(len(net.weights))):
        weight = net.weights[i]
        m = weight.shape[0]
        width -= m
        ch = cot[width : width + m] * ev.d[i]
        slots[i][:, :b].add_(ch)
        if i:
            cot[:width].addmm_(weight.t(), ch)


@dataclass
class _Plan:
    blocks: list[Any]
    n: int
    kind: str


def _block_forward(
    block: Any, weights: _BlockWeights, x: Tensor, buf: Tensor | None
) -> tuple[Tensor, Tensor, _Eval | None]:
    """One block on points ``x`` (n, B): ``(y, logdet, the evaluation at the solution)``; records solver stats.

    With a feature buffer ``buf`` the evaluation at the solution is kept there for the backward pass; without
    (no gradient needed) converged samples leave the solve early and no evaluation is returned. The Jacobian map
    is ``A = I + J_G`` at the solution in every case (ALGORITHM.md 2): the log-det is ``log|det A|`` (residual),
    ``-log|det A|`` (inverse residual) or ``log|det(2I - A)| - log|det A|`` (monotone).
    """
    kind = block.kind
    n, b = x.shape
    if kind == "residual":
        ev = evaluate_with_jacobian(weights, x, _seed(n, b, x, total=weights.total) if buf is None else buf,
                                    weights.map_weights(1.0))
        return ev.out[:, :b], _logabsdet(ev.jacobian_map(n)), ev if buf is not None else None
    rhs = SQRT2 * x if kind == "monotone" else x
    label = f"{type(block).__name__} forward solve"
    ev: _Eval | None = None
    if buf is None:
        w, a, block.forward_stats = _newton_compact(weights, rhs, 1.0, block.tol, block.max_iter, label, True)
        assert a is not None
    else:
        w, ev, block.forward_stats = _newton(weights, rhs, 1.0, block.tol, block.max_iter, label, buf)
        a = ev.jacobian_map(n)
    if kind == "monotone":
        return SQRT2 * w - x, _logabsdet(torch.sub(2.0 * _eye(n, x), a)) - _logabsdet(a), ev
    return w, -_logabsdet(a), ev


def _fused_forward(
    x: Tensor, plan: _Plan, net: FoldedNet, keep: bool
) -> tuple[Tensor, Tensor, list[tuple[str, _Eval]], Tensor | None]:
    """Forward through the run on points ``x`` (n, B).

    With ``keep``, every block evaluates into its own slice of one (blocks, features, (1 + n) B) buffer and the
    evaluations at the solutions are returned for the backward pass; without, the solves drop converged samples.
    """
    n, b = x.shape
    nb = len(plan.blocks)
    bufs = _seed(n, b, x, count=nb, total=net.final.shape[2]) if keep else None
    records: list[tuple[str, _Eval]] = []
    total: Tensor | None = None
    for j, block in enumerate(plan.blocks):
        x, logdet, ev = _block_forward(block, net.block(j), x, bufs[j] if bufs is not None else None)
        block.last_logdet_exact = True
        total = logdet if total is None else total + logdet
        if ev is not None:
            records.append((block.kind, ev))
    assert total is not None
    return x, total, records, bufs


class _FusedBlocks(torch.autograd.Function):
    """A run of blocks as one autograd node with the exact implicit backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        net = FoldedNet.from_tensors([t.detach() for t in tensors], plan.n, plan.kind)
        y, total, records, bufs = _fused_forward(x.detach().t().contiguous(), plan, net, keep=True)
        ctx.net = net
        ctx.records = records
        ctx.bufs = bufs
        return y.t().contiguous(), total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_z: Tensor, grad_logdet: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        net: FoldedNet = ctx.net
        bufs: Tensor = ctx.bufs
        nb, _, cols = bufs.shape
        n = net.n
        b = cols // (1 + n)
        gy = grad_z.t().contiguous()
        # Cotangents of every block's pre-activations and of G's outputs, kept so that each weight gradient is
        # one batched product over the blocks at the end.
        slots = [bufs.new_empty(nb, w.shape[1], cols) for w in net.weights]
        cot_out = bufs.new_empty(nb, n, cols)
        eye = _eye(n, gy)
        neg_gl = -grad_logdet
        for j in reversed(range(nb)):
            kind, ev = ctx.records[j]
            weights = net.block(j)
            a_plus = ev.jacobian_map(n)  # I + J_G at the solution
            inv_plus = _inv_small(a_plus)
            co = cot_out[j]
            # d logdet / dJ, transposed into co's tangent columns (co[i, t-th block] pairs with dG_i/dw_t).
            if kind == "residual":
                torch.mul(inv_plus.transpose(0, 1), grad_logdet, out=co[:, b:].view(n, n, b))
                co[:, :b] = gy
            else:
                dlog = _inv_small(torch.sub(2.0 * eye, a_plus)).add_(inv_plus) if kind == "monotone" else inv_plus
                torch.mul(dlog.transpose(0, 1), neg_gl, out=co[:, b:].view(n, n, b))
                co[:, :b].zero_()
            slot_j = [s[j] for s in slots]
            v = _reverse_tangent(weights, ev, co, slot_j)
            if kind == "residual":
                gy = gy + v
                continue
            gw = torch.add(v, gy, alpha=SQRT2) if kind == "monotone" else v.add_(gy)
            # a = gw (I + J)^{-1}: the implicit-function gradient with respect to the solve's right-hand side
            # (ALGORITHM.md 4); the parameters receive -a dG/dtheta.
            a = (inv_plus * gw.unsqueeze(1)).sum(0)
            torch.neg(a, out=co[:, :b])
            _reverse_primal(weights, ev, co[:, :b], slot_j)
            gy = torch.sub(a, gy, alpha=1.0 / SQRT2).mul_(SQRT2) if kind == "monotone" else a
        grads = []
        width = 1 + n
        for w, s in zip(net.weights, slots, strict=True):
            grads.append(torch.bmm(s, bufs[:, :width].transpose(1, 2)))
            width += w.shape[1]
        grads.append(torch.bmm(cot_out, bufs.transpose(1, 2)))
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
            y, logdet, _, _ = _fused_forward(x.t().contiguous(), plan, folded, keep=False)
        return y.t(), logdet
    folded = fold_nets(nets)
    plan = _Plan(list(blocks), folded.n, folded.kind)
    return _FusedBlocks.apply(x, plan, *folded.tensors())


def fused_inverse(block: Any, y: Tensor) -> Tensor:
    """Inverse of one eligible block on ``y`` (B, n) without autograd (sampling): Newton on the folded kernel."""
    with torch.no_grad():
        net = cached_fold([block.net]).block(0)
        yt = y.t().contiguous()
        if block.kind == "inverse_residual":
            return evaluate(net, yt, net.map_weights(1.0)).t()
        sign = -1.0 if block.kind == "monotone" else 1.0
        rhs = SQRT2 * yt if block.kind == "monotone" else yt
        label = f"{type(block).__name__} inverse solve"
        w, _, block.inverse_stats = _newton_compact(net, rhs, sign, block.tol, block.max_iter, label, False)
        return (SQRT2 * w - yt).t() if block.kind == "monotone" else w.t()
