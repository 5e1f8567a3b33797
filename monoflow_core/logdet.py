"""Log-determinants of flow blocks: exact for small dimensions, power-series estimators for large ones.

For a block built on G with Jacobian ``J = J_G(w)`` (Ahn et al. 2022, Definition 3 and docs/algorithm.md sections 3, 5):

* monotone:          ``log|det(I - J)| - log|det(I + J)|``  = ``sum_k c_k tr(J^k)``, ``c_k = -2/k`` (k odd)
* residual:          ``log|det(I + J)|``                      = ``sum_k (-1)^(k+1)/k tr(J^k)``
* inverse residual:  ``-log|det(I + J)|``

The exact form uses the full Jacobian (cheap by forward-mode tangents in small dimensions). The estimator is
the Residual-Flows power series (Chen et al. 2019): Hutchinson traces ``v^T J^k v`` with Gaussian probes and a
Russian-roulette truncation, optionally with the Neumann-series gradient. Its terms are taken either by
vector-Jacobian products through a graph of G (``u -> u^T J``) or by forward-mode products with G's derivatives kept
(``u -> J u``, :meth:`monoflow_core.nn.densenet.JacobianNet.linearize`); both give the same ``v^T J^k v``
(:data:`SERIES_PRODUCTS`, docs/gpu.md). Its value is an *unbiased estimate*,
never an exact log-likelihood, and callers must label it so. Beware: the roulette's variance is infinite once
the spectral radius of J exceeds ``sqrt(1 - p)`` (docs/performance.md).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "EXACT_MAX_DIM",
    "KINDS",
    "LOGDET_MODES",
    "MAX_MEAN_EXTRA_TERMS",
    "SERIES_PRODUCTS",
    "EstimatorSettings",
    "exact_logdet",
    "neumann_logdet",
    "neumann_series_vectors",
    "power_series_coefficient",
    "power_series_logdet",
    "resolve_logdet_mode",
    "resolve_series_products",
]

KINDS = ("monotone", "residual", "inverse_residual")
LOGDET_MODES = ("auto", "exact", "estimator", "hybrid")
ROULETTES = ("geometric", "poisson")

#: How the power series takes its terms: ``"jvp"`` (forward-mode products ``J u`` with G's activation derivatives
#: kept, where G offers them), ``"vjp"`` (vector-Jacobian products ``u^T J`` through a graph of G), or ``"auto"``:
#: ``"jvp"`` where G offers it. Per term both cost the same convolutions (counted: benchmarks/block_operators.py),
#: and the forward-mode product issues far fewer operators: it multiplies by a kept derivative where the graph's
#: backward recomputes the activation's derivative from its saved input, and walks no graph (docs/gpu.md).
SERIES_PRODUCTS = ("auto", "jvp", "vjp")

#: ``"auto"`` computes the exact log-det up to this many dimensions per sample (64 covers 8x8 images).
EXACT_MAX_DIM = 64

#: Largest mean number of extra terms (beyond the exact ones) a roulette may draw per pass: each costs one
#: vector-Jacobian product per probe, so a larger mean costs more than most models' exact log-det; the bound also
#: keeps the draws, and the weights ``1 / P(N >= m)``, far from integer and float overflow.
MAX_MEAN_EXTRA_TERMS = 1000.0

#: Floor of the tail probabilities P(N >= m) the roulette divides by (keeps every weight finite).
_MIN_TAIL = 1e-300


@functools.lru_cache(maxsize=4096)
def _poisson_tail(lam: float, m: int) -> float:
    """``P(N >= m)`` for ``N ~ Poisson(lam)``, in log space (no ``lam**j`` or ``j!``, which overflow).

    Below the mode, ``1 - P(N < m)`` (the CDF is at most about one half there, so nothing cancels); beyond it the
    tail's own terms, which decrease geometrically, summed until they no longer change the total (accurate even
    where ``1 - cdf`` would round to 0). Cached: every estimator pass asks for the same few values.
    """
    if m <= 0:
        return 1.0
    log_lam = math.log(lam)

    def pmf(j: int) -> float:
        return math.exp(-lam + j * log_lam - math.lgamma(j + 1))

    if m <= lam:
        return max(1.0 - math.fsum(pmf(j) for j in range(m)), _MIN_TAIL)
    total, j = 0.0, m
    while True:  # ratios pmf(j+1)/pmf(j) = lam/(j+1) < 1: it converges (in under 300 terms for lam <= 1000)
        term = pmf(j)
        if term <= total * 1e-17 or term == 0.0:
            break
        total += term
        j += 1
    return max(total, _MIN_TAIL)


def resolve_logdet_mode(mode: str, dim: int, training: bool = False) -> str:
    """Resolve a log-det mode for one pass of a block with ``dim`` dimensions per sample.

    ``"auto"``: ``"exact"`` for ``dim <= EXACT_MAX_DIM``, ``"estimator"`` above. ``"hybrid"``: the estimator
    while training (a pass that needs gradients: cheap, unbiased) and as ``"auto"`` otherwise, so that reported
    likelihoods stay exact where that is affordable (e.g. 8x8 images: about 64 G-evaluations per block).
    """
    key = mode.lower()
    if key not in LOGDET_MODES:
        raise ValueError(f"logdet: unknown mode {mode!r}; choose one of {list(LOGDET_MODES)}")
    if key == "hybrid" and training:
        return "estimator"
    if key in ("auto", "hybrid"):
        return "exact" if dim <= EXACT_MAX_DIM else "estimator"
    return key


def _logabsdet_shifted(J: Tensor, sign: float) -> Tensor:
    """``log|det(I + sign * J)|`` per sample; closed forms for n <= 2 (twice differentiable everywhere)."""
    n = J.shape[-1]
    if n == 1:
        return torch.log(torch.abs(1.0 + sign * J[:, 0, 0]))
    if n == 2:
        a = 1.0 + sign * J[:, 0, 0]
        e = 1.0 + sign * J[:, 1, 1]
        det = a * e - J[:, 0, 1] * J[:, 1, 0]
        return torch.log(torch.abs(det))
    eye = torch.eye(n, dtype=J.dtype, device=J.device)
    return torch.linalg.slogdet(eye + sign * J).logabsdet


def exact_logdet(J: Tensor, kind: str) -> Tensor:
    """Exact log|det| of a block's Jacobian from ``J = J_G`` (B, n, n); returns (B,).

    Args:
        J: Jacobian of G at the point where the block's log-det is defined (``w`` for implicit blocks).
        kind: ``"monotone"``, ``"residual"`` or ``"inverse_residual"``.
    """
    if kind == "monotone":
        return _logabsdet_shifted(J, -1.0) - _logabsdet_shifted(J, 1.0)
    if kind == "residual":
        return _logabsdet_shifted(J, 1.0)
    if kind == "inverse_residual":
        return -_logabsdet_shifted(J, 1.0)
    raise ValueError(f"kind: unknown block kind {kind!r}; choose one of {list(KINDS)}")


def power_series_coefficient(kind: str, k: int) -> float:
    """Coefficient ``c_k`` of ``tr(J^k)`` in the block's log-det series (k >= 1)."""
    if kind == "monotone":
        return -2.0 / k if k % 2 == 1 else 0.0
    if kind == "residual":
        return (-1.0) ** (k + 1) / k
    if kind == "inverse_residual":
        return -((-1.0) ** (k + 1)) / k
    raise ValueError(f"kind: unknown block kind {kind!r}; choose one of {list(KINDS)}")


