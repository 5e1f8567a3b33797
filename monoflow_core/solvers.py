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

Every sample stops on its own, the tolerance is relative (``|w - f(w)|_inf <= tol * (1 + |w0|_inf)`` per sample)
and is raised to the floor of the arithmetic that evaluates the map (:func:`effective_tolerance`: 10 machine
epsilons of the dtype in IEEE arithmetic, more where CUDA runs float32 products in TF32;
:mod:`monoflow_core.precision`), so no solve aims below what its arithmetic can reach; the default
(:data:`DEFAULT_TOL`) thereby follows the dtype. A sample whose residual stops falling stops too (*stall exit*:
:data:`STALL_WINDOW`, :data:`STALL_FACTOR`), so no solve spins to ``max_iter`` on rounding noise. Every solve
returns :class:`SolverStats`; samples that miss the tolerance (stalled, or out of iterations) are flagged there and
a :class:`SolverWarning` is issued.

On the CPU finished samples leave the batch (compaction); on CUDA every solve keeps a fixed shape and masks finished
samples, with one host synchronisation per convergence check (:class:`_Run`). docs/solvers.md describes the methods,
the safeguards, the stall exit and the default tolerances with their measurements; docs/precision.md the floors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import TOL_FLOOR_EPS, arithmetic_floor

__all__ = [
    "CHECK_EVERY",
    "DEFAULT_TOL",
    "METHODS",
    "NEWTON_DECREASE",
    "NEWTON_MAX_DIM",
    "STALL_FACTOR",
    "STALL_WINDOW",
    "TOL_FLOOR_EPS",
    "SolverStats",
    "SolverWarning",
    "default_fixed_shape",
    "default_tolerance",
    "effective_tolerance",
    "resolve_method",
    "solve",
    "solve_small_linear",
    "warn_unconverged",
]

#: Names accepted by :func:`solve` (``"auto"`` is resolved first by :func:`resolve_method`).
METHODS = ("auto", "picard", "anderson", "newton")

#: ``"auto"`` uses Newton up to this many dimensions per sample, Anderson above.
NEWTON_MAX_DIM = 8

#: The default relative tolerance. It is the float64 target; through the floor above every dtype gets its own
#: default: ``max(1e-12, 10 eps)``, i.e. 1e-12 in float64 and 1.19e-6 in float32 (docs/solvers.md has the
#: measurements behind both).
DEFAULT_TOL = 1e-12

#: A Newton candidate is accepted only if it shrinks the sample's residual (Euclidean norm) at least by this factor;
#: otherwise the sample takes the plain step, which shrinks it by Lip(f) < 1 (see :func:`_newton`).
NEWTON_DECREASE = 0.9

FixedPointMap = Callable[[Tensor, Tensor], Tensor]
NewtonMap = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


#: A sample *stalls* when its residual (Euclidean norm, :func:`_merit`) has not fallen below ``STALL_FACTOR`` times
#: its reference (its value at the last such decrease) for ``STALL_WINDOW`` consecutive iterations; it then stops
#: and counts as not converged. Progress at any rate faster than ``STALL_FACTOR ** (1 / STALL_WINDOW)`` = 0.9979 per
#: iteration is never taken for a stall: that covers plain iteration up to L = 0.997, and every solve measured on
#: the project's models needed far fewer iterations per 10% (docs/solvers.md, "Stall exit").
STALL_WINDOW = 50
STALL_FACTOR = 0.9

#: Fixed-shape solves (CUDA) read "is any sample still active?" on the host every this many iterations. One check
#: costs a synchronisation (tens of microseconds); checking every k iterations instead overshoots the last
#: convergence by (k - 1) / 2 iterations on average, and one iteration of an image block's G costs milliseconds.
#: So every iteration, with exactly one synchronisation (docs/solvers.md, "Host synchronisations").
CHECK_EVERY = 1


class SolverWarning(RuntimeWarning):
    """Issued when some samples of a solve did not reach the tolerance: they stalled or ran out of iterations."""


