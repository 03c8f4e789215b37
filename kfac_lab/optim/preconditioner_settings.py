"""The settings of :class:`~kfac_lab.optim.KFACPreconditioner`: one validator per setting (the
same ones guard the constructor, ``configure`` and ``load_state_dict``) and the checks of their
combinations. docs/preconditioner.md explains each setting."""
from __future__ import annotations

import math
import numbers

import torch

from .. import checks

APPROXES = ("blockdiag", "tridiag", "ekfac")
DAMPING_TYPES = ("factored", "tikhonov")
STATS_MODES = ("sampled", "empirical", "exact")
# λ = γ² is kept in [MIN_LAMBDA, MAX_LAMBDA] by the adaptive rule (as KFAC's min/max_damping)
MIN_LAMBDA, MAX_LAMBDA = 1e-8, 1e8


def _check_freq(name, value) -> int:
    checks.integer(name, value)  # a string or float is a TypeError naming the setting
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_choice(name, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")
    return value


def _positive(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value) and value > 0


def _check_gamma(value):
    if callable(value):
        return value
    checks.number("gamma", value, finite=False)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(
            f"gamma (γ, the factored Tikhonov damping) must be a finite number >= 0 or a callable step -> γ, "
            f"got {value!r}; try 1e-3 to 1e-1"
        )
    return float(value)


def _check_fraction(value) -> float:
    checks.number("stats_fraction", value, finite=False)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"stats_fraction must be in (0, 1] (the paper: 1/8), got {value!r}")
    return float(value)


def _check_kl_clip(value):
    if value is None:
        return None
    checks.number("kl_clip", value, finite=False)
    if not _positive(value):
        raise ValueError(f"kl_clip must be a positive number (the bound on δᵀF̃δ, default 1e-3) or None "
                         f"(no clipping), got {value!r}")
    return float(value)


def _check_lr(value):
    if value is None or isinstance(value, torch.optim.Optimizer) or (callable(value) and not isinstance(value, type)):
        return value
    checks.number("lr", value, finite=False)
    if not _positive(value):
        raise ValueError(f"lr must be your optimizer's learning rate: the torch optimizer itself (its param_groups "
                         f"are read at every step), a positive number or a callable step -> lr; got {value!r}")
    return float(value)


def _check_bool(name, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_dtype(name, value):
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float64) or None, got {value!r}")
    if value is not None and not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype, got {value}")
    return value


_VALIDATORS = {
    "gamma": _check_gamma,
    "approx": lambda v: _check_choice("approx", v, APPROXES),
    "damping_type": lambda v: _check_choice("damping_type", v, DAMPING_TYPES),
    "factor_update_freq": lambda v: _check_freq("factor_update_freq", v),
    "inverse_update_freq": lambda v: _check_freq("inverse_update_freq", v),
    "stats_fraction": _check_fraction,
    "stats_mode": lambda v: _check_choice("stats_mode", v, STATS_MODES),
    "kl_clip": _check_kl_clip,
    "lr": _check_lr,
    "adaptive_damping": lambda v: _check_bool("adaptive_damping", v),
    "damping_update_freq": lambda v: _check_freq("damping_update_freq", v),
}
# settings whose change invalidates the current inverse
_REBUILD = {"gamma", "approx", "damping_type"}
# the old spelling (before γ was named gamma everywhere): accepted with a DeprecationWarning for one release
ALIASES = {"damping": "gamma"}


def _check_combination(cfg: dict) -> None:
    if cfg["approx"] == "tridiag" and cfg["damping_type"] != "factored":
        raise ValueError(
            "approx='tridiag' needs damping_type='factored' (with exact Tikhonov the blocks are no "
            "longer Kronecker products); use approx='blockdiag' for exact Tikhonov damping"
        )
    if cfg["lr"] is None and (cfg["kl_clip"] is not None or cfg["adaptive_damping"]):
        what = f"KL-clipping (kl_clip={cfg['kl_clip']})" if cfg["kl_clip"] is not None else "adaptive damping"
        raise ValueError(
            f"{what} needs the learning rate your optimizer applies (the step is −lr·F̃⁻¹∇h): pass lr=<your torch "
            "optimizer> (its param_groups are read at every step, so schedulers are followed) or lr=<number>; "
            "or turn clipping off with kl_clip=None"
        )
    if cfg["adaptive_damping"] and callable(cfg["gamma"]):
        raise ValueError("adaptive_damping=True adapts the number gamma=γ (λ = γ²); a γ schedule (a callable) "
                         "would fight it: give gamma as a number, or keep the schedule with adaptive_damping=False")


def renamed(saved: dict) -> dict:
    """Settings saved before the rename (``damping`` = γ) under their current names."""
    if not isinstance(saved, dict):
        return saved  # the state checker names what is wrong with it
    return {ALIASES.get(k, k): v for k, v in saved.items()}


def _plain(value) -> bool:
    """Settings that go into a state dict (not callables or optimizers)."""
    return value is None or isinstance(value, (bool, int, float, str))
