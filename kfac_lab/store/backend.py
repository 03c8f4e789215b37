"""Thin access layer over a zarr v3 store: open by path/URL, raw keys, listings.

Everything here is synchronous for callers; coroutines run on zarr's own event-loop
thread (``zarr.core.sync.sync``), which also works inside Jupyter's running loop.
Keys are ``/``-separated paths relative to the store root (``"runs/r1/zarr.json"``).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import uuid
from collections.abc import Awaitable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any, TypeVar

import zarr.api.asynchronous as za
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore, MemoryStore

from .errors import StoreError

__all__ = ["Backend", "open_backend", "sync", "gather"]

T = TypeVar("T")
CLAIM = "kfac_lab_claim"  # nonce of the process that created a group exclusively


def gather(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Run coroutines concurrently on zarr's loop and return their results in order."""
    coros = list(coros)
    if not coros:
        return []

    async def _all() -> list[T]:
        return list(await asyncio.gather(*coros))

    return sync(_all())


@dataclass
class Backend:
    """A zarr store plus the path it was opened from.

    Attributes
    ----------
    zstore : zarr.abc.store.Store
        ``LocalStore`` for local paths, ``FsspecStore`` for URLs (``memory://``, ``s3://``...).
    path : str
        What the user passed (shown in every error message).
    read_only : bool
    """

    zstore: Any
    path: str
    read_only: bool

    # ----------------------------------------------------------------- raw keys
    async def aget_bytes(self, key: str) -> bytes | None:
        buf = await self.zstore.get(key, prototype=default_buffer_prototype())
        return None if buf is None else buf.to_bytes()

    async def aget_json(self, key: str) -> dict | None:
        """Parsed JSON document at ``key``, ``None`` if absent; StoreError if not JSON."""
        raw = await self.aget_bytes(key)
        if raw is None:
            return None
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StoreError(
                f"damaged metadata {key!r} in store {self.path!r}: not valid JSON ({exc}); "
                "restore it from a backup or remove that entry"
            ) from None
        if not isinstance(doc, dict):
            raise StoreError(f"damaged metadata {key!r} in store {self.path!r}: not a JSON object")
        return doc

    def get_json(self, key: str) -> dict | None:
        return sync(self.aget_json(key))

    async def agroup_attrs(self, path: str) -> dict | None:
        """Attributes of the zarr group at ``path`` (``None`` if there is no group)."""
        doc = await self.aget_json(_join(path, "zarr.json"))
        if doc is None:
            return None
        if doc.get("node_type") != "group":
            raise StoreError(
                f"damaged entry {path!r} in store {self.path!r}: expected a zarr group, found "
                f"node_type={doc.get('node_type')!r}"
            )
        attrs = doc.get("attributes", {})
        if not isinstance(attrs, dict):
            raise StoreError(f"damaged metadata {path + '/zarr.json'!r} in store {self.path!r}")
        return attrs

    def group_attrs(self, path: str) -> dict | None:
        return sync(self.agroup_attrs(path))

    async def alist_dir(self, prefix: str) -> list[str]:
        return sorted([k async for k in self.zstore.list_dir(prefix)])

    def list_dir(self, prefix: str) -> list[str]:
        """Names directly under ``prefix`` (files and sub-groups), sorted."""
        return sync(self.alist_dir(prefix))

    async def alist_prefix(self, prefix: str) -> set[str]:
        return {k async for k in self.zstore.list_prefix(prefix)}

    def list_prefix(self, prefix: str) -> set[str]:
        """All keys below ``prefix`` (recursively)."""
        return sync(self.alist_prefix(prefix))

    def delete_dir(self, prefix: str) -> None:
        self.check_writable()
        sync(self.zstore.delete_dir(prefix))

    # ------------------------------------------------------------------ groups
    async def anew_group(self, path: str, attrs: dict) -> Any:
        """Create (replacing anything there) an empty group at ``path`` with ``attrs``."""
        self.check_writable()
        return await za.open_group(
            store=self.zstore, path=path, mode="w", zarr_format=3, attributes=attrs
        )

    async def aclaim_group(self, path: str, attrs: dict, *, mark: bool = True) -> bool:
        """Create the group at ``path`` with ``attrs`` only if none is there (one write).

        Exclusive on local disks (``zarr.json`` is linked into place, failing if it
        exists); on other stores as good as their ``set_if_not_exists``. With
        ``mark``, a nonce attribute (``kfac_lab_claim``) tells whether the group now
        there is ours: returns True if so (always False without ``mark``).
        """
        self.check_writable()
        nonce = uuid.uuid4().hex
        doc = {"zarr_format": 3, "node_type": "group",
               "attributes": {**attrs, CLAIM: nonce} if mark else dict(attrs)}
        buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc, indent=2).encode())
        await self.zstore.set_if_not_exists(_join(path, "zarr.json"), buf)
        if not mark:
            return False
        now = await self.agroup_attrs(path)
        return now is not None and now.get(CLAIM) == nonce

    def ensure_group(self, path: str, attrs: dict | None = None) -> None:
        """Create the group at ``path`` (with ``attrs``) unless one exists; safe when
        several processes do it at once."""
        if self.group_attrs(path) is None:
            sync(self.aclaim_group(path, attrs or {}, mark=False))

    async def aupdate_attrs(self, path: str, attrs: dict, drop: Iterable[str] = ()) -> None:
        """Rewrite the group metadata at ``path`` with ``attrs`` merged in, ``drop`` removed.

        One write of ``zarr.json`` (atomic on local disks and object stores), so the
        commit markers and the attributes change together.
        """
        self.check_writable()
        doc = await self.aget_json(_join(path, "zarr.json"))
        if doc is None:
            raise StoreError(f"entry {path!r} vanished from store {self.path!r}")
        new = dict(doc.get("attributes", {}))
        for key in drop:
            new.pop(key, None)
        new.update(attrs)
        doc["attributes"] = new
        buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc, indent=2).encode())
        await self.zstore.set(_join(path, "zarr.json"), buf)

    def update_attrs(self, path: str, attrs: dict, drop: Iterable[str] = ()) -> None:
        sync(self.aupdate_attrs(path, attrs, drop))

    # ------------------------------------------------------------------ arrays
    async def aopen_array(self, path: str) -> Any:
        arr = await za.open_array(
            store=self.zstore, path=path, mode="r" if self.read_only else "r+", zarr_format=3
        )
        return arr.with_config({"write_empty_chunks": True})

    async def acreate_array(self, path: str, **kwargs: Any) -> Any:
        self.check_writable()
        kwargs.setdefault("config", {"write_empty_chunks": True})
        return await za.create_array(self.zstore, name=path, zarr_format=3, overwrite=True, **kwargs)

    # ------------------------------------------------------------------- misc
    def check_writable(self) -> None:
        if self.read_only:
            raise StoreError(
                f"store {self.path!r} is opened read-only (mode='r'); open it with "
                "Store(path, mode='a') to write"
            )


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


