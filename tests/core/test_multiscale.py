"""Multiscale image flows in float64: layers, round trips, exact and estimated log-dets, bpd, dequantization.

Every check compares against an independent reference: ``torch.linalg.slogdet`` of a brute-force autograd
Jacobian, ``pixel_unshuffle``, central finite differences, or a hand evaluation of the documented formula
(docs/algorithm.md sections 3, 5, 9.3). Models are tiny (1x8x8 or 2x4x4 images, one block per scale, small G) so the
file runs in seconds on one thread.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from monoflow_core import FlowConfig, build_flow
from monoflow_core.dequantization import UniformDequantizer, VariationalDequantizer
from monoflow_core.image_layers import ActNorm2d, LogitTransform, Squeeze, squeeze2d, unsqueeze2d
from monoflow_core.multiscale import MultiscaleFlow, quantize

torch.set_num_threads(1)

DT = torch.float64
K = 17  # pixel levels of the 8x8 digits
FORMULATIONS = ("monotone", "residual", "inverse_residual")


def per_sample_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """``log|det|`` of the Jacobian of ``fn`` (one sample -> one sample) on each flattened sample of ``x``."""
    out = []
    for xi in x:

        def flat_fn(v, shape=xi.shape):
            return fn(v.reshape(1, *shape)).reshape(-1)

        jac = torch.autograd.functional.jacobian(flat_fn, xi.reshape(-1))
        out.append(torch.linalg.slogdet(jac).logabsdet)
    return torch.stack(out)


def continuous_images(shape, n: int, seed: int = 0) -> torch.Tensor:
    """Uniformly dequantized random K-level images in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, K, (n, *shape), generator=g).to(DT)
    return (x + torch.rand(x.shape, generator=g, dtype=DT)) / K


def tiny_config(formulation="monotone", factor_out=False, **overrides) -> FlowConfig:
    kw = {
        "image_shape": [1, 8, 8],
        "blocks_per_scale": [1, 1],
        "fc_blocks": 1,
        "depth": 1,
        "growth": 2,
        "fc_growth": 4,
        "actnorm": True,
        "formulation": formulation,
        "factor_out": factor_out,
        "spectral_norm": "exact",
        "tol": 1e-10,
        "max_iter": 500,
        "logdet": "exact",
        "levels": K,
    }
    kw.update(overrides)
    return FlowConfig(**kw)


def tiny_flow(formulation="monotone", factor_out=False, seed=0, **overrides) -> MultiscaleFlow:
    """A float64 image flow with its ActNorms initialised by one training pass, returned in eval mode."""
    torch.manual_seed(seed)
    flow = build_flow(tiny_config(formulation, factor_out, **overrides)).to(DT)
    assert isinstance(flow, MultiscaleFlow)
    flow.train()
    with torch.no_grad():
        flow(continuous_images(flow.event_shape, 16, seed=100 + seed))
    flow.eval()
    return flow


