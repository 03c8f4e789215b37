"""``/runs/<run_id>``: training curves over dim ``step`` and events over dim ``event``.

On disk a run is one zarr group holding 1-D arrays:

- ``step`` (dim ``step``, int64): the iteration number of each logged row (index coord);
- one array per metric (dim ``step``): ``float64`` for numbers and bools (missing: NaN;
  bools as 1.0/0.0), variable-length ``str`` for text (missing: ``""``);
- ``event_step`` (int64), ``event_kind`` (str), ``event_details`` (str, JSON object)
  over dim ``event``.

The group attributes carry the user's run attrs (encoded, see :mod:`.attrs`) and the
commit markers, written last in one metadata write after each flush:
``kfac_lab_committed_steps`` and ``kfac_lab_committed_events`` (rows readers may
read), ``kfac_lab_metrics`` (``{name: kind}`` of the committed metric arrays) and
``kfac_lab_last_step``. Arrays may hold more rows (or be new) while a flush is in
flight or after a killed writer; readers only read up to the markers, and the run's
writer (or :func:`repair`) trims that debris.
"""

from __future__ import annotations

import asyncio
import json
import numbers
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from zarr.codecs import Crc32cCodec, ZstdCodec

from .align import align_runs
from .attrs import _plain, decode_attrs, decode_value, encode_attrs, encode_value
from .backend import CLAIM, Backend, expected_chunk_keys, gather, join, sync, translate_errors
from .errors import NotFoundError, StoreError, StoreExistsError, StoreWarning
from .names import new_run_id, validate_name

__all__ = [
    "GROUP", "RunInfo", "RunWriter", "create_run", "read_info", "list_runs", "runs_table",
    "load_run", "load_events", "curves",
]

GROUP = "runs"
STEP = "step"
EVENT = "event"
EVENT_VARS = ("event_step", "event_kind", "event_details")
RESERVED_METRICS = {STEP, *EVENT_VARS}
M_STEPS = "kfac_lab_committed_steps"
M_EVENTS = "kfac_lab_committed_events"
M_METRICS = "kfac_lab_metrics"
M_LAST = "kfac_lab_last_step"
CREATED = "kfac_lab_created"
RUN_ID = "run_id"
TABLE_COLUMNS = ("created", "steps", "last_step", "events")
RESERVED_ATTRS = {RUN_ID, *TABLE_COLUMNS}
CHUNK = 1024  # rows per chunk along step/event
NUMERIC = ("bool", "int", "float")


# --------------------------------------------------------------------------- values
def metric_value(name: str, value: Any) -> tuple[str | None, Any]:
    """``(kind, stored value)`` of one logged metric; kind None means "missing".

    Kinds: ``"float"``, ``"int"``, ``"bool"`` (stored as float64) and ``"str"``.
    0-d tensors / numpy arrays are unwrapped with ``.item()``.
    """
    if value is None:
        return None, None
    if isinstance(value, (bool, np.bool_)):
        return "bool", float(value)
    if isinstance(value, (numbers.Integral, np.integer)):
        return "int", float(value)
    if isinstance(value, (numbers.Real, np.floating)):
        return "float", float(value)
    if isinstance(value, str):
        return "str", value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return metric_value(name, value.item())
    raise TypeError(
        f"metric {name!r} has type {type(value).__name__}; log scalars only (float, int, "
        "bool, str, or a 0-d tensor/array)"
    )


def merge_kind(name: str, old: str | None, new: str) -> str:
    """Kind of a metric that was ``old`` and is now logged as ``new``."""
    if old is None or old == new:
        return new
    if old in NUMERIC and new in NUMERIC:
        return "float"
    raise TypeError(
        f"metric {name!r} was logged as {old} and now as {new}; keep one type per metric "
        "(or log it under another name)"
    )


def _check_step(step: Any, what: str = "step") -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (numbers.Integral, np.integer)):
        raise TypeError(f"{what} must be an int, got {type(step).__name__} {step!r}")
    return int(step)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _dtype_fill(kind: str) -> tuple[Any, Any]:
    if kind in ("str",):
        return str, ""
    if kind in ("step", "int64"):
        return "int64", -1
    return "float64", np.nan


