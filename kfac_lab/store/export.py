"""The whole store as one in-memory ``xarray.DataTree``, and its netCDF export."""

from __future__ import annotations

import importlib.util
import os
import uuid
from typing import TYPE_CHECKING

import numpy as np
import xarray as xr
import zarr

from . import checkpoints as ckpt
from . import commit
from .attrs import decode_attrs
from .backend import Backend, join
from .dsutil import encode_dataset_attrs
from .names import validate_name

if TYPE_CHECKING:
    from .core import Store

__all__ = ["to_datatree", "export_netcdf", "netcdf_engine"]


def _checkpoint_nodes(backend: Backend) -> dict[str, xr.Dataset]:
    nodes: dict[str, xr.Dataset] = {}
    for run_id in backend.list_dir(ckpt.GROUP):
        try:
            validate_name(run_id)
        except ValueError:
            continue
        nodes[f"/{ckpt.GROUP}/{run_id}"] = xr.Dataset()
        for step in ckpt.list_checkpoints(backend, run_id):
            name = ckpt.step_name(step)
            found = commit.resolve(backend, join(ckpt.GROUP, run_id), name)
            if found is None:  # replaced or removed meanwhile
                continue
            path = found[0]
            group = zarr.open_group(backend.zstore, path=path, mode="r")
            attrs = {k: v for k, v in group.attrs.asdict().items() if k != commit.COMMITTED}
            data = np.asarray(group["state"][...], dtype=np.uint8)
            nodes[f"/{ckpt.GROUP}/{run_id}/{name}"] = xr.Dataset(
                {"state": (("state_bytes",), data)}, attrs=attrs
            )
    return nodes


def to_datatree(store: Store, *, decode: bool = True, checkpoints: bool = False) -> xr.DataTree:
    """Everything committed in ``store``, loaded into memory, as a DataTree.

    Groups: ``/studies/<name>``, ``/runs/<run_id>`` (dims ``step``, ``event``) and,
    with ``checkpoints=True``, ``/checkpoints/<run_id>/step_<N>`` (``state`` bytes).
    With ``decode=False`` attrs stay encoded (str/int/float only), as netCDF needs.
    """
    backend = store._backend
    root_attrs = dict(store._root_attrs)
    nodes: dict[str, xr.Dataset] = {
        "/": xr.Dataset(attrs=decode_attrs(root_attrs) if decode else root_attrs),
        "/studies": xr.Dataset(), "/runs": xr.Dataset(), "/checkpoints": xr.Dataset(),
    }
    for name in store.studies():
        ds = store.load_study(name)
        nodes[f"/studies/{name}"] = ds if decode else encode_dataset_attrs(ds)
    for run_id in store.runs().index:
        ds = store.load_run(run_id)
        nodes[f"/runs/{run_id}"] = ds if decode else encode_dataset_attrs(ds)
    if checkpoints:
        nodes.update(_checkpoint_nodes(backend))
    if not decode:  # text as variable-length strings, even when empty
        for ds in nodes.values():
            for var in ds.variables.values():
                if var.dtype == object:
                    var.encoding["dtype"] = str
    return xr.DataTree.from_dict(nodes)


def netcdf_engine() -> str:
    """The netCDF engine to use (``"h5netcdf"`` or ``"netcdf4"``); ImportError if none."""
    if importlib.util.find_spec("h5netcdf") and importlib.util.find_spec("h5py"):
        return "h5netcdf"
    if importlib.util.find_spec("netCDF4"):
        return "netcdf4"
    raise ImportError(
        "Store.export_netcdf needs a netCDF engine but neither 'h5netcdf' (with 'h5py') nor "
        "'netCDF4' is installed; install one: pip install 'h5netcdf[h5py]'"
    )


def export_netcdf(store: Store, path: str | os.PathLike, *, checkpoints: bool = False) -> str:
    """Write the committed store to one netCDF-4 file at ``path`` (groups kept).

    Written to a temporary file first and renamed, so an existing file at ``path`` is
    only replaced by a complete export. Returns the path written.
    """
    engine = netcdf_engine()
    tree = to_datatree(store, decode=False, checkpoints=checkpoints)
    path = os.fspath(path)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.partial"
    try:
        tree.to_netcdf(tmp, engine=engine)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
