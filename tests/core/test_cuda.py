"""The engine on CUDA: the same numbers as on the CPU (float64), exact log-dets, gradients, training, checkpoints.

CI has no GPU, so these tests skip there; they run wherever CUDA is available (e.g. a lent GPU machine:
``python -m pytest tests/core/test_cuda.py``). Each check compares the CUDA result with an independent CPU one or
with a brute-force reference, so a wrong kernel, a device mix-up or a silent CPU fallback would fail them.
"""

import math
import warnings

import pytest
import torch

from monoflow_core import FlowConfig, build_flow
from monoflow_core.checkpoint import load_checkpoint, save_checkpoint
from monoflow_core.nn.activations import ACTIVATIONS, get_activation
from monoflow_core.precision import arithmetic, tf32_mode, tolerance_floor
from monoflow_core.presets import load_preset
from monoflow_core.solvers import SolverWarning
from monoflow_core.training import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DT = torch.float64
TIGHT = {"tol": 1e-13, "max_iter": 200}
FORMULATIONS = ("monotone", "residual", "inverse_residual")


def flow_pair(formulation: str, dim: int = 2, seed: int = 0, **kw):
    """The same float64 flow on the CPU and on CUDA."""
    torch.manual_seed(seed)
    cfg = FlowConfig(dim=dim, blocks=4, depth=3, growth=8, formulation=formulation, **TIGHT, **kw)
    cpu = build_flow(cfg).double()
    gpu = build_flow(cfg).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu


def values_and_grads(flow, x: torch.Tensor):
    x = x.clone().requires_grad_(True)
    lp = flow.log_prob(x)
    params = [p for p in flow.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lp.sum(), [x, *params])
    return lp.detach().cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("fast_path", [True, False])
def test_log_prob_and_gradients_on_cuda_match_the_cpu(formulation, fast_path):
    cpu, gpu = flow_pair(formulation)
    cpu.fast_path = gpu.fast_path = fast_path
    x = torch.randn(64, 2, dtype=DT, generator=torch.Generator().manual_seed(1)) * 2
    lp_c, g_c = values_and_grads(cpu, x)
    lp_g, g_g = values_and_grads(gpu, x.cuda())
    assert next(gpu.parameters()).is_cuda
    assert torch.allclose(lp_c, lp_g, atol=1e-9, rtol=0)
    for a, b in zip(g_c, g_g, strict=True):
        assert torch.allclose(a, b, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_round_trip_and_exact_logdet_on_cuda(formulation):
    _, gpu = flow_pair(formulation, dim=3)
    x = torch.randn(12, 3, dtype=DT, device="cuda")
    with torch.no_grad():
        z, logdet = gpu(x)
        assert float((gpu.inverse(z) - x).abs().max()) <= 1e-8
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda v: gpu(v.unsqueeze(0))[0].squeeze(0), x[i])
        assert abs(float(torch.linalg.slogdet(jac).logabsdet) - float(logdet[i])) <= 1e-8


def test_activations_have_double_backward_on_cuda():
    for name in ACTIVATIONS:
        act = get_activation(name).double().cuda()
        x = torch.randn(6, 3, dtype=DT, device="cuda", requires_grad=True)
        assert torch.autograd.gradgradcheck(lambda v, a=act: a(v), (x,))


