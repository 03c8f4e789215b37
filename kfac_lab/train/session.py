"""``Session``: one optimizer on one problem, logged step by step to a Store, with live controls.

    >>> from kfac_lab.train import Session
    >>> s = Session("tiny", "kfac", store="runs/lab.zarr")      # doctest: +SKIP
    >>> s.run(steps=100)                   # in this thread (progress=True for a tqdm bar)
    >>> s.start(steps=1000)                # or in a background thread
    >>> s.set(damping=30.0, approx="tridiag", momentum=False)   # applied at the next step
    >>> s.pause(); s.resume(); s.stop()
    >>> s2 = Session.resume("runs/lab.zarr", s.run_id, steps=2000)   # after a crash or a stop

Dashboards and widgets are thin shells over this class. The rules they rely on:

* **Threads.** ``start()`` trains in a background (daemon) thread; ``run()`` in the caller's.
  The training thread never touches a UI: per-step metric dicts go onto ``session.updates``
  (a bounded ``queue.Queue``; when it is full the *oldest* entry is dropped, so a slow UI never
  blocks training) for the UI to drain on its own loop (Panel: a periodic callback;
  ipywidgets: set widget values from the drained data). ``subscribe(callback)`` listeners are
  called *in the training thread* with the same dict: they must only hand data over (append to
  a list, put on a queue) — never draw; a listener that raises is removed (a
  ``"listener_error"`` event records it) and training goes on.
* **Controls.** ``set(**changes)`` validates at once (``ValueError`` to the caller, with the
  optimizer's message; training is unaffected) and applies at the next step boundary, never
  mid-step. Each call becomes a ``"control"`` event at the step where it takes effect; the
  optimizer's own events (``"configure"``, ``"rejected"``) are mirrored into the store at the
  session step in which they appeared. Session-level settings: ``batch_size`` (turns the
  schedule off) and ``eval_every``; everything else goes to ``optimizer.configure``.
* **Steps.** ``step`` counts iterations (optimizer ``step`` calls, rejected ones included),
  from 1, contiguous. Each step logs ``loss``, ``objective``, ``wall_time``, ``batch_size`` and
  the optimizer's ``info.as_dict()`` (λ, γ, α, μ, ρ, approx, momentum, rejected, ``time_*`` …);
  ``error`` (the problem's metric on a fixed subset of up to ``eval_cases`` training cases, the
  same subset for every run of the problem, plus ``nll``; with Polyak averaging also
  ``error_avg`` and ``error_best`` = min of the two, what the paper reports) and
  ``eval_seconds`` are logged only at evaluation steps — step 1, every ``eval_every`` steps and
  the last step of a ``run``/``start`` — and are missing (NaN) in the other rows: a missing
  value is never mistaken for a measurement. Queue items with a ``"status"`` key (and no
  metrics) announce the end of a ``run``/``start``: ``"finished"``, ``"stopped"`` or ``"failed"``.
* **Wall time.** ``wall_time`` is the cumulative time spent taking the batch and in the
  optimizer step (and the Polyak update): pauses, evaluation, logging, queues, listeners and
  checkpoints are excluded.
* **Data order.** Epochs of seeded permutations (epoch ``e`` uses a generator seeded from
  ``(seed, e)``); a batch takes the next ``m`` cases, running into the next epoch when needed.
  Deterministic per seed; the position is part of every checkpoint.
* **Checkpoints** every ``checkpoint_every`` steps and when a ``run``/``start`` finishes or is
  stopped: model, optimizer state (its RNG included), Polyak average, data-order position,
  step, wall time, batch size. The store's buffered rows are flushed first, so the committed
  rows always reach at least the last checkpoint.
  Retention: only the newest ``keep_checkpoints`` (default 3) are kept, plus every one whose
  step is a multiple of ``keep_every`` (if set); the one just written is never deleted.
* **One writer per run.** A session holds its run's writer lock while it may write (from
  creation or resume, and again from each ``run``/``start``, until it finishes, stops or
  fails): a second writer — another process, or another running session in this one — gets a
  ``StoreError`` at once naming the holder. A holder killed with SIGKILL is taken over with a
  warning.
* **Resuming** (``Session.resume(store, run_id, **overrides)``, also ``Session.restore``)
  loads the newest *intact* checkpoint of the run — damaged newer ones are skipped with a
  warning each, and recorded in the ``"resumed"`` event — or the one at ``from_step=K``
  (none: the run restarts from its seed) and continues the same ``run_id``. The rule for steps already in the store: steps after the checkpoint are
  re-done (bit for bit on CPU: same data order, same RNG), but only steps *after the run's last
  committed step* are logged — rows of the re-done steps are already there. ``"control"``
  events the store holds for re-done steps are re-applied at their steps, so the re-done
  steps follow the logged ones. A ``"resumed"`` event (at the checkpoint's step) records it.
  Only one writer per run: resume after the process (or thread) that wrote the run is gone.
* **Failures.** An exception in a step sets ``status = "failed"`` and keeps it in ``error``
  (``traceback`` holds the text); a ``"failed"`` event is stored and what was logged is
  flushed; no checkpoint is written (the state may be half-updated): resume from the last
  one. ``run()`` re-raises it; a background thread never dies silently. ``KeyboardInterrupt``
  in ``run()`` records ``"interrupted"``, flushes, sets ``"stopped"`` and re-raises.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import queue
import threading
import time
import traceback as tb
import uuid
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .. import checks
from .problems import Problem, canonical_optimizer, get_problem
from .stored import branch_from_checkpoint, stored_settings

__all__ = ["Session", "STATUSES", "SESSION_CONTROLS", "make_optimizer", "open_store"]

STATUSES = ("idle", "running", "paused", "stopped", "finished", "failed")
#: Settings ``Session.set`` handles itself (everything else goes to the optimizer).
SESSION_CONTROLS = ("batch_size", "eval_every")
_EVAL_SEED = 20150302  # the fixed evaluation subset: the same for every run of a problem
_FORMAT = "kfac_lab.Session/1"
_RESTORE_OVERRIDES = {"steps", "seconds", "eval_every", "eval_cases", "checkpoint_every", "device", "dtype",
                      "keep_checkpoints", "keep_every", "from_step",
                      "queue_size", "threads", "progress", "problem", "problem_options"}


# ------------------------------------------------------------------------------ helpers
def open_store(store, *, session_default: bool = True):
    """A :class:`~kfac_lab.store.Store` from a Store, a path/URL, or ``None`` (a fresh in-memory
    ``memory://kfac_lab/<uuid>.zarr`` store). Stores opened here flush every 100 rows or 2 s
    (cheaper per step than the Store's defaults)."""
    from ..store import Store

    if isinstance(store, Store):
        return store
    kw = {"flush_every": 100, "flush_interval": 2.0} if session_default else {}
    if store is None:
        return Store(f"memory://kfac_lab/{uuid.uuid4().hex}.zarr", **kw)
    if isinstance(store, (str, os.PathLike)):
        return Store(store, **kw)
    raise TypeError(f"store must be a kfac_lab Store, a path or URL, or None; got {type(store).__name__}")


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "").strip().lower()
        aliases = {"float": "float32", "double": "float64", "half": "float16"}
        got = getattr(torch, aliases.get(name, name), None)
        if isinstance(got, torch.dtype) and got.is_floating_point:
            return got
    raise ValueError(f"dtype must be a floating torch dtype or its name ('float32', 'float64'), got {dtype!r}")


def make_optimizer(name: str, model: nn.Module, loss: str, options: dict, seed: int = 0):
    """``KFAC`` / ``SGDNesterov`` / ``Adam`` on ``model`` with ``options`` (ValueError/TypeError
    naming a bad option)."""
    from ..optim import KFAC, Adam, SGDNesterov

    name = canonical_optimizer(name)
    options = dict(options)
    try:
        if name == "kfac":
            return KFAC(model, loss, seed=seed, **options)
        if name == "sgd":
            return SGDNesterov(model, loss, **options)
        if "betas" in options and isinstance(options["betas"], list):
            options["betas"] = tuple(options["betas"])
        return Adam(model, loss, **options)
    except TypeError as exc:
        raise ValueError(f"bad option for optimizer {name!r}: {exc}") from None


def _clone(obj):
    """A deep copy of a state dict (tensors cloned; a module state dict keeps its ``_metadata``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, _clone(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return copy.deepcopy(obj)


def _plain(v):
    """Event details / attrs: JSON-able plain values."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


class _Order:
    """Seeded permutation epochs; ``take(m)`` → the next ``m`` indices (on ``device``)."""

    def __init__(self, n: int, seed: int, device, epoch: int = 0, pos: int = 0):
        self.n, self.seed, self.device = int(n), int(seed), device
        self.epoch, self.pos = int(epoch), int(pos)
        self.perm = self._perm(self.epoch)

    def _perm(self, epoch: int) -> torch.Tensor:
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 17) % 2**63)
        return torch.randperm(self.n, generator=g).to(self.device)

    def take(self, m: int) -> torch.Tensor:
        m = min(int(m), self.n)
        if self.pos + m <= self.n:
            idx = self.perm[self.pos:self.pos + m]
            self.pos += m
            return idx
        head = self.perm[self.pos:]
        self.epoch, self.pos = self.epoch + 1, 0
        self.perm = self._perm(self.epoch)
        rest = m - head.shape[0]
        self.pos = rest
        return torch.cat([head, self.perm[:rest]])

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


