"""Checkpoints: exact round trips, bit-for-bit resumption, atomic writes, and refusal of anything but our format."""

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from monoflow_core import ActNorm, FlowConfig, build_flow
from monoflow_core.checkpoint import (
    FORMAT_TAG,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from monoflow_core.flow import Flow
from monoflow_core.training import TrainConfig, Trainer

torch.set_num_threads(1)


class _Payload:
    """Creates a marker file when unpickled: a stand-in for a checkpoint crafted to run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def make_flow(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = {"blocks": 2, "growth": 8, "actnorm": True, "spectral_norm": "power"}
    settings.update(changes)
    flow = build_flow(FlowConfig(**settings))
    flow.train()
    with torch.no_grad():
        flow(torch.randn(32, 2))  # ActNorm data init: the 'initialized' buffers and weights leave their defaults
    return flow


def test_flow_round_trip_gives_identical_log_densities(tmp_path):
    flow = make_flow()
    path = save_checkpoint(tmp_path / "flow.safetensors", flow, metadata={"note": "hello"})
    ckpt = load_checkpoint(path)
    assert ckpt.train_config is None and ckpt.trainer_state is None
    assert ckpt.model_config == flow.config
    assert ckpt.metadata["format"] == FORMAT_TAG and ckpt.metadata["user"] == {"note": "hello"}
    for (k, a), b in zip(flow.state_dict().items(), ckpt.flow.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k  # incl. spectral u, v and ActNorm 'initialized'
    x = torch.randn(100, 2)
    flow.eval()
    with torch.no_grad():
        assert torch.equal(flow.log_prob(x), ckpt.flow.log_prob(x))
    # float64 flows stay float64.
    ckpt64 = load_checkpoint(save_checkpoint(tmp_path / "flow64.safetensors", flow.double()))
    assert next(ckpt64.flow.parameters()).dtype == torch.float64
    assert read_checkpoint_metadata(path)["model_config"] == flow.config.to_dict()


def test_loading_leaves_the_global_random_stream_alone(tmp_path):
    path = save_checkpoint(tmp_path / "f.safetensors", make_flow())
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_checkpoint(path)
    assert torch.equal(torch.rand(3), expected)


def trainer_for_resume() -> Trainer:
    # The estimator log-det draws from torch's global generator, so this also proves its state is restored.
    model = FlowConfig(blocks=2, growth=8, actnorm=True, logdet="estimator")
    train = TrainConfig(
        batch_size=64, lr=1e-2, ema=0.9, concat_learnable_from=3, eval_every=2, eval_size=300, test_size=500, seed=7
    )
    return Trainer(model, train)


def test_resumed_training_equals_uninterrupted_training_bit_for_bit(tmp_path):
    n = 3
    straight = trainer_for_resume()
    straight.run(2 * n)

    first = trainer_for_resume()
    first.run(n)
    path = first.save_checkpoint(tmp_path / "run.safetensors")
    del first
    resumed = Trainer.from_checkpoint(path)
    assert resumed.step_count == n
    resumed.run(n)

    for (k, a), b in zip(straight.flow.state_dict().items(), resumed.flow.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(straight.eval_flow.parameters(), resumed.eval_flow.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, entry in sa["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, sb["state"][i][key]), (i, key)
    assert [m.loss for m in straight.history] == [m.loss for m in resumed.history]
    assert [e.nll_nats for e in straight.eval_history] == [e.nll_nats for e in resumed.eval_history]
    last = resumed.eval_history[-1]
    assert not last.exact and "(estimate)" in last.describe()  # estimator log-dets are labelled as such
    meta = load_checkpoint(path).metadata
    assert meta["step"] == n and meta["data"] == "8gaussians" and meta["last_step"]["step"] == n - 1


def test_run_checkpoints_periodically_and_the_callback_can_stop_it(tmp_path):
    trainer = Trainer(
        FlowConfig(blocks=1, growth=8), TrainConfig(batch_size=32, eval_every=0, checkpoint_every=2, test_size=100)
    )
    path = tmp_path / "run.safetensors"
    seen = []
    summary = trainer.run(10, callback=lambda m, ev: seen.append((m.step, ev)) or m.step < 2, checkpoint_path=path)
    assert summary.stopped_early and summary.steps_run == 3 and seen == [(0, None), (1, None), (2, None)]
    assert summary.paper_protocol is None
    assert read_checkpoint_metadata(path)["step"] == 3  # the final save after the stop
    resumed = Trainer.resume(path)
    assert resumed.step_count == 3 and len(resumed.history) == 3


def test_interrupted_save_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, make_flow())
    old = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(CheckpointError, match="disk went away") as info:
        save_checkpoint(path, make_flow(blocks=3))
    assert str(path) in str(info.value)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_unwritable_targets_raise_checkpoint_error(tmp_path):
    missing = tmp_path / "no" / "such" / "dir" / "c.safetensors"
    with pytest.raises(CheckpointError, match="does not exist") as info:
        save_checkpoint(missing, make_flow())
    assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError, match="is a directory"):
        save_checkpoint(tmp_path, make_flow())
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path / "c.safetensors", make_flow(), metadata={"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_crafted_to_run_code_is_refused_without_running_it(tmp_path):
    # Control: the payload really does run when unpickled.
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Payload(control)))
    assert control.exists()

    marker = tmp_path / "pwned-marker"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="pickle") as info:
        load_checkpoint(evil)
    assert str(evil) in str(info.value)

    # The same object saved by torch.save (a zip archive holding a pickle).
    evil_pt = tmp_path / "evil.pt"
    torch.save({"flow": _Payload(marker)}, evil_pt)
    assert zipfile.is_zipfile(evil_pt)
    with pytest.raises(CheckpointError, match="zip") as info:
        load_checkpoint(evil_pt)
    assert str(evil_pt) in str(info.value)
    assert not marker.exists()


def test_truncated_empty_random_and_missing_files_give_clear_errors(tmp_path):
    good = save_checkpoint(tmp_path / "good.safetensors", make_flow()).read_bytes()
    cases = {
        "half.safetensors": (good[: len(good) // 2], "truncated"),
        "header.safetensors": (good[:40], "truncated"),
        "empty.safetensors": (b"", "empty or truncated"),
        "random.safetensors": (bytes(range(256)) * 8, "not a safetensors file"),
        "text.safetensors": (b"hello, this is not a checkpoint\n" * 4, "not a safetensors file"),
    }
    for name, (data, problem) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=problem) as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), name
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="directory"):
        load_checkpoint(tmp_path)


def test_foreign_safetensors_files_are_refused(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, foreign, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not a monoflow checkpoint") as info:
        load_checkpoint(foreign)
    assert str(foreign) in str(info.value)
    future = tmp_path / "future.safetensors"
    save_file({"weight": torch.zeros(3)}, future, metadata={"format": "monoflow-checkpoint/99"})
    with pytest.raises(CheckpointError, match="not supported"):
        load_checkpoint(future)
    # Our tag with weights that do not fit the stored configuration.
    meta = read_checkpoint_metadata(save_checkpoint(tmp_path / "ok.safetensors", make_flow()))
    mismatched = tmp_path / "mismatch.safetensors"
    save_file(
        {"flow.layers.0.net.concat_k": torch.zeros(3, 2)},
        mismatched,
        metadata={"format": FORMAT_TAG, "dtype": "float32", "model_config": json.dumps(meta["model_config"])},
    )
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(mismatched)


def test_a_flow_without_config_cannot_be_checkpointed(tmp_path):
    with pytest.raises(CheckpointError, match="FlowConfig"):
        save_checkpoint(tmp_path / "x.safetensors", Flow([ActNorm(2)], (2,)))
