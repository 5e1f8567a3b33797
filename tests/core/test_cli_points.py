"""``monoflow train --data FILE``: training on your own 2-D points from the command line, and the checkpoint of such a
run in ``eval``, ``sample``, ``density`` and ``--resume``; malformed files end in one ``monoflow: error:`` line."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run

from monoflow_core.checkpoint import load_checkpoint

torch.set_num_threads(1)

TINY = ["--blocks", "1", "--batch-size", "16", "--eval-every", "0", "--no-progress"]


def points(n=150, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * [3.0, 0.2, 1.0] + [10.0, 5.0, 0.0]


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("points-cli")
    data = folder / "mine.csv"
    data.write_text("x,y,z\n" + "\n".join(",".join(repr(float(v)) for v in row) for row in points()) + "\n")
    out = folder / "run"
    code, stdout, stderr = run(
        ["train", "--data", data, "--columns", "x,z", "--holdout", "0.1", "--iterations", "2", "--out", out, *TINY]
    )
    assert code == 0, stderr
    return data, out, stdout, stderr


def test_train_on_a_csv_states_split_and_transform(csv_run):
    _, out, stdout, stderr = csv_run
    assert "mine.csv (columns x, z): 150 points, 135 to train on, 15 held out (10%" in stderr
    assert "standardised z = (x - mean) / scale" in stderr
    assert "15 held-out points" in stdout
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert ckpt.points is not None and ckpt.points.columns == ("x", "z") and ckpt.points.test.shape == (15, 2)
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["data"] == "points"


def test_eval_tests_the_stored_held_out_points(csv_run):
    _, out, _, _ = csv_run
    code, stdout, stderr = run(["eval", out / "checkpoint.safetensors", "--json"])
    assert code == 0, stderr
    doc = json.loads(stdout)
    ckpt = load_checkpoint(out / "checkpoint.safetensors")
    assert doc["data"] == "points" and doc["n_test"] == 15
    shift = float(torch.log(ckpt.points.scale).sum())
    assert doc["points"]["nll_nats_data_units"] == pytest.approx(doc["nll_nats"] + shift)
    code, stdout, _ = run(["eval", out / "checkpoint.safetensors"])
    assert code == 0 and "15 held-out points" in stdout and "in the data's units the test NLL is" in stdout


def test_sample_and_density_work_and_state_the_transform(csv_run, tmp_path):
    _, out, _, _ = csv_run
    code, stdout, stderr = run(["sample", out / "checkpoint.safetensors", "--n", "20", "--out", tmp_path / "s.npy"])
    assert code == 0, stderr
    assert np.load(tmp_path / "s.npy").shape == (20, 2)
    assert "standardised coordinates of mine.csv: x = mean + scale * z" in stdout
    code, stdout, stderr = run(
        ["density", out / "checkpoint.safetensors", "--resolution", "8", "--out", tmp_path / "d.npy"]
    )
    assert code == 0, stderr
    assert "standardised coordinates of mine.csv" in stdout


def test_resume_continues_on_the_stored_points(csv_run):
    data, out, _, _ = csv_run
    code, _, stderr = run(["train", "--resume", out / "checkpoint.safetensors", "--iterations", "3", "--no-progress"])
    assert code == 0, stderr
    assert "mine.csv (columns x, z)" in stderr
    code, _, err = run(["train", "--resume", out / "checkpoint.safetensors", "--iterations", "4", "--data", data])
    assert_user_error(code, err, "--data FILE", "cannot change when resuming")


@pytest.mark.parametrize("kind", ["npy", "npz"])
def test_train_on_arrays(tmp_path, kind):
    x = points()[:, :2]
    path = tmp_path / f"p.{kind}"
    if kind == "npy":
        np.save(path, x)
    else:
        np.savez(path, a=x[:, 0], b=x[:, 1])
    code, _, stderr = run(["train", "--data", path, "--iterations", "1", "--out", tmp_path / "r", *TINY])
    assert code == 0, stderr
    expected = ("0", "1") if kind == "npy" else ("a", "b")
    assert load_checkpoint(tmp_path / "r" / "checkpoint.safetensors").points.columns == expected


MALFORMED = {
    "empty.csv": (b"", "is empty"),
    "one.csv": (b"1\n2\n3\n", "only 1 column"),
    "text.csv": (b"x,y\n1,2\n3,oops\n", "line 3, column 'y': cannot read 'oops' as a number"),
    "nan.csv": (b"x,y\n1,2\nnan,4\n", "line 3, column 'x': nan is not a finite number"),
    "wide.csv": (b"a,b,c\n1,2,3\n", "has 3 columns (a, b, c); choose two"),
    "binary.csv": (b"\x00\x01\x02", "binary file"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_are_one_error_line(tmp_path, name):
    content, words = MALFORMED[name]
    path = tmp_path / name
    path.write_bytes(content)
    code, _, err = run(["train", "--data", path, "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, name, words)
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()


def test_malformed_arrays_and_flags(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([object(), None], dtype=object), allow_pickle=True)
    code, _, err = run(["train", "--data", tmp_path / "obj.npy", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "obj.npy", "refused without unpickling")
    np.savez(tmp_path / "none.npz", s=np.array(["a"]))
    code, _, err = run(["train", "--data", tmp_path / "none.npz", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "none.npz", "holds no usable array")
    code, _, err = run(["train", "--data", tmp_path / "missing.csv", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "missing.csv", "no such file")
    code, _, err = run(["train", "--data", "moons", "--columns", "x,y", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "--columns", "only for --data FILE")
    good = tmp_path / "good.csv"
    good.write_text("x,y\n" + "\n".join(f"{a},{b}" for a, b in points()[:, :2]))
    code, _, err = run(["train", "--data", good, "--columns", "x", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "columns", "two column names or positions")
    code, _, err = run(["train", "--data", good, "--holdout", "0.9", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "--holdout", "(0, 0.5]")
    code, _, err = run(["train", "--data", "nonsense", "--out", tmp_path / "r", *TINY])
    assert_user_error(code, err, "unknown data set 'nonsense'", ".csv, .npy or .npz file")