class _ResumeMethod:
    """``Session.resume(store, run_id, **overrides)`` on the class continues a stored run (see
    :meth:`Session.restore`); ``session.resume()`` on an instance un-pauses it."""

    def __get__(self, obj, cls):
        if obj is None:
            return cls.restore

        def resume(*args, **kwargs):
            if args or kwargs:
                return cls.restore(*args, **kwargs)
            return obj.unpause()

        resume.__doc__ = Session.unpause.__doc__
        return resume


# ------------------------------------------------------------------------------ Session
class Session:
    """Runs one optimizer on one problem, logging every step to a store (see the module
    docstring for the threading, logging, checkpoint and resume rules).

    Args:
        problem: a registry name (``"mnist"``, ``"curves"``, ``"faces"``, ``"figure1"``,
            ``"mnist-small"``, ``"tiny"``) or a :class:`Problem`.
        optimizer: ``"kfac"``, ``"sgd"`` (SGD-Nesterov) or ``"adam"``.
        store: a Store, a path/URL, or None (a new in-memory ``memory://`` store).
        seed: model initialisation, data order and the optimizer's RNG.
        batch_size: mini-batch size (None: the problem's default for the optimizer).
        batch_schedule: True — the paper's growing batch ``m_k = min(m₁ exp((k−1)/b), |S|)``
            with ``m₁ = batch_size`` reaching ``|S|`` at ``k = 500`` (K-FAC's schedule).
        optimizer_options: keyword arguments for the optimizer, over the problem's defaults.
        steps, seconds: the run's budget — total steps / total training seconds (``wall_time``)
            at which ``start()``/``run()`` without arguments stop. Neither: ``start()`` runs
            until ``stop()``.
        eval_every: evaluate the metric every this many steps. eval_cases: size of the fixed
            evaluation subset of the training set.
        keep_checkpoints, keep_every: checkpoint retention (the newest ``keep_checkpoints``, default
            3, None: all; plus every step that is a multiple of ``keep_every``).
        checkpoint_every: steps between checkpoints (0: only at the end of a ``run``/``start``;
            None: never — the run cannot be resumed).
        polyak: None, or ξ (e.g. 0.99; True means 0.99) for Polyak averaging.
        run_id: the run's id (default: a new time-sortable one). attrs: extra run attrs.
        device, dtype: where and in what the model trains (default CPU, float32).
        problem_options: keywords for :func:`get_problem` (``n``, ``seed``, ``path`` …).
        queue_size: capacity of ``updates``. threads: ``torch.set_num_threads`` in the training
            thread (None: unchanged). progress: default of ``run(progress=...)``.
    """

    resume = _ResumeMethod()

    def __init__(self, problem: str | Problem = "mnist", optimizer: str = "kfac", store=None, *, seed: int = 0,
                 batch_size: int | None = None, batch_schedule: bool = False, optimizer_options: dict | None = None,
                 steps: int | None = None, seconds: float | None = None, eval_every: int = 10,
                 eval_cases: int = 1000, checkpoint_every: int | None = 100, polyak: float | bool | None = None,
                 run_id: str | None = None, attrs: dict | None = None, device=None, dtype=None,
                 problem_options: dict | None = None, queue_size: int = 1000, threads: int | None = None,
                 progress: bool = False, keep_checkpoints: int | None = 3, keep_every: int | None = None,
                 _create_run: bool = True):
        # -- validate the plain arguments first (cheap, before any data or model is built)
        self.seed = checks.seed(seed)  # torch.manual_seed's range: a huge seed fails here, not mid-run
        self.eval_every = self._check_int("eval_every", eval_every, 1)
        self.eval_cases = self._check_int("eval_cases", eval_cases, 1)
        if checkpoint_every is None:
            self.checkpoint_every, self.checkpoints_enabled = 0, False
        else:
            self.checkpoint_every = self._check_int("checkpoint_every", checkpoint_every, 0)
            self.checkpoints_enabled = True
        from ..store.checkpoints import check_retention

        self.keep_checkpoints, self.keep_every = check_retention(keep_checkpoints, keep_every)
        self.budget_steps = None if steps is None else self._check_int("steps", steps, 0)
        self.budget_seconds = None if seconds is None else self._check_seconds(seconds)
        self.queue_size = self._check_int("queue_size", queue_size, 1)
        self.threads = None if threads is None else self._check_int("threads", threads, 1)
        self.progress = bool(progress)
        if polyak is True:
            polyak = 0.99
        if polyak is False:
            polyak = None
        if polyak is not None and not (isinstance(polyak, (int, float)) and 0 <= polyak < 1):
            raise ValueError(f"polyak must be None or the averaging decay ξ in [0, 1) (the paper: 0.99), got {polyak!r}")
        self.polyak = None if polyak is None else float(polyak)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _parse_dtype(dtype) or torch.float32
        self.optimizer_name = canonical_optimizer(optimizer)

        # -- problem, model, optimizer
        self.problem_options = dict(problem_options or {})
        if isinstance(problem, Problem):
            base = problem
        else:
            base = get_problem(problem, **self.problem_options)
        self.problem = base.to(self.device, self.dtype)
        self.model = base.make_model(self.seed).to(device=self.device, dtype=self.dtype)
        self.optimizer_options = {**self.problem.default_options(self.optimizer_name), **(optimizer_options or {})}
        self.optimizer = make_optimizer(self.optimizer_name, self.model, self.problem.loss, self.optimizer_options,
                                        self.seed)
        n = self.problem.n
        self.batch_size = self._check_batch(batch_size if batch_size is not None
                                            else self.problem.default_batch_size(self.optimizer_name))
        self.batch_schedule = bool(batch_schedule)
        self._schedule = self._make_schedule() if self.batch_schedule else None
        self._avg = None
        if self.polyak is not None:
            from ..optim import PolyakAverage

            self._avg = PolyakAverage(self.model, self.polyak)

        # -- the fixed evaluation subset
        if self.eval_cases >= n:
            self._eval_X, self._eval_Y = self.problem.X, self.problem.Y
        else:
            g = torch.Generator(device="cpu").manual_seed(_EVAL_SEED)
            idx = torch.randperm(n, generator=g)[: self.eval_cases].to(self.device)
            self._eval_X = self.problem.X.index_select(0, idx)
            self._eval_Y = self._eval_X if self.problem.Y is self.problem.X else self.problem.Y.index_select(0, idx)

        # -- state
        self.step = 0
        self.wall_time = 0.0
        self._order = _Order(n, self.seed, self.device)
        self._status = "idle"
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.last_metrics: dict = {}
        self.updates: queue.Queue = queue.Queue(maxsize=self.queue_size)
        self.dropped_updates = 0
        self._listeners: list[Callable[[dict], Any]] = []
        self._controls: list[dict] = []
        self._control_lock = threading.Lock()
        self._step_lock = threading.RLock()
        self._waiters = 0              # other threads waiting for a step boundary (the loop yields to them)
        self._stop = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._thread: threading.Thread | None = None
        self._in_run = False
        self._n_opt_events = len(getattr(self.optimizer, "events", []))
        self._log_floor = 0            # steps <= this are already in the store (resume): not re-logged
        self._replay: dict[int, list[dict]] = {}
        self._last_checkpoint = -1
        self._target_step: int | None = None
        self._target_wall: float | None = None

        # -- the store and the run
        self.store = open_store(store)
        self.user_attrs = dict(attrs or {})
        if _create_run:
            self.run_id = self.store.new_run(self._run_attrs(), run_id=run_id)
        else:
            self.run_id = run_id
        self.store.claim(self.run_id, owner=self)  # one writer per run (see the module docstring)

    # ------------------------------------------------------------------ validation helpers
    @staticmethod
    def _check_int(name, value, minimum):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return int(value)

    @staticmethod
    def _check_seconds(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
            raise ValueError(f"seconds must be a finite number >= 0, got {value!r}")
        return float(value)

    def _check_batch(self, m):
        n = self.problem.n
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {m!r}")
        if m > n:
            raise ValueError(f"batch_size={m} exceeds the {n} training cases of problem {self.problem.name!r}")
        return int(m)

    def _make_schedule(self):
        from ..optim import BatchSizeSchedule

        return BatchSizeSchedule(m1=min(self.batch_size, self.problem.n), total=self.problem.n, k_full=500)

    def _hyper(self) -> dict:
        opt = self.optimizer
        if hasattr(opt, "config"):
            return _plain(opt.config.as_dict())
        if hasattr(opt, "hyper"):
            return _plain({k: v for k, v in opt.hyper.items() if not callable(v)})
        return {}

    def _run_attrs(self) -> dict:
        from .. import __version__

        p = self.problem
        attrs = {
            "problem": p.name, "problem_description": p.describe(), "problem_params": _plain(p.params),
            "problem_options": _plain(self.problem_options), "n": p.n, "loss": p.loss,
            "optimizer": self.optimizer_name, "optimizer_options": _plain(self.optimizer_options),
            "seed": self.seed, "batch_size": self.batch_size, "batch_schedule": self.batch_schedule,
            "eval_every": self.eval_every, "eval_cases": self.eval_cases, "checkpoint_every": self.checkpoint_every if self.checkpoints_enabled else -1,
            "keep_checkpoints": -1 if self.keep_checkpoints is None else self.keep_checkpoints,
            "keep_every": -1 if self.keep_every is None else self.keep_every,
            "polyak": self.polyak if self.polyak is not None else "none",
            "budget_steps": self.budget_steps if self.budget_steps is not None else -1,
            "budget_seconds": self.budget_seconds if self.budget_seconds is not None else -1.0,
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "lab_version": __version__, "torch_version": torch.__version__,
        }
        for k, v in self._hyper().items():  # all hyper-parameters, flat (the runs() table shows them)
            attrs.setdefault(k, v)
        attrs.update(_plain(self.user_attrs))
        return attrs

    # ------------------------------------------------------------------ status
    @property
    def status(self) -> str:
        """``"idle"``, ``"running"``, ``"paused"``, ``"stopped"``, ``"finished"`` or ``"failed"``."""
        return self._status

    @property
    def running(self) -> bool:
        """A ``run()`` or background thread is active (possibly paused)."""
        return self._in_run or (self._thread is not None and self._thread.is_alive())

    def summary(self) -> dict:
        """``{run_id, status, step, wall_time, loss, error, …}``: the state at a glance."""
        m = self.last_metrics
        out = {"run_id": self.run_id, "problem": self.problem.name, "optimizer": self.optimizer_name,
               "status": self._status, "step": self.step, "wall_time": self.wall_time,
               "loss": m.get("loss"), "error": self._last_error, "error_best": self._last_error_best}
        if self.error is not None:
            out["failure"] = f"{type(self.error).__name__}: {self.error}"
        return out

    _last_error: float | None = None
    _last_error_best: float | None = None

    def __repr__(self) -> str:
        return (f"Session({self.problem.name!r}, {self.optimizer_name!r}, run_id={self.run_id!r}, "
                f"status={self._status!r}, step={self.step})")

    # ------------------------------------------------------------------ live controls
    def set(self, **changes) -> None:
        """Change settings live. Validated now (``ValueError`` with the reason; nothing changes),
        applied at the next step boundary, recorded as a ``"control"`` event at that step.
        ``batch_size`` and ``eval_every`` are the session's; the rest go to the optimizer
        (K-FAC: ``damping``, ``adapt_damping``, ``gamma``, ``adapt_gamma``, ``approx``,
        ``momentum``, ``lr``, ``weight_decay``, ``T1``–``T3``; SGD: ``lr``, ``mu_max``, ``schedule``,
        ``weight_decay``; Adam: ``lr``, ``betas``, ``eps``, ``weight_decay``)."""
        if not changes:
            return
        if self._status == "failed":
            raise RuntimeError(f"session {self.run_id} failed ({self.error!r}); resume it with "
                               f"Session.resume(store, {self.run_id!r})")
        own = {k: v for k, v in changes.items() if k in SESSION_CONTROLS}
        rest = {k: v for k, v in changes.items() if k not in SESSION_CONTROLS}
        if "batch_size" in own:
            own["batch_size"] = self._check_batch(own["batch_size"])
        if "eval_every" in own:
            own["eval_every"] = self._check_int("eval_every", own["eval_every"], 1)
        with self._control_lock:
            if rest:
                pending = {}
                for c in self._controls:
                    pending.update({k: v for k, v in c.items() if k not in SESSION_CONTROLS})
                rest = self._validate_optimizer({**pending, **rest}, rest)
            self._controls.append({**own, **rest})

    def _validate_optimizer(self, merged: dict, new: dict) -> dict:
        opt = self.optimizer
        if hasattr(opt, "config") and hasattr(opt.config, "updated"):  # K-FAC
            from ..optim.config import LIVE

            not_live = sorted(set(new) - set(LIVE))
            if not_live:
                raise ValueError(f"{not_live} cannot change during training; live settings: "
                                 f"{list(LIVE) + list(SESSION_CONTROLS)}")
            opt.config.updated(**merged)  # raises ValueError naming the bad value
            return dict(new)
        validate = getattr(opt, "_validate", None)
        if validate is None:
            return dict(new)
        try:
            return {k: validate(k, v) for k, v in new.items()}
        except ValueError as exc:
            known = sorted(getattr(opt, "hyper", {})) + list(SESSION_CONTROLS)
            msg = str(exc)
            raise ValueError(msg if "known" in msg else f"{msg} (live settings: {known})") from None

    def _take_controls(self, k: int) -> list[dict]:
        """At the boundary before step ``k``: apply queued controls (and, while re-doing steps
        after a resume, the stored ones); return the events to record."""
        with self._control_lock:
            controls, self._controls = self._controls, []
        replay = self._replay.pop(k, []) if self._replay else []
        if not controls and not replay:
            return []
        merged, events = {}, []
        for c in replay + controls:
            for key, v in c.items():
                if key == "batch_size":
                    self.batch_size, self.batch_schedule, self._schedule = int(v), False, None
                elif key == "eval_every":
                    self.eval_every = int(v)
                else:
                    merged[key] = v
        if merged:
            try:
                self.optimizer.configure(**merged)
            except ValueError as exc:  # changed behind our back since validation
                events.append({"step": k, "kind": "control_rejected", "message": str(exc), **_plain(merged)})
                merged = {}
        events += [{"step": k, "kind": "control", **_plain(c)} for c in controls]
        return events

    # ------------------------------------------------------------------ pause / stop / join
    def pause(self) -> None:
        """Pause at the next step boundary (the step in flight finishes)."""
        self._unpaused.clear()

    def unpause(self) -> None:
        """Continue after :meth:`pause` (``session.resume()`` does the same)."""
        self._unpaused.set()

    def stop(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop at the next step boundary: the step in flight finishes, rows are flushed, a
        checkpoint is written, status becomes ``"stopped"``. ``wait``: join the background thread."""
        self._stop.set()
        self._unpaused.set()
        th = self._thread
        if th is not None and th.is_alive():
            if wait and threading.current_thread() is not th:
                th.join(timeout)
            return
        if not self._in_run and self._status in ("idle", "finished", "paused"):
            with self._step_lock:
                self._finalize("stopped")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the background thread; True when it has ended (or never started)."""
        th = self._thread
        if th is None:
            return True
        th.join(timeout)
        return not th.is_alive()

    # ------------------------------------------------------------------ listeners
    def subscribe(self, callback: Callable[[dict], Any]) -> Callable[[], None]:
        """Call ``callback(metrics)`` after every step, **in the training thread**: hand the data
        over (append, put on a queue) and return — never draw from it. Returns an unsubscribe
        function. A callback that raises is removed (event ``"listener_error"``)."""
        if not callable(callback):
            raise TypeError("subscribe(callback): callback must be callable")
        self._listeners.append(callback)

        def unsubscribe():
            try:
                self._listeners.remove(callback)
            except ValueError:
                pass

        return unsubscribe

    def _publish(self, item: dict) -> None:
        q = self.updates
        while True:
            try:
                q.put_nowait(item)
                return
            except queue.Full:
                try:
                    q.get_nowait()
                    self.dropped_updates += 1
                except queue.Empty:
                    pass

    # ------------------------------------------------------------------ running
    def start(self, steps: int | None = None, seconds: float | None = None) -> "Session":
        """Train in a background thread. ``steps``/``seconds``: *more* steps / training seconds
        from now; neither: until the session's budget (``Session(steps=, seconds=)``), or until
        :meth:`stop` if it has none. Returns self."""
        if self.running:
            raise RuntimeError(f"session {self.run_id} is already running; pause(), set() or stop() it")
        self.prepare(steps, seconds)
        self._status = "running"
        self._thread = threading.Thread(target=self._thread_main, name=f"kfac_lab-session-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def run(self, steps: int | None = None, seconds: float | None = None, progress: bool | None = None) -> dict:
        """Train in this thread: ``steps``/``seconds`` *more* (neither: up to the session's
        budget, which must then exist). ``progress``: a tqdm bar (default ``self.progress``).
        Returns :meth:`summary`. Re-raises a step's exception after recording it."""
        if self.running:
            raise RuntimeError(f"session {self.run_id} is already running in a thread; stop() it first")
        if steps is None and seconds is None and self.budget_steps is None and self.budget_seconds is None:
            raise ValueError("run() needs steps= or seconds= (or a Session(steps=..., seconds=...) budget)")
        self.prepare(steps, seconds)
        self._status = "running"
        self._in_run = True
        try:
            self._loop(self.progress if progress is None else progress, reraise=True)
        finally:
            self._in_run = False
        return self.summary()

    def prepare(self, steps: int | None = None, seconds: float | None = None) -> None:
        """Set the budget of the coming steps (what ``run``/``start`` do first): ``steps`` /
        ``seconds`` more from now, or the session's budget when neither is given. For callers
        that drive :meth:`train_step` themselves (``race``); see :attr:`done`."""
        if self._status == "failed":
            raise RuntimeError(f"session {self.run_id} failed ({type(self.error).__name__}: {self.error}); "
                               f"continue from its last checkpoint with Session.resume(store, {self.run_id!r})")
        if steps is not None:
            self._target_step = self.step + self._check_int("steps", steps, 0)
        elif seconds is None:
            self._target_step = self.budget_steps
        else:
            self._target_step = None
        if seconds is not None:
            self._target_wall = self.wall_time + self._check_seconds(seconds)
        elif steps is None:
            self._target_wall = self.budget_seconds
        else:
            self._target_wall = None
        self.store.claim(self.run_id, owner=self)
        self._stop.clear()

    def _thread_main(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self._loop(progress=False, reraise=False)

    @property
    def done(self) -> bool:
        """The budget set by :meth:`prepare` (or ``run``/``start``) is used up."""
        return ((self._target_step is not None and self.step >= self._target_step)
                or (self._target_wall is not None and self.wall_time >= self._target_wall))

    def _loop(self, progress: bool, reraise: bool) -> None:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            total = self._target_step if self._target_step is not None else None
            bar = tqdm(total=total, initial=self.step, unit="step", desc=f"{self.optimizer_name} {self.problem.name}",
                       dynamic_ncols=True, leave=True)
        try:
            while True:
                # A step's row is emitted (evaluated, logged, published) at the next boundary, where
                # it is known whether that step was the last one before a stop, the end of the
                # budget or a pause: those rows always carry an evaluation.
                with self._step_lock:
                    ending = self._stop.is_set() or self.done
                    pausing = not ending and not self._unpaused.is_set()
                    row = self._emit_pending(final=ending or pausing)
                    if not ending and not pausing:
                        self._pending = self._step_once()
                if bar is not None and row is not None:
                    bar.update(1)
                    if "error" in row:
                        bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4g}", error=f"{row['error']:.4g}",
                                        refresh=False)
                if ending:
                    break
                if pausing:
                    self._status = "paused"
                    self._unpaused.wait()
                    if not self._stop.is_set():
                        self._status = "running"
                elif self._waiters:  # let a thread waiting for a step boundary in (locks are not fair)
                    time.sleep(0.0005)
        except KeyboardInterrupt:
            self._emit_quietly()
            self._record_failure(None, "interrupted")
            raise
        except BaseException as exc:  # noqa: BLE001 - recorded, kept, never silent
            self._emit_quietly()
            self._record_failure(exc, "failed")
            if reraise:
                raise
            return
        finally:
            if bar is not None:
                bar.close()
        with self._step_lock:
            self._finalize("stopped" if self._stop.is_set() else "finished")

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        """One step in the caller's thread (logging included); returns the metrics dict.
        ``race`` interleaves sessions with it (after :meth:`prepare`, ending with :meth:`finish`;
        the step that uses up the budget is evaluated)."""
        if self._status == "failed":
            raise RuntimeError(f"session {self.run_id} failed ({type(self.error).__name__}: {self.error}); "
                               f"continue from its last checkpoint with Session.resume(store, {self.run_id!r})")
        if self.running:
            raise RuntimeError(f"session {self.run_id} is running in a thread; stop() it first")
        self._status = "running"
        with self._step_lock:
            try:
                self._pending = self._step_once()
                return self._emit_pending(final=self.done)
            except BaseException as exc:
                self._emit_quietly()
                self._record_failure(exc, "failed")
                raise

    def _batch_size_at(self, k: int) -> int:
        return self._schedule(k) if self._schedule is not None else self.batch_size

    def _step_once(self) -> tuple[int, dict, list]:
        """The step itself: ``(k, metrics, events)``, not yet evaluated, logged or published."""
        k = self.step + 1
        events = self._take_controls(k)
        m = self._batch_size_at(k)
        t0 = time.perf_counter()
        idx = self._order.take(m)
        x = self.problem.X.index_select(0, idx)
        y = x if self.problem.Y is self.problem.X else self.problem.Y.index_select(0, idx)
        info = self.optimizer.step(x, y)
        if self._avg is not None and not getattr(info, "rejected", False):
            self._avg.update()
        self.wall_time += time.perf_counter() - t0
        self.step = k

        metrics = {k_: v for k_, v in info.as_dict().items() if k_ != "step" and v is not None}
        if not metrics.get("reason"):
            metrics.pop("reason", None)
        metrics["batch_size"] = int(m)
        metrics["wall_time"] = self.wall_time
        # the optimizer's own events (configure, rejected), at this session step
        opt_events = getattr(self.optimizer, "events", [])
        for e in opt_events[self._n_opt_events:]:
            d = dict(e)
            kind, s = d.pop("kind"), d.pop("step")
            if s != k:
                d["opt_step"] = s
            events.append({"step": k, "kind": kind, **_plain(d)})
        self._n_opt_events = len(opt_events)
        return k, metrics, events

    _pending: tuple | None = None

    def _emit_quietly(self) -> None:
        """Emit a pending row without evaluating (on the way to recording a failure)."""
        try:
            self._emit_pending(final=False, evaluate=False)
        except Exception as exc:  # noqa: BLE001 - the failure being recorded matters more
            warnings.warn(f"session {self.run_id}: could not log step {self.step}: {exc!r}", RuntimeWarning, stacklevel=2)

    def _emit_pending(self, final: bool, evaluate: bool = True) -> dict | None:
        """Evaluate (step 1, every ``eval_every``, and ``final``), log, publish and checkpoint the
        pending step; returns its metrics (None if there was none)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        k, metrics, events = pending
        if evaluate and (k == 1 or k % self.eval_every == 0 or final):
            metrics.update(self._evaluate())
        self.last_metrics = metrics
        if k > self._log_floor:
            for e in events:
                e = dict(e)
                self.store.event(self.run_id, e.pop("step"), e.pop("kind"), **e)
            self.store.log(self.run_id, k, **metrics)
        item = {"run_id": self.run_id, "step": k, **metrics}
        if events:
            item["events"] = events
        self._publish(item)
        for cb in list(self._listeners):
            try:
                cb(item)
            except Exception as exc:  # noqa: BLE001 - a UI bug must not stop training
                self._listeners.remove(cb)
                warnings.warn(f"session {self.run_id}: listener {cb!r} raised {exc!r}; removed", RuntimeWarning,
                              stacklevel=2)
                if k > self._log_floor:
                    self.store.event(self.run_id, k, "listener_error", message=f"{type(exc).__name__}: {exc}")
        if self.checkpoints_enabled and self.checkpoint_every and k % self.checkpoint_every == 0:
            self.checkpoint()
        return metrics

    def _evaluate(self) -> dict:
        t0 = time.perf_counter()
        X, Y = self._eval_X, self._eval_Y
        out = self.problem.evaluate(self.model, X, Y)
        if self._avg is not None:
            with self._avg.swap():
                avg = self.problem.evaluate(self.model, X, Y)
            out["error_avg"] = avg["error"]
            out["error_best"] = min(out["error"], avg["error"])
            self._last_error_best = out["error_best"]
        self._last_error = out["error"]
        out["eval_seconds"] = time.perf_counter() - t0
        return out

    @contextlib.contextmanager
    def _between_steps(self):
        """Hold the session between two steps (waits for the step in flight)."""
        self._waiters += 1
        try:
            with self._step_lock:
                yield
        finally:
            self._waiters -= 1

    def evaluate(self) -> dict:
        """The metric now, on the evaluation subset (``{"error", "nll"[, "error_avg", "error_best"]}``);
        waits for the step in flight."""
        with self._between_steps():
            out = self._evaluate()
        out.pop("eval_seconds", None)
        return out

    # ------------------------------------------------------------------ endings
    def finish(self) -> None:
        """End a stretch of :meth:`train_step` calls like ``run`` does: checkpoint, a
        ``"finished"`` event, flush; status ``"finished"``."""
        with self._step_lock:
            self._finalize("finished")

    def _finalize(self, status: str) -> None:
        if self.checkpoints_enabled and self.step > 0 and self._last_checkpoint != self.step:
            self.checkpoint()
        self.store.event(self.run_id, self.step, status, wall_time=self.wall_time)
        self.store.flush(self.run_id)
        self._status = status
        self.store.release(self.run_id, owner=self)  # another process may now resume it
        self._publish({"run_id": self.run_id, "step": self.step, "status": status,
                       "events": [{"step": self.step, "kind": status}]})

    def _record_failure(self, exc: BaseException | None, kind: str) -> None:
        if exc is not None:
            self.error = exc
            self.traceback = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
        self._status = "failed" if kind == "failed" else "stopped"
        step = self.step + 1 if kind == "failed" else self.step
        try:
            details = {"wall_time": self.wall_time}
            if exc is not None:
                details.update(error=type(exc).__name__, message=str(exc)[:2000],
                               traceback=self.traceback[-4000:] if self.traceback else "")
            self.store.event(self.run_id, step, kind, **details)
            self.store.flush(self.run_id)
            self.store.release(self.run_id, owner=self)
        except Exception as store_exc:  # noqa: BLE001 - keep the first error; say what else went wrong
            warnings.warn(f"session {self.run_id}: could not record the {kind} event: {store_exc!r}", RuntimeWarning,
                          stacklevel=2)
        self._publish({"run_id": self.run_id, "step": step, "status": self._status,
                       "events": [{"step": step, "kind": kind}]})

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The session's resumable state (not cloned): ``{"model", "optimizer", "extra"}``."""
        session = {
            "format": _FORMAT, "step": self.step, "wall_time": self.wall_time, "order": self._order.state(),
            "batch_size": self.batch_size, "batch_schedule": self.batch_schedule, "eval_every": self.eval_every,
            "polyak": None if self._avg is None else self._avg.state_dict(),
        }
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "extra": {"session": session}}

    def checkpoint(self) -> int:
        """Flush the rows and save a checkpoint at the current step (also done automatically);
        returns the step."""
        with self._between_steps():
            if self._pending is not None:  # called from another thread right after a step: its row first
                self._emit_pending(final=False)
            st = self.state()
            self.store.flush(self.run_id)
            self.store.save_checkpoint(self.run_id, self.step, st["model"], st["optimizer"], st["extra"],
                                       keep_checkpoints=self.keep_checkpoints, keep_every=self.keep_every)
            self._last_checkpoint = self.step
            return self.step

    def _load_state(self, st: dict) -> None:
        """Load a checkpoint (``state()``'s dict), all or nothing: the session's entries, the model's
        keys, shapes and finiteness, the Polyak average and the optimizer state are all checked
        before the session changes; if the optimizer still refuses, the model is put back."""
        from ..optim.state_check import Checker, check_module_state

        c = Checker(f"Session checkpoint of run {self.run_id!r}" if getattr(self, "run_id", None) else "Session checkpoint",
                    hint="was it saved from another model or problem?")
        c.mapping(st, ("model", "optimizer"), "the checkpoint")
        sess = (st.get("extra") or {}).get("session") if isinstance(st.get("extra") or {}, dict) else None
        if not isinstance(sess, dict) or sess.get("format") != _FORMAT:
            raise ValueError("not a kfac_lab Session checkpoint (extra['session'] missing)")
        c.mapping(sess, ("step", "wall_time", "order", "batch_size", "batch_schedule"), "the session state")
        step = c.integer(sess["step"], "step")
        wall = c.real(sess["wall_time"], "wall_time")
        order = c.mapping(sess["order"], ("epoch", "pos"), "the data order")
        epoch, pos = c.integer(order["epoch"], "the data epoch"), c.integer(order["pos"], "the data position")
        if pos > self.problem.n:
            c.fail(f"the data position {pos} exceeds the {self.problem.n} training cases", c.hint)
        try:
            batch_size = self._check_batch(sess["batch_size"])
        except ValueError as exc:
            c.fail(str(exc), c.hint)
        eval_every = c.integer(sess.get("eval_every", self.eval_every), "eval_every", 1)
        check_module_state(c, self.model, st["model"])
        avg = None
        if sess.get("polyak") is not None:
            from ..optim import PolyakAverage

            pol = c.mapping(sess["polyak"], ("xi",), "the Polyak average")
            try:
                avg = PolyakAverage(self.model, pol["xi"])  # a scratch copy: loaded and checked first
            except (TypeError, ValueError) as exc:
                c.fail(f"the Polyak average: {exc}", "the checkpoint is damaged")
            avg.load_state_dict(sess["polyak"])
        backup = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(st["model"])
        try:
            self.optimizer.load_state_dict(st["optimizer"])  # checked first, all or nothing
        except BaseException:
            self.model.load_state_dict(backup)
            raise
        self.step, self.wall_time = step, wall
        self._order = _Order(self.problem.n, self.seed, self.device, epoch, pos)
        self.batch_size = batch_size
        self.batch_schedule = bool(sess["batch_schedule"])
        self._schedule = self._make_schedule() if self.batch_schedule else None
        self.eval_every = eval_every
        if avg is not None:
            if self._avg is None:
                self._avg = avg
            else:  # keep the object (others may hold it), take the loaded values
                with torch.no_grad():
                    for a, b in zip(self._avg.average, avg.average):
                        a.copy_(b)
                self._avg.xi, self._avg.n_updates = avg.xi, avg.n_updates
            self.polyak = self._avg.xi
        self._n_opt_events = len(getattr(self.optimizer, "events", []))
        self._last_checkpoint = self.step

    @classmethod
    def restore(cls, store, run_id: str, **overrides) -> "Session":
        """Continue run ``run_id`` of ``store`` from its latest checkpoint (the same run id; steps
        continue; see the module docstring for how re-done steps are logged). ``overrides``:
        ``steps``, ``seconds`` (the run's total budget), ``eval_every``, ``eval_cases``,
        ``checkpoint_every``, ``keep_checkpoints``, ``keep_every``, ``device``, ``dtype``,
        ``queue_size``, ``threads``, ``progress``, ``from_step`` (resume from the checkpoint at
        that step instead of the newest intact one) and ``problem`` (required when the run used a
        custom :class:`Problem`). Returns an idle session: call ``run()`` or ``start()``.
        Raises StoreError at once if another writer holds the run."""
        unknown = sorted(set(overrides) - _RESTORE_OVERRIDES)
        if unknown:
            raise ValueError(f"Session.resume: cannot override {unknown}; allowed: {sorted(_RESTORE_OVERRIDES)}")
        store = open_store(store)
        held = run_id in getattr(store, "_locks", {})
        store.claim(run_id)  # refused at once while another process writes the run
        try:
            return cls._restore(store, run_id, overrides)
        except BaseException:
            if not held:
                store.release(run_id)
            raise

    @classmethod
    def _restore(cls, store, run_id: str, overrides: dict) -> "Session":
        from_step = overrides.pop("from_step", None)
        if from_step is not None:
            from_step = cls._check_int("from_step", from_step, 0)
        store.flush(run_id)  # rows this process still buffers for the run count as logged
        problem, optimizer, kw, last = stored_settings(store, run_id, overrides)
        session = cls(problem, optimizer, store, run_id=run_id, _create_run=False, **kw)
        skipped = []
        if from_step is not None:  # exactly that one: damaged or missing is an error
            session._load_state(store.load_checkpoint(run_id, from_step, map_location=session.device))
        elif store.checkpoints(run_id):
            ck = store.load_intact_checkpoint(run_id, map_location=session.device)  # warns per skipped
            skipped = [{"step": s, "reason": r[:500]} for s, r in ck.get("skipped", [])]
            session._load_state(ck)
        from_step = session.step
        session._log_floor = last
        # control events of steps that will be re-done are re-applied at their steps
        for e in store.events(run_id):
            if e["kind"] == "control" and from_step < e["step"] <= last:
                d = {k: v for k, v in e.items() if k not in ("step", "kind")}
                session._replay.setdefault(int(e["step"]), []).append(d)
        store.event(run_id, from_step, "resumed", from_checkpoint=from_step, last_logged_step=last,
                    **({"skipped_checkpoints": skipped} if skipped else {}))
        store.flush(run_id)
        return session

    # ------------------------------------------------------------------ branching
    @classmethod
    def branch(cls, store, run_id: str, from_step: int | None = None, attrs: dict | None = None,
               **overrides) -> "Session":
        """A *new* run (an idle session) starting from a checkpoint of run ``run_id`` — the newest
        intact one, or the one at ``from_step`` — with that run's settings. It only reads
        ``run_id``, so it works while another process is still writing it (what the "being
        written" refusal suggests). The new run's attrs record ``parent_run``/``parent_step``
        and its first event is ``"branched"``. ``overrides``: as for :meth:`restore`."""
        return branch_from_checkpoint(cls, open_store(store), run_id, from_step, attrs, overrides)

    def new_run_from_here(self, store=None, attrs: dict | None = None, **overrides) -> "Session":
        """A new run (an idle session) starting from this one's current parameters, optimizer
        state, data position, step and wall time; its attrs record ``parent_run`` and
        ``parent_step`` (events ``"branched"`` in the child and ``"branch"`` in the parent).
        Safe while running: the state is taken between two steps. ``overrides``: ``steps``,
        ``seconds``, ``eval_every``, ``checkpoint_every``, ``queue_size``, ``threads``, ``progress``."""
        allowed = {"steps", "seconds", "eval_every", "checkpoint_every", "queue_size", "threads", "progress"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"new_run_from_here: cannot override {unknown}; allowed: {sorted(allowed)}")
        with self._between_steps():
            snap = _clone(self.state())
            parent_step = self.step
            options = {**self.optimizer_options, **self._hyper()}  # the live settings now
        kw = dict(seed=self.seed, batch_size=self.batch_size, batch_schedule=False, optimizer_options=options,
                  steps=self.budget_steps, seconds=self.budget_seconds, eval_every=self.eval_every,
                  eval_cases=self.eval_cases, polyak=self.polyak,
                  checkpoint_every=self.checkpoint_every if self.checkpoints_enabled else None,
                  device=self.device, dtype=self.dtype, problem_options=self.problem_options,
                  queue_size=self.queue_size, threads=self.threads, progress=self.progress,
                  keep_checkpoints=self.keep_checkpoints, keep_every=self.keep_every)
        kw.update(overrides)
        child_attrs = {**self.user_attrs, **(attrs or {}), "parent_run": self.run_id, "parent_step": parent_step}
        child = Session(self.problem, self.optimizer_name, self.store if store is None else store, attrs=child_attrs,
                        **kw)
        child._load_state(snap)
        child.store.event(child.run_id, parent_step, "branched", parent_run=self.run_id, parent_step=parent_step)
        self.store.event(self.run_id, parent_step, "branch", child_run=child.run_id)
        return child
