"""Hostile checkpoints: every crafted header gives one CheckpointError naming the file and the field, is refused
before anything real is built or allocated, and the next save removes the temporary files of killed saves.

Files are crafted by rewriting a real checkpoint's safetensors header directly (8-byte little-endian length, JSON
header, tensor bytes).
"""

import json
import math
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from cli_helpers import assert_user_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monoflow_core import FlowConfig, build_flow
from monoflow_core import fileio as fileio_module
from monoflow_core.checkpoint import (
    MAX_HEADER_BYTES,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_metadata,
    save_checkpoint,
)
from monoflow_core.checkpoint import load as checkpoint_load
from monoflow_core.checkpoint import plan as checkpoint_plan
from monoflow_core.checkpoint.header import _ST_NAMES, _Entry
from monoflow_core.fileio import HOST_TAG, atomic_write, remove_stale_temporaries
from monoflow_core.presets import load_preset
from monoflow_core.training import TrainConfig, Trainer

torch.set_num_threads(1)

DOCUMENTS = ("model_config", "train_config", "trainer_state", "metadata")


# --------------------------------------------------------------------------------------------------------------
# crafting files
# --------------------------------------------------------------------------------------------------------------


_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


def split(path):
    """A checkpoint as ``(header dict, {name: tensor bytes})``; ``blobs[None]`` holds the whole data section."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    body = raw[8 + n :]
    blobs = {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
    blobs[None] = body
    return header, blobs


def _nbytes(entry):
    """The bytes an entry's shape and dtype need, or None for a malformed or large entry."""
    try:
        size = math.prod(entry["shape"]) * _ITEMSIZE.get(entry["dtype"], 1)
    except (TypeError, KeyError):
        return None
    return size if isinstance(size, int) and 0 <= size < 2**22 else None


def write(path, header, blobs, *, repack=True):
    """Write ``header`` with the tensors laid out again from their entries' shapes and dtypes (a tensor's own bytes
    where the size still fits, else zeros); without ``repack``, or for an entry that cannot be laid out (a junk or
    huge shape), the original data section and the header's offsets as they are."""
    sizes = {k: _nbytes(v) for k, v in header.items() if k != "__metadata__"}
    body = b""
    if repack and None not in sizes.values() and sum(sizes.values()) < 2**22:
        for name, size in sizes.items():
            blob = blobs.get(name, b"")
            blob = blob if len(blob) == size else bytes(size)
            header[name]["data_offsets"] = [len(body), len(body) + size]
            body += blob
    else:
        body = blobs[None]
    text = json.dumps(header).encode()
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + body)
    return Path(path)


def edit_document(header, name, edit):
    """Apply ``edit(doc)`` to the JSON document stored as metadata entry ``name``."""
    doc = json.loads(header["__metadata__"][name])
    doc = edit(doc) or doc
    header["__metadata__"][name] = json.dumps(doc)


def set_at(path_keys, value):
    def edit(doc):
        target = doc
        for key in path_keys[:-1]:
            target = target[key]
        target[path_keys[-1]] = value

    return edit


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A real resumable checkpoint: 2 blocks, ActNorm, EMA, step and test histories, full Adam state."""
    torch.manual_seed(0)
    trainer = Trainer(
        FlowConfig(blocks=2, growth=8, actnorm=True),
        TrainConfig(batch_size=16, ema=0.9, eval_every=1, eval_size=40, test_size=40, concat_learnable_from=0, seed=3),
    )
    trainer.run(2)
    return trainer.save_checkpoint(tmp_path_factory.mktemp("good") / "run.safetensors", metadata={"note": "hi"})


@pytest.fixture(scope="module")
def image_checkpoint(tmp_path_factory):
    """A flow-only checkpoint of a small multiscale image flow with a variational dequantizer."""
    torch.manual_seed(0)
    flow = build_flow(
        FlowConfig(
            image_shape=[1, 4, 4],
            blocks_per_scale=[1, 1],
            fc_blocks=1,
            growth=4,
            depth=1,
            actnorm=True,
            dequantization="variational",
            vdq_blocks=1,
            vdq_channels=4,
            levels=17,
        )
    )
    return save_checkpoint(tmp_path_factory.mktemp("image") / "image.safetensors", flow)


@pytest.fixture
def builds(monkeypatch):
    """The device of every ``build_flow`` call load_checkpoint makes ('meta' for the shape-only check)."""
    devices = []
    real = checkpoint_load.build_flow

    def spy(config=None):
        devices.append(torch.empty(0).device.type)  # "meta" inside torch.device("meta")
        return real(config)

    # Both builds of load_checkpoint: the shape-only one (checkpoint.plan) and the real one (checkpoint.load).
    monkeypatch.setattr(checkpoint_plan, "build_flow", spy)
    monkeypatch.setattr(checkpoint_load, "build_flow", spy)
    return devices


def refused(path, *words):
    """load_checkpoint(path) raises one CheckpointError naming the file and every one of ``words``."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word in message, (word, message)
    return message