@dataclass
class EstimatorSettings:
    """Settings of the power-series estimator.

    Attributes:
        n_exact_terms: terms always computed (weight 1) during training.
        n_exact_terms_eval: terms always computed outside training (larger: lower variance).
        roulette: ``"geometric"`` or ``"poisson"`` distribution of the number of extra terms N.
        roulette_param: p of the geometric (P(N = m) = p (1-p)^m) or lambda of the Poisson; the mean number of
            extra terms, ``(1-p)/p`` or lambda, must be at most :data:`MAX_MEAN_EXTRA_TERMS`.
        n_probes: Hutchinson probes per sample (averaged).
        neumann_grad: use the Neumann-series gradient (memory-saving) in training.
        products: how the series takes its terms, one of :data:`SERIES_PRODUCTS` (see
            :func:`resolve_series_products`).
    """

    n_exact_terms: int = 2
    n_exact_terms_eval: int = 20
    roulette: str = "geometric"
    roulette_param: float = 0.5
    n_probes: int = 1
    neumann_grad: bool = True
    products: str = "auto"

    def __post_init__(self) -> None:
        if self.products not in SERIES_PRODUCTS:
            raise ValueError(f"products: unknown {self.products!r}; choose one of {list(SERIES_PRODUCTS)}")
        if self.roulette not in ROULETTES:
            raise ValueError(f"roulette: unknown {self.roulette!r}; choose one of {list(ROULETTES)}")
        param = self.roulette_param
        if isinstance(param, bool) or not isinstance(param, numbers.Real):
            raise ValueError(f"roulette_param: must be a number, got {param!r}")
        # The bounds keep the mean number of extra terms at most MAX_MEAN_EXTRA_TERMS (NaN fails both).
        low_p = 1.0 / (1.0 + MAX_MEAN_EXTRA_TERMS)
        if self.roulette == "geometric" and not low_p <= param < 1.0:
            raise ValueError(
                f"roulette_param: geometric p must be in [{low_p:.6g}, 1) (a mean of at most "
                f"{MAX_MEAN_EXTRA_TERMS:g} extra terms), got {param}"
            )
        if self.roulette == "poisson" and not 0.0 < param <= MAX_MEAN_EXTRA_TERMS:
            raise ValueError(
                f"roulette_param: Poisson lambda must be in (0, {MAX_MEAN_EXTRA_TERMS:g}] (the mean "
                f"number of extra terms), got {param}"
            )
        if self.n_exact_terms < 1 or self.n_exact_terms_eval < 1:
            raise ValueError("n_exact_terms: must be >= 1")
        if self.n_probes < 1:
            raise ValueError(f"n_probes: must be >= 1, got {self.n_probes}")

    def tail_probability(self, m: int) -> float:
        """P(N >= m) for the roulette's N (m >= 0)."""
        if m <= 0:
            return 1.0
        if self.roulette == "geometric":
            return max(math.exp(m * math.log1p(-self.roulette_param)), _MIN_TAIL)
        return _poisson_tail(float(self.roulette_param), int(m))

    def draw_extra_terms(self, generator: torch.Generator | None = None) -> int:
        """Draw N, the number of terms beyond the exact ones."""
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if self.roulette == "geometric":
            # P(N >= m) = (1-p)^m  =>  N = floor(log(U) / log(1-p)); log1p keeps log(1-p) exact for small p, and
            # with p >= 1/(1 + MAX_MEAN_EXTRA_TERMS) N stays below about 690 * MAX_MEAN_EXTRA_TERMS even for U -> 0.
            return math.floor(math.log(max(u, _MIN_TAIL)) / math.log1p(-self.roulette_param))
        lam = torch.tensor(float(self.roulette_param), dtype=torch.float64)
        return int(torch.poisson(lam, generator=generator))


