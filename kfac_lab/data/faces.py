"""FACES: 25x25 (625-dim) face images read from a user-supplied file.

No face data ship with kfac_lab (none is redistributable here) and nothing is downloaded.
Hinton & Salakhutdinov (2006) built their FACES set (103,500 train / 41,400 test 25x25
images) from the Olivetti faces by random rotations, scalings and shifts; their files are
not public in a form read here. Accepted inputs:

* ``.npz`` with an ``images`` array, shape (n, 25, 25) or (n, 625);
* ``.npy`` holding such an array, e.g. the standard Olivetti file ``olivetti_faces.npy``
  (400 x 64 x 64 float in [0, 1], as distributed by AT&T/Sam Roweis and cached by
  scikit-learn), which is down-scaled to 25x25 by exact area averaging;
* a directory containing ``faces.npz`` or ``olivetti_faces.npy``.

More generally any square (n, H, W) / (n, H*W) array with H = W >= 25 is area-downscaled
to 25x25. Integer images are scaled by 1/255.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .transforms import downscale

__all__ = ["FACES_SIDE", "FACES_DIM", "FACES_FILE_NAMES", "load_faces"]

FACES_SIDE = 25
FACES_DIM = FACES_SIDE * FACES_SIDE
#: File names looked for when ``load_faces`` is given a directory, in this order.
FACES_FILE_NAMES = ("faces.npz", "olivetti_faces.npy")

_EXPECTED = (
    "expected a .npz file with an 'images' array of shape (n, 25, 25) or (n, 625), or a "
    ".npy array of that shape, or the Olivetti file olivetti_faces.npy (n, 64, 64) — "
    "any square (n, H, W)/(n, H*W) with H = W >= 25 is area-downscaled to 25x25"
)


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in FACES_FILE_NAMES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"no faces file in directory {p}: looked for {', '.join(FACES_FILE_NAMES)}; "
            + _EXPECTED
        )
    if not p.is_file():
        raise FileNotFoundError(f"faces file not found: {p}; " + _EXPECTED)
    return p


def _read_array(p: Path) -> np.ndarray:
    try:
        obj = np.load(p, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with the expected format
        raise ValueError(f"{p}: cannot be read as .npy/.npz ({exc}); " + _EXPECTED) from exc
    if isinstance(obj, np.lib.npyio.NpzFile):
        with obj:
            if "images" not in obj.files:
                raise ValueError(
                    f"{p}: .npz has no 'images' array (found {list(obj.files)}); " + _EXPECTED
                )
            return obj["images"]
    return obj


def load_faces(
    path: str | os.PathLike,
    n: int | None = None,
    dtype: torch.dtype = torch.float32,
    standardize: bool = False,
) -> torch.Tensor:
    """Read face images as a (n, 625) tensor (row-major 25x25).

    Args:
        path: a ``.npz``/``.npy`` file or a directory (see the module docstring).
        n: keep the first ``n`` images (file order); ``None`` = all.
        dtype: floating dtype of the result.
        standardize: if True, shift and scale all pixels together to zero mean and unit
            variance (one global mean/std) — the FACES output is linear with a Gaussian
            loss, and Hinton & Salakhutdinov normalised the pixel intensities.

    Raises:
        FileNotFoundError: the file (or a known file in the directory) is absent.
        ValueError: the file's content is not of an accepted shape (the message says
            what is expected), or holds non-finite values.
    """
    p = _resolve(path)
    arr = np.asarray(_read_array(p))
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) and not np.issubdtype(arr.dtype, np.complexfloating)
    ):
        raise ValueError(f"{p}: images must be a real numeric array, got dtype {arr.dtype}; "
                         + _EXPECTED)
    if arr.ndim == 2:
        side = math.isqrt(arr.shape[1])
        if side * side != arr.shape[1]:
            raise ValueError(f"{p}: images of shape {arr.shape} are not square; " + _EXPECTED)
        arr = arr.reshape(arr.shape[0], side, side)
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] < FACES_SIDE:
        raise ValueError(f"{p}: images of shape {arr.shape} not accepted; " + _EXPECTED)
    if arr.shape[0] == 0:
        raise ValueError(f"{p}: holds no images; " + _EXPECTED)
    if np.issubdtype(arr.dtype, np.integer):
        x = torch.from_numpy(arr.astype(np.float64) / 255.0)
    else:
        x = torch.from_numpy(arr.astype(np.float64))
    if not torch.isfinite(x).all():
        raise ValueError(f"{p}: images contain NaN or infinite values")
    if n is not None:
        if not 0 <= int(n) <= x.shape[0]:
            raise ValueError(f"n must be in [0, {x.shape[0]}], got {n}")
        x = x[: int(n)]
    if x.shape[1] == FACES_SIDE:
        x = x.reshape(x.shape[0], FACES_DIM)
    else:
        x = downscale(x, FACES_SIDE)
    if standardize:
        x = (x - x.mean()) / x.std().clamp_min(1e-12)
    return x.to(dtype)
