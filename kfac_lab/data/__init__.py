"""Data sets of the K-FAC experiments (Martens & Grosse 2015, section 13 and section 3.1).

All loaders return torch tensors with one case per row, pixels in [0, 1] (except
``load_faces(standardize=True)``), and never download anything.

* :func:`load_mnist` — (n, 784) MNIST digits + (n,) int64 labels; a 5,000-image real
  subset is bundled (``mnist_5000.npz``, see :mod:`kfac_lab.data.mnist` for provenance),
  the full set is read from the standard IDX files.
* :func:`make_curves` — (n, 784) synthetic CURVES images (20,000 / 10,000 with ``full``).
* :func:`load_faces` — (n, 625) 25x25 faces from a user-supplied file.
* :func:`downscale` — exact area averaging, e.g. (n, 784) -> (n, 256) for figure 1.
* :func:`train_test_split` — deterministic split.
* :func:`load_dataset` — one entry point returning a :class:`Dataset`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .curves import CURVES_SIZES, curve_points, make_curves
from .faces import FACES_DIM, FACES_FILE_NAMES, FACES_SIDE, load_faces
from .mnist import (
    BUNDLED_MNIST_PATH,
    DATA_ENV_VAR,
    MNIST_FILES,
    IDXFormatError,
    balanced_permutation,
    find_mnist_files,
    load_mnist,
    load_mnist_numpy,
    read_idx,
)
from .transforms import Split, area_matrix, downscale, train_test_split

__all__ = [
    "BUNDLED_MNIST_PATH",
    "CURVES_SIZES",
    "DATA_ENV_VAR",
    "FACES_DIM",
    "FACES_FILE_NAMES",
    "FACES_SIDE",
    "MNIST_FILES",
    "Dataset",
    "IDXFormatError",
    "Split",
    "area_matrix",
    "balanced_permutation",
    "curve_points",
    "downscale",
    "find_mnist_files",
    "load_dataset",
    "load_faces",
    "load_mnist",
    "load_mnist_numpy",
    "make_curves",
    "read_idx",
    "train_test_split",
]


@dataclass(frozen=True)
class Dataset:
    """A data set held in memory.

    Attributes:
        name: "mnist", "curves", "faces" or "mnist16" (MNIST downscaled to 16x16).
        X: (n, d) floating tensor, one case per row (d = 784, 625 or 256).
        y: (n,) int64 class labels, or None (CURVES, FACES).
        image_shape: (height, width) with height * width == d.
    """

    name: str
    X: torch.Tensor
    y: torch.Tensor | None
    image_shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.X.shape[0])

    @property
    def dim(self) -> int:
        return int(self.X.shape[1])


def load_dataset(
    name: str,
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    source: str = "bundled",
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> Dataset:
    """Load a data set by name.

    Args:
        name: "mnist" (784-dim), "mnist16" (MNIST area-downscaled to 16x16, the figure-1
            input), "curves" (784-dim; ``n=None`` gives the full 20,000/10,000 split) or
            "faces" (625-dim; needs ``path``, see :func:`load_faces`).
        n: number of cases (None = all / full size).
        split: "train" or "test".
        seed: shuffle seed (MNIST) or generation seed (CURVES); unused for FACES.
        dtype: floating dtype of ``X``.
        source, data_dir: MNIST source, see :func:`load_mnist`.
        path: FACES file or directory.
    """
    key = name.lower()
    if key in ("mnist", "mnist16"):
        X, y = load_mnist(n, source=source, data_dir=data_dir, seed=seed, dtype=dtype,
                          split=split)
        if key == "mnist16":
            return Dataset(key, downscale(X, 16), y, (16, 16))
        return Dataset(key, X, y, (28, 28))
    if key == "curves":
        return Dataset(key, make_curves(n, seed=seed, dtype=dtype, split=split), None, (28, 28))
    if key == "faces":
        if path is None:
            raise FileNotFoundError(
                "FACES is not bundled: pass path=... to a faces .npz/.npy file or directory "
                f"({', '.join(FACES_FILE_NAMES)})"
            )
        return Dataset(key, load_faces(path, n=n, dtype=dtype), None, (25, 25))
    raise ValueError(f"unknown data set {name!r}; expected mnist, mnist16, curves or faces")
