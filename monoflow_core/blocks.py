"""Invertible blocks: monotone, residual and inverse-residual blocks around a Lipschitz G; ActNorm; scaling.

Every block is an ``nn.Module`` with ``forward(x) -> (y, logdet)`` (``logdet = log|det dy/dx|`` per sample,
shape (B,)) and ``inverse(y) -> x``. The implicit blocks work with *any* differentiable G the user passes (a
module with or without parameters, or a plain callable such as ``lambda w: 0.9 * torch.tanh(w)``), provided G
acts on each sample independently and has Lipschitz constant below 1. The project's own networks
(:class:`~monoflow_core.nn.densenet.JacobianNet`) take a fast path: their Jacobian comes with their value by
forward-mode tangents, and their normalised weights are computed once per pass of the block.

Gradients through every solve are exact implicit-function gradients (Ahn et al. 2022, docs/algorithm.md section 6); no
solver iteration is ever differentiated:

* small dimensions (``n <= ONE_STEP_MAX_DIM``): the one-step correction ``w = w* - A^{-1} r(w*)`` with
  ``A = I +- J_G(w*)`` detached (docs/performance.md): its value is ``w*`` and autograd through it is exactly the
  implicit-function gradient;
* larger dimensions: a backward fixed-point solve ``a = g -+ a J_G(w*)`` of vector-Jacobian products, hooked
  onto ``w``, so the log-det's gradient joins the incoming gradient before the single backward solve.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .logdet import (
    EstimatorSettings,
    exact_logdet,
    neumann_logdet,
    power_series_logdet,
    resolve_logdet_mode,
    resolve_series_products,
)
from .nn.densenet import JacobianNet, LinearMap
from .solvers import DEFAULT_TOL, SolverStats, resolve_method, solve, solve_small_linear

__all__ = [
    "IMPLICIT_GRAD_MODES",
    "ONE_STEP_MAX_DIM",
    "ActNorm",
    "InverseResidualBlock",
    "MonotoneBlock",
    "PositiveScale",
    "ResidualBlock",
]

#: Up to this many dimensions per sample, gradients use the one-step correction (dense n x n solve).
ONE_STEP_MAX_DIM = 16
IMPLICIT_GRAD_MODES = ("auto", "one_step", "backward_solve")
SQRT2 = math.sqrt(2.0)

GFunction = Callable[[Tensor], Tensor]


class _Graph(NamedTuple):
    """A graph of G kept by a block: ``value = G(point)``; gradients with respect to ``point`` go to ``attach``.

    ``jvp``: the forward-mode product ``t -> J_G(point) t`` (:meth:`JacobianNet.linearize`) where the log-det's series
    takes its terms that way, else ``None``.
    """

    point: Tensor
    value: Tensor
    attach: Tensor
    jvp: LinearMap | None = None


def _event_dim(x: Tensor) -> int:
    return int(x[0].numel()) if x.shape[0] > 0 else int(math.prod(x.shape[1:]))


def _grad_alias(w: Tensor) -> Tensor:
    """A tensor equal to ``w`` to take gradients with respect to, connected to ``w``'s graph if it has one.

    ``torch.autograd.grad`` with respect to ``w`` itself would run the tensor hooks registered on ``w`` (the
    backward fixed-point solve of :meth:`_ImplicitBlock._backward_solve_hook`); with respect to a view of ``w``
    it stops at the view, and gradients later flowing through the view still reach ``w`` and its hook.
    """
    if w.requires_grad:
        return w.view_as(w)
    return w.detach().requires_grad_(True)


def autograd_jacobian(fn: GFunction, w: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
    """``(fn(w), J)`` for a generic per-sample function, J (B, n, n) from n reverse-mode passes.

    Because samples are independent, the gradient of ``sum_b fn(w)_b[i]`` with respect to ``w`` holds row
    ``i`` of every sample's Jacobian.
    """
    with torch.enable_grad():
        wr = _grad_alias(w) if create_graph else w.detach().requires_grad_(True)
        g = fn(wr)
        b = w.shape[0]
        gf = g.reshape(b, -1)
        rows = []
        for i in range(gf.shape[1]):
            (row,) = torch.autograd.grad(
                gf[:, i].sum(), wr, create_graph=create_graph, retain_graph=True, allow_unused=True
            )
            rows.append(torch.zeros_like(wr) if row is None else row)
        jac = torch.stack([r.reshape(b, -1) for r in rows], dim=1)
    if not create_graph:
        return g.detach(), jac.detach()
    return g, jac


class _NetEvaluator:
    """Evaluates G (and its Jacobian) during one pass of a block, with weights prepared once."""

    def __init__(self, net: GFunction) -> None:
        self.net = net
        self.fast = isinstance(net, JacobianNet)
        self.prepared = net.prepare() if isinstance(net, JacobianNet) else None

    def value(self, w: Tensor) -> Tensor:
        if isinstance(self.net, JacobianNet):
            assert self.prepared is not None  # prepared in __init__ for every JacobianNet
            return self.net.evaluate(w, self.prepared)
        return self.net(w)

    def value_and_jacobian(self, w: Tensor, create_graph: bool) -> tuple[Tensor, Tensor]:
        if isinstance(self.net, JacobianNet):
            assert self.prepared is not None  # prepared in __init__ for every JacobianNet
            if create_graph:
                return self.net.evaluate_with_jacobian(w, self.prepared)
            with torch.no_grad():
                return self.net.evaluate_with_jacobian(w, self.prepared)
        return autograd_jacobian(self.value, w, create_graph)

    @property
    def linearizable(self) -> bool:
        """Whether G offers forward-mode products with its derivatives kept (:meth:`JacobianNet.linearize`)."""
        return isinstance(self.net, JacobianNet) and self.net.supports_linearize

    def value_and_linear(self, w: Tensor) -> tuple[Tensor, LinearMap | None]:
        """``G(w)`` (with a graph where autograd records one) and ``t -> J_G(w) t`` where G offers it."""
        if self.linearizable:
            assert isinstance(self.net, JacobianNet) and self.prepared is not None  # prepared for every JacobianNet
            return self.net.linearize(w, self.prepared)
        return self.value(w), None


def _net_has_grad_params(net: GFunction) -> bool:
    return isinstance(net, nn.Module) and any(p.requires_grad for p in net.parameters())


class _ImplicitBlock(nn.Module):
    """Shared machinery of the blocks built on G: solves, gradients, log-dets, statistics."""

    kind: str = ""

    def __init__(
        self,
        net: GFunction,
        *,
        solver: str = "auto",
        tol: float = DEFAULT_TOL,
        max_iter: int = 1000,
        memory: int = 5,
        logdet: str = "auto",
        estimator: EstimatorSettings | None = None,
        implicit_grad: str = "auto",
    ) -> None:
        super().__init__()
        if not callable(net):
            raise TypeError("net: must be a callable G (an nn.Module or a function of a tensor)")
        resolve_method(solver, 1)  # validates the name
        resolve_logdet_mode(logdet, 1)
        if implicit_grad not in IMPLICIT_GRAD_MODES:
            raise ValueError(f"implicit_grad: unknown {implicit_grad!r}; choose one of {list(IMPLICIT_GRAD_MODES)}")
        if not tol > 0:
            raise ValueError(f"tol: must be positive, got {tol}")
        if max_iter < 1:
            raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
        self.net = net
        self.solver = solver
        self.tol = float(tol)
        self.max_iter = int(max_iter)
        self.memory = int(memory)
        self.logdet_mode = logdet
        self.estimator = estimator or EstimatorSettings()
        self.implicit_grad = implicit_grad
        self.forward_stats: SolverStats | None = None
        self.inverse_stats: SolverStats | None = None
        self.backward_stats: SolverStats | None = None
        self.last_logdet_exact = True

    # -- helpers ---------------------------------------------------------------------------------------
    def _needs_grad(self, x: Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or _net_has_grad_params(self.net))

    def _solve(
        self, ev: _NetEvaluator, rhs: Tensor, sign: float, label: str
    ) -> tuple[Tensor, SolverStats, Tensor | None]:
        """Solve ``w + sign * G(w) = rhs`` without a graph; return ``(w*, stats, A = I + sign J at w*)``."""
        n = _event_dim(rhs)
        method = resolve_method(self.solver, n)
        rhs = rhs.detach()
        eye = torch.eye(n, dtype=rhs.dtype, device=rhs.device)

        def fmap(w: Tensor, idx: Tensor) -> Tensor:
            return rhs[idx] - sign * ev.value(w)

        def newton_map(w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
            g, jac = ev.value_and_jacobian(w, create_graph=False)
            return rhs[idx] - sign * g, eye + sign * jac

        with torch.no_grad():
            return solve(
                fmap,
                rhs,
                method=method,
                tol=self.tol,
                max_iter=self.max_iter,
                memory=self.memory,
                newton_map=newton_map,
                label=f"{type(self).__name__} {label}",
            )

    def _series_by_jvp(self, ev: _NetEvaluator, x: Tensor, need_grad: bool) -> bool:
        """Whether this pass's log-det is a power series whose terms are forward-mode products.

        That is a no-gradient pass or the memory-saving Neumann gradient (a series whose graph is kept needs
        vector-Jacobian products), with a G that offers them and the estimator's ``products`` setting allowing them
        (:func:`~monoflow_core.logdet.resolve_series_products`).
        """
        if resolve_logdet_mode(self.logdet_mode, _event_dim(x), training=need_grad) != "estimator":
            return False
        if need_grad and self._memory_efficient_params(need_grad) is None:
            return False
        return resolve_series_products(self.estimator.products, ev.linearizable) == "jvp"

    def _attach_gradient(
        self,
        ev: _NetEvaluator,
        w_star: Tensor,
        rhs: Tensor,
        sign: float,
        a_mat: Tensor | None,
        linear: bool = False,
    ) -> tuple[Tensor, _Graph | None]:
        """A tensor equal to ``w*`` whose gradient is the exact implicit-function gradient, and the graph of G at
        ``w*`` it keeps (``None`` for the one-step correction), which the log-det may reuse; with ``linear`` that
        graph comes with G's forward-mode product at ``w*`` (:meth:`JacobianNet.linearize`)."""
        n = _event_dim(w_star)
        mode = self.implicit_grad
        if mode == "auto":
            mode = "one_step" if n <= ONE_STEP_MAX_DIM else "backward_solve"
        if mode == "one_step":
            if a_mat is None:
                _, jac = ev.value_and_jacobian(w_star, create_graph=False)
                a_mat = torch.eye(n, dtype=w_star.dtype, device=w_star.device) + sign * jac
            r = w_star + sign * ev.value(w_star) - rhs
            step = solve_small_linear(a_mat.detach(), r.reshape(r.shape[0], -1)).reshape(w_star.shape)
            return w_star - step, None
        return self._backward_solve_hook(ev, w_star, rhs, sign, linear)

    def _backward_solve_hook(
        self, ev: _NetEvaluator, w_star: Tensor, rhs: Tensor, sign: float, linear: bool = False
    ) -> tuple[Tensor, _Graph]:
        """``w = rhs - sign G(w0)`` with ``w0 = w*`` a leaf, and a hook on ``w`` that solves the backward system.

        One graph of G at ``w*`` serves everything: the vector-Jacobian products of the backward fixed-point solve
        ``a = g -+ a J`` (taken with respect to the leaf ``w0``, so they never fire the hook), the parameters'
        gradient ``-+ a^T dG/dtheta`` (autograd continues from the hook's ``a`` through the same graph; what reaches
        the leaf ``w0`` stops there) and, in training with the Neumann estimator, the log-det's gradient.
        """
        with torch.enable_grad():
            w0 = w_star.detach().requires_grad_(True)
            g0, jvp = ev.value_and_linear(w0) if linear else (ev.value(w0), None)
        w = rhs - sign * g0
        method = "anderson" if resolve_method(self.solver, _event_dim(w_star)) == "newton" else self.solver
        method = resolve_method(method, 10**9)

        def hook(grad: Tensor | None) -> Tensor | None:
            if grad is None:  # autograd may pass an undefined gradient (nothing flows into w)
                return None

            def fmap(a: Tensor, idx: Tensor) -> Tensor:
                full = torch.zeros_like(grad)
                full[idx] = a
                (vj,) = torch.autograd.grad(g0, w0, full, retain_graph=True)
                return grad[idx] - sign * vj[idx]

            a, stats, _ = solve(
                fmap,
                grad,
                method=method,
                tol=self.tol,
                max_iter=self.max_iter,
                memory=self.memory,
                label=f"{type(self).__name__} backward solve",
            )
            self.backward_stats = stats
            return a

        if w.requires_grad:
            w.register_hook(hook)
        return w, _Graph(w0, g0, w, jvp)

    def _logdet(
        self, ev: _NetEvaluator, w: Tensor, jac: Tensor | None, need_grad: bool, graph: _Graph | None = None
    ) -> Tensor:
        """Log-det of this block's kind at ``w``; ``jac`` (J_G at w, no graph) is reused when no grad is needed.

        ``graph``: a graph of G at ``w`` that the block keeps for its own gradient; the memory-efficient estimator
        (:func:`~monoflow_core.logdet.neumann_logdet`) takes its products through it instead of building another.
        """
        n = _event_dim(w)
        mode = resolve_logdet_mode(self.logdet_mode, n, training=need_grad)
        self.last_logdet_exact = mode == "exact"
        if mode == "exact":
            if jac is None or need_grad:
                _, jac = ev.value_and_jacobian(w, create_graph=need_grad)
            return exact_logdet(jac, self.kind)

        by_jvp = self._series_by_jvp(ev, w, need_grad)
        if by_jvp and not need_grad:
            # Forward-mode products: G's derivatives at w once, no graph at all.
            with torch.no_grad():
                _, jvp = ev.value_and_linear(w)
            return power_series_logdet(
                None, w.shape, self.kind, self.estimator, training=False, dtype=w.dtype, device=w.device, jvp=jvp
            )
        params = self._memory_efficient_params(need_grad)
        if params is not None and graph is None:
            # The products are taken at a leaf equal to w: the surrogate's gradient with respect to the parameters
            # must not also flow through w's own history (the one-step correction depends on them too); its
            # gradient with respect to the point is handed to w by the estimator.
            with torch.enable_grad():
                leaf = w.detach().requires_grad_(True)
                value, jvp = ev.value_and_linear(leaf) if by_jvp else (ev.value(leaf), None)
                graph = _Graph(leaf, value, w, jvp)
        elif params is None:
            # One evaluation of G with a graph serves every vector-Jacobian product of the series. The products are
            # taken with respect to an alias of w: a gradient with respect to w itself would fire the backward-solve
            # hook registered on w (a full implicit solve per product, and a wrong product).
            with torch.enable_grad():
                wr = _grad_alias(w)
                graph = _Graph(wr, ev.value(wr), wr)
        assert graph is not None  # set above, or the block's own graph
        point, gw = graph.point, graph.value

        def vjp(u: Tensor, create_graph: bool) -> Tensor:
            with torch.enable_grad():
                (out,) = torch.autograd.grad(
                    gw, point, u, create_graph=create_graph, retain_graph=True, allow_unused=True
                )
            return torch.zeros_like(u) if out is None else out

        if params is not None:
            return neumann_logdet(
                vjp, point, params, self.kind, self.estimator, attach_to=graph.attach, jvp=graph.jvp if by_jvp else None
            )
        return power_series_logdet(
            vjp, w.shape, self.kind, self.estimator, training=need_grad, dtype=w.dtype, device=w.device
        )

    def _memory_efficient_params(self, need_grad: bool) -> list[Tensor] | None:
        """G's trainable parameters when the memory-efficient Neumann estimator applies, else ``None``.

        It applies in training with ``neumann_grad`` and a G that is an ``nn.Module``, whose parameters are then
        all the trainable tensors its value depends on (a plain callable may close over others, which only a
        kept graph of the series would reach).
        """
        if not (need_grad and self.estimator.neumann_grad and isinstance(self.net, nn.Module)):
            return None
        return [p for p in self.net.parameters() if p.requires_grad]

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, tol={self.tol:g}, max_iter={self.max_iter}, logdet={self.logdet_mode!r}, "
            f"implicit_grad={self.implicit_grad!r}"
        )