def test_training_on_cuda_lowers_the_loss_and_its_checkpoint_loads_on_the_cpu(tmp_path):
    model = FlowConfig(blocks=4, depth=2, growth=16)
    trainer = Trainer(
        model,
        TrainConfig(data="8gaussians", batch_size=500, lr=5e-3, device="cuda", eval_size=2000, test_size=2000, seed=0),
    )
    assert next(trainer.flow.parameters()).is_cuda
    first = [trainer.step().loss for _ in range(5)]
    for _ in range(150):
        last = trainer.step().loss
    assert last < min(first) - 0.3  # nats: it learns on the GPU
    path = save_checkpoint(tmp_path / "cuda.safetensors", trainer)
    loaded = load_checkpoint(path, map_location="cpu")
    x = torch.randn(100, 2, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = trainer.eval_flow.log_prob(x.to("cuda", trainer.eval_flow.dtype)).cpu()
        got = loaded.flow.log_prob(x.to(loaded.flow.dtype))
    assert torch.allclose(expected, got, atol=1e-4)


def test_image_flow_on_cuda_matches_the_cpu():
    cfg = FlowConfig(
        image_shape=[1, 8, 8],
        blocks_per_scale=[1, 1],
        fc_blocks=1,
        depth=1,
        growth=4,
        fc_growth=8,
        actnorm=True,
        spectral_norm="exact",
        logdet="exact",
        levels=17,
        **TIGHT,
    )
    torch.manual_seed(0)
    cpu = build_flow(cfg).double()
    gpu = build_flow(cfg).double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.rand(4, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(2))
    cpu.train()
    gpu.train()
    with torch.no_grad():  # the ActNorms' data-dependent initialisation, on the same batch
        cpu(x)
        gpu(x.cuda())
    cpu.eval()
    gpu.eval()
    with torch.no_grad():
        z_c, l_c = cpu(x)
        z_g, l_g = gpu(x.cuda())
        assert torch.allclose(z_c, z_g.cpu(), atol=1e-9)
        assert torch.allclose(l_c, l_g.cpu(), atol=1e-8)
        assert float((gpu.inverse(z_g) - x.cuda()).abs().max()) <= 1e-8


# -- float32 at PyTorch's default TF32 settings (docs/precision.md) ------------------------------------------------


@pytest.fixture
def torch_default_tf32():
    """PyTorch's default flags: TF32 off in matrix products, on in cuDNN convolutions; restored afterwards."""
    with tf32_mode(False):  # saves and restores the flags around the test
        torch.backends.cudnn.allow_tf32 = True
        yield


def smooth_images(shape, batch, seed):
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(batch, c, h // 4, w // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return (torch.floor(x * 255) + torch.rand(x.shape, generator=g)) / 256


def test_float32_cifar_block_solves_in_few_iterations_at_default_tf32_settings(torch_default_tf32):
    """cuDNN's default TF32 convolutions: the solves aim at TF32's floor and end in a few iterations, without stalls.

    (Before the precision policy they aimed at float32's floor, below TF32's rounding noise, and ran to max_iter.)
    """
    assert arithmetic(torch.float32, "cuda") == "tf32"
    cfg = load_preset("paper-cifar10").model_config(blocks_per_scale=[1, 1, 1], fc_blocks=1)
    torch.manual_seed(0)
    flow = build_flow(cfg).cuda()
    x = smooth_images(cfg.image_shape, 16, seed=1).cuda()
    flow.train()
    with torch.no_grad():
        flow(x)  # ActNorm's data initialisation
    flow.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", SolverWarning)  # no sample may stall or reach the cap
        with torch.no_grad():
            flow(x)
    for block in flow.implicit_blocks():
        stats = block.forward_stats
        assert stats.tol == pytest.approx(tolerance_floor("tf32"))
        assert stats.all_converged and stats.n_stalled == 0
        assert int(stats.iterations.max()) <= 12  # measured with TF32 emulated on the CPU: 3-8


@pytest.mark.parametrize("precision", ["auto", "tf32"])
def test_float32_training_steps_on_cuda_lower_the_loss(torch_default_tf32, precision):
    """float32 image training on CUDA under each precision policy: the loss falls and no solve fails."""
    preset = load_preset("digits-cpu")
    trainer = Trainer(
        preset.model_config(),
        preset.train_config(device="cuda", dtype="float32", eval_every=0, precision=precision, warmup_iterations=5),
    )
    assert trainer.precision.tf32 == (precision == "tf32")
    steps = [trainer.step() for _ in range(40)]
    first = sum(s.loss for s in steps[:5]) / 5
    last = sum(s.loss for s in steps[-5:]) / 5
    assert last < first - 0.2  # bits/dim
    assert sum(s.solver_failed for s in steps) == 0
    assert max(s.solver_iterations_max for s in steps) <= 30
    # Evaluations run in full float32 whatever the training arithmetic.
    result = trainer.evaluate(n=64)
    assert math.isfinite(result.bpd)
