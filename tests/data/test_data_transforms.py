"""downscale (exact area averaging), train_test_split, load_dataset."""

import numpy as np
import pytest
import torch

from kfac_lab.data import Dataset, area_matrix, downscale, load_dataset, train_test_split


def test_downscale_4x4_to_2x2_by_hand():
    img = torch.arange(16.0).reshape(1, 4, 4)
    # blocks: [0,1,4,5] [2,3,6,7] [8,9,12,13] [10,11,14,15]
    expected = torch.tensor([[2.5, 4.5, 10.5, 12.5]])
    assert torch.equal(downscale(img, 2), expected)
    assert torch.equal(downscale(img.reshape(1, 16), 2), expected)       # flat input


def test_downscale_3x3_to_2x2_fractional_overlaps_by_hand():
    # s = 1.5: output cell 0 covers input cells 0 (weight 1) and 1 (weight 0.5) -> /1.5
    M = area_matrix(3, 2)
    assert torch.allclose(M, torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]], dtype=M.dtype))
    img = torch.tensor([[[1.0, 2, 3], [4, 5, 6], [7, 8, 9]]], dtype=torch.float64)
    out = downscale(img, 2).reshape(2, 2)
    # top-left: (1*1*1 + 2*1*.5 + 4*.5*1 + 5*.25) / 2.25
    assert out[0, 0].item() == pytest.approx((1 + 1 + 2 + 1.25) / 2.25)
    assert out.mean().item() == pytest.approx(5.0)               # mass preserved


def test_downscale_28_to_16_mnist_like():
    rng = np.random.default_rng(0)
    x = rng.random((5, 784)).astype(np.float32)
    y = downscale(x, 16)
    assert isinstance(y, np.ndarray) and y.shape == (5, 256) and y.dtype == np.float32
    assert np.allclose(y.mean(1), x.mean(1), atol=1e-6)              # rows of M sum to 1
    assert downscale(torch.ones(2, 28, 28), 16).allclose(torch.ones(2, 256))
    assert torch.allclose(area_matrix(28, 16).sum(1), torch.ones(16, dtype=torch.float64))
    # uint8 input gives float32; non-square flat input is refused
    assert downscale(np.zeros((1, 784), np.uint8), 16).dtype == np.float32
    with pytest.raises(ValueError, match="square"):
        downscale(torch.zeros(2, 10), 2)
    assert downscale(torch.zeros(3, 6, 4), (3, 2)).shape == (3, 6)


def test_train_test_split_deterministic():
    X = torch.arange(100.0).reshape(50, 2)
    y = torch.arange(50)
    a = train_test_split(X, y, test_fraction=0.2, seed=1)
    b = train_test_split(X, y, test_fraction=0.2, seed=1)
    c = train_test_split(X, y, test_fraction=0.2, seed=2)
    Xtr, Xte, ytr, yte = a
    assert Xtr.shape == (40, 2) and Xte.shape == (10, 2)
    assert torch.equal(Xtr, b.X_train) and torch.equal(yte, b.y_test)
    assert not torch.equal(yte, c.y_test)
    assert sorted(ytr.tolist() + yte.tolist()) == list(range(50))
    assert torch.equal(Xte[:, 0], 2.0 * yte)                       # rows stay paired
    s = train_test_split(np.arange(10), test_fraction=0.3, seed=0)
    assert s.y_train is None and len(s.X_test) == 3
    with pytest.raises(ValueError):
        train_test_split(X, test_fraction=1.0)
    with pytest.raises(ValueError):
        train_test_split(X, y[:3])


def test_load_dataset():
    d = load_dataset("mnist", n=100)
    assert isinstance(d, Dataset) and len(d) == 100 and d.dim == 784 and d.y.shape == (100,)
    d16 = load_dataset("mnist16", n=100)
    assert d16.X.shape == (100, 256) and d16.image_shape == (16, 16)
    assert torch.equal(d16.y, d.y)
    c = load_dataset("curves", n=10, seed=3)
    assert c.X.shape == (10, 784) and c.y is None
    with pytest.raises(FileNotFoundError, match="path"):
        load_dataset("faces")
    with pytest.raises(ValueError):
        load_dataset("cifar")
