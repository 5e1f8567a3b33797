"""The ``monoflow`` command on images (built-in 8x8 digits), driven in-process through ``main([...])``.

Tiny presets are written into the test's folder (same shape as ``assets/presets/digits-cpu.json``): one monotone
block per scale, a depth-1 conv DenseNet, so a step costs a fraction of a second on one CPU thread.
"""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, read_png, run

from monoflow_core import cli
from monoflow_core.checkpoint import load_checkpoint, read_checkpoint_metadata
from monoflow_core.cli import train as cli_train
from monoflow_core.training import Trainer

torch.set_num_threads(1)

PRESETS = Path(__file__).resolve().parents[2] / "assets" / "presets"
UNIFORM_BPD = math.log2(17)  # 4.087 bits/dim: every one of the 17 levels equally likely
BPD_LINE = re.compile(r"test bpd (\d+\.\d+) \+- (\d+\.\d+) bits/dim on (\d+) test images")


def write_preset(path: Path, model=None, training=None) -> Path:
    """A digits preset shaped like ``digits-cpu.json`` but tiny (changes on top of it)."""
    doc = json.loads((PRESETS / "digits-cpu.json").read_text())
    doc["name"] = path.stem
    doc["description"] = "tiny digits flow for the tests"
    doc["model"].update(
        {"blocks_per_scale": [1, 1], "fc_blocks": 0, "depth": 1, "growth": 8, "logdet": "hybrid", **(model or {})}
    )
    doc["training"].update(
        {
            "iterations": 3,
            "batch_size": 8,
            "eval_every": 2,
            "eval_size": 32,
            "checkpoint_every": 0,
            "concat_learnable_from": None,
            "warmup_iterations": 1,
            **(training or {}),
        }
    )
    path.write_text(json.dumps(doc, indent=2))
    return path


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One 3-iteration digits run shared by the read-only tests (a test at iteration 2 and the final one)."""
    root = tmp_path_factory.mktemp("cli_images")
    preset = write_preset(root / "tiny.json")
    out = root / "run"
    result = run(["train", "--data", "digits", "--preset", preset, "--iterations", "3", "--out", out, "--no-progress"])
    return out, preset, result


# -- train -------------------------------------------------------------------------------------------------------


def test_train_digits_writes_config_metrics_and_checkpoint(digits_run):
    out, _, (code, stdout, stderr) = digits_run
    assert code == 0, stderr
    assert {"config.json", "metrics.csv", "checkpoint.safetensors"} <= {p.name for p in out.iterdir()}

    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "iteration,wall_seconds,train_bpd,test_bpd"
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert rows[:, 0].tolist() == [2, 3]  # the test every 2 iterations, then the final test
    assert np.isfinite(rows).all()
    assert ((rows[:, 2:] > 0) & (rows[:, 2:] < 2 * UNIFORM_BPD)).all()

    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "tiny"
    assert config["training"]["data"] == "digits" and config["training"]["iterations"] == 3
    assert config["model"]["image_shape"] == [1, 8, 8] and config["model"]["levels"] == 17
    meta = read_checkpoint_metadata(out / "checkpoint.safetensors")
    assert meta["step"] == 3 and meta["task"] == "image"

    # The final test: a bpd line with its units, on the preset's eval_size images of the test split.
    match = BPD_LINE.search(stdout)
    assert match, stdout
    assert int(match.group(3)) == 32
    assert float(match.group(1)) == pytest.approx(rows[-1, 3], abs=1e-4)
    assert "exact log-det" in stdout and "uniform dequantization bound" in stdout
    assert "trained 3 iterations" in stdout
    # Progress is off, but the test at iteration 2 is still reported (on stderr).
    assert "step 2: test bpd" in stderr and "bits/dim" in stderr


def test_grad_accumulation_flag_takes_the_same_steps(tmp_path):
    # Exact log-dets and float64: with the power-series estimate each micro-batch draws its own probes, so the
    # accumulated gradient is an equally unbiased but different estimate.
    preset = write_preset(
        tmp_path / "f64.json",
        model={"logdet": "exact"},
        training={"dtype": "float64", "eval_every": 0, "eval_size": 8, "ema": None},
    )
    states = []
    for k in ("1", "2"):
        out = tmp_path / f"accum{k}"
        code, _, err = run(
            [
                "train",
                "--data",
                "digits",
                "--preset",
                preset,
                "--iterations",
                "2",
                "--grad-accumulation",
                k,
                "--out",
                out,
                "--no-progress",
            ]
        )
        assert code == 0, err
        assert json.loads((out / "config.json").read_text())["training"]["grad_accumulation"] == int(k)
        states.append(load_checkpoint(out / "checkpoint.safetensors").flow.state_dict())
    for key, value in states[0].items():
        assert value.dtype == states[1][key].dtype
        if value.is_floating_point():
            assert torch.allclose(value, states[1][key], rtol=0, atol=1e-10), key
        else:
            assert torch.equal(value, states[1][key]), key
    code, _, err = run(
        [
            "train",
            "--data",
            "digits",
            "--preset",
            preset,
            "--iterations",
            "1",
            "--grad-accumulation",
            "9",
            "--out",
            tmp_path / "too_many",
            "--no-progress",
        ]
    )
    assert_user_error(code, err, "grad_accumulation", "batch_size (8)")


# -- eval --------------------------------------------------------------------------------------------------------


def test_eval_json_reports_exact_bits_per_dim(digits_run):
    out, _, (code, stdout, stderr) = digits_run
    assert code == 0, stderr
    code, printed, err = run(["eval", out / "checkpoint.safetensors", "--json", "--test-size", "32"])
    assert code == 0, err
    doc = json.loads(printed)
    assert doc["data"] == "digits" and doc["split"] == "test" and doc["dequantization"] == "uniform"
    # Image flows are tested in the training dtype (float64 convolutions are slow on CPUs).
    assert doc["n_test"] == 32 and doc["step"] == 3 and doc["dtype"] == "float32"
    # logdet "hybrid" with 64-dimensional blocks: the evaluation's log-dets are exact.
    assert doc["exact"] is True
    assert math.isfinite(doc["bpd"]) and 0.0 < doc["bpd"] < UNIFORM_BPD + 1.0
    assert doc["bpd_stderr"] > 0.0
    assert doc["nll_nats"] == pytest.approx(doc["bpd"] * 64 * math.log(2.0))
    # Same weights (EMA), images and seeded noise as the training run's final test.
    final = float(BPD_LINE.search(stdout).group(1))
    assert doc["bpd"] == pytest.approx(final, abs=2e-4)


def test_eval_text_names_the_checkpoint_iteration(digits_run):
    out, _, (code, _, stderr) = digits_run
    assert code == 0, stderr
    code, printed, err = run(["eval", out / "checkpoint.safetensors", "--test-size", "16"])
    assert code == 0, err
    line = printed.strip()
    assert len(line.splitlines()) == 1
    assert "at iteration 3" in line and "step 0" not in line, line
    assert BPD_LINE.search(line) and "on 16 test images" in line and "[test seed 1234]" in line


# -- sample ------------------------------------------------------------------------------------------------------


def test_sample_png_grid_and_npy_levels(digits_run, tmp_path):
    out, _, (code, _, stderr) = digits_run
    assert code == 0, stderr
    ckpt = out / "checkpoint.safetensors"
    code, printed, err = run(["sample", ckpt, "--n", "16", "--out", tmp_path / "grid.png"])
    assert code == 0, err
    assert "grid of 16 sampled images" in printed
    width, height, pixels = read_png(tmp_path / "grid.png")
    assert (width, height) == (37, 37)  # 4 x 4 tiles of 8 x 8 pixels with 1 pixel of padding around each

    code, printed, err = run(["sample", ckpt, "--n", "16", "--out", tmp_path / "s.npy"])
    assert code == 0, err
    levels = np.load(tmp_path / "s.npy")
    assert levels.shape == (16, 1, 8, 8)
    assert np.issubdtype(levels.dtype, np.integer)
    assert levels.min() >= 0 and levels.max() <= 16
    # The same seed draws the same images: the grid shows exactly these levels (scaled to 0-255, grey).
    assert (pixels[0, :, :] == 128).all() and (pixels[:, 0, :] == 128).all()
    for i in range(16):
        r, c = divmod(i, 4)
        tile = pixels[1 + 9 * r : 9 + 9 * r, 1 + 9 * c : 9 + 9 * c]
        expected = np.rint(levels[i, 0].astype(np.float64) * 255 / 16).astype(np.uint8)
        assert (tile == expected[:, :, None]).all(), i


# -- user errors -------------------------------------------------------------------------------------------------


def test_mnist_without_data_dir_is_a_one_line_error(tmp_path):
    code, _, err = run(["train", "--data", "mnist", "--iterations", "1", "--out", tmp_path / "o", "--no-progress"])
    assert_user_error(code, err, "--data-dir")
    assert not (tmp_path / "o").exists()


def test_mnist_with_missing_data_dir_names_the_path(tmp_path):
    missing = tmp_path / "nonexistent"
    # --device cpu: the paper-mnist preset trains on CUDA, and on a CPU-only machine that error comes first.
    code, _, err = run(
        [
            "train",
            "--data",
            "mnist",
            "--data-dir",
            missing,
            "--device",
            "cpu",
            "--iterations",
            "1",
            "--out",
            tmp_path / "o",
            "--no-progress",
        ]
    )
    assert_user_error(code, err, str(missing))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("data", "preset", "kind"),
    [
        ("digits", "paper-toy-monotone", "2-D density"),
        ("digits", "paper-1d-a", "1-D staircase"),
        ("8gaussians", "digits-cpu", "image"),
    ],
)
def test_preset_of_the_wrong_kind_is_refused(tmp_path, data, preset, kind):
    code, _, err = run(
        ["train", "--data", data, "--preset", preset, "--iterations", "1", "--out", tmp_path / "o", "--no-progress"]
    )
    assert_user_error(code, err, f"--preset {preset!r}", f"is a {kind} preset", f"--data {data!r}")
    assert not (tmp_path / "o").exists()


# -- data-parallel workers take the same steps as rank 0 ------------------------------------------------------


@pytest.mark.parametrize("how", ["new", "resume"])
def test_train_worker_takes_the_same_steps_as_rank_zero(digits_run, tmp_path, monkeypatch, how):
    """``_train_worker`` (ranks > 0 under torchrun) must build the trainer rank 0 builds; here in one process.

    On resume with a changed ``--lr`` the worker used to keep the checkpoint's rate, so under torchrun its
    parameters drifted away from rank 0's (the summed gradients are identical, the Adam steps are not).
    """
    out, preset, (code, _, stderr) = digits_run
    assert code == 0, stderr
    if how == "new":
        argv = ["train", "--data", "digits", "--preset", preset, "--iterations", "3"]
    else:
        argv = [
            "train",
            "--resume",
            out / "checkpoint.safetensors",
            "--iterations",
            "5",
            "--lr",
            "0.02",
            "--tol",
            "1e-4",
        ]
    code, _, err = run([*argv, "--out", tmp_path / "rank0", "--no-progress"])
    assert code == 0, err
    rank0 = load_checkpoint(tmp_path / "rank0" / "checkpoint.safetensors")

    trainers = []
    original = Trainer.run

    def recording_run(self, *args, **kwargs):
        trainers.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", recording_run)
    args = cli.build_parser().parse_args([str(a) for a in argv] + ["--device", "cpu", "--no-progress"])
    assert cli_train._train_worker(args) == 0
    (worker,) = trainers
    assert worker.step_count == rank0.metadata["step"]
    assert worker.base_lr == rank0.train_config.lr
    for key, value in rank0.flow.state_dict().items():
        assert torch.equal(worker.flow.state_dict()[key], value), key


class LaunchedError(Exception):
    pass


@pytest.mark.parametrize(
    ("argv", "device"),
    [
        (["--data", "mnist", "--data-dir", "."], "cuda"),
        (["--data", "digits"], "cpu"),
        (["--data", "mnist", "--data-dir", ".", "--device", "cpu"], "cpu"),
        (["--resume", "CKPT"], "cpu"),
    ],
)
def test_torchrun_launch_uses_the_configured_device(digits_run, monkeypatch, argv, device):
    """Under torchrun the device (hence nccl or gloo) is fixed before the run is built: it must be the preset's
    (paper-mnist trains on CUDA) or the checkpoint's unless --device is given, not always the CPU."""
    out, _, _ = digits_run
    argv = [str(out / "checkpoint.safetensors") if a == "CKPT" else a for a in argv]
    seen = []

    def fake_init(dev="cpu"):
        seen.append(dev)
        raise LaunchedError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(cli_train, "init_from_environment", fake_init)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(LaunchedError):
        run(["train", *argv, "--out", out.parent / "unused", "--no-progress"])
    assert seen == [device]


