"""Image data sets for monoflow: readers for the usual on-disk formats and a seeded, resumable batch stream.

Every set is returned as an :class:`ImageSet`: a ``uint8`` tensor of shape ``(N, C, H, W)`` holding integer
intensities in ``[0, levels - 1]`` (the flow's dequantisation and scaling happen elsewhere, so the raw levels are
kept exactly). The sets and their on-disk formats:

* ``digits``: built in, scikit-learn's ``load_digits`` (1797 greyscale 8 x 8 images with values 0..16, so
  ``levels = 17``); train = images 0-999, validation = 1000-1349, test = 1350-1796, in scikit-learn's order.
* ``mnist``: the IDX files ``train-images-idx3-ubyte`` / ``t10k-images-idx3-ubyte`` (also spelled
  ``train-images.idx3-ubyte``), plain or gzipped, in ``data_dir`` or in torchvision's ``data_dir/MNIST/raw``.
  The 16-byte header is big-endian: magic ``0x00000803`` (unsigned byte, 3 dimensions), then N, rows, cols.
* ``cifar10``: the "python version" batches ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` in
  ``data_dir`` or ``data_dir/cifar-10-batches-py``. They are pickles, so they are read with a restricted
  unpickler that resolves only the few numpy globals an array needs (see ``_CifarUnpickler`` in
  :mod:`monoflow_core.data.image_formats`); a pickle that names anything else is refused before it can run.
* ``imagenet32`` / ``imagenet64``: downsampled ImageNet (Chrabaszcz, Loshchilov and Hutter, 2017) in its npz
  format, ``train_data_batch_<k>.npz`` and ``val_data.npz`` in ``data_dir`` or one folder below it, read with
  ``allow_pickle=False``.
* ``folder``: PNG / JPEG files anywhere under ``data_dir`` (hidden files and folders skipped), decoded with
  Pillow (an optional dependency, imported only here). ``train`` / ``test`` (and optionally ``validation``)
  subfolders define the splits; without them every tenth file in sorted order is a test image. Images become
  greyscale (C = 1) only if every file is greyscale, else RGB (palette images count as colour); alpha is
  dropped, not composited, and pixels are taken as stored (no EXIF rotation). 16-bit and float images are refused.

CIFAR rows and the ImageNet npz rows are ``3 * S * S`` bytes laid out as an R plane, a G plane and a B plane,
so a plain reshape to ``(N, 3, S, S)`` is already channel-first.

Only ``train``, ``validation`` and ``test`` exist as split names; mnist, cifar10 and imagenet have no official
validation split and asking for one is a ``ValueError`` (carving one out of train is the caller's decision).

Caching: decoded arrays of up to :data:`CACHE_MAX_BYTES` in total are kept in-process, keyed by set, split,
resolved folder and the ``(path, size, mtime)`` of every source file, so an edited file is re-read. The cached
array is marked read-only and :func:`load_image_set` always hands out a *copy* of it: torch has no read-only
tensors, so a copy is the only way to guarantee that one caller's in-place edit cannot leak into another's data.
A set too large for the cache (ImageNet train) is not cached and the caller gets the only copy, so no memory is
doubled where it matters.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .image_formats import (
    cifar_files,
    decode_images,
    find_mnist_file,
    folder_layout,
    folder_splits,
    imagenet_files,
    load_cifar,
    load_imagenet,
    load_mnist,
    read_idx,
)
from .image_set import ImageDataError, ImageSet, PathLike
from .image_stream import ImageStream

__all__ = [
    "CACHE_MAX_BYTES",
    "IMAGE_DATASETS",
    "SPLITS",
    "ImageDataError",
    "ImageSet",
    "ImageStream",
    "check_image_dataset_name",
    "clear_image_cache",
    "image_set_shape",
    "load_image_set",
]

#: Names of the image data sets, for ``--data``.
IMAGE_DATASETS: tuple[str, ...] = ("digits", "mnist", "cifar10", "imagenet32", "imagenet64", "folder")

#: Split names understood by :func:`load_image_set`.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Upper bound on the bytes of decoded images kept in the in-process cache (least recently used evicted first).
#: 1 GiB holds mnist (~55 MB) and cifar10 (~180 MB) comfortably and keeps ImageNet train (4-16 GB) out.
CACHE_MAX_BYTES: int = 1 << 30


_DIGITS_RANGES: dict[str, tuple[int, int]] = {"train": (0, 1000), "validation": (1000, 1350), "test": (1350, 1797)}
_DIGITS_LEVELS = 17
_IMAGENET_SIZES: dict[str, int] = {"imagenet32": 32, "imagenet64": 64}
_IDX_UBYTE_3D_MAGIC = 0x00000803
_CIFAR_ROW = 3 * 32 * 32
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})

# What each set expects to find in --data-dir, for the error raised when the folder is missing.
_DIR_HINTS: dict[str, str] = {
    "mnist": "a folder holding train-images-idx3-ubyte[.gz] and t10k-images-idx3-ubyte[.gz]",
    "cifar10": "a folder holding the python-version CIFAR-10 batches (data_batch_1..5, test_batch)",
    "imagenet32": "a folder holding the downsampled-ImageNet train_data_batch_*.npz and val_data.npz files",
    "imagenet64": "a folder holding the downsampled-ImageNet train_data_batch_*.npz and val_data.npz files",
    "folder": "a folder of .png/.jpg/.jpeg images, optionally split into train/ and test/ subfolders",
}


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------


def check_image_dataset_name(name: str) -> str:
    """Validates an image data set name.

    Args:
        name: one of :data:`IMAGE_DATASETS` (matched case-insensitively).

    Returns:
        The canonical (lower-case) name.

    Raises:
        ValueError: if ``name`` is not a known image data set; the message lists the valid names.
    """
    if isinstance(name, str) and name.lower() in IMAGE_DATASETS:
        return name.lower()
    raise ValueError(f"data: unknown image data set {name!r}; choose one of {list(IMAGE_DATASETS)}")


def _check_split(split: str) -> str:
    if isinstance(split, str) and split.lower() in SPLITS:
        return split.lower()
    raise ValueError(f"data: unknown split {split!r}; choose one of {list(SPLITS)}")


def _no_validation(name: str) -> ValueError:
    return ValueError(
        f"data: {name} has only train and test splits, no validation split; hold out part of train yourself "
        "(or use --data digits / a folder with a validation/ subfolder)"
    )


def _require_dir(name: str, data_dir: PathLike | None) -> Path:
    """Returns the resolved data folder of a set that lives on disk; ``None`` or a missing folder is an error."""
    if data_dir is None:
        raise ValueError(f"data_dir: --data {name} needs --data-dir DIR ({_DIR_HINTS[name]}); nothing is downloaded")
    path = Path(os.fspath(data_dir)).expanduser()
    if not path.exists():
        raise ImageDataError(f"{name}: {path}: no such directory")
    if not path.is_dir():
        raise ImageDataError(f"{name}: {path}: not a directory")
    return path.resolve()


def _signature(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """``(path, size, mtime_ns)`` of every file: part of the cache key, so that a replaced file is re-read."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# in-process cache (see the module docstring for why callers always receive a copy)
# ----------------------------------------------------------------------------------------------------------

