"""The Training lab: train a preset problem with K-FAC, SGD-Nesterov or Adam and steer it live.

A thin shell over :class:`kfac_lab.train.Session` (training in a background thread, live
controls applied at step boundaries, every step logged to the store), :mod:`kfac_lab.viz`
(the figures) and :mod:`kfac_lab.store` (earlier runs to compare). This module adds:

- :class:`TrainingSettings` — everything the page sets, in one ``param.Parameterized``;
- :class:`TrainingLab` — the logic without a browser: start / pause / resume / stop / reset /
  new run from here / continue a stored run, live controls (validated; a refused value gives
  a message and training goes on), and :meth:`TrainingLab.poll`, which drains the sessions'
  update queues into per-run buffers (the only hand-over from the training threads);
- :class:`TrainingLabPage` / :func:`create_app` — the Panel page. A periodic callback on the
  session's own event loop calls ``poll`` and refreshes the figures: cheaply (new arrays into
  the last figure) most of the time, through :mod:`kfac_lab.viz` when the structure changes
  (a run or an event appears, a view option flips). Closing the tab stops its training threads.

Serve with ``panel serve dashboards/training_lab.py`` (see :mod:`kfac_lab.dashboards`).
"""

from __future__ import annotations

import atexit
import logging
import math
import queue
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import param

from .. import store as _store  # noqa: F401 - imported first, so its atexit flush runs after ours
from .common import NumberField, escape_html, attach, client_allowed, open_store, parse_float, parse_int, refusal

__all__ = ["TrainingSettings", "TrainingLab", "TrainingLabPage", "create_app", "PROBLEMS", "OPTIMIZERS",
           "LIVE_CONTROLS", "DAMPING_GRID"]

log = logging.getLogger(__name__)

PROBLEMS = {
    "MNIST autoencoder (paper)": "mnist",
    "CURVES autoencoder (paper)": "curves",
    "Figure-1 classifier (16×16)": "figure1",
    "MNIST small (lecture speed)": "mnist-small",
    "Tiny (8×8 digits, fastest)": "tiny",
}
OPTIMIZERS = {"K-FAC": "kfac", "SGD-Nesterov": "sgd", "Adam": "adam"}
OPT_LABEL = {v: k for k, v in OPTIMIZERS.items()}
APPROX = {"block-diagonal": "blockdiag", "block-tridiagonal": "tridiag"}
#: Settings that reach a running K-FAC optimizer (``Session.set``) at the next step boundary.
LIVE_CONTROLS = ("damping", "adapt_damping", "approx", "momentum", "lr")
#: The λ slider's values: 1, 1.5, 2, 3, 5, 7 per decade, 1e-4 … 7e4 (a log scale).
DAMPING_GRID = [float(f"{m}e{e}") for e in range(-4, 5) for m in (1, 1.5, 2, 3, 5, 7)]
#: Default step budget of a Start, per problem (0 = until stopped).
DEFAULT_STEPS = {"mnist": 300, "curves": 300, "figure1": 500, "mnist-small": 500, "tiny": 3000}
METRICS = ("step", "loss", "error", "wall_time", "batch_size", "damping", "gamma", "alpha", "mu", "rho")
TRACE_VARS = ("damping", "gamma", "alpha", "mu", "rho", "batch_size")
MAX_POINTS = 1500          # points per curve sent to the browser (decimated above)
HIDDEN_EVENTS = {"configure"}  # the optimizer's echo of a "control" event at the same step

_LIVE_LABS: "weakref.WeakSet[TrainingLab]" = weakref.WeakSet()


def _stop_all() -> None:
    """Stop every lab's sessions at a step boundary (checkpoint, flush): the server is going."""
    for lab in list(_LIVE_LABS):
        try:
            lab.close(wait=True, timeout=10.0)
        except Exception:  # noqa: BLE001
            pass


# Before the store's own exit flush (registered the same way, earlier, and run in reverse
# order) and while zarr's I/O threads still run.
(getattr(threading, "_register_atexit", None) or atexit.register)(_stop_all)


# --------------------------------------------------------------------------- settings
class TrainingSettings(param.Parameterized):
    """What the Training lab's page sets. A Start reads a snapshot; the live controls also go
    to the running K-FAC sessions (applied by the training thread at its next step boundary)."""

    problem = param.Selector(default="mnist-small", objects=list(PROBLEMS.values()))
    optimizer = param.Selector(default="kfac", objects=list(OPTIMIZERS.values()))
    race = param.Boolean(default=False, doc="train a second optimizer side by side (same problem and seed)")
    optimizer_b = param.Selector(default="sgd", objects=list(OPTIMIZERS.values()))
    seed = param.Integer(default=0, bounds=(0, None))
    steps = param.Integer(default=500, bounds=(0, None), doc="steps per Start (0: until stopped)")
    eval_every = param.Integer(default=10, bounds=(1, None), doc="evaluate the training error every … steps")
    # live controls (K-FAC)
    damping = param.Number(default=150.0, bounds=(0, None), inclusive_bounds=(False, True), doc="λ")
    adapt_damping = param.Boolean(default=True, doc="Levenberg–Marquardt adaptation of λ")
    approx = param.Selector(default="blockdiag", objects=list(APPROX.values()))
    momentum = param.Boolean(default=True, doc="α and μ from the quadratic model (off: α only)")
    lr_mode = param.Selector(default="adaptive", objects=["adaptive", "fixed"])
    lr = param.Number(default=0.1, bounds=(0, None), inclusive_bounds=(False, True), doc="fixed α when lr_mode='fixed'")
    # view
    metric = param.Selector(default="error", objects=["error", "loss"])
    log_y = param.Boolean(default=True)
    compare = param.List(default=[], item_type=str, doc="stored run ids drawn with the live runs")

    def kfac_options(self) -> dict:
        """The K-FAC options a new session starts with."""
        return {"damping": float(self.damping), "adapt_damping": bool(self.adapt_damping), "approx": self.approx,
                "momentum": bool(self.momentum), "lr": float(self.lr) if self.lr_mode == "fixed" else None}


