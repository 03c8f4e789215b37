"""Image down-scaling by exact area averaging, and a deterministic train/test split."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Split", "area_matrix", "downscale", "train_test_split"]


def area_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (n_out, n_in) 1-D area-averaging matrix.

    Output cell ``i`` covers the input interval ``[i*s, (i+1)*s)`` with ``s = n_in/n_out``;
    ``M[i, j]`` is the length of its overlap with input cell ``[j, j+1)`` divided by ``s``.
    Rows sum to 1. When ``n_out`` divides ``n_in`` it is the plain block mean.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be >= 1, got n_in={n_in}, n_out={n_out}")
    s = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * s
    hi = lo + s
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    overlap = (torch.minimum(hi, j + 1) - torch.maximum(lo, j)).clamp_min(0.0)
    return (overlap / s).to(dtype)


def downscale(images, size: int | tuple[int, int] = 16):
    """Downscale images by exact area averaging (box filter with fractional overlaps).

    Args:
        images: (n, H, W) or (n, H*W) with H == W (square images), a torch tensor or a
            numpy array.
        size: output side (or ``(height, width)``); e.g. 28x28 -> 16x16 for the
            figure-1 network.

    Returns:
        (n, size*size) (or (n, h*w)), same array type and floating dtype as the input
        (integer input -> float32). Each output pixel is the area-weighted mean of the
        input pixels it covers — exactly the block mean when the sizes divide, and the same
        as OpenCV's ``INTER_AREA`` / PIL's box filter otherwise. Total intensity per area
        is preserved; it also works for up-scaling (nearest-like replication).
    """
    is_numpy = isinstance(images, np.ndarray)
    x = torch.as_tensor(images)
    if x.ndim == 2:
        side = math.isqrt(x.shape[1])
        if side * side != x.shape[1]:
            raise ValueError(
                f"flat images must be square (n, H*W with H == W); got {x.shape[1]} "
                f"pixels — pass (n, H, W) for non-square images"
            )
        x = x.reshape(x.shape[0], side, side)
    elif x.ndim != 3:
        raise ValueError(f"images must be (n, H, W) or (n, H*W), got shape {tuple(x.shape)}")
    h_out, w_out = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    work = torch.float64 if out_dtype == torch.float64 else torch.float32
    x = x.to(work)
    H, W = x.shape[1], x.shape[2]
    if H % h_out == 0 and W % w_out == 0:   # exact block mean
        y = x.reshape(x.shape[0], h_out, H // h_out, w_out, W // w_out).mean(dim=(2, 4))
    else:
        Mh = area_matrix(H, h_out, work).to(x.device)
        Mw = area_matrix(W, w_out, work).to(x.device)
        y = Mh @ x @ Mw.T
    y = y.reshape(y.shape[0], h_out * w_out).to(out_dtype)
    return y.numpy() if is_numpy else y


class Split(NamedTuple):
    """Result of :func:`train_test_split`; ``y_train``/``y_test`` are None without ``y``."""

    X_train: object
    X_test: object
    y_train: object = None
    y_test: object = None


def train_test_split(X, y=None, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """Deterministic random split of cases (rows) into train and test parts.

    Args:
        X: (n, ...) tensor or array; y: optional (n, ...) tensor or array.
        test_fraction: fraction of cases in the test part, ``0 < f < 1``; the test part
            has ``round(f * n)`` cases (at least 1 and at most n-1 when n >= 2).
        seed: seed of the permutation (``numpy.random.default_rng``).

    Returns:
        ``Split(X_train, X_test, y_train, y_test)`` (unpacks as a 4-tuple; y parts are
        None when ``y`` is None). Row order inside each part is the permuted order.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n = len(X)
    if y is not None and len(y) != n:
        raise ValueError(f"X has {n} cases but y has {len(y)}")
    if n < 2:
        raise ValueError(f"need at least 2 cases to split, got {n}")
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    te, tr = perm[:n_test], perm[n_test:]

    def take(a, idx):
        if isinstance(a, torch.Tensor):
            return a[torch.from_numpy(idx).to(a.device)]
        return a[idx]

    if y is None:
        return Split(take(X, tr), take(X, te))
    return Split(take(X, tr), take(X, te), take(y, tr), take(y, te))
