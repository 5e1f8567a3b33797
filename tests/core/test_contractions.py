"""Every solver converges on every contraction: a seeded family of random contractions, solved directly and
through the inverses of MonotoneBlock and ResidualBlock; honest statistics; default tolerances that follow the dtype.

The family: ``G(w) = L tanh(w Q + c)`` with Q a random orthogonal matrix, so Lip(G) = L exactly in the Euclidean
norm, L uniform in [0.5, 0.99], dimension 1 to 8, right-hand sides over two decades of scale. The iteration cap of
every solve is what the contraction mapping theorem grants plain iteration (:func:`picard_cap`): a solver that
needs more than that on a contraction is broken, whatever its name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from monoflow_core import FlowConfig, MonotoneBlock, ResidualBlock, build_flow, fused
from monoflow_core.fused import SETTINGS
from monoflow_core.solvers import (
    DEFAULT_TOL,
    METHODS,
    NEWTON_DECREASE,
    SolverWarning,
    default_tolerance,
    effective_tolerance,
    resolve_method,
    solve,
)

DTYPES = (torch.float32, torch.float64)
DIMS = range(1, 9)
#: The Newton-based solvers converge quadratically once close: far fewer evaluations than this on the whole family
#: (at most 30 in benchmarks/contractions.py's 160,000 samples per dtype). A safeguard that fell back to plain steps
#: too eagerly would need hundreds here.
NEWTON_MAX_EVALUATIONS = 60


def picard_cap(lip: float, n: int, tol: float) -> int:
    """Evaluations within which plain iteration reaches ``tol`` on this family, with slack for rounding.

    From ``w0 = rhs`` the first residual is ``|G(w0)|_2 <= L sqrt(n)`` (relative to ``1 + |w0|_inf`` even less),
    each plain step multiplies the Euclidean residual by at most L, and the max-norm is below the Euclidean one.
    """
    exact = math.ceil(math.log(tol / math.sqrt(n)) / math.log(lip)) + 1
    return int(1.1 * exact) + 10


def orthogonal(n: int, g: torch.Generator, batch: int = 1) -> Tensor:
    """Haar-random orthogonal (batch, n, n) matrices in float64 (QR with the signs of R's diagonal fixed)."""
    q, r = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)


def right_hand_sides(m: int, n: int, g: torch.Generator) -> Tensor:
    """Gaussian points scaled over [0.1, 10] per point (small scales are where plain Newton stalled)."""
    scale = 10.0 ** (2.0 * torch.rand(m, 1, generator=g, dtype=torch.float64) - 1.0)
    return torch.randn(m, n, generator=g, dtype=torch.float64) * scale