@dataclass
class SolverStats:
    """What one solve did, per sample.

    Attributes:
        method: the method that ran (``"picard"``, ``"anderson"`` or ``"newton"``).
        iterations: (B,) int64, evaluations of the map each sample needed.
        residual: (B,) last measured relative residual ``|w - f(w)|_inf / (1 + |w0|_inf)``.
        converged: (B,) bool, whether the sample reached ``tol``.
        evaluations: batched calls of the map (over the still-active samples, or over the whole batch in a
            fixed-shape solve).
        tol: the tolerance actually used (after the arithmetic's floor).
        max_iter: the iteration cap.
        stalled: (B,) bool, samples stopped by the stall exit (not converged); ``None`` where the solver that
            produced the statistics has no stall exit.
    """

    method: str
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    evaluations: int
    tol: float
    max_iter: int
    stalled: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.iterations.shape[0])

    @property
    def n_failed(self) -> int:
        """Samples that did not converge."""
        return int((~self.converged).sum())

    @property
    def n_stalled(self) -> int:
        """Samples stopped by the stall exit."""
        return 0 if self.stalled is None else int(self.stalled.sum())

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
            "n_stalled": self.n_stalled,
            "evaluations": self.evaluations,
            "tol": self.tol,
        }


def effective_tolerance(tol: float, dtype: torch.dtype, device: torch.device | str | None = None) -> float:
    """The relative tolerance a solve in ``dtype`` on ``device`` uses: ``tol`` raised to the arithmetic's floor.

    The floor is :func:`monoflow_core.precision.arithmetic_floor`: 10 machine epsilons of ``dtype`` in IEEE
    arithmetic (the CPU, or CUDA with TF32 off), the TF32 floor for float32 on CUDA while TF32 is on.
    """
    if not tol > 0:
        raise ValueError(f"tol: must be positive, got {tol}")
    return max(float(tol), arithmetic_floor(dtype, device))


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


