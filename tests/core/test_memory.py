"""Memory of training: the memory-efficient log-det estimator (unbiased, same gradients as the plain Neumann
estimator), the saved tensors of a CIFAR-shaped block, and the choice of ``--grad-accumulation``."""

import math

import pytest
import torch

from monoflow_core import InverseResidualBlock, MonotoneBlock, ResidualBlock
from monoflow_core.logdet import EstimatorSettings, exact_logdet, neumann_logdet, power_series_logdet
from monoflow_core.memory_plan import (
    SavedTensorMeter,
    plan_grad_accumulation,
    training_bytes_per_image,
)
from monoflow_core.nn import LipschitzMLP
from monoflow_core.nn.conv import ConvDenseNetG
from monoflow_core.presets import load_preset
from monoflow_core.resources import ResourceError

DT = torch.float64
TIGHT = {"tol": 1e-13, "max_iter": 500}
BLOCKS = {"monotone": MonotoneBlock, "residual": ResidualBlock, "inverse_residual": InverseResidualBlock}
GIB = 2**30


def _dense_case(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-sample Jacobian J(theta) = 0.5 tanh(theta) (2 samples, n x n, spectral radius < 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(2, n, n, dtype=DT, generator=gen) / math.sqrt(n)).requires_grad_(True)
    return theta, 0.5 * torch.tanh(theta)


@pytest.mark.parametrize("products", ["vjp", "jvp"])
@pytest.mark.parametrize("kind", ["monotone", "residual", "inverse_residual"])
def test_memory_efficient_estimate_is_unbiased_on_a_dense_case(kind, products):
    # The mean of many training estimates (the memory-efficient path) is within 4 standard errors of the exact
    # log-det, and the mean of their gradients within 5 of the exact gradient; with the series' terms taken by
    # vector-Jacobian products or by forward-mode products (``jvp``: t -> J t).
    theta, jac = _dense_case()
    settings = EstimatorSettings(n_exact_terms=1, roulette="geometric", roulette_param=0.5)
    exact = exact_logdet(jac.detach(), kind)
    exact_grad = torch.autograd.grad(exact_logdet(0.5 * torch.tanh(theta), kind).sum(), theta)[0]
    point = torch.zeros(2, 4, dtype=DT, requires_grad=True)  # the vjp below does not depend on it
    gen = torch.Generator().manual_seed(1)
    values, grads = [], []
    for _ in range(2000):
        j = 0.5 * torch.tanh(theta)

        def vjp(u, create_graph, j=j):
            out = torch.einsum("bi,bij->bj", u, j if create_graph else j.detach())
            return out + 0.0 * point if create_graph else out

        jvp = (lambda t, j=j: torch.einsum("bij,bj->bi", j.detach(), t)) if products == "jvp" else None
        value = neumann_logdet(vjp, point, [theta], kind, settings, attach_to=point, generator=gen, jvp=jvp)
        values.append(value.detach())
        grads.append(torch.autograd.grad(value.sum(), theta)[0])
    v, g = torch.stack(values), torch.stack(grads)
    se = v.std(0) / math.sqrt(v.shape[0])
    assert bool(((v.mean(0) - exact).abs() <= 4 * se + 1e-12).all()), (v.mean(0), exact, se)
    gse = g.std(0) / math.sqrt(g.shape[0])
    assert bool(((g.mean(0) - exact_grad).abs() <= 5 * gse + 1e-12).all())


def test_memory_efficient_gradient_equals_the_graph_keeping_neumann_gradient_for_one_draw():
    # Same seed, same draw: the value and the gradient (for per-sample weights that are not all equal) must equal
    # those of power_series_logdet, which keeps the surrogate's graph.
    theta, _ = _dense_case(n=5, seed=3)
    point = torch.zeros(2, 5, dtype=DT, requires_grad=True)
    settings = EstimatorSettings(n_exact_terms=2, roulette="poisson", roulette_param=2.0, n_probes=2)
    weights = torch.tensor([0.3, -1.7], dtype=DT)

    def vjp(u, create_graph):
        j = 0.5 * torch.tanh(theta)
        return torch.einsum("bi,bij->bj", u, j if create_graph else j.detach())

    results = []
    for efficient in (True, False):
        torch.manual_seed(7)
        if efficient:
            value = neumann_logdet(vjp, point, [theta], "monotone", settings, attach_to=point)
        else:
            value = power_series_logdet(
                vjp, point.shape, "monotone", settings, training=True, dtype=DT, device=point.device
            )
        results.append((value.detach(), torch.autograd.grad((weights * value).sum(), theta)[0]))
    (v1, g1), (v0, g0) = results
    assert torch.allclose(v1, v0, rtol=1e-12, atol=1e-14)
    assert torch.allclose(g1, g0, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("formulation", sorted(BLOCKS))
@pytest.mark.parametrize("implicit_grad", ["one_step", "backward_solve"])
def test_blocks_memory_efficient_gradients_equal_the_graph_keeping_path(formulation, implicit_grad):
    # A G given as an nn.Module takes the memory-efficient path (one graph of G at the point, the series' graph
    # never kept); the same G behind a plain function takes the graph-keeping path. For one draw of the estimator
    # both give the same log-det and the same gradients for the input and every parameter, for unequal weights.
    # Both take vector-Jacobian products here (forward-mode ones give another unbiased gradient of the same draw:
    # tests/core/test_series_products.py).
    torch.manual_seed(0)
    n = 12
    g = LipschitzMLP(n, hidden=[16], activation="clipswish", coeff=0.7).double()
    estimator = EstimatorSettings(products="vjp")
    kwargs = {"logdet": "estimator", "implicit_grad": implicit_grad, "estimator": estimator, **TIGHT}
    fast = BLOCKS[formulation](g, **kwargs)
    plain = BLOCKS[formulation](lambda w: g(w), **kwargs)
    x = torch.randn(3, n, dtype=DT)
    weights = torch.tensor([1.0, -0.4, 2.5], dtype=DT)
    params = list(g.parameters())
    out = []
    for block in (fast, plain):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)
        y, logdet = block(xi)
        loss = (weights * logdet).sum() + (y * y).sum() * 0.1
        out.append((logdet.detach(), torch.autograd.grad(loss, [xi, *params], allow_unused=True)))
    (l1, g1), (l0, g0) = out
    assert torch.allclose(l1, l0, rtol=1e-10, atol=1e-12)
    for a, b in zip(g1, g0, strict=True):
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10), (a - b).abs().max()