class MonotoneBlock(_ImplicitBlock):
    """Monotone block ``F = ((Id + G)/2)^{-1} - Id`` in the released sqrt(2) form (Ahn et al. 2022).

    Forward: solve ``w + G(w) = sqrt(2) x``, then ``y = sqrt(2) w - x``. Inverse: solve
    ``w - G(w) = sqrt(2) y``, then ``x = sqrt(2) w - y``. ``J_F = (I + J)^{-1}(I - J)`` with ``J = J_G(w)``, so
    ``log|det J_F| = log|det(I - J)| - log|det(I + J)|``. With Lip(G) = L < 1 both solves contract, and in one
    dimension the derivative of F lies in ``[(1-L)/(1+L), (1+L)/(1-L)]`` (Theorem 4).

    Args:
        net: G, any per-sample differentiable map with Lipschitz constant below 1.
        solver: ``"auto"``, ``"newton"``, ``"anderson"`` or ``"picard"``.
        tol: relative solver tolerance, raised to the dtype's floor of 10 machine epsilons; the default (1e-12)
            thus means 1e-12 in float64 and 1.19e-6 in float32.
        max_iter: iteration cap per solve.
        memory: Anderson memory.
        logdet: ``"exact"``, ``"estimator"`` or ``"auto"``.
        estimator: power-series settings for ``"estimator"``.
        implicit_grad: ``"one_step"``, ``"backward_solve"`` or ``"auto"``.
    """

    kind = "monotone"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ev = _NetEvaluator(self.net)
        rhs = SQRT2 * x
        w_star, self.forward_stats, a_mat = self._solve(ev, rhs, 1.0, "forward solve")
        need_grad = self._needs_grad(x)
        jac = None if a_mat is None else a_mat - torch.eye(a_mat.shape[-1], dtype=x.dtype, device=x.device)
        linear = need_grad and self._series_by_jvp(ev, w_star, need_grad)
        w, graph = self._attach_gradient(ev, w_star, rhs, 1.0, a_mat, linear) if need_grad else (w_star, None)
        logdet = self._logdet(ev, w, jac, need_grad, graph)
        return SQRT2 * w - x, logdet

    def inverse(self, y: Tensor) -> Tensor:
        ev = _NetEvaluator(self.net)
        rhs = SQRT2 * y
        w_star, self.inverse_stats, a_mat = self._solve(ev, rhs, -1.0, "inverse solve")
        w = self._attach_gradient(ev, w_star, rhs, -1.0, a_mat)[0] if self._needs_grad(y) else w_star
        return SQRT2 * w - y


