"""Hostile inputs to the ``monoflow`` command, and ``monoflow train`` killed with SIGKILL while it saves.

Part 1 runs several hundred malformed inputs through the command line, each as its own subprocess: out-of-range and
garbled flags, presets (broken JSON, hostile values, FIFOs), checkpoints (empty, truncated, corrupted and crafted
safetensors headers, pickles, devices), data files (truncated or lying IDX headers, hostile CIFAR pickles, npz files
that are npy files, folders of broken, huge or special images) and output paths. Each outcome is classified:

* ``one-line error``: a non-zero exit whose last stderr line is the only ``monoflow: error:`` line (what every user
  mistake must give);
* ``accepted``: exit 0 (some odd inputs are legitimate);
* ``traceback``: ``Traceback`` on stderr; ``crash``: killed by a signal; ``hang``: past the per-case timeout;
  ``messy error``: a failure without exactly one final ``monoflow: error:`` line.

Part 2 starts ``monoflow train`` with a checkpoint after every iteration, SIGKILLs it (the moment its temporary
checkpoint file appears, or a random few milliseconds later), and checks after every kill that the checkpoint
still loads and has not gone back in steps; the next kill resumes the same run, so the run folder's lock is taken
over from a killed holder every time.

Children run with an address-space limit (``--memory-limit``, 8 GiB by default) so that a bug cannot take a shared
machine's memory, and the command's own budget (``monoflow_core.resources``) sees that limit.

Usage::

    python benchmarks/hostile_inputs.py                     # all cases and 100 kills; writes results/hostile_inputs.md
    python benchmarks/hostile_inputs.py --kills 0 --only ckpt   # only the checkpoint cases
    python benchmarks/hostile_inputs.py --list              # the cases, without running them
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from monoflow_core import FlowConfig
from monoflow_core.checkpoint import load_checkpoint, read_checkpoint_metadata
from monoflow_core.training import TrainConfig, Trainer

TINY = [
    "--blocks",
    "1",
    "--batch-size",
    "16",
    "--test-size",
    "50",
    "--eval-size",
    "50",
    "--eval-every",
    "0",
    "--iterations",
    "2",
    "--no-progress",
]
IMAGE_TINY = [
    "--preset",
    "digits-cpu",
    "--device",
    "cpu",
    "--iterations",
    "1",
    "--batch-size",
    "4",
    "--test-size",
    "8",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "0",
    "--no-progress",
]
GIB = 1 << 30


@dataclass
class Case:
    """One command line to run; ``expect`` is ``"error"`` (must be refused) or ``"any"`` (may also succeed)."""

    group: str
    name: str
    argv: list[str]
    expect: str = "error"


@dataclass
class Outcome:
    case: Case
    verdict: str
    rc: int | None
    seconds: float
    last_line: str
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# building the hostile files
# --------------------------------------------------------------------------------------------------------------


def _train_base_checkpoint(path: Path) -> None:
    """A real, tiny training checkpoint (2 iterations of a 1-block flow), written in-process."""
    trainer = Trainer(
        FlowConfig(blocks=1, growth=4),
        TrainConfig(iterations=2, batch_size=16, test_size=50, eval_size=50, eval_every=0),
    )
    trainer.run(2)
    trainer.save_checkpoint(path, metadata={"preset": "probe", "description": "hostile_inputs base"})


def _split_safetensors(data: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join_safetensors(header: dict[str, Any] | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def _checkpoint_files(folder: Path, base: Path) -> dict[str, Path]:
    """Every hostile checkpoint, by name."""
    data = base.read_bytes()
    header, body = _split_safetensors(data)
    tensors = [k for k in header if k != "__metadata__"]
    weight = next(k for k in tensors if k.startswith("flow.") and k.endswith("weight"))
    files: dict[str, bytes] = {
        "empty": b"",
        "one-byte": b"\x00",
        "seven-bytes": b"\x01" * 7,
        "length-zero": struct.pack("<Q", 0),
        "length-2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
        "length-beyond-file": _join_safetensors(header, body, length=len(data) * 4),
        "length-short-by-one": _join_safetensors(json.dumps(header).encode(), body, length=len(json.dumps(header)) - 1),
        "header-not-json": _join_safetensors(b"this is not json at all" + b" " * 9, body),
        "header-list": _join_safetensors(b"[1, 2, 3]", b""),
        "header-empty-object": _join_safetensors(b"{}", b""),
        "header-invalid-utf8": _join_safetensors(b'{"\xff\xfe": 1}', b""),
        "header-deep-nesting": _join_safetensors(b"[" * 100_000 + b"]" * 100_000, b""),
        "random-bytes": random.Random(0).randbytes(4096),
        "truncated-10pct": data[: len(data) // 10],
        "truncated-50pct": data[: len(data) // 2],
        "truncated-99pct": data[: len(data) * 99 // 100],
        "truncated-header": data[:20],
        "zip-file": b"PK\x05\x06" + b"\x00" * 18,
        "pickle": pickle.dumps({"flow": [1, 2, 3]}),
        "gzip": gzip.compress(data),
    }

    def variant(name: str, change: Any) -> None:
        h = json.loads(json.dumps(header))
        change(h)
        files[name] = _join_safetensors(h, body)

    def set_meta(key: str, value: Any) -> Any:
        return lambda h: h["__metadata__"].__setitem__(key, value)

    def set_model(**changes: Any) -> Any:
        def apply(h: dict[str, Any]) -> None:
            model = json.loads(h["__metadata__"]["model_config"])
            model.update(changes)
            h["__metadata__"]["model_config"] = json.dumps(model)

        return apply

    def set_train(**changes: Any) -> Any:
        def apply(h: dict[str, Any]) -> None:
            train = json.loads(h["__metadata__"]["train_config"])
            train.update(changes)
            h["__metadata__"]["train_config"] = json.dumps(train)

        return apply

    variant("no-metadata", lambda h: h.pop("__metadata__"))
    variant("no-format-tag", lambda h: h["__metadata__"].pop("format"))
    variant("format-tag-future", set_meta("format", "monoflow-checkpoint/99"))
    variant("format-tag-other", set_meta("format", "something-else"))
    variant("model-config-not-json", set_meta("model_config", "{not json"))
    variant("model-config-list", set_meta("model_config", "[1, 2]"))
    variant("model-config-missing", lambda h: h["__metadata__"].pop("model_config"))
    variant("model-blocks-1e9", set_model(blocks=10**9))
    variant("model-dim-1e8", set_model(dim=10**8))
    variant("model-growth-1e9", set_model(growth=10**9))
    variant("model-image-1e5-square", set_model(image_shape=[3, 100_000, 100_000]))
    variant("model-unknown-field", set_model(warp_drive=True))
    variant("model-lipschitz-2", set_model(lipschitz=2.0))
    variant("train-config-not-json", set_meta("train_config", "]["))
    variant("train-seed-2**70", set_train(seed=2**70))
    variant("train-test-seed-2**70", set_train(test_seed=2**70))
    variant("train-test-size-1e11", set_train(test_size=10**11))
    variant("train-data-unknown", set_train(data="nosuchdata"))
    variant("train-iterations-negative", set_train(iterations=-5))
    variant("trainer-state-garbage", set_meta("trainer_state", '{"step": "many"}'))
    variant("trainer-state-not-json", set_meta("trainer_state", "{"))
    variant("metadata-json-nan", set_meta("metadata", '{"step": NaN}'))
    variant("metadata-value-not-string", set_meta("metadata", 5))
    variant("tensor-shape-wrong", lambda h: h[weight].__setitem__("shape", [1, 1]))
    variant("tensor-shape-huge", lambda h: h[weight].__setitem__("shape", [2**31, 2**31]))
    variant("tensor-shape-negative", lambda h: h[weight].__setitem__("shape", [-1, 4]))
    variant("tensor-dtype-f64", lambda h: h[weight].__setitem__("dtype", "F64"))
    variant("tensor-dtype-unknown", lambda h: h[weight].__setitem__("dtype", "Q7"))
    variant("tensor-offsets-beyond", lambda h: h[weight].__setitem__("data_offsets", [0, 10**12]))
    variant(
        "tensor-offsets-reversed",
        lambda h: h[weight].__setitem__("data_offsets", list(reversed(h[weight]["data_offsets"]))),
    )
    variant("tensor-missing", lambda h: h.pop(weight))
    variant(
        "tensor-extra", lambda h: h.__setitem__("flow.extra", {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]})
    )
    # Weights of NaN: a well-formed file whose flow can only produce NaN.
    nan_body = bytearray(body)
    start, stop = header[weight]["data_offsets"]
    nan_body[start:stop] = np.full((stop - start) // 4, np.nan, dtype=np.float32).tobytes()
    files["nan-weights"] = _join_safetensors(header, bytes(nan_body))
    out: dict[str, Path] = {}
    for name, payload in files.items():
        p = folder / f"{name}.safetensors"
        p.write_bytes(payload)
        out[name] = p
    special = {
        "directory": folder / "dir.safetensors",
        "fifo": folder / "fifo.safetensors",
        "dangling-symlink": folder / "dangling.safetensors",
        "symlink-loop": folder / "loop.safetensors",
    }
    special["directory"].mkdir()
    os.mkfifo(special["fifo"])
    os.symlink(folder / "nowhere.safetensors", special["dangling-symlink"])
    os.symlink(special["symlink-loop"], special["symlink-loop"])
    out.update(special)
    out["dev-zero"] = Path("/dev/zero")
    out["missing"] = folder / "missing.safetensors"
    return out


def _preset_files(folder: Path) -> dict[str, Path]:
    small = {"blocks": 1, "growth": 4}
    train = {"data": "8gaussians", "iterations": 1, "batch_size": 16, "test_size": 50, "eval_size": 50, "eval_every": 0}
    texts: dict[str, str | bytes] = {
        "empty": "",
        "null": "null",
        "list": "[]",
        "empty-object": "{}",
        "model-not-object": json.dumps({"model": 1, "training": {}}),
        "broken-json": '{"model": {"blocks": 1,}',
        "deep-nesting": "[" * 100_000 + "]" * 100_000,
        "deep-nesting-in-model": json.dumps({"model": {"x": 0}, "training": train}).replace(
            '{"x": 0}', "[" * 50 + "0" + "]" * 50
        ),
        "utf16": json.dumps({"model": small, "training": train}).encode("utf-16"),
        "binary": bytes(range(256)) * 4,
        "blocks-string": json.dumps({"model": {"blocks": "ten"}, "training": train}),
        "blocks-negative": json.dumps({"model": {"blocks": -1}, "training": train}),
        "blocks-float": json.dumps({"model": {"blocks": 2.5}, "training": train}),
        "blocks-1e9": json.dumps({"model": {"blocks": 10**9}, "training": train}),
        "blocks-bool": json.dumps({"model": {"blocks": True}, "training": train}),
        "growth-1e8": json.dumps({"model": {"blocks": 1, "growth": 10**8}, "training": train}),
        "batch-1e11": json.dumps({"model": small, "training": {**train, "batch_size": 10**11}}),
        "eval-size-1e11": json.dumps({"model": small, "training": {**train, "eval_size": 10**11, "eval_every": 1}}),
        "test-size-1e11": json.dumps({"model": small, "training": {**train, "test_size": 10**11}}),
        "seed-2**70": json.dumps({"model": small, "training": {**train, "seed": 2**70}}),
        "seed-negative": json.dumps({"model": small, "training": {**train, "seed": -1}}),
        "lr-infinite": json.dumps({"model": small, "training": {**train, "lr": 1e400}}),
        "lr-nan": '{"model": {"blocks": 1}, "training": {"data": "8gaussians", "lr": NaN}}',
        "tol-zero": json.dumps({"model": {**small, "tol": 0}, "training": train}),
        "activation-unknown": json.dumps({"model": {**small, "activation": "sigmoid"}, "training": train}),
        "formulation-list-length": json.dumps({"model": {**small, "formulation": ["monotone"] * 3}, "training": train}),
        "unknown-model-field": json.dumps({"model": {**small, "warp": 9}, "training": train}),
        "unknown-training-field": json.dumps({"model": small, "training": {**train, "warp": 9}}),
        "data-unknown": json.dumps({"model": small, "training": {**train, "data": "nosuch"}}),
        "device-bogus": json.dumps({"model": small, "training": {**train, "device": "tpu:7"}}),
        "dtype-bogus": json.dumps({"model": small, "training": {**train, "dtype": "float8"}}),
        "dim-3-for-2d": json.dumps({"model": {**small, "dim": 3}, "training": train}),
        "image-preset-for-toy": json.dumps({"model": {**small, "image_shape": [1, 8, 8]}, "training": train}),
        "valid-tiny": json.dumps({"name": "tiny", "model": small, "training": train}),
    }
    out: dict[str, Path] = {}
    for name, text in texts.items():
        p = folder / f"{name}.json"
        if isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
        out[name] = p
    (folder / "dir.json").mkdir()
    out["directory"] = folder / "dir.json"
    os.mkfifo(folder / "fifo.json")
    out["fifo"] = folder / "fifo.json"
    os.symlink(folder / "loop.json", folder / "loop.json")
    out["symlink-loop"] = folder / "loop.json"
    return out


def _idx(n: int, rows: int, cols: int, magic: int = 0x00000803, pixels: bytes | None = None) -> bytes:
    head = struct.pack(">IIII", magic, n, rows, cols)
    return head + (bytes(n * rows * cols) if pixels is None else pixels)


def _png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _png_with_ihdr(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but holds almost no data (a crafted header)."""
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _data_dirs(folder: Path) -> list[tuple[str, str, Path]]:
    """``(name, --data, --data-dir)`` of every hostile data folder."""
    out: list[tuple[str, str, Path]] = []

    def make(name: str, data: str, files: dict[str, bytes | None]) -> None:
        d = folder / name
        d.mkdir(parents=True)
        for rel, payload in files.items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if payload is None:
                os.mkfifo(p)
            else:
                p.write_bytes(payload)
        out.append((name, data, d))

    good_test = _idx(10, 28, 28)
    make("mnist-empty-folder", "mnist", {})
    make(
        "mnist-truncated",
        "mnist",
        {"train-images-idx3-ubyte": _idx(100, 28, 28)[:5000], "t10k-images-idx3-ubyte": good_test},
    )
    make(
        "mnist-bad-magic",
        "mnist",
        {"train-images-idx3-ubyte": _idx(10, 28, 28, magic=0x801), "t10k-images-idx3-ubyte": good_test},
    )
    make(
        "mnist-header-1e9-images",
        "mnist",
        {"train-images-idx3-ubyte": _idx(10**9, 28, 28, pixels=b"\x00" * 100), "t10k-images-idx3-ubyte": good_test},
    )
    make(
        "mnist-header-65535-square",
        "mnist",
        {"train-images-idx3-ubyte": _idx(1, 65535, 65535, pixels=b""), "t10k-images-idx3-ubyte": good_test},
    )
    make("mnist-zero-dims", "mnist", {"train-images-idx3-ubyte": _idx(0, 0, 0), "t10k-images-idx3-ubyte": good_test})
    make(
        "mnist-gzip-corrupt",
        "mnist",
        {"train-images-idx3-ubyte.gz": b"\x1f\x8b" + b"\x00" * 50, "t10k-images-idx3-ubyte": good_test},
    )
    make(
        "mnist-gzip-truncated",
        "mnist",
        {"train-images-idx3-ubyte.gz": _half(gzip.compress(_idx(50, 28, 28))), "t10k-images-idx3-ubyte": good_test},
    )
    make("mnist-fifo", "mnist", {"train-images-idx3-ubyte": None, "t10k-images-idx3-ubyte": good_test})

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned > /tmp/monoflow-hostile-pwned",))

    batch = {b"data": np.zeros((10, 3072), dtype=np.uint8)}
    cifar_ok = pickle.dumps(batch, protocol=2)
    make(
        "cifar-evil-pickle",
        "cifar10",
        {
            "data_batch_1": pickle.dumps(Evil()),
            **{f"data_batch_{k}": cifar_ok for k in range(2, 6)},
            "test_batch": cifar_ok,
        },
    )
    make(
        "cifar-list-pickle",
        "cifar10",
        {**{f"data_batch_{k}": pickle.dumps([1, 2]) for k in range(1, 6)}, "test_batch": cifar_ok},
    )
    make(
        "cifar-wrong-shape",
        "cifar10",
        {
            **{f"data_batch_{k}": pickle.dumps({b"data": np.zeros((4, 7), np.uint8)}) for k in range(1, 6)},
            "test_batch": cifar_ok,
        },
    )
    make(
        "cifar-truncated",
        "cifar10",
        {**{f"data_batch_{k}": cifar_ok[: len(cifar_ok) // 2] for k in range(1, 6)}, "test_batch": cifar_ok},
    )
    make("cifar-missing-batches", "cifar10", {"data_batch_1": cifar_ok, "test_batch": cifar_ok})

    def npz(**arrays: np.ndarray) -> bytes:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def npy(array: np.ndarray) -> bytes:
        import io

        buf = io.BytesIO()
        np.save(buf, array)
        return buf.getvalue()

    good_npz = npz(data=np.zeros((8, 3072), np.uint8))
    make(
        "imagenet-npy-as-npz",
        "imagenet32",
        {"train_data_batch_1.npz": npy(np.zeros((8, 3072), np.uint8)), "val_data.npz": good_npz},
    )
    make(
        "imagenet-zip-garbage",
        "imagenet32",
        {"train_data_batch_1.npz": b"PK\x03\x04" + b"\x00" * 100, "val_data.npz": good_npz},
    )
    make(
        "imagenet-no-data-array",
        "imagenet32",
        {"train_data_batch_1.npz": npz(labels=np.zeros(8)), "val_data.npz": good_npz},
    )
    make(
        "imagenet-float-data",
        "imagenet32",
        {"train_data_batch_1.npz": npz(data=np.zeros((8, 3072))), "val_data.npz": good_npz},
    )
    make(
        "imagenet-64-rows-for-32",
        "imagenet32",
        {"train_data_batch_1.npz": npz(data=np.zeros((2, 12288), np.uint8)), "val_data.npz": good_npz},
    )
    make(
        "imagenet-object-array",
        "imagenet32",
        {"train_data_batch_1.npz": npz(data=np.array([{"a": 1}], dtype=object)), "val_data.npz": good_npz},
    )
    make(
        "imagenet-truncated",
        "imagenet32",
        {"train_data_batch_1.npz": good_npz[: len(good_npz) // 2], "val_data.npz": good_npz},
    )
    make(
        "imagenet-duplicate-batch",
        "imagenet32",
        {"train_data_batch_1.npz": good_npz, "sub/train_data_batch_1.npz": good_npz, "val_data.npz": good_npz},
    )

    png8 = _png_bytes((8, 8))
    make("folder-empty", "folder", {})
    make("folder-text-as-png", "folder", {"a.png": b"hello, I am not a picture", "b.png": png8})
    make("folder-truncated-png", "folder", {"a.png": png8[: len(png8) // 2], "b.png": png8})
    make("folder-16-bit", "folder", {"a.png": _png_bytes((8, 8), "I;16"), "b.png": png8})
    make("folder-mixed-sizes", "folder", {"a.png": png8, "b.png": _png_bytes((16, 8))})
    make("folder-crafted-huge-header", "folder", {"a.png": _png_with_ihdr(100_000, 100_000), "b.png": png8})
    make("folder-large-photos", "folder", {f"p{i}.png": _png_bytes((4000, 3000)) for i in range(3)})
    make("folder-crafted-20000-square", "folder", {f"p{i}.png": _png_with_ihdr(20_000, 20_000) for i in range(2)})
    make("folder-fifo-png", "folder", {"a.png": None, "b.png": png8})
    make("folder-1x1-images", "folder", {"a.png": _png_bytes((1, 1)), "b.png": _png_bytes((1, 1))})
    make("folder-garbage-jpeg", "folder", {"a.jpg": b"\xff\xd8\xff\xe0" + b"\x00" * 40, "b.png": png8})
    make("folder-train-empty-split", "folder", {"train/.keep": b"", "test/a.png": png8})
    return out


# --------------------------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------------------------


def build_cases(work: Path) -> list[Case]:
    """Every hostile command line, with the files they need written under ``work``."""
    ckpt_dir, preset_dir, data_dir, out_dir = (work / d for d in ("ckpt", "presets", "data", "out"))
    for d in (ckpt_dir, preset_dir, data_dir, out_dir):
        d.mkdir(parents=True)
    base = ckpt_dir / "base.safetensors"
    _train_base_checkpoint(base)
    cases: list[Case] = []
    counter = [0]

    def fresh(name: str = "run") -> str:
        counter[0] += 1
        return str(out_dir / f"{name}{counter[0]}")

    def add(group: str, name: str, argv: list[Any], expect: str = "error") -> None:
        cases.append(Case(group, name, [str(a) for a in argv], expect))

    # -- flags
    big = str(10**11)
    int_flags = {
        "--iterations": ["0", "-1", "1e3", "2.5", "", " ", "abc", "0x10", "nan"],
        "--batch-size": ["0", "-3", big, "1e11", "9" * 40],
        "--blocks": ["0", str(10**9), str(10**18), "-1", "ten"],
        "--eval-size": ["0", big],
        "--test-size": ["0", big, "9" * 30],
        "--eval-every": ["-1", "x"],
        "--checkpoint-every": ["-5"],
        "--grad-accumulation": ["0", "100000"],
        "--seed": ["-1", str(2**64), str(2**63), "1.5", "9" * 50],
        "--threads": ["0", "100000", str(2**31), "-2"],
    }
    for flag, values in int_flags.items():
        for value in values:
            add(
                "flags",
                f"train {flag} {value[:20]!r}",
                ["train", "--data", "8gaussians", *TINY, flag, value, "--out", fresh()],
            )
    float_flags = {
        "--lr": ["nan", "inf", "-1", "0", "1e400", "abc"],
        "--lipschitz": ["0", "1", "1.5", "nan", "-inf"],
        "--tol": ["0", "1", "nan", "-1e-3"],
    }
    for flag, values in float_flags.items():
        for value in values:
            add(
                "flags",
                f"train {flag} {value}",
                ["train", "--data", "8gaussians", *TINY, flag, value, "--out", fresh()],
            )
    for argv, name in (
        (["train", "--data", "nosuch", "--out", fresh()], "unknown --data"),
        (["train", "--data", "8gaussians"], "no --out"),
        (["train", "--data", "8gaussians", *TINY, "--out", ""], "--out empty"),
        (["train", "--data", "8gaussians", *TINY, "--out", "   "], "--out blank"),
        (["train", "--data", "8gaussians", *TINY, "--out", base], "--out is a file"),
        (["train", "--data", "8gaussians", *TINY, "--out", "/proc/monoflow"], "--out under /proc"),
        (["train", "--data", "8gaussians", *TINY, "--out", str(out_dir / ("x" * 300))], "--out name too long"),
        (["train", "--data", "8gaussians", *TINY, "--formulation", ",", "--out", fresh()], "--formulation ','"),
        (
            ["train", "--data", "8gaussians", *TINY, "--formulation", "monotone,residual", "--out", fresh()],
            "--formulation list length",
        ),
        (["train", "--data", "8gaussians", *TINY, "--activation", "sigmoid", "--out", fresh()], "--activation"),
        (["train", "--data", "8gaussians", *TINY, "--solver", "magic", "--out", fresh()], "--solver"),
        (["train", "--data", "8gaussians", *TINY, "--device", "tpu", "--out", fresh()], "--device tpu"),
        (["train", "--data", "8gaussians", *TINY, "--device", "cuda:99", "--out", fresh()], "--device cuda:99"),
        (
            ["train", "--data", "staircase", *TINY, "--test-size", "50", "--eval-size", "60", "--out", fresh()],
            "staircase test/eval sizes differ",
        ),
        (["train", "--data", "mnist", *TINY, "--out", fresh()], "mnist without --data-dir"),
        (["train", "--data", "mnist", "--data-dir", "", *TINY, "--out", fresh()], "--data-dir empty"),
        (["train", "--data", "mnist", "--data-dir", base, *TINY, "--out", fresh()], "--data-dir is a file"),
        (["train", "--resume", "", "--iterations", "5"], "--resume empty"),
        (["train", "--resume", base, "--iterations", "5", "--blocks", "3"], "--resume changing --blocks"),
        (["train", "--resume", base, "--iterations", "5", "--out", ""], "--resume --out empty"),
        (["train", "--resume", base, "--iterations", "1", "--out", fresh("noop")], "no-op resume (may succeed)"),
        (["eval", base, "--split", "validation"], "eval --split on a toy checkpoint"),
        (["eval", base, "--test-size", big], "eval --test-size 1e11"),
        (["eval", base, "--test-size", "0"], "eval --test-size 0"),
        (["eval", base, "--seed", str(2**64)], "eval --seed 2**64"),
        (["eval", base, "--data", "nosuch"], "eval --data unknown"),
        (["eval", base, "--data", "staircase"], "eval 2-D flow on staircase"),
        (["eval", base, "--device", "cuda"], "eval --device cuda"),
        (["eval", base, "--threads", "100000"], "eval --threads 100000"),
        (["sample", base, "--n", "0", "--out", out_dir / "s.npy"], "sample --n 0"),
        (["sample", base, "--n", str(10**15), "--out", out_dir / "s.npy"], "sample --n 1e15 (disk)"),
        (["sample", base, "--n", "10", "--temperature", "1e300", "--out", out_dir / "s.npy"], "--temperature 1e300"),
        (["sample", base, "--n", "10", "--temperature", "-1", "--out", out_dir / "s.npy"], "--temperature -1"),
        (["sample", base, "--n", "10", "--temperature", "nan", "--out", out_dir / "s.npy"], "--temperature nan"),
        (["sample", base, "--n", "10", "--seed", str(2**64), "--out", out_dir / "s.npy"], "sample --seed 2**64"),
        (["sample", base, "--n", "10", "--workers", "100000", "--out", out_dir / "s.npy"], "--workers 100000"),
        (
            ["sample", base, "--n", "10", "--resolution", str(10**6), "--out", out_dir / "s.png"],
            "sample png --resolution 1e6",
        ),
        (["sample", base, "--n", "10", "--extent", "-1", "--out", out_dir / "s.png"], "sample --extent -1"),
        (["sample", base, "--n", "10", "--out", out_dir / "s.txt"], "sample --out .txt"),
        (["sample", base, "--n", "10", "--out", ""], "sample --out empty"),
        (["sample", base, "--n", "10", "--out", out_dir], "sample --out a folder"),
        (["sample", base, "--n", "10", "--out", "/nonexistent/dir/s.npy"], "sample --out missing folder"),
        (["sample", base, "--n", "10", "--out", "/proc/s.npy"], "sample --out unwritable"),
        (["density", base, "--resolution", "1", "--out", out_dir / "d.npy"], "density --resolution 1"),
        (["density", base, "--resolution", str(10**6), "--out", out_dir / "d.npy"], "density --resolution 1e6"),
        (["density", base, "--resolution", str(10**5), "--out", out_dir / "d.png"], "density png 1e5"),
        (["density", base, "--extent", "0", "--out", out_dir / "d.npy"], "density --extent 0"),
        (
            ["density", base, "--extent", "1e300", "--resolution", "8", "--out", out_dir / "d.npy"],
            "density --extent 1e300 (may succeed if finite)",
        ),
        (["density", base, "--threads", "100000", "--out", out_dir / "d.npy"], "density --threads 1e5"),
        (["presets", "--bogus"], "presets --bogus"),
        (["nosuchcommand"], "unknown command"),
        ([], "no command"),
    ):
        add("flags", name, argv, "any" if "may succeed" in name else "error")

    # -- presets
    for name, path in _preset_files(preset_dir).items():
        # --data always sets the training data, so a preset naming unknown data is legitimately overridden.
        add(
            "preset",
            name,
            ["train", "--data", "8gaussians", "--preset", path, "--no-progress", "--out", fresh()],
            "any" if name in ("valid-tiny", "data-unknown") else "error",
        )

    # -- checkpoints
    for name, path in _checkpoint_files(ckpt_dir, base).items():
        add("ckpt", f"eval {name}", ["eval", path], "any" if name == "nan-weights" else "error")
    for name in (
        "truncated-50pct",
        "tensor-shape-huge",
        "model-blocks-1e9",
        "fifo",
        "nan-weights",
        "train-test-size-1e11",
        "header-deep-nesting",
    ):
        path = ckpt_dir / f"{name}.safetensors"
        # Sampling does not use the test size: that checkpoint is fine for it.
        add(
            "ckpt",
            f"sample {name}",
            ["sample", path, "--n", "10", "--out", out_dir / "c.npy"],
            "any" if name == "train-test-size-1e11" else "error",
        )
        add(
            "ckpt",
            f"resume {name}",
            ["train", "--resume", path, "--iterations", "5", "--no-progress", "--out", fresh()],
        )
    add(
        "ckpt",
        "density nan-weights",
        ["density", ckpt_dir / "nan-weights.safetensors", "--resolution", "8", "--out", out_dir / "nan.npy"],
    )

    # -- data files
    for name, data, folder in _data_dirs(data_dir):
        add(
            "data",
            name,
            ["train", "--data", data, "--data-dir", folder, *IMAGE_TINY, "--out", fresh()],
            "any" if name in ("folder-1x1-images",) else "error",
        )
    return cases


# --------------------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------------------


def _limit_memory(limit: int) -> Any:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def _classify(rc: int | None, stderr: str, timed_out: bool) -> str:
    if timed_out:
        return "hang"
    if "Traceback" in stderr:
        return "traceback"
    if rc is not None and rc < 0:
        return "crash"
    if rc == 0:
        return "accepted"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("monoflow: error:")]
    if len(errors) == 1 and lines and lines[-1] == errors[0]:
        return "one-line error"
    return "messy error"


def run_case(case: Case, cwd: Path, timeout: float, memory_limit: int) -> Outcome:
    env = {k: v for k, v in os.environ.items() if k != "MONOFLOW_DEBUG"}
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "monoflow_core", *case.argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        preexec_fn=_limit_memory(memory_limit),
        start_new_session=True,
    )
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    text = err.decode("utf-8", "replace")
    verdict = _classify(proc.returncode, text, timed_out)
    lines = [line for line in text.splitlines() if line.strip()]
    extra: dict[str, Any] = {}
    if proc.returncode is not None and proc.returncode < 0:
        extra["signal"] = signal.Signals(-proc.returncode).name
    return Outcome(case, verdict, proc.returncode, time.monotonic() - t0, lines[-1][:400] if lines else "", extra)


# --------------------------------------------------------------------------------------------------------------
# SIGKILL during checkpoint saves
# --------------------------------------------------------------------------------------------------------------

_TEMP = re.compile(r"^\.checkpoint\.safetensors\..*\.tmp$")


def _kill_one(slot: Path, rng: random.Random, timeout: float, memory_limit: int) -> dict[str, Any]:
    ckpt = slot / "checkpoint.safetensors"
    common_flags = ["--checkpoint-every", "1", "--iterations", "1000000", "--no-progress"]
    if ckpt.exists():
        argv = ["train", "--resume", str(ckpt), *common_flags]
        before = int(read_checkpoint_metadata(ckpt)["step"])
        before_mtime = ckpt.stat().st_mtime_ns
    else:
        argv = [
            "train",
            "--data",
            "8gaussians",
            "--blocks",
            "2",
            "--batch-size",
            "64",
            "--test-size",
            "100",
            "--eval-size",
            "100",
            "--eval-every",
            "0",
            *common_flags,
            "--out",
            str(slot),
        ]
        before, before_mtime = 0, 0
    mode = rng.choice(["at-temp-file", "after-delay"])
    # Temporary files a previous kill left behind are not this process's saves.
    stale = {e.name for e in os.scandir(slot) if _TEMP.match(e.name)} if slot.is_dir() else set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "monoflow_core", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_limit_memory(memory_limit),
    )
    deadline = time.monotonic() + timeout
    if not ckpt.exists():
        # A new run: let it complete its first save, so that every kill has a checkpoint to protect.
        while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
            time.sleep(0.001)
        if ckpt.exists():
            before_mtime = ckpt.stat().st_mtime_ns
    seen = False
    while time.monotonic() < deadline and proc.poll() is None:
        if mode == "at-temp-file":
            if slot.is_dir() and any(_TEMP.match(e.name) and e.name not in stale for e in os.scandir(slot)):
                seen = True
                break
        elif ckpt.exists() and ckpt.stat().st_mtime_ns != before_mtime:
            seen = True
            time.sleep(rng.uniform(0.0, 0.08))  # somewhere in the next saves
            break
        time.sleep(0.0005)
    exited_early = proc.poll() is not None
    proc.kill()
    proc.wait()
    result: dict[str, Any] = {
        "mode": mode,
        "save_seen": seen,
        "exited_before_kill": exited_early,
        "step_before": before,
    }
    try:
        loaded = load_checkpoint(ckpt)
        step = int(loaded.metadata.get("step", -1))
        result.update(loadable=True, step_after=step, regressed=step < before)
    except Exception as err:  # any failure to load is what this probe counts
        result.update(loadable=False, error=f"{type(err).__name__}: {err}"[:300], regressed=False)
    result["temporaries_left"] = sum(1 for e in os.scandir(slot) if _TEMP.match(e.name)) if slot.is_dir() else 0
    return result


def kill_campaign(work: Path, kills: int, jobs: int, timeout: float, memory_limit: int, seed: int) -> dict[str, Any]:
    slots = [work / "kills" / f"slot{i}" for i in range(max(1, min(jobs, kills)))]
    for s in slots:
        s.parent.mkdir(parents=True, exist_ok=True)
    per_slot = [kills // len(slots) + (1 if i < kills % len(slots) else 0) for i in range(len(slots))]

    def run_slot(i: int) -> list[dict[str, Any]]:
        rng = random.Random(seed + i)
        out = []
        for k in range(per_slot[i]):
            r = _kill_one(slots[i], rng, timeout, memory_limit)
            out.append(r)
            print(
                f"  kill {i}.{k + 1}: {r['mode']}, loadable={r['loadable']}, step {r['step_before']} -> "
                f"{r.get('step_after')}",
                flush=True,
            )
        return out

    with ThreadPoolExecutor(max_workers=len(slots)) as pool:
        results = [r for rs in pool.map(run_slot, range(len(slots))) for r in rs]
    # The command itself must load what is left (not only the library).
    final = [
        run_case(
            Case("kill", f"eval {s.name}", ["eval", str(s / "checkpoint.safetensors")], "any"),
            work,
            timeout,
            memory_limit,
        )
        for s in slots
    ]
    return {
        "kills": len(results),
        "unloadable": sum(not r["loadable"] for r in results),
        "regressed": sum(r["regressed"] for r in results),
        "save_seen": sum(r["save_seen"] for r in results),
        "at_temp_file": sum(r["mode"] == "at-temp-file" and r["save_seen"] for r in results),
        "exited_before_kill": sum(r["exited_before_kill"] for r in results),
        "max_temporaries_left": max((r["temporaries_left"] for r in results), default=0),
        "final_eval": [(o.case.name, o.verdict, o.last_line) for o in final],
        "details": results,
    }


# --------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------


def _report(
    outcomes: list[Outcome], kills: dict[str, Any] | None, info: dict[str, Any], command: str, seconds: float
) -> list[str]:
    counts = Counter(o.verdict for o in outcomes)
    lines = ["# Hostile inputs to the monoflow command", ""]
    lines += common.machine_header(info, [command])
    lines += [
        f"Total time {seconds / 60:.1f} min. Each case is its own `python -m monoflow_core ...` process with a "
        "per-case timeout and an address-space limit; the case list is in `benchmarks/hostile_inputs.py`.",
        "",
    ]
    lines += ["## Malformed inputs", ""]
    verdicts = ["one-line error", "accepted", "traceback", "crash", "hang", "messy error"]
    lines += common.markdown_table(["verdict", "cases"], [[v, counts.get(v, 0)] for v in verdicts])
    lines += ["", f"{len(outcomes)} cases in all; by group:", ""]
    groups = sorted({o.case.group for o in outcomes})
    rows = []
    for g in groups:
        c = Counter(o.verdict for o in outcomes if o.case.group == g)
        rows.append([g, sum(c.values()), *[c.get(v, 0) for v in verdicts]])
    lines += common.markdown_table(["group", "cases", *verdicts], rows)
    bad = [
        o
        for o in outcomes
        if o.verdict in ("traceback", "crash", "hang", "messy error")
        or (o.verdict == "accepted" and o.case.expect == "error")
    ]
    lines += ["", "### Cases that are not a clean one-line error", ""]
    if not bad:
        lines += ["None."]
    for o in bad:
        note = f" ({o.extra['signal']})" if "signal" in o.extra else ""
        lines.append(f"- **{o.case.group} / {o.case.name}**: {o.verdict}{note}, exit {o.rc}: `{o.last_line}`")
    accepted = [o for o in outcomes if o.verdict == "accepted" and o.case.expect != "error"]
    if accepted:
        lines += [
            "",
            "Accepted as legitimate (exit 0): " + ", ".join(f"{o.case.group} / {o.case.name}" for o in accepted) + ".",
        ]
    if kills is not None:
        lines += ["", "## SIGKILL of `monoflow train` while it saves checkpoints", ""]
        lines += common.markdown_table(
            ["figure", "value"],
            [
                ["kills", kills["kills"]],
                ["kills after a save was seen (temporary file or a new checkpoint)", kills["save_seen"]],
                ["of which the instant the temporary checkpoint file appeared", kills["at_temp_file"]],
                ["runs that ended before the kill", kills["exited_before_kill"]],
                ["checkpoint not loadable after a kill", kills["unloadable"]],
                ["checkpoint went back in steps", kills["regressed"]],
                ["most temporary files left in the folder after a kill", kills["max_temporaries_left"]],
            ],
        )
        lines += [
            "",
            "`monoflow eval` of each run's final checkpoint: "
            + "; ".join(f"{name}: {verdict} (`{last}`)" for name, verdict, last in kills["final_eval"])
            + ".",
        ]
        broken = [r for r in kills["details"] if not r["loadable"]]
        for r in broken[:10]:
            lines.append(f"- unloadable after a kill ({r['mode']}): `{r.get('error')}`")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100, help="SIGKILLs of monoflow train during saves (default 100)")
    p.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds per case before it counts as a hang")
    p.add_argument("--memory-limit", type=float, default=8.0, help="address-space limit of each case, GiB")
    p.add_argument("--only", default=None, help="run only cases whose 'group / name' matches this regex")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill timings")
    p.add_argument(
        "--out",
        default=str(common.RESULTS_DIR / "hostile_inputs"),
        help="results file (OUT.md and OUT.json; default benchmarks/results/hostile_inputs)",
    )
    args = p.parse_args(argv)
    info = common.machine_info()
    command = common.command_line(argv if argv is None else [sys.argv[0], *argv])
    limit = int(args.memory_limit * GIB)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="monoflow-hostile-"))
    try:
        cases = build_cases(work)
        if args.only:
            cases = [c for c in cases if re.search(args.only, f"{c.group} / {c.name}")]
        if args.list:
            for c in cases:
                print(f"{c.group} / {c.name}: monoflow {' '.join(c.argv)}")
            print(f"{len(cases)} cases")
            return 0
        print(f"{len(cases)} cases, {args.jobs} at a time, in {work}", flush=True)
        pwned = Path("/tmp/monoflow-hostile-pwned")
        pwned.unlink(missing_ok=True)
        cwd = work / "cwd"
        cwd.mkdir()

        def one(case: Case) -> Outcome:
            o = run_case(case, cwd, args.timeout, limit)
            print(f"  [{o.verdict}] {case.group} / {case.name} ({o.seconds:.1f} s): {o.last_line[:160]}", flush=True)
            return o

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(one, cases))
        if pwned.exists():  # the hostile CIFAR pickle ran code: count it as the worst failure there is
            outcomes.append(
                Outcome(
                    Case("data", "cifar-evil-pickle ran code", []),
                    "crash",
                    None,
                    0.0,
                    "the pickle's os.system call ran",
                    {"signal": "code execution"},
                )
            )
        if any(cwd.iterdir()):
            outcomes.append(
                Outcome(
                    Case("flags", "files written into the current folder", []),
                    "messy error",
                    None,
                    0.0,
                    ", ".join(sorted(p.name for p in cwd.iterdir())),
                )
            )
        kills = None
        if args.kills > 0:
            print(f"{args.kills} SIGKILLs during checkpoint saves", flush=True)
            kills = kill_campaign(work, args.kills, args.jobs, args.timeout, limit, args.seed)
        seconds = time.monotonic() - t0
        report = _report(outcomes, kills, info, command, seconds)
        print("\n".join(report))
        payload = {
            "machine": info,
            "command": command,
            "seconds": seconds,
            "counts": dict(Counter(o.verdict for o in outcomes)),
            "cases": [
                {
                    "group": o.case.group,
                    "name": o.case.name,
                    "argv": o.case.argv,
                    "verdict": o.verdict,
                    "rc": o.rc,
                    "seconds": round(o.seconds, 2),
                    "last_line": o.last_line,
                    **o.extra,
                }
                for o in outcomes
            ],
            "kills": kills,
        }
        if not args.only:
            md, js = common.write_results(args.out, report, payload)
            print(f"wrote {md} and {js}")
        failures = sum(o.verdict in ("traceback", "crash", "hang") for o in outcomes)
        if kills is not None:
            failures += kills["unloadable"] + kills["regressed"]
        return 1 if failures else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
