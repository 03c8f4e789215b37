"""K-FAC as a gradient preconditioner for any torch optimizer (docs/preconditioner.md):

    pre = KFACPreconditioner(model, loss="categorical")
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()          # .grad ← F⁻¹ .grad on every K-FAC layer
        opt.step()          # any torch.optim optimizer, with any LR scheduler

This is the "plain" K-FAC many users expect: no re-scaling by the exact Fisher, no adaptive
λ, no quadratic-model momentum (those are :class:`kfac_lab.optim.KFAC`'s, M&G 2015 §6.4–§7);
the optimizer's learning rate (and momentum) take their place. What it does, per step k
(counted from 0):

1. statistics (every ``factor_update_freq`` steps): one extra forward and backward pass on the
   first ``stats_fraction`` (τ₁ = 1/8) of the latest input batch with targets **sampled** from
   the model's predictive distribution (M&G 2015 §5), giving ``Ā`` and ``G`` blended into
   running estimates with ``ε = min(1 − 1/k, ema_decay)``; the user's ``.grad`` is not touched;
2. inverses (on the first step and every ``inverse_update_freq`` steps, and after
   ``configure``): the damped block-diagonal ``F̆⁻¹`` or block-tridiagonal ``F̂⁻¹`` (M&G 2015 §4.2, §4.3),
   with factored Tikhonov damping ``γ`` (M&G 2015 §6.3) or exact Tikhonov (block-diagonal only);
3. each K-FAC layer's ``[∂W | ∂b]`` is replaced by ``F⁻¹ [∂W | ∂b]`` in the parameters' ``.grad``
   (modules in ``exclude`` keep their gradients).

The latest input batch is found by a forward pre-hook on ``model`` that keeps a reference (a
detached view, no copy) to the first positional argument of each forward pass run with gradients
enabled (evaluation under ``torch.no_grad()`` is ignored); ``pre.step(x=...)`` passes it
explicitly. The extra forward pass runs in the model's current mode, so dropout draws from the
global RNG and batch-norm running statistics (in excluded modules) see the statistics subset.
Weight decay given to the torch optimizer is added after preconditioning (not preconditioned);
put the ℓ2 term into the loss to have it preconditioned as in the paper's ``h``.
"""
from __future__ import annotations

import math
import numbers
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .. import checks
from ..curvature import KroneckerFactors, find_layers, get_loss, make_inverse, output_gradients
from ..errors import KFACError
from .state_check import all_or_nothing, check_preconditioner_state

__all__ = ["KFACPreconditioner", "PreconditionerInfo"]

APPROXES = ("blockdiag", "tridiag")
DAMPING_TYPES = ("factored", "tikhonov")
STATS_MODES = ("sampled", "empirical", "exact")


@dataclass
class PreconditionerInfo:
    """What one ``pre.step()`` did: ``step`` (1-based), whether the factors and the inverse
    were updated, the ``gamma`` of the inverse in use, the statistics batch size, and seconds
    spent (``"stats"``, ``"inverse"``, ``"precondition"``, ``"total"``; launch times on a GPU)."""

    step: int
    stats_updated: bool
    inverses_refreshed: bool
    gamma: float
    stats_batch: int
    timings: dict = field(default_factory=dict)