class ResidualBlock(_ImplicitBlock):
    """Residual block ``y = x + G(x)`` (i-ResNet, Residual Flow, i-DenseNet); inverse by fixed point.

    ``log|det J| = log|det(I + J_G(x))|``; the forward pass needs no solve.
    """

    kind = "residual"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ev = _NetEvaluator(self.net)
        need_grad = self._needs_grad(x)
        n = _event_dim(x)
        if resolve_logdet_mode(self.logdet_mode, n, training=need_grad) == "exact":
            g, jac = ev.value_and_jacobian(x, create_graph=need_grad)
            self.last_logdet_exact = True
            return x + g, exact_logdet(jac, self.kind)
        if self._memory_efficient_params(need_grad) is None:
            return x + ev.value(x), self._logdet(ev, x, None, need_grad)
        # One graph of G at x serves the output and the log-det's gradient (taken with respect to an alias of x).
        with torch.enable_grad():
            xr = _grad_alias(x)
            g, jvp = ev.value_and_linear(xr) if self._series_by_jvp(ev, x, need_grad) else (ev.value(xr), None)
        return x + g, self._logdet(ev, x, None, need_grad, _Graph(xr, g, xr, jvp))

    def inverse(self, y: Tensor) -> Tensor:
        ev = _NetEvaluator(self.net)
        w_star, self.inverse_stats, a_mat = self._solve(ev, y, 1.0, "inverse solve")
        return self._attach_gradient(ev, w_star, y, 1.0, a_mat)[0] if self._needs_grad(y) else w_star


