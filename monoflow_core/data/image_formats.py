"""Readers of the on-disk image formats: MNIST's IDX files, CIFAR-10's pickled batches, downsampled ImageNet's
npz files and folders of PNG/JPEG images (through Pillow).

Each reader returns a C-contiguous ``uint8`` array ``(N, C, H, W)`` and raises :class:`ImageDataError` naming the
file and the problem. The formats themselves are described in :mod:`monoflow_core.data.images`, which is the
public entry point (caching, splits, the training stream); this module only decodes bytes.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import re
import stat
import struct
import typing
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .image_set import ImageDataError

__all__ = [
    "cifar_files",
    "decode_images",
    "find_mnist_file",
    "folder_layout",
    "folder_splits",
    "imagenet_files",
    "load_cifar",
    "load_imagenet",
    "load_mnist",
    "read_idx",
]

_IMAGENET_SIZES: dict[str, int] = {"imagenet32": 32, "imagenet64": 64}
_IDX_UBYTE_3D_MAGIC = 0x00000803
_CIFAR_ROW = 3 * 32 * 32
_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


# ----------------------------------------------------------------------------------------------------------
# mnist (IDX)
# ----------------------------------------------------------------------------------------------------------

_MNIST_STEMS: dict[str, tuple[str, ...]] = {
    "train": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
}


def find_mnist_file(root: Path, split: str) -> Path:
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
    if path.name.endswith(".gz"):
        return typing.cast(BinaryIO, gzip.open(path, "rb"))
    return open(path, "rb")


def read_idx(path: Path, header_only: bool = False) -> tuple[tuple[int, int, int], bytes]:
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


def load_mnist(path: Path) -> np.ndarray:
    (n, rows, cols), data = read_idx(path)
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
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=typing.cast(typing.Literal["C", "F", "A"], order))


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


def cifar_files(root: Path, split: str) -> list[Path]:
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


def load_cifar(files: Sequence[Path]) -> np.ndarray:
    rows = np.concatenate([_read_cifar_batch(f) for f in files], axis=0)
    return rows.reshape(-1, 3, 32, 32)


# ----------------------------------------------------------------------------------------------------------
# imagenet32 / imagenet64 (npz)
# ----------------------------------------------------------------------------------------------------------

_TRAIN_NPZ = re.compile(r"train_data_batch_(\d+)\.npz")


def imagenet_files(name: str, root: Path, split: str) -> list[Path]:
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
        raise ImageDataError(
            f"{name}: {path}: a single .npy array, not an npz archive (expected a 'data' array inside an .npz file)"
        )
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


def load_imagenet(name: str, files: Sequence[Path]) -> np.ndarray:
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


def folder_splits(root: Path) -> tuple[dict[str, list[Path]], list[Path]]:
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
def folder_layout(signature: tuple[tuple[str, int, int], ...]) -> tuple[int, int, int]:
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
    assert first is not None  # folder_splits never returns an empty listing
    width, height = first[1]
    return (1 if grey else 3, height, width)


def decode_images(paths: Sequence[Path], shape: tuple[int, int, int]) -> np.ndarray:
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
