"""The trainer's flat parameter buffers (``monoflow_core.fused.flat``, ``monoflow_core.flat_adam``).

The reference is the same trainer with the layout switched off (``FLAT.enabled = False``: one tensor per parameter,
torch's Adam step per tensor), which is the code path of every checkpoint written before the layout existed. In
float64 both must give the same losses, gradients, parameters and optimizer state (to rounding: Adam's elementwise
kernels may vectorise a tensor's tail differently), the same checkpoint tensor names, and load each other's
checkpoints. The hazards of views (copies, dtype changes, loading, ``zero_grad``, replaced storage, frozen parameters,
rejected steps, data parallelism) are checked against the same reference.
"""

import copy
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open

from monoflow_core import FlowConfig, build_flow
from monoflow_core.checkpoint import load_checkpoint
from monoflow_core.distributed import DistributedContext
from monoflow_core.flat_adam import FlatAdam
from monoflow_core.fused import SETTINGS, fold, fold_compiled
from monoflow_core.fused.flat import FLAT, FlatParameters
from monoflow_core.training import TrainConfig, Trainer
from monoflow_core.training_step import make_adam

torch.set_num_threads(1)

MODEL = FlowConfig(blocks=3, growth=8)
EXAMPLE = "8gaussians-monotone.safetensors"


@pytest.fixture(autouse=True)
def _flat_setting():
    saved = FLAT.enabled
    yield
    FLAT.enabled = saved


def trainer(flat: bool, model: FlowConfig = MODEL, **changes) -> Trainer:
    FLAT.enabled = flat
    settings = {"batch_size": 64, "dtype": "float64", "eval_every": 0, "concat_learnable_from": None}
    settings.update(changes)
    t = Trainer(model, TrainConfig(**settings))
    FLAT.enabled = True
    return t


def record_gradients(t: Trainer) -> list[list[torch.Tensor]]:
    """Wrap the trainer's guarded optimizer step to keep each step's parameter gradients."""
    seen: list[list[torch.Tensor]] = []
    original = t._guard.step

    def step(index, params_changed):
        seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in t._params])
        return original(index, params_changed)

    t._guard.step = step
    return seen


def assert_same_run(a: Trainer, b: Trainer, rtol: float = 1e-12, atol: float = 1e-14) -> None:
    """Parameters, buffers and the optimizer's per-parameter state agree (to rounding)."""
    sa, sb = a.flow.state_dict(), b.flow.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, entry in ob["state"].items():
        assert oa["state"][i].keys() == entry.keys()
        for key, value in entry.items():
            torch.testing.assert_close(oa["state"][i][key], value, rtol=rtol, atol=atol, msg=f"{i}.{key}")


def storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


# -- the layout --------------------------------------------------------------------------------------------------


def test_the_default_trainer_holds_its_parameters_in_a_few_buffers_under_unchanged_names():
    t = Trainer(FlowConfig(), TrainConfig(eval_every=0))
    flat = t._flat
    assert flat is not None and len(flat.runs) == 1 and not flat.others
    assert [b.name for b in flat.buffers] == ["weight", "bias", "concat"]
    params = list(t.flow.parameters())
    assert len(params) == 90 and sum(len(b.params) for b in flat.buffers) == 90
    homes = {b.data.untyped_storage().data_ptr() for b in flat.buffers}
    assert {p.untyped_storage().data_ptr() for p in params} == homes  # every parameter is a view of a buffer
    assert t.flow.state_dict().keys() == build_flow(FlowConfig()).state_dict().keys()
    assert isinstance(t.optimizer, FlatAdam) and len(t.optimizer.slots()) == 3
    run = flat.runs[0]
    # row j of the weight buffer is block j's weights side by side, as the compiled fold reads them
    nets = run.nets
    expected = torch.cat([lin.weight.detach().reshape(-1) for lin in [*nets[4].layers, nets[4].final]])
    assert torch.equal(run.weight.data[4].detach(), expected)
    assert torch.equal(run.concat.data[7].detach(), nets[7].concat_k.detach())