def test_saved_tensors_of_a_cifar_shaped_block_are_bounded():
    # One monotone block at scale 1 of paper-cifar10 (3 x 32 x 32, conv DenseNet G of growth 172, CPila), training
    # pass with the power-series log-det. What autograd keeps for backward, parameters and buffers left out, is one
    # graph of G whose activations save their inputs only plus a few copies of the block's input and the folded
    # weights: at most 8 MiB per image plus 4 MiB. Before (two graphs of G at w*, the series' graph with its double
    # backward, CPila saving every intermediate) it was about 100 MiB per image.
    torch.manual_seed(0)
    g = ConvDenseNetG(3, (32, 32), depth=3, growth=172, activation="cpila", coeff=0.98, lip_coeff=0.98)
    block = MonotoneBlock(
        g,
        logdet="estimator",
        tol=1e-4,
        max_iter=60,
        estimator=EstimatorSettings(n_exact_terms=2, roulette="poisson", roulette_param=1.0),
    )
    batch = 2
    x = (torch.rand(batch, 3, 32, 32) - 0.5).requires_grad_(True)
    state = [*g.parameters(), *g.buffers()]
    meter = SavedTensorMeter({t.untyped_storage().data_ptr() for t in state})
    with meter.hooks():
        y, logdet = block(x)
    per_image = 4 * (3 + 175 + 347 + 519 + 3 * 86) * 32 * 32  # one graph of G, float32
    assert meter.live <= batch * 8 * 2**20 + 4 * 2**20, meter.live / 2**20
    assert meter.live >= batch * per_image  # the graph of G at w* is kept (the implicit gradient needs it)
    (y.sum() + logdet.sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert meter.live == 0  # backward freed everything it was given


def test_plan_estimate_matches_a_measured_block():
    # The planner's count of what an image keeps for backward agrees with what autograd keeps, within 30%, for
    # a small image model (digits-cpu: 8 x 8 images, 2 blocks per scale, conv G, one FC block).
    preset = load_preset("digits-cpu")
    model = preset.model_config()
    from monoflow_core.models import build_flow

    torch.manual_seed(0)
    flow = build_flow(model)
    batch = 8
    images = torch.randint(0, model.levels, (batch, *model.image_shape))
    flow.train()
    with torch.no_grad():
        flow.bpd(images)  # ActNorm's data initialisation, as the trainer's first step
    state = [*flow.parameters(), *flow.buffers()]
    measured = []
    for b in (batch // 2, batch):
        meter = SavedTensorMeter({t.untyped_storage().data_ptr() for t in state})
        with meter.hooks():
            loss = flow.bpd(images[:b]).sum()
        measured.append(meter.live)
        del loss
    slope = (measured[1] - measured[0]) / (batch - batch // 2)  # per image, without the batch-independent part
    estimate = training_bytes_per_image(model, 4).kept
    assert 0.7 * estimate <= slope <= 1.3 * estimate, (slope, estimate)


def _cifar(blocks: int, batch: int = 64, **train):
    preset = load_preset("paper-cifar10")
    model = preset.model_config(blocks_per_scale=[blocks] * 3)
    return model, preset.train_config(data="digits", device="cpu", batch_size=batch, **train)


def test_grad_accumulation_plan_with_fake_budgets():
    model, train = _cifar(16)
    per_image = training_bytes_per_image(model, 4).total
    # 16-16-16 at batch 64 fits an 80 GB GPU in one micro-batch.
    plan = plan_grad_accumulation(model, train, 80 * 10**9)
    assert plan.grad_accumulation == 1 and plan.micro_batch == 64 and plan.need <= 0.8 * 80 * 10**9
    # A budget for about 20 images: 4 micro-batches of 16, each fitting.
    budget = int((plan.resident + 20 * per_image) / 0.8)
    small = plan_grad_accumulation(model, train, budget)
    assert small.grad_accumulation == 4 and small.micro_batch == 16
    assert small.need <= 0.8 * budget < small.resident + 32 * per_image
    # The user's own --grad-accumulation is a floor.
    assert plan_grad_accumulation(model, train.replace(grad_accumulation=8), 80 * 10**9).grad_accumulation == 8
    # Not even one image: one clear message with the figures and what to change.
    with pytest.raises(ResourceError, match=r"not even one image per micro-batch fits.*fewer blocks"):
        plan_grad_accumulation(model, train, plan.resident)
    # The estimate grows with the blocks and with the batch's dtype.
    assert training_bytes_per_image(_cifar(1)[0], 4).kept < training_bytes_per_image(model, 4).kept
    assert training_bytes_per_image(model, 8).kept == 2 * training_bytes_per_image(model, 4).kept
    assert training_bytes_per_image(model, 4).kept < 16 * GIB // 64  # batch 64 keeps well under 16 GiB
