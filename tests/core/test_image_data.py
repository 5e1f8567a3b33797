"""Image data sets: the built-in digits, exact round trips through every on-disk format, malformed files, the stream.

Every external format is written here, in its exact on-disk layout, from random uint8 arrays in ``tmp_path`` (IDX
headers by hand, CIFAR pickles, npz archives, PNG / JPEG through Pillow); nothing is downloaded.
"""

import gzip
import json
import os
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monoflow_core.data.images import (
    IMAGE_DATASETS,
    SPLITS,
    ImageDataError,
    ImageSet,
    ImageStream,
    check_image_dataset_name,
    clear_image_cache,
    image_set_shape,
    load_image_set,
)

Image = pytest.importorskip("PIL.Image")


def random_images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


def assert_set(images_set: ImageSet, expected: np.ndarray, name: str, split: str, levels: int = 256) -> None:
    assert images_set.name == name and images_set.split == split and images_set.levels == levels
    assert images_set.images.dtype == torch.uint8 and images_set.images.is_contiguous()
    assert images_set.image_shape == expected.shape[1:] and len(images_set) == expected.shape[0]
    np.testing.assert_array_equal(images_set.images.numpy(), expected)


# ----------------------------------------------------------------------------------------------------------
# names, splits, digits
# ----------------------------------------------------------------------------------------------------------


def test_names_and_splits():
    assert IMAGE_DATASETS == ("digits", "mnist", "cifar10", "imagenet32", "imagenet64", "folder")
    assert SPLITS == ("train", "validation", "test")
    assert check_image_dataset_name("MNIST") == "mnist"
    with pytest.raises(ValueError, match="unknown image data set 'svhn'; choose one of"):
        check_image_dataset_name("svhn")
    with pytest.raises(ValueError, match="unknown image data set"):
        load_image_set("svhn")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_image_set("digits", "val")
    with pytest.raises(ValueError, match="data_dir: --data mnist needs --data-dir DIR"):
        load_image_set("mnist", "train")
    with pytest.raises(ValueError, match="--data-dir"):
        image_set_shape("folder")


def test_digits_splits_match_sklearn():
    from sklearn.datasets import load_digits

    reference = load_digits().images.astype(np.uint8).reshape(-1, 1, 8, 8)
    sets = [load_image_set("digits", split) for split in SPLITS]
    assert [len(s) for s in sets] == [1000, 350, 447]
    for s, split in zip(sets, SPLITS, strict=True):
        assert s.split == split and s.levels == 17 and s.image_shape == (1, 8, 8)
        assert s.images.dtype == torch.uint8 and s.images.is_contiguous()
    # Disjoint and in order: the three splits concatenated are exactly scikit-learn's array.
    np.testing.assert_array_equal(torch.cat([s.images for s in sets]).numpy(), reference)
    assert int(sets[0].images.max()) == 16
    assert image_set_shape("digits") == (1, 8, 8)
    assert "n=447" in repr(sets[2]) and "tensor" not in repr(sets[2])


def test_returned_tensors_are_private_copies():
    first = load_image_set("DIGITS", "train")
    first.images.fill_(0)
    again = load_image_set("digits", "train")
    assert int(again.images.max()) == 16


