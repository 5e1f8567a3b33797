"""Data parallelism, gradient accumulation and exact resumption of image runs (``monoflow_core.distributed``).

Everything runs in float64 with exact log-dets and uniform dequantization, so a step has no estimator
randomness: the only random input is the data stream and the dequantization noise, both seeded. A data-parallel
step, a gradient-accumulated step and a single-process step on the same global batch are then the same
computation up to floating-point summation order.

The two-process test starts two plain ``python`` processes with the environment ``torchrun`` would give them
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so it also covers
:func:`~monoflow_core.distributed.init_from_environment` and the gloo (CPU) backend.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import monoflow_core
from monoflow_core import FlowConfig, build_flow
from monoflow_core.data.images import load_image_set
from monoflow_core.distributed import DistributedContext
from monoflow_core.nn.lipschitz import spectral_layers
from monoflow_core.presets import load_preset
from monoflow_core.training import NOISE_SEED_OFFSET, TrainConfig, Trainer

torch.set_num_threads(1)

REPO_ROOT = Path(monoflow_core.__file__).resolve().parent.parent
PARALLEL_TIMEOUT_S = 240


def image_model() -> FlowConfig:
    """A tiny digits flow: 2 scales of 1 monotone block (conv DenseNet, depth 2), ActNorm, exact log-det."""
    return FlowConfig.from_dict(
        {
            **load_preset("digits-cpu").model,
            "blocks_per_scale": [1, 1],
            "fc_blocks": 0,
            "depth": 2,
            "growth": 8,
            "logdet": "exact",
        }
    )


def image_config(**changes) -> TrainConfig:
    settings = {
        "data": "digits",
        "batch_size": 8,
        "eval_size": 16,
        "eval_every": 0,
        "concat_learnable_from": None,
        "dtype": "float64",
        "lr": 3e-3,
    }
    settings.update(changes)
    return TrainConfig(**settings)


def flow_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.flow.state_dict().items()}


def assert_states_close(a, b, atol, what=""):
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, (what, key)
        if x.is_floating_point():
            diff = float((x - y).abs().max()) if x.numel() else 0.0
            assert diff <= atol, f"{what}: {key} differs by {diff:.3g} (tolerance {atol:g})"
        else:
            assert torch.equal(x, y), (what, key)


def assert_states_equal(a, b, what=""):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), (what, key)


def actnorm_keys(state) -> list[str]:
    return [k for k in state if k.endswith((".bias", ".log_scale")) and ".net." not in k]


def power_buffer_keys(trainer: Trainer) -> list[str]:
    """State-dict keys of the power-iteration vectors of the layers in ``"power"`` mode."""
    names = {id(m): n for n, m in trainer.flow.named_modules()}
    keys = []
    for layer in spectral_layers(trainer.flow):
        if layer.mode == "power":
            keys += [f"{names[id(layer)]}.u", f"{names[id(layer)]}.v"]
    return keys


def record_actnorm_init(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Wrap ``trainer._initialize_actnorm`` so the ActNorm parameters right after the data init are kept."""
    recorded: dict[str, torch.Tensor] = {}
    original = trainer._initialize_actnorm

    def wrapped(batch):
        original(batch)
        state = trainer.flow.state_dict()
        for key in actnorm_keys(state):
            recorded[key] = state[key].detach().clone()

    trainer._initialize_actnorm = wrapped
    return recorded


