"""``Store``: the lab's persistent memory — one zarr directory holding a DataTree.

Layout (zarr v3; consolidated metadata inline in the root ``zarr.json``)::

    <path>/                        root group; attrs kfac_lab_store="kfac_lab",
                                   kfac_lab_schema=1, kfac_lab_created, kfac_lab_version
      studies/<name>/              one Dataset per study (committed: attr kfac_lab_committed)
      runs/<run_id>/               curves over dim step, events over dim event
      checkpoints/<run_id>/step_<NNNNNNNN>/state   torch.save bytes (uint8, dim state_bytes)

It opens with plain ``xarray.open_datatree(path, engine="zarr")``, without a warning: every
write refreshes the consolidated metadata, which holds the committed view only (see
:mod:`.consolidate`). Each run has one writer at a time, enforced by a lock (see
:mod:`.locks`); processes writing different runs never collide; listings are derived
from the groups present.
"""

from __future__ import annotations

import atexit
import math
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import xarray as xr

from . import checkpoints as ckpt
from . import consolidate, export, locks
from . import runs as runs_mod
from . import studies as studies_mod
from .backend import open_backend, translate_errors
from .errors import StoreError, StoreWarning
from .names import validate_name

__all__ = ["Store", "SCHEMA_VERSION", "MARKER"]

SCHEMA_VERSION = 1
MARKER_KEY = "kfac_lab_store"
MARKER = "kfac_lab"
SCHEMA_KEY = "kfac_lab_schema"
_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()
_DEFAULT: Any = object()  # "the Store's retention setting"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("kfac-lab")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"


