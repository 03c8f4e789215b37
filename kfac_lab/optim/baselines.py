"""First-order baselines with K-FAC's interface (M&G 2015 §13): ``info = opt.step(x, y)``.

Both minimise the paper's objective ``h(θ) = mean NLL + ½ η ‖θ‖²`` (``η`` = ``weight_decay``,
1e-5 in the experiments; the penalty covers every trainable parameter, biases included):

* :class:`SGDNesterov` — Nesterov's accelerated gradient in the form of Sutskever et al.
  (2013), with their momentum schedule ``μ_t = min(1 − 2^{−1−log₂(⌊t/250⌋+1)}, μ_max)``.
* :class:`Adam` — Kingma & Ba (2015), the ℓ2 term in the gradient (coupled, like
  ``torch.optim.Adam(weight_decay=η)``), bias-corrected moments.

Each ``step`` does one forward and one backward pass, one host sync (the loss as a float,
checked together with the gradient for NaN/inf), and the update. A step whose loss or gradient
is not finite is rejected: parameters and optimizer state untouched, a ``RuntimeWarning``, an
event in ``opt.events``; ``max_rejections`` rejections in a row raise ``NonFiniteError``.
``configure(...)`` may be called from any thread; changes apply at the start of the next step.
The model's ``.grad`` fields are never read or written (gradients come from ``torch.autograd.grad``).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .. import checks
from ..curvature import get_loss
from ..errors import KFACError, NonFiniteError
from .live import LiveSettings
from .schedules import sutskever_momentum
from .state_check import check_baseline_state

__all__ = ["Adam", "BaselineInfo", "SGDNesterov"]


@dataclass
class BaselineInfo:
    """What one ``step`` did (field names as in K-FAC's ``StepInfo``).

    ``step``: the iteration number (1-based count of accepted steps so far; a rejected step
    reports the number it would have had). ``loss``: the mini-batch mean NLL and ``objective``
    the paper's ``h`` = loss + ½η‖θ‖², both before the update at the point where the gradient
    was taken — for SGD-Nesterov the look-ahead point ``θ + μv`` (``= θ`` on the first step).
    ``lr``, ``mu``: the learning rate and momentum used (``mu`` is β₁ for Adam).
    ``batch_size``: cases in ``x``. ``timings``: seconds for ``"grad"`` (forward + backward),
    ``"update"`` and ``"total"`` (on a GPU the parts are launch times; ``"total"`` includes the
    one host sync). ``rejected``/``reason``: the step was refused (non-finite loss or gradient;
    parameters and optimizer state untouched).
    """

    step: int
    loss: float
    objective: float
    lr: float
    mu: float
    batch_size: int
    timings: dict = field(default_factory=dict)
    rejected: bool = False
    reason: str = ""

    def as_dict(self) -> dict:
        """Flat scalars (for logging to a store): timings as ``time_<phase>``."""
        d = {k: v for k, v in self.__dict__.items() if k != "timings"}
        d.update({f"time_{k}": v for k, v in self.timings.items()})
        return d


def _check_positive(name: str, value) -> float:
    return checks.number(name, value, positive=True, need="a positive finite number")


def _check_nonneg(name: str, value) -> float:
    return checks.number(name, value, minimum=0.0, need="a finite number >= 0")


def _check_unit(name: str, value) -> float:
    return checks.number(name, value, minimum=0.0, below=1.0, need="in [0, 1)")


class _Baseline(LiveSettings, ABC):
    """Shared machinery: the forward/backward, rejection of non-finite steps, checkpoints; live
    settings through :class:`~kfac_lab.optim.live.LiveSettings` (every setting is live).
    Subclasses implement ``_check_one``, ``_momentum``, ``_prepare`` / ``_restore`` /
    ``_update`` and their state."""

    kind = "baseline"

    def __init__(self, model: nn.Module, loss, weight_decay: float, max_rejections: int):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.loss = get_loss(loss)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        if isinstance(max_rejections, bool) or not isinstance(max_rejections, int) or max_rejections < 1:
            raise ValueError(f"max_rejections must be an integer >= 1, got {max_rejections!r}")
        self.max_rejections = max_rejections
        self.hyper: dict = {"weight_decay": _check_nonneg("weight_decay", weight_decay)}
        self.k = 0  # accepted steps
        self.consecutive_rejects = 0
        self._init_live()

    # -- live settings (optim/live.py) ------------------------------------------------------------
    @property
    def live_settings(self) -> tuple[str, ...]:
        return tuple(self.hyper)

    def settings(self) -> dict:
        """Every setting by name (a copy); all of them may change live."""
        return dict(self.hyper)

    def _check_one(self, key: str, value):
        """The checked value of one setting (subclasses add theirs)."""
        if key == "weight_decay":
            return _check_nonneg("weight_decay", value)
        raise ValueError(f"{type(self).__name__}: unknown setting {key!r}; known: {sorted(self.hyper)}")

    def _check_settings(self, merged: dict, changes: dict) -> dict:
        return {k: self._check_one(k, v) for k, v in changes.items()}

    def _apply_settings(self, changes: dict) -> dict:
        changed = {k: v for k, v in changes.items() if self.hyper.get(k) != v}
        self.hyper.update(changes)
        return changed

    def _next_step(self) -> int:
        return self.k + 1

    # -- the step ---------------------------------------------------------------------------------
    def _objective(self, x: Tensor, y: Tensor, wd: float) -> tuple[Tensor, Tensor, list[Tensor]]:
        checks.batch_dtype(x, self.params[0].dtype, f"{type(self).__name__}.step")
        with torch.enable_grad():
            z = self.model(x)
            if not isinstance(z, Tensor):
                raise TypeError(f"the model returned {type(z).__name__}; the baselines need a tensor of outputs")
            nll = self.loss.checked_nll(z, y, f"{type(self).__name__}.step(x, y)")
            grads = torch.autograd.grad(nll, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        with torch.no_grad():
            nll = nll.detach()
            h = nll
            if wd:
                sq = torch.stack([p.detach().pow(2).sum().to(h.dtype) for p in self.params]).sum()
                h = h + 0.5 * wd * sq
                torch._foreach_add_(grads, [p.detach() for p in self.params], alpha=wd)
        return nll, h, grads

    def step(self, x: Tensor, y: Tensor) -> BaselineInfo:
        """One iteration on the mini-batch ``(x, y)``; returns a :class:`BaselineInfo`."""
        t0 = time.perf_counter()
        self._apply_pending()
        hp = dict(self.hyper)
        mu = self._momentum(hp)
        self._prepare(hp, mu)
        try:
            nll, h, grads = self._objective(x, y, hp["weight_decay"])
        except BaseException:
            self._restore()
            raise
        t1 = time.perf_counter()
        with torch.no_grad():
            gsq = torch.stack([g.pow(2).sum().to(h.dtype) for g in grads]).sum()
            loss, objective, gsum = torch.stack([nll, h.to(nll.dtype), gsq.to(nll.dtype)]).tolist()  # the one host sync
        m = int(x.shape[0]) if x.dim() else 1
        if not (math.isfinite(objective) and math.isfinite(gsum)):
            self._restore()
            return self._reject(loss, objective, gsum, hp, mu, m, t0)
        self.consecutive_rejects = 0
        with torch.no_grad():
            self._update(grads, hp, mu)
        self.k += 1
        t2 = time.perf_counter()
        return BaselineInfo(self.k, loss, objective, hp["lr"], mu, m,
                            {"grad": t1 - t0, "update": t2 - t1, "total": t2 - t0})

    def _reject(self, loss, objective, gsum, hp, mu, m, t0) -> BaselineInfo:
        self.consecutive_rejects += 1
        reason = "non-finite loss" if not math.isfinite(objective) else "non-finite gradient"
        self._event("rejected", self.k + 1, reason=reason, loss=loss, grad_norm_sq=gsum,
                    consecutive=self.consecutive_rejects)
        msg = (f"{type(self).__name__}: step {self.k + 1} rejected ({reason}, loss={loss}); "
               "parameters and optimizer state left unchanged")
        if self.consecutive_rejects >= self.max_rejections:
            raise NonFiniteError(
                f"{msg}; {self.consecutive_rejects} non-finite steps in a row: check the inputs for NaN/inf "
                f"and lower the learning rate (lr={hp['lr']})"
            )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return BaselineInfo(self.k + 1, loss, objective, hp["lr"], mu, m, {"total": time.perf_counter() - t0},
                            rejected=True, reason=reason)

    # -- subclass hooks -----------------------------------------------------------------------------
    @abstractmethod
    def _momentum(self, hp: dict) -> float:
        """The momentum of this step (reported as ``info.mu``)."""

    def _prepare(self, hp: dict, mu: float) -> None:
        """Before the forward pass (e.g. move to the look-ahead point)."""

    def _restore(self) -> None:
        """Undo ``_prepare`` (bit for bit) when the step is rejected."""

    @abstractmethod
    def _update(self, grads: list[Tensor], hp: dict, mu: float) -> None:
        """Apply the update in place (under ``torch.no_grad``), given ``∇h``."""

    # -- checkpoints --------------------------------------------------------------------------------
    @abstractmethod
    def _state_tensors(self) -> dict[str, list[Tensor]]:
        """The optimizer's buffers by name (one tensor per parameter), for checkpoints."""

    def state_dict(self) -> dict:
        """Everything needed to resume bit for bit (with the model's own ``state_dict``):
        step count, settings, optimizer buffers, events. Loadable with ``weights_only=True``."""
        pending = self.pending()
        return {
            "format": f"kfac_lab.{type(self).__name__}/1",
            "kind": self.kind,
            "k": self.k,
            "consecutive_rejects": self.consecutive_rejects,
            "hyper": {k: v for k, v in self.hyper.items() if not callable(v)},
            "pending": {k: v for k, v in pending.items() if not callable(v)},
            "buffers": {name: [t.detach().clone() for t in ts] for name, ts in self._state_tensors().items()},
            "events": [dict(e) for e in self.events],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``, all or nothing: kind, settings, every buffer's shape and
        finiteness are checked first (the first mismatch named in a ``StateError``); buffers are
        converted to the parameters' device and dtype and copied in only once all are ready."""
        v = check_baseline_state(self, state)
        mine = self._state_tensors()
        for name, ts in v["buffers"].items():  # same shapes, dtypes, devices: these copies cannot fail
            for dst, src in zip(mine[name], ts):
                dst.copy_(src)
        self.hyper.update(v["hyper"])
        self.k = v["k"]
        self.consecutive_rejects = v["consecutive_rejects"]
        self.events = v["events"]
        self._set_pending(v["pending"])

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({self.loss.name}, {shown}, step={self.k})"


class SGDNesterov(_Baseline):
    """SGD with Nesterov momentum, the paper's baseline (Sutskever et al. 2013, eqns 3–4):

    ``v ← μ_t v − ε ∇h(θ + μ_t v)``;  ``θ ← θ + v``

    implemented literally: the model holds θ between steps; ``step`` moves it to the
    look-ahead point ``θ + μ_t v`` for the forward/backward pass, then sets ``θ + v`` (θ is kept
    in a copy, so a rejected step restores it exactly). The gradient includes ``ηθ``.

    ``schedule``: ``"sutskever"`` — ``μ_t = min(1 − 2^{−1−log₂(⌊t/250⌋+1)}, mu_max)`` with
    ``t`` the number of accepted steps before this one (0, 1, …); a float — constant ``μ``;
    or a callable ``t -> μ``. ``info.mu`` is the ``μ_t`` used. ``configure(lr=, mu_max=,
    schedule=, weight_decay=)``.
    """

    kind = "sgd_nesterov"

    def __init__(self, model: nn.Module, loss, lr: float = 0.01, mu_max: float = 0.99,
                 weight_decay: float = 1e-5, schedule: str | float | Callable[[int], float] = "sutskever",
                 max_rejections: int = 10):
        super().__init__(model, loss, weight_decay, max_rejections)
        self.hyper.update(lr=self._check_one("lr", lr), mu_max=self._check_one("mu_max", mu_max),
                          schedule=self._check_one("schedule", schedule))
        self.velocity = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self._theta: list[Tensor] | None = None

    def _check_one(self, key, value):
        if key == "lr":
            return _check_positive("lr", value)
        if key == "mu_max":
            return _check_unit("mu_max", value)
        if key == "schedule":
            if isinstance(value, str):
                if value != "sutskever":
                    raise ValueError(f"schedule={value!r}: use 'sutskever', a constant momentum in [0, 1), or a callable t -> mu")
                return value
            if callable(value):
                return value
            return _check_unit("schedule (a constant momentum)", value)
        return super()._check_one(key, value)

    def _momentum(self, hp):
        sched = hp["schedule"]
        if sched == "sutskever":
            return sutskever_momentum(self.k, hp["mu_max"])
        if callable(sched):
            mu = sched(self.k)
            return _check_unit(f"schedule({self.k})", mu)
        return float(sched)

    def _prepare(self, hp, mu):
        with torch.no_grad():
            self._theta = [p.detach().clone() for p in self.params]
            if mu != 0.0 and self.k > 0:
                torch._foreach_add_(self.params, self.velocity, alpha=mu)

    def _restore(self):
        if self._theta is not None:
            with torch.no_grad():
                for p, t in zip(self.params, self._theta):
                    p.copy_(t)
            self._theta = None

    def _update(self, grads, hp, mu):
        # v ← μ v − ε g ; θ ← θ_saved + v
        torch._foreach_mul_(self.velocity, mu)
        torch._foreach_add_(self.velocity, grads, alpha=-hp["lr"])
        for p, t, v in zip(self.params, self._theta, self.velocity):
            p.copy_(t).add_(v)
        self._theta = None

    def _state_tensors(self):
        return {"velocity": self.velocity}


class Adam(_Baseline):
    """Adam (Kingma & Ba 2015) on ``h``: with ``g = ∇h(θ)`` (including ``ηθ``), at step ``t``:

    ``m ← β₁m + (1−β₁)g``;  ``v ← β₂v + (1−β₂)g²``;
    ``θ ← θ − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + eps)``

    (the same arithmetic as ``torch.optim.Adam`` with ``weight_decay=η``). ``info.mu`` is β₁.
    ``configure(lr=, betas=, eps=, weight_decay=)``.
    """

    kind = "adam"

    def __init__(self, model: nn.Module, loss, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-5, max_rejections: int = 10):
        super().__init__(model, loss, weight_decay, max_rejections)
        self.hyper.update(lr=self._check_one("lr", lr), betas=self._check_one("betas", betas),
                          eps=self._check_one("eps", eps))
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def _check_one(self, key, value):
        if key == "lr":
            return _check_positive("lr", value)
        if key == "eps":
            return _check_positive("eps", value)
        if key == "betas":
            try:
                b1, b2 = value
            except (TypeError, ValueError):
                raise ValueError(f"betas must be a pair (beta1, beta2) in [0, 1), got {value!r}") from None
            return (_check_unit("betas[0]", b1), _check_unit("betas[1]", b2))
        return super()._check_one(key, value)

    def _momentum(self, hp):
        return hp["betas"][0]

    def _update(self, grads, hp, mu):
        b1, b2 = hp["betas"]
        t = self.k + 1
        torch._foreach_lerp_(self.exp_avg, grads, 1.0 - b1)
        torch._foreach_mul_(self.exp_avg_sq, b2)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, grads, 1.0 - b2)
        bc1 = 1.0 - b1**t
        bc2_sqrt = math.sqrt(1.0 - b2**t)
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, hp["eps"])
        torch._foreach_addcdiv_(self.params, self.exp_avg, denom, -hp["lr"] / bc1)

    def _state_tensors(self):
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def state_dict(self) -> dict:
        sd = super().state_dict()
        for d in (sd["hyper"], sd["pending"]):
            if "betas" in d:
                d["betas"] = list(d["betas"])
        return sd