def test_image_set_rejects_bad_tensors():
    with pytest.raises(ValueError, match="uint8"):
        ImageSet("digits", "train", torch.zeros(2, 1, 8, 8), 17)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet("digits", "train", torch.zeros(2, 8, 8, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="contiguous"):
        ImageSet("digits", "train", torch.zeros(2, 8, 8, 3, dtype=torch.uint8).permute(0, 3, 1, 2), 17)
    with pytest.raises(ValueError, match="levels"):
        ImageSet("digits", "train", torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 1)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    for name in IMAGE_DATASETS[1:]:
        with pytest.raises(ImageDataError, match="nowhere: no such directory"):
            load_image_set(name, "train", missing)
    with pytest.raises(ImageDataError, match="nowhere: no such directory"):
        image_set_shape("cifar10", missing)


# ----------------------------------------------------------------------------------------------------------
# mnist
# ----------------------------------------------------------------------------------------------------------


def write_idx(path: Path, images: np.ndarray, magic: int = 0x00000803, cut: int = 0, extra: bytes = b"") -> None:
    n, _, rows, cols = images.shape
    payload = struct.pack(">IIII", magic, n, rows, cols) + images.tobytes() + extra
    payload = payload[: len(payload) - cut]
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize(
    ("train_name", "test_name"),
    [
        ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"),
        ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte"),
        ("train-images.idx3-ubyte", "t10k-images.idx3-ubyte"),
    ],
)
def test_mnist_round_trip(tmp_path, train_name, test_name):
    train, test = random_images(7, 1, 28, 28, seed=1), random_images(3, 1, 28, 28, seed=2)
    write_idx(tmp_path / train_name, train)
    write_idx(tmp_path / test_name, test)
    assert_set(load_image_set("mnist", "train", tmp_path), train, "mnist", "train")
    assert_set(load_image_set("mnist", "test", str(tmp_path)), test, "mnist", "test")
    assert image_set_shape("mnist", tmp_path) == (1, 28, 28)
    with pytest.raises(ValueError, match="mnist has only train and test splits"):
        load_image_set("mnist", "validation", tmp_path)


def test_mnist_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train = random_images(2, 1, 28, 28)
    write_idx(raw / "train-images-idx3-ubyte", train)
    assert_set(load_image_set("mnist", "train", tmp_path), train, "mnist", "train")


def test_mnist_cache_rereads_a_changed_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    write_idx(path, random_images(4, 1, 28, 28, seed=1))
    first = load_image_set("mnist", "train", tmp_path)
    first.images.zero_()
    np.testing.assert_array_equal(load_image_set("mnist", "train", tmp_path).images, random_images(4, 1, 28, 28, 1))
    write_idx(path, random_images(5, 1, 28, 28, seed=3))
    assert_set(load_image_set("mnist", "train", tmp_path), random_images(5, 1, 28, 28, seed=3), "mnist", "train")
    clear_image_cache()
    assert len(load_image_set("mnist", "train", tmp_path)) == 5


def test_mnist_malformed(tmp_path):
    images = random_images(3, 1, 28, 28)
    with pytest.raises(ImageDataError, match="train-images-idx3-ubyte: no such file"):
        load_image_set("mnist", "train", tmp_path)
    with pytest.raises(ImageDataError, match="t10k-images-idx3-ubyte: no such file"):
        load_image_set("mnist", "test", tmp_path)
    with pytest.raises(ImageDataError, match="train-images-idx3-ubyte: no such file"):
        image_set_shape("mnist", tmp_path)

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images, magic=0x00000801)
    with pytest.raises(
        ImageDataError,
        match=r"train-images-idx3-ubyte\.gz: not an IDX image file \(magic 0x00000801, expected 0x00000803\)",
    ):
        load_image_set("mnist", "train", tmp_path)
    with pytest.raises(ImageDataError, match="not an IDX image file"):
        image_set_shape("mnist", tmp_path)

    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, cut=5)
    with pytest.raises(ImageDataError, match="t10k-images-idx3-ubyte: truncated"):
        load_image_set("mnist", "test", tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, extra=b"xyz")
    with pytest.raises(ImageDataError, match="t10k-images-idx3-ubyte: 3 unexpected bytes"):
        load_image_set("mnist", "test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ImageDataError, match="too short for an IDX header"):
        load_image_set("mnist", "test", tmp_path)

    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(ImageDataError, match=r"train-images-idx3-ubyte\.gz: cannot read the file"):
        load_image_set("mnist", "train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00" * 100)[:-6])
    with pytest.raises(ImageDataError, match=r"train-images-idx3-ubyte\.gz: cannot read the file"):
        load_image_set("mnist", "train", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# cifar10
# ----------------------------------------------------------------------------------------------------------


def write_cifar(path: Path, images: np.ndarray, protocol: int = 4, str_keys: bool = False) -> None:
    rows = images.reshape(len(images), -1)
    batch = {"data": rows, "labels": [0] * len(rows)} if str_keys else {b"data": rows, b"labels": [0] * len(rows)}
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_round_trip(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [random_images(3, 3, 32, 32, seed=k) for k in range(1, 6)]
    for k, batch in enumerate(batches, start=1):
        write_cifar(folder / f"data_batch_{k}", batch, protocol)
    test = random_images(4, 3, 32, 32, seed=9)
    write_cifar(folder / "test_batch", test, protocol, str_keys=True)
    assert_set(load_image_set("cifar10", "train", tmp_path), np.concatenate(batches), "cifar10", "train")
    assert_set(load_image_set("cifar10", "test", folder), test, "cifar10", "test")
    assert image_set_shape("cifar10", tmp_path) == (3, 32, 32)
    with pytest.raises(ValueError, match="cifar10 has only train and test splits"):
        load_image_set("cifar10", "validation", tmp_path)


def test_cifar_channel_planes(tmp_path):
    # A row is R plane, G plane, B plane: mark each plane with its channel number.
    row = np.repeat(np.array([10, 20, 30], dtype=np.uint8), 1024)[None]
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": row}, fh)
    image = load_image_set("cifar10", "test", tmp_path).images[0]
    assert [int(image[c].min()) for c in range(3)] == [10, 20, 30]
    assert [int(image[c].max()) for c in range(3)] == [10, 20, 30]


def python2_cifar_pickle(rows: np.ndarray) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for ``{'data': rows}``, as in the real CIFAR-10 files:
    ``numpy.core.multiarray._reconstruct`` and 8-bit strings (SHORT_BINSTRING / BINSTRING) for keys and pixels."""
    n, width = rows.shape
    raw = rows.tobytes()
    return b"".join(
        [
            b"\x80\x02}q\x00U\x04data",  # PROTO 2, EMPTY_DICT, BINPUT, key 'data'
            b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R",
            b"(K\x01M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width) + b"\x86",  # version, shape
            b"cnumpy\ndtype\nU\x02u1K\x00K\x01\x87R",  # dtype('u1', 0, 1) ...
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb",  # ... and its __setstate__
            b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tbs.",  # not fortran, pixel string; BUILD, SETITEM
        ]
    )


def test_cifar_reads_python2_pickles(tmp_path):
    images = random_images(3, 3, 32, 32, seed=5)
    (tmp_path / "test_batch").write_bytes(python2_cifar_pickle(images.reshape(3, -1)))
    assert_set(load_image_set("cifar10", "test", tmp_path), images, "cifar10", "test")


class Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_cifar_refuses_code_execution(tmp_path, capfd):
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": Evil(f"echo pwned; touch {marker}")}, fh)
    with pytest.raises(ImageDataError, match=r"test_batch: refusing to load .* global (posix|nt|os)\.system"):
        load_image_set("cifar10", "test", tmp_path)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out

    # A global that is harmless-looking but not on the list is refused too.
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"extra": print}, fh)
    with pytest.raises(ImageDataError, match=r"refusing to load .* global builtins\.print"):
        load_image_set("cifar10", "test", tmp_path)


def test_cifar_malformed(tmp_path):
    with pytest.raises(ImageDataError, match="data_batch_1: no such file"):
        load_image_set("cifar10", "train", tmp_path)
    for k in (1, 2, 4, 5):
        write_cifar(tmp_path / f"data_batch_{k}", random_images(1, 3, 32, 32))
    with pytest.raises(ImageDataError, match="data_batch_3: no such file"):
        load_image_set("cifar10", "train", tmp_path)

    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 1000), np.uint8)}, fh)
    with pytest.raises(ImageDataError, match=r"test_batch: 'data' must be a \(N, 3072\) uint8 array, got shape"):
        load_image_set("cifar10", "test", tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.float32)}, fh)
    with pytest.raises(ImageDataError, match=r"test_batch: 'data' must be .* float32"):
        load_image_set("cifar10", "test", tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    with pytest.raises(ImageDataError, match="test_batch: expected a dict"):
        load_image_set("cifar10", "test", tmp_path)
    with open(tmp_path / "test_batch", "wb") as fh:
        pickle.dump({b"labels": [1]}, fh)
    with pytest.raises(ImageDataError, match="test_batch: no 'data' entry"):
        load_image_set("cifar10", "test", tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ImageDataError, match="test_batch: not a readable CIFAR-10 batch"):
        load_image_set("cifar10", "test", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# imagenet32 / imagenet64
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size"), [("imagenet32", 32), ("imagenet64", 64)])
def test_imagenet_round_trip(tmp_path, name, size):
    sub = tmp_path / f"Imagenet{size}_train"
    sub.mkdir()
    batches = {k: random_images(2 + k % 3, 3, size, size, seed=k) for k in (1, 2, 10)}
    for k, batch in batches.items():
        save = np.savez_compressed if k == 2 else np.savez
        save(sub / f"train_data_batch_{k}.npz", data=batch.reshape(len(batch), -1), labels=np.arange(len(batch)))
    val = random_images(3, 3, size, size, seed=7)
    np.savez(tmp_path / "val_data.npz", data=val.reshape(3, -1))
    # Batches are ordered numerically (10 after 2), not as strings.
    expected = np.concatenate([batches[1], batches[2], batches[10]])
    assert_set(load_image_set(name, "train", tmp_path), expected, name, "train")
    assert_set(load_image_set(name, "test", tmp_path), val, name, "test")
    assert image_set_shape(name, tmp_path) == (3, size, size)
    with pytest.raises(ValueError, match=f"{name} has only train and test splits"):
        load_image_set(name, "validation", tmp_path)


def test_imagenet_malformed(tmp_path):
    with pytest.raises(ImageDataError, match="no train_data_batch_"):
        load_image_set("imagenet32", "train", tmp_path)
    with pytest.raises(ImageDataError, match=r"val_data\.npz: no such file"):
        load_image_set("imagenet32", "test", tmp_path)

    np.savez(tmp_path / "train_data_batch_1.npz", data=random_images(2, 3, 64, 64).reshape(2, -1))
    with pytest.raises(
        ImageDataError, match=r"train_data_batch_1\.npz: rows of 12288 values, expected 3 x 32 x 32 = 3072.*imagenet64"
    ):
        load_image_set("imagenet32", "train", tmp_path)

    np.savez(tmp_path / "val_data.npz", labels=np.arange(3))
    with pytest.raises(ImageDataError, match=r"val_data\.npz: no 'data' array"):
        load_image_set("imagenet64", "test", tmp_path)
    np.savez(tmp_path / "val_data.npz", data=np.zeros((2, 3072), np.float64))
    with pytest.raises(ImageDataError, match=r"val_data\.npz: 'data' must be a \(N, 3072\) uint8 array"):
        load_image_set("imagenet32", "test", tmp_path)
    (tmp_path / "val_data.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ImageDataError, match=r"val_data\.npz: not a readable npz file"):
        load_image_set("imagenet32", "test", tmp_path)

    sub = tmp_path / "copy"
    sub.mkdir()
    np.savez(sub / "train_data_batch_1.npz", data=random_images(2, 3, 32, 32).reshape(2, -1))
    with pytest.raises(ImageDataError, match="batch 1 appears twice"):
        load_image_set("imagenet32", "train", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# folder
# ----------------------------------------------------------------------------------------------------------


def save_png(path: Path, image: np.ndarray) -> None:
    """Saves a (C, H, W) uint8 array as a greyscale (C = 1) or RGB (C = 3) PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.shape[0] == 1:
        Image.fromarray(image[0], mode="L").save(path)
    else:
        Image.fromarray(image.transpose(1, 2, 0), mode="RGB").save(path)


def test_folder_flat_greyscale_split(tmp_path):
    images = random_images(12, 1, 6, 5, seed=4)
    # Relative paths sort as: a/00.png .. a/05.PNG, b/06.png .. b/11.png (the upper-case suffix counts too).
    names = [f"a/{i:02d}.png" for i in range(5)] + ["a/05.PNG"] + [f"b/{i:02d}.png" for i in range(6, 12)]
    for rel, image in zip(names, images, strict=True):
        save_png(tmp_path / rel, image)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"not even a png")
    test_idx = [0, 10]
    train_idx = [i for i in range(12) if i not in test_idx]
    assert_set(load_image_set("folder", "test", tmp_path), images[test_idx], "folder", "test")
    assert_set(load_image_set("folder", "train", tmp_path), images[train_idx], "folder", "train")
    assert image_set_shape("folder", tmp_path) == (1, 6, 5)
    with pytest.raises(ValueError, match="has no validation split"):
        load_image_set("folder", "validation", tmp_path)


def test_folder_split_subfolders_rgb(tmp_path):
    splits = {"train": random_images(4, 3, 7, 9, 1), "validation": random_images(2, 3, 7, 9, 2)}
    splits["test"] = random_images(3, 3, 7, 9, 3)
    for split, images in splits.items():
        for i, image in enumerate(images):
            save_png(tmp_path / split / f"img{i}.png", image)
    for split, images in splits.items():
        assert_set(load_image_set("folder", split, tmp_path), images, "folder", split)
    assert image_set_shape("folder", tmp_path) == (3, 7, 9)


def test_folder_mixed_modes_become_rgb(tmp_path):
    grey, rgb = random_images(1, 1, 4, 4, 1), random_images(1, 3, 4, 4, 2)
    save_png(tmp_path / "train" / "0.png", grey[0])
    save_png(tmp_path / "train" / "1.png", rgb[0])
    palette = Image.fromarray(rgb[0].transpose(1, 2, 0), mode="RGB").quantize(colors=8)
    (tmp_path / "test").mkdir()
    palette.save(tmp_path / "test" / "p.png")
    train = load_image_set("folder", "train", tmp_path)
    assert train.image_shape == (3, 4, 4)
    np.testing.assert_array_equal(train.images[0].numpy(), np.repeat(grey[0], 3, axis=0))
    np.testing.assert_array_equal(train.images[1].numpy(), rgb[0])
    expected = np.asarray(palette.convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(load_image_set("folder", "test", tmp_path).images[0].numpy(), expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_jpeg_is_close(tmp_path, channels):
    # JPEG is lossy: smooth images, high quality and no chroma subsampling keep the error at a few levels.
    yy, xx = np.mgrid[0:16, 0:16]
    planes = [(8 * xx + 4 * yy) % 256, (200 - 6 * yy) % 256, 128 + 0 * xx][:channels]
    image = np.stack(planes).astype(np.uint8)
    for i, suffix in enumerate(("jpg", "JPEG")):
        array = image[0] if channels == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(tmp_path / f"{i}.{suffix}", quality=95, subsampling=0)
    got = load_image_set("folder", "test", tmp_path)  # index 0: the .jpg
    assert got.image_shape == (channels, 16, 16) and len(got) == 1
    assert np.abs(got.images[0].numpy().astype(int) - image.astype(int)).mean() < 3


def test_folder_malformed(tmp_path):
    with pytest.raises(ImageDataError, match=r"no \.png/\.jpg/\.jpeg images found"):
        load_image_set("folder", "train", tmp_path)

    save_png(tmp_path / "0.png", random_images(1, 1, 5, 5)[0])
    save_png(tmp_path / "1.png", random_images(1, 1, 6, 5)[0])
    with pytest.raises(ImageDataError, match=r"1\.png: image is 5x6 \(width x height\) but .*0\.png is 5x5"):
        load_image_set("folder", "train", tmp_path)
    (tmp_path / "1.png").unlink()

    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ImageDataError, match=r"2\.png: Pillow cannot"):
        load_image_set("folder", "train", tmp_path)
    # A valid header with damaged pixel data passes the header probe and fails in the decoder.
    save_png(tmp_path / "2.png", random_images(1, 1, 5, 5)[0])
    data = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDataError, match=r"2\.png: Pillow cannot decode"):
        load_image_set("folder", "train", tmp_path)

    empty = tmp_path / "split"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    save_png(empty / "train" / "0.png", random_images(1, 1, 5, 5)[0])
    with pytest.raises(ImageDataError, match=r"test: no \.png/\.jpg/\.jpeg images in this split folder"):
        load_image_set("folder", "train", empty)


def test_folder_without_pillow(tmp_path, monkeypatch):
    save_png(tmp_path / "0.png", random_images(1, 1, 5, 5)[0])
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match="pip install pillow"):
        load_image_set("folder", "test", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# the stream
# ----------------------------------------------------------------------------------------------------------


def tiny_set(n: int = 7) -> ImageSet:
    # Image i is the single pixel value i, so a batch shows which indices it holds.
    return ImageSet("folder", "train", torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).contiguous(), 256)


