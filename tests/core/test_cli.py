"""The ``monoflow`` command, driven in-process through ``main([...])`` on tiny runs (plus one subprocess check).

Data sets that need scikit-learn (moons, circles, swissroll) are avoided: importing it costs seconds here.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, png_text, read_png, run

from monoflow_core import FlowConfig, build_flow
from monoflow_core.checkpoint import read_checkpoint_metadata, save_checkpoint
from monoflow_core.cli import main
from monoflow_core.imageio import PNG_SIGNATURE, colormap, encode_png, write_png
from monoflow_core.presets import list_presets, load_preset
from monoflow_core.training import Trainer

torch.set_num_threads(1)

TINY = ["--blocks", "2", "--batch-size", "64", "--test-size", "500", "--eval-size", "200"]
SHIPPED_PRESETS = {
    "digits-cpu",
    "paper-mnist",
    "paper-cifar10",
    "paper-imagenet32",
    "paper-imagenet64",
    "paper-1d-a",
    "paper-1d-b",
    "paper-1d-c",
    "paper-1d-d",
    "paper-toy-idensenet",
    "paper-toy-monotone",
    # small, fast versions (the studio opens on quick-monotone)
    "quick-idensenet",
    "quick-monotone",
    "quick-realnvp",
    "quick-glow",
    "quick-nsf",
    "quick-maf",
    "quick-cnf",
    # the comparison families (monoflow_core.families, docs/families.md)
    "toy-cnf",
    "toy-glow",
    "toy-maf",
    "toy-nsf",
    "toy-realnvp",
}


def read_metrics(path):
    lines = Path(path).read_text().splitlines()
    return lines[0], [line.split(",") for line in lines[1:]]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """One tiny 8gaussians run shared by the read-only tests: 20 iterations, a test every 10."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run(
        [
            "train",
            "--data",
            "8gaussians",
            *TINY,
            "--iterations",
            "20",
            "--eval-every",
            "10",
            "--checkpoint-every",
            "10",
            "--out",
            out,
        ]
    )
    return out, result


# -- train -------------------------------------------------------------------------------------------------------


def test_train_writes_config_metrics_and_checkpoint(toy_run):
    out, (code, stdout, stderr) = toy_run
    assert code == 0, stderr
    header, rows = read_metrics(out / "metrics.csv")
    assert header == "iteration,wall_seconds,train_loss,test_nll"
    # fresh-sample tests at 10 and 20, then the fixed held-out test
    assert [int(r[0]) for r in rows] == [10, 20, 20]
    values = np.array([[float(v) for v in r] for r in rows])
    assert np.isfinite(values).all()
    assert (np.diff(values[:, 1]) >= 0).all()  # wall seconds increase
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "paper-toy-monotone"
    assert config["training"]["data"] == "8gaussians"
    assert config["training"]["iterations"] == 20
    meta = read_checkpoint_metadata(out / "checkpoint.safetensors")
    assert meta["step"] == 20
    assert meta["user"]["preset"] == "paper-toy-monotone"
    # summary with units; progress bar with the loss in nats and the rate on stderr
    assert "test NLL" in stdout and "nats" in stdout and "500 fixed" in stdout and "exact log-det" in stdout
    assert "it/s" in stdout
    assert "loss" in stderr and "nats" in stderr and "it/s" in stderr
    assert f"{float(rows[-1][3]):.4f}" in stdout


def test_flag_overrides_preset(toy_run, tmp_path):
    out, _ = toy_run
    config = json.loads((out / "config.json").read_text())
    assert load_preset("paper-toy-monotone").model["blocks"] == 10
    assert config["model"]["blocks"] == 2  # --blocks 2 beats the preset's 10
    assert config["training"]["batch_size"] == 64 and config["training"]["eval_size"] == 200
    assert config["training"]["lr"] == 1e-3  # untouched preset value
    code, _, err = run(
        [
            "train",
            "--data",
            "rings",
            "--preset",
            "paper-toy-idensenet",
            "--blocks",
            "1",
            "--formulation",
            "monotone",
            "--activation",
            "cpila",
            "--lipschitz",
            "0.8",
            "--lr",
            "0.002",
            "--iterations",
            "1",
            "--batch-size",
            "16",
            "--test-size",
            "50",
            "--eval-every",
            "0",
            "--no-progress",
            "--out",
            tmp_path / "o",
        ]
    )
    assert code == 0, err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["preset"] == "paper-toy-idensenet"
    model, training = config["model"], config["training"]
    assert (model["blocks"], model["formulation"], model["activation"], model["lipschitz"]) == (
        1,
        "monotone",
        "cpila",
        0.8,
    )
    assert (training["data"], training["lr"]) == ("rings", 0.002)
    _, rows = read_metrics(tmp_path / "o" / "metrics.csv")
    assert [int(r[0]) for r in rows] == [1]  # no fresh tests: only the final fixed one