def _np_column(kind: str, values: list[Any]) -> np.ndarray:
    if kind == "str":
        return np.array(values, dtype=object) if values else np.empty(0, dtype=object)
    if kind in ("step", "int64"):
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------- header
@dataclass
class RunInfo:
    """What the committed header of a run says (no array is read)."""

    run_id: str
    attrs: dict[str, Any]  # user attrs, decoded
    raw_attrs: dict[str, Any]  # everything in the group metadata, as on disk
    n_steps: int
    n_events: int
    metrics: dict[str, str]  # name -> kind, in first-logged order
    last_step: int | None
    created: str | None


def _parse_info(backend: Backend, run_id: str, attrs: dict | None) -> RunInfo | None:
    if attrs is None or M_STEPS not in attrs:
        return None  # absent, or still being created
    what = f"run {run_id!r}"
    n, e = attrs.get(M_STEPS), attrs.get(M_EVENTS, 0)
    metrics = decode_value(attrs.get(M_METRICS, encode_value({})))
    last = attrs.get(M_LAST, -1)
    ok = (
        isinstance(n, int) and n >= 0 and isinstance(e, int) and e >= 0
        and isinstance(metrics, dict) and all(v in ("str", *NUMERIC) for v in metrics.values())
        and isinstance(last, int)
    )
    if not ok:
        raise StoreError(
            f"{what} in store {backend.path!r} is damaged: its commit markers are invalid "
            f"({M_STEPS}={n!r}, {M_EVENTS}={e!r}); restore runs/{run_id}/zarr.json"
        )
    user = {
        k: v for k, v in decode_attrs(attrs).items()
        if not k.startswith("kfac_lab_") and k != RUN_ID
    }
    return RunInfo(
        run_id=run_id, attrs=user, raw_attrs=dict(attrs), n_steps=n, n_events=e,
        metrics=dict(metrics), last_step=None if n == 0 else last,
        created=attrs.get(CREATED),
    )


def run_path(run_id: str) -> str:
    return join(GROUP, run_id)


def read_info(backend: Backend, run_id: str) -> RunInfo | None:
    """The committed header of ``run_id`` (None if there is no such committed run)."""
    path = join(GROUP, run_id)
    with translate_errors(backend, f"run {run_id!r}"):
        return _parse_info(backend, run_id, backend.group_attrs(path))


def require_info(backend: Backend, run_id: str) -> RunInfo:
    validate_name(run_id, "run_id")
    info = read_info(backend, run_id)
    if info is None:
        raise NotFoundError(
            f"no run {run_id!r} in store {backend.path!r}; create it with "
            "store.new_run(attrs) (store.runs() lists the existing ones)"
        )
    return info


def _candidate_ids(backend: Backend) -> list[str]:
    ids = []
    for child in backend.list_dir(GROUP):
        try:
            ids.append(validate_name(child))
        except ValueError:
            continue  # zarr.json, staging or temp files
    return ids


def _read_infos(backend: Backend, ids: list[str]) -> list[RunInfo]:
    async def one(run_id: str) -> RunInfo | None | StoreError:
        try:
            attrs = await backend.agroup_attrs(join(GROUP, run_id))
            return _parse_info(backend, run_id, attrs)
        except StoreError as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - reported as damaged below
            return StoreError(f"run {run_id!r} in store {backend.path!r} is unreadable: {exc}")

    out = []
    for run_id, res in zip(ids, gather(one(i) for i in ids)):
        if isinstance(res, StoreError):
            warnings.warn(f"skipping damaged run {run_id!r}: {res}", StoreWarning, stacklevel=4)
        elif res is not None:
            out.append(res)
    return out


def list_runs(backend: Backend) -> list[str]:
    """Sorted ids of the committed runs (damaged ones skipped with a StoreWarning)."""
    return [i.run_id for i in _read_infos(backend, _candidate_ids(backend))]


