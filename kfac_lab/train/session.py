"""``Session``: one optimizer on one problem, logged step by step to a Store, with live controls.

    >>> from kfac_lab.train import Session
    >>> s = Session("tiny", "kfac", store="runs/lab.zarr")      # doctest: +SKIP
    >>> s.run(steps=100)                   # in this thread (progress=True for a tqdm bar)
    >>> s.start(steps=1000)                # or in a background thread
    >>> s.set(damping=30.0, approx="tridiag", momentum=False)   # applied at the next step
    >>> s.pause(); s.unpause(); s.stop()
    >>> s2 = Session.restore("runs/lab.zarr", s.run_id, steps=2000)   # after a crash or a stop

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
* **Restoring** (``Session.restore(store, run_id, **overrides)``)
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

The pieces: ``order.py`` (the data order), ``controls.py`` (changes waiting for a step),
``loop.py`` (running: threads, pause, stop, the step, logging), ``checkpointing.py`` (what a
checkpoint holds, writing and loading it), ``stored.py`` (restoring and branching stored runs).
``Session.resume`` and ``session.resume()`` are deprecated spellings of ``Session.restore`` and
``session.unpause()`` (a ``DeprecationWarning``; removed in the next release).
"""
from __future__ import annotations

import math
import os
import time
import uuid
import warnings

import torch
from torch import nn

from .. import checks
from .checkpointing import load_session_state, save_checkpoint, session_state
from .controls import SESSION_CONTROLS, ControlQueue
from .loop import TrainingLoop, plain
from .order import DataOrder
from .problems import Problem, canonical_optimizer, get_problem
from .stored import branch_from_checkpoint, branch_from_session, restore_run

__all__ = ["Session", "STATUSES", "SESSION_CONTROLS", "make_optimizer", "open_store"]

STATUSES = ("idle", "running", "paused", "stopped", "finished", "failed")
_EVAL_SEED = 20150302  # the fixed evaluation subset: the same for every run of a problem


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


class _DeprecatedResume:
    """The old name ``resume``, kept for one release: on the class (``Session.resume(store,
    run_id, ...)``) it is :meth:`Session.restore`; on an instance without arguments
    (``session.resume()``) it is :meth:`Session.unpause` (with arguments, ``restore`` again, as
    before). Either way a ``DeprecationWarning`` names the new spelling."""

    def __get__(self, obj, cls):
        if obj is None:
            def resume(*args, **kwargs):
                warnings.warn("Session.resume(store, run_id, ...) is deprecated; use Session.restore(store, run_id, "
                              "...) (the alias goes in the next release)", DeprecationWarning, stacklevel=2)
                return cls.restore(*args, **kwargs)

            resume.__doc__ = cls.restore.__doc__
            return resume

        def resume(*args, **kwargs):
            if args or kwargs:
                warnings.warn("session.resume(store, run_id, ...) is deprecated; use Session.restore(store, run_id, "
                              "...) (the alias goes in the next release)", DeprecationWarning, stacklevel=2)
                return cls.restore(*args, **kwargs)
            warnings.warn("session.resume() is deprecated; use session.unpause() (the alias goes in the next "
                          "release)", DeprecationWarning, stacklevel=2)
            return obj.unpause()

        resume.__doc__ = cls.unpause.__doc__
        return resume


# ------------------------------------------------------------------------------ Session
class Session(TrainingLoop):
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

    resume = _DeprecatedResume()  # deprecated: Session.restore / session.unpause

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
        self._order = DataOrder(n, self.seed, self.device)
        self._status = "idle"
        self.error: BaseException | None = None
        self.traceback: str | None = None
        self.last_metrics: dict = {}
        self._controls = ControlQueue()
        self._init_loop(self.queue_size)
        self._n_opt_events = len(getattr(self.optimizer, "events", []))
        self._log_floor = 0            # steps <= this are already in the store (restore): not re-logged
        self._last_checkpoint = -1

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
            return plain(opt.config.as_dict())
        if hasattr(opt, "hyper"):
            return plain({k: v for k, v in opt.hyper.items() if not callable(v)})
        return {}

    def _run_attrs(self) -> dict:
        from .. import __version__

        p = self.problem
        attrs = {
            "problem": p.name, "problem_description": p.describe(), "problem_params": plain(p.params),
            "problem_options": plain(self.problem_options), "n": p.n, "loss": p.loss,
            "optimizer": self.optimizer_name, "optimizer_options": plain(self.optimizer_options),
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
        attrs.update(plain(self.user_attrs))
        return attrs

    # ------------------------------------------------------------------ status
    @property
    def status(self) -> str:
        """``"idle"``, ``"running"``, ``"paused"``, ``"stopped"``, ``"finished"`` or ``"failed"``."""
        return self._status

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
        self._refuse_if_failed()
        own = {k: v for k, v in changes.items() if k in SESSION_CONTROLS}
        rest = {k: v for k, v in changes.items() if k not in SESSION_CONTROLS}
        if "batch_size" in own:
            own["batch_size"] = self._check_batch(own["batch_size"])
        if "eval_every" in own:
            own["eval_every"] = self._check_int("eval_every", own["eval_every"], 1)
        self._controls.submit(own, rest, self._validate_optimizer)

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

    # ------------------------------------------------------------------ evaluation
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

    def evaluate(self) -> dict:
        """The metric now, on the evaluation subset (``{"error", "nll"[, "error_avg", "error_best"]}``);
        waits for the step in flight."""
        with self._between_steps():
            out = self._evaluate()
        out.pop("eval_seconds", None)
        return out

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> dict:
        """The session's resumable state (not cloned): ``{"model", "optimizer", "extra"}``."""
        return session_state(self)

    def checkpoint(self) -> int:
        """Flush the rows and save a checkpoint at the current step (also done automatically);
        returns the step."""
        with self._between_steps():
            if self._pending is not None:  # called from another thread right after a step: its row first
                self._emit_pending(final=False)
            return save_checkpoint(self)

    def _load_state(self, st: dict) -> None:
        """Load a checkpoint (``state()``'s dict), all or nothing (see :func:`load_session_state`)."""
        load_session_state(self, st)

    # ------------------------------------------------------------------ stored runs and branches
    @classmethod
    def restore(cls, store, run_id: str, **overrides) -> "Session":
        """Continue run ``run_id`` of ``store`` from its newest intact checkpoint (the same run id;
        steps continue; see the module docstring for how re-done steps are logged). ``overrides``:
        ``steps``, ``seconds`` (the run's total budget), ``eval_every``, ``eval_cases``,
        ``checkpoint_every``, ``keep_checkpoints``, ``keep_every``, ``device``, ``dtype``,
        ``queue_size``, ``threads``, ``progress``, ``from_step`` (restore from the checkpoint at
        that step instead of the newest intact one) and ``problem`` (required when the run used a
        custom :class:`Problem`). Returns an idle session: call ``run()`` or ``start()``.
        Raises StoreError at once if another writer holds the run. (Formerly ``Session.resume``.)"""
        return restore_run(cls, open_store(store), run_id, overrides)

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
        return branch_from_session(self, store, attrs, overrides)
