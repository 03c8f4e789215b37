"""The rows of the runs a lab shows, and the ``(run, step)`` Dataset its figures are drawn from.

- :class:`RunBuffer` — one run's rows as they arrive (from a session's update queue, or loaded
  from the store), and its events worth a marker (:data:`MARKER_KINDS`);
- :func:`keep_indices` — which rows of a long run are drawn (about :data:`MAX_POINTS` per curve);
- :func:`runs_dataset` — the runs, decimated, side by side over ``(run, step)``
  (aligned by :func:`kfac_lab.store.align.align_runs`, as ``Store.curves`` is).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..store.align import align_runs

__all__ = ["METRICS", "MARKER_KINDS", "MAX_POINTS", "RunBuffer", "keep_indices", "runs_dataset", "stored_buffer"]

#: Per-step values a lab keeps (what its figures draw), ``step`` first.
METRICS = ("step", "loss", "error", "wall_time", "batch_size", "damping", "gamma", "alpha", "mu", "rho")
#: Event kinds drawn as markers: what changed a run's course — a control (or its refusal), a
#: rejected step, skipped statistics, a failure or interruption, a resume or a branch. Not drawn:
#: the optimizer's ``configure`` (its echo of a ``control`` at the same step), and the ticks of a
#: run's life that its line already shows (``start`` … ``finished``, ``stopped``, ``branch``).
MARKER_KINDS = ("control", "control_rejected", "rejected", "skipped_statistics", "failed", "interrupted",
                "resumed", "branched")
#: Points per curve sent to a front end (longer runs are decimated; evaluation rows kept).
MAX_POINTS = 1500


def _number(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


@dataclass
class RunBuffer:
    """Rows of one run received so far (from a session's queue, or loaded from the store)."""

    run_id: str
    label: str
    optimizer: str
    columns: dict[str, list] = field(default_factory=lambda: {m: [] for m in METRICS})
    events: list[dict] = field(default_factory=list)
    last: dict = field(default_factory=dict)
    version: int = 0

    def add_events(self, events) -> int:
        """Keep the events worth a marker (labelled with this run); returns how many were kept."""
        kept = [{**e, "run": self.label} for e in events or () if e.get("kind") in MARKER_KINDS]
        self.events += kept
        return len(kept)

    def add(self, item: dict) -> bool:
        """Append one update (a step's metrics, possibly with ``events``); True if it was a step
        (a status notice, or a step already received, adds no row)."""
        self.add_events(item.get("events"))
        if "loss" not in item and "status" in item:
            self.version += 1
            return False
        steps = self.columns["step"]
        if steps and item["step"] <= steps[-1]:
            return False
        for m in METRICS:
            self.columns[m].append(_number(item.get(m)))
        self.last = item
        self.version += 1
        return True

    @property
    def n(self) -> int:
        return len(self.columns["step"])

    def arrays(self) -> dict[str, np.ndarray]:
        return {m: np.asarray(v, dtype=np.float64) for m, v in self.columns.items()}

    def copy(self) -> "RunBuffer":
        return RunBuffer(self.run_id, self.label, self.optimizer, {k: list(v) for k, v in self.columns.items()},
                         list(self.events), dict(self.last))


def keep_indices(n: int, masks=(), limit: int | None = None) -> np.ndarray:
    """Rows to draw of a run with ``n`` rows: all of them when at most ``limit`` (default
    :data:`MAX_POINTS`), else a stride of ``limit`` rows through all rows plus a stride of at most
    ``limit`` through the rows of each mask (e.g. the evaluation rows); first and last rows always."""
    limit = MAX_POINTS if limit is None else int(limit)
    if n <= limit:
        return np.arange(n)
    parts = [np.linspace(0, n - 1, limit).astype(np.int64)]
    for mask in masks:
        idx = np.flatnonzero(mask)
        if len(idx) > limit:
            idx = idx[np.linspace(0, len(idx) - 1, limit).astype(np.int64)]
        parts.append(idx)
    return np.unique(np.concatenate(parts))


def runs_dataset(buffers: list[RunBuffer], attrs: dict | None = None, decimate: bool = True):
    """The runs as an ``xarray.Dataset`` over ``(run, step)`` (coord ``run``: their labels; NaN
    where a run has no value), each run decimated by :func:`keep_indices` (evaluation rows kept)
    unless ``decimate=False``."""
    rows = []
    for b in buffers:
        a = b.arrays()
        idx = keep_indices(b.n, [np.isfinite(a["error"])]) if decimate else np.arange(b.n)
        rows.append((a["step"][idx], {m: v[idx] for m, v in a.items() if m != "step"}))
    ds = align_runs([b.label for b in buffers], rows, {m: np.nan for m in METRICS[1:]})
    ds.attrs.update(attrs or {})
    return ds


def stored_buffer(store, run_id: str, label: str) -> RunBuffer:
    """A stored run as a :class:`RunBuffer` (its committed rows and marker events)."""
    ds = store.load_run(run_id)
    n = ds.sizes.get("step", 0)
    cols = {"step": [float(v) for v in ds["step"].values]}
    for m in METRICS[1:]:
        cols[m] = ([float(v) for v in np.asarray(ds[m].values, dtype=np.float64)] if m in ds.data_vars
                   else [math.nan] * n)
    buf = RunBuffer(run_id, label, str(ds.attrs.get("optimizer", "?")), cols)
    buf.add_events(store.events(run_id))
    return buf
