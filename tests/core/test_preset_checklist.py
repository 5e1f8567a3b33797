"""A checklist run over every shipped preset (``monoflow_core.presets.list_presets()``), each shrunk to a toy size.

Each preset's model is rebuilt small (:func:`shrunk_config`: fewer blocks, narrow G, small images) but keeps every
choice that makes it the kind of model it is: formulation, activation, G type, spectral mode, solver, tolerance,
log-det mode, estimator settings, ActNorm, logit margin, factor-out, dequantization, levels. Image sides are chosen so
that the log-det mode, solver and implicit-gradient method the blocks resolve to ("auto" depends on the dimension)
are those of the full-size preset, e.g. the power-series estimator for MNIST and CIFAR-10, exact log-dets in
evaluation for the 8x8 digits. Then, per preset:

* ``test_shrunk_config_keeps_the_preset_kind``: the shrunk configuration differs from the preset's only in size
  fields, and its blocks resolve to the same log-det mode (training and evaluation), solver and gradient method;
* ``test_loss_and_gradients_are_finite``: a finite loss and a finite (not all-zero) gradient for every parameter that
  requires one, after one backward pass of the mean negative log-likelihood (vector flows) and of the Trainer's own
  training loss (``Trainer._loss_sum``: NLL for the 2-D densities, MSE for the staircase, bits/dim for images), in
  training mode, in the preset's training dtype (float32 for all shipped ones) and, for the vector flows, in float64;
* ``test_inverse_round_trip``: finite ``z`` and log-dets in evaluation mode, and ``inverse(forward(x))`` returns ``x``
  to a tolerance set by the dtype and the solver's tolerance, in float64 and float32;
* ``test_checkpoint_round_trip``: ``load_checkpoint(save_checkpoint(flow)).flow`` has the same configuration,
  bit-identical weights and buffers, and bit-identical (finite) log-densities;
* ``test_fused_path_matches_generic``: where the shrunk preset is eligible for the fused path
  (``monoflow_core.fused``), values, log-dets, log-densities, gradients and inverses agree with the generic autograd
  path to rounding (on both kernel sets, as tests/core/test_fast.py does); other presets are skipped.

Estimated log-dets (the image presets whose blocks exceed 64 dimensions, and every image preset in training) draw
their probes and roulette lengths from torch's global generator, so comparisons of estimates re-seed it before
each evaluation (see the individual tests).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from monoflow_core import build_flow, fused
from monoflow_core import flow as flow_module
from monoflow_core.blocks import ONE_STEP_MAX_DIM
from monoflow_core.checkpoint import load_checkpoint, save_checkpoint
from monoflow_core.config import FlowConfig
from monoflow_core.data import sample_staircase, sample_toy
from monoflow_core.fused import SETTINGS, fusable_runs
from monoflow_core.logdet import resolve_logdet_mode
from monoflow_core.presets import Preset, list_presets
from monoflow_core.solvers import effective_tolerance, resolve_method
from monoflow_core.training import TrainConfig, Trainer

torch.set_num_threads(1)

PRESETS = list_presets()
PRESETS_BY_NAME = {p.name: p for p in PRESETS}
per_preset = pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])

#: The fields :func:`shrunk_config` may change; every other field must keep the preset's value.
SIZE_FIELDS = frozenset(
    {
        "blocks",
        "depth",
        "growth",
        "hidden",
        "image_shape",
        "blocks_per_scale",
        "fc_blocks",
        "fc_growth",
        "vdq_blocks",
        "vdq_channels",
        "dim",
    }
)
#: Samples per batch: 16 points for the vector flows, 4 images for the image flows.
VECTOR_BATCH, IMAGE_BATCH = 16, 4
#: ``inverse(forward(x))`` may differ from ``x`` by this many times the solver's effective tolerance (relative to
#: the data's scale): each implicit block's solve leaves a relative residual below it, and a few blocks and
#: ActNorms amplify it a little.
ROUND_TRIP_FACTOR = 20.0


# ---------------------------------------------------------------------------------------------------------------
# Shrinking a preset and preparing its flow
# ---------------------------------------------------------------------------------------------------------------


def _resolution(config: FlowConfig, dim: int) -> tuple[str, str, str, str]:
    """What the blocks of a flow with ``dim`` dimensions per block resolve "auto" settings to."""
    grad = config.implicit_grad
    if grad == "auto":
        grad = "one_step" if dim <= ONE_STEP_MAX_DIM else "backward_solve"
    return (
        resolve_logdet_mode(config.logdet, dim, training=True),
        resolve_logdet_mode(config.logdet, dim, training=False),
        resolve_method(config.solver, dim),
        grad,
    )


def shrunk_config(preset: Preset) -> FlowConfig:
    """The preset's model at a toy size, with every choice but the sizes kept (see the module docstring)."""
    full = preset.model_config()
    if full.is_image:
        c, h, w = full.image_shape
        scales = len(full.blocks_per_scale)
        step = 2 ** (scales - 1)  # the squeezes need sides divisible by it
        side = step * math.ceil(8 / step)
        # The smallest side from 8 up whose blocks take the full-size preset's log-det mode, solver and gradient
        # method (e.g. 12x12 for MNIST: 144 > 64 dimensions per block, so "auto" estimates the log-det, as it does for
        # 28x28 images; 8x8 would give it exact log-dets).
        while _resolution(full, c * side * side) != _resolution(full, full.dim) and side < max(h, w):
            side += step
        return full.replace(
            image_shape=[c, min(side, h), min(side, w)],
            blocks_per_scale=[1] * scales,
            fc_blocks=min(full.fc_blocks, 1),
            depth=min(full.depth, 2),
            growth=min(full.growth, 4),
            fc_growth=min(full.fc_growth, 8),
            vdq_blocks=min(full.vdq_blocks, 2),
            vdq_channels=min(full.vdq_channels, 4),
        )
    # A per-block list of formulations stays whole (it is the point of e.g. paper-1d-c).
    blocks = full.blocks if isinstance(full.formulation, list) else min(full.blocks, 2)
    return full.replace(
        blocks=blocks,
        depth=min(full.depth, 3),
        growth=min(full.growth, 8),
        hidden=[min(width, 16) for width in full.hidden[:2]],
    )


