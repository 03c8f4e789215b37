"""Foreign, damaged and misused paths give a StoreError naming the problem and path."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import xarray as xr
import zarr

from kfac_lab.store import Store, StoreError, StoreWarning


def make_store(path):
    with Store(path) as s:
        run = s.new_run({"problem": "mnist"}, run_id="r1")
        for i in range(30):
            s.log(run, i, loss=float(i), approx="blockdiag")
        s.save_study("fig1", xr.Dataset({"F": (("row", "col"), np.eye(3))}, coords={"row": [0, 1, 2]}))
    return run


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "lab.zarr"
    f.write_text("hello")
    with pytest.raises(StoreError, match=r"is a file.*lab\.zarr"):
        Store(f)


def test_non_zarr_directory(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    (d / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(StoreError, match="not a kfac_lab store.*no zarr.json") as err:
        Store(d)
    assert str(d) in str(err.value)
    assert (d / "cat.jpg").read_bytes() == b"\xff\xd8"  # untouched
    with pytest.raises(StoreError, match="not a kfac_lab store"):
        Store(d, mode="r")


def test_foreign_zarr_stores(tmp_path):
    g = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    g.attrs["owner"] = "someone else"
    with pytest.raises(StoreError, match="zarr store but not a kfac_lab store.*kfac_lab_store"):
        Store(tmp_path / "other.zarr")
    assert zarr.open_group(tmp_path / "other.zarr", mode="r").attrs["owner"] == "someone else"
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    with pytest.raises(StoreError, match="zarr v2 store"):
        Store(tmp_path / "v2.zarr")
    zarr.create_array(tmp_path / "arr.zarr", shape=(2,), dtype="f8")
    with pytest.raises(StoreError, match="zarr array, not a kfac_lab store"):
        Store(tmp_path / "arr.zarr")


def test_missing_path_read_only(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "nothing.zarr", mode="r")
    assert not (tmp_path / "nothing.zarr").exists()
    with pytest.raises(ValueError, match="mode must be"):
        Store(tmp_path / "x.zarr", mode="w")


def test_garbage_root_metadata(tmp_path):
    path = tmp_path / "lab.zarr"
    make_store(path)
    (path / "zarr.json").write_text("{not json")
    with pytest.raises(StoreError, match=r"damaged metadata 'zarr.json'.*not valid JSON"):
        Store(path)


def test_newer_schema(tmp_path):
    path = tmp_path / "lab.zarr"
    make_store(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["kfac_lab_schema"] = 99
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema 99.*upgrade kfac_lab"):
        Store(path, mode="r")


def test_garbage_run_metadata(tmp_path):
    path = tmp_path / "lab.zarr"
    run = make_store(path)
    (path / "runs" / run / "zarr.json").write_bytes(b"\x00garbage")
    with Store(path, mode="r") as s:
        with pytest.raises(StoreError, match="runs/r1/zarr.json.*not valid JSON"):
            s.load_run(run)
        with pytest.warns(StoreWarning, match="skipping damaged run 'r1'"):
            assert s.runs().empty


def test_deleted_run_chunk(tmp_path):
    path = tmp_path / "lab.zarr"
    run = make_store(path)
    os.remove(path / "runs" / run / "loss" / "c" / "0")
    with Store(path, mode="r") as s:
        with pytest.raises(StoreError, match="damaged: chunk .*loss.* is missing"):
            s.load_run(run)


def test_garbage_run_chunk(tmp_path):
    path = tmp_path / "lab.zarr"
    run = make_store(path)
    chunk = path / "runs" / run / "loss" / "c" / "0"
    original = chunk.read_bytes()
    data = bytearray(original)
    data[5] ^= 0x55  # same length: caught by the crc32c checksum
    chunk.write_bytes(bytes(data))
    with Store(path, mode="r") as s:
        with pytest.raises(StoreError, match=r"run 'r1' .*damaged: array 'loss'.*checksum"):
            s.load_run(run)
    chunk.write_bytes(original)
    (path / "runs" / run / "approx" / "c" / "0").write_bytes(b"garbage")
    with Store(path, mode="r") as s:
        with pytest.raises(StoreError, match=r"run 'r1' .*damaged: array 'approx'"):
            s.load_run(run)


def test_deleted_array_and_bad_markers(tmp_path):
    path = tmp_path / "lab.zarr"
    run = make_store(path)
    shutil.rmtree(path / "runs" / run / "approx")
    with Store(path, mode="r") as s, pytest.raises(StoreError, match="r1"):
        s.load_run(run)
    meta = json.loads((path / "runs" / run / "zarr.json").read_text())
    meta["attributes"]["kfac_lab_committed_steps"] = "many"
    (path / "runs" / run / "zarr.json").write_text(json.dumps(meta))
    with Store(path, mode="r") as s, pytest.raises(StoreError, match="commit markers are invalid"):
        s.load_run(run)


def test_study_damage(tmp_path):
    path = tmp_path / "lab.zarr"
    make_store(path)
    chunk = path / "studies" / "fig1" / "F" / "c" / "0" / "0"
    saved = chunk.read_bytes()
    os.remove(chunk)
    with Store(path, mode="r") as s, pytest.raises(StoreError, match="study 'fig1'.*missing"):
        s.load_study("fig1")
    chunk.write_bytes(b"garbage")
    with Store(path, mode="r") as s, pytest.raises(StoreError, match="cannot read study 'fig1'"):
        s.load_study("fig1")
    chunk.write_bytes(saved)
    (path / "studies" / "fig1" / "F" / "zarr.json").write_text("[1, 2")
    with Store(path, mode="r") as s, pytest.raises(StoreError, match="study 'fig1'"):
        s.load_study("fig1")


def test_damage_in_one_entry_leaves_others_usable(tmp_path):
    path = tmp_path / "lab.zarr"
    make_store(path)
    with Store(path) as s:
        good = s.new_run({}, run_id="good")
        s.log(good, 0, loss=1.0)
    (path / "runs" / "r1" / "zarr.json").write_text("{")
    with Store(path, mode="r") as s:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            assert list(s.runs().index) == ["good"]
            assert s.curves().run.values.tolist() == ["good"]
        assert s.load_run("good").loss.values.tolist() == [1.0]
        assert s.studies() == ["fig1"]
