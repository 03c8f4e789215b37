"""Validation of saved optimizer state before any of it is loaded, and an all-or-nothing load.

Every ``load_state_dict`` in :mod:`kfac_lab.optim` (``KFAC``, ``DistributedKFAC``,
``KFACPreconditioner``, ``SGDNesterov``, ``Adam``), the Kronecker factors they hold and the
Session's restore path check the saved state here FIRST — layers, shapes, dtypes, settings and
finiteness — and name the first mismatch ("state for layer 1 factor A has shape (785, 785); this
model needs (101, 101): was it saved from another model?"). Loading then happens inside
:func:`all_or_nothing`, which puts every attribute back if anything still fails (a factorisation,
a generator state torch refuses), so a failed load leaves the optimizer exactly as it was.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from typing import Iterable, Sequence

import torch
from torch import Tensor

from .. import checks
from ..errors import KFACError

__all__ = ["StateError", "Checker", "all_or_nothing", "check_factor_state", "check_module_state"]


class StateError(KFACError, ValueError):
    """A saved state does not fit the optimizer (or model) it is loaded into; nothing was changed."""


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else "?"


class Checker:
    """Checks of one saved state; every failure is a :class:`StateError` that starts with
    ``owner`` and names the entry (``what``) and the fix."""

    def __init__(self, owner: str, hint: str = "was it saved from another model?"):
        self.owner, self.hint = owner, hint

    def fail(self, msg: str, hint: str | None = None):
        raise StateError(f"{self.owner}: {msg}" + (f": {hint}" if hint else ""))

    def mapping(self, state, keys: Iterable[str], what: str = "the state") -> dict:
        if not isinstance(state, dict):
            self.fail(f"{what} must be a dict, got {type(state).__name__}", "pass the dict state_dict() returned")
        missing = [k for k in keys if k not in state]
        if missing:
            self.fail(f"{what} lacks {missing}", "it was not written by this class's state_dict(), or is damaged")
        return state

    def format(self, state, expected: str) -> None:
        self.mapping(state, (), "the state")
        if state.get("format") != expected:
            self.fail(f"not a {expected.split('/')[0]} state (format={state.get('format')!r}, expected {expected!r})",
                      "load the state of the same optimizer class")

    def integer(self, value, what: str, minimum: int = 0) -> int:
        if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
            self.fail(f"{what} must be an integer >= {minimum}, got {value!r}", "the state is damaged")
        return int(value)

    def real(self, value, what: str, positive: bool = False) -> float:
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or (positive and not value > 0):
            self.fail(f"{what} must be a finite{' positive' if positive else ''} number, got {value!r}",
                      "the state is damaged")
        return float(value)

    def flag(self, value, what: str) -> bool:
        if not isinstance(value, bool):
            self.fail(f"{what} must be True or False, got {value!r}", "the state is damaged")
        return value

    def tensor(self, t, what: str, shape: Sequence[int] | None = None, finite: bool = True) -> Tensor:
        """A floating tensor of ``shape`` (when given), finite (when ``finite``)."""
        if not isinstance(t, Tensor):
            self.fail(f"{what} must be a tensor, got {type(t).__name__}", "the state is damaged")
        if not t.is_floating_point():
            self.fail(f"{what} has dtype {t.dtype}; a floating dtype is needed", "the state is damaged")
        if shape is not None and tuple(t.shape) != tuple(shape):
            self.fail(f"{what} has shape {_shape(t)}; this model needs {tuple(shape)}", self.hint)
        if finite and t.numel() and not bool(torch.isfinite(t).all()):
            self.fail(f"{what} holds NaN or inf",
                      "the state was saved after the run diverged: load an earlier checkpoint")
        return t

    def tensors(self, ts, what: str, shapes: Sequence[Sequence[int]]) -> list[Tensor]:
        if not isinstance(ts, (list, tuple)):
            self.fail(f"{what} must be a list of tensors, got {type(ts).__name__}", "the state is damaged")
        if len(ts) != len(shapes):
            self.fail(f"{what} holds {len(ts)} tensors; this model needs {len(shapes)}", self.hint)
        return [self.tensor(t, f"{what}[{i}]", s) for i, (t, s) in enumerate(zip(ts, shapes))]

    def events(self, events) -> list[dict]:
        if not isinstance(events, (list, tuple)) or not all(isinstance(e, dict) for e in events):
            self.fail("events must be a list of dicts", "the state is damaged")
        return [dict(e) for e in events]

    def generator(self, gen_state, device) -> Tensor:
        """A generator state torch accepts for a generator on ``device`` (tried on a scratch one)."""
        if not isinstance(gen_state, Tensor) or gen_state.dtype != torch.uint8:
            self.fail(f"the random generator state must be a uint8 tensor, got "
                      f"{type(gen_state).__name__}{'' if not isinstance(gen_state, Tensor) else ' ' + str(gen_state.dtype)}",
                      "the state is damaged")
        try:
            torch.Generator(device=device).set_state(gen_state)
        except (RuntimeError, ValueError, TypeError) as exc:
            self.fail(f"the random generator state is not valid for a {torch.device(device).type} generator "
                      f"({str(exc).splitlines()[0]})", "the state is damaged (or comes from another device type)")
        return gen_state


def layer_dims(layers) -> tuple[list[int], list[int]]:
    """``(in_dims, out_dims)``: the sizes of ``A`` and ``G`` of each K-FAC layer."""
    return [l.in_dim for l in layers], [l.d_out for l in layers]


def check_factor_state(c: Checker, state, pairs: list[tuple[int, int]], in_dims: Sequence[int] | None,
                       out_dims: Sequence[int] | None) -> None:
    """A ``KroneckerFactors`` state: the pairs, ``k``, ``decay`` and every factor's shape
    (``A[(i, j)]``: ``(in_i, in_j)``, ``G[(i, j)]``: ``(out_i, out_j)``) and finiteness. Without
    the dims (a bare ``KroneckerFactors``) the shapes are checked for consistency with each other."""
    c.mapping(state, ("k", "decay", "pairs", "A", "G"), "the factor state")
    try:
        saved = [tuple(int(v) for v in p) for p in state["pairs"]]
    except (TypeError, ValueError):
        c.fail(f"the factor pairs {state['pairs']!r} are not pairs of layer indices", "the state is damaged")
    if saved != list(pairs):
        n_saved = 1 + max((max(p) for p in saved), default=-1)
        n_here = 1 + max((max(p) for p in pairs), default=-1)
        why = (f"{n_saved} layers; this model has {n_here}: was it saved from another model?" if n_saved != n_here
               else "other pairs (the adjacent cross factors are collected or not: construct the optimizer with the "
                    "same cross_factors setting)")
        c.fail(f"the saved factors hold pairs {saved} ({why})")
    k = c.integer(state["k"], "the factor update count k")
    c.real(state["decay"], "the factor decay")
    if not 0 <= float(state["decay"]) < 1:
        c.fail(f"the factor decay must be in [0, 1), got {state['decay']!r}", "the state is damaged")
    if in_dims is None:  # consistency only: the diagonal blocks give the sizes
        in_dims, out_dims = [], []
        for i in range(len({p[0] for p in pairs} | {p[1] for p in pairs})):
            for side, dims in (("A", in_dims), ("G", out_dims)):
                t = state[side].get(f"{i},{i}") if isinstance(state[side], dict) else None
                dims.append(t.shape[0] if isinstance(t, Tensor) and t.dim() == 2 else -1)
    for side, dims, name in (("A", in_dims, "A"), ("G", out_dims, "G")):
        table = state[side]
        if not isinstance(table, dict):
            c.fail(f"the saved factors {side} must be a dict, got {type(table).__name__}", "the state is damaged")
        if k == 0 and not table:
            continue
        for i, j in pairs:
            key = f"{i},{j}"
            if key not in table:
                c.fail(f"the saved factors lack {name}[{key}]", "the state is damaged")
            where = f"layer {i} factor {name}" if i == j else f"layers {i},{j} cross factor {name}"
            c.tensor(table[key], f"state for {where}", (dims[i], dims[j]))
        extra = sorted(set(table) - {f"{i},{j}" for i, j in pairs})
        if extra:
            c.fail(f"the saved factors hold unexpected entries {side}{extra}", "the state is damaged")


def check_inverse_inputs(c: Checker, inp, in_dims: Sequence[int], out_dims: Sequence[int], dtype, device) -> dict | None:
    """The saved factors an inverse was built from (``A``, ``G`` per layer; ``A_off``, ``G_off`` per
    adjacent pair, or both None for a block-diagonal one), converted to ``dtype`` on ``device``."""
    if inp is None:
        return None
    c.mapping(inp, ("A", "G", "A_off", "G_off"), "the saved inverse inputs")
    L = len(in_dims)
    conv = lambda ts: [t.detach().to(device=device, dtype=dtype, copy=True) for t in ts]  # noqa: E731
    inputs = {"A": conv(c.tensors(inp["A"], "the inverse's A", [(d, d) for d in in_dims])),
              "G": conv(c.tensors(inp["G"], "the inverse's G", [(d, d) for d in out_dims])),
              "A_off": None, "G_off": None}
    if (inp["A_off"] is None) != (inp["G_off"] is None):
        c.fail("the saved inverse inputs hold A_off or G_off without the other", "the state is damaged")
    if inp["A_off"] is not None:
        inputs["A_off"] = conv(c.tensors(inp["A_off"], "the inverse's A_off",
                                         [(in_dims[i], in_dims[i + 1]) for i in range(L - 1)]))
        inputs["G_off"] = conv(c.tensors(inp["G_off"], "the inverse's G_off",
                                         [(out_dims[i], out_dims[i + 1]) for i in range(L - 1)]))
    return inputs


def check_module_state(c: Checker, module: torch.nn.Module, sd) -> None:
    """A model's ``state_dict``: the same keys, shapes, floating dtypes where the model's are
    floating, finite parameters (the check ``load_state_dict(strict=True)`` does only while copying)."""
    if not isinstance(sd, dict):
        c.fail(f"the model state must be a dict, got {type(sd).__name__}", "the checkpoint is damaged")
    mine = module.state_dict()
    missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
    if missing or extra:
        c.fail(f"the model state does not fit this model (missing {missing[:5]}, unexpected {extra[:5]})", c.hint)
    for key, ref in mine.items():
        t = sd[key]
        if not isinstance(t, Tensor):
            c.fail(f"model entry {key!r} must be a tensor, got {type(t).__name__}", "the checkpoint is damaged")
        if t.shape != ref.shape:
            c.fail(f"model entry {key!r} has shape {_shape(t)}; this model needs {_shape(ref)}", c.hint)
        if ref.is_floating_point():
            c.tensor(t, f"model entry {key!r}", ref.shape)


@contextmanager
def all_or_nothing(*objects, generators: Iterable[torch.Generator] = ()):
    """Run a load; if it raises, put back every attribute of ``objects`` (dict and list attributes
    keep their identity and get their old contents back) and the state of ``generators``.
    The load must replace tensors rather than write into them (or write only after everything
    that can fail has run)."""
    saved = []
    for obj in objects:
        attrs = dict(vars(obj))
        contents = {k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in attrs.items()
                    if type(v) in (dict, list)}
        saved.append((obj, attrs, contents))
    gens = [(g, g.get_state()) for g in generators if g is not None]
    try:
        yield
    except BaseException:
        for obj, attrs, contents in saved:
            vars(obj).clear()
            vars(obj).update(attrs)
            for k, v in contents.items():
                container = attrs[k]
                if isinstance(container, dict):
                    container.clear()
                    container.update(v)
                else:
                    container[:] = v
        for g, st in gens:
            g.set_state(st)
        raise


def check_seed(c: Checker, value) -> int:
    try:
        return checks.seed(value)
    except (TypeError, ValueError) as exc:
        c.fail(f"the saved {exc}", "the state is damaged")


def _settings(c: Checker, saved, validators: dict, what: str) -> dict:
    """Saved settings through the owner's own validators (unknown names refused)."""
    c.mapping(saved, (), what)
    unknown = sorted(set(saved) - set(validators))
    if unknown:
        c.fail(f"{what} has unknown settings {unknown}", "the state is damaged or from another class")
    out = {}
    for k, v in saved.items():
        try:
            out[k] = validators[k](v)
        except (TypeError, ValueError) as exc:
            c.fail(f"{what}: {exc}", "the state is damaged")
    return out


