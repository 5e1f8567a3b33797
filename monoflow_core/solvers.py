"""Fixed-point solvers for implicit flow blocks, chosen by name.

Each block of a Monotone Flow (and the inverse of a residual block) needs ``w`` with ``w = f(w)`` for a
contraction ``f``, e.g. ``f(w) = rhs - G(w)`` with Lip(G) = L < 1 (Ahn et al. 2022, arXiv:2210.08176;
docs/algorithm.md section 4). This module provides

* ``"picard"``: plain iteration ``w <- f(w)``; a sample caught in a rounding cycle (its residual stopped shrinking,
  which in exact arithmetic cannot happen) continues with averaged steps ``w <- (w + f(w)) / 2``;
* ``"anderson"``: Anderson acceleration with memory ``m`` and one set of mixing coefficients *per sample*,
  falling back to a plain step for a sample whose residual grew;
* ``"newton"``: Newton's method with the exact Jacobian (cheap in small dimensions, where the same Jacobian
  also gives the exact log-det), safeguarded per sample: a Newton step that does not shrink the residual's
  Euclidean norm by :data:`NEWTON_DECREASE` is replaced by the plain step, which shrinks it by L, so no sample
  can stall or cycle (:func:`_newton`);
* ``"auto"`` is resolved by the caller (see :func:`resolve_method`).

Every sample stops on its own (a per-sample active mask; converged samples are no longer evaluated), the
tolerance is relative (``|w - f(w)|_inf <= tol * (1 + |w0|_inf)`` per sample) and is raised to a floor of
10 machine epsilons of the dtype, so float32 never spins on an unreachable tolerance; the default
(:data:`DEFAULT_TOL`) thereby follows the dtype. Every solve returns :class:`SolverStats`; samples that miss the
tolerance within ``max_iter`` are flagged there and a :class:`SolverWarning` is issued. docs/solvers.md describes
the methods, the safeguards and the default tolerances with their measurements.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_TOL",
    "METHODS",
    "NEWTON_DECREASE",
    "NEWTON_MAX_DIM",
    "SolverStats",
    "SolverWarning",
    "default_tolerance",
    "effective_tolerance",
    "resolve_method",
    "solve",
    "solve_small_linear",
]

#: Names accepted by :func:`solve` (``"auto"`` is resolved first by :func:`resolve_method`).
METHODS = ("auto", "picard", "anderson", "newton")

#: ``"auto"`` uses Newton up to this many dimensions per sample, Anderson above.
NEWTON_MAX_DIM = 8

#: The tolerance is never below this many machine epsilons of the working dtype.
TOL_FLOOR_EPS = 10.0

#: The default relative tolerance. It is the float64 target; through the floor above every dtype gets its own
#: default: ``max(1e-12, 10 eps)``, i.e. 1e-12 in float64 and 1.19e-6 in float32 (docs/solvers.md has the
#: measurements behind both).
DEFAULT_TOL = 1e-12

#: A Newton candidate is accepted only if it shrinks the sample's residual (Euclidean norm) at least by this factor;
#: otherwise the sample takes the plain step, which shrinks it by Lip(f) < 1 (see :func:`_newton`).
NEWTON_DECREASE = 0.9

FixedPointMap = Callable[[Tensor, Tensor], Tensor]
NewtonMap = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


class SolverWarning(RuntimeWarning):
    """Issued when some samples of a solve did not reach the tolerance within ``max_iter`` iterations."""


@dataclass
class SolverStats:
    """What one solve did, per sample.

    Attributes:
        method: the method that ran (``"picard"``, ``"anderson"`` or ``"newton"``).
        iterations: (B,) int64, evaluations of the map each sample needed.
        residual: (B,) last measured relative residual ``|w - f(w)|_inf / (1 + |w0|_inf)``.
        converged: (B,) bool, whether the sample reached ``tol``.
        evaluations: batched calls of the map (each over the still-active samples).
        tol: the tolerance actually used (after the dtype floor).
        max_iter: the iteration cap.
    """

    method: str
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    evaluations: int
    tol: float
    max_iter: int

    @property
    def batch_size(self) -> int:
        return int(self.iterations.shape[0])

    @property
    def n_failed(self) -> int:
        """Samples that did not converge."""
        return int((~self.converged).sum())

    @property
    def all_converged(self) -> bool:
        return self.n_failed == 0

    def summary(self) -> dict[str, float | int | str]:
        """Plain numbers for logs and GUIs (iterations are G-evaluations per sample)."""
        it = self.iterations.double()
        res = self.residual.double()
        return {
            "method": self.method,
            "batch": self.batch_size,
            "iterations_mean": float(it.mean()) if it.numel() else 0.0,
            "iterations_median": float(it.median()) if it.numel() else 0.0,
            "iterations_max": int(self.iterations.max()) if it.numel() else 0,
            "residual_max": float(res.max()) if res.numel() else 0.0,
            "n_failed": self.n_failed,
            "evaluations": self.evaluations,
            "tol": self.tol,
        }


def effective_tolerance(tol: float, dtype: torch.dtype) -> float:
    """The relative tolerance used for ``dtype``: ``max(tol, 10 * eps(dtype))``."""
    if not tol > 0:
        raise ValueError(f"tol: must be positive, got {tol}")
    return max(float(tol), TOL_FLOOR_EPS * torch.finfo(dtype).eps)


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance a solve in ``dtype`` uses with default settings (1e-12 in float64, 1.19e-6 in float32)."""
    return effective_tolerance(DEFAULT_TOL, dtype)