_cache: OrderedDict[Hashable, np.ndarray] = OrderedDict()
_cache_lock = threading.Lock()


def clear_image_cache() -> None:
    """Drops every decoded image array kept by :func:`load_image_set` (frees the memory)."""
    with _cache_lock:
        _cache.clear()
    folder_layout.cache_clear()


def _load_cached(key: Hashable, load: Callable[[], np.ndarray]) -> Tensor:
    """Returns the caller's own tensor for ``key``: a copy of the cached array, or the freshly loaded one."""
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
    if cached is not None:
        return torch.from_numpy(cached.copy())
    # Loading happens outside the lock: two threads may decode the same set once each, which is harmless,
    # while holding the lock would serialise every unrelated load behind a multi-second decode.
    array = np.require(load(), dtype=np.uint8, requirements=["C", "W"])
    if array.nbytes > CACHE_MAX_BYTES:
        return torch.from_numpy(array)
    kept = array.copy()
    kept.setflags(write=False)
    with _cache_lock:
        _cache[key] = kept
        total = sum(a.nbytes for a in _cache.values())
        while total > CACHE_MAX_BYTES and len(_cache) > 1:
            _, dropped = _cache.popitem(last=False)
            total -= dropped.nbytes
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------------------------------
# digits (scikit-learn)
# ----------------------------------------------------------------------------------------------------------


def _load_digits() -> np.ndarray:
    """All 1797 scikit-learn digits as uint8 ``(1797, 1, 8, 8)``; the float64 values 0..16 are checked exact."""
    from sklearn.datasets import load_digits  # lazy: importing scikit-learn costs ~1.5 s

    raw = np.asarray(load_digits().images)
    array = raw.astype(np.uint8)
    if raw.shape != (1797, 8, 8) or not np.array_equal(array, raw) or int(array.max()) >= _DIGITS_LEVELS:
        raise RuntimeError(f"data: scikit-learn's load_digits returned unexpected data (shape {raw.shape})")
    return array.reshape(-1, 1, 8, 8)