def check_preconditioner_state(pre, state) -> dict:
    """The values of a ``KFACPreconditioner`` state converted for ``pre``, or a ``StateError``.
    The curvature parts go through the engine's own check (``CurvatureEngine.check_state``)."""
    from .preconditioner_settings import _VALIDATORS, _check_combination, renamed

    c = Checker("KFACPreconditioner")
    c.format(state, "kfac_lab.KFACPreconditioner/1")
    c.mapping(state, ("steps", "names", "config", "factors", "inverse_inputs", "rebuild", "generator", "seed",
                      "events"))
    if list(state["names"]) != pre.names:
        c.fail(f"the state preconditions layers {list(state['names'])}, this model has {pre.names}", c.hint)
    # states saved before γ was named gamma hold it as "damping"
    cfg = _settings(c, renamed(state["config"]), _VALIDATORS, "the saved config")
    pending = _settings(c, renamed(state.get("pending", {})), _VALIDATORS, "the saved pending settings")
    try:
        _check_combination({**pre.config, **cfg})
    except ValueError as exc:
        c.fail(f"the saved config is invalid ({exc})", "the state is damaged")
    inp = state["inverse_inputs"]
    gamma = None
    if inp is not None:
        c.mapping(inp, ("A", "G", "A_off", "G_off", "gamma"), "the saved inverse inputs")
        gamma = inp["gamma"]
        if {**pre.config, **cfg}["approx"] != "tridiag":  # the saved cross factors of a block-diagonal inverse
            inp = {**inp, "A_off": None, "G_off": None}
    engine = pre.curvature.check_state({"factors": state["factors"], "inverse_inputs": inp, "inverse_gamma": gamma,
                                        "stale": state["rebuild"], "generator": state["generator"],
                                        "ekfac": state.get("ekfac")}, c,
                                       weight_sharing=state.get("weight_sharing", "expand"))
    if inp is not None and engine["inverse_gamma"] is None:
        c.fail("the saved inverse inputs lack γ", "the state is damaged")
    return {
        **engine, "config": cfg, "pending": pending,
        "steps": c.integer(state["steps"], "the step count"),
        "seed": check_seed(c, state["seed"]),
        "events": c.events(state["events"]),
    }