# --------------------------------------------------------------------------------------------------------------
# the shape-only build
# --------------------------------------------------------------------------------------------------------------


def table(state):
    """A state dict as the file's tensor table."""
    return {k: _Entry(_ST_NAMES[v.dtype], tuple(v.shape)) for k, v in state.items()}


FAMILIES = {
    "toy-actnorm-power": FlowConfig(blocks=3, growth=8, actnorm=True, actnorm_input=True, spectral_norm="power"),
    "1d-mixed-mlp-exact": FlowConfig(
        dim=1, blocks=2, formulation=["inverse_residual", "residual"], g="mlp", hidden=[8, 8], spectral_norm="exact"
    ),
    "residual-fixed-concat": FlowConfig(
        blocks=2, formulation="residual", activation="lipswish", learnable_concat=False
    ),
    "image-uniform": FlowConfig(
        image_shape=[1, 8, 8], blocks_per_scale=[1, 1], fc_blocks=1, growth=4, actnorm=True, levels=17
    ),
    "image-factor-out-variational": FlowConfig(
        image_shape=[3, 4, 4],
        blocks_per_scale=[1, 1],
        fc_blocks=0,
        growth=4,
        factor_out=True,
        dequantization="variational",
        vdq_blocks=2,
        vdq_channels=4,
    ),
    "preset-digits-cpu": load_preset("digits-cpu").model_config(),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_meta_build_gives_the_real_flows_names_shapes_dtypes_and_parameter_order(name, tmp_path):
    config = FAMILIES[name]
    real = build_flow(config).to(torch.float64)
    state = real.state_dict()
    plan = checkpoint_plan._flow_plan(tmp_path / "x", config, torch.float64, table(state))
    assert list(plan.tensors) == list(state)
    for key, tensor in state.items():
        assert plan.tensors[key].shape == tuple(tensor.shape), key
        assert plan.tensors[key].dtype == _ST_NAMES[tensor.dtype], key
    assert plan.parameters == [n for n, _ in real.named_parameters()]  # Adam's parameter indices


def test_the_meta_build_allocates_nothing(tmp_path):
    stored = table(build_flow(FlowConfig(blocks=2, growth=8)).state_dict())
    # Real weights of this width would take hundreds of terabytes: the build only succeeds if nothing is allocated.
    plan = checkpoint_plan._flow_plan(tmp_path / "x", FlowConfig(blocks=2, growth=10**7), torch.float32, stored)
    assert plan.tensors["layers.0.net.layers.1.weight"].shape[1] > 10**6


def test_a_layer_count_the_guard_misses_is_stopped_by_the_build_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_plan, "_count_guard", lambda *args: None)
    stored = table(build_flow(FlowConfig(blocks=2)).state_dict())
    with pytest.raises(CheckpointError, match=f"far larger than its {len(stored)} stored tensors"):
        checkpoint_plan._flow_plan(tmp_path / "x", FlowConfig(blocks=10**6), torch.float32, stored)


# --------------------------------------------------------------------------------------------------------------
# hostile headers, one by one
# --------------------------------------------------------------------------------------------------------------


def _doc(name, keys, value):
    return lambda header, blobs: edit_document(header, name, set_at(keys, value))


def _entry(name, **changes):
    def mutate(header, blobs):
        header[name].update(changes)

    return mutate


def _meta(name, value):
    def mutate(header, blobs):
        header["__metadata__"][name] = value

    return mutate