# --------------------------------------------------------------------------- buffers
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

    def add(self, item: dict) -> bool:
        """Append one update (a step's metrics, possibly with ``events``); True if it was a step."""
        for e in item.get("events", ()) or ():
            if e.get("kind") not in HIDDEN_EVENTS:
                self.events.append({**e, "run": self.label})
        if "loss" not in item and "status" in item:
            self.version += 1
            return False
        steps = self.columns["step"]
        if steps and item["step"] <= steps[-1]:
            return False
        for m in METRICS:
            v = item.get(m)
            self.columns[m].append(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan)
        self.last = item
        self.version += 1
        return True

    @property
    def n(self) -> int:
        return len(self.columns["step"])

    def arrays(self) -> dict[str, np.ndarray]:
        return {m: np.asarray(v, dtype=np.float64) for m, v in self.columns.items()}


def _keep(n: int, mask_sets: list[np.ndarray], limit: int = MAX_POINTS) -> np.ndarray:
    """Indices to draw of a run with ``n`` rows: every row when few, else a stride through all
    rows plus a stride through each ``mask`` (e.g. the evaluation rows), the last row always."""
    if n <= limit:
        return np.arange(n)
    parts = [np.linspace(0, n - 1, limit).astype(np.int64)]
    for mask in mask_sets:
        idx = np.flatnonzero(mask)
        if len(idx) > limit:
            idx = idx[np.linspace(0, len(idx) - 1, limit).astype(np.int64)]
        parts.append(idx)
    return np.unique(np.concatenate(parts))


def buffers_dataset(buffers: list[RunBuffer]):
    """The runs as an ``xarray.Dataset`` over ``(run, step)`` (labels as run names), each run
    decimated to about :data:`MAX_POINTS` points (evaluation rows kept)."""
    import xarray as xr

    per_run = []
    for b in buffers:
        a = b.arrays()
        idx = _keep(b.n, [np.isfinite(a["error"])])
        per_run.append({m: v[idx] for m, v in a.items()})
    steps = np.unique(np.concatenate([r["step"] for r in per_run] or [np.zeros(0)])).astype(np.int64)
    data = {}
    for m in METRICS[1:]:
        block = np.full((len(per_run), len(steps)), np.nan)
        for i, r in enumerate(per_run):
            block[i, np.searchsorted(steps, r["step"].astype(np.int64))] = r[m]
        data[m] = (("run", "step"), block)
    return xr.Dataset(data, coords={"run": [b.label for b in buffers], "step": steps})


