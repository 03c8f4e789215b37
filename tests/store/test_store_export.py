"""The whole tree: to_datatree and netCDF export (or the clear error without an engine)."""

import importlib.util

import numpy as np
import pytest
import torch
import xarray as xr

from kfac_lab.store import Store, decode_attrs
from kfac_lab.store import export


@pytest.fixture
def filled(tmp_path):
    with Store(tmp_path / "lab.zarr") as s:
        s.save_study("fig1", xr.Dataset(
            {"exact": (("row", "col"), np.eye(3)), "A_1": (("a1_row", "a1_col"), np.ones((2, 2)))},
            coords={"row": [0, 1, 2], "layer": ("row", ["l1", "l1", "l2"])},
            attrs={"model": "mlp", "layers": [1, 2], "flag": True},
        ))
        run = s.new_run({"optimizer": "kfac", "hp": {"damping": 150.0}}, run_id="r1")
        for i in range(4):
            s.log(run, i, loss=1.0 / (i + 1), approx="blockdiag")
        s.new_run({"optimizer": "sgd"}, run_id="r2")  # no rows, no events
        s.event(run, 2, "control", damping=30.0)
        s.save_checkpoint(run, 3, {"w": torch.ones(2)}, {})
    return Store(tmp_path / "lab.zarr", mode="r")


def test_to_datatree(filled):
    tree = filled.to_datatree(checkpoints=True)
    assert tree.attrs["kfac_lab_schema"] == 1
    assert tree["studies/fig1"].ds.attrs["layers"] == [1, 2]
    assert tree["runs/r1"].ds.loss.sizes["step"] == 4
    assert tree["checkpoints/r1/step_00000003"].ds.state.dtype == np.uint8


@pytest.mark.skipif(
    importlib.util.find_spec("h5netcdf") is None and importlib.util.find_spec("netCDF4") is None,
    reason="no netCDF engine installed",
)
def test_export_netcdf_round_trip(filled, tmp_path):
    out = filled.export_netcdf(tmp_path / "lab.nc", checkpoints=True)
    engine = export.netcdf_engine()
    tree = xr.open_datatree(out, engine=engine)
    study = tree["studies/fig1"].ds
    np.testing.assert_array_equal(study.exact.values, np.eye(3))
    assert list(study.layer.values) == ["l1", "l1", "l2"]
    assert decode_attrs(study.attrs)["layers"] == [1, 2] and decode_attrs(study.attrs)["flag"] is True
    run = tree["runs/r1"].ds
    np.testing.assert_allclose(run.loss.values, 1.0 / np.arange(1, 5))
    assert decode_attrs(run.attrs)["hp"] == {"damping": 150.0}
    assert list(run.event_kind.values) == ["control"]
    assert tree["runs/r2"].ds.sizes["step"] == 0
    raw = tree["checkpoints/r1/step_00000003"].ds.state.values.tobytes()
    import hashlib

    assert hashlib.sha256(raw).hexdigest() == tree["checkpoints/r1/step_00000003"].ds.attrs["sha256"]


def test_export_without_engine_names_the_package(filled, tmp_path, monkeypatch):
    target = tmp_path / "keep.nc"
    target.write_bytes(b"previous export")
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match=r"h5netcdf\[h5py\]"):
        filled.export_netcdf(target)
    assert target.read_bytes() == b"previous export"