def train_config(preset: Preset) -> TrainConfig:
    # The image sets other than the digits need a data folder to validate; nothing is read from it here.
    return preset.train_config(data_dir="unused-by-these-tests")


def make_batch(preset: Preset, flow, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One training batch of the preset's task, as ``Trainer._next_batch`` makes it, in the flow's dtype."""
    task, dtype = train_config(preset).task, flow.dtype
    n = n or (IMAGE_BATCH if task == "image" else VECTOR_BATCH)
    if task == "image":  # random integer images and their dequantization noise
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, flow.levels, (n, *flow.event_shape), generator=g)
        return images, flow.draw_noise(images.shape, generator=g)
    if task == "regression":
        return sample_staircase(n, rng=seed, dtype=dtype)
    return (sample_toy(train_config(preset).data, n, rng=seed, dtype=dtype),)


def data_points(preset: Preset, flow, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The flow's inputs for a batch: dequantized images in (0, 1), or the points x."""
    if train_config(preset).task == "image":
        images, noise = batch
        y, _ = flow.dequantizer(images, dtype=flow.dtype, noise=noise)
        return y
    return batch[0]


def trainer_loss(preset: Preset, flow, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The Trainer's training loss on a batch (its mean over the samples), from ``Trainer._loss_sum`` itself.

    ``_loss_sum`` reads only ``self.task`` and ``self.flow``; a stand-in ``self`` carries them, so the flow under
    test need not be the one a Trainer would build from the full preset.
    """
    stand_in = SimpleNamespace(task=train_config(preset).task, flow=flow)
    return Trainer._loss_sum(stand_in, batch) / batch[0].shape[0]


@functools.cache
def _initialised_state(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    preset = PRESETS_BY_NAME[name]
    torch.manual_seed(0)
    flow = build_flow(shrunk_config(preset)).to(dtype)
    flow.train()
    with torch.no_grad():
        trainer_loss(preset, flow, make_batch(preset, flow, n=8, seed=1000))
    return {k: v.clone() for k, v in flow.state_dict().items()}


def prepared_flow(preset: Preset, dtype: torch.dtype):
    """The shrunk preset's flow in ``dtype`` with its ActNorms initialised as the Trainer does (one no-grad pass of
    the training loss over a first batch), in training mode. The initialised weights are computed once per preset
    and dtype; every call returns a fresh flow holding a copy of them."""
    flow = build_flow(shrunk_config(preset)).to(dtype)
    flow.load_state_dict(_initialised_state(preset.name, dtype))
    return flow.train()


# ---------------------------------------------------------------------------------------------------------------
# The checklist
# ---------------------------------------------------------------------------------------------------------------


def test_presets_are_shipped():
    names = [p.name for p in PRESETS]
    assert len(names) >= 1 and len(set(names)) == len(names), names


def test_image_presets_cap_their_solves_at_the_documented_100_iterations():
    """docs/solvers.md: image blocks need 5-9 forward and 3-5 backward iterations; the image presets cap them at 100
    (11 times the largest count measured), not the 1,000 that serves Picard on the 2-D presets."""
    images = [p for p in PRESETS if p.model_config().image_shape is not None]
    assert {p.name for p in images} >= {"paper-mnist", "paper-cifar10", "paper-imagenet32", "digits-cpu"}
    for p in images:
        assert p.model_config().max_iter == 100, p.name
    assert all(p.model_config().max_iter == 1000 for p in PRESETS if p.name.startswith("paper-toy"))


@per_preset
def test_shrunk_config_keeps_the_preset_kind(preset):
    full, small = preset.model_config(), shrunk_config(preset)
    changed = {k for k, v in small.to_dict().items() if v != full.to_dict()[k]}
    assert changed <= SIZE_FIELDS, changed - SIZE_FIELDS
    assert small.is_image == full.is_image
    assert _resolution(small, small.dim) == _resolution(full, full.dim)
    if small.is_image:
        assert small.image_shape[0] == full.image_shape[0]
        assert len(small.blocks_per_scale) == len(full.blocks_per_scale)
        assert small.dim <= full.dim and sum(small.blocks_per_scale) + small.fc_blocks <= 4
    else:
        assert small.dim == full.dim and small.formulations() == full.formulations()[: small.blocks]


def _loss_cases() -> list:
    """(preset, dtype): every preset in its training dtype; the vector flows also in float64 (the image flows'
    float64 pass would double this file's run time for the same code path)."""
    cases = []
    for p in PRESETS:
        dtypes = [train_config(p).torch_dtype]
        if not p.model_config().is_image and torch.float64 not in dtypes:
            dtypes.append(torch.float64)
        cases += [pytest.param(p, dt, id=f"{p.name}-{str(dt).removeprefix('torch.')}") for dt in dtypes]
    return cases


@pytest.mark.parametrize(("preset", "dtype"), _loss_cases())
def test_loss_and_gradients_are_finite(preset, dtype):
    """Finite losses; after one backward pass of each loss, every parameter that requires a gradient has one, finite,
    and the total is not zero. Losses, each checked alone, in training mode as a training step evaluates them: the
    mean NLL of the points (vector flows), and the Trainer's own loss (the same NLL for the 2-D densities, MSE for the
    staircase, bits/dim of the dequantized images for the image flows)."""
    flow = prepared_flow(preset, dtype)
    batch = make_batch(preset, flow)
    cfg = flow.config
    params = [p for p in flow.parameters() if p.requires_grad]
    names = [n for n, p in flow.named_parameters() if p.requires_grad]
    assert params
    losses = {"Trainer loss": lambda: trainer_loss(preset, flow, batch)}
    if not cfg.is_image:
        losses["mean NLL"] = lambda: -flow.log_prob(batch[0]).mean()
    for what, loss_fn in losses.items():
        torch.manual_seed(1)  # the estimator's draws, where the blocks estimate their log-dets
        loss = loss_fn()
        assert loss.dtype == dtype and torch.isfinite(loss), (what, loss)
        # The blocks ran the log-det mode the full-size preset trains with (exact, or the power-series estimate).
        block_dim = cfg.image_shape[0] * cfg.image_shape[1] * cfg.image_shape[2] if cfg.is_image else cfg.dim
        assert flow.logdet_is_exact == (resolve_logdet_mode(cfg.logdet, block_dim, training=True) == "exact")
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        missing = [n for n, g in zip(names, grads, strict=True) if g is None]
        assert not missing, (what, missing)
        bad = [n for n, g in zip(names, grads, strict=True) if not torch.isfinite(g).all()]
        assert not bad, (what, bad)
        assert sum(float(g.abs().sum()) for g in grads) > 0, what
    # (Finite log-densities in evaluation mode: test_inverse_round_trip and test_checkpoint_round_trip.)


@per_preset
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_inverse_round_trip(preset, dtype):
    """``inverse(forward(x)) == x`` to ``ROUND_TRIP_FACTOR`` times the solver's effective tolerance in ``dtype``
    (the preset's tolerance, raised to 10 machine epsilons), relative to the data's scale; in evaluation mode
    (ActNorms initialised), on the fused path wherever it applies (``Flow.fast_path`` is on by default)."""
    flow = prepared_flow(preset, dtype).eval()
    x = data_points(preset, flow, make_batch(preset, flow, seed=3))
    with torch.no_grad():
        torch.manual_seed(4)
        z, logdet = flow(x)
        assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
        x_back = flow.inverse(z)
    tol = ROUND_TRIP_FACTOR * effective_tolerance(flow.config.tol, dtype) * max(1.0, float(x.abs().max()))
    error = float((x_back - x).abs().max())
    assert error <= tol, (error, tol)


@per_preset
def test_checkpoint_round_trip(preset, tmp_path):
    """A flow saved with ``save_checkpoint`` (in the preset's training dtype, as a training run saves it) loads with
    the same configuration, bit-identical weights and buffers, and bit-identical log-densities. Where the blocks
    estimate their log-dets (the power-series estimator: image presets with more than 64 dimensions per block), both
    flows evaluate with the global generator re-seeded to the same state, so they draw the same probes."""
    flow = prepared_flow(preset, train_config(preset).torch_dtype).eval()
    path = save_checkpoint(tmp_path / f"{preset.name}.safetensors", flow)
    loaded = load_checkpoint(path).flow
    assert loaded.config == flow.config and type(loaded) is type(flow) and not loaded.training
    original, restored = flow.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key, value in original.items():
        assert value.dtype == restored[key].dtype and torch.equal(value, restored[key]), key
    x = data_points(preset, flow, make_batch(preset, flow, seed=5))
    with torch.no_grad():
        torch.manual_seed(6)
        expected = flow.log_prob(x)
        torch.manual_seed(6)
        got = loaded.log_prob(x)
    assert torch.isfinite(expected).all()
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.fixture(params=["compiled", "pytorch"])
def kernels(request, monkeypatch):
    """The fused path on the compiled kernels (monoflow_core.fused.kernels) and on its PyTorch kernels."""
    compiled = request.param == "compiled"
    if compiled and not fused.kernels_ready(torch.float64, wait=True):
        pytest.skip("the compiled kernels are unavailable here")
    monkeypatch.setattr(SETTINGS, "use_kernels", compiled)
    return request.param


def _both_paths(flow, x: torch.Tensor):
    """``(z, logdet, log p, gradients of a random functional w.r.t. x and every parameter)`` from the generic path
    (``fast_path = False``) and from the fused one, as tests/core/test_fast.py compares them."""
    params = [p for p in flow.parameters() if p.requires_grad]
    out = []
    for fast in (False, True):
        flow.fast_path = fast
        xi = x.clone().requires_grad_(True)
        z, logdet = flow(xi)
        g = torch.Generator().manual_seed(7)
        gz = torch.randn(z.shape, generator=g, dtype=x.dtype)
        gl = torch.randn(logdet.shape, generator=g, dtype=x.dtype)
        grads = torch.autograd.grad((z * gz).sum() + (logdet * gl).sum(), [xi, *params], allow_unused=True)
        with torch.no_grad():
            log_p = flow.log_prob(x)
        out.append((z.detach(), logdet.detach(), log_p, grads))
    flow.fast_path = True
    return out


@per_preset
def test_fused_path_matches_generic(preset, kernels, monkeypatch):
    """Eligible presets only: the fused path (float64) gives the generic path's values, log-dets, log-densities and
    gradients (input and parameters) to rounding, and the same inverse; a spy on ``run_fused`` proves it ran."""
    bare = build_flow(shrunk_config(preset))  # (eligibility does not depend on the weights)
    runs = fusable_runs(list(bare.layers), bare.dim) if bare.fast_path else []
    if not runs:
        pytest.skip(f"{preset.name}: no block is eligible for the fused path (fast_path={bare.fast_path})")
    flow = prepared_flow(preset, torch.float64).eval()
    calls: list[tuple[str, int]] = []
    for name in ("run_fused", "fused_inverse_run"):  # flow.py calls them by these names
        real = getattr(flow_module, name)

        def spy(layers, x, real=real, name=name):
            calls.append((name, len(layers)))
            return real(layers, x)

        monkeypatch.setattr(flow_module, name, spy)
    x = data_points(preset, flow, make_batch(preset, flow, n=40, seed=8))
    (z0, l0, p0, g0), (z1, l1, p1, g1) = _both_paths(flow, x)
    # Two fused forwards (the pass with gradients and log_prob), each through every run, and nothing else.
    assert sorted(calls) == sorted([("run_fused", stop - start) for start, stop in runs] * 2), calls
    assert torch.allclose(z1, z0, atol=1e-10, rtol=0)
    assert torch.allclose(l1, l0, atol=1e-10, rtol=0)
    assert torch.allclose(p1, p0, atol=1e-10, rtol=0)
    names = ["input", *(n for n, p in flow.named_parameters() if p.requires_grad)]
    for name, a, b in zip(names, g0, g1, strict=True):
        assert a is not None and b is not None, name
        assert torch.allclose(b, a, atol=1e-9, rtol=1e-9), (name, float((b - a).abs().max()))
    with torch.no_grad():
        flow.fast_path = False
        slow = flow.inverse(z1)
        flow.fast_path = True
        fused = flow.inverse(z1)
    assert [c for c in calls if c[0] == "fused_inverse_run"], "the inverse did not take the fused path"
    assert torch.allclose(fused, slow, atol=1e-10, rtol=0)
    assert float((fused - x).abs().max()) < 1e-9 * max(1.0, math.sqrt(float((x * x).sum(1).max())))