# --------------------------------------------------------------------------------------------------------------
# two processes (gloo) == one process
# --------------------------------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)

    from monoflow_core import FlowConfig, build_flow
    from monoflow_core.distributed import init_from_environment
    from monoflow_core.training import NOISE_SEED_OFFSET, TrainConfig, Trainer

    out_prefix, steps, model_path, digits_path, *train_paths = sys.argv[1:]
    model = FlowConfig.from_json(open(model_path).read())
    # The parent's digits (all 1797 images, exactly what load_digits gives): importing scikit-learn costs
    # seconds per process here, the test is about the training arithmetic.
    import numpy as np

    import monoflow_core.data.images as image_data

    image_data._load_digits = lambda: np.load(digits_path)
    context, device = init_from_environment("cpu")
    assert context.active and context.world_size == 2 and device == "cpu", (context, device)
    for index, train_path in enumerate(train_paths):
        train = TrainConfig.from_json(open(train_path).read())
        flow = None
        if context.rank == 1:
            # Deliberately different starting weights and power-iteration vectors: the trainer must replace
            # them with rank 0's (DistributedContext.broadcast_module).
            torch.manual_seed(12345 + index)
            flow = build_flow(model)
        trainer = Trainer(model, train, flow=flow)
        assert trainer.dist.rank == context.rank and trainer.dist.active
        initial = {"initial." + k: v.detach().clone() for k, v in trainer.flow.state_dict().items()}
        actnorm = {}
        original = trainer._initialize_actnorm

        def wrapped(batch, original=original, trainer=trainer, actnorm=actnorm):
            original(batch)
            for k, v in trainer.flow.state_dict().items():
                if k.endswith((".bias", ".log_scale")) and ".net." not in k:
                    actnorm["actnorm_init." + k] = v.detach().clone()

        trainer._initialize_actnorm = wrapped
        losses = [trainer.step().loss for _ in range(int(steps))]
        final = {"final." + k: v.detach().clone() for k, v in trainer.flow.state_dict().items()}
        tensors = {**initial, **actnorm, **final, "losses": torch.tensor(losses, dtype=torch.float64)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_prefix}{index}.safetensors")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_two_processes(tmp_path: Path, model: FlowConfig, trains: list[TrainConfig], steps: int) -> list[list[dict]]:
    """Train each configuration in turn in two gloo processes; ``result[config][rank]`` is what that rank saved."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    (tmp_path / "model.json").write_text(model.to_json())
    for index, train in enumerate(trains):
        (tmp_path / f"train{index}.json").write_text(train.to_json())
    digits = torch.cat([load_image_set("digits", split).images for split in ("train", "validation", "test")])
    assert digits.shape == (1797, 1, 8, 8)
    np.save(tmp_path / "digits.npy", digits.numpy())
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        }
        if sys.platform.startswith("linux"):
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        args = [
            sys.executable,
            str(script),
            str(tmp_path / f"rank{rank}_"),
            str(steps),
            str(tmp_path / "model.json"),
            str(tmp_path / "digits.npy"),
            *(str(tmp_path / f"train{i}.json") for i in range(len(trains))),
        ]
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + PARALLEL_TIMEOUT_S
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process run did not finish within {PARALLEL_TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} exited with {proc.returncode}:\n{out}"
    return [[load_file(str(tmp_path / f"rank{rank}_{i}.safetensors")) for rank in range(2)] for i in range(len(trains))]


def split(saved: dict, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in saved.items() if k.startswith(prefix)}


#: (global batch, gradient accumulation per process): even shards (4 + 4), and uneven shards (4 + 3) each split
#: into micro-batches (2 + 2 and 2 + 1). One pair of processes trains both, one after the other.
PARALLEL_RUNS = [(8, 1), (7, 2)]


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    model = image_model()
    trains = [image_config(batch_size=b, grad_accumulation=k) for b, k in PARALLEL_RUNS]
    return model, run_two_processes(tmp_path_factory.mktemp("parallel"), model, trains, steps=3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
@pytest.mark.parametrize("run_index", range(len(PARALLEL_RUNS)), ids=[f"batch{b}-accum{k}" for b, k in PARALLEL_RUNS])
def test_two_process_data_parallel_matches_one_process(parallel_results, run_index):
    model, results = parallel_results
    batch_size, _ = PARALLEL_RUNS[run_index]
    r0, r1 = results[run_index]
    steps = int(r0["losses"].numel())

    # The reference: one process, the whole global batch at once.
    single = Trainer(model, image_config(batch_size=batch_size))
    initial = flow_state(single)
    single_actnorm = record_actnorm_init(single)
    single_losses = [single.step().loss for _ in range(steps)]
    final = flow_state(single)

    # Rank 1 started from other weights; the trainer broadcast rank 0's (equal to the single-process start).
    assert_states_equal(split(r0, "initial."), split(r1, "initial."), "initial state across ranks")
    assert_states_equal(split(r0, "initial."), initial, "initial state vs one process")

    # ActNorm's data init used the whole global batch on every rank: identical to the single-process init.
    keys = actnorm_keys(initial)
    assert len(keys) == 4  # bias and log_scale of the two ActNorm2d layers
    an0, an1 = split(r0, "actnorm_init."), split(r1, "actnorm_init.")
    assert sorted(an0) == sorted(an1) == sorted(single_actnorm) == sorted(keys)
    assert_states_equal(an0, an1, "ActNorm init across ranks")
    assert_states_close(an0, single_actnorm, 1e-12, "ActNorm init vs one process")
    assert all(bool(v.abs().max() > 0) for v in an0.values())  # really initialised from data, not the identity

    # Parameters and every buffer (power-iteration vectors, ActNorm flags) agree across ranks, and with the
    # single-process run on the same global batch.
    f0, f1 = split(r0, "final."), split(r1, "final.")
    assert_states_equal(f0, f1, "final state across ranks")
    assert_states_close(f0, final, 1e-10, "final state vs one process")
    assert any(not torch.equal(f0[k], initial[k]) for k in keys)  # the steps did move the parameters
    power = power_buffer_keys(single)
    assert power, "the tiny model should have power-mode spectral layers"
    for key in power:
        assert torch.equal(f0[key], f1[key]), key
        assert not torch.equal(f0[key], initial[key]), f"{key}: power iterations did not run"
    assert all(bool(f0[k]) for k in f0 if k.endswith("initialized"))
    # The loss reported by each rank is the global batch's mean, as in the single-process run.
    assert torch.equal(r0["losses"], r1["losses"])
    assert torch.allclose(r0["losses"], torch.tensor(single_losses, dtype=torch.float64), rtol=0, atol=1e-10)


def test_distributed_context_single_process_is_a_no_op():
    ctx = DistributedContext.current()
    assert not ctx.active and ctx.is_main and ctx.world_size == 1
    batch = torch.arange(6.0)
    assert ctx.shard(batch) is batch
    flat = torch.ones(3)
    assert ctx.all_reduce_sum(flat) is flat and torch.equal(flat, torch.ones(3))
    # Shards of a global batch: contiguous, sizes differ by at most one, together the whole batch.
    parts = [DistributedContext(rank, 3).shard(torch.arange(8)) for rank in range(3)]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]


# --------------------------------------------------------------------------------------------------------------
# gradient accumulation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["image", "density"])
def test_gradient_accumulation_takes_the_same_steps(task, monkeypatch):
    # the batches the loss sees with gradients on: k micro-batches per step, together the whole batch
    seen = []
    loss_sum = Trainer._loss_sum

    def spy(self, batch):
        if torch.is_grad_enabled():
            seen.append(batch[0].shape[0])
        return loss_sum(self, batch)

    monkeypatch.setattr(Trainer, "_loss_sum", spy)
    if task == "image":
        model, make = image_model(), image_config
    else:
        model = FlowConfig(blocks=2, growth=8)

        def make(**changes):
            settings = {
                "data": "8gaussians",
                "batch_size": 64,
                "eval_size": 100,
                "test_size": 100,
                "eval_every": 0,
                "concat_learnable_from": None,
                "dtype": "float64",
                "lr": 3e-3,
            }
            return TrainConfig(**{**settings, **changes})

    states, losses = [], []
    for k in (1, 2):
        trainer = Trainer(model, make(grad_accumulation=k))
        seen.clear()
        losses.append([trainer.step().loss for _ in range(2)])
        states.append(flow_state(trainer))
        size = trainer.train_config.batch_size
        assert len(seen) == 2 * k and sum(seen) == 2 * size and max(seen) - min(seen) <= 1
    assert_states_close(states[0], states[1], 1e-10, f"{task}: grad_accumulation 2 vs 1")
    assert losses[0] == pytest.approx(losses[1], abs=1e-10)
    if task == "image":
        initial = flow_state(Trainer(model, make()))
        assert any(not torch.equal(states[0][k], initial[k]) for k in initial)


def test_gradient_accumulation_must_not_exceed_the_batch():
    with pytest.raises(ValueError, match=r"^grad_accumulation:"):
        image_config(batch_size=4, grad_accumulation=5)
    with pytest.raises(ValueError, match=r"^grad_accumulation:"):
        image_config(grad_accumulation=0)


# --------------------------------------------------------------------------------------------------------------
# exact resumption of an image run
# --------------------------------------------------------------------------------------------------------------


def test_image_run_resumes_bit_for_bit(tmp_path):
    model, train = image_model(), image_config(ema=0.9)
    fresh_noise = torch.Generator().manual_seed(train.seed + NOISE_SEED_OFFSET).get_state()

    first = Trainer(model, train)
    for _ in range(2):
        first.step()
    state = first.state_dict()
    # The dequantization noise generator is part of the state and has advanced.
    assert not torch.equal(state["noise_rng"], fresh_noise)
    path = first.save_checkpoint(tmp_path / "ckpt.safetensors")
    losses = [first.step().loss for _ in range(2)]
    expected = flow_state(first)
    expected_ema = {k: v.clone() for k, v in first.eval_flow.state_dict().items()}
    expected_opt = first.optimizer.state_dict()

    for how in ("state_dict", "checkpoint"):
        if how == "state_dict":
            second = Trainer(model, train.replace())
            second.load_state_dict(state)
        else:
            second = Trainer.from_checkpoint(path)
        assert second.step_count == 2
        assert torch.equal(second.state_dict()["noise_rng"], state["noise_rng"]), how
        assert [second.step().loss for _ in range(2)] == losses, how
        assert_states_equal(flow_state(second), expected, how)
        assert_states_equal(second.eval_flow.state_dict(), expected_ema, f"{how}: EMA weights")
        opt = second.optimizer.state_dict()
        for index, entry in expected_opt["state"].items():
            for key, value in entry.items():
                assert torch.equal(opt["state"][index][key], value), (how, index, key)


def test_resume_without_the_noise_state_would_differ():
    """Control for the test above: restoring everything but the noise generator changes the continuation."""
    model, train = image_model(), image_config()
    first = Trainer(model, train)
    first.step()
    state = first.state_dict()
    expected = first.step().loss
    second = Trainer(model, train.replace())
    second.load_state_dict({k: v for k, v in state.items() if k != "noise_rng"})
    assert second.step().loss != expected


def test_rank_one_flow_is_replaced_only_in_a_parallel_run():
    # Single process: a flow passed in is trained as given (no broadcast happens).
    model = image_model()
    torch.manual_seed(12345)
    flow = build_flow(model)
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    trainer = Trainer(model, image_config(), flow=flow)
    after = trainer.flow.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value.to(after[key].dtype)), key