join = _join


def _is_url(path: str) -> bool:
    return "://" in path


def open_backend(
    path: str | os.PathLike, *, read_only: bool, storage_options: dict | None = None
) -> tuple[Backend, bool]:
    """Open the zarr store at ``path``; return ``(backend, is_empty)``.

    ``is_empty`` is True when nothing is there yet (a missing or empty directory).
    Raises StoreError for a path that is a file, or missing in read-only mode.
    """
    shown = os.fspath(path)
    if not isinstance(shown, str):
        raise TypeError(f"store path must be a str or os.PathLike, got {type(path).__name__}")
    if not shown:
        raise ValueError("store path must not be empty")
    if shown.startswith("file://"):
        shown_local = shown[len("file://"):]
    elif _is_url(shown):
        shown_local = None
    else:
        shown_local = shown

    if shown_local is not None:
        p = Path(shown_local).expanduser()
        if p.exists() and not p.is_dir():
            raise StoreError(
                f"{shown!r} is a file, not a kfac_lab store directory; pass a directory "
                "path (e.g. 'runs/lab.zarr')"
            )
        if not p.exists():
            if read_only:
                raise StoreError(
                    f"no store at {shown!r} (nothing there); check the path, or open it "
                    "with mode='a' to create a new store"
                )
            empty = True
        else:
            empty = not any(p.iterdir())
        zstore = LocalStore(p, read_only=read_only)
        return Backend(zstore, shown, read_only), empty

    if shown.startswith("memory://"):
        return _memory_backend(shown, read_only)

    import fsspec  # only URLs need it (zarr's FsspecStore does too)

    fs, fpath = fsspec.core.url_to_fs(shown, **(storage_options or {}))
    if fs.isfile(fpath):
        raise StoreError(f"{shown!r} is a file, not a kfac_lab store directory")
    exists = fs.isdir(fpath)
    if not exists and read_only:
        raise StoreError(
            f"no store at {shown!r} (nothing there); check the URL, or open it with "
            "mode='a' to create a new store"
        )
    empty = not exists or not fs.ls(fpath, detail=False)
    zstore = FsspecStore.from_url(shown, storage_options=storage_options, read_only=read_only)
    return Backend(zstore, shown, read_only), empty


