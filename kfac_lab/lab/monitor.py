"""The runs a training lab watches: what the training threads hand over, what the user set
that a run has not taken yet, and the status line of each run.

A :class:`RunMonitor` is the model both training labs (the Panel page and the Jupyter widget)
are views of. Training threads only put one metric dict per step on their session's bounded
``updates`` queue; the view's own thread calls :meth:`RunMonitor.poll`, which moves them into
per-run :class:`~kfac_lab.lab.runs.RunBuffer` s. The monitor is not locked: one thread at a time
(the page's event loop; the widget's lock).
"""
from __future__ import annotations

import math
import queue
from dataclasses import dataclass

from .runs import RunBuffer, runs_dataset

__all__ = ["RunMonitor", "RunStatus"]


def _finite(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


@dataclass(frozen=True)
class RunStatus:
    """What a lab says about one run: ``text`` (``status · step … · steps/s · s · error · λ ·
    approximation``), ``footnote`` (its id and the last step committed to the store) and
    ``failure`` (the error that ended it, or ``""``)."""

    label: str
    text: str
    footnote: str
    failure: str = ""


class RunMonitor:
    """Buffers, pending controls, rates and status of the runs a lab shows.

    - :meth:`track` a session (its buffer is created, labelled), :meth:`poll` the tracked
      sessions' queues, :meth:`dataset` for the figures;
    - :meth:`sent` records controls handed to a session; they are *pending* until a ``control``
      event of that run shows them applied; :meth:`live_damping` is the λ a λ slider follows.

    ``version`` bumps whenever anything drawable changed, ``structure`` when runs or events did
    (a figure rebuild), ``metric_versions[m]`` when a finite ``m`` (``"error"``, ``"loss"``) arrived.
    """

    def __init__(self):
        self.buffers: dict[str, RunBuffer] = {}   # run_id -> rows received
        self.order: list[str] = []                 # run ids in the order they appeared
        self.version = 0
        self.structure = 0
        self.metric_versions: dict[str, int] = {}
        self._pending: dict[str, dict] = {}        # run_id -> controls sent, not yet seen applied
        self._rates: dict[str, tuple[int, float]] = {}  # run_id -> (step, training seconds) when tracked

    # -- runs ------------------------------------------------------------------------------
    def track(self, session, label: str) -> RunBuffer:
        """Watch ``session`` (its buffer is kept if it was watched before); its steps/s count from now."""
        rid = session.run_id
        if rid not in self.buffers:
            self.add(RunBuffer(rid, label, session.optimizer_name))
        self._rates[rid] = (session.step, session.wall_time)
        self.changed(structure=True)
        return self.buffers[rid]

    def add(self, buffer: RunBuffer) -> RunBuffer:
        """Show a buffer (e.g. a stored run's rows, continued live)."""
        if buffer.run_id not in self.buffers:
            self.order.append(buffer.run_id)
        self.buffers[buffer.run_id] = buffer
        self.changed(structure=True)
        return buffer

    def clear(self) -> None:
        self.buffers.clear()
        self.order.clear()
        self._pending.clear()
        self.changed(structure=True)

    def changed(self, structure: bool = False) -> None:
        self.version += 1
        self.structure += bool(structure)

    # -- the hand-over from the training threads ------------------------------------------
    def poll(self, sessions, limit: int = 5000) -> bool:
        """Drain the sessions' update queues into their buffers (at most ``limit`` items each);
        returns whether anything arrived."""
        new = False
        for sess in sessions:
            buf = self.buffers.get(sess.run_id)
            if buf is None:
                continue
            pending = self._pending.get(sess.run_id)
            for _ in range(limit):
                try:
                    item = sess.updates.get_nowait()
                except queue.Empty:
                    break
                new = True
                if pending:
                    for e in item.get("events", ()) or ():
                        if e.get("kind") == "control":
                            for k in e:
                                pending.pop(k, None)
                n_events = len(buf.events)
                buf.add(item)
                if len(buf.events) != n_events:
                    self.structure += 1
                for m in ("error", "loss"):
                    if _finite(item.get(m)) is not None:
                        self.metric_versions[m] = self.metric_versions.get(m, 0) + 1
        if new:
            self.version += 1
        return new

    # -- controls ---------------------------------------------------------------------------
    def sent(self, session, changes: dict) -> None:
        """``changes`` were handed to ``session.set``: pending until the run applies them."""
        self._pending.setdefault(session.run_id, {}).update(changes)

    def take_pending(self, run_id: str) -> dict:
        """The controls sent to ``run_id`` and not applied (e.g. to carry over to a branch)."""
        return self._pending.pop(run_id, {})

    def live_damping(self, session, adapt: bool = True) -> float | None:
        """The λ ``session`` has reached — what the λ controls follow while adaptive λ (``adapt``)
        is on — or None: adaptation off, no step yet, or a λ the user set that the optimizer has
        not taken yet (the user's value stands until then; adaptation goes on from it)."""
        if not adapt or session is None or "damping" in self._pending.get(session.run_id, {}):
            return None
        buf = self.buffers.get(session.run_id)
        lam = _finite(buf.last.get("damping")) if buf is not None else None
        return lam if lam is not None and lam > 0 else None

    # -- what to show -----------------------------------------------------------------------
    def dataset(self, run_ids=None, extra: list[RunBuffer] = (), with_empty: bool = False, attrs=None,
                decimate: bool = True):
        """``(Dataset over (run, step), events)`` of the buffers ``run_ids`` (default: all, in order)
        and ``extra`` ones (stored runs to compare), decimated for display (unless ``decimate=False``);
        ``(None, [])`` when no run has a row (``with_empty``: keep runs without rows, for figures
        with a line per run from the start)."""
        ids = self.order if run_ids is None else run_ids
        bufs = [self.buffers[r] for r in ids if r in self.buffers] + list(extra)
        if not with_empty:
            bufs = [b for b in bufs if b.n]
        if not bufs:
            return None, []
        return runs_dataset(bufs, attrs, decimate), [e for b in bufs for e in b.events]

    def rate(self, session) -> float:
        """Steps per training second of ``session`` since it was tracked (paused time and the
        time after a stop do not count: a stopped run keeps the rate it had)."""
        k0, t0 = self._rates.get(session.run_id, (0, 0.0))
        dt = session.wall_time - t0
        return (session.step - k0) / dt if dt > 0 else 0.0

    def status(self, session, store=None) -> RunStatus:
        """The status of a tracked ``session``, one text for every lab."""
        buf = self.buffers.get(session.run_id)
        label = buf.label if buf is not None else session.run_id
        bits = [str(session.status), f"step {session.step}", f"{self.rate(session):.1f} steps/s",
                f"{session.wall_time:.1f} s"]
        err = _finite(session.summary().get("error"))
        bits.append(f"error {err:.4g}" if err is not None else "error —")
        lam = _finite((session.last_metrics or {}).get("damping"))
        if lam is not None:
            bits.append(f"λ {lam:.3g}")
        cfg = getattr(session.optimizer, "config", None)
        if cfg is not None and hasattr(cfg, "approx"):
            bits.append(f"{cfg.approx}, momentum {'on' if cfg.momentum else 'off'}")
        saved = 0
        if store is not None:
            try:
                saved = max(0, session.step - store.pending(session.run_id))
            except Exception:  # noqa: BLE001 - a store being closed: say 0
                saved = 0
        error = session.error
        failure = f"{type(error).__name__}: {error}" if error is not None else ""
        return RunStatus(label, " · ".join(bits), f"run {session.run_id} · saved to step {saved}", failure)