def resolve_method(method: str, dim: int) -> str:
    """Resolve ``"auto"``: Newton for ``dim <= NEWTON_MAX_DIM``, Anderson otherwise."""
    key = method.lower()
    if key not in METHODS:
        raise ValueError(f"solver: unknown method {method!r}; choose one of {list(METHODS)}")
    if key == "auto":
        return "newton" if dim <= NEWTON_MAX_DIM else "anderson"
    return key


def solve_small_linear(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` per sample for ``A`` (B, n, n), ``b`` (B, n), closed form for n <= 2."""
    n = A.shape[-1]
    if n == 1:
        return b / A[:, 0]
    if n == 2:
        a, c = A[:, 0, 0], A[:, 0, 1]
        d, e = A[:, 1, 0], A[:, 1, 1]
        det = a * e - c * d
        x0 = (e * b[:, 0] - c * b[:, 1]) / det
        x1 = (a * b[:, 1] - d * b[:, 0]) / det
        return torch.stack([x0, x1], dim=1)
    return torch.linalg.solve(A, b.unsqueeze(-1)).squeeze(-1)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _inf_norm(x: Tensor) -> Tensor:
    return _flat(x).abs().amax(dim=1)


class _Run:
    """Bookkeeping shared by the methods: per-sample results and the active set."""

    def __init__(self, x0: Tensor, tol: float, max_iter: int, method: str) -> None:
        b = x0.shape[0]
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.w = x0.clone()
        self.scale = 1.0 + _inf_norm(x0)
        self.iterations = torch.zeros(b, dtype=torch.long, device=x0.device)
        self.residual = torch.full((b,), float("inf"), dtype=x0.dtype, device=x0.device)
        self.converged = torch.zeros(b, dtype=torch.bool, device=x0.device)
        self.evaluations = 0

    def measure(self, idx: Tensor, r: Tensor, it: int) -> Tensor:
        """Record residuals of the active samples; return their 'done' mask (converged or out of budget)."""
        res = _inf_norm(r) / self.scale[idx]
        self.iterations[idx] = it
        self.residual[idx] = res
        ok = res <= self.tol
        # A NaN residual never counts as converged.
        self.converged[idx] = ok
        return ok

    def stats(self) -> SolverStats:
        return SolverStats(
            method=self.method,
            iterations=self.iterations,
            residual=self.residual,
            converged=self.converged,
            evaluations=self.evaluations,
            tol=self.tol,
            max_iter=self.max_iter,
        )


def _merit(r: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a residual: the norm in which a plain step provably shrinks it.

    G's Lipschitz bound (spectral normalisation) holds in the Euclidean norm, so for ``f`` with Lip(f) = L < 1
    ``|f(w) - f(f(w))|_2 <= L |w - f(w)|_2``. The max-norm used for the tolerance has no such guarantee: a plain step
    may make it grow by up to ``sqrt(n) L``, which is why it must not decide which step to trust.
    """
    return torch.linalg.vector_norm(_flat(r), dim=1)


def _picard(f: FixedPointMap, run: _Run) -> None:
    """Plain iteration ``w <- f(w)``, with averaged steps for samples caught in a rounding cycle.

    In exact arithmetic every plain step shrinks ``|w - f(w)|_2`` by at least Lip(f) < 1 (:func:`_merit`). A sample
    for which it did not has reached the rounding floor: where f's derivative is close to -1 the last bits of ``w``
    settle into a 2-cycle whose residual, about ``ulp / (1 - L)``, can stay above the tolerance for ever (measured:
    up to 47 float32 epsilons at L = 0.99, against the 10-epsilon floor of the tolerance). From then on that sample
    takes the averaged step ``w + (f(w) - w) / 2`` (Krasnosel'skii-Mann), a contraction too (Lipschitz ``(1 + L) / 2``)
    whose Jacobian ``(I + J_f) / 2`` has no eigenvalue near -1, so the cycle cannot persist.
    """
    idx = torch.arange(run.w.shape[0], device=run.w.device)
    wa = run.w
    shape = (-1, *([1] * (wa.dim() - 1)))
    prev_merit = torch.full((wa.shape[0],), float("inf"), dtype=wa.dtype, device=wa.device)
    averaged = torch.zeros(wa.shape[0], dtype=torch.bool, device=wa.device)
    for it in range(1, run.max_iter + 1):
        fw = f(wa, idx)
        run.evaluations += 1
        r = fw - wa
        done = run.measure(idx, r, it)
        if it == run.max_iter:
            done = torch.ones_like(done)
        if bool(done.all()):
            run.w[idx] = fw
            return
        merit = _merit(r)
        if bool(done.any()):
            run.w[idx[done]] = fw[done]
            keep = ~done
            idx, wa, fw, r, merit = idx[keep], wa[keep], fw[keep], r[keep], merit[keep]
            prev_merit, averaged = prev_merit[keep], averaged[keep]
        # ``not <`` also catches a NaN residual (which then never converges anyway).
        averaged = averaged | ~(merit < prev_merit)
        prev_merit = merit
        wa = torch.where(averaged.reshape(shape), wa + 0.5 * r, fw)


def _anderson(f: FixedPointMap, run: _Run, memory: int) -> None:
    b = run.w.shape[0]
    idx = torch.arange(b, device=run.w.device)
    wa = run.w
    n = _flat(wa).shape[1]
    # Anderson(m) mixes the last m+1 iterates; in n dimensions more than n+1 of them are linearly dependent.
    slots = max(2, min(memory, n) + 1)
    xs = torch.zeros(b, slots, n, dtype=wa.dtype, device=wa.device)
    fs = torch.zeros_like(xs)
    prev_res = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    reg = 100.0 * torch.finfo(wa.dtype).eps
    count = 0
    for it in range(1, run.max_iter + 1):
        fw = f(wa, idx)
        run.evaluations += 1
        done = run.measure(idx, fw - wa, it)
        if it == run.max_iter:
            done = torch.ones_like(done)
        if bool(done.all()):
            run.w[idx] = fw
            return
        res = run.residual[idx]
        if bool(done.any()):
            run.w[idx[done]] = fw[done]
            keep = ~done
            idx, wa, fw, xs, fs = idx[keep], wa[keep], fw[keep], xs[keep], fs[keep]
            prev_res, res = prev_res[keep], res[keep]
        # Push the newest pair into slot 0 (older pairs shift back).
        xs = torch.roll(xs, 1, dims=1)
        fs = torch.roll(fs, 1, dims=1)
        xs[:, 0] = _flat(wa)
        fs[:, 0] = _flat(fw)
        count = min(count + 1, slots)
        if count == 1:
            wa = fw
        else:
            gk = fs[:, :count] - xs[:, :count]
            h = torch.bmm(gk, gk.transpose(1, 2))
            diag_mean = h.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(wa.dtype).tiny)
            eye = torch.eye(count, dtype=wa.dtype, device=wa.device)
            h = h + (reg * diag_mean)[:, None, None] * eye
            alpha = torch.linalg.solve(h, torch.ones_like(h[:, :, 0]))
            alpha = alpha / alpha.sum(dim=1, keepdim=True)
            mixed = torch.bmm(alpha.unsqueeze(1), fs[:, :count]).squeeze(1).reshape(fw.shape)
            # Safeguard: a sample whose residual grew (or whose mixing broke down) takes a plain step.
            bad = (res > prev_res) | ~torch.isfinite(_flat(mixed)).all(dim=1)
            wa = torch.where(bad.reshape(-1, *([1] * (fw.dim() - 1))), fw, mixed)
        prev_res = torch.minimum(prev_res, res)


def _newton(fj: NewtonMap, run: _Run, decrease: float) -> Tensor:
    """Newton's method, safeguarded per sample by the plain step (see :data:`NEWTON_DECREASE`).

    Every active sample has a *base*: the last point it accepted, with ``f`` and ``A`` there. The point evaluated
    in an iteration is either a Newton candidate from the base (a *trial*) or the plain step ``f(base)``. A trial
    that fails the residual-decrease test ``|r(cand)|_2 <= decrease * |r(base)|_2`` (or is not finite) is rejected
    and the sample evaluates the plain step from its base next, which is accepted without a test: it shrinks
    ``|r|_2`` by at least Lip(f) < 1. So the accepted merits decrease strictly (at least by ``max(decrease, L)``
    every two evaluations), no sample can stall on one point or cycle between points, and Newton's quadratic
    convergence is kept wherever its steps work.
    """
    b = run.w.shape[0]
    idx = torch.arange(b, device=run.w.device)
    wa = run.w
    n = _flat(wa).shape[1]
    shape = (-1, *([1] * (wa.dim() - 1)))
    a_out = torch.empty(b, n, n, dtype=wa.dtype, device=wa.device)
    # The base (last accepted point) of each active sample: point, f there, A there, merit, relative residual.
    base_w, base_f = wa, wa
    base_a = torch.empty(b, n, n, dtype=wa.dtype, device=wa.device)
    base_m = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    base_res = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    trial = torch.zeros(b, dtype=torch.bool, device=wa.device)  # the point being evaluated is a Newton candidate
    for it in range(1, run.max_iter + 1):
        fw, jac = fj(wa, idx)
        run.evaluations += 1
        r = wa - fw
        done = run.measure(idx, r, it)
        merit = _merit(r)
        # ``not <=`` also rejects a NaN merit.
        reject = trial & ~(merit <= decrease * base_m)
        if it == run.max_iter:
            # Out of budget: an unconverged sample whose last candidate was rejected returns its base, the best
            # point it had (its residual and A then describe the base; a converged candidate is kept as it is).
            swap = reject & ~done
            done = torch.ones_like(done)
            if bool(swap.any()):
                wa = torch.where(swap.reshape(shape), base_w, wa)
                jac = torch.where(swap[:, None, None], base_a, jac)
                run.residual[idx[swap]] = base_res[swap]
        if bool(done.any()):
            run.w[idx[done]] = wa[done]
            a_out[idx[done]] = jac[done]
            if bool(done.all()):
                return a_out
            keep = ~done
            idx, wa, fw, jac, r, merit, reject = (
                idx[keep], wa[keep], fw[keep], jac[keep], r[keep], merit[keep], reject[keep]
            )
            base_w, base_f, base_a, base_m, base_res = (
                base_w[keep], base_f[keep], base_a[keep], base_m[keep], base_res[keep]
            )
        accept = ~reject
        acc = accept.reshape(shape)
        base_w = torch.where(acc, wa, base_w)
        base_f = torch.where(acc, fw, base_f)
        base_a = torch.where(accept[:, None, None], jac, base_a)
        base_m = torch.where(accept, merit, base_m)
        base_res = torch.where(accept, run.residual[idx], base_res)
        # Newton from the (new) base; for rejected samples it is discarded below, their jac is not the base's.
        newton = wa - solve_small_linear(jac, _flat(r)).reshape(wa.shape)
        # A singular or overflowing linear solve is no candidate at all: take the plain step at once.
        broken = accept & ~torch.isfinite(_flat(newton)).all(dim=1)
        plain = reject | broken
        wa = torch.where(plain.reshape(shape), base_f, newton)
        trial = ~plain
    return a_out  # pragma: no cover - the loop always returns at max_iter


def solve(
    f: FixedPointMap,
    x0: Tensor,
    *,
    method: str = "anderson",
    tol: float = DEFAULT_TOL,
    max_iter: int = 1000,
    memory: int = 5,
    newton_map: NewtonMap | None = None,
    warn: bool = True,
    label: str = "fixed-point solve",
) -> tuple[Tensor, SolverStats, Tensor | None]:
    """Solve ``w = f(w)`` for every sample of a batch, starting from ``x0``.

    Args:
        f: the fixed-point map. Called as ``f(w_active, idx)`` where ``idx`` (int64) lists which samples of the
            batch the rows of ``w_active`` are, so that converged samples are not evaluated again.
        x0: (B, ...) starting point; also sets the relative scale of the tolerance.
        method: ``"picard"``, ``"anderson"`` or ``"newton"`` (resolve ``"auto"`` with :func:`resolve_method`).
        tol: relative tolerance, raised to ``10 * eps`` of the dtype; the default is :data:`DEFAULT_TOL`, so that
            float64 solves to 1e-12 and float32 to its floor, 1.19e-6 (:func:`default_tolerance`).
        max_iter: iteration cap (>= 1); samples that miss ``tol`` by then are flagged, never looped on.
        memory: Anderson memory ``m`` (mixing of the last ``m + 1`` iterates).
        newton_map: for Newton, ``newton_map(w, idx) -> (f(w), A)`` with ``A = d(w - f(w))/dw`` as (b, n, n).
        warn: issue a :class:`SolverWarning` if some samples did not converge.
        label: what is being solved, for the warning.

    Returns:
        ``(w, stats, A)``: the solution (B, ...), its statistics, and for Newton the matrix ``A`` at the
        returned points (``None`` for the other methods).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    if memory < 1:
        raise ValueError(f"memory: must be >= 1, got {memory}")
    key = method.lower()
    if key not in METHODS or key == "auto":
        raise ValueError(f"solver: method must be one of ['picard', 'anderson', 'newton'], got {method!r}")
    run = _Run(x0.detach(), effective_tolerance(tol, x0.dtype), max_iter, key)
    a_out: Tensor | None = None
    if x0.shape[0] > 0:
        if key == "picard":
            _picard(f, run)
        elif key == "anderson":
            _anderson(f, run, memory)
        else:
            if newton_map is None:
                raise ValueError("solver: 'newton' needs a newton_map that returns the Jacobian")
            a_out = _newton(newton_map, run, NEWTON_DECREASE)
    stats = run.stats()
    if warn and stats.n_failed:
        worst = float(stats.residual.max())
        warnings.warn(
            f"{label}: {stats.n_failed} of {stats.batch_size} samples did not converge within {max_iter} "
            f"{key} iterations (worst relative residual {worst:.3g}, tolerance {stats.tol:.3g})",
            SolverWarning,
            stacklevel=3,
        )
    return run.w, stats, a_out
