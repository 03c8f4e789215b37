"""FACES reader: npz (n,25,25)/(n,625), Olivetti-shaped npy, and clear errors."""

import numpy as np
import pytest
import torch

from kfac_lab.data import downscale, load_dataset, load_faces


def test_npz_25x25_and_flat(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.random((6, 25, 25))
    np.savez(tmp_path / "a.npz", images=imgs)
    X = load_faces(tmp_path / "a.npz")
    assert X.shape == (6, 625) and X.dtype == torch.float32
    assert torch.allclose(X, torch.from_numpy(imgs.reshape(6, 625)).float())
    np.savez_compressed(tmp_path / "b.npz", images=imgs.reshape(6, 625))
    X2 = load_faces(tmp_path / "b.npz", n=4, dtype=torch.float64)
    assert X2.dtype == torch.float64 and torch.equal(X2, torch.from_numpy(imgs.reshape(6, 625))[:4])


def test_uint8_scaled_and_standardize(tmp_path):
    imgs = np.full((3, 625), 255, np.uint8)
    imgs[0] = 0
    np.savez(tmp_path / "u.npz", images=imgs)
    X = load_faces(tmp_path / "u.npz")
    assert X.max() == 1.0 and X.min() == 0.0
    Z = load_faces(tmp_path / "u.npz", standardize=True)
    assert abs(Z.mean().item()) < 1e-6 and abs(Z.std().item() - 1) < 1e-5


def test_olivetti_shaped_npy_is_downscaled(tmp_path):
    rng = np.random.default_rng(1)
    oliv = rng.random((5, 64, 64)).astype(np.float32)
    np.save(tmp_path / "olivetti_faces.npy", oliv)
    X = load_faces(tmp_path / "olivetti_faces.npy")
    assert X.shape == (5, 625)
    assert torch.allclose(X, torch.from_numpy(downscale(oliv, 25)), atol=1e-6)
    # area averaging keeps the mean intensity of each image
    assert np.allclose(X.mean(1).numpy(), oliv.reshape(5, -1).mean(1), atol=1e-5)
    # a directory holding the standard file name works too
    assert torch.equal(load_faces(tmp_path), X)
    d = load_dataset("faces", path=tmp_path, n=2)
    assert d.X.shape == (2, 625) and d.image_shape == (25, 25)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"\(n, 25, 25\)"):
        load_faces(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="olivetti_faces.npy"):
        load_faces(tmp_path)                               # empty directory


def test_malformed_files(tmp_path):
    np.savez(tmp_path / "noimg.npz", faces=np.zeros((2, 625)))
    with pytest.raises(ValueError, match="'images'"):
        load_faces(tmp_path / "noimg.npz")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 600)))
    with pytest.raises(ValueError, match="expected"):
        load_faces(tmp_path / "bad.npz")
    np.save(tmp_path / "small.npy", np.zeros((2, 10, 10)))
    with pytest.raises(ValueError, match="not accepted"):
        load_faces(tmp_path / "small.npy")
    np.save(tmp_path / "rect.npy", np.zeros((2, 30, 40)))
    with pytest.raises(ValueError, match="not accepted"):
        load_faces(tmp_path / "rect.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match="cannot be read"):
        load_faces(tmp_path / "junk.npy")
    np.save(tmp_path / "nan.npy", np.full((1, 25, 25), np.nan))
    with pytest.raises(ValueError, match="NaN"):
        load_faces(tmp_path / "nan.npy")
