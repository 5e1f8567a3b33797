"""Hostile and oversized inputs to the ``monoflow`` command: every one ends in a single ``monoflow: error:`` line
before anything is spent, large outputs are streamed, and a run folder has one writer at a time.

Driven in-process through ``main([...])``; memory and disk budgets are pinned with monkeypatch so that the
refusals do not depend on the machine. One test runs a real ``monoflow train`` subprocess (the lock and SIGKILL).
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run

from monoflow_core import FlowConfig, build_flow, evaluation
from monoflow_core import resources as res
from monoflow_core.checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from monoflow_core.data import images as image_data
from monoflow_core.flow import Flow
from monoflow_core.runlock import LOCK_NAME, RunLock, lock_holder
from monoflow_core.training import TrainConfig, Trainer

torch.set_num_threads(1)

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
    "--no-progress",
]
GIB = 1 << 30


class _Hung(BaseException):
    """Raised by the watchdog: a command blocked (on a FIFO, say) instead of refusing at once."""


@contextlib.contextmanager
def _watchdog(seconds=120):
    # A command that opens a FIFO blocks for ever; fail the test instead of hanging the suite. BaseException, so
    # that the command's own error handling cannot turn it into a tidy one-line error.
    def fire(signum, frame):
        raise _Hung("the command blocked")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A tiny 8gaussians run: its folder and checkpoint (2 iterations)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    code, _, err = run(["train", "--data", "8gaussians", *TINY, "--iterations", "2", "--out", out])
    assert code == 0, err
    return out, out / "checkpoint.safetensors"


@pytest.fixture
def small_machine(monkeypatch):
    """This machine, seen as one with 4 GiB of memory and 1 GiB of free disk."""
    monkeypatch.setattr(res, "available_memory", lambda: 4 * GIB)
    monkeypatch.setattr(res, "free_disk", lambda folder: GIB)


def _assert_failure(code, err, *words):
    """Exit status 1 (a failure, not a usage error) and one ``monoflow: error:`` line holding ``words``."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("monoflow: error: ") and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], (word, lines[0])


def _litter(folder):
    """Files a refused or failed command must not leave: outputs and temporary files."""
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".npy", ".png", ".tmp"))


# -- B: sizes are checked against the machine before anything is spent ------------------------------------------


def test_sizes_beyond_the_machine_are_refused_up_front(toy_run, tmp_path, small_machine):
    _, ckpt = toy_run
    big = str(10**11)
    cases = [
        (["train", "--data", "8gaussians", *TINY, "--batch-size", big], ["--batch-size " + big, "a training step"]),
        (["train", "--data", "8gaussians", *TINY, "--eval-size", big], ["--eval-size " + big, "TiB"]),
        (["train", "--data", "8gaussians", *TINY, "--test-size", big], ["--test-size " + big, "held-out"]),
        (["train", "--data", "8gaussians", *TINY, "--blocks", str(10**9)], ["--blocks 1000000000", "model"]),
        (
            ["train", "--data", "staircase", *TINY[2:], "--blocks", "1", "--test-size", big, "--eval-size", big],
            ["--test-size " + big],
        ),
        (["eval", ckpt, "--test-size", big], ["--test-size " + big, "held-out test", "4 GiB"]),
        (["sample", ckpt, "--n", str(10**12), "--out", tmp_path / "s.npy"], ["--n 1000000000000", "disk"]),
        (
            ["sample", ckpt, "--n", "10", "--resolution", str(10**6), "--out", tmp_path / "s.png"],
            ["--resolution 1000000", "histogram"],
        ),
        (["density", ckpt, "--resolution", str(10**6), "--out", tmp_path / "d.npy"], ["--resolution", "disk"]),
        (["density", ckpt, "--resolution", str(10**5), "--out", tmp_path / "d.png"], ["--resolution", "memory"]),
    ]
    for i, (argv, words) in enumerate(cases):
        out = tmp_path / f"run{i}"
        if argv[0] == "train":
            argv = [*argv, "--out", out]
        code, _, err = run(argv)
        assert_user_error(code, err, *words)
        assert not out.exists()  # refused before the folder was made
    assert _litter(tmp_path) == []