def _drop(prefix):
    def mutate(header, blobs):
        for key in [k for k in header if k.startswith(prefix)]:
            del header[key]

    return mutate


def _zero(name):
    def mutate(header, blobs):
        blobs[name] = bytes(len(blobs[name]))

    return mutate


def _nest(name, depth):
    def mutate(header, blobs):
        header["__metadata__"][name] = "[" * depth + "]" * depth

    return mutate


def _add(name, dtype, shape):
    def mutate(header, blobs):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}

    return mutate


HOSTILE = {
    # the configuration
    "blocks 1e9": (_doc("model_config", ["blocks"], 10**9), ["model_config", "blocks = 1000000000"]),
    "growth 1e7": (_doc("model_config", ["growth"], 10**7), ["do not match", "flow.layers.0.net.layers.0.weight"]),
    "depth 1e6": (_doc("model_config", ["depth"], 10**6), ["model_config", "depth = 1000000"]),
    "dim 1e12": (_doc("model_config", ["dim"], 10**12), ["model_config", "dim"]),
    "blocks a string": (_doc("model_config", ["blocks"], "ten"), ["model_config", "blocks"]),
    "model_config an array": (_meta("model_config", "[1, 2]"), ["model_config", "JSON object"]),
    "model_config an object": (_meta("model_config", {"blocks": 2}), ["'model_config' must be a string"]),
    "model_config missing": (lambda h, b: h["__metadata__"].pop("model_config"), ["'model_config' is missing"]),
    "model_config not JSON": (_meta("model_config", "{blocks"), ["'model_config' is not valid JSON"]),
    "train_config lr a string": (_doc("train_config", ["lr"], "fast"), ["train_config", "lr"]),
    "train_config seed 2**64": (_doc("train_config", ["seed"], 2**64), ["train_config", "seed"]),
    "train_config 3-D data": (_doc("model_config", ["dim"], 3), ["model_config", "dim", "2-D"]),
    "train_config device meta": (_doc("train_config", ["device"], "meta"), ["train_config", "device"]),
    "dtype int": (_meta("dtype", "int64"), ["dtype"]),
    "dtype a number": (_meta("dtype", 32), ["'dtype' must be a string"]),
    "format a list": (_meta("format", ["monoflow-checkpoint/1"]), ["not a monoflow checkpoint"]),
    # the metadata document
    "metadata a list": (_meta("metadata", "[1, 2]"), ["metadata: must be an object"]),
    "metadata step a string": (_doc("metadata", ["step"], "three"), ["metadata: step"]),
    "metadata user a list": (_doc("metadata", ["user"], [1]), ["metadata: user"]),
    "metadata last_step no loss": (_doc("metadata", ["last_step"], {"step": 1}), ["last_step", "loss"]),
    "metadata nested 100000 deep": (_nest("metadata", 100_000), ["'metadata' is not valid JSON"]),
    "metadata nested 40 deep": (_nest("metadata", 40), ["'metadata' nests deeper"]),
    # the training state
    "trainer_state a list": (_meta("trainer_state", "[]"), ["trainer_state: must be an object"]),
    "trainer_state wrong format": (_doc("trainer_state", ["format"], "x/9"), ["trainer_state: format"]),
    "trainer_state step -1": (_doc("trainer_state", ["step"], -1), ["trainer_state: step"]),
    "trainer_state step 1.5": (_doc("trainer_state", ["step"], 1.5), ["trainer_state: step"]),
    "trainer_state base_lr inf": (_doc("trainer_state", ["base_lr"], float("inf")), ["trainer_state: base_lr"]),
    "trainer_state counters": (_doc("trainer_state", ["rejected_total"], "x"), ["trainer_state: rejected_total"]),
    "noise_rng in the JSON": (_doc("trainer_state", ["noise_rng"], [1, 2]), ["trainer_state: noise_rng"]),
    "trainer_state has_ema 1": (_doc("trainer_state", ["has_ema"], 1), ["trainer_state: has_ema"]),
    "stream missing": (
        lambda h, b: edit_document(h, "trainer_state", lambda d: d.pop("stream") and None),
        ["trainer_state: stream"],
    ),
    "stream other data set": (_doc("trainer_state", ["stream", "name"], "moons"), ["trainer_state: stream"]),
    "stream state a string": (_doc("trainer_state", ["stream", "rng", "state"], "x"), ["trainer_state: stream"]),
    "stream state huge": (
        _doc("trainer_state", ["stream", "rng", "state", "state"], 2**200),
        ["trainer_state: stream"],
    ),
    "history a dict": (_doc("trainer_state", ["history"], {}), ["trainer_state: history"]),
    "history record a list": (_doc("trainer_state", ["history", 0], [1]), ["history[0]"]),
    "history loss a string": (_doc("trainer_state", ["history", 0, "loss"], "x"), ["history[0]", "'loss'"]),
    "eval record empty": (_doc("trainer_state", ["eval_history", 0, "nll_nats"], None), ["eval_history[0]"]),
    "param_groups two": (_doc("trainer_state", ["optimizer", "param_groups"], [{}, {}]), ["param_groups"]),
    "params short": (_doc("trainer_state", ["optimizer", "param_groups", 0, "params"], [0]), ["params"]),
    "betas a string": (_doc("trainer_state", ["optimizer", "param_groups", 0, "betas"], "x"), ["betas"]),
    "eps missing": (
        lambda h, b: edit_document(h, "trainer_state", lambda d: d["optimizer"]["param_groups"][0].pop("eps") and None),
        ["param_groups[0].eps"],
    ),
    "capturable": (_doc("trainer_state", ["optimizer", "param_groups", 0, "capturable"], True), ["capturable"]),
    "scalars bad index": (_doc("trainer_state", ["optimizer", "scalars"], {"99": {}}), ["optimizer.scalars"]),
    "scalars bad step": (_doc("trainer_state", ["optimizer", "scalars"], {"1": {"step": "x"}}), ["scalars.1.step"]),
    # the tensors
    "rng.torch too short": (_entry("rng.torch", shape=[100]), ["rng.torch", "U8 [5056]"]),
    "rng.torch float": (_entry("rng.torch", dtype="F32", shape=[1264]), ["rng.torch"]),
    "rng.torch zeros": (_zero("rng.torch"), ["rng.torch", "not a valid generator state"]),
    "rng.torch missing": (_drop("rng.torch"), ["rng.torch"]),
    "rng.noise 2-D": (_entry("rng.noise", shape=[2, 2528]), ["rng.noise"]),
    "rng.cuda wrong size": (_add("rng.cuda", "U8", [3]), ["rng.cuda"]),
    "exp_avg wrong shape": (_entry("optim.state.1.exp_avg", shape=[7]), ["optim.state.1.exp_avg"]),
    "exp_avg wrong dtype": (_entry("optim.state.1.exp_avg", dtype="F64"), ["optim.state.1.exp_avg"]),
    "step a vector": (_entry("optim.state.1.step", shape=[3]), ["optim.state.1.step"]),
    "adam state incomplete": (_drop("optim.state.1.exp_avg_sq"), ["parameter 1", "exp_avg_sq"]),
    "adam index out of range": (_add("optim.state.999.exp_avg", "F32", [0]), ["optim.state.999.exp_avg"]),
    "adam unknown key": (_add("optim.state.1.momentum", "F32", [0]), ["optim.state.1.momentum"]),
    "ema missing": (_drop("ema.layers.0"), ["ema", "missing"]),
    "flow tensor missing": (_drop("flow.layers.1."), ["do not match", "missing"]),
    "flow tensor float64": (_entry("flow.layers.1.bias", dtype="F64"), ["do not match", "flow.layers.1.bias", "F64"]),
    "flow tensor reshaped": (_entry("flow.layers.1.bias", shape=[1, 2]), ["do not match", "flow.layers.1.bias"]),
    "unexpected tensor": (_add("evil", "U8", [0]), ["unexpected tensor 'evil'"]),
    "unknown dtype": (_entry("flow.layers.1.bias", dtype="Q7"), ["flow.layers.1.bias", "dtype"]),
    "shape of strings": (_entry("flow.layers.1.bias", shape=["2"]), ["flow.layers.1.bias", "shape"]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_header_is_refused_before_anything_is_built(name, training_checkpoint, tmp_path, builds):
    mutate, words = HOSTILE[name]
    header, blobs = split(training_checkpoint)
    mutate(header, blobs)
    path = write(tmp_path / "crafted.safetensors", header, blobs)
    refused(path, *words)
    assert "cpu" not in builds  # nothing but the shape-only build on the meta device ran


def test_the_control_loads_after_one_shape_only_build(training_checkpoint, tmp_path, builds):
    header, blobs = split(training_checkpoint)
    path = write(tmp_path / "same.safetensors", header, blobs)  # the crafting itself changes nothing
    ckpt = load_checkpoint(path)
    assert builds == ["meta", "cpu"]
    resumed = Trainer.from_checkpoint(ckpt)
    assert resumed.step_count == 2 and ckpt.metadata["user"] == {"note": "hi"}


def test_a_hostile_image_configuration_is_refused(image_checkpoint, tmp_path, builds):
    for keys, value, words in (
        (["blocks_per_scale"], [10**9, 1], ["blocks_per_scale / fc_blocks"]),
        (["vdq_blocks"], 10**8, ["vdq_blocks"]),
        (["vdq_channels"], 10**7, ["do not match", "dequantizer"]),
        (["image_shape"], [1, 4, 10**9], ["image_shape"]),
        (["image_shape"], [1, 4 * 2**20, 4 * 2**20], ["do not match"]),
    ):
        header, blobs = split(image_checkpoint)
        edit_document(header, "model_config", set_at(keys, value))
        refused(write(tmp_path / "image.safetensors", header, blobs), *words)
    assert "cpu" not in builds


def test_truncation_and_length_fields_are_checked_without_reading_the_data(training_checkpoint, tmp_path):
    header, blobs = split(training_checkpoint)
    start = header["flow.layers.1.bias"]["data_offsets"][0]
    header["flow.layers.1.bias"].update(shape=[10**12], data_offsets=[start, start + 4 * 10**12])
    path = write(tmp_path / "huge.safetensors", header, blobs)  # consistent entry, 4 TB of data claimed
    refused(path, "truncated")
    # A length field beyond the cap, in a (sparse) file long enough to hold it: refused without reading it.
    big = tmp_path / "big-header.safetensors"
    with big.open("wb") as fh:
        fh.write((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{")
        fh.truncate(MAX_HEADER_BYTES + 64)
    refused(big, "header claims")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_or_device_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    refused(fifo, "not a regular file")  # a blocking open would wait here for a writer that never comes
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint_metadata(fifo)
    if Path("/dev/zero").exists():
        refused(Path("/dev/zero"), "not a regular file")


def test_a_save_never_writes_a_header_that_loading_would_refuse(tmp_path):
    flow = build_flow(FlowConfig(blocks=1, growth=4))
    target = tmp_path / "large.safetensors"
    with pytest.raises(CheckpointError, match="header would take") as info:
        save_checkpoint(target, flow, metadata={"blob": "x" * MAX_HEADER_BYTES})
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_read_checkpoint_metadata_checks_the_metadata_too(training_checkpoint, tmp_path):
    header, blobs = split(training_checkpoint)
    header["__metadata__"]["metadata"] = json.dumps({"step": [1]})
    path = write(tmp_path / "meta.safetensors", header, blobs)
    with pytest.raises(CheckpointError, match="metadata: step") as info:
        read_checkpoint_metadata(path)
    assert str(path) in str(info.value)
    good = read_checkpoint_metadata(training_checkpoint)
    assert good["step"] == 2 and good["model_config"]["blocks"] == 2 and good["train_config"]["seed"] == 3


# --------------------------------------------------------------------------------------------------------------
# the fuzz test
# --------------------------------------------------------------------------------------------------------------


def _nested(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE_VALUES = st.one_of(
    st.sampled_from(
        [
            10**9,
            10**7,
            2**63,
            2**64,
            -1,
            0,
            1,
            1.5,
            1e308,
            float("nan"),
            float("inf"),
            True,
            False,
            None,
            "",
            "x",
            "8gaussians",
            [],
            {},
            [0, 1],
            [10**9],
            {"a": 1},
            "NaN",
        ]
    ),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 10**9), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 10**9), max_size=3),
    st.integers(1, 60).map(_nested),
)


def _mutate_document(data, header):
    meta = header["__metadata__"]
    name = data.draw(st.sampled_from([*DOCUMENTS, "dtype", "format"]), label="entry")
    how = data.draw(
        st.sampled_from(["value", "value", "value", "delete", "insert", "entry", "cut", "missing"]), label="how"
    )
    text = meta.get(name)
    if how == "missing":
        meta.pop(name, None)
        return
    if how == "cut" and isinstance(text, str) and text:
        meta[name] = text[: data.draw(st.integers(0, len(text) - 1), label="cut at")]
        return
    try:
        doc = json.loads(text)
    except (TypeError, ValueError):
        how = "entry"  # an earlier mutation left no JSON document here
    if how in ("entry", "cut") or name in ("dtype", "format"):
        meta[name] = data.draw(st.one_of(HOSTILE_VALUES, st.text(max_size=30)), label="entry value")
        return
    parent, key = None, None
    node = doc
    # Walk down from the top, stopping at any level: top-level fields are as likely as nested ones.
    while isinstance(node, dict | list) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys), label="key")
        node = parent[key]
        if not data.draw(st.booleans(), label="deeper"):
            break
    if how == "insert" and isinstance(parent if parent is not None else doc, dict):
        # A key the writer never puts there (a tensor's name, a field of another level), at any level.
        new = data.draw(
            st.sampled_from(
                ["noise_rng", "cuda_rng", "torch_rng", "flow", "ema", "history", "step", "params", "rng", "x"]
            ),
            label="new key",
        )
        (parent if parent is not None else doc)[new] = data.draw(HOSTILE_VALUES, label="value")
    elif parent is None:
        doc = data.draw(HOSTILE_VALUES, label="document")
    elif how == "delete" and isinstance(parent, dict):
        del parent[key]
    else:
        parent[key] = data.draw(HOSTILE_VALUES, label="value")
    meta[name] = json.dumps(doc)


def _mutate_tensor(data, header, blobs):
    names = sorted(k for k in header if k != "__metadata__")
    if not names:
        return True
    name = data.draw(st.sampled_from(names), label="tensor")
    entry = header[name]
    how = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename", "zero"]), label="how")
    if how == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "F64", "BF16", "I64", "U8", "BOOL", "Q7", 3, None]))
    elif how == "shape":
        shape = list(entry["shape"]) if isinstance(entry["shape"], list) else []  # an earlier mutation's junk
        change = data.draw(st.sampled_from(["scale", "append", "drop", "empty", "huge", "junk"]))
        if change == "scale" and shape:
            i = data.draw(st.integers(0, len(shape) - 1))
            shape[i] *= data.draw(st.sampled_from([0, 2, 3, 10**9]))
        elif change == "append":
            shape.append(data.draw(st.sampled_from([1, 2, 10**6])))
        elif change == "drop" and shape:
            shape.pop()
        elif change == "empty":
            shape = []
        elif change == "huge":
            shape = [10**12] * data.draw(st.integers(1, 9))
        else:
            shape = data.draw(HOSTILE_VALUES)
        entry["shape"] = shape
    elif how == "offsets":
        entry["data_offsets"] = data.draw(
            st.one_of(st.lists(st.integers(-(2**65), 2**65), min_size=0, max_size=3), HOSTILE_VALUES)
        )
        return False  # keep the crafted offsets
    elif how == "drop":
        del header[name]
    elif how == "rename":
        header[
            data.draw(
                st.sampled_from(
                    [
                        name + "x",
                        name.replace("flow.", "ema."),
                        name.replace(".1.", ".999."),
                        "optim.state.-1.exp_avg",
                        "rng.other",
                    ]
                )
            )
        ] = header.pop(name)
    else:
        blobs[name] = bytes(len(blobs.get(name, b"")))
    return data.draw(st.booleans(), label="repack")


