"""Live controls between two threads: the changes ``Session.set`` accepted, waiting for a step.

A caller's thread :meth:`~ControlQueue.submit`\\ s a change (validated against every change still
pending, so two settings that are fine alone but not together are refused at once); the training
thread :meth:`~ControlQueue.take`\\ s them at the boundary before step ``k``, together with the
changes a resumed run re-applies at the steps it re-does (:meth:`~ControlQueue.replay_events`).
Applying them is the session's business; this module only keeps them, in order, under a lock.
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable

__all__ = ["ControlQueue", "SESSION_CONTROLS"]

#: Settings ``Session.set`` handles itself (everything else goes to the optimizer).
SESSION_CONTROLS = ("batch_size", "eval_every")


class ControlQueue:
    """Changes waiting for the next step boundary (thread-safe), and stored ones to replay."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queued: list[dict] = []
        self._replay: dict[int, list[dict]] = {}

    def submit(self, own: dict, rest: dict, validate: Callable[[dict, dict], dict] | None = None) -> None:
        """Queue one change: ``own`` (session settings, already checked) and ``rest`` (optimizer
        settings). ``validate(merged, new)`` — ``merged`` being every optimizer setting still
        pending with ``rest`` over them — returns the checked ``rest`` or raises; it runs under
        the lock, so nothing queued in between escapes it. A refused change queues nothing."""
        with self._lock:
            if rest and validate is not None:
                rest = validate({**self.pending_optimizer_settings(), **rest}, rest)
            self._queued.append({**own, **rest})

    def pending_optimizer_settings(self) -> dict:
        """The optimizer settings queued and not yet taken, the later over the earlier."""
        merged: dict = {}
        for change in self._queued:
            merged.update({k: v for k, v in change.items() if k not in SESSION_CONTROLS})
        return merged

    def replay_events(self, events: Iterable[dict], after: int, upto: int) -> None:
        """Re-apply the stored ``"control"`` events of steps ``after < step <= upto`` at their
        steps (a resumed run re-doing those steps follows the logged ones)."""
        for e in events:
            if e["kind"] == "control" and after < e["step"] <= upto:
                change = {k: v for k, v in e.items() if k not in ("step", "kind")}
                self._replay.setdefault(int(e["step"]), []).append(change)

    def take(self, k: int) -> tuple[list[dict], list[dict]]:
        """At the boundary before step ``k``: ``(replayed, queued)`` — the stored changes of step
        ``k`` and everything submitted since the last call, each in order. Both are now gone."""
        with self._lock:
            queued, self._queued = self._queued, []
        replayed = self._replay.pop(k, []) if self._replay else []
        return replayed, queued

    def __len__(self) -> int:
        return len(self._queued)
