"""``race``: several optimizers on one problem, same machine, one store — the paper's comparison.

Sessions are **interleaved** by default, so that the machine's ups and downs (these machines
are noisy) hit every contender alike: with a ``steps`` budget they take one step each in turn;
with a ``seconds`` budget the next step always goes to the contender with the least training
time so far (``wall_time`` counts each session's own steps only — evaluation, logging and the
other contenders' steps are excluded), so every contender gets the same training seconds.
``schedule="sequential"`` runs them one after another instead (each alone on the machine).
"""
from __future__ import annotations

import time
import uuid
import warnings
from typing import Iterable

from .problems import Problem, get_problem
from .session import Session, open_store

__all__ = ["race"]


def _entries(optimizers) -> list[tuple[str, dict, str, dict]]:
    out = []
    for i, item in enumerate(optimizers):
        if isinstance(item, str):
            name, options, label, extra = item, {}, None, {}
        elif isinstance(item, (tuple, list)) and 1 <= len(item) <= 4:
            name = item[0]
            options = dict(item[1]) if len(item) > 1 and item[1] else {}
            label = item[2] if len(item) > 2 else None
            extra = dict(item[3]) if len(item) > 3 and item[3] else {}
        else:
            raise ValueError(f"optimizers[{i}] = {item!r}: give (name, options[, label[, session options]]), "
                             "e.g. ('kfac', {'approx': 'tridiag'})")
        if label is None:
            label = name + "".join(f" {k}={v}" for k, v in options.items())
        out.append((name, options, str(label), extra))
    if not out:
        raise ValueError("race: give at least one optimizer")
    return out


def race(problem: str | Problem, optimizers: Iterable, steps: int | None = None, seconds: float | None = None,
         store=None, seed: int = 0, *, schedule: str = "interleave", progress: bool | str = False,
         attrs: dict | None = None, return_sessions: bool = False, **session_options):
    """Run each of ``optimizers`` — ``[(name, options[, label[, session options]]), …]``, e.g.
    ``[("kfac", {}), ("kfac", {"approx": "tridiag"}), ("sgd", {"lr": 0.01, "mu_max": 0.99})]`` —
    on ``problem`` for ``steps`` iterations and/or ``seconds`` of training time each, logging to
    ``store`` (a Store, path, or None for an in-memory one). Returns the run ids (in the given
    order), or the sessions with ``return_sessions=True``.

    ``schedule``: ``"interleave"`` (default; see the module docstring) or ``"sequential"``.
    ``progress``: a tqdm bar on stderr (a string: its description) — in training seconds of all
    contenders together with a ``seconds`` budget, in steps otherwise.
    Every run gets attrs ``race`` (one id for the whole race) and ``label``. A contender that
    fails is recorded (status ``"failed"``, a ``"failed"`` event) and the race goes on without it.
    ``session_options`` go to every :class:`Session` (``eval_every``, ``batch_size``,
    ``polyak``, ``checkpoint_every`` — default 0 here: one checkpoint at the end …); a
    contender's own session options (4th element) override them.
    """
    if steps is None and seconds is None:
        raise ValueError("race: give steps= and/or seconds= (the budget of each contender)")
    if schedule not in ("interleave", "sequential"):
        raise ValueError(f"schedule must be 'interleave' or 'sequential', got {schedule!r}")
    entries = _entries(optimizers)
    prob = get_problem(problem) if not isinstance(problem, Problem) else problem
    store = open_store(store)
    race_id = uuid.uuid4().hex[:8]
    session_options.setdefault("checkpoint_every", 0)
    sessions = []
    for name, options, label, extra in entries:
        a = {**(attrs or {}), "race": race_id, "label": label}
        sessions.append(Session(prob, name, store, seed=seed, optimizer_options=options, attrs=a,
                                steps=steps, seconds=seconds, **{**session_options, **extra}))
    bar = None
    by_seconds = seconds is not None
    if progress:
        from tqdm.auto import tqdm

        desc = progress if isinstance(progress, str) else f"race on {prob.name}"
        if by_seconds:  # training seconds of all contenders together: the bar ends with the race
            bar = tqdm(total=round(len(sessions) * seconds, 1), unit="s", desc=desc, dynamic_ncols=True,
                       mininterval=0.5, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} training s [{elapsed}<{remaining}{postfix}]")
        else:
            bar = tqdm(total=len(sessions) * steps, unit="step", desc=desc, dynamic_ncols=True, mininterval=0.5)
    try:
        if schedule == "sequential":
            for s in sessions:
                try:
                    s.run(progress=bool(progress))
                except Exception as exc:  # noqa: BLE001 - recorded by the session
                    warnings.warn(f"race: {s.run_id} ({s.optimizer_name}) failed: {exc!r}", RuntimeWarning, stacklevel=2)
        else:
            live = []
            for s in sessions:
                s.prepare()
                live.append(s)
            t_last = time.monotonic()
            while live:
                s = min(live, key=lambda x: x.wall_time) if seconds is not None else live[0]
                try:
                    s.train_step()
                except Exception as exc:  # noqa: BLE001 - recorded by the session
                    warnings.warn(f"race: {s.run_id} ({s.optimizer_name}) failed: {exc!r}", RuntimeWarning, stacklevel=2)
                    live.remove(s)
                    continue
                if bar is not None:
                    if by_seconds:
                        bar.n = min(sum(min(x.wall_time, seconds) for x in sessions), bar.total)
                        bar.update(0)
                    else:
                        bar.update(1)
                    if time.monotonic() - t_last > 1.0:
                        t_last = time.monotonic()
                        bar.set_postfix_str("  ".join(f"{x.optimizer_name}:{x.step}" for x in sessions), refresh=False)
                if s.done:
                    s.finish()
                    live.remove(s)
                elif seconds is None:  # round robin
                    live.append(live.pop(live.index(s)))
    finally:
        if bar is not None:
            bar.close()
        store.flush()
    return sessions if return_sessions else [s.run_id for s in sessions]
