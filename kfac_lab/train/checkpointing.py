"""A Session's checkpoint: what it holds, writing it to the store, and loading it all or nothing.

A checkpoint is ``{"model", "optimizer", "extra": {"session": …}}``: the model's state dict, the
optimizer's (its RNG included) and the session's own entries — step, wall time, data-order
position, batch size and schedule, ``eval_every`` and the Polyak average. The store keeps it
(``Store.save_checkpoint``: weights-only bytes with a SHA-256, retention applied); loading checks
every entry before the session changes (see ``docs/reliability.md``).
"""
from __future__ import annotations

import copy

import torch

from .order import DataOrder

__all__ = ["FORMAT", "session_state", "save_checkpoint", "load_session_state", "clone_state"]

FORMAT = "kfac_lab.Session/1"


def session_state(session) -> dict:
    """The session's resumable state (not cloned): ``{"model", "optimizer", "extra"}``."""
    s = session
    entries = {
        "format": FORMAT, "step": s.step, "wall_time": s.wall_time, "order": s._order.state(),
        "batch_size": s.batch_size, "batch_schedule": s.batch_schedule, "eval_every": s.eval_every,
        "polyak": None if s._avg is None else s._avg.state_dict(),
    }
    return {"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "extra": {"session": entries}}


def save_checkpoint(session) -> int:
    """Flush the run's rows, then store a checkpoint at the session's step with its retention
    (``keep_checkpoints``, ``keep_every``); returns the step. The caller holds the session
    between two steps."""
    s = session
    st = session_state(s)
    s.store.flush(s.run_id)  # the committed rows always reach at least the last checkpoint
    s.store.save_checkpoint(s.run_id, s.step, st["model"], st["optimizer"], st["extra"],
                            keep_checkpoints=s.keep_checkpoints, keep_every=s.keep_every)
    s._last_checkpoint = s.step
    return s.step


def load_session_state(session, st: dict) -> None:
    """Load a checkpoint (:func:`session_state`'s dict) into ``session``, all or nothing: the
    session's entries, the model's keys, shapes and finiteness, the Polyak average and the
    optimizer state are all checked before the session changes; if the optimizer still refuses,
    the model is put back."""
    from ..optim.state_check import Checker, check_module_state

    s = session
    run_id = getattr(s, "run_id", None)
    c = Checker(f"Session checkpoint of run {run_id!r}" if run_id else "Session checkpoint",
                hint="was it saved from another model or problem?")
    c.mapping(st, ("model", "optimizer"), "the checkpoint")
    sess = (st.get("extra") or {}).get("session") if isinstance(st.get("extra") or {}, dict) else None
    if not isinstance(sess, dict) or sess.get("format") != FORMAT:
        raise ValueError("not a kfac_lab Session checkpoint (extra['session'] missing)")
    c.mapping(sess, ("step", "wall_time", "order", "batch_size", "batch_schedule"), "the session state")
    step = c.integer(sess["step"], "step")
    wall = c.real(sess["wall_time"], "wall_time")
    order = c.mapping(sess["order"], ("epoch", "pos"), "the data order")
    epoch, pos = c.integer(order["epoch"], "the data epoch"), c.integer(order["pos"], "the data position")
    if pos > s.problem.n:
        c.fail(f"the data position {pos} exceeds the {s.problem.n} training cases", c.hint)
    try:
        batch_size = s._check_batch(sess["batch_size"])
    except ValueError as exc:
        c.fail(str(exc), c.hint)
    eval_every = c.integer(sess.get("eval_every", s.eval_every), "eval_every", 1)
    check_module_state(c, s.model, st["model"])
    avg = _checked_polyak(c, s.model, sess.get("polyak"))
    backup = {k: v.detach().clone() for k, v in s.model.state_dict().items()}
    s.model.load_state_dict(st["model"])
    try:
        s.optimizer.load_state_dict(st["optimizer"])  # checked first, all or nothing
    except BaseException:
        s.model.load_state_dict(backup)
        raise
    s.step, s.wall_time = step, wall
    s._order = DataOrder(s.problem.n, s.seed, s.device, epoch, pos)
    s.batch_size = batch_size
    s.batch_schedule = bool(sess["batch_schedule"])
    s._schedule = s._make_schedule() if s.batch_schedule else None
    s.eval_every = eval_every
    if avg is not None:
        if s._avg is None:
            s._avg = avg
        else:  # keep the object (others may hold it), take the loaded values
            with torch.no_grad():
                for a, b in zip(s._avg.average, avg.average):
                    a.copy_(b)
            s._avg.xi, s._avg.n_updates = avg.xi, avg.n_updates
        s.polyak = s._avg.xi
    s._n_opt_events = len(getattr(s.optimizer, "events", []))
    s._last_checkpoint = s.step


def _checked_polyak(c, model, saved):
    """A scratch ``PolyakAverage`` loaded from ``saved`` (None when the run had none), checked
    before anything of the session changes."""
    if saved is None:
        return None
    from ..optim import PolyakAverage

    pol = c.mapping(saved, ("xi",), "the Polyak average")
    try:
        avg = PolyakAverage(model, pol["xi"])
    except (TypeError, ValueError) as exc:
        c.fail(f"the Polyak average: {exc}", "the checkpoint is damaged")
    avg.load_state_dict(saved)
    return avg


def clone_state(obj):
    """A deep copy of a state dict (tensors cloned; a module state dict keeps its ``_metadata``)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, clone_state(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = copy.deepcopy(obj._metadata)
        return out
    if isinstance(obj, list):
        return [clone_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(clone_state(v) for v in obj)
    return copy.deepcopy(obj)