def test_flags_out_of_range_are_refused_when_parsed(toy_run, tmp_path):
    _, ckpt = toy_run
    out = tmp_path / "o.npy"
    cases = [
        (["train", "--data", "8gaussians", "--threads", "100000", "--out", tmp_path / "r"], ["--threads", "100000"]),
        (["eval", ckpt, "--threads", "100000"], ["--threads"]),
        (["density", ckpt, "--workers", "100000", "--out", out], ["--workers"]),
        (["train", "--data", "8gaussians", "--seed", str(2**64), "--out", tmp_path / "r"], ["--seed", "2**63 - 1"]),
        (["eval", ckpt, "--seed", str(2**63)], ["--seed"]),
        (["sample", ckpt, "--n", "5", "--seed", str(2**70), "--out", out], ["--seed"]),
        (["sample", ckpt, "--n", "5", "--temperature", "1e300", "--out", out], ["--temperature", "1e300"]),
        (["sample", ckpt, "--n", "5", "--temperature", "0", "--out", out], ["--temperature"]),
        (["train", "--data", "8gaussians", *TINY, "--iterations", "1", "--out", ""], ["--out", "empty"]),
        (["sample", ckpt, "--n", "5", "--out", ""], ["--out", "empty"]),
        (["density", ckpt, "--out", " "], ["--out", "empty"]),
        (["density", ckpt, "--resolution", "1", "--out", out], ["--resolution 1"]),
    ]
    cwd_before = sorted(os.listdir("."))
    for argv, words in cases:
        code, _, err = run(argv)
        assert_user_error(code, err, *words)
    assert sorted(os.listdir(".")) == cwd_before  # --out "" wrote nothing into the current folder
    assert not (tmp_path / "r").exists() and _litter(tmp_path) == []


def test_seeds_beyond_64_bits_from_a_preset(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"model": {"blocks": 1}, "training": {"seed": 2**70, "data": "8gaussians"}}))
    code, _, err = run(["train", "--data", "8gaussians", "--preset", preset, "--out", tmp_path / "r"])
    assert_user_error(code, err, "seed", str(2**70), str(preset), "--seed")
    assert not (tmp_path / "r").exists()


def test_resume_checks_the_checkpoints_sizes_and_weights(tmp_path, small_machine):
    config = FlowConfig(blocks=1, growth=4)
    huge = Trainer(config, TrainConfig(iterations=5, batch_size=16, eval_size=50, test_size=10**11, eval_every=0))
    (tmp_path / "huge").mkdir()
    (tmp_path / "nan").mkdir()
    path = huge.save_checkpoint(tmp_path / "huge" / "checkpoint.safetensors")
    code, _, err = run(["train", "--resume", path, "--iterations", "6"])
    assert_user_error(code, err, "test_size 100000000000 (from the checkpoint", "--test-size")
    broken = Trainer(config, TrainConfig(iterations=5, batch_size=16, eval_size=50, test_size=50, eval_every=0))
    with torch.no_grad():
        next(broken.flow.parameters()).fill_(float("nan"))
    path = broken.save_checkpoint(tmp_path / "nan" / "checkpoint.safetensors")
    for argv in (
        ["train", "--resume", path, "--iterations", "6"],
        ["eval", path],
        ["sample", path, "--n", "5", "--out", tmp_path / "s.npy"],
    ):
        code, _, err = run(argv)
        assert_user_error(code, err, "NaN or infinite", "damaged")
    code, _, err = run(["train", "--resume", "", "--iterations", "6"])
    assert_user_error(code, err, "--resume", "empty")


def test_a_preset_that_is_not_utf8(tmp_path):
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"model": {}, "training": {}}), encoding="utf-16")
    code, _, err = run(["train", "--data", "8gaussians", "--preset", preset, "--out", tmp_path / "r"])
    assert_user_error(code, err, f"--preset {preset}", "UTF-8")


