"""CURVES: synthetic 28x28 images of smooth curves through three random points.

In the spirit of the CURVES set of Hinton & Salakhutdinov (2006) (the original files are
not redistributed here; this is a re-generation, not a copy). Each image is made as
follows:

1. draw three points ``p0, p1, p2`` uniformly in ``[margin, size-1-margin]^2`` (pixel
   coordinates; pixel centres sit at integer coordinates, x = column, y = row);
2. the curve is the quadratic that *passes through* the three points, parametrised on
   ``t in [0, 1]`` with ``P(0) = p0``, ``P(tau) = p1``, ``P(1) = p2`` where ``tau`` is the
   chord-length fraction ``|p1-p0| / (|p1-p0| + |p2-p1|)`` (Lagrange interpolation;
   equivalently a quadratic Bezier curve with a suitable middle control point);
3. the curve is approximated by a 64-segment polyline and rendered with anti-aliasing:
   a pixel's intensity is ``clip(1 - d / thickness, 0, 1)`` where ``d`` is the exact
   distance of the pixel centre to the polyline (a tent profile: thickness ~1 px).
   Geometry and intensities are computed in float32 and then cast to ``dtype``.

Everything is vectorised over images (chunks of a few thousand images; no Python loop
over images): 20,000 images take well under a few seconds on two cores. Random draws use
``numpy.random.default_rng``, so the first ``m`` images of ``make_curves(n)`` equal
``make_curves(m)`` (prefix-consistent), and ``split="test"`` uses an independent stream.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["CURVES_SIZES", "make_curves", "curve_points"]

#: The sizes of the original CURVES set (Hinton & Salakhutdinov, 2006).
CURVES_SIZES = {"train": 20000, "test": 10000}

_N_SEGMENTS = 64
_CHUNK = 2048


def curve_points(n: int, seed: int = 0, size: int = 28, margin: float = 1.5,
                 split: str = "train") -> np.ndarray:
    """The three random points of each of ``n`` curves: array (n, 3, 2) of (x, y)."""
    if split not in CURVES_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    stream = 0 if split == "train" else 1
    rng = np.random.default_rng([int(seed), stream, 0xC0])
    lo, hi = margin, size - 1 - margin
    if hi <= lo:
        raise ValueError(f"size={size} too small for margin={margin}")
    return lo + (hi - lo) * rng.random((int(n), 3, 2))


def _polyline(points: torch.Tensor, k: int) -> torch.Tensor:
    """(m, 3, 2) through-points -> (m, k+1, 2) samples of the interpolating quadratic."""
    p0, p1, p2 = points[:, 0], points[:, 1], points[:, 2]
    d01 = (p1 - p0).norm(dim=-1)
    d12 = (p2 - p1).norm(dim=-1)
    tau = (d01 / (d01 + d12).clamp_min(1e-12)).clamp(0.05, 0.95)[:, None, None]
    t = torch.linspace(0.0, 1.0, k + 1, dtype=points.dtype)[None, :, None]
    # Lagrange basis on nodes (0, tau, 1)
    l0 = (t - tau) * (t - 1.0) / tau
    l1 = t * (t - 1.0) / (tau * (tau - 1.0))
    l2 = t * (t - tau) / (1.0 - tau)
    return l0 * p0[:, None] + l1 * p1[:, None] + l2 * p2[:, None]


def _render(points: torch.Tensor, size: int, thickness: float) -> torch.Tensor:
    """Render (m, 3, 2) point triples -> (m, size*size) float32 in [0, 1].

    Each polyline segment only touches the pixels whose centres lie within ``r`` =
    thickness + (longest segment)/2 of its midpoint: a (W x W) window per segment, W =
    floor(2r) + 1. The per-pixel maximum over segments (``scatter_reduce`` "amax") of
    ``clip(1 - d/thickness)`` equals the tent of the distance to the whole polyline.
    """
    m = points.shape[0]
    pl = _polyline(points, _N_SEGMENTS).float()          # (m, K+1, 2)
    a, b = pl[:, :-1], pl[:, 1:]                         # (m, K, 2)
    ab = b - a
    seg_len2 = (ab * ab).sum(-1)
    mid = 0.5 * (a + b)
    r = thickness + 0.5 * float(seg_len2.max().sqrt()) if m else thickness
    W = int(math.floor(2.0 * r)) + 1
    offs = torch.arange(W, dtype=torch.float32)
    start = torch.ceil(mid - r)                          # (m, K, 2) first pixel coordinate
    px = start[..., 0, None, None] + offs[None, :]       # (m, K, 1, W)  x = column
    py = start[..., 1, None, None] + offs[:, None]       # (m, K, W, 1)  y = row
    # exact point-to-segment distance, broadcast to (m, K, W, W)
    abx, aby = ab[..., 0, None, None], ab[..., 1, None, None]
    apx = px - a[..., 0, None, None]
    apy = py - a[..., 1, None, None]
    den = seg_len2.clamp_min(1e-12)[..., None, None]
    t = ((apx * abx + apy * aby) / den).clamp_(0.0, 1.0)
    dx = apx - t * abx
    dy = apy - t * aby
    val = (1.0 - torch.sqrt(dx * dx + dy * dy) / thickness).clamp_(0.0, 1.0)
    # scatter with max into the images; off-image pixels contribute 0 at a clamped index
    pxi = px.long().clamp_(0, size - 1)
    pyi = py.long().clamp_(0, size - 1)
    outside = ((px < 0) | (px > size - 1)) | ((py < 0) | (py > size - 1))
    val = val.masked_fill_(outside, 0.0)
    img = torch.arange(m)[:, None, None, None] * (size * size)
    flat = img + pyi * size + pxi                        # (m, K, W, W)
    out = torch.zeros(m * size * size, dtype=torch.float32)
    out.scatter_reduce_(0, flat.reshape(-1), val.reshape(-1), reduce="amax")
    return out.view(m, size * size)


def make_curves(
    n: int | None = 2000,
    seed: int = 0,
    size: int = 28,
    dtype: torch.dtype = torch.float32,
    split: str = "train",
    full: bool = False,
    thickness: float = 1.0,
    margin: float = 1.5,
) -> torch.Tensor:
    """Generate CURVES images.

    Args:
        n: number of images (default 2,000, small). Ignored when ``full=True``.
        seed: seed; same (seed, split, size, ...) -> identical images.
        size: image side (28 -> 784-dim images).
        dtype: floating dtype of the result.
        split: ``"train"`` or ``"test"`` — independent random streams for the same seed.
        full: if True, the original set sizes: 20,000 train / 10,000 test images.
        thickness: stroke half-width of the tent profile, in pixels.
        margin: the random points are kept this far (px) from the border.

    Returns:
        X: (n, size*size) tensor of ``dtype``, pixel intensities in [0, 1], row-major.
    """
    if split not in CURVES_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if full or n is None:
        n = CURVES_SIZES[split]
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if thickness <= 0:
        raise ValueError(f"thickness must be > 0, got {thickness}")
    pts = torch.from_numpy(curve_points(n, seed, size, margin, split))
    out = torch.empty(n, size * size, dtype=dtype)
    for s in range(0, n, _CHUNK):   # chunks of images bound the memory; vectorised inside
        out[s : s + _CHUNK] = _render(pts[s : s + _CHUNK], size, thickness).to(dtype)
    return out
