"""The curvature engine: the one K-FAC curvature estimate under every front end (``KFAC``,
``KFACPreconditioner``, ``DistributedKFAC``; docs/architecture.md#the-curvature-engine).

Like kfac-jax's curvature estimator serving both its optimizer and its optax preconditioner,
:class:`CurvatureEngine` owns everything the front ends share and none of their update rules
(λ, the γ grid, α/μ and momentum stay in ``KFAC``; the learning rate and KL-clipping in the
preconditioner):

- the K-FAC layers (``find_layers``) and their capture: the hand-written sequential plan when it
  applies, else ``torch.func``/autograd (:meth:`forward`, :meth:`statistics`);
- the predictive distribution (``loss``) and the generator of the sampled targets (M&G 2015 §5);
- the statistics subset rule (:func:`subset_rows`, τ₁ and τ₂ of §5, §6.4) ;
- the running factors ``Ā_{i,j}``, ``G_{i,j}`` and their ``ε_k = min(1 − 1/k, ε)`` schedule (§5);
- the inverse snapshot (block-diagonal §4.2 / block-tridiagonal §4.3; factored §6.3 or exact
  Tikhonov; γ) and its refresh schedule (:meth:`refresh_due`);
- for EKFAC (George et al. 2018; :mod:`.ekfac`), the eigenbasis refreshed with the inverses and the
  scales re-estimated at every step from the statistics subset (:meth:`update_scales`);
- its own ``state_dict`` / ``load_state_dict`` (validated first, loaded all or nothing).

Extension points (a distributed engine overrides these, nothing else):

(a) **Reductions** — :meth:`update_factors` blends one mini-batch's statistics into the running
    factors (override: all-reduce the ranks' shares first), :meth:`statistics_trace` gives the
    finiteness check of those statistics, :meth:`reduce_scalars` reduces the scalars a step sends
    to the host (each declared a :class:`Share`: a mean over the cases, a part of a sum, or the
    same everywhere; identity here), and
    :meth:`global_factors` returns the running factors as one process would hold them;
    :meth:`collect` changes the pairs collected (override: forget the dropped pairs' partial sums);
    :meth:`reduce_scales` sums one batch's EKFAC scales (override: all-reduce the ranks' shares).
(b) **Inverses** — :meth:`build_inverses` turns the snapshot ``inputs`` into one inverse per γ
    (override: compute only this rank's pieces, exchange them, and assemble every inverse with
    ``BlockDiagonalInverse.from_pieces`` / ``BlockTridiagonalInverse.from_pieces`` and
    ``tridiagonal_side``); :meth:`candidate_inverse` builds the γ grid's winner (override: the
    same shared way).
(c) **Which cases** — :meth:`subset_sizes` gives the batch size and the statistics / exact-F
    rows (override: the global batch over shards), and the targets are drawn by ``loss.sample``
    with :attr:`generator` (override: wrap ``loss`` to draw a shard's rows of the global draw).
"""
from __future__ import annotations

import enum
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import checks
from ..errors import KFACError, UnsupportedApproximationError
from .diagonal import DiagonalBlocks, WithDiagonal
from .ekfac import EKFACInverse, EKFACScales, eigenbasis
from .factors import KroneckerFactors, check_weight_sharing, output_gradients
from .grid import CholeskyCandidates
from .inverses import make_inverse
from .layers import Capture, find_layers
from .losses import get_loss
from .products import SequentialPlan, sq_norm
from .running_stats import frozen_running_stats

__all__ = ["CurvatureEngine", "Share", "subset_rows", "tridiag_refusal", "ENGINE_STATE_KEYS"]

CAPTURE_MODES = ("auto", "sequential", "func")
#: The keys every ``CurvatureEngine.state_dict()`` holds (front ends embed them in their own formats);
#: ``"ekfac"`` and ``"diagonal"`` are optional when loading (states saved before EKFAC / the diagonal
#: blocks lack them).
ENGINE_STATE_KEYS = ("factors", "inverse_inputs", "inverse_gamma", "stale", "generator")