def _check_decoded_size(root: Path, split: str, count: int, shape: tuple[int, int, int]) -> None:
    """Refuse a split whose decoded pixels cannot fit in memory, judged from the image headers alone.

    A folder of photos decodes to ``count x C x H x W`` bytes, plus the cache's copy of a split up to
    :data:`CACHE_MAX_BYTES`; asking for it anyway ends in an out-of-memory kill, after minutes of decoding.
    """
    from ..resources import available_memory, format_bytes

    c, h, w = shape
    need = count * c * h * w
    if need <= CACHE_MAX_BYTES:
        need *= 2
    budget = available_memory()
    if budget is not None and need > budget:
        images = f"{count} image{'s' if count != 1 else ''}"
        raise ImageDataError(
            f"folder: {root}: the {split} split's {images} of {w} x {h} pixels ({c} channel"
            f"{'s' if c > 1 else ''}) need about {format_bytes(need)} of memory once decoded, but only "
            f"{format_bytes(budget)} is available; resize the images (the image models train on 8 x 8 to 64 x 64 "
            "pixels) or use fewer"
        )


# ----------------------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------------------


def load_image_set(name: str, split: str = "train", data_dir: PathLike | None = None) -> ImageSet:
    """Loads one split of an image data set.

    Args:
        name: one of :data:`IMAGE_DATASETS` (case-insensitive).
        split: ``"train"``, ``"validation"`` or ``"test"``. mnist, cifar10 and imagenet have no validation split;
            a folder has one only if it has a ``validation/`` subfolder next to ``train/`` and ``test/``.
        data_dir: the folder holding the files; required for every set except ``digits`` (ignored there).

    Returns:
        An :class:`ImageSet` whose tensor is the caller's own (a copy when the data came from the cache).

    Raises:
        ValueError: an unknown name or split, a split the set does not have, or a missing ``data_dir``.
        ImageDataError: a missing or malformed file; the message names the file and the problem.
        ImportError: ``folder`` without Pillow installed.
    """
    name = check_image_dataset_name(name)
    split = _check_split(split)
    if name == "digits":
        lo, hi = _DIGITS_RANGES[split]
        full = _load_cached(("digits",), _load_digits)
        return ImageSet(name, split, full[lo:hi].clone(), _DIGITS_LEVELS)
    root = _require_dir(name, data_dir)
    if name != "folder" and split == "validation":
        raise _no_validation(name)
    if name == "mnist":
        path = find_mnist_file(root, split)
        images = _load_cached((name, split, _signature([path])), lambda: load_mnist(path))
    elif name == "cifar10":
        files = cifar_files(root, split)
        images = _load_cached((name, split, _signature(files)), lambda: load_cifar(files))
    elif name in _IMAGENET_SIZES:
        files = imagenet_files(name, root, split)
        images = _load_cached((name, split, _signature(files)), lambda: load_imagenet(name, files))
    else:
        splits, every_file = folder_splits(root)
        if split not in splits:
            raise ValueError(
                f"data: folder {root} has no validation split; add a validation/ subfolder next to train/ and "
                "test/, or hold out part of train yourself"
            )
        signature = _signature(every_file)
        shape = folder_layout(signature)
        files = splits[split]
        _check_decoded_size(root, split, len(files), shape)
        images = _load_cached((name, split, signature), lambda: decode_images(files, shape))
    return ImageSet(name, split, images, 256)


def image_set_shape(name: str, data_dir: PathLike | None = None) -> tuple[int, int, int]:
    """Returns the ``(C, H, W)`` of a data set's images without decoding them where possible.

    digits, cifar10 and imagenet have fixed shapes (the folder is only checked to exist), mnist reads the
    16-byte header of its train (else test) file, and a folder opens every image's header (no pixel decoding).

    Args:
        name: one of :data:`IMAGE_DATASETS` (case-insensitive).
        data_dir: as for :func:`load_image_set`.

    Raises:
        ValueError: an unknown name or a missing ``data_dir``.
        ImageDataError: the folder or the files that decide the shape are missing or malformed.
    """
    name = check_image_dataset_name(name)
    if name == "digits":
        return (1, 8, 8)
    root = _require_dir(name, data_dir)
    if name == "cifar10":
        return (3, 32, 32)
    if name in _IMAGENET_SIZES:
        size = _IMAGENET_SIZES[name]
        return (3, size, size)
    if name == "mnist":
        try:
            path = find_mnist_file(root, "train")
        except ImageDataError as missing_train:
            # Only a test file is enough to know the shape; with neither, the train file is the one to report.
            try:
                path = find_mnist_file(root, "test")
            except ImageDataError:
                raise missing_train from None
        (_, rows, cols), _ = read_idx(path, header_only=True)
        return (1, rows, cols)
    _, every_file = folder_splits(root)
    return folder_layout(_signature(every_file))