# --------------------------------------------------------------------------- the app object
class TrainingLab:
    """The Training lab's logic without a browser.

    >>> lab = TrainingLab(store="runs/lab.zarr", problem="tiny")    # doctest: +SKIP
    >>> lab.start(); lab.set_control("approx", "tridiag"); lab.poll()
    >>> lab.buffers[lab.sessions[0].run_id].events                   # the control event, at its step

    ``store``: a Store or a path (default: the lab store, :func:`~kfac_lab.dashboards.common.open_store`).
    Methods never raise for user mistakes: they return ``False`` and put a message in
    :attr:`messages` under the control's name (``"damping"``, ``"start"`` …).
    """

    def __init__(self, store=None, settings: TrainingSettings | None = None, **overrides):
        self._store = store
        self.settings = settings or TrainingSettings()
        if "problem" in overrides and "steps" not in overrides:
            overrides["steps"] = DEFAULT_STEPS.get(overrides["problem"], 500)
        if overrides:
            self.settings.param.update(**overrides)
        if "damping" not in overrides:
            self._problem_defaults()
        self.sessions: list = []                 # the live sessions (1, or 2 when racing)
        self.buffers: dict[str, RunBuffer] = {}  # run_id -> rows received (live runs, current and earlier)
        self.order: list[str] = []               # run ids in the order they appeared
        self.messages: dict[str, str] = {}
        self.notice = ""
        self.version = 0                         # bumps when anything drawable changed
        self.structure = 0                       # bumps when runs or events changed (full redraw)
        self._compare_cache: dict[str, tuple[int, RunBuffer]] = {}
        self._rates: dict[str, tuple[float, int, float]] = {}
        self._pending: dict[str, dict] = {}      # run_id -> controls set but not yet seen applied
        self.metric_versions: dict[str, int] = {}  # bumps when a finite value of that metric arrives
        self.closed = False
        _LIVE_LABS.add(self)

    # -- store -------------------------------------------------------------------
    @property
    def store(self):
        from ..store import Store

        if not isinstance(self._store, Store):
            self._store = open_store(self._store)
        return self._store

    def stored_runs(self) -> dict[str, str]:
        """``{label: run_id}`` of the store's runs, newest first (for the compare list)."""
        try:
            table = self.store.runs(verify=True)  # damaged runs left out, one warning each
        except Exception as exc:  # noqa: BLE001 - a damaged store is reported by name, not raised
            self.messages["compare"] = str(exc)
            return {}
        out = {}
        for rid, row in table.iloc[::-1].iterrows():
            opt = OPT_LABEL.get(str(row.get("optimizer", "")), str(row.get("optimizer", "?")))
            out[f"{rid} · {row.get('problem', '?')} · {opt} · {int(row.get('steps', 0))} steps"] = str(rid)
        return out

    # -- helpers -----------------------------------------------------------------
    def _problem_defaults(self) -> None:
        """λ (and the other K-FAC defaults) of the chosen problem."""
        from ..optim import KFACConfig
        from ..train.problems import get_problem

        try:
            opts = get_problem(self.settings.problem).default_options("kfac")
        except Exception:  # noqa: BLE001 - e.g. data missing: the Start reports it
            opts = {}
        base = KFACConfig()
        self.settings.param.update(damping=float(opts.get("damping", base.damping)))

    def choose_problem(self, name: str) -> None:
        """Pick a preset: its default λ and step budget come with it (nothing running changes)."""
        self.settings.problem = name
        self.settings.steps = DEFAULT_STEPS.get(name, 500)
        self._problem_defaults()

    @staticmethod
    def label(optimizer: str, run_id: str) -> str:
        """A short run name for legends: ``K-FAC · 063512-ab12``."""
        return f"{OPT_LABEL.get(optimizer, optimizer)} · {run_id[9:] if len(run_id) > 9 else run_id}"

    def _session(self, optimizer: str, threads: int | None):
        from ..train import Session

        s = self.settings
        opts = s.kfac_options() if optimizer == "kfac" else {}
        return Session(problem=s.problem, optimizer=optimizer, store=self.store, seed=int(s.seed),
                       optimizer_options=opts, eval_every=int(s.eval_every), checkpoint_every=100,
                       threads=threads, attrs={"source": "training_lab"})

    def _track(self, session) -> None:
        rid = session.run_id
        if rid not in self.buffers:
            self.buffers[rid] = RunBuffer(rid, self.label(session.optimizer_name, rid), session.optimizer_name)
            self.order.append(rid)
        self._rates[rid] = (time.monotonic(), session.step, session.wall_time)
        self.structure += 1
        self.version += 1

    def _budget(self) -> int | None:
        return int(self.settings.steps) or None

    @property
    def running(self) -> bool:
        return any(s.running and s.status != "paused" for s in self.sessions)

    @property
    def status(self) -> str:
        if not self.sessions:
            return "idle"
        st = {s.status for s in self.sessions}
        for k in ("failed", "running", "paused", "stopped", "finished", "idle"):
            if k in st:
                return k
        return "idle"

    # -- commands ------------------------------------------------------------------
    def start(self) -> bool:
        """Start training (a second optimizer too when racing). With paused sessions: resume them;
        with finished ones: train ``steps`` more."""
        self.messages.pop("start", None)
        if self.closed:
            return False
        if any(s.running and s.status == "paused" for s in self.sessions):
            return self.resume()
        if any(s.running for s in self.sessions):
            self.messages["start"] = "already running — pause, stop or reset first"
            return False
        s = self.settings
        opts = [s.optimizer] + ([s.optimizer_b] if s.race else [])
        try:
            same = [(x.problem.name, x.optimizer_name, x.seed) for x in self.sessions] == [
                (s.problem, o, int(s.seed)) for o in opts]
            if same and all(x.status in ("finished", "stopped") for x in self.sessions):
                for sess in self.sessions:  # the same setup again: more steps on the same runs
                    sess.start(steps=self._budget())
                self.notice = f"continuing for {self.settings.steps or 'unlimited'} more steps"
                self.version += 1
                return True
            # (no Session(threads=1) for a race: torch.set_num_threads is process-wide)
            self.sessions = [self._session(o, None) for o in opts]
        except Exception as exc:  # noqa: BLE001 - shown next to the Start button
            self.messages["start"] = f"cannot start: {type(exc).__name__}: {exc}"
            self.sessions = []
            return False
        for sess in self.sessions:
            self._track(sess)
            sess.start(steps=self._budget())
        self.notice = "training"
        return True

    def pause(self) -> bool:
        for sess in self.sessions:
            sess.pause()
        self.version += 1
        return bool(self.sessions)

    def resume(self) -> bool:
        for sess in self.sessions:
            if sess.running:
                sess.unpause()
        self.version += 1
        return bool(self.sessions)

    def stop(self, wait: bool = False) -> bool:
        """Stop at the next step boundary (the run is checkpointed and flushed)."""
        for sess in self.sessions:
            sess.stop(wait=wait)
        self.version += 1
        return bool(self.sessions)

    def reset(self) -> bool:
        """Stop the live runs and clear the plots (the runs stay in the store, to compare)."""
        sessions, self.sessions = self.sessions, []
        _stop_in_background(sessions)
        self.buffers.clear()
        self.order.clear()
        self.notice = "reset — earlier runs are in the store (Compare)"
        self.structure += 1
        self.version += 1
        return True

    def new_run_from_here(self) -> bool:
        """Branch every live run: a new run continues from the current parameters and optimizer
        state (attrs ``parent_run``, ``parent_step``); the old run stops there."""
        self.messages.pop("branch", None)
        if not self.sessions:
            self.messages["branch"] = "nothing to branch: start training first"
            return False
        children = []
        try:
            for sess in self.sessions:
                was_running = sess.running and sess.status != "paused"
                sess.pause()  # the parent ends at most one step after the branch point
                child = sess.new_run_from_here()
                children.append((child, was_running))
        except Exception as exc:  # noqa: BLE001
            self.messages["branch"] = f"cannot branch: {type(exc).__name__}: {exc}"
            for sess in self.sessions:
                sess.unpause()
            return False
        self.poll()  # the parents' last rows (and which of their controls took effect)
        for sess, (child, _) in zip(self.sessions, children):
            pending = self._pending.pop(sess.run_id, {})
            if pending:  # set on the parent but not applied before the branch: the child gets them
                try:
                    child.set(**pending)
                except (ValueError, RuntimeError) as exc:
                    self.messages["branch"] = f"controls not carried over: {exc}"
        _stop_in_background(self.sessions)
        self.sessions = [c for c, _ in children]
        for child, was_running in children:
            self._track(child)
            self.buffers[child.run_id].events.append(
                {"step": child.step, "kind": "branched", "run": self.buffers[child.run_id].label})
            if was_running:
                child.start(steps=self._budget())
        self.notice = "branched: new runs continue from here"
        return True

    def continue_run(self, run_id: str) -> bool:
        """Resume a stored run from its latest checkpoint (``Session.restore``) and train on."""
        from ..train import Session

        self.messages.pop("continue", None)
        if any(s.running for s in self.sessions):
            self.messages["continue"] = "stop or reset the live runs first"
            return False
        try:
            sess = Session.restore(self.store, run_id)
        except Exception as exc:  # noqa: BLE001
            self.messages["continue"] = f"cannot continue {run_id}: {type(exc).__name__}: {exc}"
            return False
        self.sessions = [sess]
        buf = self._load_stored(run_id)
        if buf is not None:
            self.buffers[run_id] = RunBuffer(run_id, buf.label, buf.optimizer,
                                             {k: list(v) for k, v in buf.columns.items()}, list(buf.events))
            if run_id not in self.order:
                self.order.append(run_id)
        self._track(sess)
        sess.start(steps=self._budget())
        self.notice = f"continuing {run_id}"
        return True

    # -- live controls -------------------------------------------------------------
    def set_control(self, name: str, value: Any) -> bool:
        """Set a live control (see :data:`LIVE_CONTROLS`, plus ``lr_mode``) in the settings and in
        every running K-FAC session (applied at its next step boundary, recorded as a "control"
        event). A refused value leaves everything as it was and puts the reason in
        ``messages[name]``; training goes on."""
        s = self.settings
        self.messages.pop(name, None)
        try:
            if name == "damping":
                value = parse_float(value, "damping λ", positive=True)
                changes = {"damping": value}
            elif name in ("adapt_damping", "momentum"):
                value = bool(value)
                changes = {name: value}
            elif name == "approx":
                value = APPROX.get(value, value)
                if value not in APPROX.values():
                    raise ValueError(f"approximation {value!r}: choose one of {list(APPROX)}")
                changes = {"approx": value}
            elif name == "lr":
                value = parse_float(value, "learning rate α", positive=True)
                changes = {"lr": value} if s.lr_mode == "fixed" else {}
            elif name == "lr_mode":
                if value not in ("adaptive", "fixed"):
                    raise ValueError(f"lr mode {value!r}: choose 'adaptive' or 'fixed'")
                changes = {"lr": float(s.lr) if value == "fixed" else None}
            else:
                raise ValueError(f"{name!r} is not a live control; live: {list(LIVE_CONTROLS) + ['lr_mode']}")
            for sess in self._kfac_sessions():
                sess.set(**changes)
                self._pending.setdefault(sess.run_id, {}).update(changes)
        except (ValueError, RuntimeError) as exc:
            self.messages[name] = str(exc)
            return False
        setattr(s, name, value)
        if not self._kfac_sessions():
            self.notice = f"{name} = {value} applies when K-FAC training starts"
        self.version += 1
        return True

    def _kfac_sessions(self) -> list:
        return [s for s in self.sessions if s.optimizer_name == "kfac" and s.status != "failed"]

    def live_damping(self) -> float | None:
        """The λ the (first) K-FAC run has reached — what the λ slider follows while adaptive λ
        is on — or None: no K-FAC run, adaptive λ off, or a λ the user set that the optimizer has
        not taken yet (the user's move stands until then; adaptation goes on from it)."""
        if not self.settings.adapt_damping:
            return None
        for sess in self._kfac_sessions():
            if "damping" in self._pending.get(sess.run_id, {}):
                return None
            buf = self.buffers.get(sess.run_id)
            v = buf.last.get("damping") if buf is not None else None
            return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None
        return None

    # -- the hand-over from the training threads ---------------------------------------------
    def poll(self, limit: int = 5000) -> bool:
        """Drain the live sessions' update queues into the buffers (call on the UI's loop).
        Returns whether anything new arrived."""
        new = False
        for sess in self.sessions:
            buf = self.buffers.get(sess.run_id)
            if buf is None:
                continue
            q = sess.updates
            for _ in range(limit):
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    break
                n_events = len(buf.events)
                pending = self._pending.get(sess.run_id)
                if pending:
                    for e in item.get("events", ()) or ():
                        if e.get("kind") == "control":
                            for k in e:
                                pending.pop(k, None)
                buf.add(item)
                if len(buf.events) != n_events:
                    self.structure += 1
                for m in ("error", "loss"):
                    v = item.get(m)
                    if isinstance(v, float) and math.isfinite(v):
                        self.metric_versions[m] = self.metric_versions.get(m, 0) + 1
                new = True
        if new:
            self.version += 1
        return new

    def rate(self, session) -> float:
        """Steps per second of ``session`` since it started (or was last tracked)."""
        t0, k0, _ = self._rates.get(session.run_id, (time.monotonic(), session.step, 0.0))
        dt = time.monotonic() - t0
        return (session.step - k0) / dt if dt > 0 else 0.0

    def saved_step(self, session) -> int:
        """The last step of ``session`` committed to the store (rows still buffered excluded)."""
        try:
            return max(0, session.step - self.store.pending(session.run_id))
        except Exception:  # noqa: BLE001
            return 0

    # -- what to draw --------------------------------------------------------------------------
    def _load_stored(self, run_id: str) -> RunBuffer | None:
        try:
            ds = self.store.load_run(run_id)
        except Exception as exc:  # noqa: BLE001
            self.messages["compare"] = f"cannot load {run_id}: {exc}"
            return None
        opt = str(ds.attrs.get("optimizer", "?"))
        label = self.label(opt, run_id) + " (stored)"
        cols = {m: [] for m in METRICS}
        n = ds.sizes.get("step", 0)
        cols["step"] = [float(v) for v in ds["step"].values]
        for m in METRICS[1:]:
            cols[m] = ([float(v) for v in np.asarray(ds[m].values, dtype=np.float64)] if m in ds.data_vars
                       else [math.nan] * n)
        events = []
        try:
            for e in self.store.events(run_id):
                if e.get("kind") not in HIDDEN_EVENTS:
                    events.append({**e, "run": label})
        except Exception:  # noqa: BLE001
            pass
        return RunBuffer(run_id, label, opt, cols, events)

    def compare_buffers(self) -> list[RunBuffer]:
        """Stored runs chosen for comparison (cached; reloaded when they grew)."""
        out = []
        live = {s.run_id for s in self.sessions} | set(self.buffers)
        try:
            table = self.store.runs() if self.settings.compare else None
        except Exception:  # noqa: BLE001
            table = None
        for rid in self.settings.compare:
            if rid in live:
                continue
            steps = int(table.loc[rid, "steps"]) if table is not None and rid in table.index else -1
            cached = self._compare_cache.get(rid)
            if cached is None or cached[0] != steps:
                buf = self._load_stored(rid)
                if buf is None:
                    continue
                self._compare_cache[rid] = (steps, buf)
                cached = self._compare_cache[rid]
            out.append(cached[1])
        return out

    def set_compare(self, run_ids: list[str]) -> None:
        self.settings.compare = [str(r) for r in run_ids]
        self.structure += 1
        self.version += 1

    def dataset(self):
        """Everything to draw: live runs then compared runs, as a Dataset over ``(run, step)``,
        and their events."""
        bufs = [self.buffers[r] for r in self.order if r in self.buffers] + self.compare_buffers()
        bufs = [b for b in bufs if b.n]
        if not bufs:
            return None, []
        events = [e for b in bufs for e in b.events]
        return buffers_dataset(bufs), events

    def events_in_store(self, run_id: str | None = None) -> list[dict]:
        """The committed events of a live run (default: the first), flushing it first."""
        rid = run_id or (self.sessions[0].run_id if self.sessions else None)
        if rid is None:
            return []
        self.store.flush(rid)
        return self.store.events(rid)

    # -- shutdown ------------------------------------------------------------------------------
    def close(self, wait: bool = False, timeout: float | None = None) -> None:
        """Stop this lab's sessions (the browser tab closed). ``wait``: join them here."""
        self.closed = True
        sessions, self.sessions = self.sessions, []
        if wait:
            for s in sessions:
                s.stop(wait=True, timeout=timeout)
        else:
            _stop_in_background(sessions)
        _LIVE_LABS.discard(self)