class Store:
    """The lab's store: studies, training runs and checkpoints in one zarr directory.

    Parameters
    ----------
    path : str or os.PathLike
        A local directory (created if missing or empty) or an fsspec URL zarr
        supports (``"memory://lab.zarr"``, ``"s3://bucket/lab.zarr"``...).
    mode : {"a", "r"}
        ``"a"`` (default): read and write, create if needed. ``"r"``: read-only; the
        store must exist. Many readers may follow a writer (dashboards do).
    flush_every : int
        Buffered rows per run that trigger a flush in :meth:`log` (default 20).
    flush_interval : float
        Seconds after which :meth:`log` also flushes a run's buffer, so slow runs
        still show up promptly (default 5.0; ``None`` disables).
    storage_options : dict, optional
        Passed to fsspec for URLs.
    keep_checkpoints : int or None
        Retention: after a checkpoint of a run is written, only the newest
        ``keep_checkpoints`` of that run are kept (default 3; ``None`` keeps all).
    keep_every : int, optional
        Retention: also keep every checkpoint whose step is a multiple of this.
    refresh_interval : float
        Seconds between refreshes of the consolidated metadata (what plain xarray reads)
        during a run's automatic flushes (default 10; 0: at every flush). Explicit
        :meth:`flush`, :meth:`release`, :meth:`close` and checkpoint/study writes refresh
        at once.

    Raises
    ------
    StoreError
        The path is a file, a foreign/damaged directory or zarr store, was written by
        a newer schema, or (``mode="r"``) does not exist. The message names the path.

    Notes
    -----
    Every write is crash-safe: data first, commit marker last; readers only see
    committed data. A run has one writer at a time: the first write to a run takes its
    lock (:meth:`claim`), and a second writer elsewhere gets a StoreError at once;
    readers never lock. Every array is checksummed (crc32c). See ``docs/reliability.md``. Runs buffer rows in memory: a killed writer loses only the rows
    not yet flushed. Use ``with Store(p) as s:`` or :meth:`close` to flush at the end
    (an ``atexit`` hook also flushes stores still open at interpreter exit).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        mode: str = "a",
        *,
        flush_every: int = 20,
        flush_interval: float | None = 5.0,
        storage_options: dict | None = None,
        keep_checkpoints: int | None = 3,
        keep_every: int | None = None,
        refresh_interval: float = 10.0,
    ) -> None:
        if mode not in ("a", "r"):
            raise ValueError(f"mode must be 'a' (read/write, create) or 'r' (read-only), got {mode!r}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"flush_every must be an int >= 1, got {flush_every!r}")
        if flush_interval is not None and not flush_interval >= 0:
            raise ValueError(f"flush_interval must be seconds >= 0 or None, got {flush_interval!r}")
        self.keep_checkpoints, self.keep_every = ckpt.check_retention(keep_checkpoints, keep_every)
        if isinstance(refresh_interval, bool) or not isinstance(refresh_interval, (int, float)) \
                or not refresh_interval >= 0:
            raise ValueError(f"refresh_interval must be seconds >= 0, got {refresh_interval!r}")
        self.refresh_interval = float(refresh_interval)
        self._refreshed: dict[str, float] = {}
        self._stale: set[str] = set()  # runs flushed since their last refresh
        self._verified: dict[str, tuple] = {}  # run -> (committed state, damage or None)
        self.mode = mode
        self.flush_every = flush_every
        self.flush_interval = flush_interval
        self._lock = threading.RLock()
        self._writers: dict[str, runs_mod.RunWriter] = {}
        self._locks: dict[str, locks.RunLock] = {}
        self._owners: dict[str, weakref.ref] = {}
        self._closed = False
        self._backend, empty = open_backend(path, read_only=(mode == "r"), storage_options=storage_options)
        self._root_attrs = self._open_root(empty)
        _OPEN_STORES.add(self)
        # a Store dropped without close() must not keep its runs locked until the process ends
        weakref.finalize(self, _release_locks, self._locks)

    # ------------------------------------------------------------------ opening
    def _open_root(self, empty: bool) -> dict[str, Any]:
        b = self._backend
        if empty and b.read_only:
            raise StoreError(
                f"no store at {b.path!r} (empty directory); open it with mode='a' to create one"
            )
        if empty:
            attrs = {
                MARKER_KEY: MARKER, SCHEMA_KEY: SCHEMA_VERSION, "kfac_lab_version": _version(),
                "kfac_lab_created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            b.ensure_group("", attrs)  # root with its marker in one write, then the rest
            for sub in (studies_mod.GROUP, runs_mod.GROUP, ckpt.GROUP):
                b.ensure_group(sub)
            consolidate.refresh_all(b)
            return b.group_attrs("") or attrs
        with translate_errors(b, "the root metadata"):
            meta = b.get_json("zarr.json")
            if meta is None:
                if b.get_json(".zgroup") is not None or b.get_json(".zarray") is not None:
                    raise StoreError(
                        f"{b.path!r} is a zarr v2 store, not a kfac_lab store; choose a new "
                        "path for the lab store"
                    )
                raise StoreError(
                    f"{b.path!r} is not a kfac_lab store: it is a non-empty directory without "
                    "zarr metadata (no zarr.json); choose a new or empty directory"
                )
            if meta.get("node_type") != "group":
                raise StoreError(
                    f"{b.path!r} is a zarr {meta.get('node_type', 'node')}, not a kfac_lab "
                    "store (a zarr group); choose a new path"
                )
            attrs = meta.get("attributes") or {}
            if not isinstance(attrs, dict) or attrs.get(MARKER_KEY) != MARKER:
                raise StoreError(
                    f"{b.path!r} is a zarr store but not a kfac_lab store (root attribute "
                    f"{MARKER_KEY}={MARKER!r} is missing); open a kfac_lab store or choose a "
                    "new path"
                )
            schema = attrs.get(SCHEMA_KEY)
            if not isinstance(schema, int) or schema < 1:
                raise StoreError(
                    f"kfac_lab store {b.path!r} is damaged: invalid schema version "
                    f"{SCHEMA_KEY}={schema!r}"
                )
            if schema > SCHEMA_VERSION:
                raise StoreError(
                    f"kfac_lab store {b.path!r} has schema {schema}, newer than this kfac_lab "
                    f"understands ({SCHEMA_VERSION}); upgrade kfac_lab to open it"
                )
            if not b.read_only:
                for sub in (studies_mod.GROUP, runs_mod.GROUP, ckpt.GROUP):
                    b.ensure_group(sub)
                if not consolidate.has_consolidated(meta):  # written before kfac_lab kept it
                    consolidate.refresh_quietly(b, None)
        return attrs

    # ------------------------------------------------------------------ basics
    @property
    def path(self) -> str:
        """The path or URL the store was opened from."""
        return self._backend.path

    @property
    def read_only(self) -> bool:
        return self._backend.read_only

    @property
    def schema(self) -> int:
        """Schema version recorded in the store."""
        return int(self._root_attrs[SCHEMA_KEY])

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"store {self.path!r} is closed; open it again with Store(path)")

    def __repr__(self) -> str:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                counts = f"studies={len(self.studies())}, runs={len(self.runs())}"
        except Exception:  # noqa: BLE001 - repr must not raise
            counts = "unreadable"
        state = ", closed" if self._closed else ""
        return f"Store({self.path!r}, mode={self.mode!r}, {counts}{state})"

    # ----------------------------------------------------------------- studies
    def save_study(self, name: str, ds: xr.Dataset, overwrite: bool = False) -> None:
        """Save ``ds`` as study ``name`` (any dims/coords; attrs may be dicts, bools...).

        Raises StoreExistsError if it exists and ``overwrite`` is False. Replacing is
        crash-safe: the new version is complete before the old one goes.
        """
        self._check_open()
        studies_mod.save_study(self._backend, name, ds, overwrite=overwrite)

    def load_study(self, name: str) -> xr.Dataset:
        """Study ``name`` loaded into memory, exactly as saved (text as object dtype)."""
        self._check_open()
        return studies_mod.load_study(self._backend, name)

    def studies(self) -> list[str]:
        """Names of the committed studies, sorted."""
        self._check_open()
        return studies_mod.list_studies(self._backend)

    # -------------------------------------------------------------------- runs
    def new_run(self, attrs: Mapping[str, Any] | None = None, run_id: str | None = None) -> str:
        """Create a run with ``attrs`` (problem, optimizer, hyperparameters, seed...).

        ``run_id`` defaults to a new time-sortable id ``YYYYmmdd-HHMMSS-xxxx`` (UTC).
        Raises StoreExistsError if ``run_id`` is taken. Returns the run id.
        """
        self._check_open()
        with self._lock:
            rid = runs_mod.create_run(self._backend, attrs, run_id)
            consolidate.refresh_quietly(self._backend, [runs_mod.run_path(rid)])
            return rid

    def _writer(self, run_id: str) -> runs_mod.RunWriter:
        w = self._writers.get(run_id)
        if w is None:
            self.claim(run_id)
            info = runs_mod.require_info(self._backend, run_id)
            w = self._writers[run_id] = runs_mod.RunWriter(self._backend, run_id, info)
        return w

    # ------------------------------------------------------------- writer lock
    def claim(self, run_id: str, owner: object | None = None) -> None:
        """Open run ``run_id`` for writing: take its writer lock now (every write does
        this implicitly; call it to be refused *before* starting work).

        Raises StoreError at once — never waits — naming the holder ("run … is being
        written by pid … on HOST since …") when another process (or another Store object)
        writes the run, or when ``owner`` differs from a still-running owner in this
        Store (e.g. a second :class:`~kfac_lab.train.Session` on one run). A holder that
        died is taken over with a StoreWarning. Held until :meth:`release` or
        :meth:`close`. Idempotent. See :mod:`kfac_lab.store.locks` for what holds on
        remote stores.
        """
        self._check_open()
        self._backend.check_writable()
        with self._lock:
            current = self._owners.get(run_id)
            other = current() if current is not None else None
            if owner is not None and other is not None and other is not owner and getattr(other, "running", False):
                raise StoreError(
                    f"run {run_id!r} is being written by {other!r} in this process (pid "
                    f"{os.getpid()}); stop() it first, or branch a new run from its checkpoint"
                )
            if run_id not in self._locks:
                runs_mod.require_info(self._backend, run_id)
                self._locks[run_id] = locks.acquire(self._backend, run_id)
            if owner is not None:
                self._owners[run_id] = weakref.ref(owner)

    def _claim_if_run(self, run_id: str) -> None:
        """Claim ``run_id`` for a checkpoint write; checkpoints of ids with no run in
        ``runs/`` (allowed: e.g. a model saved outside a Session) have nothing to lock."""
        validate_name(run_id, "run_id")
        if run_id in self._locks or runs_mod.read_info(self._backend, run_id) is not None:
            self.claim(run_id)

    def release(self, run_id: str, owner: object | None = None) -> None:
        """Flush run ``run_id`` and give up its writer lock, so another process may write
        it. With ``owner``: only if that owner (or nobody) holds it here. Idempotent."""
        with self._lock:
            current = self._owners.get(run_id)
            other = current() if current is not None else None
            if owner is not None and other is not None and other is not owner:
                return
            w = self._writers.pop(run_id, None)
            try:
                if w is not None and not self._closed:
                    w.flush()
            finally:
                self._owners.pop(run_id, None)
                lock = self._locks.pop(run_id, None)
                if lock is not None:
                    lock.release()
                    consolidate.refresh_quietly(self._backend, [runs_mod.run_path(run_id)])

    def writer(self, run_id: str) -> dict | None:
        """Who writes ``run_id`` now: ``{"host", "pid", "since"}``, or None. Never blocks.
        (A record left by a killed writer shows until the next writer takes over.)"""
        self._check_open()
        return locks.holder(self._backend, run_id)

    def log(self, run_id: str, step: int, **metrics: Any) -> None:
        """Buffer one row of scalar metrics of ``run_id`` at iteration ``step``.

        Metrics are float/int/bool/str (or 0-d tensors); ``None`` or absent means
        missing (NaN, ``""`` for text). Steps must increase within a run. The buffer
        is flushed every ``flush_every`` rows, after ``flush_interval`` seconds, on
        :meth:`flush` and on :meth:`close`. Cheap: no I/O unless flushing.
        """
        self._check_open()
        with self._lock:
            w = self._writer(run_id)
            w.log(step, metrics)
            if len(w.rows) >= self.flush_every or (
                self.flush_interval is not None
                and time.monotonic() - w.last_flush >= self.flush_interval
            ):
                w.flush()
                self._refresh_run(run_id, force=False)

    def _refresh_run(self, run_id: str, force: bool) -> None:
        """Bring plain xarray's view of ``run_id`` up to date (at most every
        ``refresh_interval`` seconds unless ``force``)."""
        now = time.monotonic()
        if force or now - self._refreshed.get(run_id, -math.inf) >= self.refresh_interval:
            consolidate.refresh_quietly(self._backend, [runs_mod.run_path(run_id)])
            self._refreshed[run_id] = now
            self._stale.discard(run_id)
        else:
            self._stale.add(run_id)

    def event(self, run_id: str, step: int, kind: str, **details: Any) -> None:
        """Record an event of ``run_id`` at ``step`` (e.g. ``kind="control"``,
        ``damping=30.0``; ``kind="rejected"``). Buffered and flushed with the rows."""
        self._check_open()
        with self._lock:
            self._writer(run_id).event(step, kind, details)

    def flush(self, run_id: str | None = None) -> None:
        """Write and commit the buffered rows/events of ``run_id`` (default: all runs)."""
        self._check_open()
        with self._lock:
            for w in self._writers_for(run_id):
                flushed = w.pending > 0
                w.flush()
                if flushed or w.run_id in self._stale:
                    self._refresh_run(w.run_id, force=True)

    def pending(self, run_id: str | None = None) -> int:
        """Number of buffered (not yet committed) rows + events of ``run_id`` (or all)."""
        with self._lock:
            return sum(w.pending for w in self._writers_for(run_id))

    def _writers_for(self, run_id: str | None) -> list[runs_mod.RunWriter]:
        if run_id is None:
            return list(self._writers.values())
        return [self._writers[run_id]] if run_id in self._writers else []

    def runs(self, verify: bool = False) -> pd.DataFrame:
        """Table of runs: index ``run_id`` (sorted = by creation time for generated ids),
        columns ``created``, ``steps`` (committed rows), ``last_step``, ``events``, then
        the run attrs (decoded).

        Reads run headers only: a run whose header is damaged is left out with one
        StoreWarning. ``verify=True`` (what run pickers use) also reads each run's rows
        — checksums included — once per committed state of the run (cached in this
        Store), and leaves out a run whose data is damaged, with one StoreWarning naming
        it and the damage."""
        self._check_open()
        table = runs_mod.runs_table(self._backend)
        if not verify or table.empty:
            return table
        keep = []
        for rid, row in table[["steps", "events", "last_step"]].iterrows():
            state = tuple(row.tolist())
            cached = self._verified.get(rid)
            if cached is None or cached[0] != state:
                try:
                    self.load_run(rid)
                    cached = (state, None)
                except StoreError as exc:
                    cached = (state, str(exc))
                self._verified[rid] = cached
            if cached[1] is None:
                keep.append(rid)
            else:
                warnings.warn(f"skipping damaged run {rid!r}: {cached[1]}", StoreWarning, stacklevel=2)
        return table.loc[keep]

    def load_run(self, run_id: str) -> xr.Dataset:
        """Committed rows of ``run_id``: metrics over dim ``step`` (coord ``step``) and
        events (``event_step``, ``event_kind``, ``event_details``) over dim ``event``;
        attrs are the run attrs plus ``run_id``, ``created``."""
        self._check_open()
        return runs_mod.load_run(self._backend, run_id)

    def events(self, run_id: str) -> list[dict[str, Any]]:
        """Committed events of ``run_id`` as dicts ``{"step", "kind", **details}``, in
        the order they were recorded."""
        self._check_open()
        return runs_mod.load_events(self._backend, run_id)

    def curves(
        self, run_ids: str | Iterable[str] | None = None, metrics: str | Iterable[str] | None = None
    ) -> xr.Dataset:
        """Metrics of runs side by side: variables over dims ``(run, step)``, NaN-padded
        (``""`` for text) where a run has no row or no such metric. Default: all runs,
        all metrics. Only committed rows (call :meth:`flush` to include buffered ones)."""
        self._check_open()
        return runs_mod.curves(self._backend, run_ids, metrics)

    def repair(self, run_id: str | None = None) -> None:
        """Trim runs to their committed rows, removing what a killed writer left half
        written (so plain ``xarray.open_datatree(..., consolidated=False)`` sees
        consistent dims). Takes each run's writer lock first: raises StoreError, touching
        nothing, while another process writes any of those runs."""
        self._check_open()
        with self._lock:
            self.flush()
            ids = runs_mod.list_runs(self._backend) if run_id is None else [run_id]
            taken = []
            try:
                for rid in ids:
                    if rid not in self._locks:
                        self.claim(rid)
                        taken.append(rid)
                for rid in ids:
                    runs_mod.repair(self._backend, rid)
                    self._writers.pop(rid, None)
            finally:
                for rid in taken:
                    self.release(rid)
            consolidate.refresh_quietly(self._backend, [runs_mod.run_path(r) for r in ids])

    # ------------------------------------------------------------- checkpoints
    def save_checkpoint(
        self, run_id: str, step: int, model_state: Mapping, optimizer_state: Mapping,
        extra: Mapping | None = None, *, keep_checkpoints: Any = _DEFAULT,
        keep_every: int | None = None,
    ) -> None:
        """Save a checkpoint of ``run_id`` at ``step`` (state dicts of tensors and plain
        data). Written then committed; replaces one at the same step crash-safely. Then
        retention runs (``keep_checkpoints``/``keep_every`` of the Store unless given
        here): older checkpoints beyond it are deleted — never the one just written.
        Takes the run's writer lock (see :meth:`claim`)."""
        self._check_open()
        self._claim_if_run(run_id)
        keep, every = (
            ckpt.check_retention(keep_checkpoints, keep_every)
            if keep_checkpoints is not _DEFAULT else (self.keep_checkpoints, self.keep_every)
        )
        ckpt.save_checkpoint(self._backend, run_id, step, model_state, optimizer_state, extra)
        ckpt.apply_retention(self._backend, run_id, int(step), keep, every)
        consolidate.refresh_quietly(self._backend, [ckpt.run_path(run_id)])

    def delete_checkpoint(self, run_id: str, step: int) -> None:
        """Delete checkpoint ``step`` of ``run_id`` (NotFoundError if there is none).
        Uncommitted first, so a crash mid-delete leaves nothing readers would load; the
        run's rows are never touched. Takes the run's writer lock."""
        self._check_open()
        self._claim_if_run(run_id)
        ckpt.delete_checkpoint(self._backend, run_id, step)
        consolidate.refresh_quietly(self._backend, [ckpt.run_path(run_id)])

    def load_checkpoint(
        self, run_id: str, step: int | None = None, map_location: Any = None
    ) -> dict[str, Any]:
        """Checkpoint ``step`` (default latest) of ``run_id`` as ``{"model", "optimizer",
        "extra", "step", "run_id"}``, loaded with ``torch.load(weights_only=True)``."""
        self._check_open()
        return ckpt.load_checkpoint(self._backend, run_id, step, map_location)

    def load_intact_checkpoint(
        self, run_id: str, step: int | None = None, map_location: Any = None
    ) -> dict[str, Any]:
        """The newest checkpoint of ``run_id`` that loads intact (at or before ``step``
        when given). Damaged newer ones are skipped, each with a StoreWarning naming its
        step and the damage; they are listed in the result's ``"skipped"`` as ``(step,
        reason)``. NotFoundError when none is left, StoreError when all are damaged."""
        self._check_open()
        return ckpt.load_intact(self._backend, run_id, step, map_location)

    def checkpoints(self, run_id: str) -> list[int]:
        """Steps of the committed checkpoints of ``run_id``, ascending."""
        self._check_open()
        return ckpt.list_checkpoints(self._backend, run_id)

    def checkpoint_info(self, run_id: str) -> list[dict[str, Any]]:
        """``[{"step", "nbytes", "created"}]`` of the committed checkpoints of ``run_id``."""
        self._check_open()
        return ckpt.checkpoint_info(self._backend, run_id)

    def consolidate(self) -> None:
        """Rebuild the consolidated metadata from the whole store (every write keeps it
        current already; use this for a store last written by an older kfac_lab)."""
        self._check_open()
        consolidate.refresh_all(self._backend)

    # -------------------------------------------------------------------- tree
    def to_datatree(self, *, checkpoints: bool = False) -> xr.DataTree:
        """Everything committed as one in-memory DataTree (attrs decoded)."""
        self._check_open()
        return export.to_datatree(self, decode=True, checkpoints=checkpoints)

    def export_netcdf(self, path: str | os.PathLike, *, checkpoints: bool = False) -> str:
        """Write the committed tree to a netCDF-4 file (needs ``h5netcdf[h5py]`` or
        ``netCDF4``; ImportError naming them otherwise). Attrs stay encoded there."""
        self._check_open()
        return export.export_netcdf(self, path, checkpoints=checkpoints)

    # -------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Flush every buffered row, then refuse further use. Idempotent."""
        if self._closed:
            return
        with self._lock:
            try:
                if not self._backend.read_only:
                    for w in self._writers.values():
                        w.flush()
            finally:
                self._closed = True
                self._writers.clear()
                for run_id in list(self._locks):
                    self._owners.pop(run_id, None)
                    lock = self._locks.pop(run_id)
                    lock.release()
                    consolidate.refresh_quietly(self._backend, [runs_mod.run_path(run_id)])

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release_locks(held: dict) -> None:
    for run_id in list(held):
        try:
            held.pop(run_id).release()
        except Exception:  # noqa: BLE001 - garbage collection must not raise
            pass


def _flush_open_stores() -> None:  # pragma: no cover - runs at interpreter exit
    for store in list(_OPEN_STORES):
        try:
            store.close()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"could not flush store {store.path!r} at exit: {exc}", stacklevel=1)


# zarr does its I/O on worker threads, whose executors shut down before plain atexit
# handlers run; threading's (private) exit hook runs before that, in LIFO order.
_register = getattr(threading, "_register_atexit", None)
try:
    (_register or atexit.register)(_flush_open_stores)
except RuntimeError:  # pragma: no cover - imported during interpreter shutdown
    pass