@pytest.mark.parametrize("kernels", [True, False], ids=["compiled", "pytorch"])
def test_the_fold_reads_the_buffers_inside_a_step_and_only_there(monkeypatch, kernels):
    monkeypatch.setattr(SETTINGS, "use_kernels", kernels)
    module = fold_compiled if kernels else fold
    calls = []
    original = module.active_run

    def spy(nets):
        run = original(nets)
        calls.append(run)
        return run

    monkeypatch.setattr(module, "active_run", spy)
    t = trainer(True)
    t.step()
    assert calls and all(run is not None for run in calls)
    calls.clear()
    x = torch.randn(32, 2, dtype=torch.float64)
    t.flow.log_prob(x).sum().backward()  # outside a step: the parameters' own gradients, as for any module
    assert calls and all(run is None for run in calls)
    assert all(p.grad is not None for p in t.flow.parameters() if p.requires_grad)
    assert all(
        p.grad.untyped_storage().data_ptr() != t._flat.buffers[0].grad.untyped_storage().data_ptr()
        for p in t.flow.parameters()
        if p.grad is not None
    )


# -- the same run as per tensor ------------------------------------------------------------------------------------


CASES = {
    "default, K released at step 2": (MODEL, {"concat_learnable_from": 2}),
    "EMA and clipping": (MODEL, {"ema": 0.9, "grad_clip": 0.05}),
    "i-DenseNet (CLipSwish, residual)": (
        FlowConfig(blocks=3, growth=8, activation="clipswish", formulation="residual"),
        {},
    ),
    "ActNorm between blocks": (FlowConfig(blocks=3, growth=8, actnorm=True), {}),
    "no weight decay": (MODEL, {"weight_decay": 0.0}),
    "two accumulated micro-batches": (MODEL, {"grad_accumulation": 2}),
    "power-iteration spectral norms": (FlowConfig(blocks=3, growth=8, spectral_norm="power"), {}),
}