def _stop_in_background(sessions: list) -> None:
    """Stop sessions without blocking the caller (a step in flight may take a second)."""
    live = [s for s in sessions if s.running or s.status in ("running", "paused")]
    if not live:
        return

    def stop_all():
        for s in live:
            try:
                s.stop(wait=True, timeout=60)
            except Exception:  # noqa: BLE001
                log.exception("stopping session %s failed", getattr(s, "run_id", "?"))

    threading.Thread(target=stop_all, name="training-lab-stop", daemon=True).start()


# --------------------------------------------------------------------------- figures
EMPTY_TITLES = {"step": "training error against iterations", "time": "training error against seconds",
                "traces": "λ, γ, α, μ, ρ and batch size"}
_HOVER = re.compile(r"^(?P<name>.*?)<br>step %\{customdata\}<br>(?P<var>[A-Za-z_]+): %\{y")


class FigureStream:
    """A figure that follows growing data: rebuilt by a :mod:`kfac_lab.viz` function when its
    structure changes, otherwise refreshed by putting the new arrays into the last build's
    traces (a few ms instead of a rebuild)."""

    def __init__(self, build: Callable[[Any, list], Any], x: str, min_rebuild_s: float = 0.0):
        self.build, self.x = build, x
        self.min_rebuild_s = min_rebuild_s
        self.last_build = 0.0
        self.key = None
        self.base: dict | None = None
        self.slots: list[tuple[int, str, str]] = []

    def figure(self, ds, events: list, key) -> Any:
        import plotly.graph_objects as go

        now = time.monotonic()
        if self.base is None or (key != self.key and now - self.last_build >= self.min_rebuild_s):
            fig = self.build(ds, events)
            self.last_build = now
            self.base = fig.to_plotly_json()
            self.key = key
            self.slots = []
            for i, tr in enumerate(self.base["data"]):
                m = _HOVER.match(str(tr.get("hovertemplate", "")))
                if m and tr.get("mode") == "lines":
                    self.slots.append((i, m.group("name"), m.group("var")))
            return fig
        runs = {str(r): i for i, r in enumerate(ds["run"].values)}
        steps = ds["step"].values
        data = list(self.base["data"])
        for i, name, var in self.slots:
            r = runs.get(name)
            if r is None or var not in ds.data_vars:
                continue
            ys = ds[var].values[r]
            xs = steps.astype(np.float64) if self.x == "step" else ds[self.x].values[r]
            ok = np.isfinite(xs) & np.isfinite(ys)
            data[i] = {**data[i], "x": xs[ok], "y": ys[ok], "customdata": steps[ok]}
        return go.Figure(data=data, layout=self.base["layout"], _validate=False)


