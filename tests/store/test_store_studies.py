"""Studies: round trip, names, overwrite and its crash safety."""

import uuid

import numpy as np
import pytest
import xarray as xr

from kfac_lab.store import NotFoundError, Store, StoreError, StoreExistsError
from kfac_lab.store import commit


def study(seed=0, n=6):
    rng = np.random.default_rng(seed)
    F = rng.standard_normal((n, n))
    return xr.Dataset(
        {
            "exact": (("row", "col"), F @ F.T),
            "kron": (("row", "col"), F @ F.T + 0.1),
            "A_1": (("a1_row", "a1_col"), np.eye(3)),
            "block_mean_abs": (("block_row", "block_col"), np.ones((2, 2))),
            "error_total": ((), 0.25),
        },
        coords={
            "row": np.arange(n),
            "col": np.arange(n),
            "layer": ("row", np.array(["l1"] * (n // 2) + ["l2"] * (n - n // 2))),
            "is_bias": ("row", np.arange(n) % 3 == 2),
        },
        attrs={"model": "mlp", "loss": "categorical", "samples": 100, "seed": seed,
               "layers": [1, 2], "config": {"damping": 1e-3}},
    )


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "lab.zarr") as s:
        yield s


def test_round_trip(store):
    ds = study()
    store.save_study("fig1", ds)
    out = store.load_study("fig1")
    xr.testing.assert_identical(out, ds)
    assert out.layer.dtype == object and out.attrs["config"] == {"damping": 1e-3}
    assert store.studies() == ["fig1"]
    assert "studies=1" in repr(store)


def test_existing_name_needs_overwrite(store):
    store.save_study("fig1", study(0))
    with pytest.raises(StoreExistsError, match="overwrite=True"):
        store.save_study("fig1", study(1))
    xr.testing.assert_identical(store.load_study("fig1"), study(0))
    store.save_study("fig1", study(1), overwrite=True)
    xr.testing.assert_identical(store.load_study("fig1"), study(1))
    assert store.studies() == ["fig1"]


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "sp ace"])
def test_bad_study_names(store, name):
    with pytest.raises(ValueError, match="allowed"):
        store.save_study(name, study())
    assert store.studies() == []


def test_missing_study_and_wrong_type(store):
    with pytest.raises(NotFoundError, match="no study 'nope'") as err:
        store.load_study("nope")
    assert isinstance(err.value, KeyError)
    with pytest.raises(TypeError, match="xarray.Dataset"):
        store.save_study("x", {"a": 1})


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4, 5, 6, 7])
def test_crash_during_overwrite_keeps_a_whole_version(store, monkeypatch, fail_at):
    """Kill the writer at each step of an overwrite (writes die half-way): a complete
    version, old or new, never a mix, stays readable; the next overwrite recovers."""
    store.save_study("fig1", study(0))
    backend = store._backend
    steps = {"n": 0}

    def tick():
        steps["n"] += 1
        return steps["n"] == fail_at

    real_replace, real_mark, real_update = commit.replace, commit.mark_committed, backend.update_attrs

    def replace(backend_, parent, name, write):
        def write_maybe_half(path):
            if tick():  # die half-way through this write
                half = study(1)[["exact"]].drop_vars("layer")
                half.to_zarr(backend.zstore, group=path, mode="w", consolidated=False)
                raise KeyboardInterrupt("killed mid-write")
            write(path)

        return real_replace(backend_, parent, name, write_maybe_half)

    def mark(backend_, path):
        tok = real_mark(backend_, path)
        if tick():
            raise KeyboardInterrupt("killed after commit")
        return tok

    def update(path, attrs, drop=()):
        real_update(path, attrs, drop)
        if drop and tick():
            raise KeyboardInterrupt("killed after uncommit")

    def delete_dir(prefix):
        if tick():
            raise KeyboardInterrupt("killed before cleanup")
        type(backend).delete_dir(backend, prefix)

    monkeypatch.setattr(commit, "replace", replace)
    monkeypatch.setattr(commit, "mark_committed", mark)
    monkeypatch.setattr(backend, "update_attrs", update)
    monkeypatch.setattr(backend, "delete_dir", delete_dir)
    with pytest.raises(KeyboardInterrupt):
        store.save_study("fig1", study(1), overwrite=True)
    monkeypatch.undo()
    with Store(store.path, mode="r") as reader:
        got = reader.load_study("fig1")
        assert reader.studies() == ["fig1"]
    assert got.identical(study(0)) or got.identical(study(1))
    store.save_study("fig1", study(2), overwrite=True)
    xr.testing.assert_identical(store.load_study("fig1"), study(2))
    assert store.studies() == ["fig1"]


def test_uncommitted_study_is_invisible(store):
    """A study written but not committed (writer killed before the marker) is not listed."""
    ds = study().drop_vars("layer")
    ds.to_zarr(store._backend.zstore, group="studies/half", mode="w", consolidated=False, zarr_format=3)
    assert store.studies() == []
    with pytest.raises(NotFoundError):
        store.load_study("half")


def test_memory_url():
    url = f"memory://kfac-lab-test-{uuid.uuid4().hex}/lab.zarr"
    with Store(url) as s:
        s.save_study("fig1", study())
        run = s.new_run({"problem": "mnist"})
        s.log(run, 0, loss=1.0)
    with Store(url, mode="r") as r:
        xr.testing.assert_identical(r.load_study("fig1"), study())
        assert r.load_run(run).loss.values.tolist() == [1.0]
        assert "memory://" in repr(r)


def test_read_only_refuses_writes(tmp_path):
    Store(tmp_path / "s.zarr").close()
    with Store(tmp_path / "s.zarr", mode="r") as r:
        with pytest.raises(StoreError, match="read-only.*mode='a'"):
            r.save_study("x", study())
        with pytest.raises(StoreError, match="read-only"):
            r.new_run({})