# -- C: other hostile inputs --------------------------------------------------------------------------------------


def test_fifos_are_refused_without_being_opened(toy_run, tmp_path):
    fifo_json, fifo_ckpt = tmp_path / "preset.json", tmp_path / "run.safetensors"
    os.mkfifo(fifo_json)
    os.mkfifo(fifo_ckpt)
    cases = [
        ["train", "--data", "8gaussians", "--preset", fifo_json, "--out", tmp_path / "r"],
        ["train", "--resume", fifo_ckpt, "--iterations", "5"],
        ["eval", fifo_ckpt],
        ["sample", fifo_ckpt, "--n", "5", "--out", tmp_path / "s.npy"],
        ["density", fifo_ckpt, "--out", tmp_path / "d.npy"],
    ]
    for argv in cases:
        with _watchdog():
            code, _, err = run(argv)
        assert_user_error(code, err, "FIFO", "not a regular file")
    code, _, err = run(["eval", "/dev/zero"])
    assert_user_error(code, err, "character device")


def test_split_is_refused_for_toy_checkpoints(toy_run):
    _, ckpt = toy_run
    code, _, err = run(["eval", ckpt, "--split", "validation"])
    assert_user_error(code, err, "--split validation", "8gaussians", "image")


def test_a_noop_resume_creates_no_folder(toy_run, tmp_path):
    _, ckpt = toy_run
    target = tmp_path / "new" / "deeper"
    code, _, err = run(["train", "--resume", ckpt, "--iterations", "2", "--out", target])
    assert code == 0 and "nothing to train" in err
    assert not (tmp_path / "new").exists()


def test_non_finite_outputs_fail_and_write_nothing(toy_run, tmp_path, monkeypatch):
    _, ckpt = toy_run
    monkeypatch.setattr(Flow, "inverse", lambda self, z: torch.full_like(z, float("nan")))
    monkeypatch.setattr(Flow, "log_prob", lambda self, x: torch.full(x.shape[:1], float("nan"), dtype=x.dtype))
    for argv, what in (
        (["sample", ckpt, "--n", "20", "--out", tmp_path / "s.npy"], "samples"),
        (["sample", ckpt, "--n", "20", "--out", tmp_path / "s.png"], "samples"),
        (["density", ckpt, "--resolution", "8", "--out", tmp_path / "d.npy"], "log-densities"),
        (["density", ckpt, "--resolution", "8", "--out", tmp_path / "d.png"], "log-densities"),
    ):
        code, _, err = run(argv)
        _assert_failure(code, err, what, "not finite", "nothing was written")
    assert _litter(tmp_path) == []


def test_out_of_memory_is_one_line_and_other_errors_keep_their_traceback(toy_run, monkeypatch):
    _, ckpt = toy_run

    def exhausted(self, *args, **kwargs):
        raise MemoryError("Unable to allocate 745. GiB for an array")

    monkeypatch.setattr(Trainer, "evaluate", exhausted)
    code, _, err = run(["eval", ckpt])
    _assert_failure(code, err, "out of memory", "745. GiB")

    def bug(self, *args, **kwargs):
        raise RuntimeError("a genuine bug")

    monkeypatch.setattr(Trainer, "evaluate", bug)
    with pytest.raises(RuntimeError, match="a genuine bug"):
        run(["eval", ckpt])


# -- data files --------------------------------------------------------------------------------------------------


def _png(path, size, colour=(10, 20, 30)):
    from PIL import Image

    Image.new("RGB", size, colour).save(path)