def _check_freq(name, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_choice(name, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {choices}")
    return value


def _check_damping(value):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or not math.isfinite(value):
        raise ValueError(
            f"damping (γ) must be a finite number >= 0 or a callable step -> γ, got {value!r}; "
            "try 1e-3 to 1e-1"
        )
    return float(value)


def _check_fraction(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"stats_fraction must be in (0, 1] (the paper: 1/8), got {value!r}")
    return float(value)


def _check_dtype(name, value):
    if value is not None and not isinstance(value, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype (e.g. torch.float64) or None, got {value!r}")
    if value is not None and not value.is_floating_point:
        raise ValueError(f"{name} must be a floating-point dtype, got {value}")
    return value


_VALIDATORS = {
    "damping": _check_damping,
    "approx": lambda v: _check_choice("approx", v, APPROXES),
    "damping_type": lambda v: _check_choice("damping_type", v, DAMPING_TYPES),
    "factor_update_freq": lambda v: _check_freq("factor_update_freq", v),
    "inverse_update_freq": lambda v: _check_freq("inverse_update_freq", v),
    "stats_fraction": _check_fraction,
    "stats_mode": lambda v: _check_choice("stats_mode", v, STATS_MODES),
}
# settings whose change invalidates the current inverse
_REBUILD = {"damping", "approx", "damping_type"}


def _check_combination(cfg: dict) -> None:
    if cfg["approx"] == "tridiag" and cfg["damping_type"] != "factored":
        raise ValueError(
            "approx='tridiag' needs damping_type='factored' (with exact Tikhonov the blocks are no "
            "longer Kronecker products); use approx='blockdiag' for exact Tikhonov damping"
        )


class KFACPreconditioner:
    """Replace the gradients of a model's ``nn.Linear`` layers by ``F⁻¹ ∇`` (see the module doc).

    Parameters
    ----------
    model: the network; its trainable parameters must live in ``nn.Linear`` layers or in
        modules listed in ``exclude`` (names or modules; their gradients are left as they are).
    loss: the predictive distribution of the model's outputs — ``"categorical"`` (softmax on
        logits), ``"bernoulli"`` (sigmoid on logits), ``"gaussian"`` (unit variance) or a
        ``Loss``. It must match the loss you train with, else ``F`` is the wrong matrix.
    approx: ``"blockdiag"`` (M&G 2015 §4.2) or ``"tridiag"`` (§4.3).
    damping: γ, added as factored Tikhonov ``(Ā + πγI) ⊗ (G + γ/π I)`` (``damping_type=
        "factored"``) or as ``Ā⊗G + γ²I`` (``"tikhonov"``, block-diagonal only); or a callable
        ``step -> γ`` (0-based step), evaluated whenever the inverse is rebuilt.
    factor_update_freq, inverse_update_freq: statistics every that many steps; inverses on the
        first step, then every that many steps (T₃ = 20 in the paper).
    stats_fraction: share of the batch for the statistics (τ₁ = 1/8), at least one case.
    ema_decay: the cap of ε in the running averages (0.95).
    stats_mode: ``"sampled"`` (the Fisher: targets drawn from the model; default),
        ``"empirical"`` (training targets — pass ``y=`` to ``step``; the empirical Fisher,
        a different and worse matrix), ``"exact"`` (expectation over the output distribution).
    factor_dtype, inverse_dtype: precision of the factors and of the inverses (default: the
        parameters' dtype).
    seed: seeds the generator of the sampled targets (on the model's device).
    """

    def __init__(self, model: nn.Module, loss="categorical", approx: str = "blockdiag",
                 damping: float | Callable[[int], float] = 1e-3, damping_type: str = "factored",
                 factor_update_freq: int = 1, inverse_update_freq: int = 20, stats_fraction: float = 1 / 8,
                 ema_decay: float = 0.95, stats_mode: str = "sampled", exclude: Iterable = (),
                 factor_dtype: torch.dtype | None = None, inverse_dtype: torch.dtype | None = None, seed: int = 0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss = get_loss(loss)
        self.config = {k: _VALIDATORS[k](v) for k, v in dict(
            damping=damping, approx=approx, damping_type=damping_type, factor_update_freq=factor_update_freq,
            inverse_update_freq=inverse_update_freq, stats_fraction=stats_fraction, stats_mode=stats_mode).items()}
        _check_combination(self.config)
        self.factor_dtype = _check_dtype("factor_dtype", factor_dtype)
        self.inverse_dtype = _check_dtype("inverse_dtype", inverse_dtype)
        self.seed = checks.seed(seed)
        self.layers = find_layers(model, exclude)
        self.names = [l.name for l in self.layers]
        self.factors = KroneckerFactors(len(self.layers), "tridiag", ema_decay)
        self.steps = 0
        self.events: list[dict] = []
        self.inverse = None
        self._inverse_inputs: dict | None = None  # the factors and γ the current inverse was built from
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None  # restored lazily (the device is known at the first step)
        self._rebuild = True
        self._lock = threading.Lock()
        self._pending: dict = {}
        self._last_input: Tensor | None = None
        self._recording = False  # True during our own forward pass (ignored by the hook)
        self._hook = model.register_forward_pre_hook(self._remember_input, with_kwargs=True)

    # -- the input batch --------------------------------------------------------------------------
    def _remember_input(self, module, args, kwargs):
        if self._recording or not torch.is_grad_enabled():
            return None
        # a detached view: no copy, and no hold on an autograd graph upstream of the model
        self._last_input = args[0].detach() if args and isinstance(args[0], Tensor) else None
        return None

    def remove(self) -> None:
        """Detach the hook from the model and drop the reference to the last input batch;
        ``step(x=...)`` still works."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._last_input = None

    # -- configuration ------------------------------------------------------------------------------
    def configure(self, **settings) -> None:
        """Change ``damping``, ``approx``, ``damping_type``, ``factor_update_freq``,
        ``inverse_update_freq``, ``stats_fraction`` or ``stats_mode`` (validated now, applied at
        the next ``step``; thread-safe). A new damping or approximation rebuilds the inverse at
        the next step from the current statistics (the adjacent cross factors are always kept,
        so switching to ``"tridiag"`` needs no new statistics)."""
        unknown = sorted(set(settings) - set(_VALIDATORS))
        if unknown:
            raise ValueError(f"KFACPreconditioner.configure: unknown setting(s) {unknown}; known: {sorted(_VALIDATORS)}")
        checked = {k: _VALIDATORS[k](v) for k, v in settings.items()}
        with self._lock:
            _check_combination({**self.config, **self._pending, **checked})
            self._pending.update(checked)

    def _apply_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        changed = {k: v for k, v in pending.items() if self.config[k] is not v and self.config[k] != v}
        if not changed:
            return
        self.config.update(changed)
        if _REBUILD & set(changed):
            self._rebuild = True
        self._event("configure", self.steps + 1, **{k: (repr(v) if callable(v) else v) for k, v in changed.items()})

    def _event(self, kind: str, step: int, **details) -> None:
        """``pre.events`` entries: ``{"step", "kind", **details}`` (as K-FAC's)."""
        self.events.append({"step": int(step), "kind": kind, **details})

    # -- the step ---------------------------------------------------------------------------------
    def gamma(self, step: int | None = None) -> float:
        """γ at a 0-based step (the current one by default)."""
        d = self.config["damping"]
        k = self.steps if step is None else step
        return float(_check_damping(d(k)) if callable(d) else d)

    def _check_grads(self) -> None:
        missing = [l.name for l in self.layers if l.module.weight.grad is None]
        if missing:
            raise KFACError(
                f"layers {missing} have no gradient: call loss.backward() first (then pre.step(), "
                "then optimizer.step())"
            )

    def _get_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            elif self._generator is not None:  # the model moved: continue the same stream, reseeded
                gen.manual_seed(self.seed + self.factors.k)
            self._generator = gen
        return self._generator

    def _statistics(self, x: Tensor, y: Tensor | None) -> int:
        cfg = self.config
        m = int(x.shape[0])
        n = max(1, min(m, math.ceil(m * cfg["stats_fraction"] - 1e-9)))
        xs = x[:n].detach()
        ys = y[:n] if y is not None else None
        if cfg["stats_mode"] == "empirical" and y is None:
            raise KFACError("stats_mode='empirical' uses the training targets: pass them as pre.step(y=...)")
        device = self.layers[0].module.weight.device
        gen = self._get_generator(device) if cfg["stats_mode"] == "sampled" else None
        self._recording = True
        try:
            with torch.enable_grad():
                a, g, _ = output_gradients(self.model, self.layers, self.loss, xs, y=ys,
                                           mode=cfg["stats_mode"], generator=gen)
        finally:
            self._recording = False
        dt = self.factor_dtype
        if dt is not None:
            a = [t.to(dt) for t in a]
            g = [t.to(dt) for t in g]
        with torch.no_grad():
            check = sum(t.pow(2).sum() for t in (*a, *g))  # Σ traces × m: finite ⇔ every factor entry finite
            if not bool(torch.isfinite(check)):  # a NaN would poison the running averages for good
                self._event("skipped_statistics", self.steps + 1, reason="non-finite curvature statistics")
                warnings.warn(
                    f"KFACPreconditioner: step {self.steps + 1}: the curvature statistics are not finite; "
                    "kept the previous factors (check the inputs; lower the learning rate)",
                    RuntimeWarning, stacklevel=3,
                )
                return 0
            self.factors.update_from_cases(a, g)
        return n

    def _build_inverse(self) -> float:
        gamma = self.gamma()
        A, G = self.factors.diag()
        A_off, G_off = self.factors.off_diag()
        inputs = {"A": [t.clone() for t in A], "G": [t.clone() for t in G],
                  "A_off": [t.clone() for t in A_off], "G_off": [t.clone() for t in G_off], "gamma": gamma}
        self.inverse = self._make_inverse(inputs)
        self._inverse_inputs = inputs
        self._rebuild = False
        return gamma

    def _make_inverse(self, inputs: dict):
        cfg = self.config
        off = (inputs["A_off"], inputs["G_off"]) if cfg["approx"] == "tridiag" else (None, None)
        return make_inverse(cfg["approx"], inputs["A"], inputs["G"], *off, gamma=inputs["gamma"],
                            damping=cfg["damping_type"], method="auto", inverse_dtype=self.inverse_dtype,
                            names=self.names)

    def step(self, x: Tensor | None = None, y: Tensor | None = None) -> PreconditionerInfo:
        """Precondition the current gradients in place; call after ``loss.backward()`` and
        before ``optimizer.step()``. ``x``: the input batch (default: the last one the model
        saw); ``y``: its targets (needed only with ``stats_mode="empirical"``)."""
        t0 = time.perf_counter()
        self._apply_pending()
        if x is None:
            x = self._last_input
            if x is None:
                how = ("the hook was removed" if self._hook is None else
                       "no input batch was recorded (no forward pass with gradients enabled and a tensor as its "
                       "first argument)")
                raise KFACError(
                    f"KFACPreconditioner.step(): {how}, so there is no input batch for the statistics: "
                    "call model(x) first or pass x= to pre.step()"
                )
        elif not isinstance(x, Tensor):
            raise TypeError(f"x must be a tensor (the input batch), got {type(x).__name__}")
        self._check_grads()
        cfg = self.config
        k = self.steps
        stats_n = 0
        if k % cfg["factor_update_freq"] == 0 or self.factors.k == 0:
            stats_n = self._statistics(x, y)
        t1 = time.perf_counter()
        if self.factors.k == 0:
            raise KFACError("KFACPreconditioner: no finite curvature statistics yet, so there is no inverse to apply")
        rebuilt = False
        if self.inverse is None or self._rebuild or k % cfg["inverse_update_freq"] == 0:
            self._build_inverse()
            rebuilt = True
        t2 = time.perf_counter()
        with torch.no_grad():
            V = [l.grad_matrix() for l in self.layers]
            U = self.inverse.apply(V)
            for l, u in zip(self.layers, U):
                w, b = l.from_matrix(u)
                l.module.weight.grad.copy_(w)
                if b is not None:
                    if l.module.bias.grad is None:
                        l.module.bias.grad = b.clone()
                    else:
                        l.module.bias.grad.copy_(b)
        self.steps += 1
        t3 = time.perf_counter()
        return PreconditionerInfo(self.steps, stats_n > 0, rebuilt, float(self._inverse_inputs["gamma"]), stats_n,
                                  {"stats": t1 - t0, "inverse": t2 - t1, "precondition": t3 - t2, "total": t3 - t0})

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step count, settings (a callable damping is not saved), running factors, the inputs
        of the current inverse and the sampling generator: with the model's and the optimizer's
        own state, enough to resume bit for bit. Loadable with ``weights_only=True``."""
        with self._lock:
            pending = dict(self._pending)
        cfg = {k: v for k, v in self.config.items() if not callable(v)}
        gen_state = self._generator.get_state() if self._generator is not None else self._generator_state
        return {
            "format": "kfac_lab.KFACPreconditioner/1",
            "steps": self.steps,
            "names": list(self.names),
            "config": cfg,
            "pending": {k: v for k, v in pending.items() if not callable(v)},
            "factors": self.factors.state_dict(),
            "inverse_inputs": None if self._inverse_inputs is None else
            {k: (list(v) if isinstance(v, list) else v) for k, v in self._inverse_inputs.items()},
            "rebuild": self._rebuild,
            "generator": gen_state,
            "seed": self.seed,
            "events": [dict(e) for e in self.events],
        }

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``, all or nothing: checked first against this model (layer names,
        settings, factor shapes, finiteness, the generator state), the first mismatch named in a
        ``StateError``; if anything fails the preconditioner is exactly as it was."""
        v = check_preconditioner_state(self, state)
        with all_or_nothing(self, generators=[self._generator]):
            self.factors = v["factors"]
            self.config.update(v["config"])
            self.steps, self.seed, self.events = v["steps"], v["seed"], v["events"]
            inputs = v["inverse_inputs"]
            self.inverse = None if inputs is None else self._make_inverse(inputs)
            self._inverse_inputs = inputs
            self._rebuild = v["rebuild"]
            self._generator = None
            self._generator_state = v["generator"]
            with self._lock:
                self._pending = v["pending"]

    def __repr__(self) -> str:
        c = self.config
        return (f"KFACPreconditioner({self.loss.name}, approx={c['approx']!r}, damping={c['damping']!r}, "
                f"{len(self.layers)} layers, step={self.steps})")
