"""Dataset helpers shared by studies, runs and export: strings, attrs, chunk checks."""

from __future__ import annotations

import numpy as np
import xarray as xr
import zarr

from .attrs import decode_attrs, encode_attrs
from .backend import Backend, expected_chunk_keys
from .errors import StoreError

__all__ = ["strings_to_object", "encode_dataset_attrs", "decode_dataset_attrs", "check_chunks"]


def _is_text(dtype: np.dtype) -> bool:
    return dtype.kind in "USO" or dtype.kind == "T"  # "T": numpy StringDType


def strings_to_object(ds: xr.Dataset) -> xr.Dataset:
    """Return ``ds`` with every text variable/coord as ``object`` dtype (variable-length).

    Fixed-width ``<U`` arrays have no zarr v3 spec (zarr warns), numpy's StringDType
    is not understood by netCDF writers; object arrays of ``str`` work everywhere.
    """
    out = ds.copy(deep=False)
    for name, var in list(out.variables.items()):
        if _is_text(var.dtype) and var.dtype != object:
            new = var.copy(data=np.asarray(var.values).astype(object))
            if name in out.indexes:
                out = out.assign_coords({name: new})
            else:
                out[name] = new
    return out


def encode_dataset_attrs(ds: xr.Dataset, drop: tuple[str, ...] = ()) -> xr.Dataset:
    """Copy of ``ds`` with dataset and variable attrs encoded (see :mod:`.attrs`) and
    backend ``encoding`` cleared (so nothing from another file format leaks in)."""
    out = ds.copy(deep=False)
    out.attrs = encode_attrs({k: v for k, v in ds.attrs.items() if k not in drop})
    for name in out.variables:
        var = out.variables[name]
        var.attrs = encode_attrs(var.attrs)
        var.encoding = {}
    return out


def decode_dataset_attrs(ds: xr.Dataset, drop: tuple[str, ...] = ()) -> xr.Dataset:
    """Inverse of :func:`encode_dataset_attrs` (drops the named bookkeeping attrs)."""
    ds.attrs = {k: v for k, v in decode_attrs(ds.attrs).items() if k not in drop}
    for name in ds.variables:
        ds.variables[name].attrs = decode_attrs(ds.variables[name].attrs)
        ds.variables[name].encoding = {}
    return ds


def check_chunks(backend: Backend, group_path: str, what: str, upto: dict[str, int] | None = None) -> None:
    """Raise StoreError if any chunk of the arrays in ``group_path`` is missing.

    ``upto`` maps array name -> number of leading rows that must be present (default:
    the whole array). Everything kfac_lab writes uses ``write_empty_chunks=True``.
    """
    keys = backend.list_prefix(group_path + "/")
    group = zarr.open_group(backend.zstore, path=group_path, mode="r")
    for name, arr in group.arrays():
        if upto is not None and name not in upto:
            continue
        need = expected_chunk_keys(arr, None if upto is None else upto[name])
        missing = [k for k in need if k not in keys]
        if missing:
            raise StoreError(
                f"{what} in store {backend.path!r} is damaged: {len(missing)} chunk(s) of "
                f"variable {name!r} are missing (e.g. {missing[0]!r}); restore them from a "
                "backup or remove the entry"
            )