def test_large_photos_are_refused_from_their_headers(tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        _png(folder / f"p{i}.png", (3000, 2000), (i, 0, 0))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded the images before judging their size")

    monkeypatch.setattr(image_data, "decode_images", no_decoding)
    image_data.clear_image_cache()
    code, _, err = run(["train", "--data", "folder", "--data-dir", folder, "--out", tmp_path / "r"])
    assert_user_error(code, err, "--data folder", "3000 x 2000 pixels", "3 channels", "resize")
    assert not (tmp_path / "r").exists()
    # The loader refuses on its own too when the decoded pixels cannot fit (other callers than the command).
    monkeypatch.setattr(res, "available_memory", lambda: 10**6)
    expected = r"split's 1 image of 3000 x 2000 pixels .* need about 34.3 MiB"
    with pytest.raises(image_data.ImageDataError, match=expected):
        image_data.load_image_set("folder", "train", folder)


def test_a_fifo_among_folder_images_is_refused(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", (8, 8))
    os.mkfifo(folder / "b.png")
    image_data.clear_image_cache()
    with _watchdog(), pytest.raises(image_data.ImageDataError, match=r"b\.png: not a regular file"):
        image_data.load_image_set("folder", "train", folder)


def test_an_npz_that_is_really_an_npy(tmp_path):
    for name in ("train_data_batch_1", "val_data"):
        np.save(tmp_path / f"{name}.npy", np.zeros((4, 3 * 32 * 32), dtype=np.uint8))
        os.replace(tmp_path / f"{name}.npy", tmp_path / f"{name}.npz")
    image_data.clear_image_cache()
    with pytest.raises(image_data.ImageDataError, match=r"val_data.npz: a single .npy array, not an npz archive"):
        image_data.load_image_set("imagenet32", "test", tmp_path)
    code, _, err = run(
        [
            "train",
            "--data",
            "imagenet32",
            "--data-dir",
            tmp_path,
            "--preset",
            "digits-cpu",
            "--device",
            "cpu",
            "--iterations",
            "1",
            "--out",
            tmp_path / "r",
        ]
    )
    assert_user_error(code, err, "train_data_batch_1.npz", "single .npy array")


# -- streaming ---------------------------------------------------------------------------------------------------


def test_streamed_outputs_equal_the_whole_ones(toy_run, tmp_path, monkeypatch):
    _, ckpt = toy_run
    whole = {}
    for name, argv in (
        ("s.npy", ["sample", ckpt, "--n", "12345", "--seed", "3"]),
        ("h.png", ["sample", ckpt, "--n", "12345", "--seed", "3", "--resolution", "30"]),
        ("d.npy", ["density", ckpt, "--resolution", "90", "--extent", "3"]),
    ):
        code, _, err = run([*argv, "--out", tmp_path / name])
        assert code == 0, err
        whole[name] = (tmp_path / name).read_bytes()
    monkeypatch.setattr(evaluation, "PIECE_POINTS", 5000)  # three pieces of samples, two of grid points
    for name, argv in (
        ("s.npy", ["sample", ckpt, "--n", "12345", "--seed", "3"]),
        ("h.png", ["sample", ckpt, "--n", "12345", "--seed", "3", "--resolution", "30"]),
        ("d.npy", ["density", ckpt, "--resolution", "90", "--extent", "3"]),
    ):
        code, _, err = run([*argv, "--out", tmp_path / f"piecewise-{name}"])
        assert code == 0, err
        assert "100%" in err  # a progress bar for work of several pieces
        assert (tmp_path / f"piecewise-{name}").read_bytes() == whole[name], name
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (12345, 2) and np.isfinite(samples).all()
    buffer = tmp_path / "resaved.npy"
    np.save(buffer, samples)
    assert buffer.read_bytes() == whole["s.npy"]  # the streamed file is what np.save writes
    assert _litter(tmp_path) == sorted(
        ["s.npy", "h.png", "d.npy", "piecewise-s.npy", "piecewise-h.png", "piecewise-d.npy", "resaved.npy"]
    )


def test_pieces_equal_the_one_shot_evaluations():
    torch.manual_seed(0)
    flow = build_flow(FlowConfig(blocks=1, growth=4))
    whole = evaluation.sample(flow, 12_345, seed=3, dtype=torch.float64)
    pieces = []
    evaluation.sample_pieces(flow, 12_345, pieces.append, seed=3, dtype=torch.float64, piece=4_000)
    assert [p.shape[0] for p in pieces] == [5_000, 5_000, 2_345]  # rounded up to whole chunks of 5,000
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    # the grid, against the points of density_grid_points() evaluated in one call
    points, _ = evaluation.density_grid_points(flow, 3.0, 90)
    reference = evaluation.log_prob(flow, points, chunk=5_000, dtype=torch.float64).numpy()
    starts, values = [], []
    evaluation.log_density_pieces(flow, lambda start, v: (starts.append(start), values.append(v)), 3.0, 90, piece=5_000)
    assert starts == [0, 5_000]
    np.testing.assert_array_equal(np.concatenate(values), reference)
    grid, _ = evaluation.log_density_grid(flow, 3.0, 90)
    np.testing.assert_array_equal(grid.reshape(-1), reference)


def test_image_samples_stream_and_a_huge_grid_is_refused(tmp_path, small_machine):
    torch.manual_seed(0)
    config = FlowConfig(image_shape=[1, 4, 4], blocks_per_scale=[1], fc_blocks=0, depth=1, growth=4, levels=17)
    path = save_checkpoint(tmp_path / "img.safetensors", build_flow(config))
    code, _, err = run(["sample", path, "--n", "2100", "--seed", "5", "--out", tmp_path / "a.npy"])
    assert code == 0, err
    streamed = np.load(tmp_path / "a.npy")
    flow = load_checkpoint(path).flow.eval()
    np.testing.assert_array_equal(streamed, evaluation.sample_images(flow, 2100, seed=5).astype(np.uint8))
    code, _, err = run(["sample", path, "--n", str(10**9), "--out", tmp_path / "g.png"])
    assert_user_error(code, err, "--n 1000000000", "grid", "write .npy instead")
    code, _, err = run(["sample", path, "--n", str(10**12), "--out", tmp_path / "g.npy"])
    assert_user_error(code, err, "--n 1000000000000", "disk")


# -- A: one writer per run folder ---------------------------------------------------------------------------------


def test_a_locked_folder_is_refused_and_released_after_the_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = RunLock(out).acquire()
    try:
        code, _, err = run(["train", "--data", "8gaussians", *TINY, "--iterations", "1", "--out", out])
        assert_user_error(code, err, f"--out {out}", f"process {os.getpid()}", "already training")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written by the refused run
    finally:
        holder.release()
    code, _, err = run(["train", "--data", "8gaussians", *TINY, "--iterations", "1", "--out", out])
    assert code == 0, err
    assert not (out / LOCK_NAME).exists()


def _wait_for(condition, child, what):
    deadline = time.monotonic() + 300
    while not condition():
        assert child.poll() is None, f"the training process exited ({child.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_second_train_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.safetensors"
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monoflow_core",
            "train",
            "--data",
            "8gaussians",
            *TINY,
            "--iterations",
            "100000",
            "--checkpoint-every",
            "1",
            "--out",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: lock_holder(out) == child.pid and ckpt.exists(), child, "its lock and first checkpoint")
        code, _, err = run(["train", "--data", "8gaussians", *TINY, "--iterations", "1", "--force", "--out", out])
        assert_user_error(code, err, f"process {child.pid}", "already training")
        code, _, err = run(["train", "--resume", ckpt, "--iterations", "100001"])
        assert_user_error(code, err, f"process {child.pid}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    assert lock_holder(out) == child.pid  # the killed run's pid is still in the file, but its flock is gone
    step = read_checkpoint_metadata(ckpt)["step"]
    code, _, err = run(["train", "--resume", ckpt, "--iterations", str(step + 1)])
    assert code == 0, err
    assert read_checkpoint_metadata(ckpt)["step"] == step + 1
    assert not (out / LOCK_NAME).exists()