#: ``memory://`` stores of this process, by normalised path: one dict of keys each, shared by
#: every Store opened on the same URL (as fsspec's process-wide memory filesystem shares one).
_MEMORY: dict[str, dict] = {}
_MEMORY_LOCK = threading.Lock()


def _memory_backend(url: str, read_only: bool) -> tuple[Backend, bool]:
    """A ``memory://`` URL as zarr's own ``MemoryStore`` over this process's dict for that path.

    Not fsspec's ``MemoryFileSystem`` behind ``FsspecStore``: zarr runs a synchronous fsspec
    filesystem in a thread pool, so a flush on one thread and a listing on another iterated and
    changed its one process-wide dict at the same time ("dictionary changed size during
    iteration", seen in the test suite). ``MemoryStore`` is asynchronous: every key operation
    runs on zarr's single event-loop thread, one after another.
    """
    key = url[len("memory://"):].strip("/")
    with _MEMORY_LOCK:
        data = _MEMORY.get(key)
        if data is None:
            if read_only:
                raise StoreError(
                    f"no store at {url!r} (nothing there); check the URL, or open it with "
                    "mode='a' to create a new store"
                )
            data = _MEMORY[key] = {}
    return Backend(MemoryStore(data, read_only=read_only), url, read_only), not data


@contextmanager
def translate_errors(backend: Backend, what: str):
    """Turn unexpected exceptions while reading ``what`` into a StoreError naming it."""
    try:
        yield
    except StoreError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:  # zarr/numcodecs/OS errors on damaged data
        raise StoreError(
            f"cannot read {what} in store {backend.path!r}: it is damaged or not written by "
            f"kfac_lab ({type(exc).__name__}: {exc})"
        ) from exc


def expected_chunk_keys(arr: Any, upto: int | None = None) -> list[str]:
    """Store keys of every chunk of ``arr`` (an AsyncArray), or of its first ``upto`` rows.

    Arrays are written with ``write_empty_chunks=True``, so each of these keys must
    exist; a missing one means a deleted chunk (zarr would silently read fill values).
    """
    shape = tuple(arr.shape)
    if upto is not None and shape:
        shape = (min(upto, shape[0]),) + shape[1:]
    grid = [-(-s // c) for s, c in zip(shape, arr.chunks)]
    meta = arr.metadata
    return [join(arr.path, meta.encode_chunk_key(coords)) for coords in product(*map(range, grid))]
