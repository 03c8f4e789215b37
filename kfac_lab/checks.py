"""Checks of plain inputs shared by every entry point (optimizers, sessions, studies, the CLI).

A wrong *type* is a ``TypeError`` naming the setting and what it got (``lr must be a number,
got str '0.1'``); a value out of range is a ``ValueError`` saying the range. See
``docs/reliability.md`` ("Optimizer state and inputs").
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch

__all__ = ["number", "integer", "seed", "batch_dtype", "renamed", "SEED_MAX"]

#: The largest seed accepted: ``torch.manual_seed`` takes 64-bit seeds; one bit is kept free for
#: the offsets added to a seed (per rank, per epoch), so every derived seed stays in range.
SEED_MAX = 2**63 - 1


def _got(value) -> str:
    return f"{type(value).__name__} {value!r}"


def number(name: str, value, *, positive: bool = False, minimum: float | None = None,
           below: float | None = None, need: str = "", finite: bool = True) -> float:
    """``value`` as a ``float``. ``TypeError`` unless it is a real number (``bool`` is not);
    ``ValueError`` unless it is finite (``finite=False``: no range check at all: the caller checks
    the value), ``> 0`` (``positive``), ``>= minimum`` and ``< below``. ``need`` replaces the
    generic range text of the ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_got(value)}")
    v = float(value)
    if not finite:
        return v
    ok = math.isfinite(v) and (not positive or v > 0) and (minimum is None or v >= minimum) \
        and (below is None or v < below)
    if not ok:
        if not need:
            parts = ["finite"] + (["> 0"] if positive else []) + ([f">= {minimum}"] if minimum is not None else []) \
                + ([f"< {below}"] if below is not None else [])
            need = "a number " + ", ".join(parts)
        raise ValueError(f"{name} must be {need}, got {value!r}")
    return v


def integer(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int`` (``TypeError`` for non-integers, ``bool`` included; ``ValueError``
    outside ``[minimum, maximum]``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_got(value)}")
    v = int(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be an integer {' and '.join(p for p in (lo, hi) if p)}, got {v}")
    return v


def seed(value, name: str = "seed") -> int:
    """A seed in ``[0, 2**63 − 1]`` (``torch.manual_seed``'s range, with room for offsets)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_got(value)}")
    v = int(value)
    if not 0 <= v <= SEED_MAX:
        raise ValueError(f"{name}={v if abs(v) < 10**12 else f'{v:.3e}'} is out of range: a seed must be an integer "
                         f"in [0, 2**63 - 1] (torch.manual_seed takes 64-bit seeds); use a smaller one")
    return v


def batch_dtype(x, dtype: torch.dtype, who: str, what: str = "the batch") -> None:
    """Refuse a floating batch whose dtype differs from the model's (torch would fail deep inside
    a matmul, or silently promote): the message says how to convert either side."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != dtype:
        have, want = str(x.dtype).replace("torch.", ""), str(dtype).replace("torch.", "")
        conv = {"float32": "x.float()", "float64": "x.double()", "float16": "x.half()",
                "bfloat16": "x.bfloat16()"}.get(want, f"x.to(torch.{want})")
        mconv = {"float32": "model.float()", "float64": "model.double()", "float16": "model.half()",
                 "bfloat16": "model.bfloat16()"}.get(have, f"model.to(torch.{have})")
        raise TypeError(f"{who}: model parameters are {want} but {what} is {have}; convert with {conv} or "
                        f"{mconv} (and build the optimizer after converting the model)")


def renamed(who: str, old: str, new: str, old_value, new_value, default=None, stacklevel: int = 3, why: str = ""):
    """The value of a keyword renamed ``old`` → ``new`` (kept one release as a deprecated alias): a
    ``DeprecationWarning`` when ``old`` is given (``old_value`` is not None), a ``TypeError`` when
    both are; ``new_value`` (or ``default`` when neither is given) otherwise."""
    if old_value is None:
        return default if new_value is None else new_value
    if new_value is not None:
        raise TypeError(f"{who}: give {new}= only ({old}= is its deprecated old name), not both")
    warnings.warn(f"{who}: {old}= is the deprecated name of {new}= and will be removed in the next release; use "
                  f"{new}=" + (f" ({why})" if why else ""), DeprecationWarning, stacklevel=stacklevel)
    return old_value


def module_getattr(module: str, lazy: dict[str, str] | None = None, deprecated: dict[str, str] | None = None,
                   home: str | None = None):
    """A module-level ``__getattr__`` (PEP 562) for ``module``: ``lazy`` maps a name to the submodule
    (relative, e.g. ``".fisher"``) it is imported from on first use; ``deprecated`` maps an old
    name (kept one release) to its new name, resolved the same way after a ``DeprecationWarning``
    that names the new spelling, ``home.new`` (``home`` defaults to ``module``)."""
    import importlib

    lazy, deprecated = dict(lazy or {}), dict(deprecated or {})

    def __getattr__(name: str):
        if name in deprecated:
            new = deprecated[name]
            warnings.warn(f"{module}.{name} is deprecated (removed in the next release): use {home or module}.{new}",
                          DeprecationWarning, stacklevel=2)
            name = new
        if name in lazy:
            return getattr(importlib.import_module(lazy[name], module), name)
        mod = importlib.import_module(module)
        if name in vars(mod):  # a deprecated name of something defined in the module itself
            return vars(mod)[name]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