class Share(enum.Enum):
    """What a scalar a front end sends to the host is, for an engine that sees part of the batch:
    how the parts combine into the value one process would compute on the whole batch."""

    CASE_MEAN = "a mean over this engine's cases (the whole: the case-weighted mean of the parts)"
    PART = "this engine's part of a sum (the whole: the sum of the parts)"
    SAME = "the same value everywhere (the whole: any one of them)"


def tridiag_refusal(shared_layers: Sequence[str]) -> str | None:
    """Why ``approx="tridiag"`` is refused for a model whose layers ``shared_layers`` share weights
    over locations (None when there are none): what the dashboards show on the disabled toggle."""
    if not shared_layers:
        return None
    names = ", ".join(repr(n) for n in shared_layers)
    return (f"the block-tridiagonal inverse is unavailable: the layer(s) {names} share weights over locations "
            "(convolution, or Linear on (N, …, d) inputs), and the papers (M&G 2015 §4.3; KFC, Grosse & "
            "Martens 2016) define no cross-layer model for weight sharing; use approx='blockdiag'")


def subset_rows(m: int, fraction: float) -> int:
    """The number of cases of an ``m``-case batch that a fraction τ uses (τ₁ for the statistics,
    M&G 2015 §5; τ₂ for the exact-F products, §6.4): ``max(1, round(m·τ))``, the first cases."""
    return max(1, round(m * fraction))


