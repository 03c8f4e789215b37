"""MNIST: the bundled subset, the stratified shuffle and the IDX reader."""

import gzip
import struct

import numpy as np
import pytest
import torch

from kfac_lab.data import (
    BUNDLED_MNIST_PATH,
    DATA_ENV_VAR,
    IDXFormatError,
    balanced_permutation,
    find_mnist_files,
    load_mnist,
    load_mnist_numpy,
    read_idx,
)


# ---------------------------------------------------------------- bundled subset
def test_bundled_file_is_small_and_well_formed():
    assert BUNDLED_MNIST_PATH.is_file()
    assert BUNDLED_MNIST_PATH.stat().st_size < 2_000_000
    with np.load(BUNDLED_MNIST_PATH) as d:
        assert set(d.files) == {"images", "labels"}
        assert d["images"].shape == (5000, 784) and d["images"].dtype == np.uint8
        assert d["labels"].shape == (5000,) and d["labels"].dtype == np.uint8


def test_bundled_mnist_shape_range_labels():
    X, y = load_mnist()
    assert X.shape == (5000, 784) and X.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert X.min() == 0.0 and X.max() == 1.0
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    # real digits: about 19% of the pixels are inked on average
    assert 0.08 < X.mean().item() < 0.2
    # pixels are k/255 exactly (float64)
    X64, _ = load_mnist(50, dtype=torch.float64)
    assert X64.dtype == torch.float64
    assert torch.allclose(X64 * 255, (X64 * 255).round(), atol=1e-9)


def test_bundled_is_sorted_and_shuffle_is_deterministic():
    _, y_file = load_mnist(seed=None)
    assert torch.all(y_file[1:] >= y_file[:-1])            # the file is sorted by label
    X1, y1 = load_mnist(300, seed=3)
    X2, y2 = load_mnist(300, seed=3)
    X3, y3 = load_mnist(300, seed=4)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    assert not torch.equal(y1, y3)
    # a prefix of the shuffled set equals the smaller request
    Xa, ya = load_mnist(seed=3)
    assert torch.equal(Xa[:300], X1) and torch.equal(ya[:300], y1)
    # the shuffle is a permutation: same multiset of images
    Xs = load_mnist(seed=7)[0]
    Xu = load_mnist(seed=None)[0]
    def as_int(X):
        return (X.double() * 255).round().long()

    assert torch.equal(as_int(Xs).sum(0), as_int(Xu).sum(0))


@pytest.mark.parametrize("m", [10, 50, 100, 137, 1000])
def test_prefixes_are_class_balanced(m):
    _, y = load_mnist(m, seed=11)
    counts = torch.bincount(y, minlength=10)
    assert counts.max() - counts.min() <= 2, counts


def test_balanced_permutation_unequal_classes():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    p = balanced_permutation(labels, seed=1)
    assert sorted(p.tolist()) == list(range(100))
    c = np.bincount(labels[p[:20]], minlength=3)
    assert abs(c[0] - 12) <= 1 and abs(c[1] - 6) <= 1 and abs(c[2] - 2) <= 1
    assert np.array_equal(p, balanced_permutation(labels, seed=1))


def test_bundled_errors():
    with pytest.raises(ValueError, match="training"):
        load_mnist(source="bundled", split="test")
    with pytest.raises(ValueError, match="n must be"):
        load_mnist(5001)
    with pytest.raises(ValueError, match="source"):
        load_mnist(source="web")


# ---------------------------------------------------------------- IDX files
def _idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(
        ">" + "I" * arr.ndim, *arr.shape)
    return header + arr.astype(">u1" if code == 0x08 else arr.dtype.newbyteorder(">")).tobytes()


def _write(path, data: bytes, gz: bool):
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def _fake_mnist(d, split="train", n=12, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    prefix = "train" if split == "train" else "t10k"
    _write(d / f"{prefix}-images-idx3-ubyte", _idx_bytes(images), gz)
    _write(d / f"{prefix}-labels-idx1-ubyte", _idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = _write(tmp_path / "a-idx3-ubyte", _idx_bytes(a), gz)
    b = read_idx(p)
    assert b.dtype == np.uint8 and np.array_equal(a, b)
    f = np.linspace(-1, 1, 6).astype(np.float32)
    p = _write(tmp_path / "f-idx1", _idx_bytes(f, code=0x0D), gz)
    assert np.array_equal(read_idx(p), f)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx(tmp_path, gz):
    images, labels = _fake_mnist(tmp_path, "train", n=12, gz=gz)
    X, y = load_mnist(source="idx", data_dir=tmp_path, seed=None)
    assert X.shape == (12, 784)
    assert torch.equal(y, torch.from_numpy(labels.astype(np.int64)))
    assert torch.allclose(X, torch.from_numpy(images.reshape(12, 784) / 255.0).float())
    Xs, ys = load_mnist(5, source="idx", data_dir=tmp_path, seed=2)
    assert Xs.shape == (5, 784) and len(set(ys.tolist())) == 5
    # the test split
    t_images, _ = _fake_mnist(tmp_path, "test", n=7, gz=not gz, seed=1)
    Xt, yt = load_mnist(source="idx", data_dir=tmp_path, split="test", seed=None)
    assert Xt.shape == (7, 784)
    assert torch.allclose(Xt, torch.from_numpy(t_images.reshape(7, 784) / 255.0).float())


def test_load_mnist_idx_env_var_and_torchvision_layout(tmp_path, monkeypatch):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _fake_mnist(raw, n=4, gz=True)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    X, y = load_mnist(source="idx")
    assert X.shape == (4, 784)
    imgs, labs = find_mnist_files()
    assert imgs.parent == raw and imgs.name.endswith(".gz")


def test_idx_absent_message_names_files_and_directory(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(source="idx", data_dir=tmp_path)
    msg = str(e.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(tmp_path) in msg
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(source="idx", data_dir=tmp_path, split="test")
    assert "t10k-images-idx3-ubyte" in str(e.value)
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match=DATA_ENV_VAR):
        load_mnist(source="idx")


def test_idx_bad_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + b"\x00" * 20)
    with pytest.raises(IDXFormatError, match="magic"):
        read_idx(p)
    p.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")   # unknown type code
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    # a labels file where images are expected: wrong number of dimensions
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    p.write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(IDXFormatError, match="dimension"):
        load_mnist(source="idx", data_dir=tmp_path)


def test_idx_size_mismatches(tmp_path):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes(_idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5])     # truncated payload
    with pytest.raises(IDXFormatError, match="bytes"):
        read_idx(p)
    # images not 28x28
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((2, 27, 28), np.uint8)), False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(2, np.uint8)), False)
    with pytest.raises(IDXFormatError, match="28x28"):
        load_mnist(source="idx", data_dir=tmp_path)
    # counts differ
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((3, 28, 28), np.uint8)), False)
    with pytest.raises(IDXFormatError, match="labels"):
        load_mnist(source="idx", data_dir=tmp_path)


def test_load_mnist_numpy_raw():
    images, labels = load_mnist_numpy()
    assert images.dtype == np.uint8 and images.shape == (5000, 784) and labels.max() == 9
