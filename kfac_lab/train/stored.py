"""Sessions rebuilt from a stored run: its settings, and branching a new run from its checkpoint.

``Session.resume`` continues a run (taking its writer lock); :func:`branch_from_checkpoint`
starts a *new* run from one of its checkpoints and only reads the old run, so it works while
another process still writes it.
"""
from __future__ import annotations

import math
from typing import Any

from .problems import get_problem, problem_names

__all__ = ["stored_settings", "branch_from_checkpoint"]

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
                             "to Session.resume")
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
    session._load_state(ck)
    store.event(session.run_id, step, "branched", parent_run=run_id, parent_step=step,
                **({"skipped_checkpoints": [s for s, _ in ck["skipped"]]} if ck.get("skipped") else {}))
    return session