# ---------------------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05, 0.3])
def test_logit_transform_round_trip_and_logdet(alpha):
    layer = LogitTransform(alpha)
    x = continuous_images((2, 2, 2), 3, seed=1)
    y, logdet = layer(x)
    s = alpha + (1 - 2 * alpha) * x
    torch.testing.assert_close(y, torch.log(s / (1 - s)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, per_sample_logdet(lambda v: layer(v)[0], x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [-0.01, 0.5, 0.7])
def test_logit_transform_rejects_bad_alpha(alpha):
    with pytest.raises(ValueError, match="logit_alpha"):
        LogitTransform(alpha)


def test_squeeze_is_the_pixel_unshuffle_permutation():
    x = torch.randn(2, 3, 4, 6, dtype=DT)
    y, logdet = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3)
    # Reference layout: channel c * 4 + 2 i + j holds x[c, 2 h + i, 2 w + j].
    torch.testing.assert_close(y, F.pixel_unshuffle(x, 2), rtol=0, atol=0)
    assert torch.equal(logdet, torch.zeros(2, dtype=DT))
    assert torch.equal(Squeeze().inverse(y), x) and torch.equal(unsqueeze2d(squeeze2d(x)), x)
    assert torch.equal(squeeze2d(unsqueeze2d(y)), y)
    # As a linear map it is a permutation matrix: every entry 0 or 1, one 1 per row and per column.
    jac = torch.autograd.functional.jacobian(lambda v: squeeze2d(v.reshape(1, 3, 4, 6)).reshape(-1), x[0].reshape(-1))
    assert set(jac.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(jac.sum(0), torch.ones(72, dtype=DT)) and torch.equal(jac.sum(1), torch.ones(72, dtype=DT))
    assert torch.linalg.slogdet(jac).logabsdet.item() == 0.0


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.zeros(1, 1, 3, 4))


def test_actnorm2d_data_init_round_trip_and_logdet():
    torch.manual_seed(0)
    layer = ActNorm2d(3).to(DT)
    scale = torch.tensor([0.1, 2.0, 5.0], dtype=DT).view(1, 3, 1, 1)
    batch = torch.randn(8, 3, 2, 2, dtype=DT) * scale + torch.tensor([1.0, -2.0, 0.5], dtype=DT).view(1, 3, 1, 1)
    layer.eval()
    y, _ = layer(batch)  # eval mode: no initialisation, identity
    assert torch.equal(y, batch) and not bool(layer.initialized)
    layer.train()
    y, _ = layer(batch)
    assert bool(layer.initialized)
    per_channel = y.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3, dtype=DT), rtol=0, atol=1e-12)
    var = per_channel.var(1, unbiased=False)
    # s = -0.5 log max(var, 0.2): channels with var >= 0.2 come out with unit variance, the small one is scaled
    # by 1/sqrt(0.2).
    raw_var = batch.transpose(0, 1).reshape(3, -1).var(1, unbiased=False)
    torch.testing.assert_close(var, raw_var / torch.clamp(raw_var, min=0.2), rtol=1e-10, atol=0)
    x = torch.randn(3, 3, 2, 2, dtype=DT)
    y, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(logdet, per_sample_logdet(lambda v: layer(v)[0], x), rtol=1e-10, atol=1e-10)
    # A later training batch does not re-initialise.
    before = layer.bias.detach().clone()
    layer(torch.randn(4, 3, 2, 2, dtype=DT))
    assert torch.equal(layer.bias.detach(), before)


# ---------------------------------------------------------------------------------------------------------------
# The multiscale flow: layout, round trips, exact log-det
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor_out", [False, True])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_round_trip(formulation, factor_out):
    flow = tiny_flow(formulation, factor_out)
    x = continuous_images((1, 8, 8), 5, seed=2)
    with torch.no_grad():
        z, logdet = flow(x)
        assert z.shape == (5, 64) and logdet.shape == (5,) and torch.isfinite(logdet).all()
        x_back = flow.inverse(z)
        torch.testing.assert_close(x_back, x, rtol=0, atol=1e-8)
        # The inverse also takes z in image layout (B, C, H, W).
        torch.testing.assert_close(flow.inverse(z.reshape(5, 1, 8, 8)), x, rtol=0, atol=1e-8)
    # Every ActNorm was initialised by the training pass and is no longer the identity.
    actnorms = [m for m in flow.layers if isinstance(m, ActNorm2d)]
    assert len(actnorms) == 3 and all(bool(a.initialized) for a in actnorms)
    assert all(a.bias.abs().sum() > 0 for a in actnorms)


