"""Live settings, the one mechanism every optimizer of the lab uses (K-FAC, the preconditioner,
the baselines): ``validate(**changes)`` checks changes in the caller's thread and changes
nothing; ``configure(**changes)`` validates and queues them; the optimizer applies the queue at
its next step boundary (``_apply_pending``) under one lock and records ONE ``"configure"``
event ``{"step", "kind": "configure", **changed}`` per applied change set in ``events``.

An optimizer inherits :class:`LiveSettings`, lists the names that may change while it trains
in ``live_settings``, and supplies four hooks:

* ``_check_settings(merged, changes)``: the checked (converted) values of ``changes``, given
  ``merged`` = the queued changes with ``changes`` over them; raises ``TypeError`` (wrong type,
  naming the setting) or ``ValueError`` (out of range, a bad combination);
* ``_apply_settings(changes)``: put the checked changes into effect; returns those to record;
* ``settings()``: every current setting by name (a copy);
* ``_next_step()``: the 1-based number of the step about to run (the event's ``step``).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from .. import checks

__all__ = ["LiveSettings"]


def _recordable(value):
    """Event values are plain (the store keeps them): callables and optimizers as their repr."""
    return value if value is None or isinstance(value, (bool, int, float, str, tuple, list)) else repr(value)


class LiveSettings(ABC):
    """Thread-safe live settings: validated now, applied at the next step boundary, one event."""

    live_settings: tuple[str, ...] = ()
    #: old spellings accepted by ``validate`` / ``configure`` for one release: ``{old: new}``
    renamed_settings: dict[str, str] = {}

    def _init_live(self) -> None:
        self.events: list[dict] = []
        self._live_lock = threading.Lock()
        self._pending: dict = {}

    # -- the public API ------------------------------------------------------------------------------
    def validate(self, **changes) -> dict:
        """The checked values of ``changes`` (with the changes already queued by ``configure``);
        raises ``TypeError`` naming a setting of the wrong type and ``ValueError`` for a value
        out of range, a bad combination or a setting that cannot change live. Changes nothing."""
        with self._live_lock:
            return self._validated(changes)

    def configure(self, **changes) -> None:
        """Change settings from any thread: validated now (as ``validate``), applied together at the
        start of the next step and recorded there as one ``"configure"`` event."""
        with self._live_lock:
            self._pending.update(self._validated(changes))

    def pending(self) -> dict:
        """The changes queued for the next step boundary (a copy)."""
        with self._live_lock:
            return dict(self._pending)

    @abstractmethod
    def settings(self) -> dict:
        """Every current setting by name (a copy)."""

    # -- for the optimizer -------------------------------------------------------------------------------
    def _validated(self, changes: dict) -> dict:
        changes = self._current_names(changes)
        not_live = set(changes) - set(self.live_settings)
        if not_live:
            unknown = sorted(not_live - set(self.settings()))
            what = f"unknown setting(s) {unknown}" if unknown else f"{sorted(not_live)} cannot change during training"
            raise ValueError(f"{type(self).__name__}: {what}; live settings: {list(self.live_settings)}")
        return self._check_settings({**self._pending, **changes}, changes)

    def _apply_pending(self) -> None:
        """At a step boundary: apply the queued changes, record them as one event at this step."""
        with self._live_lock:
            changes, self._pending = self._pending, {}
            if not changes:
                return
            recorded = self._apply_settings(changes)
            if recorded:
                self._event("configure", self._next_step(), **{k: _recordable(v) for k, v in recorded.items()})

    def _current_names(self, changes: dict) -> dict:
        """``changes`` with deprecated names replaced (a ``DeprecationWarning`` for each)."""
        out = {}
        for k, v in changes.items():
            new = self.renamed_settings.get(k)
            if new is not None:
                checks.renamed(type(self).__name__, k, new, v, changes.get(new), stacklevel=5,
                               why="each name has one meaning across kfac_lab")
            out[new or k] = v
        return out

    def _set_pending(self, pending: dict) -> None:
        """Replace the queue (loading a checkpoint)."""
        with self._live_lock:
            self._pending = dict(pending)

    def _event(self, kind: str, step: int, **details) -> None:
        """``events`` entries: ``{"step", "kind", **details}``."""
        self.events.append({"step": int(step), "kind": kind, **details})

    @abstractmethod
    def _next_step(self) -> int:
        """The 1-based number of the step about to run."""

    @abstractmethod
    def _check_settings(self, merged: dict, changes: dict) -> dict:
        """The checked values of ``changes`` (``merged``: the queue with ``changes`` over it)."""

    @abstractmethod
    def _apply_settings(self, changes: dict) -> dict:
        """Put checked changes into effect (under the lock, at a step boundary); return those to record."""
