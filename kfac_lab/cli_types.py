"""The argument types of the ``kfac-lab`` command line (argparse ``type=`` callables): each
refuses a bad value with a message naming what it expected, which argparse prints as one line."""
from __future__ import annotations

import argparse
import json
import math

__all__ = ["number", "positive_int", "nonneg_int", "positive_float", "decay", "mu_max", "damping", "seed", "option"]


def number(cast, what: str, ok):
    """An argparse type: ``cast(text)`` that must satisfy ``ok``, else a message naming ``what``."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    return parse


positive_int = number(int, "a positive integer", lambda v: v >= 1)
nonneg_int = number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = number(float, "a positive number", lambda v: v > 0 and math.isfinite(v))
decay = number(float, "a number in [0, 1) (the paper: 0.99)", lambda v: 0 <= v < 1)
mu_max = number(float, "a number in [0, 1) (the paper: 0.99, 0.995 or 0.999)", lambda v: 0 <= v < 1)


def damping(text: str):
    """K-FAC's λ₀: ``auto`` (chosen from the first batch) or a positive number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number (the paper's 150) or 'auto', got {text!r}")
    return v


def seed(text: str) -> int:
    """An argparse type: a seed in torch.manual_seed's range (checked here, not mid-run)."""
    from .checks import seed as check_seed

    try:
        return check_seed(int(text))
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc) if text.strip().lstrip("-").isdigit()
                                         else f"expected an integer seed, got {text!r}") from None


def option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (numbers, true/false, null, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
