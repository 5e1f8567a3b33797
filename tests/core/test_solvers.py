"""Fixed-point solvers: convergence, honest statistics, per-sample stopping, capped non-convergence."""

import pytest
import torch

from monoflow_core.solvers import SolverWarning, effective_tolerance, resolve_method, solve

DT = torch.float64


def contraction(L=0.9, n=2, seed=0):
    """f(w) = rhs - L * tanh(A w) with |A| = 1: a contraction whose solution we can check."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    a = a / torch.linalg.matrix_norm(a, ord=2)
    rhs = torch.randn(64, n, generator=g, dtype=DT) * 3

    def f(w, idx):
        return rhs[idx] - L * torch.tanh(w @ a.T)

    def newton(w, idx):
        h = w @ a.T
        d = 1 - torch.tanh(h) ** 2
        jac = L * d.unsqueeze(-1) * a  # J_G, rows scaled
        return f(w, idx), torch.eye(n, dtype=DT) + jac

    return f, newton, rhs


@pytest.mark.parametrize("method", ["picard", "anderson", "newton"])
@pytest.mark.parametrize("tol", [1e-6, 1e-11])
def test_converges_to_requested_tolerance(method, tol):
    f, newton, rhs = contraction()
    w, stats, _ = solve(f, rhs, method=method, tol=tol, max_iter=2000, newton_map=newton)
    idx = torch.arange(rhs.shape[0])
    true_res = (f(w, idx) - w).abs().amax(1) / (1 + rhs.abs().amax(1))
    assert stats.all_converged
    # Reported residuals are honest: below tol, and the returned point is at least that good.
    assert float(stats.residual.max()) <= tol
    assert float(true_res.max()) <= tol * 1.0001
    assert stats.iterations.min() >= 1 and stats.evaluations == int(stats.iterations.max())


def test_iteration_counts_rank_as_expected():
    f, newton, rhs = contraction(L=0.98, n=4)
    its = {}
    for method in ("picard", "anderson", "newton"):
        _, stats, _ = solve(f, rhs, method=method, tol=1e-10, max_iter=5000, newton_map=newton)
        assert stats.all_converged
        its[method] = int(stats.iterations.max())
    assert its["newton"] < its["anderson"] < its["picard"]
    assert its["newton"] <= 10


def test_each_sample_stops_on_its_own():
    f, _, rhs = contraction()
    rhs[0] = 0.0  # w = 0 is the exact solution for this sample: it converges at once
    seen = []

    def counting(w, idx):
        seen.append(idx.clone())
        return f(w, idx)

    _, stats, _ = solve(counting, rhs, method="picard", tol=1e-10, max_iter=1000)
    assert int(stats.iterations[0]) == 1
    assert all(0 not in s.tolist() for s in seen[1:])
    assert stats.iterations.max() > 10


def test_non_contraction_stops_at_max_iter_and_says_so():
    rhs = torch.ones(5, 2, dtype=DT)

    def expanding(w, idx):
        return 2.0 * w + 1.0  # fixed point -1 exists, but iteration diverges

    with pytest.warns(SolverWarning, match="did not converge"):
        _, stats, _ = solve(expanding, rhs, method="picard", tol=1e-8, max_iter=25)
    assert stats.n_failed == 5 and not stats.all_converged
    assert int(stats.iterations.max()) == 25
    with pytest.warns(SolverWarning):
        _, stats, _ = solve(expanding, rhs, method="anderson", tol=1e-8, max_iter=25)
    assert int(stats.iterations.max()) <= 25


def test_nan_never_counts_as_converged():
    rhs = torch.ones(3, 2, dtype=DT)
    with pytest.warns(SolverWarning):
        _, stats, _ = solve(lambda w, idx: w * float("nan"), rhs, method="picard", tol=1e-3, max_iter=5)
    assert stats.n_failed == 3


def test_tolerance_is_dtype_aware():
    assert effective_tolerance(1e-12, torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)
    assert effective_tolerance(1e-12, torch.float64) == 1e-12
    # float32 with an unreachable tolerance still converges (no spinning to max_iter)
    f, _, rhs = contraction()
    f32 = lambda w, idx: f(w.double(), idx).float()  # noqa: E731
    _, stats, _ = solve(f32, rhs.float(), method="anderson", tol=1e-12, max_iter=500)
    assert stats.all_converged and int(stats.iterations.max()) < 200
    with pytest.raises(ValueError, match="tol"):
        effective_tolerance(0.0, torch.float32)


def test_method_names():
    assert resolve_method("auto", 2) == "newton"
    assert resolve_method("auto", 100) == "anderson"
    with pytest.raises(ValueError, match="picard"):
        resolve_method("broyden-ish", 2)
    f, _, rhs = contraction()
    with pytest.raises(ValueError, match="max_iter"):
        solve(f, rhs, method="picard", max_iter=0)


@pytest.mark.parametrize("method", ["anderson", "newton"])
def test_half_precision_solves_mix_in_float32(method):
    """bfloat16 has no LAPACK / cuSOLVER solver: Anderson's mixing and Newton's steps (n > 2) solve their small
    systems in float32. The solve converges at bfloat16's floor to the float64 solution, in bfloat16."""
    f, newton, rhs = contraction(n=4)
    exact, _, _ = solve(f, rhs, method="newton", newton_map=newton, tol=1e-13)

    def f16(w, idx):
        return f(w.double(), idx).bfloat16()

    def newton16(w, idx):
        value, a = newton(w.double(), idx)
        return value.bfloat16(), a.bfloat16()

    w, stats, _ = solve(f16, rhs.bfloat16(), method=method, newton_map=newton16)
    assert w.dtype == torch.bfloat16 and stats.all_converged
    assert stats.tol == pytest.approx(2.0**-7)  # one bfloat16 epsilon (monoflow_core.precision)
    assert float((w.double() - exact).abs().max()) < 0.1
    assert int(stats.iterations.max()) >= 2  # Anderson mixed at least once (or Newton took a step)
