"""The Training lab's logic without a browser: the settings and :class:`TrainingLabApp`.

Start / pause / resume / stop / reset / new run from here / continue a stored run / compare
stored runs, and the live controls (validated; a refused value gives a message and training goes
on). What is shown of the runs — buffers, the hand-over from the training threads, the
``(run, step)`` dataset, status, the λ a slider follows — is a
:class:`~kfac_lab.lab.monitor.RunMonitor`, the model the Jupyter widget uses too; the page is
:mod:`kfac_lab.dashboards.training_lab`.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from typing import Any

import param

from .. import checks
from .. import store as _store  # noqa: F401 - imported first, so its atexit flush runs after ours
from ..lab.controls import APPROX, KFAC_PRESETS, LR_MODES, LiveControls
from ..lab.monitor import RunMonitor
from ..lab.runs import RunBuffer, stored_buffer
from .common import open_store

__all__ = ["TrainingSettings", "TrainingLabApp", "PROBLEMS", "OPTIMIZERS", "DEFAULT_STEPS"]

log = logging.getLogger(__name__)

PROBLEMS = {
    "MNIST autoencoder (paper)": "mnist",
    "CURVES autoencoder (paper)": "curves",
    "Figure-1 classifier (16×16)": "figure1",
    "MNIST small (lecture speed)": "mnist-small",
    "Tiny (8×8 digits, fastest)": "tiny",
}
#: The optimizer menus: K-FAC from the λ box's λ₀ (the paper's 150 unless changed), or with λ₀
#: chosen from the first batch (``damping="auto"``, optim/initial_damping.py), and the baselines.
OPTIMIZERS = {**{label: key for key, (label, _) in KFAC_PRESETS.items()}, "SGD-Nesterov": "sgd", "Adam": "adam"}
#: legend names of runs (a K-FAC run's λ₀ is the λ box's, so not "150" in general)
OPT_LABEL = {"kfac": "K-FAC", "kfac-auto": "K-FAC (auto λ₀)", "sgd": "SGD-Nesterov", "adam": "Adam"}
#: Default step budget of a Start, per problem (0 = until stopped).
DEFAULT_STEPS = {"mnist": 300, "curves": 300, "figure1": 500, "mnist-small": 500, "tiny": 3000}

_LIVE_LABS: "weakref.WeakSet[TrainingLabApp]" = weakref.WeakSet()


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
    seed = param.Integer(default=0, bounds=(0, checks.SEED_MAX))  # torch.manual_seed's range
    steps = param.Integer(default=500, bounds=(0, None), doc="steps per Start (0: until stopped)")
    eval_every = param.Integer(default=10, bounds=(1, None), doc="evaluate the training error every … steps")
    # live controls (K-FAC)
    damping = param.Number(default=150.0, bounds=(0, None), inclusive_bounds=(False, True), doc="λ")
    adapt_damping = param.Boolean(default=True, doc="Levenberg–Marquardt adaptation of λ")
    approx = param.Selector(default="blockdiag", objects=list(APPROX.values()))
    momentum = param.Boolean(default=True, doc="α and μ from the quadratic model (off: α only)")
    lr_mode = param.Selector(default="adaptive", objects=list(LR_MODES.values()))
    lr = param.Number(default=0.1, bounds=(0, None), inclusive_bounds=(False, True), doc="fixed α when lr_mode='fixed'")
    # view
    metric = param.Selector(default="error", objects=["error", "loss"])
    log_y = param.Boolean(default=True)
    compare = param.List(default=[], item_type=str, doc="stored run ids drawn with the live runs")

    def live(self) -> LiveControls:
        """The live controls as set here (their checks and rules are :class:`LiveControls`')."""
        live = LiveControls(self.damping, self.adapt_damping, self.approx, self.momentum)
        live.lr_mode, live.lr = self.lr_mode, float(self.lr)
        return live

    def kfac_options(self) -> dict:
        """The K-FAC options a new session starts with."""
        return self.live().kfac_options()


# --------------------------------------------------------------------------- the app object
class TrainingLabApp:
    """The Training lab's logic without a browser.

    >>> lab = TrainingLabApp(store="runs/lab.zarr", problem="tiny")  # doctest: +SKIP
    >>> lab.start(); lab.set_control("approx", "tridiag"); lab.poll()
    >>> lab.buffers[lab.sessions[0].run_id].events                   # the control event, at its step

    ``store``: a Store or a path (default: the lab store, :func:`~kfac_lab.dashboards.common.open_store`).
    Methods never raise for user mistakes: they return ``False`` and put a message in
    :attr:`messages` under the control's name (``"damping"``, ``"start"`` …). What it shows of
    the runs is :attr:`monitor` (``buffers``, ``version`` … are its).
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
        self.monitor = RunMonitor()              # the live runs' rows (current and earlier), status
        self.messages: dict[str, str] = {}
        self.notice = ""
        self._compare_cache: dict[str, tuple[int, RunBuffer]] = {}
        self.closed = False
        _LIVE_LABS.add(self)

    # -- the monitor's view of the runs --------------------------------------------
    @property
    def buffers(self) -> dict[str, RunBuffer]:
        """run_id → rows received (the live runs, current and earlier)."""
        return self.monitor.buffers

    @property
    def version(self) -> int:
        """Bumps when anything drawable changed."""
        return self.monitor.version

    @property
    def structure(self) -> int:
        """Bumps when runs or events changed (a figure rebuild)."""
        return self.monitor.structure

    @property
    def metric_versions(self) -> dict[str, int]:
        return self.monitor.metric_versions

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

    @staticmethod
    def menu_value(session) -> str:
        """The optimizer menu's value of a session (``"kfac-auto"`` for K-FAC with ``damping="auto"``)."""
        cfg = getattr(session.optimizer, "config", None)
        return "kfac-auto" if getattr(cfg, "damping", None) == "auto" else session.optimizer_name

    def _session(self, optimizer: str, threads: int | None):
        from ..train import Session

        s = self.settings
        name = "kfac" if optimizer in KFAC_PRESETS else optimizer
        # the paper preset starts from the λ box's λ₀ (150 unless changed); "auto" from the probe's
        extra = {"damping": "auto"} if optimizer == "kfac-auto" else {}
        opts = {**s.kfac_options(), **extra} if name == "kfac" else {}
        return Session(problem=s.problem, optimizer=name, store=self.store, seed=int(s.seed),
                       optimizer_options=opts, eval_every=int(s.eval_every), checkpoint_every=100,
                       threads=threads, attrs={"source": "training_lab"})

    def _track(self, session) -> None:
        self.monitor.track(session, self.label(self.menu_value(session), session.run_id))

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
            same = [(x.problem.name, self.menu_value(x), x.seed) for x in self.sessions] == [
                (s.problem, o, int(s.seed)) for o in opts]
            if same and all(x.status in ("finished", "stopped") for x in self.sessions):
                for sess in self.sessions:  # the same setup again: more steps on the same runs
                    sess.start(steps=self._budget())
                self.notice = f"continuing for {self.settings.steps or 'unlimited'} more steps"
                self.monitor.changed()
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
        self.monitor.changed()
        return bool(self.sessions)

    def resume(self) -> bool:
        for sess in self.sessions:
            if sess.running:
                sess.unpause()
        self.monitor.changed()
        return bool(self.sessions)

    def stop(self, wait: bool = False) -> bool:
        """Stop at the next step boundary (the run is checkpointed and flushed)."""
        for sess in self.sessions:
            sess.stop(wait=wait)
        self.monitor.changed()
        return bool(self.sessions)

    def reset(self) -> bool:
        """Stop the live runs and clear the plots (the runs stay in the store, to compare)."""
        sessions, self.sessions = self.sessions, []
        _stop_in_background(sessions)
        self.monitor.clear()
        self.notice = "reset — earlier runs are in the store (Compare)"
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
            pending = self.monitor.take_pending(sess.run_id)
            if pending:  # set on the parent but not applied before the branch: the child gets them
                try:
                    child.set(**pending)
                except (ValueError, RuntimeError) as exc:
                    self.messages["branch"] = f"controls not carried over: {exc}"
        _stop_in_background(self.sessions)
        self.sessions = [c for c, _ in children]
        for child, was_running in children:
            self._track(child)
            self.buffers[child.run_id].add_events([{"step": child.step, "kind": "branched"}])
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
            self.monitor.add(buf.copy())
        self._track(sess)
        sess.start(steps=self._budget())
        self.notice = f"continuing {run_id}"
        return True

    # -- live controls -------------------------------------------------------------
    def set_control(self, name: str, value: Any) -> bool:
        """Set a live control (see :data:`~kfac_lab.lab.controls.LIVE_CONTROLS`, plus ``lr_mode``) in
        the settings and in every running K-FAC session (applied at its next step boundary,
        recorded as a "control" event). A refused value leaves everything as it was and puts the
        reason in ``messages[name]``; training goes on."""
        self.messages.pop(name, None)
        live = self.settings.live()
        try:
            live.change(name, value, send=self._send)
        except (ValueError, RuntimeError) as exc:
            self.messages[name] = str(exc)
            return False
        self.settings.param.update(**{name: getattr(live, name)})
        if not self._kfac_sessions():
            self.notice = f"{name} = {getattr(live, name)} applies when K-FAC training starts"
        self.monitor.changed()
        return True

    def _send(self, changes: dict) -> None:
        """Hand checked settings to every K-FAC session (each checks them too, and may refuse)."""
        for sess in self._kfac_sessions():
            sess.set(**changes)
            self.monitor.sent(sess, changes)

    def _kfac_sessions(self) -> list:
        return [s for s in self.sessions if s.optimizer_name == "kfac" and s.status != "failed"]

    def live_damping(self) -> float | None:
        """The λ the (first) K-FAC run has reached — what the λ slider follows while adaptive λ
        is on — or None (see :meth:`RunMonitor.live_damping`)."""
        kfac = self._kfac_sessions()
        return self.monitor.live_damping(kfac[0] if kfac else None, self.settings.adapt_damping)

    # -- the hand-over from the training threads ---------------------------------------------
    def poll(self, limit: int = 5000) -> bool:
        """Drain the live sessions' update queues into the buffers (call on the UI's loop).
        Returns whether anything new arrived."""
        return self.monitor.poll(self.sessions, limit)

    def rate(self, session) -> float:
        """Steps per second of ``session`` since it started (or was last tracked)."""
        return self.monitor.rate(session)

    def saved_step(self, session) -> int:
        """The last step of ``session`` committed to the store (rows still buffered excluded)."""
        try:
            return max(0, session.step - self.store.pending(session.run_id))
        except Exception:  # noqa: BLE001
            return 0

    # -- what to draw --------------------------------------------------------------------------
    def _load_stored(self, run_id: str) -> RunBuffer | None:
        try:
            opt = str(self.store.runs().loc[run_id, "optimizer"])
        except Exception:  # noqa: BLE001 - the load below says what is wrong
            opt = "?"
        try:
            return stored_buffer(self.store, run_id, self.label(opt, run_id) + " (stored)")
        except Exception as exc:  # noqa: BLE001
            self.messages["compare"] = f"cannot load {run_id}: {exc}"
            return None

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
        self.monitor.changed(structure=True)

    def dataset(self):
        """Everything to draw: live runs then compared runs, as a Dataset over ``(run, step)``,
        and their events."""
        return self.monitor.dataset(extra=self.compare_buffers())

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