def runs_table(backend: Backend) -> pd.DataFrame:
    """One row per run (index ``run_id``, sorted): ``created``, ``steps`` (committed
    rows), ``last_step``, ``events``, then the run attrs (decoded; dicts stay dicts)."""
    rows = []
    for info in _read_infos(backend, _candidate_ids(backend)):
        rows.append({
            RUN_ID: info.run_id, "created": info.created, "steps": info.n_steps,
            "last_step": info.last_step, "events": info.n_events, **info.attrs,
        })
    if not rows:
        return pd.DataFrame(columns=list(TABLE_COLUMNS), index=pd.Index([], name=RUN_ID))
    return pd.DataFrame(rows).set_index(RUN_ID).sort_index()


# --------------------------------------------------------------------------- create
def create_run(backend: Backend, attrs: Mapping[str, Any] | None, run_id: str | None) -> str:
    """Create an empty committed run and return its id (generated if None)."""
    backend.check_writable()
    attrs = dict(attrs or {})
    bad = sorted(
        k for k in attrs
        if isinstance(k, str) and (k in RESERVED_ATTRS or k.startswith("kfac_lab_"))
    )
    if bad:
        raise ValueError(
            f"run attrs {bad} are reserved (run_id, created, steps, last_step, events and "
            "kfac_lab_*); rename them"
        )
    encoded = encode_attrs(attrs)
    if run_id is not None:
        validate_name(run_id, "run_id")
    backend.ensure_group(GROUP)
    created = _now()

    async def go(rid: str) -> bool:
        path = join(GROUP, rid)
        if not await backend.aclaim_group(path, {**encoded, RUN_ID: rid, CREATED: created}):
            return False
        coros = [_acreate(backend, path, STEP, STEP, "step", 0)]
        coros += [
            _acreate(backend, path, name, EVENT, kind, 0)
            for name, kind in zip(EVENT_VARS, ("int64", "str", "str"))
        ]
        await asyncio.gather(*coros)
        await backend.aupdate_attrs(path, {  # commit: the run now exists for readers
            M_STEPS: 0, M_EVENTS: 0, M_METRICS: encode_value({}), M_LAST: -1,
        }, drop=[CLAIM])
        return True

    if run_id is not None:
        if not sync(go(run_id)):
            raise StoreExistsError(
                f"run {run_id!r} already exists in store {backend.path!r}; append to it with "
                f"store.log({run_id!r}, step, ...) or choose another run_id"
            )
        return run_id
    for _ in range(1000):
        rid = new_run_id()
        if sync(go(rid)):
            return rid
    raise StoreError(f"could not create a new run id in store {backend.path!r}")  # pragma: no cover


async def _acreate(backend: Backend, group: str, name: str, dim: str, kind: str, n: int) -> Any:
    """Every array is checksummed (crc32c of each stored chunk, checked on read); text
    is zstd-compressed first, so the checksum covers the bytes on disk."""
    dtype, fill = _dtype_fill(kind)
    compressors = [ZstdCodec(), Crc32cCodec()] if kind == "str" else [Crc32cCodec()]
    return await backend.acreate_array(
        join(group, name), shape=(n,), chunks=(CHUNK,), dtype=dtype, fill_value=fill,
        dimension_names=[dim], compressors=compressors,
    )


