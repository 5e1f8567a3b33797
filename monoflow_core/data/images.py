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
  unpickler that resolves only the few numpy globals an array needs (see :class:`_CifarUnpickler`); a pickle that
  names anything else is refused before it can run.
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

import functools
import gzip
import numbers
import os
import pickle
import re
import stat
import struct
import threading
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

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

PathLike = str | os.PathLike[str]

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


class ImageDataError(ValueError):
    """A data file is missing or malformed; the message names the file (or folder) and what is wrong."""


# ----------------------------------------------------------------------------------------------------------
# the data set record
# ----------------------------------------------------------------------------------------------------------


# eq=False: the generated __eq__ would compare tensors element-wise and fail in a bool context; identity is the
# only cheap, well-defined equality. repr=False: the default repr would print the pixels.
@dataclass(frozen=True, eq=False, repr=False)
class ImageSet:
    """One split of an image data set.

    Attributes:
        name: the data set name, one of :data:`IMAGE_DATASETS`.
        split: ``"train"``, ``"validation"`` or ``"test"``.
        images: ``uint8`` tensor of shape ``(N, C, H, W)``, contiguous, values in ``[0, levels - 1]``. It is the
            caller's own copy (never shared with the loader's cache).
        levels: number of intensity levels (17 for digits, 256 otherwise).

    Raises:
        ValueError: if ``images`` is not a contiguous 4-D uint8 tensor or ``levels`` is not in ``[2, 256]``.
    """

    name: str
    split: str
    images: Tensor
    levels: int

    def __post_init__(self) -> None:
        images = self.images
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = f"{images.dtype} tensor of shape {tuple(images.shape)}" if isinstance(images, Tensor) else images
            raise ValueError(f"data: ImageSet.images must be a uint8 (N, C, H, W) tensor, got {got!r}")
        if not images.is_contiguous():
            raise ValueError("data: ImageSet.images must be contiguous")
        if isinstance(self.levels, bool) or not isinstance(self.levels, numbers.Integral):
            raise ValueError(f"data: ImageSet.levels must be an int, got {self.levels!r}")
        if not 2 <= int(self.levels) <= 256:
            raise ValueError(f"data: ImageSet.levels must be in [2, 256], got {self.levels}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The shape ``(C, H, W)`` of one image."""
        _, c, h, w = self.images.shape
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageSet(name={self.name!r}, split={self.split!r}, n={len(self)}, image_shape={self.image_shape}, "
            f"levels={self.levels})"
        )


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


def _check_positive(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"data: {what} must be a positive int, got {n!r}")
    return int(n)


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
    _folder_layout.cache_clear()


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


# ----------------------------------------------------------------------------------------------------------
# mnist (IDX)
# ----------------------------------------------------------------------------------------------------------

_MNIST_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}


def _find_mnist_file(root: Path, split: str) -> Path:
    searched = [root, root / "MNIST" / "raw"]
    for folder in searched:
        for stem in _MNIST_STEMS[split]:
            # The plain file first: it is faster to read than its gzipped twin.
            for suffix in ("", ".gz"):
                candidate = folder / (stem + suffix)
                if candidate.is_file():
                    return candidate
    raise ImageDataError(
        f"mnist: {root / _MNIST_STEMS[split][0]}: no such file (also looked for "
        f"{_MNIST_STEMS[split][0]}.gz, {_MNIST_STEMS[split][1]}[.gz] and the MNIST/raw subfolder)"
    )