def resolve_series_products(products: str, linearizable: bool) -> str:
    """``"jvp"`` or ``"vjp"``: the products a series takes for a G that offers forward-mode products or not.

    ``"auto"`` and ``"jvp"`` resolve to ``"jvp"`` where G offers them (``linearizable``), to ``"vjp"`` otherwise.
    Only the memory-saving paths use forward-mode products: a no-gradient evaluation, and training with the
    Neumann gradient (:func:`neumann_logdet`); a series whose own graph is kept takes ``"vjp"`` products.
    """
    if products not in SERIES_PRODUCTS:
        raise ValueError(f"products: unknown {products!r}; choose one of {list(SERIES_PRODUCTS)}")
    return "jvp" if products != "vjp" and linearizable else "vjp"


def _draw_series(
    settings: EstimatorSettings, kind: str, training: bool, generator: torch.Generator | None
) -> list[float]:
    """The weights ``c_k / P(N >= k - n_exact)`` of one draw of the roulette, for k = 1 .. n_terms."""
    n_exact = settings.n_exact_terms if training else settings.n_exact_terms_eval
    n_terms = n_exact + settings.draw_extra_terms(generator)
    return [power_series_coefficient(kind, k) / settings.tail_probability(k - n_exact) for k in range(1, n_terms + 1)]


