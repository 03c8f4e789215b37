"""K-FAC's settings: one validated dataclass, changed live through ``KFAC.configure``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from .. import checks
from ..curvature.factors import WEIGHT_SHARING, check_weight_sharing
from .trust import omega1

APPROXES = ("blockdiag", "tridiag", "ekfac")
GAMMA_GRIDS = ("fast", "full")

# The settings a user may change while training runs (applied at the next step boundary).
LIVE = ("damping", "adapt_damping", "gamma", "adapt_gamma", "approx", "momentum", "lr",
        "weight_decay", "T1", "T2", "T3")


@dataclass(frozen=True)
class KFACConfig:
    """Every default is the paper's (M&G 2015 §5–§9; docs/algorithm.md)."""

    approx: str = "blockdiag"          # "blockdiag" (F̆, M&G 2015 §4.2), "tridiag" (F̂, §4.3), "ekfac" (George+ 2018)
    damping: float | str = 150.0       # λ₀, the Levenberg–Marquardt damping (the paper's 150), or "auto" (optim/initial_damping.py)
    adapt_damping: bool = True         # λ ← ω₁λ or λ/ω₁ every T1 steps from ρ
    gamma: float | None = None         # γ; None: sqrt(λ + η)
    adapt_gamma: bool = True           # try {ω₂γ, γ, γ/ω₂} every T2 steps
    momentum: bool | float = True      # True: μ from the quadratic model; False: none; float: fixed μ
    lr: float | None = None            # None: α from the exact-F quadratic model; float: fixed α
    weight_decay: float = 1e-5         # η, the ℓ2 coefficient
    ema_decay: float = 0.95            # cap of ε_k = min(1 − 1/k, ema_decay)
    T1: int = 5                        # λ update interval
    T2: int = 20                       # γ grid interval (a multiple of T3)
    T3: int = 20                       # inverse refresh interval
    stats_fraction: float = 1 / 8      # τ₁: share of the batch for the factor statistics
    fisher_fraction: float = 1 / 4     # τ₂: share of the batch for the exact-F products
    damping_type: str = "factored"     # "factored" Tikhonov (π) or exact "tikhonov" (blockdiag only; EKFAC: always)
    stats_mode: str = "sampled"        # "sampled" targets (the Fisher) or "empirical" (training targets)
    max_rejections: int = 10           # consecutive rejected steps before a NonFiniteError
    min_damping: float = 1e-8          # λ's floor under LM adaptation (not in the paper: keeps λ from underflowing)
    max_damping: float = 1e8           # λ's ceiling (repeated rejections cannot push it to inf)
    # the adjacent A_{i,i+1}, G_{i,i+1}: "auto" collects them while approx="tridiag" (estimated from the
    # batch of the step a switch takes effect); True: always (tridiag keeps its history); False: never
    cross_factors: bool | str = "auto"
    # γ grid candidates: "fast" ranks them through Cholesky solves of the block-diagonal factors and
    # builds one inverse (the winner's); "full": every candidate's damped inverse (the paper's way)
    gamma_grid: str = "fast"
    weight_sharing: str = "expand"     # conv / Linear-on-(N,…,d) factors: "expand" (KFC) or "reduce" (Eschenhagen et al. 2023)

    @property
    def cholesky_candidates(self) -> bool:
        """Are damped candidates held as Cholesky factors (``curvature/grid.py``) rather than explicit
        inverses? The fast γ grid with factored damping, for the Kronecker-factored approximations."""
        return self.gamma_grid == "fast" and self.damping_type == "factored" and self.approx != "ekfac"

    @property
    def factor_pairs(self) -> str:
        """The factor pairs collected now: ``"tridiag"`` (diagonal + adjacent) or ``"diag"``."""
        both = self.cross_factors is True or (self.cross_factors == "auto" and self.approx == "tridiag")
        return "tridiag" if both else "diag"

    @property
    def omega1(self) -> float:
        """ω₁ = (19/20)^T1 (M&G 2015 §6.5)."""
        return omega1(self.T1)

    @property
    def omega2(self) -> float:
        """ω₂ = sqrt(19/20)^T2."""
        return math.sqrt(19 / 20) ** self.T2

    def validate(self) -> "KFACConfig":
        def bad(name, value, need):
            raise ValueError(f"KFAC: {name}={value!r} is invalid: {need}")

        # types first: a string or a bool where a number belongs is a TypeError naming the setting
        auto = isinstance(self.damping, str) and self.damping == "auto"
        if not auto:
            try:
                checks.number("KFAC: damping", self.damping, finite=False)
            except TypeError as exc:
                raise TypeError(f"{exc} (λ₀: a positive number such as the paper's 150, or 'auto' to choose it from "
                                "the first batch)") from None
        for name in ("weight_decay", "ema_decay", "stats_fraction", "fisher_fraction", "min_damping",
                     "max_damping") + tuple(n for n in ("gamma", "lr") if getattr(self, n) is not None):
            checks.number(f"KFAC: {name}", getattr(self, name), finite=False)
        for name in ("T1", "T2", "T3", "max_rejections"):
            checks.integer(f"KFAC: {name}", getattr(self, name))
        if not isinstance(self.momentum, bool):
            checks.number("KFAC: momentum", self.momentum, finite=False)
        if not (isinstance(self.cross_factors, bool) or self.cross_factors == "auto"):
            raise TypeError(f"KFAC: cross_factors must be 'auto', True or False, got {self.cross_factors!r}")
        if self.gamma_grid not in GAMMA_GRIDS:
            bad("gamma_grid", self.gamma_grid, "choose 'fast' (Cholesky solves, one inverse built) or 'full' "
                "(every candidate's inverse, the paper's way)")
        for name in ("adapt_damping", "adapt_gamma"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"KFAC: {name} must be True or False, got {type(getattr(self, name)).__name__} "
                                f"{getattr(self, name)!r}")
        if self.approx not in APPROXES:
            bad("approx", self.approx, "choose 'blockdiag' (block-diagonal), 'tridiag' (block-tridiagonal) or 'ekfac' "
                "(eigenvalue-corrected block-diagonal)")
        if not auto and not (math.isfinite(self.damping) and self.damping > 0):
            bad("damping", self.damping, "λ must be a positive finite number (the paper starts at 150) or 'auto'")
        if not (0 < self.min_damping <= self.max_damping):
            bad("min_damping", self.min_damping, f"need 0 < min_damping <= max_damping = {self.max_damping}")
        if not auto and not (self.min_damping <= self.damping <= self.max_damping):
            bad("damping", self.damping, f"λ must lie in [min_damping, max_damping] = [{self.min_damping}, {self.max_damping}]")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            bad("gamma", self.gamma, "γ must be positive (or None for sqrt(λ + η))")
        if not (isinstance(self.momentum, bool) or (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1)):
            bad("momentum", self.momentum, "use True (adaptive μ), False, or a fixed μ in [0, 1)")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            bad("lr", self.lr, "use None (α from the quadratic model) or a positive learning rate")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", self.weight_decay, "η must be >= 0")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", self.ema_decay, "must be in [0, 1)")
        for name in ("T1", "T2", "T3", "max_rejections"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                bad(name, v, "must be an integer >= 1")
        if self.T2 % self.T3:
            bad("T2", self.T2, f"the γ grid runs on inverse refreshes: T2 must be a multiple of T3={self.T3}")
        for name in ("stats_fraction", "fisher_fraction"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                bad(name, v, "must be in (0, 1]")
        if self.damping_type not in ("factored", "tikhonov"):
            bad("damping_type", self.damping_type, "choose 'factored' or 'tikhonov'")
        if self.damping_type == "tikhonov" and self.approx == "tridiag":
            bad("damping_type", self.damping_type, "the block-tridiagonal inverse needs 'factored' damping")
        if self.approx == "tridiag" and self.cross_factors is False:
            bad("approx", self.approx, "the block-tridiagonal inverse needs the adjacent cross factors, which this "
                "optimizer does not collect: construct KFAC with cross_factors=True or 'auto' (the default)")
        if self.weight_sharing not in WEIGHT_SHARING:
            check_weight_sharing(self.weight_sharing, "KFAC: weight_sharing")
        if self.stats_mode not in ("sampled", "empirical"):
            bad("stats_mode", self.stats_mode, "choose 'sampled' (the Fisher) or 'empirical'")
        return self

    def updated(self, **changes) -> "KFACConfig":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"KFAC: unknown setting(s) {unknown}; known: {sorted(names)}")
        return replace(self, **changes).validate()

    def as_dict(self) -> dict:
        return asdict(self)