def _open_idx(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_idx(path: Path, header_only: bool = False) -> tuple[tuple[int, int, int], bytes]:
    """Reads an IDX3 unsigned-byte file; returns ``((n, rows, cols), pixel bytes)`` (no bytes if header_only)."""
    try:
        with _open_idx(path) as fh:
            data = fh.read(16) if header_only else fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        # gzip.BadGzipFile is an OSError; a truncated gzip stream is an EOFError.
        raise ImageDataError(f"mnist: {path}: cannot read the file ({exc})") from exc
    if len(data) < 16:
        raise ImageDataError(f"mnist: {path}: {len(data)} bytes, too short for an IDX header (16 bytes)")
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != _IDX_UBYTE_3D_MAGIC:
        raise ImageDataError(
            f"mnist: {path}: not an IDX image file (magic 0x{magic:08x}, expected 0x{_IDX_UBYTE_3D_MAGIC:08x})"
        )
    if n == 0 or rows == 0 or cols == 0:
        raise ImageDataError(f"mnist: {path}: the header describes no pixels ({n} images of {rows} x {cols})")
    if header_only:
        return (n, rows, cols), b""
    expected = n * rows * cols
    got = len(data) - 16
    if got < expected:
        raise ImageDataError(
            f"mnist: {path}: truncated: {got} bytes of pixels, the header promises {n} x {rows} x {cols} = {expected}"
        )
    if got > expected:
        raise ImageDataError(
            f"mnist: {path}: {got - expected} unexpected bytes after the {n} x {rows} x {cols} images of the header"
        )
    return (n, rows, cols), data


def _load_mnist(path: Path) -> np.ndarray:
    (n, rows, cols), data = _read_idx(path)
    return np.frombuffer(data, dtype=np.uint8, count=n * rows * cols, offset=16).reshape(n, 1, rows, cols).copy()


# ----------------------------------------------------------------------------------------------------------
# cifar10 (restricted pickles)
# ----------------------------------------------------------------------------------------------------------


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` in protocol-2 pickles written by Python 3, which store bytes as
    ``_codecs.encode(text, "latin1")``; only that exact use is allowed (no arbitrary codec lookup)."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is allowed only as (str, 'latin1'), got encoding {encoding!r}")
    return obj.encode("latin-1", errors)


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """Stand-in for ``numpy.core.numeric._frombuffer`` (protocol-5 pickles of arrays): the same computation,
    written here so that no numpy-internal function is handed to the unpickler."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


# numpy's array reconstructor, fetched from an array's own reduce tuple so that numpy 1.x (numpy.core) and 2.x
# (numpy._core) both work without importing a module path that one of them warns about.
_NP_RECONSTRUCT = np.ndarray((0,), np.uint8).__reduce__()[0]

_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    # Not in the original CIFAR files (Python 2, protocol 2), but a CIFAR-format batch re-saved by Python 3
    # uses one of these: protocol 2 spells bytes via _codecs.encode, protocol 5 rebuilds arrays via _frombuffer.
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild dicts, lists, bytes and numpy arrays, and nothing that runs code.

    Pickles execute code only through the globals they name (a ``GLOBAL`` opcode followed by ``REDUCE`` or
    ``BUILD``); :meth:`find_class` resolves only the numpy array reconstruction entries of
    :data:`_PICKLE_ALLOWED`, so ``os.system`` or a ``builtins.eval`` cannot even be looked up.
    """

    def __init__(self, file: BinaryIO, path: Path) -> None:
        # encoding="bytes": the original batches are Python 2 pickles whose str keys/values become bytes.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        allowed = _PICKLE_ALLOWED.get((module, name))
        if allowed is None:
            raise ImageDataError(
                f"cifar10: {self._path}: refusing to load a pickle that references global {module}.{name} "
                "(a CIFAR-10 batch only needs numpy arrays)"
            )
        return allowed


def _find_cifar_dir(root: Path, first_file: str) -> Path:
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / first_file).is_file():
            return folder
    raise ImageDataError(
        f"cifar10: {root / first_file}: no such file (nor in {root / 'cifar-10-batches-py'}); "
        "expected the python version of CIFAR-10"
    )


def _cifar_files(root: Path, split: str) -> list[Path]:
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    folder = _find_cifar_dir(root, names[0])
    files = [folder / n for n in names]
    for f in files:
        # A partial download would otherwise train silently on a fraction of the set.
        if not f.is_file():
            raise ImageDataError(f"cifar10: {f}: no such file (CIFAR-10 train needs data_batch_1 .. data_batch_5)")
    return files


def _read_cifar_batch(path: Path) -> np.ndarray:
    """Returns the ``(N, 3072)`` uint8 ``data`` array of one CIFAR batch file."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, path).load()
    except ImageDataError:
        raise
    except Exception as exc:  # a malformed pickle can raise nearly anything (EOFError, KeyError, TypeError, ...)
        raise ImageDataError(f"cifar10: {path}: not a readable CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise ImageDataError(f"cifar10: {path}: expected a dict with a 'data' entry, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    if data is None:
        raise ImageDataError(f"cifar10: {path}: no 'data' entry (keys: {sorted(map(repr, batch))})")
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[0] == 0
        or data.shape[1] != _CIFAR_ROW
    ):
        got = f"shape {data.shape}, dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ImageDataError(f"cifar10: {path}: 'data' must be a (N, {_CIFAR_ROW}) uint8 array, got {got}")
    return data


def _load_cifar(files: Sequence[Path]) -> np.ndarray:
    rows = np.concatenate([_read_cifar_batch(f) for f in files], axis=0)
    return rows.reshape(-1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# imagenet32 / imagenet64 (npz)
# ----------------------------------------------------------------------------------------------------------

_TRAIN_NPZ = re.compile(r"train_data_batch_(\d+)\.npz")


def _imagenet_files(name: str, root: Path, split: str) -> list[Path]:
    folders = [root, *sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]
    if split == "train":
        by_index: dict[int, Path] = {}
        for folder in folders:
            for f in folder.iterdir():
                match = _TRAIN_NPZ.fullmatch(f.name)
                if match is None or not f.is_file():
                    continue
                k = int(match.group(1))
                if k in by_index:
                    # Two copies of one batch (say an extracted archive next to the loose files) would double it.
                    raise ImageDataError(f"{name}: {f}: batch {k} appears twice (also {by_index[k]})")
                by_index[k] = f
        if not by_index:
            raise ImageDataError(f"{name}: {root}: no train_data_batch_*.npz files here or one folder below")
        return [by_index[k] for k in sorted(by_index)]
    found = [folder / "val_data.npz" for folder in folders if (folder / "val_data.npz").is_file()]
    if not found:
        raise ImageDataError(f"{name}: {root / 'val_data.npz'}: no such file (nor one folder below)")
    if len(found) > 1:
        raise ImageDataError(f"{name}: {found[1]}: a second val_data.npz (also {found[0]})")
    return found


def _open_npz(name: str, path: Path) -> Any:
    """``np.load`` of an npz archive, refusing anything else before it is used as one.

    ``np.load`` picks the format from the file's first bytes, whatever its name: a ``.npy`` array renamed to
    ``.npz`` comes back as a bare ndarray, which is no context manager (a ``TypeError`` before any check could
    run). Its array is memory-mapped, not read, so refusing it costs nothing.
    """
    loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ImageDataError(f"{name}: {path}: a single .npy array, not an npz archive (expected a 'data' array "
                             "inside an .npz file)")
    return loaded


def _npz_data_header(name: str, path: Path, size: int) -> int:
    """Checks the ``data`` array header of one npz file without decompressing it; returns its row count."""
    row = 3 * size * size
    try:
        with _open_npz(name, path) as npz:
            if "data" not in npz.files:
                raise ImageDataError(f"{name}: {path}: no 'data' array (arrays: {npz.files})")
            with npz.zip.open("data.npy") as fp:
                version = np.lib.format.read_magic(fp)
                if version == (1, 0):
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    except ImageDataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise ImageDataError(f"{name}: {path}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
    if dtype != np.uint8 or len(shape) != 2 or shape[0] == 0:
        raise ImageDataError(f"{name}: {path}: 'data' must be a (N, {row}) uint8 array, got {shape} {dtype}")
    if shape[1] != row:
        hint = ""
        for other, s in _IMAGENET_SIZES.items():
            if other != name and shape[1] == 3 * s * s:
                hint = f"; these look like {other} files (use --data {other})"
        raise ImageDataError(f"{name}: {path}: rows of {shape[1]} values, expected 3 x {size} x {size} = {row}{hint}")
    return int(shape[0])


def _load_imagenet(name: str, files: Sequence[Path]) -> np.ndarray:
    size = _IMAGENET_SIZES[name]
    counts = [_npz_data_header(name, f, size) for f in files]
    # Preallocating from the headers keeps the peak at the result plus one batch (ImageNet64 train is ~16 GB,
    # so concatenating a list of batches would need twice that).
    out = np.empty((sum(counts), 3, size, size), dtype=np.uint8)
    start = 0
    for f, count in zip(files, counts, strict=True):
        try:
            with _open_npz(name, f) as npz:
                data = npz["data"]
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
            raise ImageDataError(f"{name}: {f}: not a readable npz file ({type(exc).__name__}: {exc})") from exc
        if data.shape != (count, 3 * size * size) or data.dtype != np.uint8:
            raise ImageDataError(f"{name}: {f}: 'data' changed while reading (shape {data.shape})")
        out[start : start + count] = data.reshape(count, 3, size, size)
        start += count
    return out


# ----------------------------------------------------------------------------------------------------------
# folder (Pillow)
# ----------------------------------------------------------------------------------------------------------

_GREY_MODES = frozenset({"1", "L", "LA", "La"})
# 16-bit and float images have no obvious 8-bit mapping (Pillow's convert clips instead of scaling).
_UNSUPPORTED_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"})


def _import_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("reading a folder of images needs Pillow: pip install pillow") from exc
    return Image


def _list_images(root: Path) -> list[Path]:
    """Every .png/.jpg/.jpeg file under ``root`` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden folders and files are skipped: macOS "._x.png" resource forks are not images.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in _IMAGE_SUFFIXES:
                found.append(Path(dirpath) / f)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


def _folder_splits(root: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """Lists the image files of each split, and all of them in the order the size check visits them.

    With ``train/`` and ``test/`` subfolders (and optionally ``validation/``) each split is its subfolder and the
    check order is train, validation, test; otherwise every tenth file in sorted order (index % 10 == 0) is a
    test image, the rest train, and the check order is the sorted order.
    """
    if (root / "train").is_dir() and (root / "test").is_dir():
        names = ["train", "validation", "test"] if (root / "validation").is_dir() else ["train", "test"]
        splits = {s: _list_images(root / s) for s in names}
        for s, files in splits.items():
            if not files:
                raise ImageDataError(f"folder: {root / s}: no .png/.jpg/.jpeg images in this split folder")
        return splits, [p for files in splits.values() for p in files]
    files = _list_images(root)
    if not files:
        raise ImageDataError(f"folder: {root}: no .png/.jpg/.jpeg images found (searched recursively)")
    splits = {
        "train": [f for i, f in enumerate(files) if i % 10 != 0],
        "test": [f for i, f in enumerate(files) if i % 10 == 0],
    }
    return splits, files


@functools.lru_cache(maxsize=8)
def _folder_layout(signature: tuple[tuple[str, int, int], ...]) -> tuple[int, int, int]:
    """Opens the header of every image (no decoding) and returns the common ``(C, H, W)``.

    C is 1 when every file is greyscale and 3 otherwise, decided over all splits so that train and test agree.
    Cached on the files' signature: a folder of many images is probed once per process.
    """
    Image = _import_pillow()
    grey = True
    first: tuple[str, tuple[int, int]] | None = None
    for path_str, _, _ in signature:
        try:
            # A FIFO named like an image would block Image.open for ever, and a device never ends.
            if not stat.S_ISREG(os.stat(path_str).st_mode):
                raise ImageDataError(f"folder: {path_str}: not a regular file (a FIFO, device or socket)")
        except OSError as exc:
            raise ImageDataError(f"folder: {path_str}: cannot read this image ({exc.strerror or exc})") from exc
        try:
            with warnings.catch_warnings():
                # Pillow warns about images above ~89 million pixels; the size is judged below, in one message
                # naming the sizes, before anything is decoded.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path_str) as im:
                    mode, size = im.mode, im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            # UnidentifiedImageError is an OSError; SyntaxError is what some Pillow plugins raise on bad headers.
            raise ImageDataError(f"folder: {path_str}: Pillow cannot read this image ({exc})") from exc
        if mode in _UNSUPPORTED_MODES:
            raise ImageDataError(
                f"folder: {path_str}: 16-bit or floating-point images (mode {mode}) are not supported; "
                "convert the folder to 8-bit"
            )
        grey = grey and mode in _GREY_MODES
        if first is None:
            first = (path_str, size)
        elif size != first[1]:
            raise ImageDataError(
                f"folder: {path_str}: image is {size[0]}x{size[1]} (width x height) but {first[0]} is "
                f"{first[1][0]}x{first[1][1]}; all images must have the same size"
            )
    assert first is not None  # _folder_splits never returns an empty listing
    width, height = first[1]
    return (1 if grey else 3, height, width)


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


def _decode_images(paths: Sequence[Path], shape: tuple[int, int, int]) -> np.ndarray:
    Image = _import_pillow()
    c, h, w = shape
    out = np.empty((len(paths), c, h, w), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                if c == 1:
                    im2 = im.convert("L")
                elif im.mode in ("P", "PA") and "transparency" in im.info:
                    # Pillow warns when a palette with transparency goes straight to RGB; the alpha is dropped.
                    im2 = im.convert("RGBA").convert("RGB")
                else:
                    im2 = im.convert("RGB")
                pixels = np.asarray(im2, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise ImageDataError(f"folder: {path}: Pillow cannot decode this image ({exc})") from exc
        if pixels.shape[:2] != (h, w):
            raise ImageDataError(f"folder: {path}: decoded to {pixels.shape[1]}x{pixels.shape[0]}, expected {w}x{h}")
        out[i] = pixels[None] if c == 1 else pixels.transpose(2, 0, 1)
    return out


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
        path = _find_mnist_file(root, split)
        images = _load_cached((name, split, _signature([path])), lambda: _load_mnist(path))
    elif name == "cifar10":
        files = _cifar_files(root, split)
        images = _load_cached((name, split, _signature(files)), lambda: _load_cifar(files))
    elif name in _IMAGENET_SIZES:
        files = _imagenet_files(name, root, split)
        images = _load_cached((name, split, _signature(files)), lambda: _load_imagenet(name, files))
    else:
        splits, every_file = _folder_splits(root)
        if split not in splits:
            raise ValueError(
                f"data: folder {root} has no validation split; add a validation/ subfolder next to train/ and "
                "test/, or hold out part of train yourself"
            )
        signature = _signature(every_file)
        shape = _folder_layout(signature)
        files = splits[split]
        _check_decoded_size(root, split, len(files), shape)
        images = _load_cached((name, split, signature), lambda: _decode_images(files, shape))
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
            path = _find_mnist_file(root, "train")
        except ImageDataError as missing_train:
            # Only a test file is enough to know the shape; with neither, the train file is the one to report.
            try:
                path = _find_mnist_file(root, "test")
            except ImageDataError:
                raise missing_train from None
        (_, rows, cols), _ = _read_idx(path, header_only=True)
        return (1, rows, cols)
    _, every_file = _folder_splits(root)
    return _folder_layout(_signature(every_file))


# ----------------------------------------------------------------------------------------------------------
# the training stream
# ----------------------------------------------------------------------------------------------------------


class ImageStream:
    """Seeded, resumable stream of training batches: epochs of a seeded permutation (numpy Generator).

    Epoch ``e`` visits the images in the order ``numpy.random.default_rng([seed, e]).permutation(N)``; batches
    are consecutive slices of that order and continue into the next epoch's permutation when one runs out, so
    every epoch shows every image exactly once. Because each permutation is a pure function of ``(seed, e)``,
    the whole state is ``(seed, epoch, position)``: :meth:`state_dict` is a few ints (not a permutation of a
    million indices) and a resumed stream continues bit for bit.

    Args:
        images: the split to draw from (not copied; batches are gathered from ``images.images``).
        seed: a non-negative int.

    Raises:
        ValueError: an empty image set or a negative / non-integer seed.
    """

    def __init__(self, images: ImageSet, seed: int = 0) -> None:
        if not isinstance(images, ImageSet):
            raise TypeError(f"data: ImageStream needs an ImageSet, got {type(images).__name__}")
        if len(images) == 0:
            raise ValueError(f"data: ImageStream needs a non-empty image set, {images!r} is empty")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or int(seed) < 0:
            raise ValueError(f"data: ImageStream seed must be a non-negative int, got {seed!r}")
        self.images: ImageSet = images
        self.seed: int = int(seed)
        self._epoch = 0
        self._position = 0
        self._perm: np.ndarray | None = None

    def __repr__(self) -> str:
        return (
            f"ImageStream({self.images.name!r}/{self.images.split!r}, n={len(self.images)}, seed={self.seed}, "
            f"epoch={self._epoch}, position={self._position})"
        )

    @property
    def epoch(self) -> int:
        """Number of completed passes over the set (the epoch the next index comes from)."""
        return self._epoch

    @property
    def position(self) -> int:
        """How many indices of the current epoch have been handed out."""
        return self._position

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            rng = np.random.default_rng([self.seed, self._epoch])
            self._perm = rng.permutation(len(self.images)).astype(np.int64)
        return self._perm

    def next_indices(self, n: int) -> np.ndarray:
        """Returns the next ``n`` indices (int64), continuing across epoch boundaries.

        Args:
            n: a positive int (may exceed the set size; the batch then spans several epochs).
        """
        n = _check_positive(n, "the batch size n")
        size = len(self.images)
        parts: list[np.ndarray] = []
        remaining = n
        while remaining:
            take = min(remaining, size - self._position)
            parts.append(self._permutation()[self._position : self._position + take])
            self._position += take
            remaining -= take
            if self._position == size:
                self._epoch += 1
                self._position = 0
                self._perm = None
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()

    def sample(self, n: int) -> Tensor:
        """Returns the next ``n`` images, a new ``uint8`` tensor of shape ``(n, C, H, W)``."""
        return self.images.images[torch.from_numpy(self.next_indices(n))]

    def state_dict(self) -> dict[str, Any]:
        """Returns the stream's position as a JSON-serialisable dict of plain ints and strings."""
        return {
            "name": self.images.name,
            "split": self.images.split,
            "size": len(self.images),
            "seed": self.seed,
            "epoch": self._epoch,
            "position": self._position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a state saved by :meth:`state_dict` (possibly after a JSON round trip).

        Args:
            state: the dict from :meth:`state_dict`; its seed replaces this stream's seed.

        Raises:
            ValueError: a malformed state, or one saved for a set of another name, split or size.
        """
        keys = {"name", "split", "size", "seed", "epoch", "position"}
        if not isinstance(state, dict) or not keys <= state.keys():
            raise ValueError(f"data: ImageStream.load_state_dict expects a dict with keys {sorted(keys)}")
        ints = {}
        for key in ("size", "seed", "epoch", "position"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 0:
                raise ValueError(f"data: ImageStream state {key!r} must be a non-negative int, got {value!r}")
            ints[key] = int(value)
        here = (self.images.name, self.images.split, len(self.images))
        saved = (state["name"], state["split"], ints["size"])
        if saved != here:
            raise ValueError(f"data: state belongs to a stream over {saved} (name, split, size), this one is {here}")
        if ints["position"] > ints["size"]:
            raise ValueError(f"data: ImageStream state position {ints['position']} exceeds the size {ints['size']}")
        self.seed = ints["seed"]
        self._epoch, self._position = ints["epoch"], ints["position"]
        if self._position == ints["size"]:
            self._epoch, self._position = self._epoch + 1, 0
        self._perm = None