def _attempt(path):
    """Load (and resume a training state): success or one CheckpointError naming the file, nothing else."""
    try:
        ckpt = load_checkpoint(path)
        if ckpt.trainer_state is not None:
            Trainer.from_checkpoint(ckpt, device="cpu")
    except CheckpointError as err:
        message = str(err)
        assert str(path) in message and len(message) < 2000, message


def _peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def test_fuzzed_headers_give_one_clean_error_and_bounded_memory(
    training_checkpoint, image_checkpoint, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("fuzz")
    originals = {"training": split(training_checkpoint), "image": split(image_checkpoint)}
    before = _peak_rss_bytes()

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data):
        source = data.draw(st.sampled_from(["training", "training", "image"]), label="source")
        header, blobs = json.loads(json.dumps(originals[source][0])), dict(originals[source][1])
        repack = True
        for _ in range(data.draw(st.integers(1, 3), label="mutations")):
            if data.draw(st.booleans(), label="tensor?"):
                repack = _mutate_tensor(data, header, blobs) and repack
            else:
                _mutate_document(data, header)
        # Tensors laid out again (where that stays small) let a mutation reach the content checks.
        path = write(folder / "fuzzed.safetensors", header, blobs, repack=repack)
        _attempt(path)

    fuzz()
    # The peak resident memory of the whole process: a build or allocation the checks let through would show here.
    assert _peak_rss_bytes() - before < 300 * 2**20