def test_factor_out_layout():
    """Factored-out channels go to z unchanged by later layers; the rest continues through the fc block."""
    flow = tiny_flow("monotone", factor_out=True)
    assert flow.plan[4] == ("factor", 2) and flow._piece_shapes == [(2, 4, 4), (2, 4, 4)]
    assert [type(m).__name__ for m in flow.layers] == [
        "LogitTransform",
        "MonotoneBlock",
        "ActNorm2d",
        "Squeeze",
        "MonotoneBlock",
        "ActNorm2d",
        "MonotoneBlock",
        "ActNorm2d",
    ]
    x = continuous_images((1, 8, 8), 3, seed=3)
    with torch.no_grad():
        z, _ = flow(x)
        h = x
        for i in range(4):  # logit, block, actnorm, squeeze
            h, _ = flow.layers[i](h)
        assert h.shape == (3, 4, 4, 4)
        torch.testing.assert_close(z[:, :32], h[:, 2:].reshape(3, -1), rtol=0, atol=0)
        rest = h[:, :2]
        for i in range(4, 8):  # second-scale block, actnorm, fc block, actnorm
            rest, _ = flow.layers[i](rest)
        torch.testing.assert_close(z[:, 32:], rest.reshape(3, -1), rtol=0, atol=0)
        with pytest.raises(ValueError, match="64 dimensions"):
            flow.inverse(z[:, :40])


def flow_jacobian(flow: MultiscaleFlow, x: torch.Tensor) -> torch.Tensor:
    """Brute-force Jacobians dz/dx (B, D, D) by reverse-mode autograd through the whole flow.

    Each sample is replicated D times in one batch (samples are independent in eval mode), and one backward
    pass with the identity as cotangent returns row i of the Jacobian in replica i. z does not depend on the
    log-det mode, so this pass uses the cheap estimator (the exact one would build a D x D Jacobian with a graph
    for every replica).
    """
    b, d = x.shape[0], x[0].numel()
    modes = [blk.logdet_mode for blk in flow.implicit_blocks()]
    try:
        for blk in flow.implicit_blocks():
            blk.logdet_mode = "estimator"
        xr = x.repeat_interleave(d, dim=0).clone().requires_grad_(True)
        z, _ = flow(xr)
    finally:
        for blk, mode in zip(flow.implicit_blocks(), modes, strict=True):
            blk.logdet_mode = mode
    cot = torch.eye(d, dtype=DT).repeat(b, 1)
    (g,) = torch.autograd.grad(z, xr, cot)
    return g.reshape(b, d, d)