def test_staircase_run_uses_mse_and_refuses_density(tmp_path):
    out = tmp_path / "stairs"
    code, stdout, err = run(
        [
            "train",
            "--data",
            "staircase",
            "--blocks",
            "1",
            "--iterations",
            "2",
            "--batch-size",
            "32",
            "--test-size",
            "100",
            "--eval-every",
            "2",
            "--no-progress",
            "--out",
            out,
        ]
    )
    assert code == 0, err
    header, rows = read_metrics(out / "metrics.csv")
    assert header == "iteration,wall_seconds,train_loss,test_mse"
    assert [int(r[0]) for r in rows] == [2, 2]
    assert json.loads((out / "config.json").read_text())["preset"] == "paper-1d-d"
    assert "test MSE" in stdout and "100 fixed" in stdout
    code, stdout, err = run(["eval", out / "checkpoint.safetensors", "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["data"] == "staircase" and doc["n_test"] == 100 and doc["mse"] >= 0 and "nll_nats" not in doc
    code, _, err = run(["density", out / "checkpoint.safetensors", "--out", tmp_path / "d.npy"])
    assert_user_error(code, err, "2-D")


def test_resume_continues_and_appends(toy_run, tmp_path):
    src, _ = toy_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["train", "--resume", ckpt, "--iterations", "30", "--no-progress"])
    assert code == 0, err
    assert "trained 10 iterations" in stdout and "iteration 30 of 30" in stdout
    assert read_checkpoint_metadata(ckpt)["step"] == 30
    header, rows = read_metrics(out / "metrics.csv")
    assert header == "iteration,wall_seconds,train_loss,test_nll"
    assert [int(r[0]) for r in rows] == [10, 20, 20, 30, 30]
    walls = [float(r[1]) for r in rows]
    assert walls == sorted(walls)  # the resumed run continues the wall clock
    assert json.loads((out / "config.json").read_text())["training"]["iterations"] == 30
    # nothing left to do at the target; architecture flags cannot change on resume
    code, _, err = run(["train", "--resume", ckpt, "--iterations", "30", "--no-progress"])
    assert code == 0 and "nothing to train" in err
    code, _, err = run(["train", "--resume", ckpt, "--iterations", "40", "--blocks", "3"])
    assert_user_error(code, err, "--blocks", "resum")


def test_refuses_folder_with_checkpoint(toy_run):
    out, _ = toy_run
    code, _, err = run(["train", "--data", "8gaussians", *TINY, "--iterations", "2", "--out", out])
    assert_user_error(code, err, "already holds a checkpoint", "--resume", "--force")


def test_ctrl_c_saves_checkpoint_and_exits_130(tmp_path, monkeypatch):
    original = Trainer.step
    calls = {"n": 0}

    def interrupted_step(self):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(Trainer, "step", interrupted_step)
    out = tmp_path / "run"
    code, _, err = run(["train", "--data", "pinwheel", *TINY, "--iterations", "50", "--eval-every", "0", "--out", out])
    assert code == 130
    ckpt = out / "checkpoint.safetensors"
    assert read_checkpoint_metadata(ckpt)["step"] == 3
    assert str(ckpt) in err and "--resume" in err
    assert "Traceback" not in err


def test_first_ctrl_c_finishes_the_iteration(tmp_path, monkeypatch):
    original = Trainer.step
    calls = {"n": 0}

    def step_with_sigint(self):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C in the middle of the third iteration
        return original(self)

    monkeypatch.setattr(Trainer, "step", step_with_sigint)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    code, _, err = run(
        ["train", "--data", "pinwheel", *TINY, "--iterations", "50", "--eval-every", "0", "--no-progress", "--out", out]
    )
    assert code == 130
    assert read_checkpoint_metadata(out / "checkpoint.safetensors")["step"] == 3  # the third iteration completed
    assert "Ctrl-C" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGINT) is before  # the previous handler is restored