def _series(product: Callable[[Tensor], Tensor], v: Tensor, weights: list[float]) -> tuple[Tensor, Tensor]:
    """``sum_k w_k v.(P^k v)`` per sample and ``sum_k w_k k P^(k-1) v`` for the product ``P`` (``J`` or ``J^T``)."""
    b = v.shape[0]
    total = torch.zeros(b, dtype=v.dtype, device=v.device)
    u, acc = v, torch.zeros_like(v)
    for k, weight in enumerate(weights, start=1):
        acc = acc + (weight * k) * u
        u = product(u)
        total = total + weight * (u * v).reshape(b, -1).sum(dim=1)
    return total, acc


def neumann_series_vectors(
    vjp: Callable[[Tensor, bool], Tensor],
    shape: torch.Size,
    kind: str,
    settings: EstimatorSettings,
    *,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
    jvp: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One training draw of the estimator without any graph: its value and the vectors of its Neumann gradient.

    The estimate is ``sum_k w_k v^T J^k v`` (Hutchinson probe ``v``, roulette weights ``w_k``). Its derivative with
    respect to anything J depends on is ``sum_k w_k sum_{j<k} v^T J^j dJ J^(k-1-j) v``; the Neumann-series
    gradient of Residual Flows (Chen et al. 2019, section 3.2) keeps, of that, one unbiased estimate, the gradient of
    a bilinear *surrogate* ``l^T J r`` with ``l`` and ``r`` held fixed:

    * with vector-Jacobian products (``jvp`` not given): ``l = q``, ``r = v``, ``q^T = sum_k w_k k v^T J^(k-1)``, so the
      gradient is ``sum_k w_k k v^T J^(k-1) dJ v``;
    * with forward-mode products (``jvp``: ``u -> J u``): ``l = v``, ``r = p = sum_k w_k k J^(k-1) v``, so the gradient
      is ``sum_k w_k k v^T dJ J^(k-1) v``.

    For a probe with ``E[v v^T] = I`` both have the expectation ``sum_k w_k k tr(J^(k-1) dJ) = d sum_k w_k tr(J^k)``
    (the trace is invariant under cyclic shifts), and the value is the same ``v^T J^k v`` either way. The surrogate's
    gradient takes one more vector-Jacobian product, differentiated once, whenever and wherever the graph of G is at
    hand.

    Args:
        vjp: ``vjp(u, create_graph) -> u^T J``; called here with ``create_graph=False`` only, and not at all with
            ``jvp``.
        shape: the (B, ...) shape of the block's input.
        jvp: ``u -> J u`` (no graph), to take the terms by forward-mode products.

    Returns:
        ``(value, l, r)``: the (B,) estimate averaged over probes, and ``l``, ``r`` of shape (P, B, ...) for the
        ``P = n_probes`` probes, already divided so that the surrogate is ``sum_p l_p^T J r_p``.
    """
    weights = _draw_series(settings, kind, True, generator)
    total = torch.zeros(shape[0], dtype=dtype, device=device)
    lefts, rights = [], []
    for _ in range(settings.n_probes):
        v = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        if jvp is not None:
            value, p = _series(jvp, v, weights)
            lefts.append(v / settings.n_probes)
            rights.append(p)
        else:
            value, q = _series(lambda u: vjp(u, False), v, weights)
            lefts.append(q / settings.n_probes)
            rights.append(v)
        total = total + value
    return total / settings.n_probes, torch.stack(lefts), torch.stack(rights)


class _NeumannLogdet(torch.autograd.Function):
    """A log-det estimate whose gradient is the Neumann surrogate's, differentiated when backward asks for it.

    The forward pass keeps the estimate's value, the surrogate's vectors ``l`` and ``r``
    (:func:`neumann_series_vectors`) and nothing else: no graph of the series. Backward weights each sample's ``l``
    by its incoming gradient, takes one vector-Jacobian product *with* a graph through G at the block's point (the
    graph the block keeps anyway for its implicit gradient), and differentiates ``sum_b c_b l_b^T J_b r_b`` once
    with respect to that point and G's parameters. This is Residual Flows' memory-efficient estimator (the series'
    graph is never kept) with the double backward moved from the forward into the backward pass: it is exact for
    every weighting of the samples' log-dets (not only for a plain mean), needs no host synchronisation, and its
    transient graph exists while the later blocks' graphs are already freed.
    """

    @staticmethod
    def forward(
        ctx: Any,
        value: Tensor,
        q: Tensor,
        v: Tensor,
        surrogate_grad: Callable[..., tuple[Tensor | None, ...]],
        point: Tensor,
        *params: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(q, v)
        ctx.surrogate_grad = surrogate_grad
        ctx.n_params = len(params)
        return value.detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        q, v = ctx.saved_tensors
        weights = grad.reshape(1, -1, *([1] * (q.dim() - 2)))
        grads = ctx.surrogate_grad(q * weights.to(q.dtype), v)
        return (None, None, None, None, *grads)


def neumann_logdet(
    vjp: Callable[[Tensor, bool], Tensor],
    point: Tensor,
    params: list[Tensor],
    kind: str,
    settings: EstimatorSettings,
    *,
    attach_to: Tensor,
    generator: torch.Generator | None = None,
    jvp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Memory-efficient training estimate of a block's log-det (Chen et al. 2019, section 3.2).

    The value is one unbiased draw of the power series (as :func:`power_series_logdet`); its gradient is the
    Neumann-series gradient, with respect to ``attach_to`` (the tensor the block's output depends on, equal to
    ``point``) and ``params``. No graph of the series is kept: see :class:`_NeumannLogdet`.

    Args:
        vjp: ``vjp(u, create_graph) -> u^T J`` through a graph of G at ``point`` that outlives the forward pass
            (the block's own graph for its implicit gradient); ``create_graph=True`` is used in backward only.
        point: the tensor the products are taken with respect to (a leaf or an alias of the block's point).
        params: every tensor with ``requires_grad`` that G's value depends on, other than ``point`` (G's
            parameters); they receive the surrogate's gradient.
        attach_to: the tensor that receives the gradient with respect to the point (``point`` itself, or the
            tensor carrying the block's implicit gradient).
        jvp: ``u -> J u`` at ``point`` without a graph: the series' terms are then forward-mode products
            (:func:`neumann_series_vectors`).
    """
    with torch.no_grad():
        value, q, v = neumann_series_vectors(
            vjp, point.shape, kind, settings, dtype=point.dtype, device=point.device, generator=generator, jvp=jvp
        )
    inputs = [point, *params]

    def surrogate_grad(q_weighted: Tensor, v_probes: Tensor) -> tuple[Tensor | None, ...]:
        with torch.enable_grad():
            surrogate = sum(
                (vjp(qp, True) * vp).sum() for qp, vp in zip(q_weighted.unbind(0), v_probes.unbind(0), strict=True)
            )
            assert isinstance(surrogate, Tensor)
            if not surrogate.requires_grad:  # G ignores its input and has no trainable parameter
                return tuple(None for _ in inputs)
            # retain_graph: the graph of G at the point still serves the implicit gradient after this.
            return torch.autograd.grad(surrogate, inputs, retain_graph=True, allow_unused=True)

    return _NeumannLogdet.apply(value, q, v, surrogate_grad, attach_to, *params)


