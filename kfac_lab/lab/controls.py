"""The live controls of the training labs: their ranges, their state, and the checks that turn
what a user typed or moved into settings for a running K-FAC optimizer.

Both front ends (the Panel page and the Jupyter widget) show these controls; the ranges, the
messages and the rules (what ``lr_mode`` does to ``lr``) live here, once. A refused value raises
``ValueError`` naming the setting and the fix, and leaves the state as it was.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["KFAC_PRESETS", "DAMPING_MIN", "DAMPING_MAX", "DAMPING_GRID", "nearest_damping", "shown_damping", "APPROX", "LR_MODES",
           "LIVE_CONTROLS", "LiveControls", "parse_float", "parse_int"]

#: The λ slider's range (a log scale). λ₀ = 150 (M&G 2015 §6.5) sits inside it, and so does the
#: λ of a run the Levenberg–Marquardt rule pushes up for a while (rejected steps multiply λ):
#: a slider that follows adaptive λ must not pin at its end at 1e4 while λ keeps rising.
DAMPING_MIN, DAMPING_MAX = 1e-4, 1e5
#: The slider's stops: 1, 1.5, 2, 3, 5, 7 per decade, from :data:`DAMPING_MIN` to :data:`DAMPING_MAX`.
DAMPING_GRID = [float(f"{m}e{e}") for e in range(-4, 5) for m in (1, 1.5, 2, 3, 5, 7)] + [DAMPING_MAX]
#: The K-FAC presets of the labs' optimizer menus: value → (label, K-FAC options over the live
#: controls'). The paper's λ₀ = 150 (or whatever the λ box holds), and λ₀ chosen from the first
#: batch by ``damping="auto"`` (optim/initial_damping.py). In a notebook:
#: ``TrainingLabWidget("mnist", [("kfac", opts, label) for label, opts in KFAC_PRESETS.values()])``.
KFAC_PRESETS = {"kfac": ("K-FAC (λ₀ = 150, paper)", {"damping": 150.0}),
                "kfac-auto": ("K-FAC (auto λ₀)", {"damping": "auto"})}
#: label → value of the inverse approximations.
APPROX = {"block-diagonal": "blockdiag", "block-tridiagonal": "tridiag"}
#: label → value of the learning-rate modes: α from the exact-F quadratic model, or a fixed α.
LR_MODES = {"α adaptive (exact-F model)": "adaptive", "α fixed": "fixed"}
#: Settings that reach a running K-FAC optimizer at its next step boundary (plus ``lr_mode``).
LIVE_CONTROLS = ("damping", "adapt_damping", "approx", "momentum", "lr")


def nearest_damping(value: float) -> float:
    """The stop of :data:`DAMPING_GRID` closest to ``value`` on a log scale (what a discrete λ
    slider shows for a λ between its stops or outside its range)."""
    v = max(float(value), 1e-300)
    return min(DAMPING_GRID, key=lambda g: abs(math.log(g) - math.log(v)))


def shown_damping(value: float) -> float:
    """λ as a λ box shows it (4 significant digits: a followed λ does not flicker in the last ones)."""
    return float(f"{float(value):.4g}")


def parse_float(text: Any, name: str, *, minimum: float | None = None, positive: bool = False,
                maximum: float | None = None) -> float:
    """``text`` (typed by a user) as a finite float, or ``ValueError`` with a message to show."""
    if isinstance(text, bool):
        raise ValueError(f"{name}: expected a number, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip()
        if not s:
            raise ValueError(f"{name}: enter a number")
        try:
            value = float(s)
        except ValueError:
            raise ValueError(f"{name}: {s!r} is not a number (examples: 150, 1e-3)") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value:g}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be ≥ {minimum:g}, got {value:g}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be ≤ {maximum:g}, got {value:g}")
    return value


def parse_int(text: Any, name: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """``text`` as an int (``"1e3"`` and ``"1000.0"`` are accepted when integral)."""
    value = parse_float(text, name)
    if value != int(value):
        raise ValueError(f"{name}: must be a whole number, got {value:g}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: must be ≥ {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}: must be ≤ {maximum}, got {value}")
    return value


class LiveControls:
    """The state of the live K-FAC controls, and the one place their values are checked.

    >>> c = LiveControls()
    >>> c.change("damping", "30")
    {'damping': 30.0}
    >>> c.change("lr", 0.05)            # kept for the fixed mode; adaptive α goes on
    {}
    >>> c.change("lr_mode", "fixed")
    {'lr': 0.05}
    """

    def __init__(self, damping: float = 150.0, adapt_damping: bool = True, approx: str = "blockdiag",
                 momentum: bool = True, lr: float | None = None):
        self.damping = parse_float(damping, "damping λ", positive=True)
        self.adapt_damping = bool(adapt_damping)
        self.approx = self._approx(approx)
        self.momentum = momentum is not False
        self.lr_mode = "adaptive" if lr is None else "fixed"
        self.lr = 0.1 if lr is None else parse_float(lr, "learning rate α", positive=True)

    @classmethod
    def of(cls, config) -> "LiveControls":
        """The controls showing a K-FAC optimizer's ``config`` (a :class:`~kfac_lab.optim.KFACConfig`)."""
        damping = 150.0 if config.damping == "auto" else config.damping  # "auto": λ is 150 until the probe
        return cls(damping, config.adapt_damping, config.approx, config.momentum is not False, config.lr)

    @staticmethod
    def _approx(value: Any) -> str:
        value = APPROX.get(value, value)
        if value not in APPROX.values():
            raise ValueError(f"approximation {value!r}: choose one of {list(APPROX)} ({list(APPROX.values())})")
        return value

    def change(self, name: str, value: Any, send: Callable[[dict], Any] | None = None) -> dict:
        """Check one control's new value, hand the optimizer settings it changes to ``send`` (e.g.
        ``Session.set`` on every K-FAC run; it may refuse by raising), then record the value and
        return those settings (``{}`` when none: a fixed α typed while α is adaptive is kept for
        later). A refusal, here or by ``send``, raises and records nothing."""
        if name == "damping":
            value = parse_float(value, "damping λ", positive=True)
            changes = {"damping": value}
        elif name in ("adapt_damping", "momentum"):
            value = bool(value)
            changes = {name: value}
        elif name == "approx":
            value = self._approx(value)
            changes = {"approx": value}
        elif name == "lr":
            value = parse_float(value, "learning rate α", positive=True)
            changes = {"lr": value} if self.lr_mode == "fixed" else {}
        elif name == "lr_mode":
            value = LR_MODES.get(value, value)
            if value not in LR_MODES.values():
                raise ValueError(f"lr mode {value!r}: choose 'adaptive' or 'fixed'")
            changes = {"lr": float(self.lr) if value == "fixed" else None}
        else:
            raise ValueError(f"{name!r} is not a live control; live: {list(LIVE_CONTROLS) + ['lr_mode']}")
        if send is not None and changes:
            send(changes)
        setattr(self, name, value)
        return changes

    def kfac_options(self) -> dict:
        """The K-FAC options a new run starts with."""
        return {"damping": float(self.damping), "adapt_damping": self.adapt_damping, "approx": self.approx,
                "momentum": self.momentum, "lr": float(self.lr) if self.lr_mode == "fixed" else None}