def test_stream_is_seeded():
    a, b, c = ImageStream(tiny_set(), seed=5), ImageStream(tiny_set(), seed=5), ImageStream(tiny_set(), seed=6)
    draws_a = [a.next_indices(k) for k in (3, 5, 1, 9)]
    draws_b = [b.next_indices(k) for k in (3, 5, 1, 9)]
    for x, y in zip(draws_a, draws_b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(np.concatenate(draws_a), np.concatenate([c.next_indices(k) for k in (3, 5, 1, 9)]))
    batch = ImageStream(tiny_set(), seed=5).sample(4)
    assert batch.dtype == torch.uint8 and batch.shape == (4, 1, 1, 1)
    np.testing.assert_array_equal(batch.flatten().numpy(), [*draws_a[0].tolist(), draws_a[1][0]])


def test_stream_epochs_visit_every_index_once():
    n = 7
    stream = ImageStream(tiny_set(n), seed=1)
    drawn = np.concatenate([stream.next_indices(k) for k in (3, 3, 3, 3, 10, 6, 2, 5)])  # 35 = 5 epochs
    assert drawn.dtype == np.int64 and stream.epoch == 5 and stream.position == 0
    epochs = drawn.reshape(5, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert len({tuple(e) for e in epochs.tolist()}) > 1  # a new permutation each epoch


def test_stream_state_round_trip():
    images = load_image_set("digits", "validation")
    stream = ImageStream(images, seed=11)
    for k in (100, 200, 37):
        stream.sample(k)
    state = json.loads(json.dumps(stream.state_dict()))
    ahead = [stream.sample(k) for k in (64, 300, 7)]
    resumed = ImageStream(load_image_set("digits", "validation"), seed=0)
    resumed.load_state_dict(state)
    for x, k in zip(ahead, (64, 300, 7), strict=True):
        assert torch.equal(resumed.sample(k), x)
    assert resumed.state_dict() == stream.state_dict()

    with pytest.raises(ValueError, match="state belongs to a stream over"):
        ImageStream(load_image_set("digits", "test")).load_state_dict(state)
    with pytest.raises(ValueError, match="expects a dict"):
        resumed.load_state_dict({"seed": 1})
    with pytest.raises(ValueError, match="positive int"):
        resumed.next_indices(0)
    with pytest.raises(ValueError, match="non-negative int"):
        ImageStream(images, seed=-1)