class Family:
    """``m`` contractions of dimension ``n``, one per sample: ``f(w) = rhs - L tanh(w Q + c)`` with its Newton map."""

    def __init__(self, m: int, n: int, dtype: torch.dtype, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.q = orthogonal(n, g, m).to(dtype)
        self.lip = (0.5 + 0.49 * torch.rand(m, generator=g, dtype=torch.float64)).to(dtype)
        self.c = (0.5 * torch.randn(m, n, generator=g, dtype=torch.float64)).to(dtype)
        self.rhs = right_hand_sides(m, n, g).to(dtype)
        self.eye = torch.eye(n, dtype=dtype)

    def g_of(self, w: Tensor, idx: Tensor) -> Tensor:
        return torch.tanh(torch.bmm(w.unsqueeze(1), self.q[idx]).squeeze(1) + self.c[idx])

    def f(self, w: Tensor, idx: Tensor) -> Tensor:
        return self.rhs[idx] - self.lip[idx, None] * self.g_of(w, idx)

    def newton_map(self, w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(w), I - J_f(w))``; ``J_G = L diag(1 - t^2) Q^T`` since ``G_j = L tanh(sum_i w_i Q_ij + c_j)``."""
        t = self.g_of(w, idx)
        jac_g = (self.lip[idx, None] * (1 - t * t)).unsqueeze(-1) * self.q[idx].transpose(1, 2)
        return self.rhs[idx] - self.lip[idx, None] * t, self.eye + jac_g

    def relative_residual(self, w: Tensor) -> Tensor:
        idx = torch.arange(w.shape[0])
        return (w - self.f(w, idx)).abs().amax(dim=1) / (1 + self.rhs.abs().amax(dim=1))


def tanh_g(n: int, lip: float, dtype: torch.dtype, g: torch.Generator) -> Callable[[Tensor], Tensor]:
    """One user-supplied G = L tanh(w Q + c) (a plain callable: the blocks' generic path)."""
    q = orthogonal(n, g)[0].to(dtype)
    c = (0.5 * torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    return lambda w: lip * torch.tanh(w @ q + c)


# -- the solvers directly --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", METHODS)
def test_every_solver_converges_on_every_contraction(name, dtype):
    tol = default_tolerance(dtype)
    for n in DIMS:
        fam = Family(256, n, dtype, seed=1000 * n + 7)
        method = resolve_method(name, n)
        cap = picard_cap(float(fam.lip.max()), n, tol)
        w, stats, _ = solve(fam.f, fam.rhs, method=method, tol=tol, max_iter=cap, newton_map=fam.newton_map, warn=False)
        assert stats.n_failed == 0, (name, n, stats.summary())
        true = fam.relative_residual(w)
        if method == "newton":
            # Newton returns the very point it measured.
            assert float(true.max()) <= tol * 1.001, (name, n)
            assert int(stats.iterations.max()) <= NEWTON_MAX_EVALUATIONS, (name, n, stats.summary())
        else:
            # Picard and Anderson return f of the point they measured: closer to the solution (by the factor L), but
            # its max-norm residual may exceed the measured one by up to L sqrt(n).
            assert float(true.max()) <= math.sqrt(n) * tol * 1.001, (name, n)


def test_newton_statistics_are_per_sample_and_exact():
    """Evaluations per sample, residuals and A = I - J_f all describe the returned points, also at the cap.

    At the cap a sample whose last Newton candidate was rejected returns its last accepted point (never a point
    worse than the best it had seen by more than the acceptance factor).
    """
    fam = Family(256, 3, torch.float64, seed=5)
    counts = torch.zeros(256, dtype=torch.long)
    best = torch.full((256,), math.inf, dtype=torch.float64)

    def counting(w: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        counts[idx] += 1
        fw, a = fam.newton_map(w, idx)
        best[idx] = torch.minimum(best[idx], torch.linalg.vector_norm(w - fw, dim=1))
        return fw, a

    everything = torch.arange(256)
    for cap in (*range(2, 9), 1000):
        counts.zero_()
        best.fill_(math.inf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SolverWarning)
            w, stats, a = solve(fam.f, fam.rhs, method="newton", tol=1e-12, max_iter=cap, newton_map=counting)
        assert torch.equal(stats.iterations, counts)
        assert stats.evaluations == int(counts.max())
        assert torch.allclose(stats.residual, fam.relative_residual(w), rtol=1e-6, atol=1e-15)
        assert torch.equal(stats.converged, stats.residual <= stats.tol)
        fw, a_at_w = fam.newton_map(w, everything)
        assert a is not None and torch.allclose(a, a_at_w, rtol=0, atol=1e-15)
        merit = torch.linalg.vector_norm(w - fw, dim=1)
        assert bool((stats.converged | (merit <= best / NEWTON_DECREASE * (1 + 1e-9))).all()), cap
        if cap == 1000:
            assert stats.all_converged


def test_newton_converges_where_it_used_to_stall():
    """A sample on which plain Newton stalled for ever (the issue's reproduction) converges quickly now."""
    g = torch.Generator().manual_seed(2)
    q = orthogonal(2, g)[0]
    y = torch.randn(256, 2, generator=g, dtype=torch.float64) * 0.3
    block = ResidualBlock(lambda w: 0.9 * torch.tanh(w @ q), solver="newton", max_iter=200)
    with torch.no_grad():
        x = block.inverse(y)
    stats = block.inverse_stats
    assert stats is not None and stats.all_converged
    assert int(stats.iterations.max()) <= 30
    assert float((x + 0.9 * torch.tanh(x @ q) - y).abs().max()) < 1e-11


@pytest.mark.parametrize("name", METHODS)
def test_rounding_cycles_do_not_stall_float32(name):
    """Where f' is close to -1 the last bits of plain iteration settle into a 2-cycle in float32.

    ResidualBlock with G = 0.99 tanh(w + c), solutions near ``w = -c`` (so f' = -G' ~ -0.99) and |w| ~ 1.5, where an
    ulp is 1.2e-7: plain iteration used to cycle at residuals of up to 47 epsilons, above the 10-epsilon tolerance,
    and left about half of these points unconverged however many iterations it was given.
    """
    g = torch.Generator().manual_seed(3)
    w_star = -1.5 + 0.05 * torch.randn(1024, 1, generator=g, dtype=torch.float64)
    y = (w_star + 0.99 * torch.tanh(w_star + 1.5)).float()
    block = ResidualBlock(lambda w: 0.99 * torch.tanh(w + 1.5), solver=name, max_iter=5000)
    with torch.no_grad():
        x = block.inverse(y)
    stats = block.inverse_stats
    assert stats is not None and stats.n_failed == 0, stats.summary()
    assert float((x.double() - w_star).abs().max()) < 1e-4


# -- through the blocks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("block_type", [MonotoneBlock, ResidualBlock], ids=lambda c: c.__name__)
def test_block_inverses_converge_on_every_contraction(block_type, name, dtype):
    seed = 100 * METHODS.index(name) + 10 * DTYPES.index(dtype) + (block_type is MonotoneBlock)
    g = torch.Generator().manual_seed(seed)
    tol = default_tolerance(dtype)
    for n in DIMS:
        lip = float(0.5 + 0.49 * torch.rand((), generator=g, dtype=torch.float64))
        if n == 8:
            lip = 0.99  # the hardest corner of the family in every run
        G = tanh_g(n, lip, dtype, g)
        y = right_hand_sides(128, n, g).to(dtype)
        block = block_type(G, solver=name, max_iter=picard_cap(lip, n, tol))
        with torch.no_grad():
            x = block.inverse(y)
        stats = block.inverse_stats
        assert stats is not None and stats.tol == tol
        assert stats.n_failed == 0, (block_type.__name__, name, n, lip, stats.summary())
        if resolve_method(name, n) == "newton":
            assert int(stats.iterations.max()) <= NEWTON_MAX_EVALUATIONS, (name, n, stats.summary())
        # The point is a solution: the forward map takes it back to y.
        y_back, _ = block(x)
        assert float((y_back - y).abs().max()) <= 100 * tol * (1 + float(y.abs().max())), (name, n)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("block_type", [MonotoneBlock, ResidualBlock], ids=lambda c: c.__name__)
def test_issue_reproduction_default_settings(block_type, n, seed):
    """G = 0.9 tanh(w Q), float64, 256 points, default solver settings: plain Newton left up to 27 points stalled."""
    g = torch.Generator().manual_seed(seed)
    q = orthogonal(n, g)[0]
    y = torch.randn(256, n, generator=g, dtype=torch.float64) * 0.3
    block = block_type(lambda w: 0.9 * torch.tanh(w @ q))
    with torch.no_grad():
        block.inverse(y)
    assert block.inverse_stats is not None and block.inverse_stats.n_failed == 0


# -- default tolerances ----------------------------------------------------------------------------------------------
def test_default_tolerance_follows_the_dtype():
    assert default_tolerance(torch.float64) == DEFAULT_TOL == 1e-12
    assert default_tolerance(torch.float32) == pytest.approx(10 * torch.finfo(torch.float32).eps)
    assert FlowConfig().tol == DEFAULT_TOL
    assert MonotoneBlock(lambda w: 0.5 * torch.tanh(w)).tol == DEFAULT_TOL
    # An explicit tolerance is kept as given (above the floor).
    assert effective_tolerance(1e-6, torch.float64) == 1e-6


@pytest.fixture(params=["generic", "fused-pytorch", "fused-compiled"])
def path(request, monkeypatch):
    """The generic autograd path, and the fused path on each of its kernel sets."""
    if request.param == "fused-compiled" and not fused.kernels_ready(torch.float64, wait=True):
        pytest.skip("the compiled kernels are unavailable here")
    monkeypatch.setattr(SETTINGS, "use_kernels", request.param == "fused-compiled")
    return request.param


def test_default_flow_round_trips_in_float64(path):
    """``build_flow(FlowConfig())`` in float64, nothing changed: round trips within 1e-8 (1e-5 with the old 1e-6)."""
    torch.manual_seed(0)
    flow = build_flow(FlowConfig()).double().eval()
    flow.fast_path = path != "generic"
    z = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = flow.inverse(z)
        stats = [b.inverse_stats for b in flow.implicit_blocks()]
        z_back, _ = flow(x)
        x_back = flow.inverse(z_back)
    assert float((z_back - z).abs().max()) < 1e-8
    assert float((x_back - x).abs().max()) < 1e-8
    assert all(s is not None and s.tol == 1e-12 and s.all_converged for s in stats)


def test_default_flow_in_float32_keeps_its_floor(path):
    torch.manual_seed(0)
    flow = build_flow(FlowConfig()).eval()
    flow.fast_path = path != "generic"
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flow.inverse(z)
    for block in flow.implicit_blocks():
        stats = block.inverse_stats
        assert stats is not None and stats.all_converged
        assert stats.tol == pytest.approx(10 * torch.finfo(torch.float32).eps)