class CurvatureEngine:
    """K-FAC's curvature estimate for the ``nn.Linear`` layers of ``model`` (module doc).

    ``loss``: the predictive distribution. ``exclude``: modules (or names) left out.
    ``pairs``: the factor pairs kept, ``"tridiag"`` (diagonal + adjacent: either inverse, any
    time) or ``"diag"``. ``ema_decay``: ε's cap. ``capture``: ``"auto"`` (the hand-written
    sequential plan when the model is an ``nn.Sequential`` of Linear layers and elementwise
    activations, else ``"func"``), ``"sequential"`` or ``"func"``. ``factor_dtype`` /
    ``inverse_dtype``: precisions (default: the parameters' dtype, the factors' dtype).
    ``seed``: the generator of the sampled targets. ``names``: per-layer names in error messages.
    ``weight_sharing``: the factors of a weight-sharing layer (``nn.Conv2d``; ``nn.Linear`` on
    ``(N, …, d)`` inputs): ``"expand"`` (KFC, the default) or ``"reduce"`` (docs/algorithm.md#weight-sharing).
    A model with a convolution keeps the diagonal pairs only: the block-tridiagonal inverse is
    refused for it (:attr:`tridiag_unavailable`).
    ``diagonal``: give every trainable parameter outside the Kronecker layers and ``exclude`` a
    diagonal Fisher block (``self.diagonal``, :mod:`.diagonal`; None when there is none); False:
    such parameters are an ``UnsupportedLayerError`` naming their modules.
    """

    def __init__(self, model: nn.Module, loss="categorical", exclude=(), *, pairs: str = "tridiag",
                 ema_decay: float = 0.95, capture: str = "func", factor_dtype: torch.dtype | None = None,
                 inverse_dtype: torch.dtype | None = None, seed: int = 0, weight_sharing: str = "expand",
                 diagonal: bool = True):
        if capture not in CAPTURE_MODES:
            raise ValueError(f"engine={capture!r}: choose 'auto', 'sequential' or 'func'")
        self.weight_sharing = check_weight_sharing(weight_sharing)
        self.model = model
        self.loss = get_loss(loss)
        self.layers = find_layers(model, exclude, diagonal=diagonal)
        self.diagonal = DiagonalBlocks.build(model, self.layers, exclude) if diagonal else None
        #: indices of the layers seen sharing weights (convolutions; Linear layers on (N, …, d) inputs)
        self.shared = {l.index for l in self.layers if l.weight_sharing}
        pairs = self._pairs(pairs)
        self.plan = SequentialPlan.build(model, self.layers) if capture != "func" else None
        if capture == "sequential" and self.plan is None:
            raise KFACError("engine='sequential' needs an nn.Sequential of Linear layers and tanh/logistic/ReLU activations")
        self.names = [f"layer {l.index} ({l.name})" for l in self.layers]
        self._factor_dtype, self.inverse_dtype = factor_dtype, inverse_dtype
        self.factors = KroneckerFactors(len(self.layers), pairs, decay=ema_decay)
        self.seed = checks.seed(seed)
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None  # a loaded state, set on the generator when it is made
        self.inputs: dict | None = None   # the factors of the latest snapshot: A, G, A_off, G_off (None: blockdiag)
        self.inverse = None               # the inverse in use
        self.inverse_gamma: float | None = None
        self.stale = True                 # rebuild the inverse at the next refresh check
        self.derivatives: list | None = None  # φ' at the captured rows of the latest plan statistics
        self.ekfac: EKFACScales | None = None  # EKFAC's basis and running scales, while approx="ekfac"
        self._scale_cases: tuple | None = None  # (a, g, weight) blended into the factors, not yet into the scales

    def _pairs(self, pairs):
        """The factor pairs kept: the diagonal ones only when the model has a convolution (no cross
        factors are needed: the block-tridiagonal inverse is refused, :attr:`tridiag_unavailable`)."""
        conv = any(l.weight_sharing for l in self.layers)
        return "diag" if conv and isinstance(pairs, str) and pairs == "tridiag" else pairs

    @property
    def tridiag_unavailable(self) -> str | None:
        """Why the block-tridiagonal inverse cannot be used on this model (None: it can)."""
        return tridiag_refusal([self.layers[i].name for i in sorted(self.shared)])

    def check_approx(self, approx: str) -> None:
        """A :class:`~kfac_lab.errors.UnsupportedApproximationError` when ``approx`` cannot be used here."""
        if approx == "tridiag" and self.tridiag_unavailable:
            raise UnsupportedApproximationError(self.tridiag_unavailable)

    # ------------------------------------------------------------------ where the tensors live
    @property
    def device(self) -> torch.device:
        return self.layers[0].module.weight.device

    @property
    def factor_dtype(self) -> torch.dtype:
        return self._factor_dtype or self.layers[0].module.weight.dtype

    @property
    def generator(self) -> torch.Generator:
        """The generator of the sampled targets, on the model's device: seeded with ``seed`` (a
        loaded state is set on it); if the model moved to another device, a new one seeded with
        ``seed + factors.k`` continues."""
        device = self.device
        if self._generator is None or self._generator.device != device:
            gen = torch.Generator(device=device).manual_seed(self.seed)
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            elif self._generator is not None:
                gen.manual_seed(self.seed + self.factors.k)
            self._generator = gen
        return self._generator

    # ------------------------------------------------------------------ statistics
    def subset_sizes(self, m: int, stats_fraction: float, fisher_fraction: float) -> tuple[int, int, int]:
        """(c) ``(batch size reported, n1, n2)``: the statistics (τ₁) and exact-F (τ₂) rows are the
        first ``n1`` and ``n2`` cases of the batch."""
        return m, subset_rows(m, stats_fraction), subset_rows(m, fisher_fraction)

    def forward(self, module: nn.Module, x: Tensor, rows: int) -> tuple[Tensor, list | None]:
        """``module(x)``, with ā of the first ``rows`` cases captured when the sequential plan runs
        (then :meth:`statistics` and the exact-F products need no second forward pass)."""
        if self.plan is None:
            return module(x), None
        with Capture(self.layers, inputs=True, grads=False, rows=rows) as cap:
            z = module(x)
        if any(a.dim() > 2 for a in cap.a):  # weights shared over extra input dims: the plan is for (N, d)
            self.plan = None
            self.shared |= {i for i, a in enumerate(cap.a) if a.dim() > 2}
            return z, None
        return z, cap.a

    def statistics(self, x: Tensor, y: Tensor | None, mode: str, z: Tensor | None = None,
                   acts: list | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Per-case ``(a, g)`` of the statistics rows ``x`` (targets ``y``), in ``factor_dtype``:
        ``a[i]`` shape ``(n, in_dim_i)``, ``g[i]`` ``(n, d_out_i)`` or ``(k, n, d_out_i)``. ``mode``:
        ``"sampled"`` (targets from ``loss.sample`` with :attr:`generator`), ``"empirical"``,
        ``"exact"``. With the plan, ``z`` (these rows' outputs) and ``acts`` (from :meth:`forward`)
        give ``g`` by the hand-written backward pass; otherwise one forward and backward pass here
        (batch-norm running statistics untouched), which also gives, when the engine has diagonal
        blocks, their mini-batch estimates ``d`` (one tensor per parameter): then ``(a, g, d)``."""
        n = x.shape[0]
        if self.plan is not None and acts is not None:
            # non-finite outputs are caught by the caller's finiteness check; sample from finite values
            target = self.loss.sample(torch.nan_to_num(z), self.generator) if mode == "sampled" else y
            dz = self.loss.grad_output(z, target).reshape(n, -1)
            a = [t[:n] for t in acts]
            self.derivatives = self.plan.derivatives(acts)  # φ' of all captured rows, reused by the caller
            g = self.plan.backward(a, dz, self.derivatives)
        else:
            gen = self.generator if mode == "sampled" else None
            tap = self.diagonal.tap() if self.diagonal is not None else None
            with frozen_running_stats(self.model, "the statistics pass"):
                a, g, _ = output_gradients(self.model, self.layers, self.loss, x, y, mode=mode, generator=gen,
                                           extra=tap)
            self.shared |= {i for i, t in enumerate(a) if t.dim() > 2}
            if tap is not None:
                return self._in_factor_dtype(a, g) + ([t.to(self.factor_dtype) for t in tap.batch_squares(n)],)
        return self._in_factor_dtype(a, g)

    def _in_factor_dtype(self, a, g) -> tuple:
        dt = self.factor_dtype
        if a[0].dtype != dt:
            a = [t.to(dt) for t in a]
            g = [t.to(dt) for t in g]
        return a, g

    def statistics_trace(self, stats) -> Tensor:
        """(a) ``Σ tr Ā_i + Σ tr G_i`` of the mini-batch statistics, a 0-d tensor (finite ⇔ every
        factor entry finite: off-diagonal entries are bounded by the diagonal ones, Cauchy–Schwarz)."""
        a, g = stats[:2]
        trace = (sq_norm(a) + sq_norm(g)) / a[0].shape[0]
        return trace + sum(d.sum() for d in stats[2]) if len(stats) > 2 else trace

    def update_factors(self, stats) -> None:
        """(a) Blend the mini-batch statistics (per-case ``a``, ``g``; the diagonal blocks' ``d``)
        into the running factors (and the diagonal blocks, with the same ε_k)."""
        with torch.no_grad():
            eps = self.factors.epsilon()
            self.factors.update_from_cases(*stats[:2], weight_sharing=self.weight_sharing)
            if len(stats) > 2:
                self.diagonal.update(stats[2], eps)
        self._scale_cases = (stats[0], stats[1], 1.0)

    def update_scales(self) -> None:
        """Blend the statistics of the latest :meth:`update_factors` into EKFAC's running scales, in
        the eigenbasis now in use (call after the step's refresh, if any); nothing unless the
        inverse is EKFAC's (George et al. 2018 §3.2; docs/algorithm.md#ekfac)."""
        cases, self._scale_cases = self._scale_cases, None
        if self.ekfac is None or self.ekfac.basis is None or cases is None:
            return
        with torch.no_grad():
            self.ekfac.blend(self.reduce_scales(self.ekfac.batch(*cases)))

    def reduce_scales(self, scales: list[Tensor]) -> list[Tensor]:
        """(a) One batch's EKFAC scales, summed over whoever shares the batch (identity here)."""
        return scales

    def collect(self, pairs: str) -> list:
        """Collect the factor pairs ``pairs`` (``"diag"`` / ``"tridiag"``) from the next update on:
        pairs dropped are discarded, pairs added are estimated from that update's mini-batch alone
        and then averaged as usual (``KroneckerFactors.collect``). Returns the pairs dropped."""
        return self.factors.collect(self._pairs(pairs))

    def reduce_scalars(self, t: Tensor, shares: Sequence[Share]) -> Tensor:
        """(a) Scalars before they reach the host, ``shares[j]`` saying what ``t[..., j]`` is
        (:class:`Share`; a 0-d ``t`` takes one). Identity in one process."""
        return t

    def global_factors(self, keys) -> tuple[dict, dict]:
        """(a) The running ``A``, ``G`` of the pairs ``keys`` as one process holds them."""
        return {k: self.factors.A[k] for k in keys}, {k: self.factors.G[k] for k in keys}

    # ------------------------------------------------------------------ inverses
    def refresh_due(self, step: int, every: int, first: int = 0) -> bool:
        """Rebuild the inverse at ``step``? On the first ``first`` steps, every ``every`` steps (T₃),
        when there is none, and after a change of damping or approximation (``stale``)."""
        return self.inverse is None or self.stale or step % every == 0 or step <= first

    def snapshot(self, approx: str) -> dict:
        """Copy the factors an ``approx`` inverse needs into ``inputs`` (the factors go on changing);
        ``"ekfac"`` keeps (or starts) EKFAC's running scales, any other approximation drops them."""
        self.check_approx(approx)
        if approx != "ekfac":
            self.ekfac = None
        elif self.ekfac is None:
            self.ekfac = EKFACScales(self.factors.decay)
        L = len(self.layers)
        keys = [(i, i) for i in range(L)] + ([(i, i + 1) for i in range(L - 1)] if approx == "tridiag" else [])
        A, G = self.global_factors(keys)
        snap = lambda d, ks: [d[k].detach().clone() for k in ks]  # noqa: E731
        diag, off = keys[:L], keys[L:]
        tri = approx == "tridiag"
        self.inputs = {"A": snap(A, diag), "G": snap(G, diag),
                       "A_off": snap(A, off) if tri else None, "G_off": snap(G, off) if tri else None}
        if self.diagonal is not None:
            self.diagonal.snapshot()
        return self.inputs

    def build_inverses(self, gammas: list[float], damping_type: str) -> list:
        """(b) One damped inverse of the snapshot per γ in ``gammas`` (the later ones reuse the
        first one's decompositions where they can: ``with_gamma``). EKFAC: the new eigenbasis of the
        snapshot (:meth:`ekfac_inverses`)."""
        if self.ekfac is not None:
            dt = self.inverse_dtype or self.factor_dtype
            return self.ekfac_inverses(eigenbasis(self.inputs["A"], self.inputs["G"], dt, self.names), gammas)
        base = self.inverse_from_inputs(gammas[0], damping_type)
        return [base] + [base.with_gamma(g) for g in gammas[1:]]

    def inverse_from_inputs(self, gamma: float, damping_type: str):
        """The damped inverse of the snapshot at ``gamma``: block-tridiagonal when it holds the
        adjacent factors, else block-diagonal; EKFAC's (the basis and scales in use) while it runs."""
        if self.ekfac is not None and self.ekfac.basis is not None:
            return EKFACInverse(self.ekfac, gamma, self.names)
        inp = self.inputs
        approx = "tridiag" if inp["A_off"] is not None else "blockdiag"
        return make_inverse(approx, inp["A"], inp["G"], inp["A_off"], inp["G_off"], gamma=gamma,
                            damping_type=damping_type, inverse_dtype=self.inverse_dtype, names=self.names)

    def ekfac_inverses(self, basis: list, gammas: list[float]) -> list:
        """Adopt EKFAC's new eigenbasis (the running scales carried into it) and return one
        :class:`EKFACInverse` per γ (damping_type does not apply: EKFAC is damped exactly)."""
        self.ekfac.set_basis(basis)
        base = EKFACInverse(self.ekfac, gammas[0], self.names)
        return [base] + [base.with_gamma(g) for g in gammas[1:]]

    def refresh(self, approx: str, gammas: list[float], damping_type: str) -> list:
        """Snapshot the factors and build one candidate inverse per γ (none is adopted yet)."""
        self.snapshot(approx)
        return [self.with_diagonal(inv, g) for inv, g in zip(self.build_inverses(gammas, damping_type), gammas)]

    def with_diagonal(self, inverse, gamma: float):
        """``inverse`` extended by the snapshot's diagonal blocks damped at ``gamma`` (unchanged when
        the engine has none or it already is)."""
        if self.diagonal is None or isinstance(inverse, WithDiagonal):
            return inverse
        return WithDiagonal(inverse, self.diagonal.inputs, gamma, len(self.layers), self.diagonal.names)

    def grid_candidates(self, approx: str, gammas: list[float]) -> CholeskyCandidates:
        """Snapshot the factors (for an ``approx`` inverse) and hold the γ grid's candidates as the
        Cholesky factors of the damped diagonal factors (``grid.CholeskyCandidates``): their updates
        rank the γ, and only the winner's inverse is built (:meth:`candidate_inverse`)."""
        inp = self.snapshot(approx)
        # each candidate with the diagonal blocks damped at its γ (its update covers every parameter)
        return CholeskyCandidates(inp["A"], inp["G"], gammas, self.inverse_dtype, self.names, wrap=self.with_diagonal)

    def candidate_inverse(self, candidates: CholeskyCandidates, c: int):
        """(b) The inverse of the snapshot at candidate ``c``'s γ: block-diagonal, from the Cholesky
        factors the candidate holds; block-tridiagonal, built at that γ."""
        gamma = candidates.gammas[c]
        if self.inputs["A_off"] is not None:
            return self.with_diagonal(self.inverse_from_inputs(gamma, "factored"), gamma)
        return self.with_diagonal(candidates[c].inverse(), gamma)

    def adopt(self, inverse, gamma: float) -> None:
        """Use ``inverse`` (built at ``gamma``; with the diagonal blocks) from now on."""
        self.inverse, self.inverse_gamma, self.stale = self.with_diagonal(inverse, gamma), float(gamma), False

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """``factors``, ``inverse_inputs`` (the snapshot), ``inverse_gamma`` (of the inverse in
        use), ``stale``, the ``generator`` state, ``weight_sharing``, ``ekfac`` (EKFAC's basis and
        running scales, or None) and, when the engine has them, the ``diagonal`` blocks: plain tensors
        and values (``weights_only``-safe)."""
        state = {
            "weight_sharing": self.weight_sharing,
            "factors": self.factors.state_dict(),
            "inverse_inputs": None if self.inputs is None else dict(self.inputs),
            "inverse_gamma": None if self.inverse is None else self.inverse_gamma,
            "stale": self.stale,
            "generator": self.generator.get_state(),
            "ekfac": None if self.ekfac is None else self.ekfac.state_dict(),
        }
        if self.diagonal is not None:  # only then: the layout of a Linear-only model's state is unchanged
            state["diagonal"] = self.diagonal.state_dict()
        return state

    def check_state(self, state: dict, checker, pairs=None, decay: float | None = None,
                    weight_sharing: str | None = None) -> dict:
        """The values of a ``state_dict()`` converted for this engine (the model's device, the
        factors' dtype), or a ``StateError`` from ``checker`` naming the first thing that does not
        fit; nothing of ``self`` is touched. ``pairs`` / ``decay``: of the factors to load (default:
        the current ones). ``generator`` may be None (a state saved before it was first used).
        ``weight_sharing``: the saved approximation (default: the state's ``weight_sharing``, or
        "expand" for a state older than the option); it must be this engine's."""
        from ..optim.state_check import check_inverse_inputs, layer_dims

        c = checker
        c.mapping(state, ENGINE_STATE_KEYS)
        saved = weight_sharing if weight_sharing is not None else state.get("weight_sharing", "expand")
        if saved != self.weight_sharing:
            c.fail(f"the state was saved with weight_sharing={saved!r}, this one uses {self.weight_sharing!r} "
                   "(the factors of weight-sharing layers mean different things)",
                   f"construct it with weight_sharing={saved!r} to resume this state")
        dims = layer_dims(self.layers)
        factors = KroneckerFactors(len(self.layers), self._pairs(self.factors.pairs if pairs is None else pairs),
                                   decay=self.factors.decay if decay is None else decay)
        factors.load_state_dict(state["factors"], dims, dtype=self.factor_dtype, device=self.device, checker=c)
        inputs = check_inverse_inputs(c, state["inverse_inputs"], *dims, dtype=self.factor_dtype, device=self.device)
        gamma = None
        if inputs is not None and state["inverse_gamma"] is not None:
            gamma = c.real(state["inverse_gamma"], "the inverse's γ")
            if gamma < 0:
                c.fail(f"the inverse's γ must be >= 0, got {gamma}", "the state is damaged")
        gen = state["generator"]
        ekfac = EKFACScales.checked(state.get("ekfac"), c, *dims, factors.decay, self.inverse_dtype or self.factor_dtype,
                                    self.device)  # absent in states saved before EKFAC: none
        return {"factors": factors, "ekfac": ekfac, "inverse_inputs": inputs, "inverse_gamma": gamma,
                "stale": c.flag(state["stale"], "stale"),
                "generator": None if gen is None else c.generator(gen, self.device),
                "diagonal": self._check_diagonal(c, state.get("diagonal"), factors.k, inputs is not None)}

    def _check_diagonal(self, c, saved, k: int, kron_inputs: bool) -> dict | None:
        if self.diagonal is None:
            if saved is not None:
                names = list(saved.get("names", [])) if isinstance(saved, dict) else saved
                c.fail(f"the state holds diagonal Fisher blocks for {names!r}; this optimizer has none",
                       "construct it with diagonal=True and the exclude= it was saved with")
            return None
        values = self.diagonal.check_state(c, saved, self.factor_dtype, self.device, kron_inputs)
        if k > 0 and values["D"] is None:
            c.fail("the saved factors have statistics but the diagonal blocks have none", "the state is damaged")
        return values

    def load_checked(self, v: dict) -> None:
        """Take the values :meth:`check_state` returned (call inside ``all_or_nothing``). The inverse
        is not rebuilt here: the front end rebuilds it from ``inputs`` at ``inverse_gamma``
        (with its damping type; collectively, for a distributed engine) and calls :meth:`adopt`."""
        self.factors, self.inputs = v["factors"], v["inverse_inputs"]
        if self.diagonal is not None:
            self.diagonal = self.diagonal.with_state(v["diagonal"])
        self.inverse, self.inverse_gamma, self.stale = None, None, v["stale"]
        self._generator, self._generator_state = None, v["generator"]
        self.ekfac, self._scale_cases = v.get("ekfac"), None

    def __repr__(self) -> str:
        return (f"CurvatureEngine({self.loss.name}, {len(self.layers)} layers, pairs={len(self.factors.pairs)}, "
                f"updates={self.factors.k}, capture={'sequential' if self.plan is not None else 'func'})")