def _without_graph(vjp: Callable[[Tensor, bool], Tensor] | None) -> Callable[[Tensor], Tensor]:
    assert vjp is not None

    def product(u: Tensor) -> Tensor:
        return vjp(u, False)

    return product


def power_series_logdet(
    vjp: Callable[[Tensor, bool], Tensor] | None,
    shape: torch.Size,
    kind: str,
    settings: EstimatorSettings,
    *,
    training: bool,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator | None = None,
    jvp: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Unbiased power-series estimate of a block's log-det (Chen et al. 2019; docs/algorithm.md section 5).

    Args:
        vjp: ``vjp(u, create_graph) -> u^T J`` for (B, ...) tensors ``u``; with ``create_graph`` the product
            stays differentiable with respect to ``w`` and the parameters of G. May be ``None`` with ``jvp``.
        shape: the (B, ...) shape of the block's input.
        kind: ``"monotone"``, ``"residual"`` or ``"inverse_residual"``.
        settings: estimator settings.
        training: whether gradients are needed (uses ``n_exact_terms`` and, if enabled, the Neumann gradient;
            otherwise ``n_exact_terms_eval`` and no graph).
        jvp: ``u -> J u`` without a graph, for an estimate without gradients (``training=False``): the terms are
            then forward-mode products, the same ``v^T J^k v``.

    Returns:
        (B,) estimate. In training with ``neumann_grad`` its *value* is the estimate and its *gradient* is the
        Neumann-series estimate of the log-det's gradient.
    """
    weights = _draw_series(settings, kind, training, generator)
    if jvp is not None and training:
        raise ValueError("power_series_logdet: forward-mode products carry no graph; training needs vjp")
    if jvp is not None or not training:
        if jvp is None and vjp is None:
            raise ValueError("power_series_logdet: needs vjp or jvp")
        product = jvp if jvp is not None else _without_graph(vjp)
        total = torch.zeros(shape[0], dtype=dtype, device=device)
        for _ in range(settings.n_probes):
            v = torch.randn(shape, dtype=dtype, device=device, generator=generator)
            total = total + _series(product, v, weights)[0]
        return total / settings.n_probes
    if vjp is None:
        raise ValueError("power_series_logdet: training needs vjp")
    n_terms = len(weights)
    b = shape[0]
    total = torch.zeros(b, dtype=dtype, device=device)
    surrogate = torch.zeros(b, dtype=dtype, device=device)
    use_neumann = training and settings.neumann_grad
    for _ in range(settings.n_probes):
        v = torch.randn(shape, dtype=dtype, device=device, generator=generator)
        u = v
        # Neumann: gradient of sum_k c_k tr(J^k) is sum_k c_k k tr(J^(k-1) dJ); accumulate
        # q^T = sum_k c_k w_k k v^T J^(k-1) without a graph, then differentiate q^T J v once.
        q = torch.zeros_like(v)
        for k in range(1, n_terms + 1):
            if use_neumann:
                q = q + (weights[k - 1] * k) * u
            u = vjp(u, training and not use_neumann)
            if use_neumann:
                u = u.detach()
            total = total + weights[k - 1] * (u * v).reshape(b, -1).sum(dim=1)
        if use_neumann:
            qj = vjp(q.detach(), True)
            surrogate = surrogate + (qj * v).reshape(b, -1).sum(dim=1)
    total = total / settings.n_probes
    if use_neumann:
        surrogate = surrogate / settings.n_probes
        return total.detach() + (surrogate - surrogate.detach())
    return total
