"""Checkpoints: round trip, latest, replacement, weights-only loading, damage."""

import io
import os

import numpy as np
import pytest
import torch

from kfac_lab.store import NotFoundError, Store, StoreError
from kfac_lab.store.checkpoints import write_checkpoint_bytes


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "lab.zarr") as s:
        yield s


def states(scale=1.0):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(scale)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    return model.state_dict(), opt.state_dict()


def test_round_trip_and_latest(store):
    m1, o1 = states(1.0)
    m2, o2 = states(2.0)
    extra = {"rng": torch.get_rng_state(), "lambda": 150.0, "approx": "tridiag", "hist": [1, 2]}
    store.save_checkpoint("run-a", 10, m1, o1, extra)
    store.save_checkpoint("run-a", 20, m2, o2)
    assert store.checkpoints("run-a") == [10, 20]
    latest = store.load_checkpoint("run-a")
    assert latest["step"] == 20 and latest["run_id"] == "run-a" and latest["extra"] == {}
    torch.testing.assert_close(latest["model"]["weight"], m2["weight"])
    first = store.load_checkpoint("run-a", step=10)
    torch.testing.assert_close(first["optimizer"]["state"][0]["momentum_buffer"],
                               o1["state"][0]["momentum_buffer"])
    assert first["optimizer"]["param_groups"][0]["lr"] == 0.1
    assert first["extra"]["lambda"] == 150.0 and first["extra"]["hist"] == [1, 2]
    torch.testing.assert_close(first["extra"]["rng"], extra["rng"])
    # loading into a fresh model and optimizer works
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(first["model"])
    torch.optim.SGD(model.parameters(), lr=0.5).load_state_dict(first["optimizer"])


def test_replace_same_step_and_missing(store):
    store.save_checkpoint("r", 5, {"w": torch.zeros(2)}, {})
    store.save_checkpoint("r", 5, {"w": torch.ones(2)}, {})
    assert store.checkpoints("r") == [5]
    torch.testing.assert_close(store.load_checkpoint("r", 5)["model"]["w"], torch.ones(2))
    with pytest.raises(NotFoundError, match=r"available steps: \[5\]"):
        store.load_checkpoint("r", 6)
    with pytest.raises(NotFoundError, match="no checkpoints"):
        store.load_checkpoint("other")
    assert store.checkpoints("other") == []


def test_save_refuses_what_weights_only_cannot_load(store):
    class Custom:
        pass

    with pytest.raises(TypeError, match=r"optimizer\['x'\] is a .*Custom.*weights_only"):
        store.save_checkpoint("r", 0, {}, {"x": Custom()})
    with pytest.raises(TypeError, match="torch.from_numpy"):
        store.save_checkpoint("r", 0, {"w": np.ones(2)}, {})
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        store.save_checkpoint("r", -1, {}, {})
    assert store.checkpoints("r") == []


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


def test_load_refuses_pickled_objects(store, tmp_path, monkeypatch):
    """A checkpoint holding an arbitrary pickled object (e.g. tampered with) is refused,
    and its code never runs: loading uses torch.load(weights_only=True)."""
    monkeypatch.chdir(tmp_path)
    buf = io.BytesIO()
    torch.save({"model": {}, "optimizer": {}, "extra": {"x": Evil()}, "step": 3, "run_id": "r"}, buf)
    write_checkpoint_bytes(store._backend, "r", 3, buf.getvalue())
    assert store.checkpoints("r") == [3]
    with pytest.raises(StoreError, match="weights_only=True"):
        store.load_checkpoint("r", 3)
    assert not (tmp_path / "EVIL_RAN").exists()


def test_damaged_checkpoint_bytes(store):
    store.save_checkpoint("r", 1, {"w": torch.arange(1000.0)}, {})
    chunk = os.path.join(store.path, "checkpoints", "r", "step_00000001", "state", "c", "0")
    original = open(chunk, "rb").read()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(StoreError, match=r"checkpoint r/step_00000001.*damaged.*checksum"):
        store.load_checkpoint("r", 1)  # the chunk's crc32c
    import zarr

    open(chunk, "wb").write(original)
    arr = zarr.open_array(os.path.dirname(os.path.dirname(chunk)), mode="r+")
    good = arr[:]
    good[len(good) // 2] ^= 0xFF
    arr[:] = good  # rewritten through zarr: a valid crc32c, but not the bytes saved
    with pytest.raises(StoreError, match=r"damaged \(SHA-256 mismatch\)"):
        store.load_checkpoint("r", 1)
    os.remove(chunk)
    with pytest.raises(StoreError, match="damaged"):
        store.load_checkpoint("r", 1)


def test_map_location(store):
    store.save_checkpoint("r", 0, {"w": torch.ones(2)}, {})
    out = store.load_checkpoint("r", map_location="cpu")
    assert out["model"]["w"].device.type == "cpu"
