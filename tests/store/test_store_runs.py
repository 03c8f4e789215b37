"""Runs: logging, buffering, events, tables, curves, resume."""

import time

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from kfac_lab.store import NotFoundError, Store, StoreError, StoreExistsError


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "lab.zarr", flush_every=5, flush_interval=None) as s:
        yield s


def test_log_flush_load(store):
    run = store.new_run({"problem": "mnist", "optimizer": "kfac", "hp": {"damping": 150.0}, "seed": 0})
    for step in range(12):
        store.log(run, step, loss=1.0 / (step + 1), approx="blockdiag", momentum=step % 2 == 0,
                  batch_size=1000)
    # 10 rows flushed by flush_every=5, 2 still buffered
    assert store.load_run(run).sizes["step"] == 10
    assert store.pending(run) == 2
    store.flush(run)
    ds = store.load_run(run)
    assert ds.sizes["step"] == 12 and ds.step.values.tolist() == list(range(12))
    np.testing.assert_allclose(ds.loss.values, 1.0 / (np.arange(12) + 1))
    assert ds.approx.values.tolist() == ["blockdiag"] * 12 and ds.approx.dtype == object
    assert ds.momentum.values.tolist() == [1.0, 0.0] * 6 and ds.momentum.attrs["kind"] == "bool"
    assert ds.batch_size.attrs["kind"] == "int" and ds.loss.attrs["kind"] == "float"
    assert ds.attrs["hp"] == {"damping": 150.0} and ds.attrs["run_id"] == run


def test_missing_and_late_metrics(store):
    run = store.new_run({})
    store.log(run, 0, loss=3.0, approx="blockdiag")
    store.log(run, 1, loss=2.0)  # approx missing -> ""
    store.flush()
    store.log(run, 2, loss=None, rho=0.5, approx="tridiag")  # new metric later, loss missing
    store.log(run, 5, rho=0.25)
    store.flush()
    ds = store.load_run(run)
    assert ds.step.values.tolist() == [0, 1, 2, 5]
    np.testing.assert_array_equal(ds.loss.values, [3.0, 2.0, np.nan, np.nan])
    np.testing.assert_array_equal(ds.rho.values, [np.nan, np.nan, 0.5, 0.25])
    assert ds.approx.values.tolist() == ["blockdiag", "", "tridiag", ""]


def test_log_validation(store):
    run = store.new_run({})
    store.log(run, 3, loss=1.0)
    with pytest.raises(ValueError, match="steps must increase"):
        store.log(run, 3, loss=1.0)
    with pytest.raises(TypeError, match="step must be an int"):
        store.log(run, 4.0, loss=1.0)
    with pytest.raises(TypeError, match="metric 'w' has type list"):
        store.log(run, 4, w=[1, 2])
    with pytest.raises(TypeError, match="logged as float and now as str"):
        store.log(run, 4, loss="high")
    with pytest.raises(ValueError, match="reserved"):
        store.log(run, 4, event_kind="x")
    with pytest.raises(NotFoundError, match="new_run"):
        store.log("no-such-run", 0, loss=1.0)
    store.log(run, 4, loss=2)  # int after float is fine
    store.flush()
    assert store.load_run(run).loss.values.tolist() == [1.0, 2.0]


def test_tensor_scalars(store):
    torch = pytest.importorskip("torch")
    run = store.new_run({})
    store.log(run, 0, loss=torch.tensor(0.5), n=np.int64(3), ok=np.bool_(True))
    store.flush()
    ds = store.load_run(run)
    assert ds.loss.item() == 0.5 and ds.n.item() == 3 and ds.ok.item() == 1.0


def test_events(store):
    run = store.new_run({})
    store.event(run, 0, "control", damping=30.0, approx="tridiag")
    store.log(run, 0, loss=1.0)
    store.event(run, 1, "rejected", reason="nonfinite loss", new={"lambda": 45.0})
    assert store.events(run) == []  # buffered
    store.flush()
    assert store.events(run) == [
        {"step": 0, "kind": "control", "damping": 30.0, "approx": "tridiag"},
        {"step": 1, "kind": "rejected", "reason": "nonfinite loss", "new": {"lambda": 45.0}},
    ]
    ds = store.load_run(run)
    assert ds.sizes["event"] == 2 and ds.event_kind.values.tolist() == ["control", "rejected"]


