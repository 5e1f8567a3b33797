"""The fused path's safeguarded Newton solves on the PyTorch kernels, with the generic solvers' stall exit."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..solvers import STALL_FACTOR, STALL_WINDOW, SolverStats, effective_tolerance, warn_unconverged
from .algebra import max_abs, newton_step
from .evaluate import evaluate_with_jacobian
from .folded import BlockWeights
from .settings import SETTINGS
from .workspace import BlockViews, Workspace

__all__ = ["StallTest", "newton_solve", "newton_solve_compact", "rejected_candidates", "safeguard", "warn_failed"]


def rejected_candidates(res: Tensor, prev: tuple[Tensor, ...] | None, plain: Tensor | None) -> Tensor | None:
    """The points just evaluated that :func:`safeguard` rejects: a Newton candidate whose residual grew compared
    with ``prev`` (the previous accepted ``(w, r, res)``); a plain step (marked in ``plain``) is always accepted.
    None before there is anything to compare with."""
    if prev is None:
        return None
    worse = res > prev[2]
    if plain is not None:
        worse = worse.logical_and_(plain.logical_not())
    return worse


def safeguard(
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
    ``worse``: :func:`rejected_candidates` of these arguments if already computed. Returns the guarded candidates and
    the new ``(prev, plain)``.
    """
    if prev is None:
        return cand, (w, r, res), None
    if worse is None:
        worse = rejected_candidates(res, prev, plain)
        assert worse is not None
    if bool(worse.any()):
        cand = torch.where(worse, prev[0] - prev[1], cand)
        prev = tuple(torch.where(worse, old, new) for old, new in zip(prev, (w, r, res), strict=True))
        return cand, prev, worse
    return cand, (w, r, res), None


class StallTest:
    """The stall exit of the generic solvers (:data:`~monoflow_core.solvers.STALL_WINDOW`,
    :data:`~monoflow_core.solvers.STALL_FACTOR`, docs/solvers.md "Stall exit") for the fused Newton solves.

    A point whose Euclidean residual ``|r|_2`` has not fallen below ``STALL_FACTOR`` times its value at the last such
    decrease for ``STALL_WINDOW`` iterations stops, as not converged. A rejected Newton candidate
    (:func:`rejected_candidates`) is no progress, and a point stops only at an accepted point (after a rejected
    candidate it first takes the plain step), so the evaluation kept for the log-det and the backward pass is always
    at a point the solve accepted. Kept as squares (``|r|_2^2`` against ``STALL_FACTOR^2`` times the reference),
    which is the same test without a square root. The compiled kernels apply the same rule
    (:func:`monoflow_core.fused.kernels.solve_run`).

    The residuals of the first ``STALL_WINDOW - 1`` iterations are only kept, and the test's state is formed from them
    when a solve reaches ``STALL_WINDOW`` iterations: no point can stall before, and a solve that converges in a few
    iterations (the usual case) then pays no operator for the stall exit (it would cost about ten per iteration, 10%
    of the PyTorch kernels' operators in a training step of the paper's 2-D model). The decisions are the same.
    """

    def __init__(self) -> None:
        #: ``STALL_FACTOR^2 |r|_2^2`` at each point's last decrease (the bar its next merit must get under), and the
        #: iteration of that decrease (0: none yet); made at the first record
        self.bar: Tensor | None = None
        self.last: Tensor | None = None
        #: the iterations not yet recorded: ``(r, rejected, it, selections made before)``
        self._pending: list[tuple[Tensor, Tensor | None, int, int]] = []
        #: the row selections of a compacting solve (:meth:`select`), applied to the pending iterations when recorded
        self._selections: list[Tensor] = []

    def update(self, r: Tensor, rejected: Tensor | None, it: int) -> Tensor | None:
        """Take the residuals ``r`` (n, B) of iteration ``it`` (``rejected``: the rejected candidates among the points,
        :func:`rejected_candidates`; neither is modified later by the solves); return the points that stall now, or
        None while none can (before ``STALL_WINDOW`` iterations)."""
        if it < STALL_WINDOW:
            self._pending.append((r, rejected, it, len(self._selections)))
            return None
        for past, past_rejected, past_it, selected in self._pending:
            for keep in self._selections[selected:]:  # (the rows still in play)
                past = past.index_select(1, keep)
                past_rejected = None if past_rejected is None else past_rejected.index_select(0, keep)
            self._record(past, past_rejected, past_it)
        self._pending.clear()
        last = self._record(r, rejected, it)
        stuck = last <= it - STALL_WINDOW
        return stuck if rejected is None else stuck.logical_and_(rejected.logical_not())

    def _record(self, r: Tensor, rejected: Tensor | None, it: int) -> Tensor:
        """Record iteration ``it``; returns the iteration of each point's last decrease."""
        merit = torch.linalg.vecdot(r, r, dim=0)
        if self.bar is None or self.last is None:
            self.bar = torch.full_like(merit, math.inf)
            self.last = torch.zeros(merit.shape, dtype=torch.long, device=merit.device)
        better = merit < self.bar  # False for a NaN residual
        if rejected is not None:
            better.logical_and_(rejected.logical_not())
        self.bar = torch.where(better, merit.mul_(STALL_FACTOR * STALL_FACTOR), self.bar)
        self.last = torch.where(better, it, self.last)
        return self.last

    def select(self, keep: Tensor) -> None:
        """Keep the points at the positions ``keep`` (a compacting solve)."""
        if self.bar is None or self.last is None:  # nothing recorded yet
            self._selections.append(keep)
        else:
            self.bar, self.last = self.bar.index_select(0, keep), self.last.index_select(0, keep)


