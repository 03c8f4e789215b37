"""K-FAC, the whole of Algorithm 2 (M&G 2015 §9; docs/algorithm.md): statistics from sampled targets,
periodic damped inverses (block-diagonal, block-tridiagonal or EKFAC), the exact-Fisher quadratic
model for α and μ, the γ grid, and Levenberg–Marquardt λ — each switchable, live.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from .. import checks
from ..curvature.engine import CurvatureEngine, Share
from ..curvature.products import dot as _dot, func_jvp, gram_from_jvps, sq_norm as _sq_norm
from ..curvature.running_stats import frozen_running_stats
from ..errors import DecompositionError, NonFiniteError
from .config import LIVE, KFACConfig
from . import initial_damping as _auto
from .front_end import CurvatureFrontEnd
from .live import LiveSettings
from .state_check import Checker, all_or_nothing
from .quadratic import Products, coefficients, model_change
from .trust import bounded_by_objective, levenberg_marquardt, reduction_ratio


@dataclass
class StepInfo:
    """What one K-FAC iteration did. ``loss`` is the mean NLL at θ before the step and
    ``objective`` = loss + ½η‖θ‖² (the paper's h); ``model_change`` = M(δ) − M(0).
    ``plain_gradient``: the parameters left to the plain gradient (``Δ = −∇h``; those of the
    modules in ``exclude``), by name; empty when every parameter is preconditioned."""

    step: int
    loss: float
    objective: float
    damping: float
    gamma: float
    alpha: float
    mu: float
    rho: float | None
    model_change: float
    delta_norm: float
    batch_size: int
    approx: str
    momentum: bool | float
    inverses_refreshed: bool
    rejected: bool = False
    reason: str = ""
    # λ raised this step because the model predicted a decrease larger than the objective (trust.py)
    model_bounded: bool = False
    gamma_grid: list = field(default_factory=list)  # [(γ, M(δ) − M(0))] when the γ grid ran
    timings: dict = field(default_factory=dict)
    plain_gradient: tuple = ()

    def as_dict(self) -> dict:
        """Flat scalars (for logging to a store): timings as ``time_<phase>``, the grid and the
        names of ``plain_gradient`` omitted."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("timings", "gamma_grid", "plain_gradient")}
        d.update({f"time_{k}": v for k, v in self.timings.items()})
        return d


class _Timer:
    def __init__(self, sink: dict, sync: bool):
        self.sink, self.sync = sink, sync

    @contextmanager
    def __call__(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        yield
        if self.sync:
            torch.cuda.synchronize()
        self.sink[name] = self.sink.get(name, 0.0) + time.perf_counter() - t0


class KFAC(CurvatureFrontEnd, LiveSettings):
    """The K-FAC optimizer of Martens & Grosse (2015), Algorithm 2.

    ``opt.step(x, y)`` runs one whole iteration on the mini-batch ``(x, y)`` and returns a
    ``StepInfo``. ``lr=None, momentum=True`` (the defaults) is the paper's K-FAC. Settings
    change live with ``configure(...)`` from any thread; they take effect at the next step.
    ``engine``: ``"auto"`` uses the hand-written forward/backward modes for ``nn.Sequential``
    stacks of Linear layers and elementwise activations, ``torch.func`` otherwise;
    ``"func"`` forces the generic engine. ``cross_factors="auto"`` (the default) collects the
    adjacent factors ``A_{i,i+1}``, ``G_{i,i+1}`` only while ``approx="tridiag"`` is selected: a
    live switch to it estimates them from the batch of the step the switch takes effect (then
    averages them as usual), so that step already uses the block-tridiagonal inverse;
    ``True`` collects them always (a switch finds their running average), ``False`` never
    (switching to ``approx="tridiag"`` then raises a ``ValueError`` saying so). ``gamma_grid``:
    ``"fast"`` (default) ranks the γ grid's candidates through Cholesky solves and builds only the
    winner's inverse (``curvature/grid.py``), ``"full"`` builds every candidate's (the paper's way).
    ``weight_sharing``: the factors of convolutions and of Linear layers on ``(N, …, d)``
    inputs, ``"expand"`` (KFC, default) or ``"reduce"`` (docs/algorithm.md#weight-sharing); fixed for
    the optimizer's life. A model with such a layer refuses ``approx="tridiag"`` (at construction
    and in ``configure``) with an ``UnsupportedApproximationError`` saying why.

    Every trainable parameter outside the ``nn.Linear`` layers (norm layers, embeddings, free
    parameters) gets a diagonal Fisher block (``diagonal=True``, the default; docs/algorithm.md)
    and is preconditioned, enters the quadratic model and is updated like the layers; the modules
    in ``exclude`` are left to the plain gradient (``Δ = −∇h``, then ``δ = αΔ + μδ₀`` like the rest;
    listed in ``StepInfo.plain_gradient``). ``diagonal=False``: such parameters are an
    ``UnsupportedLayerError`` unless excluded.

    The curvature (layers, sampled targets, running factors, the inverse and its refresh) is
    ``self.curvature``, a :class:`~kfac_lab.curvature.engine.CurvatureEngine`; this class is
    Algorithm 2's update rule on top of it.

    ``damping``: λ₀ (the paper's 150), or ``"auto"``: λ₀ chosen at the first step by a probe of the
    quadratic model over a geometric range of λ, then γ₀ by the γ grid's own criterion over a wide
    grid (:mod:`~kfac_lab.optim.initial_damping`; λ is 150 until then; a ``gamma`` given, or
    ``adapt_gamma=False``, keeps γ out of it); the outcome is ``initial_damping`` (a dict; in
    ``state_dict``) and an ``"initial_damping"`` event. ``configure(damping="auto")`` probes again
    at the next step.
    """

    def __init__(self, model: nn.Module, loss="categorical", *, approx: str = "blockdiag", damping: float | str = 150.0,
                 adapt_damping: bool = True, gamma: float | None = None, adapt_gamma: bool = True,
                 momentum: bool | float = True, lr: float | None = None, weight_decay: float = 1e-5,
                 ema_decay: float = 0.95, T1: int = 5, T2: int = 20, T3: int = 20, stats_fraction: float = 1 / 8,
                 fisher_fraction: float = 1 / 4, damping_type: str = "factored", stats_mode: str = "sampled",
                 max_rejections: int = 10, min_damping: float = 1e-8, max_damping: float = 1e8,
                 cross_factors: bool | str = "auto", gamma_grid: str = "fast", weight_sharing: str = "expand",
                 factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None, exclude=(), seed: int = 0, engine: str = "auto",
                 profile: bool = False, diagonal: bool = True):
        self.config = KFACConfig(approx=approx, damping=damping, adapt_damping=adapt_damping, gamma=gamma,
                                 adapt_gamma=adapt_gamma, momentum=momentum, lr=lr, weight_decay=weight_decay,
                                 ema_decay=ema_decay, T1=T1, T2=T2, T3=T3, stats_fraction=stats_fraction,
                                 fisher_fraction=fisher_fraction, damping_type=damping_type, stats_mode=stats_mode,
                                 max_rejections=max_rejections, min_damping=min_damping,
                                 max_damping=max_damping, cross_factors=cross_factors,
                                 gamma_grid=gamma_grid, weight_sharing=weight_sharing).validate()
        self.model = model
        self.curvature = self._new_curvature(model, loss, exclude, pairs=self.config.factor_pairs,
                                             ema_decay=self.config.ema_decay, capture=engine,
                                             factor_dtype=factor_dtype, inverse_dtype=inverse_dtype or factor_dtype,
                                             seed=seed, weight_sharing=self.config.weight_sharing,
                                             diagonal=diagonal)
        self.curvature.check_approx(self.config.approx)
        first = self.layers[0].module.weight
        self.device, self.dtype = first.device, first.dtype
        self.factor_dtype = factor_dtype or self.dtype
        self.inverse_dtype = inverse_dtype or self.factor_dtype
        diag = self.curvature.diagonal
        self.diagonal_params = [] if diag is None else list(diag.params)
        owned = {id(p) for l in self.layers for p in l.params} | {id(p) for p in self.diagonal_params}
        self.plain_params = [p for p in model.parameters() if p.requires_grad and id(p) not in owned]
        self.other_params = self.diagonal_params + self.plain_params  # after the layers' in every list
        self.params = [p for l in self.layers for p in l.params] + self.other_params
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = [names[id(p)] for p in self.params]
        self.plain_gradient = tuple(names[id(p)] for p in self.plain_params)
        self.k = 0
        self.damping = 150.0 if _auto.is_auto(damping) else float(damping)  # "auto": the probe sets λ₀ at step 1
        self.initial_damping: dict | None = None  # the probe's outcome (damping="auto")
        self.gamma = float(gamma) if gamma is not None else math.sqrt(self.damping + weight_decay)
        self.delta0: list[Tensor] | None = None
        self._rejections = 0
        self._init_live()
        self.host_syncs = 0
        self._derivs: list | None = None  # φ' at the captured cases of the current step
        self.profile = profile and self.device.type == "cuda"

    # ------------------------------------------------------------------ live settings (optim/live.py)
    live_settings = LIVE

    def settings(self) -> dict:
        """Every setting by name (a copy); ``damping`` is λ as configured (the running λ is ``self.damping``)."""
        return self.config.as_dict()

    def _check_settings(self, merged: dict, changes: dict) -> dict:
        """Live settings: ``damping`` (λ; also resets γ to sqrt(λ+η) unless ``gamma`` is given),
        ``adapt_damping``, ``gamma``, ``adapt_gamma``, ``approx``, ``momentum``, ``lr``,
        ``weight_decay``, ``T1``, ``T2``, ``T3``; checked together with the current settings."""
        self.config.updated(**merged)  # TypeError / ValueError naming the setting
        if "approx" in changes:
            self.curvature.check_approx(merged["approx"])
        return dict(changes)

    def _apply_settings(self, changes: dict) -> dict:
        old = self.config
        self.config = old.updated(**changes)
        if _auto.is_auto(changes.get("damping")):
            self.initial_damping = None  # probe again at the next step
        elif "damping" in changes:
            self.damping = float(changes["damping"])
            if "gamma" not in changes:
                self.gamma = math.sqrt(self.damping + self.config.weight_decay)
            self.curvature.stale = True
        if "gamma" in changes and changes["gamma"] is not None:
            self.gamma = float(changes["gamma"])
            self.curvature.stale = True
        if changes.get("approx", old.approx) != old.approx:
            self.curvature.stale = True
            # adjacent factors while tridiag is selected: estimated from this step's batch on a switch
            self.curvature.collect(self.config.factor_pairs)
        return {k: v for k, v in changes.items() if getattr(old, k) != v or k in ("damping", "gamma")}

    def _next_step(self) -> int:
        return self.k + 1

    # ------------------------------------------------------------------ blocks of parameters
    def _as_blocks(self, tensors: list[Tensor], plus: list[Tensor] | None = None, alpha: float = 0.0) -> list[Tensor]:
        """Per-parameter tensors (``self.params`` order) → ``[W|b]`` per layer + other params. With
        ``plus`` (same order) and ``alpha``: the blocks of ``tensors + alpha·plus``, each written once
        (the sum folded into the copy ``[W|b]`` needs anyway; ``tensors`` outside a ``[W|b]`` copy are
        changed in place, so pass fresh ones, e.g. autograd's gradients)."""
        add = plus is not None and alpha != 0.0
        out, pos = [], 0
        for l in self.layers:
            w = tensors[pos]
            b = tensors[pos + 1] if l.has_bias else None
            pw, pb = (plus[pos], plus[pos + 1] if l.has_bias else None) if add else (None, None)
            pos += 1 + int(l.has_bias)
            if b is None:
                out.append(l.to_matrix(w.add_(pw, alpha=alpha) if add else w, None))
                continue
            m = w.new_empty(l.d_out, l.in_dim)
            for dst, src, extra in ((m[:, :-1], w.reshape(l.d_out, -1), pw), (m[:, -1], b, pb)):
                if add:
                    torch.add(src, extra.reshape(src.shape), alpha=alpha, out=dst)
                else:
                    dst.copy_(src)
            out.append(m)
        rest = list(tensors[pos:])
        if add:
            for t, q in zip(rest, plus[pos:]):
                t.add_(q, alpha=alpha)
        return out + rest

    def _apply_update(self, delta: list[Tensor]) -> None:
        with torch.no_grad():
            for l, d in zip(self.layers, delta):
                dw, db = l.from_matrix(d)
                l.module.weight.add_(dw)
                if db is not None:
                    l.module.bias.add_(db)
            for p, d in zip(self.other_params, delta[len(self.layers):]):
                p.add_(d)

    def _tangent(self, d: list[Tensor]) -> dict[str, Tensor]:
        flat = []
        for l, m in zip(self.layers, d):
            w, b = l.from_matrix(m)
            flat += [w] + ([b] if b is not None else [])
        return dict(zip(self._names, flat + list(d[len(self.layers):])))

    def _precondition(self, inverse, grad: list[Tensor]) -> list[Tensor]:
        """``U = F⁻¹∇h`` (the layers and the diagonal blocks; the plain parameters: a copy of ``∇h``):
        the proposal is ``Δ = −U``. Its sign is carried by the products (:meth:`_quadratic_products`)
        and the step's ``δ = −αU + μδ₀``, so no pass negates ``U``."""
        P = len(self.layers) + len(self.diagonal_params)
        return inverse.apply(grad[:P]) + [g.clone() for g in grad[P:]]

    # ------------------------------------------------------------------ the iteration
    def step(self, x: Tensor, y: Tensor) -> StepInfo:
        """One K-FAC iteration on the batch ``(x, y)`` (docs/algorithm.md#one-iteration)."""
        self._apply_pending()
        cfg = self.config
        self._check_batch(x, y)
        self._derivs = None
        k = self.k + 1
        timings: dict = {}
        T = _Timer(timings, self.profile)
        curv = self.curvature
        m, n1, n2 = curv.subset_sizes(x.shape[0], cfg.stats_fraction, cfg.fisher_fraction)
        eta = cfg.weight_decay

        with T("gradient"):
            z, acts, nll, grads = self._forward_backward(x, y, max(n1, n2))
            theta = [p.detach() for p in self.params]
            sq_norm = _sq_norm(theta)
            grad = self._as_blocks(list(grads), theta, eta)  # [W|b] blocks of ∇nll + ηθ, each written once
            z = z.detach()

        with T("statistics"):
            stats = self._batch_statistics(x[:n1], y[:n1], z[:n1], acts, n1)

        checks = torch.stack([nll.detach(), sq_norm, _sq_norm(grad), curv.statistics_trace(stats)])
        checks = curv.reduce_scalars(checks, (Share.CASE_MEAN, Share.SAME, Share.SAME, Share.PART))
        nll_v, sq_v, gsq_v, trace_v = checks.double().tolist()
        self.host_syncs += 1
        if not all(math.isfinite(v) for v in (nll_v, gsq_v, trace_v)):
            what = "loss" if not math.isfinite(nll_v) else "gradient" if not math.isfinite(gsq_v) else "factor statistics"
            return self._reject(k, f"non-finite {what}", m, timings)
        h_v = nll_v + 0.5 * eta * sq_v
        curv.check_approx(cfg.approx)  # a Linear layer first seen sharing weights: refused before any change
        with T("statistics"):
            curv.update_factors(stats)
        if _auto.is_auto(cfg.damping) and self.initial_damping is None:
            with T("initial_damping"):
                self._probe_damping(x, y, grad, z, acts, n2, h_v)

        refresh = self.curvature.refresh_due(k, cfg.T3, first=3)
        wide = self._gamma_probe_due(k)  # damping="auto": γ₀ from the wide grid (optim/initial_damping.py)
        grid = refresh and cfg.adapt_gamma and (k % cfg.T2 == 0 or wide)
        # the γ grid through Cholesky solves, only the winner's inverse built (curvature/grid.py)
        fast = grid and cfg.cholesky_candidates
        with T("inverses"):
            if refresh:
                if not cfg.adapt_gamma and cfg.gamma is None:
                    self.gamma = math.sqrt(self.damping + eta)
                gammas = (_auto.gamma_grid(self.damping, eta) if wide else [self.gamma * cfg.omega2, self.gamma, self.gamma / cfg.omega2]
                          ) if grid else [self.gamma]
                try:
                    inverses = (curv.grid_candidates(cfg.approx, gammas) if fast
                                else curv.refresh(cfg.approx, gammas, cfg.damping_type))
                except DecompositionError as exc:  # e.g. a factor too ill-conditioned at this γ
                    self.curvature.stale = True
                    return self._reject(k, f"inverse failed: {exc}", m, timings)
            else:
                gammas, inverses = [self.gamma], [self.curvature.inverse]
        with T("statistics"):
            curv.update_scales()  # EKFAC: this step's scales, in the basis now in use

        with T("precondition"):
            deltas = [self._precondition(inv, grad) for inv in inverses]  # U = −Δ per candidate
        prev = self.delta0
        has_prev = prev is not None
        with T("quadratic_model"):
            products = self._quadratic_products(x[:n2], z[:n2], acts, n2, grad, deltas, prev)
        if products is None:
            return self._reject(k, "non-finite update (curvature products)", m, timings)
        (M, c, alpha, mu), grid_values = self._best(products, gammas, has_prev)
        direction, pc, adopted = deltas[c], products[c], inverses[c] if refresh else None
        if fast:
            with T("inverses"):
                try:
                    adopted = curv.candidate_inverse(inverses, c)
                except DecompositionError as exc:
                    self.curvature.stale = True
                    return self._reject(k, f"inverse failed: {exc}", m, timings)
            if cfg.approx == "tridiag":  # γ ranked by the block-diagonal updates; the step is the tridiagonal one
                with T("precondition"):
                    direction = self._precondition(adopted, grad)
                with T("quadratic_model"):
                    products = self._quadratic_products(x[:n2], z[:n2], acts, n2, grad, [direction], prev)
                if products is None:
                    return self._reject(k, "non-finite update (curvature products)", m, timings)
                (M, _, alpha, mu), _ = self._best(products, gammas[c:c + 1], has_prev)
                pc = products[0]
        bounded = False
        if cfg.lr is None and math.isfinite(M) and M < -h_v:
            # the model promises more decrease than the objective holds: λ up at once (trust.py)
            lam, alpha, mu, M = bounded_by_objective(pc, self.damping, eta, h_v, cfg.momentum, has_prev,
                                                     cfg.omega1, cfg.max_damping)
            bounded, self.damping = True, lam
        if not (math.isfinite(alpha) and math.isfinite(mu) and math.isfinite(M)):
            return self._reject(k, "non-finite step coefficients", m, timings)
        # δ = αΔ + μδ₀ = −αU + μδ₀, in place in U's buffers (U is not needed afterwards)
        delta = [d.mul_(-alpha) for d in direction]
        if has_prev and mu != 0.0:
            for d, q in zip(delta, prev):
                d.add_(q, alpha=mu)
        delta_norm = math.sqrt(max(alpha * alpha * pc.dd + 2 * alpha * mu * pc.dp + mu * mu * pc.pp, 0.0))

        rho = None
        with T("damping"):
            if cfg.adapt_damping and k % cfg.T1 == 0:
                backup = [p.detach().clone() for p in self.params]
                self._apply_update(delta)
                with torch.no_grad(), frozen_running_stats(self.model, "the λ test"):
                    new_sq = _sq_norm(self.params)
                    nll_new = curv.reduce_scalars(self.loss.nll(self.model(x), y), (Share.CASE_MEAN,))
                    h_new = float(nll_new + 0.5 * eta * new_sq)
                self.host_syncs += 1
                if not math.isfinite(h_new):
                    with torch.no_grad():
                        for p, b in zip(self.params, backup):
                            p.copy_(b)
                    return self._reject(k, "non-finite loss after the update", m, timings)
                rho = reduction_ratio(h_new, h_v, M)
                self.damping = levenberg_marquardt(self.damping, rho, cfg.omega1, cfg.min_damping, cfg.max_damping)
            else:
                self._apply_update(delta)

        if refresh:
            self.gamma = gammas[c]
            self.curvature.adopt(adopted, gammas[c])
        if wide:
            self.initial_damping = _auto.with_gamma(self.initial_damping, gammas[c], grid_values)
            self._initial_damping_event()
        self.delta0 = delta
        self.k = k
        self._rejections = 0
        return StepInfo(step=k, loss=nll_v, objective=h_v, damping=self.damping, gamma=self.gamma, alpha=alpha, mu=mu,
                        rho=rho, model_change=M, delta_norm=delta_norm, batch_size=m, approx=cfg.approx,
                        momentum=cfg.momentum, inverses_refreshed=refresh, model_bounded=bounded,
                        gamma_grid=grid_values if grid else [], timings=timings,
                        plain_gradient=self.plain_gradient)

    def _probe_damping(self, x, y, grad, z, acts, n2: int, h: float) -> None:
        """``damping="auto"``: choose λ₀ on this batch (optim/initial_damping.py) and start from it."""
        rec = _auto.probe(self, x, y, grad, z, acts, n2, h)
        self.initial_damping = rec
        self.damping = rec["damping"]
        if self.config.gamma is None:
            self.gamma = math.sqrt(self.damping + self.config.weight_decay)
        self.curvature.stale = True
        if not self._gamma_probe_due(rec["step"]):  # else the event follows γ₀'s choice, later in this step
            self._initial_damping_event()

    def _gamma_probe_due(self, k: int) -> bool:
        """Does step ``k`` choose γ₀ from the wide grid? After the λ₀ probe of this step, unless
        the user fixed γ or froze its adaptation (then γ is theirs, or sqrt(λ + η))."""
        rec, cfg = self.initial_damping, self.config
        return (rec is not None and rec["step"] == k and "gamma" not in rec and cfg.gamma is None
                and cfg.adapt_gamma and _auto.is_auto(cfg.damping))

    def _initial_damping_event(self) -> None:
        rec = self.initial_damping
        extra = {"gamma": rec["gamma"], "gamma_candidates": [list(c) for c in rec["gamma_candidates"]]} if "gamma" in rec else {}
        self._event("initial_damping", step=rec["step"], damping=rec["damping"],
                    rule="the paper's λ₀ (probe failed)" if "failed" in rec["rule"] else "probe",
                    candidates=[[c["damping"], c["rho"]] for c in rec["candidates"]], **extra)

    # ------------------------------------------------------------------ the front end's own parts of a step
    # (DistributedKFAC overrides _new_curvature, _forward_backward and _fisher_gram; everything
    # else about the curvature is the engine's, reached through self.curvature)
    def _new_curvature(self, model: nn.Module, loss, exclude, **options) -> CurvatureEngine:
        """The curvature engine this front end runs on (``options``: the engine's keyword arguments)."""
        return CurvatureEngine(model, loss, exclude, **options)

    def _forward_backward(self, x: Tensor, y: Tensor, rows: int):
        """Forward on the batch (capturing ā of the first ``rows`` cases for the hand-written
        engine) and ``∇ nll``: returns ``(z, acts, nll, grads)``, ``grads`` in ``self.params`` order."""
        z, acts = self.curvature.forward(self.model, x, rows)
        nll = self.loss.checked_nll(z, y, f"{type(self).__name__}.step(x, y)")
        grads = torch.autograd.grad(nll, self.params)
        return z, acts, nll, grads

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError("KFAC.step(x, y) takes tensors")
        if x.shape[0] == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"KFAC.step: x has {x.shape[0]} cases and y has {y.shape[0]}; both need the same, >= 1")
        if x.device != self.device:
            raise ValueError(f"KFAC.step: x is on {x.device} but the model is on {self.device}; move it with x.to({str(self.device)!r})")
        checks.batch_dtype(x, self.dtype, f"{type(self).__name__}.step")

    def _batch_statistics(self, x1: Tensor, y1: Tensor, z1: Tensor, acts, n1: int):
        """Per-case ``(a, g)`` of the statistics subset (and the diagonal blocks' ``d``), in
        ``factor_dtype`` (the engine's)."""
        stats = self.curvature.statistics(x1, y1, self.config.stats_mode, z=z1, acts=acts)
        self._derivs = self.curvature.derivatives if acts is not None else None
        return stats

    def _fisher_gram(self, x2: Tensor, z2: Tensor, acts, n2: int, dirs: list[list[Tensor]]) -> Tensor:
        """``Q[k, l] = d_kᵀ F d_l`` with the exact Fisher on the first ``n2`` cases."""
        if self.plan is not None:
            derivs = self._derivs if self._derivs is not None else self.plan.derivatives(acts)
            Jd = self.plan.jvp([t[:n2] for t in acts], dirs, derivs)
        else:
            Jd = func_jvp(self.model, x2, [self._tangent(d) for d in dirs])
        return gram_from_jvps(self.loss, z2.reshape(n2, -1), Jd)

    def _quadratic_products(self, x2: Tensor, z2: Tensor, acts, n2: int, grad: list[Tensor],
                            deltas: list[list[Tensor]], prev: list[Tensor] | None) -> list[Products] | None:
        """The quadratic model's products of each candidate ``Δ = −U`` with itself, δ₀ and ∇h (M&G 2015
        §7), from ``deltas`` = the ``U`` of :meth:`_precondition` (the products odd in Δ change sign),
        the exact-F ones on the first ``n2`` cases: one host synchronisation; None if any is not finite."""
        curv = self.curvature
        has_prev = prev is not None
        dirs = deltas + ([prev] if has_prev else [])
        Q = self._fisher_gram(x2, z2, acts, n2, dirs)
        zero = Q.new_zeros(())
        pp, gp = (_dot(prev, prev), _dot(grad, prev)) if has_prev else (zero, zero)  # shared by the γ candidates
        rows = []
        for c, d in enumerate(deltas):
            p = -1 if has_prev else c
            rows.append(torch.stack([
                Q[c, c], -Q[c, p] if has_prev else zero, Q[p, p] if has_prev else zero,
                _dot(d, d), -_dot(d, prev) if has_prev else zero, pp, -_dot(grad, d), gp]))
        # [ΔᵀFΔ, ΔᵀFδ₀, δ₀ᵀFδ₀ (exact-F products: parts of a sum) | ‖Δ‖², Δᵀδ₀, ‖δ₀‖², ∇hᵀΔ, ∇hᵀδ₀]
        shares = (Share.PART,) * 3 + (Share.SAME,) * 5
        values = curv.reduce_scalars(torch.stack(rows), shares).double().tolist()
        self.host_syncs += 1
        products = [Products(*v) for v in values]
        return products if all(p.finite() for p in products) else None

    def _best(self, products: list[Products], gammas: list[float], has_prev: bool):
        """``((M, c, α, μ), [(γ_c, M_c)])``: the candidate whose update minimises the quadratic
        model M(δ) − M(0) (M&G 2015 §6.6, §7), with each candidate's α, μ."""
        cfg = self.config
        total_damping = self.damping + cfg.weight_decay
        best, grid_values = None, []
        for c, p in enumerate(products):
            alpha, mu = coefficients(p, total_damping, cfg.momentum, cfg.lr, has_prev)
            M = model_change(p, total_damping, alpha, mu)
            grid_values.append((gammas[c], M))
            if best is None or M < best[0]:
                best = (M, c, alpha, mu)
        return best, grid_values

    def _reject(self, k: int, reason: str, m: int, timings: dict) -> StepInfo:
        cfg = self.config
        self._rejections += 1
        self.damping = min(self.damping / cfg.omega1 ** 3, cfg.max_damping)
        floor = math.sqrt(self.damping + cfg.weight_decay)
        if self.gamma < floor or "inverse failed" in reason:
            self.gamma = max(floor, self.gamma / cfg.omega2)
            self.curvature.stale = True
        self._event("rejected", step=k, reason=reason, damping=self.damping)
        warnings.warn(f"K-FAC step {k} rejected ({reason}); parameters and statistics unchanged, λ raised to {self.damping:.4g}",
                      RuntimeWarning, stacklevel=3)
        if self._rejections >= cfg.max_rejections:
            raise NonFiniteError(
                f"K-FAC rejected {self._rejections} consecutive steps (last: {reason}); the inputs or model produce "
                "non-finite values: check the data for NaN/inf, lower the learning rate, or raise the damping"
            )
        return StepInfo(step=k, loss=float("nan"), objective=float("nan"), damping=self.damping, gamma=self.gamma,
                        alpha=0.0, mu=0.0, rho=None, model_change=0.0, delta_norm=0.0, batch_size=m,
                        approx=cfg.approx, momentum=cfg.momentum, inverses_refreshed=False, rejected=True,
                        reason=reason, timings=timings, plain_gradient=self.plain_gradient)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit: factors, the inverse's inputs, λ, γ, k, δ₀,
        the RNG state, settings and events (plain tensors and Python values: ``weights_only``-safe).
        The curvature entries (factors, inverse inputs and γ, stale, generator; ``ekfac`` last, only
        while EKFAC runs: the layout of the other approximations' states is unchanged) are the engine's."""
        engine = self.curvature.state_dict()
        state = {
            "format": "kfac_lab.KFAC/1",
            "config": self.config.as_dict(),
            "k": self.k,
            "damping": self.damping,
            "gamma": self.gamma,
            "factors": engine["factors"],
            "inverse_inputs": engine["inverse_inputs"],
            "inverse_gamma": engine["inverse_gamma"],
            "stale": engine["stale"],
            "delta0": None if self.delta0 is None else [d.clone() for d in self.delta0],
            "generator": engine["generator"],
            "rejections": self._rejections,
            "events": [dict(e) for e in self.events],
            "initial_damping": _auto.copy_record(self.initial_damping),
            **{k: engine[k] for k in ("diagonal",) if k in engine},  # a model with diagonal blocks only
        }
        if engine["ekfac"] is not None:
            state["ekfac"] = engine["ekfac"]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``, all or nothing: everything is checked against this model first
        (layers, shapes, settings, finiteness, the generator state; see ``state_check``), the
        first mismatch named in a ``StateError``; tensors move to the model's device and the
        factors' dtype. If anything fails, the optimizer is exactly as it was."""
        v = self._check_state(state)
        with all_or_nothing(self, self.curvature):
            self.config = v["config"]
            self.curvature.load_checked(v)
            self.curvature.collect(self.config.factor_pairs)
            self.k, self.damping, self.gamma = v["k"], v["damping"], v["gamma"]
            if v["inverse_inputs"] is not None and v["inverse_gamma"] is not None:
                self.curvature.adopt(self.curvature.inverse_from_inputs(v["inverse_gamma"], self.config.damping_type),
                                     v["inverse_gamma"])
                self.curvature.stale = v["stale"]
            self.delta0 = v["delta0"]
            self._rejections = v["rejections"]
            self.events = v["events"]
            self.initial_damping = v["initial_damping"]
            self._set_pending({})

    def _check_state(self, state: dict) -> dict:
        """The values of ``state`` converted for this optimizer, or a ``StateError`` naming the
        first thing that does not fit (nothing of ``self`` is touched)."""
        name = type(self).__name__
        c = Checker(name)
        c.format(state, "kfac_lab.KFAC/1")
        c.mapping(state, ("config", "k", "damping", "gamma", "factors", "inverse_inputs", "inverse_gamma", "stale",
                          "delta0", "generator", "rejections", "events"))
        cfg = state["config"]
        c.mapping(cfg, (), "the saved config")
        known = {f.name for f in fields(KFACConfig)}
        if set(cfg) - known:
            c.fail(f"the saved config has unknown settings {sorted(set(cfg) - known)}", "the state is damaged")
        try:
            config = KFACConfig(**cfg).validate()
        except (TypeError, ValueError) as exc:
            c.fail(f"the saved config is invalid ({exc})", "the state is damaged")
        pairs = config.factor_pairs
        if pairs == "tridiag" and config.cross_factors == "auto" and _only_diagonal(state["factors"]):
            pairs = "diag"  # saved after a switch to tridiag and before its first update (a rejected step)
        engine = self.curvature.check_state(state, c, pairs=pairs, decay=config.ema_decay,
                                            weight_sharing=config.weight_sharing)
        if state["generator"] is None:
            c.fail("the random generator state is missing", "the state is damaged")
        delta0 = state["delta0"]
        if delta0 is not None:
            shapes = [(l.d_out, l.in_dim) for l in self.layers] + [tuple(p.shape) for p in self.other_params]
            delta0 = [t.detach().to(device=self.device, dtype=self.dtype, copy=True)
                      for t in c.tensors(delta0, "the previous update δ₀", shapes)]
        return {
            **engine, "config": config, "delta0": delta0,
            "k": c.integer(state["k"], "the step count k"),
            "damping": c.real(state["damping"], "λ (damping)", positive=True),
            "gamma": c.real(state["gamma"], "γ (gamma)", positive=True),
            "rejections": c.integer(state["rejections"], "the rejection count"),
            "events": c.events(state["events"]),
            "initial_damping": _auto.checked_record(state.get("initial_damping"), c),
        }


def _only_diagonal(factor_state) -> bool:
    """Whether a saved ``KroneckerFactors`` state holds the diagonal pairs alone (malformed: False,
    and the full check names the problem)."""
    try:
        return bool(factor_state["pairs"]) and all(int(i) == int(j) for i, j in factor_state["pairs"])
    except (TypeError, ValueError, KeyError):
        return False
