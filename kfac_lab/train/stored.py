"""Sessions rebuilt from a stored run: its settings, restoring it, and branching new runs.

:func:`restore_run` (``Session.restore``) continues a run from a checkpoint, taking its writer
lock; :func:`branch_from_checkpoint` (``Session.branch``) starts a *new* run from one of its
checkpoints and only reads the old run, so it works while another process still writes it;
:func:`branch_from_session` (``session.new_run_from_here()``) starts one from a live session.
"""
from __future__ import annotations

import math
from typing import Any

from .checkpointing import clone_state, load_session_state
from .problems import get_problem, problem_names

__all__ = ["stored_settings", "restore_run", "branch_from_checkpoint", "branch_from_session",
           "RESTORE_OVERRIDES", "BRANCH_OVERRIDES"]

#: What ``Session.restore`` / ``Session.branch`` may change of a stored run's settings.
RESTORE_OVERRIDES = frozenset({"steps", "seconds", "eval_every", "eval_cases", "checkpoint_every", "device", "dtype",
                               "keep_checkpoints", "keep_every", "from_step", "queue_size", "threads", "progress",
                               "problem", "problem_options"})
#: What ``session.new_run_from_here`` may change of the live session's settings.
BRANCH_OVERRIDES = frozenset({"steps", "seconds", "eval_every", "checkpoint_every", "queue_size", "threads",
                              "progress"})

_PROBLEM_KEYS = ("n", "seed", "source", "data_dir", "path", "standardize")


def stored_settings(store, run_id: str, overrides: dict) -> tuple[Any, str, dict, int]:
    """``(problem, optimizer name, Session keywords, last logged step)`` of stored run ``run_id``,
    with ``overrides`` (popped: ``problem``, ``problem_options``; the rest are Session keywords)."""
    ds = store.load_run(run_id)
    a = dict(ds.attrs)
    if "optimizer" not in a or "problem" not in a or "batch_size" not in a:
        raise ValueError(f"run {run_id!r} was not written by a kfac_lab Session (its attrs lack problem/optimizer/"
                         "batch_size): it cannot be resumed")
    last = int(ds["step"].values.max()) if ds.sizes.get("step", 0) else 0
    problem = overrides.pop("problem", None)
    if problem is None:
        name = a.get("problem")
        if name not in problem_names():
            raise ValueError(f"run {run_id!r} trained the custom problem {name!r}: pass problem=<the Problem> "
                             "to Session.restore")
        params = dict(a.get("problem_params") or {})
        popts = {k: v for k, v in params.items() if k in _PROBLEM_KEYS}
        popts.update(overrides.pop("problem_options", None) or {})
        problem = get_problem(name, **popts)
    else:
        overrides.pop("problem_options", None)

    def attr(key, default=None):
        v = a.get(key, default)
        return default if (isinstance(v, float) and math.isnan(v)) else v

    def optional(key, default):  # stored as -1 for None
        v = attr(key, default)
        return None if v in (None, -1, -1.0) else v

    polyak = attr("polyak", "none")
    steps, seconds = optional("budget_steps", -1), optional("budget_seconds", -1.0)
    checkpoint_every = int(attr("checkpoint_every", 100))
    keep, every = optional("keep_checkpoints", 3), optional("keep_every", -1)
    kw = dict(
        seed=int(attr("seed", 0)), batch_size=int(attr("batch_size")),
        batch_schedule=bool(attr("batch_schedule", False)), optimizer_options=attr("optimizer_options") or {},
        steps=None if steps is None else int(steps), seconds=None if seconds is None else float(seconds),
        eval_every=int(attr("eval_every", 10)), eval_cases=int(attr("eval_cases", 1000)),
        checkpoint_every=None if checkpoint_every < 0 else checkpoint_every,
        polyak=None if polyak in (None, "none") else float(polyak),
        device=attr("device", "cpu"), dtype=attr("dtype", "float32"),
        keep_checkpoints=None if keep is None else int(keep), keep_every=None if every is None else int(every),
    )
    kw.update(overrides)
    return problem, str(attr("optimizer", "kfac")), kw, last