@pytest.mark.parametrize("kernels", [True, False], ids=["compiled", "pytorch"])
@pytest.mark.parametrize("case", list(CASES))
def test_flat_steps_equal_per_tensor_steps(monkeypatch, case, kernels):
    monkeypatch.setattr(SETTINGS, "use_kernels", kernels)
    model, changes = CASES[case]
    a, b = trainer(True, model, **changes), trainer(False, model, **changes)
    assert a._flat is not None and b._flat is None
    ga, gb = record_gradients(a), record_gradients(b)
    for _ in range(4):
        ma, mb = a.step(), b.step()
        assert not ma.rejected and not mb.rejected
        assert ma.loss == pytest.approx(mb.loss, rel=1e-13, abs=1e-13)
        assert ma.grad_norm == pytest.approx(mb.grad_norm, rel=1e-12)
    for step_a, step_b in zip(ga, gb, strict=True):
        for x, y in zip(step_a, step_b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert_same_run(a, b)
    if a._ema_flow is not None:
        for x, y in zip(a._ema_flow.parameters(), b._ema_flow.parameters(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in a.flow.parameters())  # between steps, as with per-tensor parameters


def test_the_foreach_adam_fallback_steps_buffers_whole_too(monkeypatch):
    real = torch.optim.Adam.__init__

    def no_fused(self, params, *args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("no fused Adam in this build")
        real(self, params, *args, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "__init__", no_fused)
    a, b = trainer(True), trainer(False)
    assert a.optimizer.param_groups[0]["foreach"] and not a.optimizer.param_groups[0]["fused"]
    for _ in range(3):
        a.step()
        b.step()
    assert_same_run(a, b)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_resumes_bit_for_bit_with_unchanged_tensor_names(tmp_path):
    a = trainer(True)
    for _ in range(3):
        a.step()
    path = a.save_checkpoint(tmp_path / "flat.safetensors")
    reference = trainer(False)
    for _ in range(3):
        reference.step()
    ref_path = reference.save_checkpoint(tmp_path / "plain.safetensors")
    with safe_open(str(path), "pt") as f, safe_open(str(ref_path), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for key in sorted(f.keys()):
            assert f.get_slice(key).get_shape() == g.get_slice(key).get_shape(), key
    resumed = Trainer.from_checkpoint(path)
    assert resumed._flat is not None and resumed._flat.intact()
    for _ in range(3):
        assert resumed.step().loss == a.step().loss
    assert_same_run(resumed, a, rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["per-tensor -> flat", "flat -> per-tensor"])
def test_checkpoints_load_across_layouts_with_their_optimizer_state(tmp_path, direction):
    writer_flat = direction.startswith("flat")
    w = trainer(writer_flat, concat_learnable_from=2)
    for _ in range(3):  # K's Adam state starts at step 2: the buffers' counters differ from each other
        w.step()
    path = w.save_checkpoint(tmp_path / "run.safetensors")
    FLAT.enabled = not writer_flat
    resumed = Trainer.from_checkpoint(path)
    FLAT.enabled = True
    assert (resumed._flat is not None) == (not writer_flat)
    assert_same_run(resumed, w, rtol=0, atol=0)  # the state as loaded
    for _ in range(3):
        assert resumed.step().loss == pytest.approx(w.step().loss, rel=1e-13)
    assert_same_run(resumed, w)
    if resumed._flat is not None:  # the loaded per-parameter state became the buffers' moments
        state = resumed.optimizer.state
        slot = resumed.optimizer._slots[0]
        assert all(state[p] is e for p, e in zip(slot.buffer.params, slot.entries, strict=True))


def test_a_shipped_example_loads_into_the_layout_and_trains():
    from monoflow_core.examples import examples_dir

    ckpt = load_checkpoint(examples_dir() / EXAMPLE)
    stored = {k: v.clone() for k, v in ckpt.flow.state_dict().items()}
    t = Trainer(ckpt.model_config, TrainConfig(eval_every=0, batch_size=64), flow=ckpt.flow)
    assert t._flat is not None and t._flat.intact()
    now = t.flow.state_dict()
    assert now.keys() == stored.keys()
    assert all(torch.equal(now[k], stored[k]) for k in stored)  # re-pointing kept every value
    m = t.step()
    assert not m.rejected and m.loss < 3.5


# -- hazards -------------------------------------------------------------------------------------------------------


def test_copies_share_no_storage_with_the_live_flow_and_train_apart():
    t = trainer(True, ema=0.5)
    t.step()
    live = storages(t.flow) | {b.data.untyped_storage().data_ptr() for b in t._flat.buffers}
    twin = copy.deepcopy(t.flow)
    as32 = copy.deepcopy(t.flow).to(torch.float32)
    assert not storages(twin) & live and not storages(as32) & live
    assert not storages(t._ema_flow) & live
    before = [p.detach().clone() for p in twin.parameters()]
    t.step()
    assert all(torch.equal(p, q) for p, q in zip(twin.parameters(), before, strict=True))
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(1.0)
    assert not any(torch.equal(p, q) for p, q in zip(t.flow.parameters(), twin.parameters(), strict=True))


def test_load_state_dict_writes_into_the_buffers():
    a, b = trainer(True), trainer(False)
    donor = trainer(False)
    for _ in range(2):
        donor.step()
    state = donor.state_dict()
    a.load_state_dict(copy.deepcopy(state))
    b.load_state_dict(copy.deepcopy(state))
    assert a._flat.intact()
    for _ in range(2):
        assert a.step().loss == pytest.approx(b.step().loss, rel=1e-13)
    assert_same_run(a, b)


def test_zero_grad_in_any_form_between_and_inside_steps_keeps_the_run(monkeypatch):
    a, b = trainer(True), trainer(False)
    for t in (a, b):
        t.step()
        t.flow.zero_grad()  # torch's default: set_to_none
        t.optimizer.zero_grad(set_to_none=False)
        t.step()
    # a user's zero_grad inside the loss (after the gradients were attached): the parameters' .grad are dropped
    for t in (a, b):
        t.loss_transform = lambda loss, t=t: (t.flow.zero_grad(), loss)[1]
        t.step()
        t.loss_transform = None
        t.step()
    assert_same_run(a, b)


def test_replaced_storage_rebuilds_the_layout_from_the_current_values():
    a, b = trainer(True), trainer(False)
    a.step()
    b.step()
    layout = a._flat
    for t in (a, b):
        lin = t.flow.layers[1].net.layers[0]
        lin.weight.data = lin.weight.data.clone()  # no longer a view of the buffer
    assert not layout.intact()
    a.step()
    b.step()
    assert a._flat is not layout and a._flat.intact()
    a.step()
    b.step()
    assert_same_run(a, b)


def test_parameters_frozen_by_hand_keep_their_values_and_the_rest_trains_as_per_tensor():
    a, b = trainer(True, concat_learnable_from=100), trainer(False, concat_learnable_from=100)
    for t in (a, b):
        t.flow.layers[0].net.concat_k.requires_grad_(True)  # one block's K learnable, the others frozen
        t.flow.layers[2].net.final.bias.requires_grad_(False)
    frozen = a.flow.layers[2].net.final.bias.detach().clone()
    for _ in range(3):
        assert a.step().loss == pytest.approx(b.step().loss, rel=1e-13)
    assert torch.equal(a.flow.layers[2].net.final.bias, frozen)
    assert_same_run(a, b)


def test_a_rejected_step_leaves_the_buffers_and_moments_as_the_per_tensor_run_does():
    a, b = trainer(True, dtype="float32"), trainer(False, dtype="float32")
    for t in (a, b):
        t.step()
        t.set_lr(1e39)  # a float32 update overflows: the step is undone (the guard restores copies of the moments)
        assert t.step().rejected
        t.set_lr(1e-3)
        t.step()
        t.step()
    assert_same_run(a, b, rtol=1e-6, atol=1e-7)
    slot = a.optimizer._slots[0]
    assert all(a.optimizer.state[p] is e for p, e in zip(slot.buffer.params, slot.entries, strict=True))


@dataclass(frozen=True)
class _OneRankAsTwo(DistributedContext):
    """A two-process context whose other process holds the same batch and contributes nothing: the collective
    path's concatenation, reduction and write-back run, and the result is a single process's."""

    rank: int = 0
    world_size: int = 2

    def shard(self, batch):
        return batch

    def all_reduce_sum(self, flat):
        return flat

    def broadcast_module(self, module):
        return None


def test_the_data_parallel_gradient_write_back_keeps_the_buffer_views(monkeypatch):
    monkeypatch.setattr(DistributedContext, "current", classmethod(lambda cls: _OneRankAsTwo()))
    a = trainer(True)
    assert a.dist.active
    attached = []
    original = a._guard.step

    def step(index, params_changed):  # the summed gradients are still in the buffers, seen through the views
        attached.append([b.grads_attached() and bool(b.grad.abs().sum() > 0) for b in a._flat.buffers])
        return original(index, params_changed)

    a._guard.step = step
    monkeypatch.undo()
    b = trainer(False)
    for _ in range(3):
        assert a.step().loss == pytest.approx(b.step().loss, rel=1e-13)
    assert attached == [[True] * len(a._flat.buffers)] * 3
    assert_same_run(a, b)


# -- the optimizer alone -------------------------------------------------------------------------------------------


def test_flat_adam_state_has_torch_adams_layout_and_takes_torch_adams_state():
    torch.manual_seed(0)
    flow = build_flow(MODEL).double()
    twin = copy.deepcopy(flow)
    layout = FlatParameters.of(flow)
    opt = make_adam(flow.parameters(), layout, lr=1e-2, weight_decay=1e-5)
    ref = torch.optim.Adam(twin.parameters(), lr=1e-2, weight_decay=1e-5, fused=True)
    x = torch.randn(40, 2, dtype=torch.float64)

    def step(f, o, flat=None):
        o.zero_grad(set_to_none=True)
        if flat is not None:
            flat.attach()
            with flat.active():
                (-f.log_prob(x).mean()).backward()
        else:
            (-f.log_prob(x).mean()).backward()
        o.step()

    for _ in range(2):
        step(flow, opt, layout)
        step(twin, ref)
    s, r = opt.state_dict(), ref.state_dict()
    assert s["param_groups"] == r["param_groups"]
    for i in r["state"]:
        for key in r["state"][i]:
            assert s["state"][i][key].shape == r["state"][i][key].shape
            assert s["state"][i][key].dtype == r["state"][i][key].dtype
            torch.testing.assert_close(s["state"][i][key], r["state"][i][key], rtol=1e-12, atol=1e-15)
    opt.load_state_dict(copy.deepcopy(r))  # torch's own Adam state, loaded mid-run
    for _ in range(2):
        step(flow, opt, layout)
        step(twin, ref)
    for p, q in zip(flow.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)


def test_the_trainer_runs_the_power_iterations_of_power_mode_layers_only():
    model = FlowConfig(blocks=2, growth=8, spectral_norm="power")
    on, off = trainer(True, model), trainer(True, model, lipschitz_iterations=0)
    before = [lin.u.clone() for lin in on._spectral]
    on.step()
    off.step()
    assert all(not torch.equal(lin.u, u) for lin, u in zip(on._spectral, before, strict=True))
    assert all(torch.equal(lin.u, u) for lin, u in zip(off._spectral, before, strict=True))
    exact = trainer(True)  # exact norms: nothing to refine
    vectors = [lin.u.clone() for lin in exact._spectral]
    exact.step()
    assert all(torch.equal(lin.u, u) for lin, u in zip(exact._spectral, vectors, strict=True))