@pytest.mark.parametrize("factor_out", [False, True])
@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_exact_logdet_equals_slogdet_of_the_full_jacobian(formulation, factor_out):
    flow = tiny_flow(formulation, factor_out)
    x = continuous_images((1, 8, 8), 2, seed=4)
    jac = flow_jacobian(flow, x)
    with torch.no_grad():
        _, logdet = flow(x)
    assert flow.logdet_is_exact
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac).logabsdet, rtol=0, atol=1e-7)
    # The log-det is far from trivial: the logit transform alone contributes tens of nats.
    assert logdet.abs().min() > 10.0
    # And the log-density uses it: log p(x) = log N(z) + log|det|.
    with torch.no_grad():
        z, _ = flow(x)
        expected = -0.5 * (z * z).sum(1) - 32 * math.log(2 * math.pi) + logdet
        torch.testing.assert_close(flow.log_prob(x), expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# Power-series estimator and the hybrid mode
# ---------------------------------------------------------------------------------------------------------------


def _estimator_draws(flow: MultiscaleFlow, x: torch.Tensor, calls: int, replicas: int, grad: bool) -> torch.Tensor:
    """Per-call means of the estimated log-det of each image: (calls, B), i.i.d. across calls."""
    b = x.shape[0]
    rows = []
    for _ in range(calls):
        xr = x.repeat(replicas, 1, 1, 1)
        if grad:
            _, ld = flow(xr.requires_grad_(True))
            ld = ld.detach()
        else:
            with torch.no_grad():
                _, ld = flow(xr)
        assert not flow.logdet_is_exact
        rows.append(ld.view(replicas, b).mean(0))
    return torch.stack(rows)


def test_statistical_estimator_is_unbiased():
    """STATISTICAL TEST (fixed seed, hence deterministic): the power-series estimate's mean over 30 independent
    calls (32 replicas of each image per call) lies within 3 standard errors of the exact log-det of the same
    flow and weights.

    Lipschitz coefficient 0.7 keeps the spectral radius of J_G below sqrt(1 - p) = 0.707 for the geometric
    roulette (p = 0.5), so the estimator's variance is finite (docs/performance.md). Terms 1-4 are exact and the
    roulette weights the rest by 1 / P(N >= k - 4); with fewer exact terms the estimate is strongly skewed (mostly
    below, rarely far above) and 30 calls resolve its mean poorly. The roulette's N is drawn once per call and
    block (shared by the batch), so the standard error comes from i.i.d. per-call means.
    """
    settings = {
        "lipschitz": 0.7,
        "n_exact_terms": 4,
        "n_exact_terms_eval": 4,
        "roulette": "geometric",
        "roulette_param": 0.5,
        "tol": 1e-8,
    }
    exact = tiny_flow("monotone", **settings)
    est = build_flow(tiny_config("monotone", logdet="estimator", **settings)).to(DT)
    est.load_state_dict(exact.state_dict())
    est.eval()
    x = continuous_images((1, 8, 8), 2, seed=5)
    with torch.no_grad():
        _, ld_exact = exact(x)
    torch.manual_seed(0)
    calls = 30
    draws = _estimator_draws(est, x, calls=calls, replicas=32, grad=False)
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(calls)
    assert torch.all(se > 0)
    assert torch.all((mean - ld_exact).abs() < 3 * se), (mean, se, ld_exact)
    assert torch.all(se < 0.3), se  # resolves the blocks' log-dets (about -13 nats here) to a few percent
    # A training pass (gradients enabled: the Neumann-gradient path) estimates the same quantity: with the same
    # random stream it returns the same values, up to the solver tolerance. (A gradient hook firing inside the
    # estimator's vector-Jacobian products once made training estimates differ.)
    torch.manual_seed(0)
    train_draws = _estimator_draws(est, x, calls=3, replicas=32, grad=True)
    torch.testing.assert_close(train_draws, draws[:3], rtol=0, atol=1e-6)


def test_hybrid_logdet_switches_between_estimator_and_exact():
    exact = tiny_flow("monotone", lipschitz=0.7)
    flow = build_flow(tiny_config("monotone", logdet="hybrid", lipschitz=0.7)).to(DT)
    flow.load_state_dict(exact.state_dict())
    flow.eval()
    x = continuous_images((1, 8, 8), 3, seed=6)
    with torch.no_grad():
        _, ld_exact = exact(x)
        _, ld = flow(x)
    assert flow.logdet_is_exact
    torch.testing.assert_close(ld, ld_exact, rtol=1e-12, atol=1e-12)
    # A pass that needs gradients (input requires grad, parameters require grad) uses the estimator...
    flow.train()
    torch.manual_seed(0)
    z, ld_train = flow(x.clone().requires_grad_(True))
    assert not flow.logdet_is_exact
    assert not torch.allclose(ld_train, ld_exact)
    # ... whose value is a plausible estimate and through which a loss can be differentiated.
    assert ((ld_train - ld_exact).abs() < 10.0).all()
    flow.zero_grad()
    (-(ld_train - 0.5 * (z * z).sum(1)).mean()).backward()
    block = flow.layers[1]
    assert block.net.final.weight.grad is not None and block.net.final.weight.grad.abs().sum() > 0
    # Parameters requiring grad suffice to make it a training pass.
    _ = flow(x)
    assert not flow.logdet_is_exact
    # Back to exact under no_grad, and when nothing needs a gradient.
    with torch.no_grad():
        flow(x)
    assert flow.logdet_is_exact
    for p in flow.parameters():
        p.requires_grad_(False)
    flow(x)
    assert flow.logdet_is_exact


# ---------------------------------------------------------------------------------------------------------------
# Discrete data: bpd, sampling, dequantization
# ---------------------------------------------------------------------------------------------------------------


def integer_images(shape, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, K, (n, *shape), generator=torch.Generator().manual_seed(seed))


def test_bpd_uniform_dequantization_formula():
    flow = tiny_flow("monotone")
    x = integer_images((1, 8, 8), 4, seed=7)
    u = torch.rand(x.shape, dtype=DT, generator=torch.Generator().manual_seed(8))
    d = 64
    with torch.no_grad():
        y = (x.to(DT) + u) / K
        log_p = flow.log_prob(y)
        bound = flow.log_prob_bound(x, noise=u)
        bpd = flow.bpd(x, noise=u)
    torch.testing.assert_close(bound, log_p - d * math.log(K), rtol=1e-13, atol=1e-10)
    torch.testing.assert_close(bpd, -(log_p - d * math.log(K)) / (d * math.log(2.0)), rtol=1e-13, atol=1e-12)
    # The uniform dequantizer itself: y in [x / K, (x + 1) / K), log q = 0.
    y_dq, log_q = UniformDequantizer(K)(x, dtype=DT, noise=u)
    torch.testing.assert_close(y_dq, y, rtol=0, atol=0)
    assert torch.equal(log_q, torch.zeros(4, dtype=DT))
    # Noise drawn inside from a generator: reproducible, and equal to passing the same draw explicitly.
    with torch.no_grad():
        a = flow.bpd(x, generator=torch.Generator().manual_seed(3))
        noise = flow.draw_noise(x.shape, generator=torch.Generator().manual_seed(3))
        assert noise.dtype == DT and noise.min() >= 0 and noise.max() < 1
        torch.testing.assert_close(a, flow.bpd(x, noise=noise), rtol=0, atol=0)


def test_bpd_finite_at_init():
    torch.manual_seed(0)
    flow = build_flow(tiny_config("monotone")).to(DT)  # ActNorms uninitialised: identity in eval mode
    flow.eval()
    x = integer_images((1, 8, 8), 3, seed=9)
    with torch.no_grad():
        bpd = flow.bpd(x, generator=torch.Generator().manual_seed(0))
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()
    # A standard normal on logits, slightly bent by the random blocks: the same order as the uniform model's
    # log2(17) = 4.09 bits per dimension (about 5 here), far from degenerate.
    assert ((bpd > 1.0) & (bpd < 10.0)).all(), bpd


def test_sample_images():
    flow = tiny_flow("monotone", factor_out=True)
    imgs = flow.sample_images(6, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (6, 1, 8, 8) and imgs.dtype == torch.int64
    assert imgs.min() >= 0 and imgs.max() <= K - 1
    # The same draw, quantized by hand.
    cont = flow.sample(6, generator=torch.Generator().manual_seed(0))
    expected = torch.clamp(torch.floor(cont * K), 0, K - 1).to(torch.int64)
    assert torch.equal(imgs, expected) and torch.equal(quantize(cont, K), expected)
    # quantize inverts uniform dequantization exactly.
    x = integer_images((1, 8, 8), 3, seed=10)
    u = torch.rand(x.shape, dtype=DT, generator=torch.Generator().manual_seed(1)) * 0.999
    assert torch.equal(quantize((x + u) / K, K), x)


def randomized_vdq(channels: int, seed: int = 0) -> VariationalDequantizer:
    """A variational dequantizer with its zero-initialised last layers perturbed (so it is not the identity)."""
    torch.manual_seed(seed)
    vdq = VariationalDequantizer(channels, levels=K, blocks=3, hidden=8).to(DT)
    with torch.no_grad():
        for coupling in vdq.couplings:
            last = coupling.net[-1]
            last.weight.normal_(0.0, 0.3)
            last.bias.normal_(0.0, 0.3)
    return vdq


def test_variational_dequantizer_density_by_change_of_variables():
    vdq = randomized_vdq(2)
    x = integer_images((2, 4, 4), 2, seed=11)
    eps = torch.randn(x.shape, dtype=DT, generator=torch.Generator().manual_seed(12))
    y, log_q = vdq(x, dtype=DT, noise=eps)
    u = y * K - x.to(DT)
    assert (u > 0).all() and (u < 1).all()
    assert y.shape == x.shape and log_q.shape == (2,)
    for i in range(2):
        xi = x[i : i + 1]

        def noise_to_u(e, xi=xi):
            return (vdq(xi, dtype=DT, noise=e.reshape(xi.shape))[0] * K - xi.to(DT)).reshape(-1)

        e = eps[i].reshape(-1)
        jac = torch.autograd.functional.jacobian(noise_to_u, e)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        log_normal = -0.5 * (e * e).sum() - 0.5 * e.numel() * math.log(2 * math.pi)
        torch.testing.assert_close(log_q[i], log_normal - logabsdet, rtol=1e-10, atol=1e-10)
    # The map genuinely depends on the image (conditioning) and is not the plain sigmoid.
    y2, _ = vdq((x + 1) % K, dtype=DT, noise=eps)
    assert not torch.allclose(y2 * K - ((x + 1) % K).to(DT), u)
    assert not torch.allclose(u, torch.sigmoid(eps))


def test_variational_dequantization_elbo_trains_the_dequantizer():
    torch.manual_seed(0)
    cfg = tiny_config(
        "monotone", image_shape=[2, 4, 4], dequantization="variational", vdq_blocks=2, vdq_channels=4, tol=1e-12
    )
    flow = build_flow(cfg).to(DT)
    assert isinstance(flow.dequantizer, VariationalDequantizer)
    flow.train()
    x = integer_images((2, 4, 4), 4, seed=13)
    with torch.no_grad():
        flow.bpd(x, generator=torch.Generator().manual_seed(0))  # ActNorm data init
    # bound = log p(y) - D log K - log q(u | x), with the dequantizer's own y and log q.
    eps = flow.draw_noise(x.shape, generator=torch.Generator().manual_seed(1))
    flow.eval()
    with torch.no_grad():
        y, log_q = flow.dequantizer(x, dtype=DT, noise=eps)
        torch.testing.assert_close(
            flow.log_prob_bound(x, noise=eps), flow.log_prob(y) - 32 * math.log(K) - log_q, rtol=1e-13, atol=1e-10
        )
    flow.train()
    flow.zero_grad()
    flow.bpd(x, noise=eps).mean().backward()
    # At init only the zero-initialised last layer of each coupling can receive a gradient; it must.
    for coupling in flow.dequantizer.couplings:
        g = coupling.net[-1].weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # Once the couplings are not the identity, every parameter of the dequantizer receives a gradient.
    with torch.no_grad():
        for coupling in flow.dequantizer.couplings:
            coupling.net[-1].weight.normal_(0.0, 0.3)
    flow.zero_grad()
    loss = flow.bpd(x, noise=eps).mean()
    loss.backward()
    for name, p in flow.dequantizer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    # And that gradient is the gradient of the bpd: central differences on one coupling weight.
    p = flow.dequantizer.couplings[0].net[0].weight
    idx = (0, 0, 1, 1)
    h = 1e-5
    flow.eval()
    with torch.no_grad():
        p[idx] += h
        up = flow.bpd(x, noise=eps).mean()
        p[idx] -= 2 * h
        down = flow.bpd(x, noise=eps).mean()
        p[idx] += h
    fd = (up - down) / (2 * h)
    assert abs(fd - p.grad[idx]) <= 1e-4 * abs(fd) + 1e-9, (fd, p.grad[idx])


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"image_shape": [8, 8]}, "image_shape"),
        ({"image_shape": [1, 8, 8, 1]}, "image_shape"),
        ({"image_shape": [1, 6, 8], "blocks_per_scale": [1, 1, 1]}, "image_shape"),
        ({"image_shape": [1, 8, 6], "blocks_per_scale": [1, 1, 1]}, "image_shape"),
        ({"image_shape": [1, 8, 8], "blocks": 2, "formulation": ["monotone", "residual"]}, "formulation"),
        ({"image_shape": [1, 8, 8], "logit_alpha": 0.5}, "logit_alpha"),
        ({"image_shape": [1, 8, 8], "logit_alpha": -0.1}, "logit_alpha"),
        ({"image_shape": [1, 8, 8], "levels": 1}, "levels"),
        ({"image_shape": [1, 8, 8], "blocks_per_scale": [0], "fc_blocks": 0}, "blocks_per_scale"),
        ({"image_shape": [1, 8, 8], "dequantization": "gaussian"}, "dequantization"),
    ],
)
def test_config_validation(changes, field):
    with pytest.raises(ValueError, match=rf"^{field}"):
        FlowConfig(**changes)