class InverseResidualBlock(_ImplicitBlock):
    """Inverse-residual (implicit) block ``y = (Id + G)^{-1}(x)``; its inverse is ``x = y + G(y)``.

    ``log|det J| = -log|det(I + J_G(y))|``.
    """

    kind = "inverse_residual"

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ev = _NetEvaluator(self.net)
        w_star, self.forward_stats, a_mat = self._solve(ev, x, 1.0, "forward solve")
        need_grad = self._needs_grad(x)
        jac = None if a_mat is None else a_mat - torch.eye(a_mat.shape[-1], dtype=x.dtype, device=x.device)
        linear = need_grad and self._series_by_jvp(ev, w_star, need_grad)
        w, graph = self._attach_gradient(ev, w_star, x, 1.0, a_mat, linear) if need_grad else (w_star, None)
        return w, self._logdet(ev, w, jac, need_grad, graph)

    def inverse(self, y: Tensor) -> Tensor:
        ev = _NetEvaluator(self.net)
        return y + ev.value(y)


class InitFlag:
    """Reads an ActNorm's boolean ``initialized`` buffer without a host synchronisation in the steady state.

    ``bool(buffer)`` copies the flag to the host, which on CUDA waits for every queued kernel; an ActNorm asks on
    every training pass. The value is cached with the buffer's identity and version counter: every in-place change
    (``fill_``, ``copy_``, ``load_state_dict``) bumps the version and ``Module.to`` replaces the tensor, so a stale
    cache is noticed and read again (once).
    """

    __slots__ = ("tensor", "value", "version")

    def __init__(self) -> None:
        self.tensor: Tensor | None = None
        self.version = -1
        self.value = False

    def read(self, flag: Tensor) -> bool:
        if flag is not self.tensor or flag._version != self.version:
            self.tensor, self.version, self.value = flag, flag._version, bool(flag)
        return self.value

    def wrote(self, flag: Tensor, value: bool) -> None:
        """Record that ``flag`` was just set to ``value`` (so that reading it back needs no synchronisation)."""
        self.tensor, self.version, self.value = flag, flag._version, value


