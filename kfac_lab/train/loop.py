"""The training loop of a Session: steps in this thread or a background one, pause and stop at a
step boundary, live controls applied there, rows evaluated, logged and handed to the UI.

:class:`TrainingLoop` is the part of :class:`~kfac_lab.train.Session` that runs; the session
builds the problem, model, optimizer, store and state it runs on (the threading rules are in
``session.py``'s docstring). A step's row is emitted at the *next* boundary, where it is known
whether that step was the last before a stop, the end of the budget or a pause: those rows
always carry an evaluation.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time
import traceback as tb
import warnings
from typing import Any, Callable

import torch

__all__ = ["TrainingLoop", "plain"]


def plain(v):
    """Event details / attrs: JSON-able plain values."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    return repr(v)


class TrainingLoop:
    """Running a Session: ``start``/``run``/``train_step``, ``pause``/``unpause``/``stop``/``join``,
    ``subscribe``, and the step itself. Mixed into :class:`Session`, whose ``__init__`` sets the
    state used here."""

    _pending: tuple | None = None  # the step whose row is not emitted yet: (k, metrics, events)

    def _init_loop(self, queue_size: int) -> None:
        self.updates: queue.Queue = queue.Queue(maxsize=queue_size)
        self.dropped_updates = 0
        self._listeners: list[Callable[[dict], Any]] = []
        self._step_lock = threading.RLock()
        self._waiters = 0              # other threads waiting for a step boundary (the loop yields to them)
        self._stop = threading.Event()
        self._unpaused = threading.Event()
        self._unpaused.set()
        self._thread: threading.Thread | None = None
        self._in_run = False
        self._target_step: int | None = None
        self._target_wall: float | None = None

    # ------------------------------------------------------------------ pause / stop / join
    def pause(self) -> None:
        """Pause at the next step boundary (the step in flight finishes)."""
        self._unpaused.clear()

    def unpause(self) -> None:
        """Continue after :meth:`pause`."""
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

    @property
    def running(self) -> bool:
        """A ``run()`` or background thread is active (possibly paused)."""
        return self._in_run or (self._thread is not None and self._thread.is_alive())

    @contextlib.contextmanager
    def _between_steps(self):
        """Hold the session between two steps (waits for the step in flight)."""
        self._waiters += 1
        try:
            with self._step_lock:
                yield
        finally:
            self._waiters -= 1

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
    def _refuse_if_failed(self) -> None:
        if self._status == "failed":
            raise RuntimeError(f"session {self.run_id} failed ({type(self.error).__name__}: {self.error}); "
                               f"continue from its last checkpoint with Session.restore(store, {self.run_id!r})")

    def start(self, steps: int | None = None, seconds: float | None = None):
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
        self._refuse_if_failed()
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

            bar = tqdm(total=self._target_step, initial=self.step, unit="step",
                       desc=f"{self.optimizer_name} {self.problem.name}", dynamic_ncols=True, leave=True)
        try:
            while True:
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

    def train_step(self) -> dict:
        """One step in the caller's thread (logging included); returns the metrics dict.
        ``race`` interleaves sessions with it (after :meth:`prepare`, ending with :meth:`finish`;
        the step that uses up the budget is evaluated)."""
        self._refuse_if_failed()
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

    # ------------------------------------------------------------------ one step
    def _step_once(self) -> tuple[int, dict, list]:
        """The step itself: ``(k, metrics, events)``, not yet evaluated, logged or published."""
        k = self.step + 1
        events = self._apply_controls(k)
        m = self._schedule(k) if self._schedule is not None else self.batch_size
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
            events.append({"step": k, "kind": kind, **plain(d)})
        self._n_opt_events = len(opt_events)
        return k, metrics, events

    def _apply_controls(self, k: int) -> list[dict]:
        """At the boundary before step ``k``: apply the queued controls (and, while re-doing steps
        after a resume, the stored ones); return the events to record."""
        replay, controls = self._controls.take(k)
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
                events.append({"step": k, "kind": "control_rejected", "message": str(exc), **plain(merged)})
        events += [{"step": k, "kind": "control", **plain(c)} for c in controls]
        return events

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