def test_torchrun_launch_of_a_cuda_preset_without_cuda_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run(["train", "--data", "mnist", "--data-dir", tmp_path, "--out", tmp_path / "o", "--no-progress"])
    assert_user_error(code, err, "'cuda'", "--device cpu")
    assert not (tmp_path / "o").exists()


# -- it learns ---------------------------------------------------------------------------------------------------


def test_short_digits_run_beats_the_uniform_baseline(tmp_path):
    """40 steps of batch 32 (lr 3e-3, exact log-det, no EMA) take the test bpd well below log2(17)."""
    preset = write_preset(
        tmp_path / "learn.json",
        model={"logdet": "exact"},
        training={
            "batch_size": 32,
            "lr": 3e-3,
            "schedule": "constant",
            "warmup_iterations": 0,
            "ema": None,
            "eval_every": 0,
            "eval_size": 64,
        },
    )
    code, stdout, stderr = run(
        [
            "train",
            "--data",
            "digits",
            "--preset",
            preset,
            "--iterations",
            "40",
            "--out",
            tmp_path / "run",
            "--no-progress",
        ]
    )
    assert code == 0, stderr
    match = BPD_LINE.search(stdout)
    assert match, stdout
    bpd = float(match.group(1))
    assert int(match.group(3)) == 64
    print(f"40 digits steps: test bpd {bpd:.4f} (uniform {UNIFORM_BPD:.4f})")
    assert bpd < UNIFORM_BPD - 0.3, stdout