# --------------------------------------------------------------------------- writer
@dataclass
class RunWriter:
    """The single writer of one run: buffers rows and events, flushes them in chunks.

    Rows live in memory until :meth:`flush`, which writes them after the committed
    rows and then moves the commit markers (one metadata write). A failed flush keeps
    the buffer, so nothing logged is lost; on disk only uncommitted debris remains.
    """

    backend: Backend
    run_id: str
    info: RunInfo
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    events: list[tuple[int, str, str]] = field(default_factory=list)
    last_flush: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.path = join(GROUP, self.run_id)
        self.kinds: dict[str, str] = dict(self.info.metrics)  # committed + buffered
        self.last_step: int | None = self.info.last_step
        self.arrays: dict[str, Any] | None = None  # opened (and tidied) at first flush

    # -- buffering -----------------------------------------------------------
    def log(self, step: Any, metrics: Mapping[str, Any]) -> None:
        step = _check_step(step)
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"run {self.run_id!r}: step {step} is not after the last logged step "
                f"{self.last_step}; steps must increase (start a new run to resume from a "
                "checkpoint)"
            )
        row: dict[str, Any] = {}
        kinds = dict(self.kinds)
        for name, value in metrics.items():
            validate_name(name, "metric name")
            if name in RESERVED_METRICS:
                raise ValueError(f"metric name {name!r} is reserved; use another name")
            kind, stored = metric_value(name, value)
            if kind is None:
                continue
            kinds[name] = merge_kind(name, kinds.get(name), kind)
            row[name] = stored
        self.kinds = kinds
        self.rows.append((step, row))
        self.last_step = step

    def event(self, step: Any, kind: str, details: Mapping[str, Any]) -> None:
        step = _check_step(step)
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"event kind must be a non-empty str, got {kind!r}")
        try:
            text = json.dumps(_plain(dict(details), "event details"), allow_nan=True)
        except TypeError as exc:
            raise TypeError(f"event {kind!r}: {exc}") from None
        self.events.append((step, kind, text))

    @property
    def pending(self) -> int:
        return len(self.rows) + len(self.events)

    # -- flushing ------------------------------------------------------------
    def flush(self) -> None:
        """Write the buffered rows/events and commit them (no-op if nothing buffered)."""
        if not self.rows and not self.events:
            return
        self.backend.check_writable()
        try:
            sync(self._aflush())
        except (StoreError, KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # disk full, permissions, a damaged array...
            raise StoreError(
                f"cannot write run {self.run_id!r} in store {self.backend.path!r} "
                f"({type(exc).__name__}: {exc}); the {self.pending} buffered rows/events are "
                "kept: fix the cause and call flush() again"
            ) from exc
        self.last_flush = time.monotonic()

    async def _aopen(self) -> dict[str, Any]:
        """Open the committed arrays; delete/trim debris of an earlier killed writer."""
        return await tidy(self.backend, self.run_id)

    async def _aflush(self) -> None:
        if self.arrays is None:
            self.arrays = await self._aopen()
        arrays = dict(self.arrays)
        n0, e0 = self.info.n_steps, self.info.n_events
        rows, events = list(self.rows), list(self.events)
        n1, e1 = n0 + len(rows), e0 + len(events)

        async def put(name: str, dim: str, kind: str, values: np.ndarray, start: int, stop: int) -> None:
            arr = arrays.get(name)
            if arr is None:  # a metric first seen now: earlier rows are missing values
                arr = await _acreate(self.backend, self.path, name, dim, kind, stop)
                _, fill = _dtype_fill(kind)
                head = _np_column(kind, [fill] * start)
                values = np.concatenate([head, values]) if start else values
                start = 0
            elif arr.shape[0] != stop:
                await arr.resize((stop,))  # in place
            if stop > start:
                await arr.setitem(slice(start, stop), values)
            arrays[name] = arr

        coros = []
        if rows:
            coros.append(put(STEP, STEP, "step", _np_column("step", [s for s, _ in rows]), n0, n1))
            for name, kind in self.kinds.items():
                _, fill = _dtype_fill(kind)
                col = _np_column(kind, [r.get(name, fill) for _, r in rows])
                coros.append(put(name, STEP, kind, col, n0, n1))
        if events:
            cols = list(zip(*events))
            for name, kind, col in zip(EVENT_VARS, ("int64", "str", "str"), cols):
                coros.append(put(name, EVENT, kind, _np_column(kind, list(col)), e0, e1))
        await asyncio.gather(*coros)
        markers = {
            M_STEPS: n1, M_EVENTS: e1, M_METRICS: encode_value(dict(self.kinds)),
            M_LAST: -1 if self.last_step is None else self.last_step,
        }
        await self.backend.aupdate_attrs(self.path, markers)
        # committed: only now drop the flushed part of the buffers
        self.arrays = arrays
        self.info.n_steps, self.info.n_events = n1, e1
        self.info.metrics = dict(self.kinds)
        self.info.last_step = self.last_step
        del self.rows[: len(rows)]
        del self.events[: len(events)]


async def tidy(backend: Backend, run_id: str) -> dict[str, Any]:
    """Make run ``run_id`` hold exactly its committed rows: delete arrays that no
    commit names and trim longer arrays. Returns the opened arrays by name.

    Only safe when no other process is writing that run (runs have one writer).
    """
    path = join(GROUP, run_id)
    attrs = await backend.agroup_attrs(path)
    info = _parse_info(backend, run_id, attrs)
    if info is None:
        raise NotFoundError(f"no run {run_id!r} in store {backend.path!r}")
    wanted = {STEP: info.n_steps, **{m: info.n_steps for m in info.metrics}}
    wanted.update({v: info.n_events for v in EVENT_VARS})
    present = [
        c for c in await backend.alist_dir(path) if c != "zarr.json" and not c.endswith(".partial")
    ]
    for child in present:
        if child not in wanted:
            await backend.zstore.delete_dir(join(path, child))
    for key in await backend.alist_prefix(path + "/"):
        if key.endswith(".partial"):  # temp file of a write that was killed
            await backend.zstore.delete(key)

    async def one(name: str, n: int) -> tuple[str, Any]:
        if name not in present:
            if n:
                raise StoreError(
                    f"run {run_id!r} in store {backend.path!r} is damaged: committed array "
                    f"{name!r} is missing"
                )
            return name, None
        arr = await backend.aopen_array(join(path, name))
        if arr.shape[0] < n:
            raise StoreError(
                f"run {run_id!r} in store {backend.path!r} is damaged: array {name!r} has "
                f"{arr.shape[0]} rows but {n} are committed"
            )
        if arr.shape[0] > n:
            await arr.resize((n,))  # in place; drops chunks past n
        return name, arr

    opened = await asyncio.gather(*(one(k, n) for k, n in wanted.items()))
    return {k: a for k, a in opened if a is not None}


def repair(backend: Backend, run_id: str) -> None:
    """Trim run ``run_id`` to its committed rows (see :func:`tidy`)."""
    backend.check_writable()
    with translate_errors(backend, f"run {run_id!r}"):
        sync(tidy(backend, run_id))


# --------------------------------------------------------------------------- read
def load_run(
    backend: Backend, run_id: str, metrics: Iterable[str] | None = None, events: bool = True
) -> xr.Dataset:
    """The committed part of run ``run_id`` as a Dataset.

    Dims ``step`` (coord ``step``, int64) for the metrics — each ``(step,)`` float64 or
    object(str), with attr ``kind`` — and ``event`` for ``event_step``, ``event_kind``,
    ``event_details`` (JSON text) when ``events``. Attrs: the run attrs (decoded),
    ``run_id`` and ``created``.
    """
    info = require_info(backend, run_id)
    what = f"run {run_id!r}"
    names = list(info.metrics) if metrics is None else [m for m in metrics if m in info.metrics]
    want: dict[str, tuple[int, str, str]] = {STEP: (info.n_steps, STEP, "step")}
    want.update({m: (info.n_steps, STEP, info.metrics[m]) for m in names})
    if events:
        want.update({v: (info.n_events, EVENT, k) for v, k in zip(EVENT_VARS, ("int64", "str", "str"))})
    path = join(GROUP, run_id)

    async def one(name: str, n: int, kind: str, keys: set[str]) -> np.ndarray:
        arr = await backend.aopen_array(join(path, name))
        if arr.shape[0] < n:
            raise StoreError(
                f"{what} in store {backend.path!r} is damaged: array {name!r} has "
                f"{arr.shape[0]} rows but {n} are committed"
            )
        missing = [k for k in expected_chunk_keys(arr, n) if k not in keys]
        if missing:
            raise StoreError(
                f"{what} in store {backend.path!r} is damaged: chunk {missing[0]!r} of "
                f"{name!r} is missing"
            )
        if n == 0:
            return _np_column(kind, [])
        try:
            values = np.asarray(await arr.getitem(slice(0, n)))
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:  # a checksum mismatch, undecodable bytes...
            raise StoreError(
                f"{what} in store {backend.path!r} is damaged: array {name!r} does not read "
                f"back as written ({type(exc).__name__}: {exc}); the other runs are fine — "
                "restore this run from a backup or delete it"
            ) from exc
        return values.astype(object) if kind == "str" else values

    with translate_errors(backend, what):
        keys = backend.list_prefix(path + "/")
        cols = gather(one(k, n, kind, keys) for k, (n, _, kind) in want.items())
    data = dict(zip(want, cols))
    ds = xr.Dataset(coords={STEP: (STEP, data.pop(STEP))})
    for name in names:
        ds[name] = xr.Variable((STEP,), data.pop(name), {"kind": info.metrics[name]})
    for name, values in data.items():
        ds[name] = xr.Variable((EVENT,), values)
    ds.attrs = {**info.attrs, RUN_ID: run_id, "created": info.created}
    return ds


def load_events(backend: Backend, run_id: str) -> list[dict[str, Any]]:
    """Committed events of ``run_id`` in logged order: ``{"step", "kind", **details}``."""
    ds = load_run(backend, run_id, metrics=[], events=True)
    out = []
    for step, kind, details in zip(ds.event_step.values, ds.event_kind.values, ds.event_details.values):
        try:
            extra = json.loads(details) if details else {}
        except ValueError:
            extra = {"details": details}
        out.append({"step": int(step), "kind": str(kind), **extra})
    return out


def curves(
    backend: Backend, run_ids: str | Iterable[str] | None = None, metrics: str | Iterable[str] | None = None
) -> xr.Dataset:
    """Metrics of several runs side by side: each variable over dims ``(run, step)``.

    ``step`` is the union of the runs' steps; a run without a value at a step (or
    without that metric) has NaN there (``""`` for text metrics). Coord ``run`` holds
    the run ids. With ``run_ids=None`` a damaged run is left out with one StoreWarning
    naming it and the damage; a run asked for by name raises StoreError instead. ``metrics`` fixes the variables (in that order; one no run has logged
    yet is all-NaN, so a dashboard gets the same shape from the first poll). Only
    committed rows are included (call ``flush()`` first).
    """
    if run_ids is None:
        ids = list_runs(backend)
    else:
        ids = [run_ids] if isinstance(run_ids, str) else list(run_ids)
    want = None if metrics is None else ([metrics] if isinstance(metrics, str) else list(metrics))
    runs = []
    for r in list(ids):
        try:
            runs.append(load_run(backend, r, metrics=want, events=False))
        except StoreError as exc:
            if run_ids is not None:  # asked for by name: say so
                raise
            warnings.warn(f"skipping damaged run {r!r}: {exc}", StoreWarning, stacklevel=3)
            ids.remove(r)
    kinds: dict[str, str] = {}
    for ds in runs:
        for name in ds.data_vars:
            old, new = kinds.get(name), ds[name].attrs["kind"]
            if old is None or old == new:
                kinds[name] = new
            else:  # int/bool/float mix -> float; text mixed with numbers -> text
                kinds[name] = "float" if old in NUMERIC and new in NUMERIC else "str"
    if want is not None:  # asked-for metrics no run has (yet) come out all-NaN
        order = list(dict.fromkeys(want))
        for m in order:
            kinds.setdefault(m, "float")
    else:
        order = list(kinds)
    out = align_runs(ids, [(ds[STEP].values, {n: ds[n].values for n in ds.data_vars}) for ds in runs],
                     {name: "" if kinds[name] == "str" else np.nan for name in order})
    for name in order:
        out[name].attrs["kind"] = kinds[name]
    return out
