"""K-FAC as a gradient preconditioner for any torch optimizer (docs/preconditioner.md):

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, loss="categorical", lr=sgd)
    for x, y in batches:
        sgd.zero_grad()
        loss_fn(model(x), y).backward()
        pre.step()          # .grad ← ν F̃⁻¹ .grad on every K-FAC layer
        sgd.step()          # any torch.optim optimizer, with any LR scheduler

This is the "plain" K-FAC many users expect: no re-scaling by the exact Fisher, no quadratic-model
momentum (those are :class:`kfac_lab.optim.KFAC`'s, M&G 2015 §6.4, §7); the optimizer's learning
rate (and momentum) take their place. What it does, per step k (counted from 0):

1. statistics (every ``factor_update_freq`` steps): one extra forward and backward pass on the
   first ``stats_fraction`` (τ₁ = 1/8) of the latest input batch with targets **sampled** from
   the model's predictive distribution (M&G 2015 §5), giving ``Ā`` and ``G`` blended into
   running estimates with ``ε = min(1 − 1/k, ema_decay)`` (§5); the user's ``.grad`` is not touched;
2. inverses (on the first step and every ``inverse_update_freq`` steps, and after a change of
   γ or approximation): the damped block-diagonal ``F̆⁻¹`` or block-tridiagonal ``F̂⁻¹``
   (§4.2, §4.3), with factored Tikhonov damping ``γ`` (§6.3) or exact Tikhonov (block-diagonal only);
   or EKFAC's (George et al. 2018): its eigenbasis refreshed here, its scales re-estimated from every
   step's statistics, damped exactly (``s + γ²``);
3. each K-FAC layer's ``[∂W | ∂b]`` is replaced by ``ν F̃⁻¹ [∂W | ∂b]`` in the parameters' ``.grad``
   (modules in ``exclude`` keep their gradients), where ``ν ≤ 1`` is the KL-clipping scale
   (Ba, Grosse & Martens 2017): the step ``δ = −η ν F̃⁻¹∇h`` the optimizer takes with learning
   rate ``η`` keeps ``δᵀ F̃ δ ≤ kl_clip`` (its predicted KL divergence ``½ δᵀFδ`` below
   ``kl_clip / 2``); ``ν = 1`` (the gradients bit for bit unscaled) whenever the step already does;
4. optionally (``adaptive_damping=True``, every ``damping_update_freq`` = T₁ steps, with
   ``pre.step(closure=...)``): the Levenberg–Marquardt rule (M&G 2015 §6.5) on ``λ = γ²``.

A batch with a non-finite gradient (or, on the first step, non-finite statistics) is rejected:
every ``.grad`` of the model is set to None, so ``optimizer.step()`` skips the step, and the
curvature statistics are left as they were; ``max_rejections`` rejections in a row raise
``NonFiniteError``.

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
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .. import checks
from ..curvature.engine import CurvatureEngine, subset_rows
from ..errors import KFACError, NonFiniteError
from .front_end import CurvatureFrontEnd
from .state_check import all_or_nothing, check_preconditioner_state
from .live import LiveSettings
from .preconditioner_settings import (ALIASES, MAX_LAMBDA, MIN_LAMBDA, _REBUILD, _VALIDATORS, _check_combination,
                                     _check_dtype, _check_freq, _check_gamma, _plain, _positive)
from .trust import kl_clip_scale, levenberg_marquardt, omega1, reduction_ratio

__all__ = ["KFACPreconditioner", "PreconditionerInfo"]


@dataclass
class PreconditionerInfo:
    """What one ``pre.step()`` did: ``step`` (1-based), whether the factors and the inverse
    were updated, the ``gamma`` of the inverse in use, the statistics batch size, the
    KL-clipping scale ``kl_scale`` (ν; 1.0 when the step was left as it was), ``quadratic``
    (``δᵀF̃δ`` of the unclipped step ``δ = −η F̃⁻¹∇h``; None when neither clipping nor adaptive
    damping needed it), ``rho`` and ``adapted_gamma``, the γ = √λ after the Levenberg–Marquardt
    rule, when it ran (``damping``: its deprecated old name), whether the step was ``rejected``
    (and why: ``reason``), and seconds spent
    (``"stats"``, ``"inverse"``, ``"precondition"``, ``"damping"``, ``"total"``; launch times on a GPU)."""

    step: int
    stats_updated: bool
    inverses_refreshed: bool
    gamma: float
    stats_batch: int
    kl_scale: float = 1.0
    quadratic: float | None = None
    rho: float | None = None
    adapted_gamma: float | None = None
    rejected: bool = False
    reason: str = ""
    timings: dict = field(default_factory=dict)

    @property
    def damping(self) -> float | None:
        """Deprecated: ``adapted_gamma`` (this is γ; damping is λ = γ² everywhere in kfac_lab)."""
        warnings.warn("PreconditionerInfo.damping is the deprecated name of adapted_gamma (it is γ, not λ) and will "
                      "be removed in the next release", DeprecationWarning, stacklevel=2)
        return self.adapted_gamma


class KFACPreconditioner(CurvatureFrontEnd, LiveSettings):
    """Replace the gradients of a model's ``nn.Linear`` layers by ``ν F̃⁻¹ ∇`` (see the module doc
    and docs/preconditioner.md).

    Parameters
    ----------
    model: the network; its trainable parameters must live in ``nn.Linear`` layers or in
        modules listed in ``exclude`` (names or modules; their gradients are left as they are).
    loss: the predictive distribution of the model's outputs — ``"categorical"`` (softmax on
        logits), ``"bernoulli"`` (sigmoid on logits), ``"gaussian"`` (unit variance) or a
        ``Loss``. It must match the loss you train with, else ``F`` is the wrong matrix.
    lr: the learning rate your optimizer applies to the preconditioned gradients: the torch
        optimizer itself (recommended: its ``param_groups`` are read at every step, so LR
        schedulers and per-group rates are followed), a number, or a callable ``step -> lr``.
        Needed by KL-clipping and adaptive damping (the step they judge is ``−lr·ν F̃⁻¹∇h``).
    kl_clip: κ, the bound on ``δᵀF̃δ`` of that step (Ba, Grosse & Martens 2017; the predicted
        KL divergence of the step is ``½δᵀFδ``); default 1e-3, None turns clipping off.
    approx: ``"blockdiag"`` (§4.2), ``"tridiag"`` (§4.3) or ``"ekfac"`` (George et al. 2018: the
        Kronecker eigenbasis with re-estimated scales ``s``, damped exactly as ``s + γ²``).
    gamma: γ, added as factored Tikhonov ``(Ā + πγI) ⊗ (G + γ/π I)`` (``damping_type=
        "factored"``, M&G 2015 §6.3) or as ``Ā⊗G + γ²I`` (``"tikhonov"``, block-diagonal only);
        or a callable ``step -> γ`` (0-based step), evaluated whenever the inverse is rebuilt.
        Default 0.03 (measured: docs/preconditioner.md). ``damping=`` is its deprecated old name
        (one release, with a ``DeprecationWarning``): ``damping`` is λ = γ² in kfac_lab.
    adaptive_damping: adapt ``λ = γ²`` by the Levenberg–Marquardt rule (M&G 2015 §6.5) every
        ``damping_update_freq`` (T₁ = 5) steps; ``pre.step(closure=...)`` must then give the loss.
    factor_update_freq, inverse_update_freq: statistics every that many steps; inverses on the
        first step, then every that many steps (T₃ = 20 in the paper).
    stats_fraction: share of the batch for the statistics (τ₁ = 1/8), at least one case.
    ema_decay: the cap of ε in the running averages (0.95).
    stats_mode: ``"sampled"`` (the Fisher: targets drawn from the model; default),
        ``"empirical"`` (training targets — pass ``y=`` to ``step``; the empirical Fisher,
        a different and worse matrix), ``"exact"`` (expectation over the output distribution).
    max_rejections: that many rejected (non-finite) steps in a row raise ``NonFiniteError``.
    factor_dtype, inverse_dtype: precision of the factors and of the inverses (default: the
        parameters' dtype).
    seed: seeds the generator of the sampled targets (on the model's device).
    weight_sharing: the factors of convolutions (and Linear layers on ``(N, …, d)`` inputs):
        ``"expand"`` (KFC; default) or ``"reduce"`` (docs/algorithm.md#weight-sharing). Fixed for
        the preconditioner's life (saved in its state; a resume with the other one is refused).
        A model with a convolution refuses ``approx="tridiag"`` (``curvature.tridiag_unavailable``).

    The curvature (layers, sampled targets, running factors, the inverse and its refresh) is
    ``self.curvature``, the :class:`~kfac_lab.curvature.engine.CurvatureEngine` ``KFAC`` uses too.
    """

    def __init__(self, model: nn.Module, loss="categorical", *, lr=None, kl_clip: float | None = 1e-3,
                 approx: str = "blockdiag", gamma: float | Callable[[int], float] | None = None,
                 damping_type: str = "factored", adaptive_damping: bool = False, damping_update_freq: int = 5,
                 factor_update_freq: int = 1, inverse_update_freq: int = 20, stats_fraction: float = 1 / 8,
                 ema_decay: float = 0.95, stats_mode: str = "sampled", exclude: Iterable = (),
                 max_rejections: int = 10, factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None, seed: int = 0, damping=None,
                 weight_sharing: str = "expand"):
        gamma = checks.renamed("KFACPreconditioner", "damping", "gamma", damping, gamma, default=0.03,
                               why="damping is λ = γ² everywhere in kfac_lab")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.config = {k: _VALIDATORS[k](v) for k, v in dict(
            gamma=gamma, approx=approx, damping_type=damping_type, factor_update_freq=factor_update_freq,
            inverse_update_freq=inverse_update_freq, stats_fraction=stats_fraction, stats_mode=stats_mode,
            kl_clip=kl_clip, lr=lr, adaptive_damping=adaptive_damping,
            damping_update_freq=damping_update_freq).items()}
        _check_combination(self.config)
        self.factor_dtype = _check_dtype("factor_dtype", factor_dtype)
        self.inverse_dtype = _check_dtype("inverse_dtype", inverse_dtype)
        self.max_rejections = _check_freq("max_rejections", max_rejections)
        # the adjacent cross factors are always kept (switching to "tridiag" needs no new statistics)
        self.curvature = CurvatureEngine(model, loss, exclude, pairs="tridiag", ema_decay=ema_decay, capture="func",
                                         factor_dtype=self.factor_dtype, inverse_dtype=self.inverse_dtype, seed=seed,
                                         weight_sharing=weight_sharing)
        self.curvature.check_approx(self.config["approx"])
        self.names = [l.name for l in self.layers]
        self._learning_rates(self.config["lr"], 0)  # an optimizer that does not train these layers fails now
        self.steps = 0
        self._init_live()
        self._rejections = 0  # rejected steps in a row
        self._last_input: Tensor | None = None
        self._recording = False  # True during our own forward pass (ignored by the hook)
        self._hook = model.register_forward_pre_hook(self._remember_input, with_kwargs=True)

    # -- the engine's inverse and generator seed --------------------------------------------------
    inverse = property(lambda self: self.curvature.inverse, doc="The damped inverse in use (None before the first step).")
    seed = property(lambda self: self.curvature.seed, lambda self, v: setattr(self.curvature, "seed", v),
                    doc="The seed of the sampled targets' generator.")

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

    # -- live settings (optim/live.py) -------------------------------------------------------------
    live_settings = tuple(_VALIDATORS)
    renamed_settings = ALIASES

    def settings(self) -> dict:
        """Every setting by name (a copy): ``gamma``, ``approx``, ``damping_type``,
        ``factor_update_freq``, ``inverse_update_freq``, ``stats_fraction``, ``stats_mode``,
        ``kl_clip``, ``lr``, ``adaptive_damping``, ``damping_update_freq``, all live. A new γ or
        approximation rebuilds the inverse at the next step from the current statistics (the
        adjacent cross factors are always kept, so switching to ``"tridiag"`` needs no new statistics)."""
        return dict(self.config)

    def _check_settings(self, merged: dict, changes: dict) -> dict:
        checked = {k: _VALIDATORS[k](v) for k, v in changes.items()}
        merged = {**self.config, **merged, **checked}
        _check_combination(merged)
        self.curvature.check_approx(merged["approx"])
        if "lr" in checked:
            self._learning_rates(merged["lr"], self.steps)
        return checked

    def _apply_settings(self, changes: dict) -> dict:
        changed = {k: v for k, v in changes.items() if self.config[k] is not v and self.config[k] != v}
        self.config.update(changed)
        if _REBUILD & set(changed):
            self.curvature.stale = True
        return changed

    def _next_step(self) -> int:
        return self.steps + 1

    # -- the step ---------------------------------------------------------------------------------
    def gamma(self, step: int | None = None) -> float:
        """γ at a 0-based step (the current one by default)."""
        d = self.config["gamma"]
        k = self.steps if step is None else step
        return float(_check_gamma(d(k)) if callable(d) else d)

    def _learning_rates(self, lr, step: int) -> list[tuple[float, float]] | None:
        """``(η of W, η of b)`` per K-FAC layer from the ``lr`` setting (None when it is None)."""
        if lr is None:
            return None
        if isinstance(lr, torch.optim.Optimizer):
            rates = {id(p): group["lr"] for group in lr.param_groups for p in group["params"]}
            out = []
            for l in self.layers:
                found = [rates.get(id(p)) for p in l.params]
                if any(r is None for r in found):
                    raise KFACError(
                        f"lr: the optimizer given does not train layer {l.name!r} (its parameters are in none of "
                        "its param_groups): pass the optimizer that steps this model, or lr=<number>"
                    )
                w, b = (float(r) for r in found) if len(found) == 2 else (float(found[0]),) * 2
                out.append((w, b))
            return out
        value = lr(step) if callable(lr) else lr
        if not _positive(value):
            raise ValueError(f"lr({step}) returned {value!r}: the learning rate must be a positive number")
        return [(float(value), float(value))] * len(self.layers)

    def _check_grads(self) -> None:
        missing = [l.name for l in self.layers if l.module.weight.grad is None]
        if missing:
            raise KFACError(
                f"layers {missing} have no gradient: call loss.backward() first (then pre.step(), "
                "then optimizer.step())"
            )

    def _input(self, x: Tensor | None) -> Tensor:
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
        return x

    def _statistics(self, x: Tensor, y: Tensor | None):
        """Per-case ``(a, g)`` of the statistics subset (not yet blended in) and a 0-d tensor that
        is finite exactly when every factor entry will be."""
        cfg = self.config
        n = subset_rows(int(x.shape[0]), cfg["stats_fraction"])
        xs = x[:n].detach()
        ys = y[:n] if y is not None else None
        if cfg["stats_mode"] == "empirical" and y is None:
            raise KFACError("stats_mode='empirical' uses the training targets: pass them as pre.step(y=...)")
        self._recording = True
        try:
            with torch.enable_grad():
                a, g = self.curvature.statistics(xs, ys, cfg["stats_mode"])
        finally:
            self._recording = False
        self.curvature.check_approx(cfg["approx"])  # a Linear layer first seen sharing weights
        with torch.no_grad():
            check = self.curvature.statistics_trace((a, g))
        return a, g, check

    def _build_inverse(self) -> float:
        gamma = self.gamma()
        cfg = self.config
        self.curvature.adopt(self.curvature.refresh(cfg["approx"], [gamma], cfg["damping_type"])[0], gamma)
        return gamma

    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure: Callable[[], object] | None = None
             ) -> PreconditionerInfo:
        """Precondition the current gradients in place; call after ``loss.backward()`` and
        before ``optimizer.step()``. ``x``: the input batch (default: the last one the model
        saw); ``y``: its targets (needed only with ``stats_mode="empirical"``); ``closure``: a
        function of no arguments returning the loss on this batch (needed with
        ``adaptive_damping=True``, else unused; it runs under ``torch.no_grad()`` and must not
        touch the gradients). Returns a :class:`PreconditionerInfo`; a batch with a non-finite
        gradient is rejected (every ``.grad`` set to None, the statistics unchanged, a warning)."""
        t0 = time.perf_counter()
        self._apply_pending()
        x = self._input(x)
        self._check_grads()
        cfg = self.config
        if cfg["adaptive_damping"] and closure is None:
            raise KFACError("adaptive_damping=True evaluates the loss after a trial step: pass "
                            "pre.step(closure=lambda: criterion(model(x), y)), or configure(adaptive_damping=False)")
        k = self.steps
        lrs = self._learning_rates(cfg["lr"], k)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        grads_ok = torch.stack([torch.isfinite(g).all() for g in grads]).all()
        stats = None
        if k % cfg["factor_update_freq"] == 0 or self.factors.k == 0:
            stats = self._statistics(x, y)
        # one host synchronisation: are the gradients, and the statistics, finite?
        flags = torch.stack([grads_ok, torch.isfinite(stats[2]) if stats else grads_ok]).tolist()
        if not flags[0]:
            return self._reject("non-finite gradient (check the batch for NaN/inf, lower the learning rate)", t0)
        stats_n = 0
        if stats is not None and flags[1]:
            self.curvature.update_factors(stats[:2])
            stats_n = int(stats[0][0].shape[0])
        elif stats is not None:  # a NaN would poison the running averages for good
            if self.factors.k == 0:
                return self._reject("non-finite curvature statistics and none from earlier steps", t0)
            self._event("skipped_statistics", k + 1, reason="non-finite curvature statistics")
            warnings.warn(
                f"KFACPreconditioner: step {k + 1}: the curvature statistics are not finite; "
                "kept the previous factors (check the inputs; lower the learning rate)",
                RuntimeWarning, stacklevel=2,
            )
        t1 = time.perf_counter()
        rebuilt = False
        if self.curvature.refresh_due(k, cfg["inverse_update_freq"]):
            self._build_inverse()
            rebuilt = True
        t_scales = time.perf_counter()
        self.curvature.update_scales()  # EKFAC: this step's scales, in the basis now in use (timed as "stats")
        t2 = time.perf_counter()
        t_scales = t2 - t_scales
        gamma = self.curvature.inverse_gamma
        adapt = cfg["adaptive_damping"] and (k + 1) % cfg["damping_update_freq"] == 0
        with torch.no_grad():
            V = [l.grad_matrix() for l in self.layers]
            U = self.inverse.apply(V)
            nu, q, sums = 1.0, None, None
            if lrs is not None and (cfg["kl_clip"] is not None or adapt):
                sums = self._step_sums(U, V, lrs)  # [Σ η ⟨U, V⟩, Σ η² ⟨U, V⟩] over the K-FAC parameters
                if not all(math.isfinite(v) for v in sums):
                    return self._reject("non-finite preconditioned gradient (raise the damping)", t0,
                                        statistics="this batch's finite statistics were kept")
                q = sums[1]
                nu = kl_clip_scale(q, cfg["kl_clip"])
        t3 = time.perf_counter()
        rho = None
        if adapt:
            rho = self._adapt_damping(U, lrs, nu, sums, closure)
        t4 = time.perf_counter()
        with torch.no_grad():
            for l, u in zip(self.layers, U):
                if nu != 1.0:
                    u.mul_(nu)
                w, b = l.from_matrix(u)
                l.module.weight.grad.copy_(w)
                if b is not None:
                    if l.module.bias.grad is None:
                        l.module.bias.grad = b.clone()
                    else:
                        l.module.bias.grad.copy_(b)
        self.steps += 1
        self._rejections = 0
        t5 = time.perf_counter()
        return PreconditionerInfo(
            self.steps, stats_n > 0, rebuilt, gamma, stats_n, kl_scale=nu, quadratic=q, rho=rho,
            adapted_gamma=self.gamma() if adapt else None,
            timings={"stats": t1 - t0 + t_scales, "inverse": t2 - t1 - t_scales, "precondition": (t3 - t2) + (t5 - t4),
                     "damping": t4 - t3, "total": t5 - t0})

    def _step_sums(self, U: list[Tensor], V: list[Tensor], lrs) -> list[float]:
        """``[Σ_p η_p ⟨U_p, V_p⟩, Σ_p η_p² ⟨U_p, V_p⟩]`` over the K-FAC parameters ``p`` (W and b of
        each layer): ``−∇hᵀδ`` and ``δᵀF̃δ`` of the step ``δ = −η F̃⁻¹∇h`` (``V = F̃ U``; exact when
        the layers share one η, else the block-tridiagonal F̃'s cross-layer terms are left out)."""
        terms = []
        for l, u, v, (lw, lb) in zip(self.layers, U, V, lrs):
            uw, ub = l.from_matrix(u)
            vw, vb = l.from_matrix(v)
            dw = torch.sum(uw * vw)
            terms.append(torch.stack([lw * dw, lw * lw * dw]))
            if ub is not None:
                db = torch.dot(ub, vb)
                terms.append(torch.stack([lb * db, lb * lb * db]))
        return torch.stack(terms).sum(0).double().tolist()

    def _adapt_damping(self, U: list[Tensor], lrs, nu: float, sums: list[float], closure) -> float:
        """The Levenberg–Marquardt rule (M&G 2015 §6.5) on ``λ = γ²``: ``h`` at ``θ`` and at ``θ + δ``
        (the step the optimizer is about to take, ``δ = −η ν F̃⁻¹∇h`` on the K-FAC layers) from
        ``closure``, ``M(δ) − M(0) = −ν Σ η⟨U, V⟩ + ½ ν² Σ η²⟨U, V⟩`` (the damped ``F̃`` as the
        curvature), then ``λ ← ω₁λ`` or ``λ/ω₁``; the new γ = √λ is used from the next step."""
        cfg = self.config
        params = [p for l in self.layers for p in l.params]
        backup = [p.detach().clone() for p in params]
        grads_before = [p.grad for p in params]
        try:
            h_old = self._closure_value(closure)
            with torch.no_grad():
                for l, u, (lw, lb) in zip(self.layers, U, lrs):
                    uw, ub = l.from_matrix(u)
                    l.module.weight.add_(uw, alpha=-lw * nu)
                    if ub is not None:
                        l.module.bias.add_(ub, alpha=-lb * nu)
            h_new = self._closure_value(closure)
        finally:
            with torch.no_grad():
                for p, b in zip(params, backup):
                    p.copy_(b)
        if any(p.grad is not g for p, g in zip(params, grads_before)):
            raise KFACError("the closure changed the gradients (zero_grad() or backward() inside it?): it must only "
                            "compute the loss, e.g. closure=lambda: criterion(model(x), y)")
        model_change = -nu * sums[0] + 0.5 * nu * nu * sums[1]
        rho = reduction_ratio(h_new, h_old, model_change) if math.isfinite(h_old) else -math.inf
        lam = levenberg_marquardt(self.gamma() ** 2, rho, omega1(cfg["damping_update_freq"]), MIN_LAMBDA, MAX_LAMBDA)
        gamma = math.sqrt(lam)
        if gamma != self.config["gamma"]:
            self.config["gamma"] = gamma
            self.curvature.stale = True
        return rho

    @staticmethod
    def _closure_value(closure) -> float:
        try:
            with torch.no_grad():
                value = closure()
        except RuntimeError as exc:
            if "does not require grad" in str(exc):
                raise KFACError("the closure ran backward(): under adaptive damping it runs under torch.no_grad() "
                                "and must only return the loss, e.g. closure=lambda: criterion(model(x), y)") from exc
            raise
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise KFACError(f"the closure must return the loss as a number or a 1-element tensor, got shape "
                                f"{tuple(value.shape)}")
            return float(value)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise KFACError(f"the closure must return the loss (a number or a 1-element tensor), got {type(value).__name__}")

    def _reject(self, reason: str, t0: float, statistics: str = "the curvature statistics are unchanged"
                ) -> PreconditionerInfo:
        """Skip this step: every ``.grad`` of the model set to None (torch optimizers then leave the
        parameters and their own state alone), the step count unchanged."""
        self._rejections += 1
        step = self.steps + 1
        for p in self.model.parameters():
            p.grad = None
        self._event("rejected", step, reason=reason)
        warnings.warn(f"KFACPreconditioner: step {step} rejected ({reason}); the model's gradients were set to None, "
                      f"so optimizer.step() leaves the parameters unchanged; {statistics}",
                      RuntimeWarning, stacklevel=3)
        if self._rejections >= self.max_rejections:
            raise NonFiniteError(
                f"KFACPreconditioner rejected {self._rejections} steps in a row (last: {reason}): the data or the "
                "model produce non-finite values; check the batches for NaN/inf, lower the learning rate, or "
                "raise the damping"
            )
        gamma = self.curvature.inverse_gamma if self.curvature.inverse is not None else self.gamma()
        return PreconditionerInfo(step, False, False, gamma, 0, rejected=True, reason=reason,
                                  timings={"total": time.perf_counter() - t0})

    # -- checkpoints ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Step count, settings (a callable γ is not saved), running factors, the inputs
        of the current inverse and the sampling generator: with the model's and the optimizer's
        own state, enough to resume bit for bit (and, last and only while EKFAC runs, ``ekfac``: its
        basis and scales). Loadable with ``weights_only=True``."""
        pending = self.pending()
        cfg = {k: v for k, v in self.config.items() if _plain(v)}  # not a callable γ or an optimizer
        engine = self.curvature.state_dict()
        inputs = engine["inverse_inputs"]
        state = {
            "format": "kfac_lab.KFACPreconditioner/1",
            "steps": self.steps,
            "names": list(self.names),
            "config": cfg,
            "pending": {k: v for k, v in pending.items() if _plain(v)},
            "factors": engine["factors"],
            "inverse_inputs": None if inputs is None or engine["inverse_gamma"] is None else
            {**{k: (list(v) if isinstance(v, list) else v) for k, v in inputs.items()}, "gamma": engine["inverse_gamma"]},
            "rebuild": engine["stale"],
            "generator": engine["generator"],
            "seed": self.seed,
            "events": [dict(e) for e in self.events],
            "weight_sharing": engine["weight_sharing"],
        }
        if engine["ekfac"] is not None:
            state["ekfac"] = engine["ekfac"]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``, all or nothing: checked first against this model (layer names,
        settings, factor shapes, finiteness, the generator state), the first mismatch named in a
        ``StateError``; if anything fails the preconditioner is exactly as it was."""
        v = check_preconditioner_state(self, state)
        with all_or_nothing(self, self.curvature):
            self.curvature.load_checked(v)
            self.config.update(v["config"])
            self.steps, self.seed, self.events = v["steps"], v["seed"], v["events"]
            if v["inverse_inputs"] is not None:
                gamma = v["inverse_gamma"]
                self.curvature.adopt(self.curvature.inverse_from_inputs(gamma, self.config["damping_type"]), gamma)
                self.curvature.stale = v["stale"]
            self._set_pending(v["pending"])

    def __repr__(self) -> str:
        c = self.config
        adaptive = ", adaptive" if c["adaptive_damping"] else ""
        return (f"KFACPreconditioner({self.loss.name}, approx={c['approx']!r}, gamma={c['gamma']!r}{adaptive}, "
                f"kl_clip={c['kl_clip']!r}, {len(self.layers)} layers, step={self.steps})")
