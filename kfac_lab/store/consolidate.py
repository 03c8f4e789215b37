"""Consolidated metadata kept current, so plain ``xarray.open_datatree(path, engine="zarr")``
opens the store fast and without xarray's "Failed to open Zarr store with consolidated
metadata" RuntimeWarning.

zarr v3 keeps consolidated metadata inline in the root ``zarr.json``
(``consolidated_metadata.metadata``: one flat entry per group/array below the root), in
the layout ``zarr.consolidate_metadata`` writes. Rescanning the whole tree after every
flush would cost one read per array of every run, so each write refreshes only the
entries below the paths it changed (a run, a run's checkpoints, a study), under a
store-wide ``flock`` on the root directory (local paths) so that two processes never
lose each other's refresh. The root document still grows with the store (about 0.4 kB
per array), so the flushes ``Store.log`` makes on its own refresh a run at most every
``Store(refresh_interval=...)`` seconds (default 10); an explicit ``flush()``, a
release/close, and every checkpoint, study, deletion and repair refresh at once. A
lagging view is an older committed state, never a wrong one (rows are only appended).

The entries are a *committed view*: a run shows only the arrays its commit markers name,
with their committed lengths, and studies/checkpoints only once committed. So plain
xarray sees exactly what :class:`~kfac_lab.store.Store` would return, even right after a
killed writer left half-written rows behind.

Stores written before this existed have no consolidated metadata; the first writable
open (``Store(path)``) or :meth:`Store.consolidate` adds it.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterable
from contextlib import contextmanager

from zarr.core.buffer import default_buffer_prototype

from .backend import Backend, join, sync
from .commit import COMMITTED, STAGING
from .locks import lockable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["refresh", "refresh_all", "refresh_quietly", "has_consolidated"]

KEY = "consolidated_metadata"
_EMPTY = {"kind": "inline", "must_understand": False, "metadata": {}}
_ENTRY_PARENTS = ("studies", "checkpoints")  # children count only once committed


def has_consolidated(root_doc: dict | None) -> bool:
    meta = (root_doc or {}).get(KEY)
    return isinstance(meta, dict) and isinstance(meta.get("metadata"), dict)


@contextmanager
def _root_lock(backend: Backend):
    """Exclusive across processes for local stores (blocking: refreshes take milliseconds)."""
    if not lockable(backend):
        yield
        return
    fd = os.open(str(backend.zstore.root), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _group_entry(doc: dict) -> dict:
    out = {k: v for k, v in doc.items() if k != KEY}
    out[KEY] = json.loads(json.dumps(_EMPTY))
    return out


def _run_view(attrs: dict) -> dict[str, int] | None:
    """``{array: committed length}`` of a run group (None: not a committed run)."""
    from .runs import EVENT_VARS, M_EVENTS, M_METRICS, M_STEPS, STEP
    from .attrs import decode_value

    n, e = attrs.get(M_STEPS), attrs.get(M_EVENTS, 0)
    metrics = decode_value(attrs.get(M_METRICS, "json:{}"))
    if not isinstance(n, int) or not isinstance(e, int) or not isinstance(metrics, dict):
        return None
    return {STEP: n, **{m: n for m in metrics}, **{v: e for v in EVENT_VARS}}


async def _scan(backend: Backend, path: str) -> dict[str, dict]:
    """Entries of the node at ``path`` and everything below it (committed view)."""
    doc = await backend.aget_json(join(path, "zarr.json"))
    if doc is None:
        return {}
    if doc.get("node_type") == "array":
        return {path: doc}
    out = {path: _group_entry(doc)} if path else {}
    parts = path.split("/") if path else []
    attrs = doc.get("attributes") or {}
    lengths = None
    if len(parts) == 2 and parts[0] == "runs":
        lengths = _run_view(attrs)
        if lengths is None:  # being created
            return {}
    if len(parts) >= 2 and parts[0] in _ENTRY_PARENTS and parts[-1].startswith("step_") or (
        len(parts) == 2 and parts[0] == "studies"
    ):
        if not attrs.get(COMMITTED):
            return {}
    children = [
        c for c in await backend.alist_dir(path)
        if c != "zarr.json" and not c.endswith(".partial") and not c.startswith(".")
        and not c.startswith(STAGING)
    ]
    if lengths is not None:
        children = [c for c in children if c in lengths]
    subs = await asyncio.gather(*(_scan(backend, join(path, c)) for c in children))
    for sub in subs:
        if lengths is not None:
            for key, entry in sub.items():
                name = key.rsplit("/", 1)[-1]
                if entry.get("node_type") == "array" and name in lengths:
                    entry = dict(entry)
                    entry["shape"] = [lengths[name]] + list(entry.get("shape", [0]))[1:]
                    sub[key] = entry
        out.update(sub)
    return out


async def _write_root(backend: Backend, doc: dict) -> None:
    # compact: this document holds every node's metadata and is rewritten after writes
    buf = default_buffer_prototype().buffer.from_bytes(json.dumps(doc, separators=(",", ":")).encode())
    await backend.zstore.set("zarr.json", buf)


def refresh(backend: Backend, paths: Iterable[str]) -> None:
    """Re-read the metadata below each of ``paths`` into the root's consolidated metadata
    (a full rescan when the root has none yet)."""
    paths = [p.strip("/") for p in paths]

    async def go() -> None:
        doc = await backend.aget_json("zarr.json")
        if doc is None:
            return
        if not has_consolidated(doc):
            meta = await _scan(backend, "")
        else:
            meta = dict(doc[KEY]["metadata"])
            for p in paths:
                meta = {k: v for k, v in meta.items() if k != p and not k.startswith(p + "/")}
            found = await asyncio.gather(*(_scan(backend, p) for p in paths))
            for p, sub in zip(paths, found):
                meta.update(sub)
                parts = p.split("/")
                for i in range(1, len(parts)):  # parent groups (created by this write)
                    parent = "/".join(parts[:i])
                    if sub and parent not in meta:
                        pdoc = await backend.aget_json(join(parent, "zarr.json"))
                        if pdoc is not None and pdoc.get("node_type") == "group":
                            meta[parent] = _group_entry(pdoc)
        doc[KEY] = {**_EMPTY, "metadata": dict(sorted(meta.items()))}
        await _write_root(backend, doc)

    backend.check_writable()
    with _root_lock(backend):
        sync(go())


def refresh_all(backend: Backend) -> None:
    """Rebuild the consolidated metadata from the whole tree."""

    async def go() -> None:
        doc = await backend.aget_json("zarr.json")
        if doc is None:
            return
        doc[KEY] = {**_EMPTY, "metadata": dict(sorted((await _scan(backend, "")).items()))}
        await _write_root(backend, doc)

    backend.check_writable()
    with _root_lock(backend):
        sync(go())


def refresh_quietly(backend: Backend, paths: Iterable[str] | None) -> None:
    """:func:`refresh` (``None``: :func:`refresh_all`) after a write that is already
    committed: a failure only makes plain xarray's view lag, so it warns instead of raising."""
    if backend.read_only:
        return
    try:
        if paths is None:
            refresh_all(backend)
        else:
            refresh(backend, paths)
    except Exception as exc:  # noqa: BLE001 - the data itself is safely written
        import warnings

        from .errors import StoreWarning

        warnings.warn(
            f"store {backend.path!r}: could not refresh the consolidated metadata ({exc}); "
            "plain xarray may show an older state until Store(path).consolidate()",
            StoreWarning, stacklevel=3,
        )
