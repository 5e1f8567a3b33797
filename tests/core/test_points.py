"""A user's own 2-D points: reading CSV / NPY / NPZ files, the held-out split, the standardisation, the batch stream,
training on them and their place in checkpoints (with hostile checkpoints refused before anything is built)."""

from __future__ import annotations

import json
import struct
import zipfile

import numpy as np
import pytest
import torch

from monoflow_core.checkpoint import CheckpointError, load_checkpoint
from monoflow_core.config import FlowConfig, TrainConfig
from monoflow_core.data import (
    POINTS_DATA,
    PointDataError,
    PointStream,
    ToyStream,
    load_points,
    make_point_set,
    point_files,
)
from monoflow_core.data.points import MIN_POINTS
from monoflow_core.training import Trainer

torch.set_num_threads(1)


def raw_points(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)) * [3.0, 0.1, 50.0] + [10.0, 5.0, -7.0]


def write_csv(path, rows, header="x,y,z"):
    lines = ([header] if header else []) + [",".join(repr(float(v)) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- reading files ---------------------------------------------------------------------------------------------


def test_csv_with_header_reads_the_chosen_columns(tmp_path):
    x = raw_points()
    ps = load_points(write_csv(tmp_path / "p.csv", x), ("x", "z"))
    assert ps.columns == ("x", "z") and ps.source == "p.csv"
    back = np.concatenate([ps.to_data(ps.train), ps.to_data(ps.test)])
    # Every row of the chosen columns comes back, in the file's units, once.
    np.testing.assert_allclose(np.sort(back, axis=0), np.sort(x[:, [0, 2]], axis=0), rtol=1e-12)


def test_positions_and_separators(tmp_path):
    x = raw_points()
    text = "\n".join("\t".join(repr(float(v)) for v in row) for row in x)
    path = tmp_path / "p.tsv"
    path.write_text("# a comment line\n" + text + "\n\n")
    by_position = load_points(path, (1, "2"))
    assert by_position.columns == ("1", "2")
    np.testing.assert_allclose(
        by_position.mean.numpy(),
        x[:, [1, 2]][np.sort(np.random.default_rng(1234).permutation(len(x))[40:])].mean(axis=0),
    )
    semicolons = tmp_path / "s.csv"
    semicolons.write_text("a;b\n" + "\n".join(f"{r[0]};{r[1]}" for r in x))
    assert load_points(semicolons).columns == ("a", "b")  # two columns: no choice needed


def test_a_text_label_column_is_fine_when_not_chosen(tmp_path):
    x = raw_points()
    path = tmp_path / "labels.csv"
    path.write_text("x,y,label\n" + "\n".join(f"{r[0]},{r[1]},cat{i % 3}" for i, r in enumerate(x)))
    assert load_points(path, ("x", "y")).n_points == len(x)


def test_npy_and_npz(tmp_path):
    x = raw_points()
    np.save(tmp_path / "p.npy", x)
    a = load_points(tmp_path / "p.npy", (0, 2))
    np.savez(tmp_path / "p.npz", X=x[:, :2], label=np.arange(len(x)))
    b = load_points(tmp_path / "p.npz", ("X[0]", "X[1]"))
    np.savez_compressed(tmp_path / "cols.npz", u=x[:, 0], v=x[:, 2])
    c = load_points(tmp_path / "cols.npz")  # two 1-D arrays: two columns, no choice needed
    torch.testing.assert_close(a.train, c.train)
    assert c.columns == ("u", "v") and b.columns == ("X[0]", "X[1]")
    assert float(b.mean[0]) == pytest.approx(float(a.mean[0]))  # the same first column, from X[0]


def test_the_split_is_seeded_and_disjoint(tmp_path):
    x = raw_points(101)[:, :2]
    a = make_point_set(x, source="a", holdout=0.2, split_seed=7)
    b = make_point_set(x, source="a", holdout=0.2, split_seed=7)
    c = make_point_set(x, source="a", holdout=0.2, split_seed=8)
    assert a.test.shape[0] == 20 and a.train.shape[0] == 81
    torch.testing.assert_close(a.test, b.test)
    assert not torch.equal(a.test, c.test)
    test_rows = {tuple(r) for r in np.round(a.to_data(a.test), 9)}
    train_rows = {tuple(r) for r in np.round(a.to_data(a.train), 9)}
    assert not test_rows & train_rows and len(test_rows | train_rows) == 101


def test_standardisation_is_the_training_part_and_is_kept(tmp_path):
    ps = make_point_set(raw_points()[:, :2], source="s")
    torch.testing.assert_close(ps.train.mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ps.train.std(0, unbiased=False), torch.ones(2, dtype=torch.float64))
    assert ps.log_scale == pytest.approx(float(np.log(ps.scale.numpy()).sum()))
    assert "mean (" in ps.describe() and "scale (" in ps.describe() and "held out (20%" in ps.describe()
    z = np.array([[0.5, -1.0]])
    np.testing.assert_allclose(ps.standardise(ps.to_data(z)), z)


def test_drawn_points_keep_the_identity():
    x = raw_points()[:, :2] / 10
    ps = make_point_set(x, source="drawing", standardise=False)
    assert ps.is_identity and ps.log_scale == 0.0
    assert "identity" in ps.describe()


BAD_CSV = {
    "empty.csv": ("", "is empty"),
    "blank.csv": ("\n\n# only a comment\n", "holds no points"),
    "header-only.csv": ("x,y\n", "holds no points"),
    "one-column.csv": ("1\n2\n3\n", "only 1 column"),
    "text.csv": ("x,y\n1,2\n3,abc\n", "line 3, column 'y': cannot read 'abc' as a number"),
    "nan.csv": ("x,y\n1,2\n3,4\nnan,5\n", "line 4, column 'x': nan is not a finite number"),
    "inf.csv": ("x,y\n1,2\n3,inf\n4,-inf\n", "line 3, column 'y': inf is not a finite number (2 rows in all)"),
    "ragged.csv": ("x,y\n1,2\n3\n", "line 3 has 1 field, the header has 2"),
    "three.csv": ("x,y,z\n1,2,3\n", "has 3 columns (x, y, z); choose two"),
    "few.csv": ("x,y\n1,2\n3,4\n5,7\n", f"at least {MIN_POINTS} are needed"),
    "constant.csv": ("x,y\n" + "".join(f"{i},3\n" for i in range(30)), "column 'y' is constant"),
    "huge.csv": ("x,y\n" + "".join(f"{i}e200,{i}\n" for i in range(1, 30)), "cannot be standardised"),
    "latin1.csv": (b"x,\xe9\n1,2\n".decode("latin-1"), "not a UTF-8 text file"),
}


@pytest.mark.parametrize("name", sorted(BAD_CSV))
def test_malformed_csv_files_get_one_clear_error(tmp_path, name):
    text, words = BAD_CSV[name]
    path = tmp_path / name
    path.write_bytes(text.encode("latin-1") if name == "latin1.csv" else text.encode())
    with pytest.raises(PointDataError) as info:
        load_points(path)
    assert words in str(info.value) and name in str(info.value)


def test_column_choices_are_checked(tmp_path):
    path = write_csv(tmp_path / "p.csv", raw_points())
    for columns, words in (
        (("x", "q"), "no column named 'q'; the file has x, y, z"),
        (("x", "x"), "the same"),
        ((0, 9), "no column 9"),
        (("x",), "choose exactly two"),
        (None, "choose two"),
    ):
        with pytest.raises(PointDataError, match=r"p\.csv") as info:
            load_points(path, columns)
        assert words in str(info.value)
    dup = tmp_path / "dup.csv"
    dup.write_text("x,x,y\n" + "\n".join(f"{r[0]},{r[1]},{r[2]}" for r in raw_points()))
    with pytest.raises(PointDataError, match="ambiguous"):
        load_points(dup, ("x", "y"))
    assert load_points(dup, ("1", "y")).columns == ("x", "y")  # by position


def test_malformed_arrays(tmp_path):
    cases = {}
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    cases["obj.npy"] = "Python objects"
    np.save(tmp_path / "one.npy", np.arange(20.0))
    cases["one.npy"] = "1-D array"
    np.save(tmp_path / "cube.npy", np.zeros((4, 2, 2)))
    cases["cube.npy"] = "3 dimensions"
    np.save(tmp_path / "str.npy", np.array([["a", "b"]]))
    cases["str.npy"] = "not real numbers"
    nan = raw_points()[:, :2]
    nan[17, 1] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases["nan.npy"] = "row 17, column '1': nan is not a finite number"
    np.savez(tmp_path / "strings.npz", s=np.array(["a", "b"]))
    cases["strings.npz"] = "holds no usable array"
    np.savez(tmp_path / "empty.npz")
    cases["empty.npz"] = "holds no usable array"
    np.savez(tmp_path / "uneven.npz", a=np.arange(20.0), b=np.arange(30.0))
    cases["uneven.npz"] = "different lengths"
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage" * 4)
    cases["garbage.npy"] = "not a valid .npy array"
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    cases["garbage.npz"] = "not a valid .npz archive"
    (tmp_path / "pickle.npy").write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    cases["pickle.npy"] = "not a valid .npy array"
    np.save(tmp_path / "trunc.npy", raw_points())
    data = (tmp_path / "trunc.npy").read_bytes()
    (tmp_path / "trunc.npy").write_bytes(data[: len(data) // 2])
    cases["trunc.npy"] = "truncated or corrupted"
    for name, words in cases.items():
        with pytest.raises(PointDataError) as info:
            load_points(tmp_path / name, (0, 1) if name.endswith(".npy") else None)
        assert words in str(info.value) and name in str(info.value), (name, str(info.value))


def test_a_compressed_archive_cannot_expand_beyond_the_bound(tmp_path, monkeypatch):
    # The declared shape is read from the member's header before any data is decompressed.
    monkeypatch.setattr(point_files, "MAX_POINTS", 1000)
    np.savez_compressed(tmp_path / "bomb.npz", a=np.zeros((5000, 2)))
    with pytest.raises(PointDataError, match="5,000 rows; at most 1,000"):
        load_points(tmp_path / "bomb.npz")


def test_oversized_and_special_files(tmp_path, monkeypatch):
    path = write_csv(tmp_path / "p.csv", raw_points())
    monkeypatch.setattr(point_files, "MAX_FILE_BYTES", 100)
    with pytest.raises(PointDataError, match="point files are limited to"):
        load_points(path, ("x", "y"))
    with pytest.raises(PointDataError, match="is a directory"):
        load_points(tmp_path)
    with pytest.raises(PointDataError, match="no such file"):
        load_points(tmp_path / "missing.csv")


# -- the stream, training and checkpoints ----------------------------------------------------------------------


def small_run(tmp_path, holdout=0.2):
    ps = make_point_set(raw_points(300)[:, :2], source="p.csv", columns=("x", "y"), holdout=holdout)
    model = FlowConfig(blocks=1)
    train = TrainConfig(data=POINTS_DATA, batch_size=32, eval_every=2, iterations=10)
    return Trainer(model, train, points=ps)


def test_stream_draws_training_points_and_resumes_exactly():
    ps = make_point_set(raw_points(120)[:, :2], source="s")
    stream = PointStream(ps, seed=3)
    first = stream.sample(50, torch.float64)
    train_rows = {tuple(r) for r in ps.train.tolist()}
    assert all(tuple(r) in train_rows for r in first.tolist())  # never a held-out point
    state = json.loads(json.dumps(stream.state_dict()))
    expected = stream.sample(40)
    other = PointStream(ps, seed=99)
    other.load_state_dict(state)
    torch.testing.assert_close(other.sample(40), expected)
    with pytest.raises(ValueError, match="training points"):
        PointStream(make_point_set(raw_points(60)[:, :2], source="t"), 0).load_state_dict(state)


def test_trainer_needs_points_exactly_for_points_data():
    ps = make_point_set(raw_points()[:, :2], source="s")
    with pytest.raises(ValueError, match="PointSet"):
        Trainer(FlowConfig(blocks=1), TrainConfig(data=POINTS_DATA))
    with pytest.raises(ValueError, match="PointSet"):
        Trainer(FlowConfig(blocks=1), TrainConfig(data="moons"), points=ps)


def test_tests_use_the_held_out_points(tmp_path):
    trainer = small_run(tmp_path)
    trainer.run(2)
    ev = trainer.eval_history[-1]
    assert ev.n_test == 60 and ev.fixed  # the held-out 20% of 300, never fresh samples
    flow = trainer.evaluation_copy()
    from monoflow_core import evaluation

    expected = -float(evaluation.log_prob(flow, trainer.points.test).mean())
    assert ev.nll_nats == pytest.approx(expected, rel=1e-9)
    assert trainer.paper_protocol() is None  # the paper's fresh-sample protocol does not apply


def test_checkpoint_reopens_with_its_points_and_resumes_exactly(tmp_path):
    trainer = small_run(tmp_path)
    trainer.run(3)
    path = trainer.save_checkpoint(tmp_path / "c.safetensors")
    trainer.run(3)
    ckpt = load_checkpoint(path)
    assert ckpt.points is not None and ckpt.points.source == "p.csv" and ckpt.points.columns == ("x", "y")
    for name in ("train", "test", "mean", "scale"):
        torch.testing.assert_close(getattr(ckpt.points, name), getattr(trainer.points, name), rtol=0, atol=0)
    resumed = Trainer.from_checkpoint(ckpt)
    resumed.run(3)
    assert [m.loss for m in resumed.history][-3:] == [m.loss for m in trainer.history][-3:]


def test_other_checkpoints_hold_no_points(tmp_path):
    trainer = Trainer(FlowConfig(blocks=1), TrainConfig(data="moons", batch_size=16, eval_every=0))
    trainer.step()
    assert load_checkpoint(trainer.save_checkpoint(tmp_path / "m.safetensors")).points is None


# -- hostile checkpoints ---------------------------------------------------------------------------------------


def _rewrite(path, edit):
    """Rewrite a safetensors file's header through ``edit(header) -> header`` (and its data through it too)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    header, data = edit(header, data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data))


@pytest.fixture(scope="module")
def points_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pts")
    trainer = small_run(tmp)
    trainer.run(1)
    return trainer.save_checkpoint(tmp / "c.safetensors").read_bytes()


def _tensor_slice(header, name):
    start, end = header[name]["data_offsets"]
    return start, end


def hostile_cases():
    def drop_scale(h, d):
        del h["data.scale"]
        return h, d

    def shape(h, d):
        h["data.mean"]["shape"] = [1]
        start, _ = h["data.mean"]["data_offsets"]
        h["data.mean"]["data_offsets"] = [start, start + 8]
        return h, d

    def dtype(h, d):
        h["data.scale"]["dtype"] = "I64"
        return h, d

    def nan_scale(h, d):
        start, _ = h["data.scale"]["data_offsets"]
        d[start : start + 8] = struct.pack("<d", float("nan"))
        return h, d

    def zero_scale(h, d):
        start, _ = h["data.scale"]["data_offsets"]
        d[start : start + 8] = struct.pack("<d", 0.0)
        return h, d

    def inf_point(h, d):
        start, _ = h["data.train"]["data_offsets"]
        d[start : start + 8] = struct.pack("<d", float("inf"))
        return h, d

    def no_info(h, d):
        del h["__metadata__"]["points"]
        return h, d

    def bad_info(h, d):
        h["__metadata__"]["points"] = json.dumps({"source": "x", "columns": ["a"], "holdout": 0.2, "split_seed": 1})
        return h, d

    def bad_holdout(h, d):
        info = json.loads(h["__metadata__"]["points"])
        info["holdout"] = 7
        h["__metadata__"]["points"] = json.dumps(info)
        return h, d

    def stream_size(h, d):
        state = json.loads(h["__metadata__"]["trainer_state"])
        state["stream"]["size"] = 5
        h["__metadata__"]["trainer_state"] = json.dumps(state)
        return h, d

    def toy_data(h, d):
        config = json.loads(h["__metadata__"]["train_config"])
        config["data"] = "moons"
        h["__metadata__"]["train_config"] = json.dumps(config)
        state = json.loads(h["__metadata__"]["trainer_state"])
        state["stream"] = ToyStream("moons", 0).state_dict()  # a valid toy run, but with data.* tensors
        h["__metadata__"]["trainer_state"] = json.dumps(state)
        return h, d

    def no_tensors(h, d):
        for key in [k for k in h if k.startswith("data.")]:
            del h[key]
        return h, d

    return {
        "missing tensor": (drop_scale, "missing ['scale']"),
        "wrong shape": (shape, "data.mean must have shape [2]"),
        "wrong dtype": (dtype, "data.scale must be float64"),
        "nan scale": (nan_scale, "data.scale holds non-finite values"),
        "zero scale": (zero_scale, "data.scale must be positive"),
        "inf point": (inf_point, "data.train holds non-finite values"),
        "no description": (no_info, "metadata entry 'points' is missing"),
        "bad description": (bad_info, "columns must be a list of two names"),
        "bad holdout": (bad_holdout, "holdout must be a number in (0, 0.5]"),
        "stream of another size": (stream_size, "saved for 5 training points"),
        "points on a toy run": (toy_data, "only a run on 'points' stores point data"),
        "points run without points": (no_tensors, "must store its points"),
    }


@pytest.mark.parametrize("case", sorted(hostile_cases()))
def test_hostile_point_data_in_checkpoints_is_refused(points_checkpoint, tmp_path, case):
    edit, words = hostile_cases()[case]
    path = tmp_path / "c.safetensors"
    path.write_bytes(points_checkpoint)
    _rewrite(path, edit)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert words in str(info.value) and str(path) in str(info.value)


def test_hostile_npz_member_names_are_only_labels(tmp_path):
    # A member name is a label, never a path: nothing is extracted.
    path = tmp_path / "odd.npz"
    with zipfile.ZipFile(path, "w") as archive:
        for key, values in (("../../x", raw_points()[:, 0]), ("y", raw_points()[:, 1])):
            buffer = tmp_path / "member.npy"
            np.save(buffer, values)
            archive.write(buffer, f"{key}.npy")
    ps = load_points(path)
    assert ps.columns == ("../../x", "y")
    assert not (tmp_path.parent.parent / "x.npy").exists()