def test_config_image_dim_and_divisibility():
    cfg = FlowConfig(image_shape=[3, 8, 4], blocks_per_scale=[1, 1, 1])
    assert cfg.dim == 96 and cfg.is_image
    with pytest.raises(ValueError, match=r"image_shape.*divisible by 2\^\(scales - 1\) = 4"):
        FlowConfig(image_shape=[3, 8, 6], blocks_per_scale=[1, 1, 1])


# ---------------------------------------------------------------------------------------------------------------
# Gradients against finite differences
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implicit_grad", ["backward_solve", "one_step"])
def test_bpd_gradient_matches_finite_differences(implicit_grad):
    """d mean-bpd / d(parameter) and / d(input noise) against central differences (monotone, exact log-det).

    The 2x4x4 image has 32 dimensions per block (above the one-step limit of 16), so ``backward_solve`` is
    the default path; ``one_step`` forces the dense correction.
    """
    flow = tiny_flow(
        "monotone", image_shape=[2, 4, 4], depth=2, growth=4, tol=1e-12, max_iter=1000, implicit_grad=implicit_grad
    )
    x = integer_images((2, 4, 4), 3, seed=14)
    u = torch.rand(x.shape, dtype=DT, generator=torch.Generator().manual_seed(15)) * 0.9 + 0.05

    def mean_bpd(noise):
        return flow.bpd(x, noise=noise).mean()

    noise = u.clone().requires_grad_(True)
    loss = mean_bpd(noise)
    assert flow.logdet_is_exact
    params = {
        "conv block G, first conv": flow.layers[1].net.layers[0].weight,
        "conv block G, concat K": flow.layers[1].net.concat_k,
        "fc block G, first linear": flow.layers[6].net.net.layers[0].weight,
        "actnorm": flow.layers[2].log_scale,
    }
    grads = torch.autograd.grad(loss, [noise, *params.values()])
    h = 1e-5
    with torch.no_grad():
        # Input: a directional derivative along a random direction.
        direction = torch.randn(u.shape, dtype=DT, generator=torch.Generator().manual_seed(16))
        fd = (mean_bpd(u + h * direction) - mean_bpd(u - h * direction)) / (2 * h)
        an = (grads[0] * direction).sum()
        assert abs(fd - an) <= 1e-4 * abs(fd), ("input", fd, an)
        for (name, p), g in zip(params.items(), grads[1:], strict=True):
            idx = tuple(0 for _ in p.shape)
            p[idx] += h
            up = mean_bpd(u)
            p[idx] -= 2 * h
            down = mean_bpd(u)
            p[idx] += h
            fd = (up - down) / (2 * h)
            assert abs(fd) > 1e-6, name
            assert abs(fd - g[idx]) <= 1e-4 * abs(fd), (name, fd, g[idx])