class ActNorm(nn.Module):
    """Activation normalisation ``y = (x + b) * exp(s)`` per feature (Kingma & Dhariwal 2018).

    With ``data_init`` the first forward pass in training mode sets ``b = -mean`` and
    ``s = -0.5 log max(var, 0.2)`` from its batch (docs/algorithm.md section 7), so that the output starts standardised.

    Args:
        dim: number of features (the event dimension).
        data_init: initialise from the first training batch (otherwise start at the identity).
    """

    initialized: Tensor  # a boolean buffer, registered in __init__

    def __init__(self, dim: int, data_init: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(not data_init))
        self._flag = InitFlag()

    @property
    def is_initialized(self) -> bool:
        """Whether the data-dependent initialisation has run (no host synchronisation once known)."""
        return self._flag.read(self.initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent initialisation from a batch ``x`` (B, dim)."""
        flat = x.reshape(x.shape[0], -1)
        self.bias.copy_(-flat.mean(dim=0))
        var = flat.var(dim=0, unbiased=False) if flat.shape[0] > 1 else torch.ones_like(self.bias)
        self.log_scale.copy_(-0.5 * torch.log(torch.clamp(var, min=0.2)))
        self.initialized.fill_(True)
        self._flag.wrote(self.initialized, True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.is_initialized:
            self.initialize(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        return y, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class PositiveScale(nn.Module):
    """Learnable positive scaling ``y = exp(s) * x`` per feature (the "R+" of Ahn et al. 2022, Figure 4)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * torch.exp(self.log_scale), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def block_solver_stats(block: Any) -> dict[str, SolverStats | None]:
    """The latest forward / inverse / backward statistics of a block (``None`` where none ran)."""
    return {
        "forward": getattr(block, "forward_stats", None),
        "inverse": getattr(block, "inverse_stats", None),
        "backward": getattr(block, "backward_stats", None),
    }