# --------------------------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------------------------


def test_every_command_prints_one_error_line_for_a_hostile_checkpoint(training_checkpoint, tmp_path):
    header, blobs = split(training_checkpoint)
    edit_document(header, "model_config", set_at(["blocks"], 10**9))
    bad = write(tmp_path / "blocks.safetensors", header, blobs)
    header, blobs = split(training_checkpoint)
    header["rng.torch"]["shape"] = [64]
    bad_rng = write(tmp_path / "rng.safetensors", header, blobs)
    for argv, path, word in (
        (["eval", bad], bad, "blocks"),
        (["sample", bad, "--n", 10, "--out", tmp_path / "s.npy"], bad, "blocks"),
        (["density", bad, "--out", tmp_path / "d.npy"], bad, "blocks"),
        (["train", "--resume", bad, "--no-progress"], bad, "blocks"),
        (["train", "--resume", bad_rng, "--no-progress"], bad_rng, "rng.torch"),
    ):
        code, _, err = run(argv)
        assert_user_error(code, err, str(path), word)
    assert not (tmp_path / "s.npy").exists() and not (tmp_path / "d.npy").exists()


# --------------------------------------------------------------------------------------------------------------
# temporary files of killed saves
# --------------------------------------------------------------------------------------------------------------


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    dead = _dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
        names = {
            "dead": f".{target.name}.{HOST_TAG}-{dead}.k2j4h6g8.tmp",
            "live": f".{target.name}.{HOST_TAG}-{live.pid}.a1b2c3d4.tmp",
            "other host": f".{target.name}.{other_host}-{dead}.a1b2c3d4.tmp",
            "another file's": f".other.safetensors.{HOST_TAG}-{dead}.a1b2c3d4.tmp",
            "not ours": f".{target.name}.notes.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        removed = remove_stale_temporaries(target)
        assert removed == [tmp_path / names["dead"]]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
        # atomic_write cleans up the same way (here: nothing left to remove) and leaves no file of its own.
        (tmp_path / names["dead"]).write_bytes(b"partial")
        atomic_write(target, b"complete")
        assert target.read_bytes() == b"complete"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [target.name, *(v for k, v in names.items() if k != "dead")]
        )
    finally:
        live.communicate(b"")


def test_the_next_save_removes_the_temporary_file_of_a_killed_save(tmp_path):
    target = tmp_path / "run.safetensors"
    fileio = Path(fileio_module.__file__)
    # A writer killed (SIGKILL) after writing its temporary file, before the rename: nothing can clean up after it.
    script = textwrap.dedent(f"""
        import importlib.util, os, signal
        spec = importlib.util.spec_from_file_location("fileio", {str(fileio)!r})
        fileio = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(fileio)
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
        fileio.atomic_write({str(target)!r}, b"half a checkpoint")
    """)
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(f".{target.name}.{HOST_TAG}-")
    assert not target.exists()
    save_checkpoint(target, build_flow(FlowConfig(blocks=1, growth=4)))
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    load_checkpoint(target)
    assert os.path.getsize(target) > 0