def newton_solve(
    net: BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, v: BlockViews
) -> tuple[Tensor, SolverStats]:
    """Solve ``w + sign G(w) = rhs`` (points as columns of ``rhs``) by safeguarded Newton, freezing samples.

    Every sample stops moving once its relative residual ``|w + sign G(w) - rhs|_inf / (1 + |rhs|_inf)`` meets
    the tolerance, or once it stalls (:class:`StallTest`), so the final evaluation (kept in the views ``v``) is at
    the returned point for every sample: its Jacobian and activations are exact there for the log-det and the
    backward pass. The hot loop avoids Python-scalar arithmetic and per-entry indexing (each costs an operator
    dispatch).
    """
    tol = effective_tolerance(tol, rhs.dtype)
    threshold = rhs.abs().amax(dim=0).add_(1.0).mul_(tol)
    final = net.map_weights(sign)
    w = rhs
    conv: Tensor | None = None
    stalled: Tensor | None = None
    history: list[Tensor] = []  # the finished (converged or stalled) samples after each iteration
    prev: tuple[Tensor, ...] | None = None  # (w, r, res) of the previous accepted iterate
    plain: Tensor | None = None  # samples whose current point came from a plain step
    stall = StallTest()
    it = 0
    while True:
        it += 1
        evaluate_with_jacobian(net, w, v, final)
        r = torch.sub(v.out_p, rhs)
        res = max_abs(r)
        ok = res <= threshold
        rejected = rejected_candidates(res, prev, plain)
        stuck = stall.update(r, rejected, it)
        conv = ok if conv is None else conv | ok
        if stuck is not None:
            stalled = stuck if stalled is None else stalled | stuck
        done = conv if stalled is None else conv | stalled
        history.append(done)
        if it >= max_iter or bool(done.all()):
            break
        cand = newton_step(w, v.jacobian_map, r, v.entries, v.scratch)
        cand, prev, plain = safeguard(w, r, res, cand, prev, plain, rejected)
        w = torch.where(done, w, cand)
    assert conv is not None  # (one iteration at least)
    stuck_at_end = None if stalled is None else stalled.logical_and(conv.logical_not())
    stats = _stats(history, res / threshold * tol, conv, it, tol, max_iter, stuck_at_end)
    warn_failed(stats, label)
    return w, stats


def newton_solve_compact(
    net: BlockWeights, rhs: Tensor, sign: float, tol: float, max_iter: int, label: str, want_jacobian: bool
) -> tuple[Tensor, Tensor | None, SolverStats]:
    """:func:`newton_solve` without a backward pass: finished samples leave the batch (no autograd, no buffers kept).

    Returns ``(w, I + sign J_G(w) or None, stats)``. A sample that converged or stalled stops moving at once (as in
    :func:`newton_solve`); it is written out and removed from the batch once at least ``1/compact_fraction`` of the
    batch has finished (:class:`~monoflow_core.fused.settings.FusedSettings`; removal costs a few index operations, so
    a handful of early finishers ride along frozen).
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
    conv: Tensor | None = None  # those of them that converged; None while they all did (no stall is possible yet)
    first: Tensor | None = None  # the iteration at which each of them finished
    prev: tuple[Tensor, ...] | None = None
    plain: Tensor | None = None
    stall = StallTest()
    v = Workspace(net, 1, b, rhs).block(0)
    it = 0
    while True:
        it += 1
        m = w.shape[1]
        if v.out_p.shape[1] != m:
            v = Workspace(net, 1, m, rhs).block(0)
        evaluate_with_jacobian(net, w, v, final)
        r = torch.sub(v.out_p, target)
        res = max_abs(r)
        ok = res <= thr
        rejected = rejected_candidates(res, prev, plain)
        stuck = stall.update(r, rejected, it)
        now = ok if stuck is None else ok.logical_or(stuck)
        if seen is None:
            n_seen = int(now.sum())
            if n_seen:
                seen, first = now, torch.where(now, it, 0)
                conv = None if stuck is None else ok
        else:
            assert first is not None
            new = now.logical_and(seen.logical_not())
            if stuck is not None and conv is None:  # from now on a sample may stall: the converged ones apart
                conv = seen
            seen = seen.logical_or(now)
            if conv is not None:
                conv = conv.logical_or(ok)
            first = torch.where(new, it, first)
            n_seen = int(seen.sum())
        a = v.jacobian_map
        last = it >= max_iter
        if last or n_seen == m or n_seen * SETTINGS.compact_fraction >= m:
            done = torch.ones_like(ok) if last else seen
            assert done is not None
            pos = done.nonzero().squeeze(1)
            ids = active.index_select(0, pos)
            w_out.index_copy_(1, ids, w.index_select(1, pos))
            if a_out is not None:
                a_out.index_copy_(2, ids, a.index_select(2, pos))
            if first is None or seen is None:
                its = torch.full_like(ids, it)
            else:
                its = torch.where(seen, first, it).index_select(0, pos)
            iterations.index_copy_(0, ids, its)
            residual.index_copy_(0, ids, res.index_select(0, pos).div_(thr.index_select(0, pos)).mul_(tol))
            if seen is None:
                converged.index_copy_(0, ids, ok.index_select(0, pos))
            elif conv is None:
                converged.index_copy_(0, ids, seen.index_select(0, pos))
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
        cand, prev, plain = safeguard(w, r, res, newton_step(w, a, r, *views), prev, plain, rejected)
        w = cand if seen is None else torch.where(seen, w, cand)
    stats = SolverStats("newton", iterations, residual, converged, it, tol, max_iter, stalled=stalled)
    warn_failed(stats, label)
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


def warn_failed(stats: SolverStats, label: str) -> None:
    """The generic solvers' :class:`SolverWarning` (:func:`monoflow_core.solvers.warn_unconverged`), issued at the
    caller of the fused path's entry point."""
    warn_unconverged(stats, label, stacklevel=6)
