"""``/studies/<name>``: one committed ``xarray.Dataset`` per Fisher study."""

from __future__ import annotations

import warnings

import xarray as xr

from zarr.codecs import Crc32cCodec, ZstdCodec

from . import commit
from .backend import Backend, join, translate_errors
from .consolidate import refresh_quietly
from .dsutil import check_chunks, decode_dataset_attrs, encode_dataset_attrs, strings_to_object
from .errors import NotFoundError, StoreExistsError, StoreWarning
from .names import validate_name

__all__ = ["GROUP", "save_study", "load_study", "list_studies"]

GROUP = "studies"


def save_study(backend: Backend, name: str, ds: xr.Dataset, overwrite: bool = False) -> None:
    """Write ``ds`` as study ``name``; replace an existing one only with ``overwrite=True``.

    Crash-safe: the new version is written completely before it replaces the old
    one (see :mod:`.commit`), so a reader always gets one whole version.
    """
    validate_name(name, "study name")
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"save_study expects an xarray.Dataset, got {type(ds).__name__}")
    backend.check_writable()
    if not overwrite and commit.resolve(backend, GROUP, name) is not None:
        raise StoreExistsError(
            f"study {name!r} already exists in store {backend.path!r}; pass overwrite=True "
            "to replace it (or choose another name)"
        )
    prepared = strings_to_object(encode_dataset_attrs(ds, drop=(commit.COMMITTED,)))
    # every array checksummed (crc32c after zstd: an edit on disk fails the read)
    encoding = {name: {"compressors": [ZstdCodec(), Crc32cCodec()]} for name in prepared.variables}

    def write(path: str) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
            prepared.to_zarr(
                backend.zstore, group=path, mode="w", consolidated=False, zarr_format=3,
                write_empty_chunks=True, encoding=encoding,
            )

    backend.ensure_group(GROUP)
    commit.replace(backend, GROUP, name, write)
    refresh_quietly(backend, [join(GROUP, name), join(GROUP, commit.STAGING + name)])


def load_study(backend: Backend, name: str) -> xr.Dataset:
    """The committed study ``name``, loaded into memory (attrs decoded)."""
    validate_name(name, "study name")
    what = f"study {name!r}"

    def read(path: str) -> xr.Dataset:
        with translate_errors(backend, what):
            with xr.open_dataset(
                backend.zstore, engine="zarr", group=path, consolidated=False, chunks=None,
                zarr_format=3,
            ) as ds:
                ds = ds.load()
            check_chunks(backend, path, what)
        return decode_dataset_attrs(strings_to_object(ds), drop=(commit.COMMITTED,))

    try:
        return commit.read_consistent(backend, GROUP, name, what, read)
    except KeyError:
        raise NotFoundError(
            f"no study {name!r} in store {backend.path!r}; studies: "
            f"{list_studies(backend)}"
        ) from None


def list_studies(backend: Backend) -> list[str]:
    """Sorted names of the committed studies (damaged ones are skipped with a warning)."""

    def damaged(name: str, exc: Exception) -> None:
        warnings.warn(f"skipping damaged study {name!r}: {exc}", StoreWarning, stacklevel=3)

    return commit.committed_names(backend, GROUP, damaged)