# -- eval / sample / density / presets ----------------------------------------------------------------------------


def test_eval_json_and_text(toy_run):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["eval", ckpt, "--json"])
    assert code == 0, err
    doc = json.loads(stdout)  # exactly one JSON object on stdout
    assert {"nll_nats", "n_test", "seconds", "exact", "data"} <= doc.keys()
    assert doc["n_test"] == 500 and doc["exact"] is True and doc["data"] == "8gaussians"
    _, rows = read_metrics(out / "metrics.csv")
    assert doc["nll_nats"] == pytest.approx(float(rows[-1][3]), rel=1e-6)  # same test as the run's final row
    code, stdout, err = run(["eval", ckpt, "--test-size", "100", "--seed", "7"])
    assert code == 0, err
    assert "test NLL" in stdout and "nats" in stdout and "100 fixed" in stdout and "seed 7" in stdout


def test_eval_flow_only_checkpoint_needs_data(tmp_path):
    torch.manual_seed(0)
    path = save_checkpoint(tmp_path / "flow.safetensors", build_flow(FlowConfig(blocks=1, growth=4)))
    code, _, err = run(["eval", path])
    assert_user_error(code, err, "--data")
    code, stdout, err = run(["eval", path, "--data", "pinwheel", "--test-size", "50", "--json"])
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["data"] == "pinwheel" and doc["n_test"] == 50 and np.isfinite(doc["nll_nats"])


def test_sample_npy_and_png(toy_run, tmp_path):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["sample", ckpt, "--n", "300", "--out", tmp_path / "s.npy", "--seed", "3"])
    assert code == 0, err
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (300, 2) and np.isfinite(samples).all()
    run(["sample", ckpt, "--n", "300", "--out", tmp_path / "t.npy", "--seed", "3"])
    np.testing.assert_array_equal(samples, np.load(tmp_path / "t.npy"))  # seeded
    # two workers over two chunks of 5,000 give the same samples as one thread
    run(["sample", ckpt, "--n", "6000", "--out", tmp_path / "v.npy", "--seed", "3"])
    run(["sample", ckpt, "--n", "6000", "--out", tmp_path / "w.npy", "--seed", "3", "--workers", "2"])
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), np.load(tmp_path / "w.npy"))
    code, stdout, err = run(["sample", ckpt, "--n", "500", "--resolution", "40", "--out", tmp_path / "s.png"])
    assert code == 0, err
    assert "40 x 40 histogram of 500 samples" in stdout
    data = (tmp_path / "s.png").read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (40, 40)
    width, height, _ = read_png(tmp_path / "s.png")
    assert (width, height) == (40, 40)


def test_density_npy_and_upright_png(toy_run, tmp_path):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["density", ckpt, "--resolution", "24", "--extent", "3", "--out", tmp_path / "d.npy"])
    assert code == 0, err
    assert "nats" in stdout
    grid = np.load(tmp_path / "d.npy")
    assert grid.shape == (24, 24) and np.isfinite(grid).all()
    code, _, err = run(["density", ckpt, "--resolution", "24", "--extent", "3", "--out", tmp_path / "d.png"])
    assert code == 0, err
    width, height, pixels = read_png(tmp_path / "d.png")
    assert (width, height) == (24, 24)
    # the picture is the normalised density with the highest y in its top row
    expected = colormap(np.exp(grid - grid.max())[::-1])
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1
    # two worker threads over several chunks give the same grid
    code, _, err = run(["density", ckpt, "--resolution", "80", "--extent", "3", "--out", tmp_path / "a.npy"])
    assert code == 0, err
    code, _, err = run(
        ["density", ckpt, "--resolution", "80", "--extent", "3", "--workers", "2", "--out", tmp_path / "b.npy"]
    )
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    code, _, err = run(["density", ckpt, "--workers", "0", "--out", tmp_path / "c.npy"])
    assert code == 2 and "--workers" in err