# --------------------------------------------------------------------------- the page
class TrainingLabPage:
    """The Panel page over a :class:`TrainingLab`. Build with :func:`create_app`."""

    # The browser draws each figure on the cores training uses (a redraw of a 1,500-point figure
    # costs it tens of ms of CPU): measured with a tiny problem streaming, chromium used 24 % of a
    # core at 0.5 / 1 / 3 s and 13 % at 1 / 2 / 5 s; with mnist-small (GEMMs on both cores) that
    # still cost ~13 % of its steps, hence the slower secondary figures. A new event or run is
    # drawn at once anyway (every figure).
    REDRAW_S = 1.0       # the curves against iterations at most this often (at once for a new event)
    TIME_S = 3.0         # the curves against seconds at most this often
    TRACES_S = 10.0      # the λ, γ, α, μ, ρ figure at most this often
    STATUS_S = 1.0       # the status cards (step, steps/s) at most this often

    def __init__(self, lab: TrainingLab):
        import panel as pn

        self.lab = lab
        s = lab.settings
        w = 300
        msg = {"color": "#b00020", "font-size": "12px"}
        # -- run setup
        self.problem = pn.widgets.Select(label="Problem", options=PROBLEMS, value=s.problem, width=w,
                                         css_classes=["kfac-problem"])
        self.optimizer = pn.widgets.Select(label="Optimizer", options=OPTIMIZERS, value=s.optimizer, width=w)
        self.race = pn.widgets.Checkbox(label="Race a second optimizer (same problem and seed)", value=s.race)
        self.optimizer_b = pn.widgets.Select(label="Second optimizer", options=OPTIMIZERS, value=s.optimizer_b,
                                             width=w, visible=s.race)
        self.seed = NumberField("Seed", s.seed, lambda t: parse_int(t, "seed", minimum=0),
                                lambda v: setattr(s, "seed", v), name="seed")
        self.steps = NumberField("Steps per start (0 = until stopped)", s.steps,
                                 lambda t: parse_int(t, "steps", minimum=0), lambda v: setattr(s, "steps", v),
                                 name="steps")
        self.start_b = pn.widgets.Button(label="Start", color="primary", width=70, css_classes=["kfac-start"])
        self.pause_b = pn.widgets.Button(label="Pause", width=70, css_classes=["kfac-pause"])
        self.stop_b = pn.widgets.Button(label="Stop", width=70, css_classes=["kfac-stop"])
        self.reset_b = pn.widgets.Button(label="Reset", width=70, css_classes=["kfac-reset"])
        self.branch_b = pn.widgets.Button(label="New run from here", width=150, css_classes=["kfac-branch"])
        self.command_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- live controls
        self.damping_slider = pn.widgets.DiscreteSlider(
            label="Damping λ (log scale)", options={f"{v:g}": v for v in DAMPING_GRID},
            value=_nearest(DAMPING_GRID, s.damping), width=w, css_classes=["kfac-damping-slider"])
        self.damping = NumberField("λ (type a value, Enter)", float(s.damping),
                                   lambda t: parse_float(t, "damping λ", positive=True),
                                   lambda v: self._typed("damping", v), name="damping")
        self.adapt = pn.widgets.Checkbox(label="adaptive λ (Levenberg–Marquardt)", value=s.adapt_damping,
                                         css_classes=["kfac-adapt"])
        self.approx = pn.widgets.RadioButtonGroup(label="Approximation", options=APPROX, value=s.approx,
                                                  css_classes=["kfac-approx"])
        self.momentum = pn.widgets.Checkbox(label="momentum (α and μ from the quadratic model)", value=s.momentum,
                                            css_classes=["kfac-momentum"])
        self.lr_mode = pn.widgets.RadioButtonGroup(label="Learning rate α", options={"α adaptive": "adaptive",
                                                                                     "α fixed": "fixed"},
                                                   value=s.lr_mode, css_classes=["kfac-lr-mode"])
        self.lr = NumberField("fixed α", float(s.lr), lambda t: parse_float(t, "learning rate α", positive=True),
                              lambda v: self._typed("lr", v), name="lr")
        self.control_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- view and compare
        self.metric = pn.widgets.RadioButtonGroup(label="Metric", options={"training error": "error", "loss": "loss"},
                                                  value=s.metric)
        self.log_y = pn.widgets.Checkbox(label="log scale", value=s.log_y)
        self.compare = pn.widgets.MultiChoice(label="Compare with stored runs", options={}, value=[], width=w,
                                              css_classes=["kfac-compare"])
        self.refresh_b = pn.widgets.Button(label="Refresh list", width=110)
        self.continue_b = pn.widgets.Button(label="Continue selected run", width=170)
        self.compare_msg = pn.pane.HTML("", styles=msg, css_classes=["kfac-message"], width=w)
        # -- output
        self.status = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["kfac-status"])
        cfg = {"displaylogo": False, "responsive": True}
        self.fig_step = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=380,
                                       css_classes=["kfac-fig-step"])
        self.fig_time = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=380,
                                       css_classes=["kfac-fig-time"])
        self.fig_traces = pn.pane.Plotly(None, config=cfg, sizing_mode="stretch_width", height=760,
                                         css_classes=["kfac-fig-traces"])
        self.streams = {
            "step": FigureStream(lambda ds, ev: self._curves(ds, ev, "step"), "step"),
            "time": FigureStream(lambda ds, ev: self._curves(ds, ev, "wall_time"), "wall_time"),
            "traces": FigureStream(self._traces, "step"),
        }
        self._drawn = {name: (-1, -1, 0.0) for name in self.streams}  # version, structure, time
        self._last_status = 0.0
        self._typed_at = -math.inf  # when the λ box last got a keystroke (it is not overwritten then)
        self.damping.input.param.watch(lambda e: setattr(self, "_typed_at", time.monotonic()), "value_input")

        # -- wiring
        self.problem.param.watch(self._on_problem, "value")
        self.optimizer.param.watch(lambda e: setattr(s, "optimizer", e.new), "value")
        self.optimizer_b.param.watch(lambda e: setattr(s, "optimizer_b", e.new), "value")
        self.race.param.watch(self._on_race, "value")
        self.start_b.on_click(lambda e: self._command(lab.start))
        self.pause_b.on_click(self._on_pause)
        self.stop_b.on_click(lambda e: self._command(lab.stop))
        self.reset_b.on_click(lambda e: self._command(lab.reset))
        self.branch_b.on_click(lambda e: self._command(lab.new_run_from_here, "branch"))
        self.damping_slider.param.watch(self._on_slider, "value_throttled")
        self.adapt.param.watch(lambda e: self._control("adapt_damping", e.new, widget=self.adapt, old=e.old), "value")
        self.approx.param.watch(lambda e: self._control("approx", e.new, widget=self.approx, old=e.old), "value")
        self.momentum.param.watch(lambda e: self._control("momentum", e.new, widget=self.momentum, old=e.old), "value")
        self.lr_mode.param.watch(self._on_lr_mode, "value")
        self.metric.param.watch(self._on_view, "value")
        self.log_y.param.watch(self._on_view, "value")
        self.compare.param.watch(lambda e: (lab.set_compare(e.new), self.refresh()), "value")
        self.refresh_b.on_click(lambda e: self._refresh_runs())
        self.continue_b.on_click(self._on_continue)
        self._refresh_runs()

        sidebar = pn.Column(
            pn.pane.Markdown("### Run"), self.problem, self.optimizer, self.race, self.optimizer_b, self.seed,
            self.steps, pn.Row(self.start_b, self.pause_b, self.stop_b, self.reset_b), self.branch_b,
            self.command_msg,
            pn.pane.Markdown("### Live controls (K-FAC)"), self.damping_slider, self.damping,
            self.adapt, "Approximation", self.approx, self.momentum,
            "Learning rate α", self.lr_mode, self.lr, self.control_msg,
            pn.pane.Markdown("### View"), self.metric, self.log_y,
            pn.pane.Markdown("### Earlier runs"), self.compare, pn.Row(self.refresh_b, self.continue_b),
            self.compare_msg,
            width=w + 30)
        header = pn.pane.Markdown(
            "## K-FAC training lab\nTrain a problem of Martens & Grosse (2015) and steer K-FAC while it runs: "
            "every change takes effect at the next step boundary, is saved as an event with the run and is "
            "marked ◆ on the curves. Runs are saved to the store as they go; earlier ones can be compared.",
            sizing_mode="stretch_width")
        main = pn.Column(header, self.status, pn.Row(self.fig_step, self.fig_time, sizing_mode="stretch_width"),
                         self.fig_traces, sizing_mode="stretch_width")
        self.layout = pn.Row(sidebar, main, sizing_mode="stretch_width")
        self.refresh(force=True)

    # -- events from widgets ----------------------------------------------------------------
    def _command(self, fn: Callable[[], bool], key: str = "start") -> None:
        fn()
        self.command_msg.object = escape_html(self.lab.messages.get(key, "") or self.lab.messages.get("start", ""))
        self._update_status()
        self.refresh(force=True)

    def _on_pause(self, event) -> None:
        lab = self.lab
        if lab.status == "paused":
            lab.resume()
            self.pause_b.label = "Pause"
        else:
            lab.pause()
            self.pause_b.label = "Resume"
        self._update_status()

    def _on_problem(self, event) -> None:
        self.lab.choose_problem(event.new)
        s = self.lab.settings
        self.steps.show(s.steps)
        self.damping.show(float(s.damping))
        self._quiet_set(self.damping_slider, _nearest(DAMPING_GRID, s.damping))

    def _on_race(self, event) -> None:
        self.lab.settings.race = event.new
        self.optimizer_b.visible = event.new

    def _on_slider(self, event) -> None:
        if getattr(self, "_quiet", False) or event.new is None:
            return
        if self._control("damping", event.new):
            self.damping.show(float(event.new))
        else:
            self.damping.set_error(self.lab.messages.get("damping", ""))

    def _on_lr_mode(self, event) -> None:
        self._control("lr_mode", event.new, widget=self.lr_mode, old=event.old)

    def _control(self, name: str, value: Any, widget=None, old=None) -> bool:
        """Apply a live control; on refusal show why and put the widget back."""
        if getattr(self, "_quiet", False):
            return True
        ok = self.lab.set_control(name, value)
        text = self.lab.messages.get(name, "")
        self.control_msg.object = escape_html(text)
        if ok and name == "damping":
            self._quiet_set(self.damping_slider, _nearest(DAMPING_GRID, float(value)))
        if not ok and widget is not None:
            self._quiet_set(widget, old)
        self._update_status()
        return ok

    def _typed(self, name: str, value: Any) -> None:
        """A typed λ or α: applied, or ValueError for the NumberField to show next to its box."""
        if not self.lab.set_control(name, value):
            raise ValueError(self.lab.messages.get(name, f"{name}: refused"))
        self.control_msg.object = ""
        if name == "damping":
            self._quiet_set(self.damping_slider, _nearest(DAMPING_GRID, float(value)))
        self._update_status()

    def _quiet_set(self, widget, value) -> None:
        self._quiet = True
        try:
            widget.value = value
        finally:
            self._quiet = False

    def _on_view(self, event) -> None:
        s = self.lab.settings
        s.metric, s.log_y = self.metric.value, self.log_y.value
        self.refresh(force=True)

    def _refresh_runs(self) -> None:
        runs = self.lab.stored_runs()
        keep = [r for r in self.compare.value if r in runs.values()]
        self.compare.options = runs
        self.compare.value = keep
        self.compare_msg.object = escape_html(self.lab.messages.pop("compare", ""))

    def _on_continue(self, event) -> None:
        if not self.compare.value:
            self.compare_msg.object = "choose a run in the list first"
            return
        self.lab.continue_run(self.compare.value[0])
        self.compare_msg.object = escape_html(self.lab.messages.get("continue", ""))
        self.refresh(force=True)

    # -- drawing (on the session's loop) ------------------------------------------------------
    def _curves(self, ds, events, x):
        from .. import viz

        s = self.lab.settings
        fig = viz.training_curves(ds, x=x, log_y=s.log_y, events=events, y=s.metric,
                                  title=f"training {s.metric} against {'iterations' if x == 'step' else 'seconds'}")
        fig.update_layout(margin=dict(l=50, r=10, t=50, b=40), legend=dict(orientation="h", y=-0.2),
                          uirevision="keep")
        return fig

    def _traces(self, ds, events):
        from .. import viz

        present = [v for v in TRACE_VARS if v in ds.data_vars and np.isfinite(ds[v].values).any()]
        fig = viz.traces(ds, variables=present or ["batch_size"], events=events)
        fig.update_layout(height=120 * max(1, len(present)) + 80, margin=dict(l=60, r=10, t=50, b=40),
                          title=dict(text="λ, γ, α, μ, ρ and batch size"), uirevision="keep")
        return fig

    def _follow_damping(self) -> None:
        """While adaptive λ is on, the λ slider (and the λ box, unless being typed in) show the λ
        the optimizer has reached; moving either still sets λ (see :meth:`TrainingLab.live_damping`)."""
        lam = self.lab.live_damping()
        if lam is None:
            return
        nearest = _nearest(DAMPING_GRID, lam)
        if self.damping_slider.value != nearest:
            self._quiet_set(self.damping_slider, nearest)
        shown = float(f"{lam:.3g}")
        if (time.monotonic() - self._typed_at > 5.0 and not self.damping.error
                and self.damping.input.value != self.damping.fmt(shown)):
            self.damping.show(shown)

    def _empty(self, title: str):
        import plotly.graph_objects as go

        text = "waiting for the first step…" if self.lab.running else "press Start"
        fig = go.Figure()
        fig.update_layout(title=dict(text=title), margin=dict(l=50, r=10, t=50, b=40),
                          annotations=[dict(text=text, showarrow=False, x=0.5, y=0.5, xref="paper",
                                            yref="paper", font=dict(size=16, color="#888"))])
        return fig

    def refresh(self, force: bool = False) -> None:
        """Poll the sessions and redraw what is due (the periodic callback, every 100 ms).

        The curves against iterations follow the data every ``REDRAW_S`` and at once when a run
        or an event appears (the marker of a control change); the curves against seconds do the
        same one tick later, and the trace figure (six subplots: slow to build and to draw)
        every ``TRACES_S`` — a figure rebuilt for a new event is never held up behind another,
        and a figure still showing "press Start" is drawn as soon as a run has points."""
        lab = self.lab
        lab.poll()
        now = time.monotonic()
        if force or now - self._last_status >= self.STATUS_S:
            self._update_status()
            self._last_status = now
        due = []
        # the curves change only when the drawn metric has a new value (the training error is
        # evaluated every eval_every steps); the traces with every step
        curve_version = (lab.metric_versions.get(lab.settings.metric, 0), lab.structure, lab.settings.metric,
                         lab.settings.log_y, len(lab.settings.compare))
        for name, every in (("step", self.REDRAW_S), ("time", self.TIME_S), ("traces", self.TRACES_S)):
            drawn_version, drawn_structure, last = self._drawn[name]
            version = lab.version if name == "traces" else curve_version
            empty = self.streams[name].base is None  # the placeholder: replace it as soon as there are points
            if force or (name != "traces" and drawn_structure != lab.structure) or (
                    drawn_version != version and (empty or now - last >= every)):
                due.append(name)
        if not force and "step" in due and self._drawn["step"][1] != lab.structure:
            due = ["step"]  # a new event or run: its marker first, the other figures next tick
        if not due:
            return
        ds, events = lab.dataset()
        s = lab.settings
        panes = {"step": self.fig_step, "time": self.fig_time, "traces": self.fig_traces}
        for name in due:
            if ds is None:
                panes[name].object = self._empty(EMPTY_TITLES[name])
                self.streams[name].key = self.streams[name].base = None
            else:
                key = (tuple(ds["run"].values), len(events)) + ((s.metric, s.log_y, lab.structure)
                                                                if name != "traces" else ())
                panes[name].object = self.streams[name].figure(ds, events, key)
            self._drawn[name] = (lab.version if name == "traces" else curve_version, lab.structure, now)

    def _update_status(self) -> None:
        lab = self.lab
        self._follow_damping()
        parts = []
        for sess in lab.sessions:
            m = sess.last_metrics or {}
            err = sess.summary().get("error")
            err_s = f"{err:.4g}" if isinstance(err, float) and math.isfinite(err) else "—"
            lam = m.get("damping")
            lam_s = f" · λ {lam:.3g}" if isinstance(lam, (int, float)) and math.isfinite(lam) else ""
            cfg = getattr(sess.optimizer, "config", None)
            opt = (f" · {getattr(cfg, 'approx', '')}, momentum {'on' if getattr(cfg, 'momentum', False) else 'off'}"
                   if cfg is not None else "")
            fail = f"<br><b>failed:</b> {escape_html(sess.error)}" if sess.error is not None else ""
            parts.append(
                f"<div class='kfac-card' style='border:1px solid #ddd;border-radius:6px;padding:6px 10px;"
                f"margin:4px;min-width:260px'><b>{lab.buffers[sess.run_id].label if sess.run_id in lab.buffers else sess.run_id}</b>"
                f" — {sess.status}<br>step {sess.step} · {lab.rate(sess):.1f} steps/s · error {err_s}{lam_s}{opt}"
                f"<br><small>run {sess.run_id} · saved to step {lab.saved_step(sess)}</small>{fail}</div>")
        notice = f"<div style='color:#555'>{escape_html(lab.notice)}</div>" if lab.notice else ""
        html = (f"<div style='display:flex;flex-wrap:wrap'>{''.join(parts)}</div>{notice}" if parts
                else f"<div style='color:#555'>{escape_html(lab.notice or 'idle — choose a problem and press Start')}</div>")
        if self.status.object != html:
            self.status.object = html
        paused = lab.status == "paused"
        label = "Resume" if paused else "Pause"
        if self.pause_b.label != label:
            self.pause_b.label = label

    def __panel__(self):
        return self.layout


def _nearest(grid: list[float], value: float) -> float:
    """The grid value closest to ``value`` on a log scale."""
    v = max(float(value), 1e-12)
    return min(grid, key=lambda g: abs(math.log(g) - math.log(v)))


def create_app(store=None, **settings):
    """The Training lab page for one browser session (``panel serve`` calls this per visit).
    ``settings`` override :class:`TrainingSettings` defaults (e.g. ``problem="tiny"``)."""
    import panel as pn

    pn.extension("plotly", sizing_mode="fixed")
    if not client_allowed():
        return pn.Column(refusal("The K-FAC training lab"))
    lab = TrainingLab(store=store, **settings)
    page = TrainingLabPage(lab)
    attach(page.refresh, lab.close, period_ms=100)
    return pn.Column(page, sizing_mode="stretch_width")