def _linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype small linear systems are solved in: at least float32 (LAPACK and cuSOLVER have no bfloat16 or
    float16 solvers, and the systems are tiny)."""
    return torch.promote_types(dtype, torch.float32)


def solve_small_linear(A: Tensor, b: Tensor) -> Tensor:
    """Solve ``A x = b`` per sample for ``A`` (B, n, n), ``b`` (B, n), closed form for n <= 2.

    Half-precision systems (bfloat16, float16) are solved in float32 and the solution rounded back.
    """
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
    # No host check of the factorisation: a singular A gives non-finite entries, which the callers test for.
    work = _linalg_dtype(A.dtype)
    return torch.linalg.solve_ex(A.to(work), b.to(work).unsqueeze(-1))[0].squeeze(-1).to(A.dtype)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _inf_norm(x: Tensor) -> Tensor:
    return _flat(x).abs().amax(dim=1)


def _merit(r: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a residual: the norm in which a plain step provably shrinks it.

    G's Lipschitz bound (spectral normalisation) holds in the Euclidean norm, so for ``f`` with Lip(f) = L < 1
    ``|f(w) - f(f(w))|_2 <= L |w - f(w)|_2``. The max-norm used for the tolerance has no such guarantee: a plain step
    may make it grow by up to ``sqrt(n) L``, which is why it must not decide which step to trust, nor whether a sample
    still makes progress (:data:`STALL_WINDOW`).
    """
    return torch.linalg.vector_norm(_flat(r), dim=1)


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """``mask`` (b,) shaped to broadcast over the rows of ``like`` (b, ...)."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


class _Run:
    """Bookkeeping shared by the methods: per-sample results, the stall test and the set of active samples.

    Two ways to drop finished samples, with the same per-sample results:

    * *compaction* (``fixed_shape=False``, the CPU's default): finished samples leave the batch, so the map is
      evaluated on the active rows only. Every iteration reads the done mask on the host (``bool(done.all())``,
      ``bool(done.any())``, boolean indexing).
    * *fixed shape* (``fixed_shape=True``, the default on CUDA): every iteration evaluates all rows, and finished
      samples are frozen by masks (``torch.where``). The only host synchronisation is one read of "any sample still
      active?" every ``check_every`` iterations.

    Callers call :meth:`measure` once per iteration, then :meth:`retire`, which returns the per-sample state to
    continue with (compacted or not), or ``None`` when every sample has finished.
    """

    def __init__(self, x0: Tensor, tol: float, max_iter: int, method: str, fixed_shape: bool, check_every: int) -> None:
        b = x0.shape[0]
        dev = x0.device
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.fixed_shape = fixed_shape
        self.check_every = check_every
        self.w = x0.clone()
        self.jac: Tensor | None = None  # Newton's A at the returned points
        self.scale = 1.0 + _inf_norm(x0)
        self.idx = torch.arange(b, device=dev)
        self.active = torch.ones(b, dtype=torch.bool, device=dev)  # fixed shape only
        self.iterations = torch.zeros(b, dtype=torch.long, device=dev)
        self.residual = torch.full((b,), float("inf"), dtype=x0.dtype, device=dev)
        self.converged = torch.zeros(b, dtype=torch.bool, device=dev)
        self.stalled = torch.zeros(b, dtype=torch.bool, device=dev)
        # The stall test: the merit at the last decrease by STALL_FACTOR, and the iterations since.
        self.reference = torch.full((b,), float("inf"), dtype=x0.dtype, device=dev)
        self.since = torch.zeros(b, dtype=torch.long, device=dev)
        self.evaluations = 0

    def store(self, name: str, values: Tensor) -> None:
        """Write per-sample ``values`` of the rows in play into the full-batch record ``name``."""
        if self.fixed_shape:
            setattr(self, name, torch.where(_rows(self.active, values), values, getattr(self, name)))
        else:
            getattr(self, name)[self.idx] = values

    def take(self, name: str) -> Tensor:
        full: Tensor = getattr(self, name)
        return full if self.fixed_shape else full[self.idx]

    def measure(self, r: Tensor, it: int, merit: Tensor | None = None) -> Tensor:
        """Record the residuals ``r`` of the rows in play at iteration ``it``; return their 'done' mask.

        A row is done when it converged (``|r|_inf / scale <= tol``; a NaN never converges) or stalled: its merit
        (``|r|_2``, or ``merit`` if given) has not fallen below :data:`STALL_FACTOR` times its reference for
        :data:`STALL_WINDOW` iterations.
        """
        res = _inf_norm(r) / self.take("scale")
        ok = res <= self.tol
        merit = _merit(r) if merit is None else merit
        reference = self.take("reference")
        better = merit < STALL_FACTOR * reference  # False for a NaN merit
        since = torch.where(better, torch.zeros_like(self.take("since")), self.take("since") + 1)
        stalled = (since >= STALL_WINDOW) & ~ok
        self.store("iterations", torch.full_like(res, it, dtype=torch.long))
        self.store("residual", res)
        self.store("converged", ok)
        self.store("stalled", stalled)
        self.store("reference", torch.where(better, merit, reference))
        self.store("since", since)
        return ok | stalled

    def residual_now(self) -> Tensor:
        """The relative residuals just measured, for the rows in play."""
        return self.take("residual")

    def retire(
        self, done: Tensor, it: int, w: Tensor, state: tuple[Tensor, ...], jac: Tensor | None = None
    ) -> tuple[Tensor, ...] | None:
        """Store the results (``w``, and Newton's ``jac``) of the rows that are ``done``; continue with ``state``.

        At ``it == max_iter`` every row is done. Returns ``state`` for the rows still in play (compacted when
        compacting), or ``None`` when every sample has finished.
        """
        last = it == self.max_iter
        if self.fixed_shape:
            newly = self.active if last else self.active & done
            self.w = torch.where(_rows(newly, w), w, self.w)
            if jac is not None:
                assert self.jac is not None
                self.jac = torch.where(_rows(newly, jac), jac, self.jac)
            self.active = self.active & ~newly
            if last or (it % self.check_every == 0 and not bool(self.active.any())):
                return None
            return state
        if last:
            done = torch.ones_like(done)
        if bool(done.any()):
            rows = self.idx[done]
            self.w[rows] = w[done]
            if jac is not None:
                assert self.jac is not None
                self.jac[rows] = jac[done]
            if bool(done.all()):
                return None
            keep = ~done
            self.idx = self.idx[keep]
            state = tuple(s[keep] for s in state)
        return state

    def stats(self) -> SolverStats:
        return SolverStats(
            method=self.method,
            iterations=self.iterations,
            residual=self.residual,
            converged=self.converged,
            evaluations=self.evaluations,
            tol=self.tol,
            max_iter=self.max_iter,
            stalled=self.stalled & ~self.converged,
        )


def _picard(f: FixedPointMap, run: _Run) -> None:
    """Plain iteration ``w <- f(w)``, with averaged steps for samples caught in a rounding cycle.

    In exact arithmetic every plain step shrinks ``|w - f(w)|_2`` by at least Lip(f) < 1 (:func:`_merit`). A sample
    for which it did not has reached the rounding floor: where f's derivative is close to -1 the last bits of ``w``
    settle into a 2-cycle whose residual, about ``ulp / (1 - L)``, can stay above the tolerance for ever (measured:
    up to 47 float32 epsilons at L = 0.99, against the 10-epsilon floor of the tolerance). From then on that sample
    takes the averaged step ``w + (f(w) - w) / 2`` (Krasnosel'skii-Mann), a contraction too (Lipschitz ``(1 + L) / 2``)
    whose Jacobian ``(I + J_f) / 2`` has no eigenvalue near -1, so the cycle cannot persist.
    """
    wa = run.w
    b = wa.shape[0]
    prev_merit = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    averaged = torch.zeros(b, dtype=torch.bool, device=wa.device)
    for it in range(1, run.max_iter + 1):
        fw = f(wa, run.idx)
        run.evaluations += 1
        r = fw - wa
        merit = _merit(r)
        done = run.measure(r, it, merit)
        state = run.retire(done, it, fw, (wa, fw, r, merit, prev_merit, averaged))
        if state is None:
            return
        wa, fw, r, merit, prev_merit, averaged = state
        # ``not <`` also catches a NaN residual (which then never converges anyway).
        averaged = averaged | ~(merit < prev_merit)
        prev_merit = merit
        wa = torch.where(_rows(averaged, wa), wa + 0.5 * r, fw)


def _anderson(f: FixedPointMap, run: _Run, memory: int) -> None:
    wa = run.w
    b = wa.shape[0]
    n = _flat(wa).shape[1]
    # Anderson(m) mixes the last m+1 iterates; in n dimensions more than n+1 of them are linearly dependent.
    slots = max(2, min(memory, n) + 1)
    xs = torch.zeros(b, slots, n, dtype=wa.dtype, device=wa.device)
    fs = torch.zeros_like(xs)
    prev_res = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    # The mixing coefficients come from a tiny (count x count) system per sample, solved in at least float32.
    mix = _linalg_dtype(wa.dtype)
    reg = 100.0 * torch.finfo(mix).eps
    count = 0
    for it in range(1, run.max_iter + 1):
        fw = f(wa, run.idx)
        run.evaluations += 1
        done = run.measure(fw - wa, it)
        res = run.residual_now()
        state = run.retire(done, it, fw, (wa, fw, xs, fs, prev_res, res))
        if state is None:
            return
        wa, fw, xs, fs, prev_res, res = state
        # Push the newest pair into slot 0 (older pairs shift back).
        xs = torch.roll(xs, 1, dims=1)
        fs = torch.roll(fs, 1, dims=1)
        xs[:, 0] = _flat(wa)
        fs[:, 0] = _flat(fw)
        count = min(count + 1, slots)
        if count == 1:
            wa = fw
        else:
            gk = (fs[:, :count] - xs[:, :count]).to(mix)
            h = torch.bmm(gk, gk.transpose(1, 2))
            diag_mean = h.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(mix).tiny)
            eye = torch.eye(count, dtype=mix, device=wa.device)
            h = h + (reg * diag_mean)[:, None, None] * eye
            # solve_ex: no host check of the factorisation; a singular system shows in ``info`` (and as non-finite
            # coefficients), and that sample takes the plain step below.
            alpha, info = torch.linalg.solve_ex(h, torch.ones_like(h[:, :, 0]))
            alpha = alpha / alpha.sum(dim=1, keepdim=True)
            mixed = torch.bmm(alpha.unsqueeze(1).to(wa.dtype), fs[:, :count]).squeeze(1).reshape(fw.shape)
            # Safeguard: a sample whose residual grew (or whose mixing broke down) takes a plain step.
            bad = (res > prev_res) | (info != 0) | ~torch.isfinite(_flat(mixed)).all(dim=1)
            wa = torch.where(_rows(bad, fw), fw, mixed)
        prev_res = torch.minimum(prev_res, res)


def _newton(fj: NewtonMap, run: _Run, decrease: float) -> None:
    """Newton's method, safeguarded per sample by the plain step (see :data:`NEWTON_DECREASE`).

    Every active sample has a *base*: the last point it accepted, with ``f`` and ``A`` there. The point evaluated
    in an iteration is either a Newton candidate from the base (a *trial*) or the plain step ``f(base)``. A trial
    that fails the residual-decrease test ``|r(cand)|_2 <= decrease * |r(base)|_2`` (or is not finite) is rejected
    and the sample evaluates the plain step from its base next, which is accepted without a test: it shrinks
    ``|r|_2`` by at least Lip(f) < 1. So the accepted merits decrease strictly (at least by ``max(decrease, L)``
    every two evaluations), no sample can stall on one point or cycle between points, and Newton's quadratic
    convergence is kept wherever its steps work. The stall test (:data:`STALL_WINDOW`) only stops a sample whose
    arithmetic no longer resolves these decreases.
    """
    wa = run.w
    b = wa.shape[0]
    n = _flat(wa).shape[1]
    shape = (-1, *([1] * (wa.dim() - 1)))
    run.jac = torch.zeros(b, n, n, dtype=wa.dtype, device=wa.device)
    # The base (last accepted point) of each active sample: point, f there, A there, merit, relative residual.
    base_w, base_f = wa, wa
    base_a = torch.zeros(b, n, n, dtype=wa.dtype, device=wa.device)
    base_m = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    base_res = torch.full((b,), float("inf"), dtype=wa.dtype, device=wa.device)
    trial = torch.zeros(b, dtype=torch.bool, device=wa.device)  # the point being evaluated is a Newton candidate
    for it in range(1, run.max_iter + 1):
        fw, jac = fj(wa, run.idx)
        run.evaluations += 1
        r = wa - fw
        merit = _merit(r)
        # ``not <=`` also rejects a NaN merit.
        reject = trial & ~(merit <= decrease * base_m)
        # The stall test watches the accepted points' merits (a rejected trial's merit is no progress).
        done = run.measure(r, it, torch.where(reject, base_m, merit))
        # A sample that stops (out of budget, or stalled) after a rejected candidate returns its base, the best
        # point it had (its residual and A then describe the base; a converged candidate is kept as it is).
        ok = run.take("converged")
        stopping = done | torch.full_like(done, it == run.max_iter)
        swap = reject & stopping & ~ok
        wa = torch.where(swap.reshape(shape), base_w, wa)
        jac = torch.where(swap[:, None, None], base_a, jac)
        run.store("residual", torch.where(swap, base_res, run.residual_now()))
        state = run.retire(
            done, it, wa, (wa, fw, jac, r, merit, reject, base_w, base_f, base_a, base_m, base_res), jac=jac
        )
        if state is None:
            return
        wa, fw, jac, r, merit, reject, base_w, base_f, base_a, base_m, base_res = state
        accept = ~reject
        acc = accept.reshape(shape)
        base_w = torch.where(acc, wa, base_w)
        base_f = torch.where(acc, fw, base_f)
        base_a = torch.where(accept[:, None, None], jac, base_a)
        base_m = torch.where(accept, merit, base_m)
        base_res = torch.where(accept, run.residual_now(), base_res)
        # Newton from the (new) base; for rejected samples it is discarded below, their jac is not the base's.
        newton = wa - solve_small_linear(jac, _flat(r)).reshape(wa.shape)
        # A singular or overflowing linear solve is no candidate at all: take the plain step at once.
        broken = accept & ~torch.isfinite(_flat(newton)).all(dim=1)
        plain = reject | broken
        wa = torch.where(plain.reshape(shape), base_f, newton)
        trial = ~plain


def default_fixed_shape(device: torch.device) -> bool:
    """Whether solves on ``device`` keep a fixed shape by default: everywhere but on the CPU.

    On the CPU a host read costs nothing and compaction saves the evaluations of finished samples (docs/solvers.md,
    "Host synchronisations", has the measurement); on a GPU each read stalls the queue of kernels.
    """
    return device.type != "cpu"


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
    fixed_shape: bool | None = None,
    check_every: int = CHECK_EVERY,
) -> tuple[Tensor, SolverStats, Tensor | None]:
    """Solve ``w = f(w)`` for every sample of a batch, starting from ``x0``.

    Args:
        f: the fixed-point map. Called as ``f(w_rows, idx)`` where ``idx`` (int64) lists which samples of the
            batch the rows of ``w_rows`` are (with compaction, converged samples are not evaluated again).
        x0: (B, ...) starting point; also sets the relative scale of the tolerance.
        method: ``"picard"``, ``"anderson"`` or ``"newton"`` (resolve ``"auto"`` with :func:`resolve_method`).
        tol: relative tolerance, raised to the floor of the arithmetic (:func:`effective_tolerance`); the default is
            :data:`DEFAULT_TOL`, so that float64 solves to 1e-12 and float32 to its floor, 1.19e-6
            (:func:`default_tolerance`).
        max_iter: iteration cap (>= 1); samples that miss ``tol`` by then are flagged, never looped on.
        memory: Anderson memory ``m`` (mixing of the last ``m + 1`` iterates).
        newton_map: for Newton, ``newton_map(w, idx) -> (f(w), A)`` with ``A = d(w - f(w))/dw`` as (b, n, n).
        warn: issue a :class:`SolverWarning` if some samples did not converge.
        label: what is being solved, for the warning.
        fixed_shape: evaluate every row in every iteration and mask finished samples (one host synchronisation per
            check) instead of compacting the batch; ``None``: on every device but the CPU (see :class:`_Run`).
        check_every: fixed-shape solves look for the end every this many iterations (>= 1).

    Returns:
        ``(w, stats, A)``: the solution (B, ...), its statistics, and for Newton the matrix ``A`` at the
        returned points (``None`` for the other methods).
    """
    if max_iter < 1:
        raise ValueError(f"max_iter: must be >= 1, got {max_iter}")
    if memory < 1:
        raise ValueError(f"memory: must be >= 1, got {memory}")
    if check_every < 1:
        raise ValueError(f"check_every: must be >= 1, got {check_every}")
    key = method.lower()
    if key not in METHODS or key == "auto":
        raise ValueError(f"solver: method must be one of ['picard', 'anderson', 'newton'], got {method!r}")
    if fixed_shape is None:
        fixed_shape = default_fixed_shape(x0.device)
    run = _Run(x0.detach(), effective_tolerance(tol, x0.dtype, x0.device), max_iter, key, fixed_shape, check_every)
    if x0.shape[0] > 0:
        if key == "picard":
            _picard(f, run)
        elif key == "anderson":
            _anderson(f, run, memory)
        else:
            if newton_map is None:
                raise ValueError("solver: 'newton' needs a newton_map that returns the Jacobian")
            _newton(newton_map, run, NEWTON_DECREASE)
    elif key == "newton":
        n = _flat(x0).shape[1]
        run.jac = x0.new_zeros(0, n, n)
    stats = run.stats()
    if warn:
        warn_unconverged(stats, label)
    return run.w, stats, run.jac


def warn_unconverged(stats: SolverStats, label: str, stacklevel: int = 3) -> None:
    """One :class:`SolverWarning` naming how many samples stalled and how many ran out of iterations.

    Every solver of the engine reports through this (the generic solvers here and the fused path), so the warning
    reads the same wherever a solve failed. ``stacklevel`` as for :func:`warnings.warn`, counted from here (3: the
    caller of the function that called this one).
    """
    failed = stats.n_failed  # (one host synchronisation per solve)
    if not failed:
        return
    stalled = stats.n_stalled
    worst = float(stats.residual.max())
    parts = []
    if failed - stalled:
        parts.append(f"{failed - stalled} reached max_iter = {stats.max_iter}")
    if stalled:
        parts.append(
            f"{stalled} stalled (residual not below {STALL_FACTOR:g} x its last value for {STALL_WINDOW} iterations)"
        )
    warnings.warn(
        f"{label}: {failed} of {stats.batch_size} samples did not converge ({stats.method}): "
        f"{'; '.join(parts)} (worst relative residual {worst:.3g}, tolerance {stats.tol:.3g})",
        SolverWarning,
        stacklevel=stacklevel,
    )
