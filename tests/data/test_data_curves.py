"""CURVES generation: determinism, range, content, exactness of the renderer."""

import pytest
import torch

import kfac_lab.data.curves as curves_mod
from kfac_lab.data import CURVES_SIZES, curve_points, make_curves
from kfac_lab.data.curves import _N_SEGMENTS, _polyline


def test_default_shape_dtype_range():
    X = make_curves()
    assert X.shape == (2000, 784) and X.dtype == torch.float32
    assert X.min() >= 0.0 and X.max() <= 1.0
    assert X.max() > 0.99


def test_deterministic_per_seed_and_seeds_differ():
    a = make_curves(200, seed=5)
    b = make_curves(200, seed=5)
    c = make_curves(200, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert (a - c).abs().sum(1).min() > 0        # every image differs


def test_prefix_consistent_and_splits_differ():
    big = make_curves(500, seed=1)
    assert torch.equal(make_curves(37, seed=1), big[:37])
    test = make_curves(500, seed=1, split="test")
    assert not torch.equal(big, test)


def test_not_blank_and_curve_like():
    X = make_curves(500, seed=2)
    lit = (X > 0.5).sum(1)
    assert lit.min() >= 3               # each image shows a stroke
    assert (X > 0).float().mean() < 0.25  # ... a thin one, most pixels are background
    assert 0.01 < X.mean() < 0.1
    # anti-aliased: intermediate intensities occur
    assert ((X > 0.05) & (X < 0.95)).any(1).all()


def test_the_three_points_are_on_the_curve():
    pts = curve_points(50, seed=3)
    X = make_curves(50, seed=3).view(50, 28, 28)
    for i in range(50):
        for x, y in pts[i]:
            # the pixel nearest to each through-point is within 0.71 px of the curve
            v = X[i, int(round(y)), int(round(x))]
            assert v >= 1 - 0.71, (i, x, y, v)


def test_renderer_matches_brute_force_distance():
    n = 8
    pts = torch.from_numpy(curve_points(n, seed=9))
    X = make_curves(n, seed=9, dtype=torch.float64).view(n, 28, 28)
    pl = _polyline(pts, _N_SEGMENTS)
    a, b = pl[:, :-1], pl[:, 1:]
    yy, xx = torch.meshgrid(torch.arange(28.0, dtype=torch.float64),
                            torch.arange(28.0, dtype=torch.float64), indexing="ij")
    p = torch.stack([xx, yy], -1).reshape(1, -1, 1, 2)          # (1, P, 1, 2)
    ab = (b - a)[:, None]                                        # (n, 1, K, 2)
    t = (((p - a[:, None]) * ab).sum(-1) / (ab * ab).sum(-1)).clamp(0, 1)
    d = (p - a[:, None] - t[..., None] * ab).norm(dim=-1).min(-1).values
    ref = (1 - d).clamp(0, 1).view(n, 28, 28)
    assert torch.allclose(X, ref, atol=1e-5)


def test_full_sizes_and_options(monkeypatch):
    assert CURVES_SIZES == {"train": 20000, "test": 10000}
    # full=True / n=None use the original sizes (shrunk here to keep the test fast)
    monkeypatch.setitem(curves_mod.CURVES_SIZES, "train", 30)
    monkeypatch.setitem(curves_mod.CURVES_SIZES, "test", 20)
    assert make_curves(5, full=True).shape == (30, 784)
    assert make_curves(None, split="test").shape == (20, 784)
    monkeypatch.undo()
    assert make_curves(3, dtype=torch.float64).dtype == torch.float64
    assert torch.allclose(make_curves(3, dtype=torch.float64).float(), make_curves(3))
    assert make_curves(4, size=16).shape == (4, 256)
    assert make_curves(0).shape == (0, 784)
    with pytest.raises(ValueError):
        make_curves(3, split="valid")
    with pytest.raises(ValueError):
        make_curves(-1)