def test_runs_table_and_ids(store):
    assert store.runs().empty and list(store.runs().columns) == ["created", "steps", "last_step", "events"]
    a = store.new_run({"optimizer": "kfac", "lr": None})
    time.sleep(0.01)
    b = store.new_run({"optimizer": "sgd", "momentum": 0.9})
    c = store.new_run({"optimizer": "adam"}, run_id="my-run")
    for s in range(3):
        store.log(a, s, loss=1.0)
    store.flush()
    t = store.runs()
    assert isinstance(t, pd.DataFrame) and t.index.name == "run_id"
    assert list(t.index) == sorted([a, b, c]) and a < b
    assert t.loc[a, "optimizer"] == "kfac" and t.loc[a, "steps"] == 3 and t.loc[a, "last_step"] == 2
    assert t.loc[b, "steps"] == 0 and t.loc[b, "momentum"] == 0.9
    with pytest.raises(StoreExistsError, match="already exists"):
        store.new_run({}, run_id="my-run")
    with pytest.raises(ValueError, match="allowed"):
        store.new_run({}, run_id="a/b")
    with pytest.raises(ValueError, match="reserved"):
        store.new_run({"steps": 3})


def test_curves_side_by_side(store):
    a = store.new_run({"optimizer": "kfac"})
    b = store.new_run({"optimizer": "sgd"})
    for s in range(4):
        store.log(a, s, loss=10.0 - s, approx="blockdiag")
    for s in range(0, 8, 2):
        store.log(b, s, loss=20.0 - s, lr=0.1)
    store.flush()
    cv = store.curves([a, b])
    assert dict(cv.sizes) == {"run": 2, "step": 6}
    assert cv.run.values.tolist() == [a, b] and cv.step.values.tolist() == [0, 1, 2, 3, 4, 6]
    assert store.curves().run.values.tolist() == sorted([a, b])
    np.testing.assert_array_equal(cv.loss.sel(run=a).values, [10, 9, 8, 7, np.nan, np.nan])
    np.testing.assert_array_equal(cv.loss.sel(run=b).values, [20, np.nan, 18, np.nan, 16, 14])
    assert cv.approx.sel(run=b).values.tolist() == [""] * 6
    assert np.isnan(cv.lr.sel(run=a).values).all()
    only = store.curves([b], metrics="loss")
    assert list(only.data_vars) == ["loss"] and only.sizes["run"] == 1
    odd = store.curves(metrics=["nope", "loss"])  # not logged (yet): all NaN, same shape
    assert list(odd.data_vars) == ["nope", "loss"] and np.isnan(odd.nope.values).all()
    empty = store.curves(run_ids=[])
    assert dict(empty.sizes) == {"run": 0, "step": 0}


def test_resume_in_new_store_and_buffer_not_visible(tmp_path):
    path = tmp_path / "lab.zarr"
    with Store(path, flush_every=100) as w:
        run = w.new_run({})
        for s in range(5):
            w.log(run, s, loss=float(s))
        with Store(path, mode="r") as r:
            assert r.load_run(run).sizes["step"] == 0  # buffered only
    with Store(path, mode="r") as r:  # close() flushed
        assert r.load_run(run).sizes["step"] == 5
    with Store(path) as w2:
        with pytest.raises(ValueError, match="steps must increase"):
            w2.log(run, 4, loss=0.0)
        w2.log(run, 5, loss=5.0, extra=1.0)
    ds = Store(path, mode="r").load_run(run)
    assert ds.loss.values.tolist() == [0, 1, 2, 3, 4, 5]
    assert np.isnan(ds.extra.values[:5]).all() and ds.extra.values[5] == 1.0


def test_flush_interval(tmp_path):
    with Store(tmp_path / "lab.zarr", flush_every=1000, flush_interval=0.0) as s:
        run = s.new_run({})
        s.log(run, 0, loss=1.0)
        assert s.pending() == 0 and s.load_run(run).sizes["step"] == 1