def branch_from_checkpoint(cls, store, run_id: str, from_step: int | None, attrs: dict | None,
                           overrides: dict):
    """See :meth:`Session.branch`."""
    overrides = dict(overrides)
    problem, optimizer, kw, _ = stored_settings(store, run_id, overrides)
    if from_step is not None:
        from_step = cls._check_int("from_step", from_step, 0)
    probe_device = kw.get("device") or "cpu"
    if from_step is not None:  # exactly that one: damaged or missing is an error
        ck = store.load_checkpoint(run_id, from_step, map_location=probe_device)
    else:
        ck = store.load_intact_checkpoint(run_id, map_location=probe_device)  # warns per skipped
    step = int(ck["step"])
    child_attrs = {**(attrs or {}), "parent_run": run_id, "parent_step": step}
    session = cls(problem, optimizer, store, attrs=child_attrs, **kw)
    load_session_state(session, ck)
    store.event(session.run_id, step, "branched", parent_run=run_id, parent_step=step,
                **({"skipped_checkpoints": [s for s, _ in ck["skipped"]]} if ck.get("skipped") else {}))
    return session


def restore_run(cls, store, run_id: str, overrides: dict):
    """See :meth:`Session.restore` (``store`` is open)."""
    unknown = sorted(set(overrides) - RESTORE_OVERRIDES)
    if unknown:
        raise ValueError(f"Session.restore: cannot override {unknown}; allowed: {sorted(RESTORE_OVERRIDES)}")
    held = run_id in getattr(store, "_locks", {})
    store.claim(run_id)  # refused at once while another process writes the run
    try:
        return _restore(cls, store, run_id, dict(overrides))
    except BaseException:
        if not held:
            store.release(run_id)
        raise


def _restore(cls, store, run_id: str, overrides: dict):
    from_step = overrides.pop("from_step", None)
    if from_step is not None:
        from_step = cls._check_int("from_step", from_step, 0)
    store.flush(run_id)  # rows this process still buffers for the run count as logged
    problem, optimizer, kw, last = stored_settings(store, run_id, overrides)
    session = cls(problem, optimizer, store, run_id=run_id, _create_run=False, **kw)
    skipped = []
    if from_step is not None:  # exactly that one: damaged or missing is an error
        load_session_state(session, store.load_checkpoint(run_id, from_step, map_location=session.device))
    elif store.checkpoints(run_id):
        ck = store.load_intact_checkpoint(run_id, map_location=session.device)  # warns per skipped
        skipped = [{"step": s, "reason": r[:500]} for s, r in ck.get("skipped", [])]
        load_session_state(session, ck)
    from_step = session.step
    session._log_floor = last  # the re-done steps up to here are already logged
    session._controls.replay_events(store.events(run_id), after=from_step, upto=last)
    store.event(run_id, from_step, "resumed", from_checkpoint=from_step, last_logged_step=last,
                **({"skipped_checkpoints": skipped} if skipped else {}))
    store.flush(run_id)
    return session


def branch_from_session(parent, store, attrs: dict | None, overrides: dict):
    """See :meth:`Session.new_run_from_here`."""
    unknown = sorted(set(overrides) - BRANCH_OVERRIDES)
    if unknown:
        raise ValueError(f"new_run_from_here: cannot override {unknown}; allowed: {sorted(BRANCH_OVERRIDES)}")
    with parent._between_steps():
        snap = clone_state(parent.state())
        parent_step = parent.step
        options = {**parent.optimizer_options, **parent._hyper()}  # the live settings now
    p = parent
    kw = dict(seed=p.seed, batch_size=p.batch_size, batch_schedule=False, optimizer_options=options,
              steps=p.budget_steps, seconds=p.budget_seconds, eval_every=p.eval_every, eval_cases=p.eval_cases,
              polyak=p.polyak, checkpoint_every=p.checkpoint_every if p.checkpoints_enabled else None,
              device=p.device, dtype=p.dtype, problem_options=p.problem_options, queue_size=p.queue_size,
              threads=p.threads, progress=p.progress, keep_checkpoints=p.keep_checkpoints, keep_every=p.keep_every)
    kw.update(overrides)
    child_attrs = {**p.user_attrs, **(attrs or {}), "parent_run": p.run_id, "parent_step": parent_step}
    child = type(p)(p.problem, p.optimizer_name, p.store if store is None else store, attrs=child_attrs, **kw)
    load_session_state(child, snap)
    child.store.event(child.run_id, parent_step, "branched", parent_run=p.run_id, parent_step=parent_step)
    p.store.event(p.run_id, parent_step, "branch", child_run=child.run_id)
    return child