def check_baseline_state(opt, state) -> dict:
    """The values of an ``SGDNesterov``/``Adam`` state for ``opt``, or a ``StateError``: kind,
    settings (through the optimizer's own validators), every buffer present with this model's
    parameter shapes, floating and finite, converted to the parameters' device and dtype."""
    c = Checker(type(opt).__name__)
    c.mapping(state, ("kind", "k", "consecutive_rejects", "hyper", "buffers", "events"))
    if state.get("kind") != opt.kind:
        c.fail(f"cannot load the state of kind {state.get('kind')!r} (expected {opt.kind!r})",
               f"load a {type(opt).__name__} state")
    validators = {k: (lambda v, k=k: opt.validate(**{k: v})[k]) for k in opt.settings()}
    hyper = _settings(c, state["hyper"], validators, "the saved settings")
    pending = _settings(c, state.get("pending", {}), validators, "the saved pending settings")
    mine = opt._state_tensors()
    bufs = state["buffers"]
    c.mapping(bufs, (), "the saved buffers")
    if set(bufs) != set(mine):
        c.fail(f"the saved buffers are {sorted(bufs)}; {type(opt).__name__} keeps {sorted(mine)}", "the state is damaged")
    new = {}
    for name, ts in mine.items():
        saved = c.tensors(bufs[name], f"buffer {name!r}", [t.shape for t in ts])
        new[name] = [s.detach().to(device=t.device, dtype=t.dtype, copy=True) for s, t in zip(saved, ts)]
    return {
        "hyper": hyper, "pending": pending, "buffers": new,
        "k": c.integer(state["k"], "the step count k"),
        "consecutive_rejects": c.integer(state["consecutive_rejects"], "consecutive_rejects"),
        "events": c.events(state["events"]),
    }