def test_flush_is_fast(tmp_path):
    """20 rows x 15 metrics: one flush is tens of ms (budget generous for noisy CI)."""
    with Store(tmp_path / "lab.zarr", flush_every=10**6, flush_interval=None) as s:
        run = s.new_run({})
        times, step = [], 0
        for _ in range(6):
            for _ in range(20):
                s.log(run, step, approx="blockdiag", **{f"m{i}": float(step) for i in range(14)})
                step += 1
            t = time.perf_counter()
            s.flush()
            times.append(time.perf_counter() - t)
        assert np.median(times[1:]) < 0.25, times
        t = time.perf_counter()
        for _ in range(200):
            s.log(run, step, loss=1.0)
            step += 1
        assert (time.perf_counter() - t) / 200 < 2e-3
        s.flush()
        assert s.load_run(run).sizes["step"] == step


def test_context_manager_and_close(tmp_path):
    with Store(tmp_path / "lab.zarr", flush_every=100) as s:
        run = s.new_run({})
        s.log(run, 0, loss=1.0)
    assert "closed" in repr(s)
    with pytest.raises(StoreError, match="closed"):
        s.log(run, 1, loss=1.0)
    assert Store(tmp_path / "lab.zarr", mode="r").load_run(run).sizes["step"] == 1


def test_plain_xarray_opens_the_store(tmp_path):
    path = tmp_path / "lab.zarr"
    with Store(path) as s:
        run = s.new_run({"cfg": {"a": 1}})
        for i in range(3):
            s.log(run, i, loss=float(i), approx="blockdiag")
        s.event(run, 1, "control", damping=3.0)
        s.save_study("fig1", xr.Dataset({"F": (("row", "col"), np.eye(2))}))
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert tree.attrs["kfac_lab_store"] == "kfac_lab" and tree.attrs["kfac_lab_schema"] == 1
    assert tree[f"runs/{run}"].ds.loss.values.tolist() == [0.0, 1.0, 2.0]
    assert tree["studies/fig1"].ds.F.shape == (2, 2)
    assert set(tree.children) == {"studies", "runs", "checkpoints"}


def test_debris_of_a_killed_flush_is_ignored_then_trimmed(tmp_path):
    """What a writer killed mid-flush leaves (longer arrays, a new metric's array, temp
    files, an uncommitted run) is invisible to readers; the next writer or repair()
    trims it so plain xarray sees consistent dims."""
    import zarr

    path = tmp_path / "lab.zarr"
    with Store(path) as s:
        run = s.new_run({}, run_id="r")
        for i in range(3):
            s.log(run, i, loss=float(i))
    g = zarr.open_group(path / "runs" / "r", mode="r+")
    g["loss"].resize((5,))
    g["loss"][3:] = [99.0, 99.0]
    g.create_array("late", shape=(5,), dtype="f8", dimension_names=["step"])
    (path / "runs" / "r" / "loss" / "c" / "0.deadbeef.partial").write_bytes(b"x")
    zarr.open_group(path / "runs" / "half", mode="w")  # creation killed before its commit
    with Store(path, mode="r") as r:
        ds = r.load_run("r")
        assert ds.loss.values.tolist() == [0.0, 1.0, 2.0] and "late" not in ds
        assert list(r.runs().index) == ["r"]
    with pytest.raises(ValueError):
        xr.open_datatree(path, engine="zarr", consolidated=False)  # step: 3 vs 5
    with Store(path) as s:
        s.repair("r")
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)
    assert tree["runs/r"].ds.loss.values.tolist() == [0.0, 1.0, 2.0]
    assert not (path / "runs" / "r" / "late").exists()
    assert not list((path / "runs" / "r").rglob("*.partial"))
    with Store(path) as s:  # a resumed writer overwrites rows after the committed ones
        s.log(run, 3, loss=3.0)
    assert Store(path, mode="r").load_run(run).loss.values.tolist() == [0, 1, 2, 3]


def test_failed_flush_keeps_the_buffer(tmp_path, monkeypatch):
    with Store(tmp_path / "lab.zarr", flush_every=100) as s:
        run = s.new_run({}, run_id="r")
        s.log(run, 0, loss=1.0)
        backend = s._backend

        async def broken(*a, **k):
            raise OSError("No space left on device")

        monkeypatch.setattr(backend, "aupdate_attrs", broken)
        with pytest.raises(StoreError, match="No space left.*kept.*flush"):
            s.flush()
        assert s.pending() == 1 and s.load_run(run).sizes["step"] == 0
        monkeypatch.undo()
        s.log(run, 1, loss=2.0)
        s.flush()
        assert s.load_run(run).loss.values.tolist() == [1.0, 2.0]