def test_presets_lists_all_shipped(capsys):
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = {line.split()[0] for line in lines}
    assert names == SHIPPED_PRESETS == {p.name for p in list_presets()}
    assert all("  " in line and len(line.split(None, 1)) == 2 for line in lines)


def test_module_entry_point():
    done = subprocess.run(
        [sys.executable, "-m", "monoflow_core", "presets"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert {line.split()[0] for line in done.stdout.strip().splitlines()} == SHIPPED_PRESETS


def test_help_and_version(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "paper-toy-monotone" in text and "staircase" in text and "--resume" in text
    assert main(["--version"]) == 0
    assert "monoflow" in capsys.readouterr().out


# -- user errors ----------------------------------------------------------------------------------------------------


def test_bad_arguments_are_one_line_errors(toy_run, tmp_path):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x80\x04 definitely not a checkpoint " * 3)
    cases = [
        (["train", "--data", "nosuchdata", "--out", tmp_path / "a"], ["nosuchdata"]),
        (["train", "--data", "rings", "--lipschitz", "1.5", "--out", tmp_path / "b"], ["lipschitz", "1.5"]),
        (
            ["train", "--data", "staircase", "--preset", "paper-toy-monotone", "--out", tmp_path / "c"],
            ["paper-toy-monotone", "staircase"],
        ),
        (["train", "--data", "rings", "--blocks", "two", "--out", tmp_path / "d"], ["--blocks"]),
        (["eval", tmp_path / "missing.safetensors"], ["missing.safetensors", "no such file"]),
        (["eval", corrupt], ["corrupt.safetensors"]),
        (["sample", ckpt, "--n", "10", "--out", tmp_path / "no" / "such" / "dir" / "s.npy"], ["does not exist"]),
        (["sample", ckpt, "--n", "10", "--out", tmp_path / "s.txt"], [".txt"]),
    ]
    for argv, words in cases:
        code, _, err = run(argv)
        assert_user_error(code, err, *words)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- imageio ---------------------------------------------------------------------------------------------------------


def test_png_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    path = write_png(tmp_path / "x.png", image)
    width, height, pixels = read_png(path)
    assert (width, height) == (5, 7)
    np.testing.assert_array_equal(pixels, image)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        encode_png(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(OSError):
        write_png(tmp_path / "missing" / "x.png", image)


def test_colormap_range():
    rgb = colormap(np.array([[0.0, 0.5, 1.0], [np.nan, -3.0, 7.0]]))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == (68, 1, 84) and tuple(rgb[0, 2]) == (253, 231, 37)
    assert tuple(rgb[1, 0]) == tuple(rgb[1, 1]) == (68, 1, 84) and tuple(rgb[1, 2]) == (253, 231, 37)
    lum = colormap(np.linspace(0, 1, 64)).astype(float) @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(lum) > 0).all()  # monotone in brightness, like viridis


# -- dtype by purpose ------------------------------------------------------------------------------------------------

#: float32 log-densities agree with float64 ones to this many nats on the tiny run's grid (measured: about 1e-5; the
#: float32 solves stop at a relative residual of about 1e-6, see monoflow_core.solvers.effective_tolerance).
DENSITY_FLOAT32_TOLERANCE_NATS = 1e-3


def test_density_and_samples_default_to_the_training_dtype_and_say_so(toy_run, tmp_path):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["density", ckpt, "--resolution", "30", "--out", tmp_path / "d.npy"])
    assert code == 0, err
    assert "float32" in stdout  # the run trained in float32
    d32 = np.load(tmp_path / "d.npy")
    assert d32.dtype == np.float32  # the file holds the values in the dtype that computed them
    code, stdout, err = run(["density", ckpt, "--resolution", "30", "--dtype", "float64", "--out", tmp_path / "e.npy"])
    assert code == 0, err
    assert "float64" in stdout and "float32" not in stdout
    d64 = np.load(tmp_path / "e.npy")
    assert d64.dtype == np.float64
    assert np.abs(d32 - d64).max() < DENSITY_FLOAT32_TOLERANCE_NATS
    assert np.abs(d32 - d64).max() > 0  # (two computations, not one copied)
    code, _, err = run(["density", ckpt, "--resolution", "30", "--out", tmp_path / "d.png"])
    assert code == 0, err
    assert png_text(tmp_path / "d.png")["monoflow:dtype"] == "float32"
    code, stdout, err = run(["sample", ckpt, "--n", "200", "--out", tmp_path / "s.npy"])
    assert code == 0, err
    assert "float32" in stdout and np.load(tmp_path / "s.npy").dtype == np.float32
    code, stdout, err = run(["sample", ckpt, "--n", "200", "--dtype", "float64", "--out", tmp_path / "t.npy"])
    assert code == 0, err
    assert "float64" in stdout and np.load(tmp_path / "t.npy").dtype == np.float64
    code, _, err = run(
        ["sample", ckpt, "--n", "200", "--resolution", "20", "--dtype", "float64", "--out", tmp_path / "s.png"]
    )
    assert code == 0, err
    assert png_text(tmp_path / "s.png")["monoflow:dtype"] == "float64"


def test_eval_reports_float64_by_default_and_takes_dtype(toy_run):
    out, _ = toy_run
    ckpt = out / "checkpoint.safetensors"
    code, stdout, err = run(["eval", ckpt, "--test-size", "200"])
    assert code == 0, err
    assert "float64" in stdout
    code, stdout, err = run(["eval", ckpt, "--test-size", "200", "--json"])
    assert code == 0, err
    doc64 = json.loads(stdout)
    assert doc64["dtype"] == "float64"
    code, stdout, err = run(["eval", ckpt, "--test-size", "200", "--json", "--dtype", "float32"])
    assert code == 0, err
    doc32 = json.loads(stdout)
    assert doc32["dtype"] == "float32"
    assert doc32["nll_nats"] == pytest.approx(doc64["nll_nats"], abs=1e-3)


@pytest.mark.parametrize("command", ["density", "sample", "eval"])
def test_a_bad_dtype_is_one_clear_error(toy_run, tmp_path, command):
    out, _ = toy_run
    extra = {"density": ["--out", tmp_path / "d.npy"], "sample": ["--n", "5", "--out", tmp_path / "s.npy"], "eval": []}[
        command
    ]
    code, _, err = run([command, out / "checkpoint.safetensors", "--dtype", "float16", *extra])
    assert_user_error(code, err, "--dtype", "float16", "float32", "float64")
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "s.npy").exists()


def test_warmup_prepares_every_kernel_set_and_names_the_cache(monkeypatch, tmp_path):
    from monoflow_core.fused import COMPILER, KERNEL_SETS, SETTINGS, kernels

    if not (SETTINGS.use_kernels and kernels.AVAILABLE):
        pytest.skip("the compiled kernels are unavailable here")
    monkeypatch.setenv("MONOFLOW_CACHE_DIR", str(tmp_path))
    for dtype in (torch.float32, torch.float64):  # as in a new process (Numba's versions stay compiled)
        for kit in KERNEL_SETS:
            monkeypatch.delitem(COMPILER.state, (dtype, kit), raising=False)
    code, stdout, err = run(["warmup", "--dtype", "float64", "--solve-only"])
    assert code == 0, err
    assert "float64 solver kernels: ready" in stdout and str(tmp_path / "numba") in stdout
    assert COMPILER.state[torch.float64, "solve"] == "ready"
    assert (torch.float64, "train") not in COMPILER.state and (torch.float32, "solve") not in COMPILER.state
    code, stdout, err = run(["warmup"])
    assert code == 0, err
    assert "float32 training and solver kernels: ready" in stdout
    assert "float64 training and solver kernels: ready" in stdout
    assert all(COMPILER.state[dt, kit] == "ready" for dt in (torch.float32, torch.float64) for kit in KERNEL_SETS)
    monkeypatch.setattr(SETTINGS, "use_kernels", False)
    code, _, err = run(["warmup"])
    assert code == 1 and "unavailable" in err
