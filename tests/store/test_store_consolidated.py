"""Plain xarray opens the store without a warning and sees exactly the committed data."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from kfac_lab.store import Store
from kfac_lab.store.consolidate import refresh_all

ROOT = str(Path(__file__).resolve().parents[2])


def open_plain(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning (nor any other)
        return xr.open_datatree(path, engine="zarr")


def consolidated(path):
    return json.loads((Path(path) / "zarr.json").read_text())["consolidated_metadata"]["metadata"]


def assert_matches_store(path):
    tree = open_plain(path)
    with Store(path, mode="r") as s:
        assert sorted(tree["runs"].children) == sorted(s.runs().index)
        for rid in s.runs().index:
            ds, plain = s.load_run(rid), tree[f"runs/{rid}"].ds
            assert dict(plain.sizes) == dict(ds.sizes)
            for name in ds.variables:
                np.testing.assert_array_equal(plain[name].values, ds[name].values)
            for step in s.checkpoints(rid):
                node = tree[f"checkpoints/{rid}/step_{step:08d}"].ds
                assert node.state.size == node.attrs["nbytes"]
        assert sorted(tree["studies"].children) == s.studies()
        for name in s.studies():
            xr.testing.assert_equal(tree[f"studies/{name}"].ds.load().drop_attrs(), s.load_study(name).drop_attrs())
    return tree


def test_every_write_keeps_plain_xarray_current(tmp_path):
    path = tmp_path / "lab.zarr"
    with Store(path, keep_checkpoints=2) as s:
        assert_matches_store(path)  # a new, empty store
        a = s.new_run({"problem": "tiny"}, run_id="a")
        assert_matches_store(path)  # a run with no rows yet
        for i in range(30):
            s.log(a, i, loss=float(i), approx="blockdiag" if i % 2 else "tridiag")
            if i % 10 == 0:
                s.event(a, i, "control", damping=float(i))
                s.save_checkpoint(a, i, {"w": torch.ones(3) * i}, {})
        s.flush()
        assert_matches_store(path)
        s.log(a, 30, loss=30.0, late=1.0)  # a metric first seen now
        s.save_study("fig", xr.Dataset({"F": (("i", "j"), np.eye(3))}, attrs={"n": 3}))
        s.save_study("fig", xr.Dataset({"F": (("i", "j"), 2 * np.eye(3))}), overwrite=True)
        s.delete_checkpoint(a, 20)
    tree = assert_matches_store(path)
    assert tree["runs/a"].ds.sizes["step"] == 31 and "late" in tree["runs/a"].ds
    assert "kfac_lab_writer" not in tree["runs/a"].ds.attrs  # released at close
    # the incremental refreshes equal a full rebuild
    before = consolidated(path)
    refresh_all(Store(path)._backend)
    assert consolidated(path) == before


def test_zarr_reads_the_same_hierarchy(tmp_path):
    """zarr's own consolidation of the same (clean) store lists the same nodes and shapes."""
    path = tmp_path / "lab.zarr"
    with Store(path) as s:
        s.new_run({}, run_id="a")
        for i in range(5):
            s.log("a", i, loss=float(i), tag="x")
        s.save_checkpoint("a", 4, {"w": torch.ones(2)}, {})
        s.save_study("fig", xr.Dataset({"F": ("i", np.arange(4.0))}))
    ours = consolidated(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr: "consolidated metadata is not in the v3 spec"
        zarr.consolidate_metadata(str(path))
    theirs = consolidated(path)
    assert sorted(ours) == sorted(theirs)
    assert {k: v.get("shape") for k, v in ours.items()} == {k: v.get("shape") for k, v in theirs.items()}


def test_killed_writer_debris_is_invisible_to_plain_xarray(tmp_path):
    path = tmp_path / "lab.zarr"
    with Store(path) as s:
        s.new_run({}, run_id="a")
        for i in range(5):
            s.log("a", i, loss=float(i))
    # what a writer killed mid-flush leaves: longer arrays and a new, uncommitted metric
    g = zarr.open_group(path / "runs" / "a", mode="r+")
    g["loss"].resize((8,))
    g["step"].resize((8,))
    g.create_array("half_written", shape=(8,), dtype="f8", dimension_names=["step"])
    raw = xr.open_datatree(path, engine="zarr", consolidated=False)  # the raw tree shows the debris
    assert raw["runs/a"].ds.sizes["step"] == 8 and "half_written" in raw["runs/a"].ds
    tree = open_plain(path)  # the consolidated, committed view
    assert tree["runs/a"].ds.sizes["step"] == 5 and "half_written" not in tree["runs/a"].ds
    np.testing.assert_array_equal(tree["runs/a"].ds.loss.values, np.arange(5.0))


def test_store_written_without_consolidated_metadata(tmp_path):
    """Stores written before consolidation existed still open; the first writable open adds it."""
    path = tmp_path / "lab.zarr"
    with Store(path) as s:
        s.new_run({}, run_id="a")
        s.log("a", 0, loss=1.0)
    root = json.loads((path / "zarr.json").read_text())
    del root["consolidated_metadata"]
    (path / "zarr.json").write_text(json.dumps(root))
    with Store(path, mode="r") as s:  # read-only: opens, writes nothing
        assert s.load_run("a").loss.values.tolist() == [1.0]
    with pytest.warns(RuntimeWarning, match="consolidated metadata"):
        xr.open_datatree(path, engine="zarr")  # the old behaviour, for such a store
    Store(path).close()
    assert open_plain(path)["runs/a"].ds.loss.values.tolist() == [1.0]


WRITER = textwrap.dedent(
    """
    import sys
    from kfac_lab.store import Store
    path, run = sys.argv[1], sys.argv[2]
    with Store(path, flush_every=5, flush_interval=None) as s:
        s.new_run({}, run_id=run)
        for i in range(150):
            s.log(run, i, loss=float(i))
    """
)


def test_concurrent_writers_of_different_runs_lose_no_refresh(tmp_path):
    path = tmp_path / "lab.zarr"
    Store(path).close()
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), r], env=env, stderr=subprocess.PIPE, text=True)
             for r in ("a", "b", "c")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    tree = assert_matches_store(path)
    assert [tree[f"runs/{r}"].ds.sizes["step"] for r in "abc"] == [150, 150, 150]
    before = consolidated(path)
    refresh_all(Store(path)._backend)
    assert consolidated(path) == before
