"""Data-parallel K-FAC on ``torch.distributed`` (docs/algorithm.md#one-iteration,
docs/architecture.md#distributed-k-fac), launched with ``torchrun``.

Every rank runs ``opt.step(x_local, y_local)`` on its shard of the global batch; the result is
the single-process :class:`~kfac_lab.optim.KFAC` step on the global batch, on every rank:

- **The global batch and its subsets.** Shard ``r`` of ``W`` holds rows ``r, r+W, r+2W, …`` of
  the global batch (:func:`shard`). The global order of the rows is round-robin over the
  shards: local row ``j`` of rank ``r`` is global row ``j·W + r`` (for shards of unequal size, the
  ranks that have run out are skipped; :func:`global_order`). The statistics subset (τ₁) and the
  exact-F subset (τ₂) are the first ``N1 = max(1, round(M·τ₁))`` and ``N2`` rows of that order —
  exactly what ``KFAC`` uses on the global batch — so each rank's share is a prefix of its shard.
  :func:`reference_batch` rebuilds the global batch from shards for the single-process reference.
- **Gradient**: the global mean. A plain model's gradients are all-reduced here (bucketed); a
  ``DistributedDataParallel`` model's forward/backward runs through DDP, which averages them
  (overlapped with the backward pass), and they are not reduced again.
- **Sampled targets** (``sampling="global"``, the default): the generator is seeded alike on all
  ranks and every rank draws the targets of all ``N1`` statistics rows (its own rows placed at
  their global positions, zeros elsewhere) and keeps its own: the same draw as the
  single-process run, without communication (valid for samplers whose use of the generator does
  not depend on the values — the three built-in losses). ``sampling="local"``: each rank draws
  its own rows from a rank-seeded generator (cheaper, statistically equivalent, not bitwise).
- **Factor statistics**: each rank forms its rows' contribution ``Σ_rows ā āᵀ / N1`` (and the same
  for ``g``), so the sum over ranks is the global mini-batch factor. ``factor_sync="eager"``
  all-reduces them on every step they are updated (flat buckets of at most ``bucket_mb`` MiB,
  symmetric factors as upper triangles): the pairs the current approximation uses (diagonal;
  plus adjacent for ``"tridiag"``). The other pairs (the adjacent ones under ``"blockdiag"``)
  are kept as per-rank partial sums — the running average is linear, so the sum over ranks of
  the partial running averages *is* the global one — and are reduced once, when needed (a switch
  to ``"tridiag"``, a checkpoint). ``factor_sync="lazy"`` keeps every pair partial and reduces
  only when inverses are recomputed (every T3 steps): the same result, ~T3× fewer bytes.
- **Inverses**: the per-factor work (damped Cholesky inverses; for ``"tridiag"`` each layer's
  Ψ/generalised-eigenproblem side, for exact Tikhonov the eigendecompositions) is assigned across
  ranks by greedy longest-processing-time on its flop count, computed by its owner, and
  broadcast (one flat buffer per owner, chunked to ``bucket_mb``; symmetric results as upper
  triangles). Every rank, the owner included, assembles the inverse from the broadcast bits, so
  all ranks hold identical inverses. A failure on one rank is agreed on and raised on all.
- **Scalars**: the checks (loss, ‖θ‖², ‖∇h‖², factor traces), the quadratic model's products (the
  exact-F Gram of the directions is a sum of per-rank partial sums, each weighted by its share of
  the τ₂ rows) and the λ test's loss are all-reduced before they reach the host, so every rank
  takes the same α, μ, ρ, λ, γ and the same decision to reject a step.
- **Failures**: collectives raise :class:`DistributedError` (naming the rank, the operation and
  the step) when a peer fails or does not answer within the process group's timeout
  (:func:`init_distributed` sets it; 60 s by default), instead of hanging.

``DistributedKFAC`` also runs without a process group (or with one of size 1): it is then the
plain ``KFAC``. Call ``step``, ``configure``, ``state_dict`` and ``load_state_dict`` on every rank
(they are collective). Shards must hold at least one case each.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature import batch_factors
from ..optim.kfac import KFAC
from ..optim.state_check import all_or_nothing
from .communicator import Communicator
from .factor_sync import FACTOR_SYNCS, FactorSync, used_pairs
from .assignment import run_shared
from .inverses import inverse_tasks
from .sharding import ShardPlan, ShardSampling, shard_plan

__all__ = ["DistributedKFAC", "SAMPLINGS"]

SAMPLINGS = ("global", "local")


class DistributedKFAC(KFAC):
    """K-FAC (Algorithm 2) over ``torch.distributed`` ranks; see the module docstring.

    ``model``: a ``DistributedDataParallel`` model (layers found on ``.module``; its gradients come
    from DDP's all-reduce) or a plain model (its gradients are all-reduced here; its parameters are
    broadcast from rank 0 at construction unless ``broadcast_parameters=False``).
    ``process_group``: the group (default: the default group; none initialised: one process).
    ``bucket_mb``: the largest single collective, in MiB. ``factor_sync``: ``"eager"`` (reduce the
    used factor statistics on every update) or ``"lazy"`` (only when inverses are recomputed).
    ``sampling``: ``"global"`` (the single-process draw, exactly) or ``"local"``.
    All other arguments are ``KFAC``'s. Attributes: ``comm.stats`` (bytes and calls per category),
    ``inverse_stats`` (this rank's share of the last inverse recomputation) and ``inverse_time``
    (totals: ``compute_s`` wall and ``compute_cpu_s`` process CPU seconds on this rank's tasks,
    ``comm_s`` broadcasting, ``refreshes``).
    """

    def __init__(self, model: nn.Module, loss="categorical", *, process_group=None, bucket_mb: float = 25.0,
                 factor_sync: str = "eager", sampling: str = "global", broadcast_parameters: bool = True,
                 **kwargs):
        if factor_sync not in FACTOR_SYNCS:
            raise ValueError(f"factor_sync={factor_sync!r}: choose one of {FACTOR_SYNCS}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r}: choose one of {SAMPLINGS}")
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive, got {bucket_mb}")
        ddp = model if isinstance(model, nn.parallel.DistributedDataParallel) else None
        super().__init__(ddp.module if ddp is not None else model, loss, **kwargs)
        self.ddp = ddp
        self.factor_sync, self.sampling = factor_sync, sampling
        self.comm = Communicator(process_group, int(bucket_mb * 2**20), lambda: self.k + 1)
        self.sync = FactorSync(self.comm, factor_sync)
        self.rank, self.world_size = self.comm.rank, self.comm.world
        self.loss = ShardSampling(self.loss)
        if sampling == "local" and self.world_size > 1:
            self.generator.manual_seed(int(kwargs.get("seed", 0)) + 1_000_003 * self.rank)
        self._shard: ShardPlan | None = None
        self._shard_cache: dict = {}
        self.inverse_stats: dict = {}
        self.inverse_time = {"compute_s": 0.0, "compute_cpu_s": 0.0, "comm_s": 0.0, "refreshes": 0}
        if broadcast_parameters and ddp is None and self.world_size > 1:
            with torch.no_grad():
                params = [p.detach() for p in self.params]
                flat = torch.cat([p.reshape(-1) for p in params])
                self.comm.broadcast_(flat, 0, "parameters")
                pos = 0
                for p in params:
                    p.copy_(flat[pos:pos + p.numel()].view_as(p))
                    pos += p.numel()

    # ------------------------------------------------------------------ the step's shard
    def _subset_sizes(self, m: int) -> tuple[int, int, int]:
        cfg = self.config
        sizes = tuple(self.comm.all_gather_int(m, "sizes", self.device))
        if self.world_size > 1:
            self.host_syncs += 1
        M = sum(sizes)
        N1, N2 = max(1, round(M * cfg.stats_fraction)), max(1, round(M * cfg.fisher_fraction))
        key = (sizes, N1, N2)
        sh = self._shard_cache.get(key)
        if sh is None:
            sh = shard_plan(sizes, self.rank, N1, N2, self.device)
            self._shard_cache = {key: sh}
        self._shard = sh
        return M, sh.n1, sh.n2

    def _forward_backward(self, x: Tensor, y: Tensor, rows: int):
        sh = self._shard
        if self.ddp is None:
            z, acts, nll, grads = super()._forward_backward(x, y, rows)
            if self.world_size > 1:
                w = sh.m / sh.M
                grads = self.comm.all_reduce_tensors([g * w for g in grads], "gradients")
            return z, acts, nll, grads
        # DDP: its backward all-reduces (averages over ranks) the gradients; do not reduce again.
        z, acts = self._forward(self.ddp, x, rows)
        nll = self.loss.checked_nll(z, y, f"{type(self).__name__}.step(x, y)")
        scale = sh.m * self.world_size / sh.M  # DDP divides by W; the global mean weighs ranks by m/M
        for p in self.params:
            p.grad = None
        (nll * scale if scale != 1.0 else nll).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p in self.params:
            p.grad = None
        if self.world_size > 1:
            self.comm.stats.add("gradients (DDP)", sum(g.numel() * g.element_size() for g in grads))
        return z, acts, nll, grads

    def _zero_factors(self) -> tuple[dict, dict]:
        dt = self.factor_dtype
        A = {(i, j): torch.zeros(self.layers[i].in_dim, self.layers[j].in_dim, dtype=dt, device=self.device)
             for i, j in self.factors.pairs}
        G = {(i, j): torch.zeros(self.layers[i].d_out, self.layers[j].d_out, dtype=dt, device=self.device)
             for i, j in self.factors.pairs}
        return A, G

    def _batch_statistics(self, x1, y1, z1, acts, n1):
        """This rank's contribution ``Σ_{its rows} ā āᵀ / N1`` (and ``g``'s) to the global factors."""
        sh = self._shard
        global_draw = self.sampling == "global" and self.world_size > 1 and self.config.stats_mode == "sampled"
        if n1 == 0:
            if global_draw:  # keep the shared generator in step with the other ranks
                self.loss.skip(sh, z1, self.generator)
            return self._zero_factors()
        self.loss.plan = sh if global_draw else None
        try:
            A, G = batch_factors(*super()._batch_statistics(x1, y1, z1, acts, n1), self.factors.pairs)
        finally:
            self.loss.plan = None
        if n1 != sh.N1:
            w = n1 / sh.N1
            A = {k: v * w for k, v in A.items()}
            G = {k: v * w for k, v in G.items()}
        return A, G

    def _fisher_gram(self, x2, z2, acts, n2, dirs):
        """This rank's share of ``Q = dᵀ F d``: its rows' mean Gram times ``n2 / N2``."""
        sh = self._shard
        if n2 == 0:
            return torch.zeros(len(dirs), len(dirs), dtype=self.dtype, device=self.device)
        Q = super()._fisher_gram(x2, z2, acts, n2, dirs)
        return Q * (n2 / sh.N2) if n2 != sh.N2 else Q

    def _reduce_scalars(self, t: Tensor, kind: str) -> Tensor:
        if self.world_size == 1:
            return t
        sh, W = self._shard, self.world_size
        t = t.double()
        if kind == "checks":      # [nll (this shard's mean), ‖θ‖² (same on all), ‖∇h‖² (same), factor traces (partial)]
            w = t.new_tensor([sh.m / sh.M, 1 / W, 1 / W, 1.0])
        elif kind == "products":  # rows: [ΔᵀFΔ, ΔᵀFδ₀, δ₀ᵀFδ₀ (partial) | ‖Δ‖², Δᵀδ₀, ‖δ₀‖², ∇hᵀΔ, ∇hᵀδ₀ (same on all)]
            w = t.new_tensor([1.0, 1.0, 1.0] + [1 / W] * 5)
        elif kind == "loss":
            w = t.new_tensor(sh.m / sh.M)
        else:
            raise ValueError(f"unknown scalar kind {kind!r}")
        return self.comm.all_reduce_((t * w).contiguous(), "scalars")

    # ------------------------------------------------------------------ factor statistics
    def _statistics_trace(self, stats) -> Tensor:
        A_b, G_b = stats
        return sum(t.diagonal().sum() for t in A_b.values()) + sum(t.diagonal().sum() for t in G_b.values())

    def _update_factors(self, stats) -> None:
        """Sum this rank's share of the mini-batch factors over ranks (as ``factor_sync`` says), then blend them in."""
        used = used_pairs(len(self.layers), self.config.approx)
        self.factors.update(*self.sync.reduce_batch(self.factors, *stats, used))

    def global_factors(self) -> tuple[dict, dict]:
        """All running factors as the single-process run would hold them (collective)."""
        return self.sync.global_pairs(self.factors, list(self.factors.A))

    # ------------------------------------------------------------------ inverses
    def _make_inverses(self, gammas: list[float]) -> list:
        approx = self.config.approx
        L = len(self.layers)
        A, G = self.sync.global_pairs(self.factors, used_pairs(L, approx))
        snap = lambda t: t.detach().clone()
        tri = approx == "tridiag"
        self._inverse_inputs = {
            "A": [snap(A[(i, i)]) for i in range(L)], "G": [snap(G[(i, i)]) for i in range(L)],
            "A_off": [snap(A[(i, i + 1)]) for i in range(L - 1)] if tri else None,
            "G_off": [snap(G[(i, i + 1)]) for i in range(L - 1)] if tri else None,
        }
        return self._build_distributed(gammas)

    def _inverse_from_inputs(self, gamma: float):
        return self._build_distributed([gamma])[0]

    def _build_distributed(self, gammas: list) -> list:
        """Compute this rank's share of the inverse pieces (LPT on flops), agree on failures,
        broadcast each owner's pieces, assemble the same inverses on every rank."""
        names = [f"layer {l.index} ({l.name})" for l in self.layers]
        tasks, assemble = inverse_tasks(self._inverse_inputs, gammas, self.config.damping_type, self.inverse_dtype,
                                        names)
        results, stats = run_shared(tasks, self.comm, self.inverse_dtype, self.device,
                                    "computing its share of the K-FAC inverses",
                                    sync_cuda=self.device.type == "cuda" and self.profile)
        self.host_syncs += stats.pop("host_syncs")
        self.inverse_stats = {**stats, "gammas": len(gammas)}
        for key in ("compute_s", "compute_cpu_s", "comm_s"):
            self.inverse_time[key] += stats[key]
        self.inverse_time["refreshes"] += 1
        return assemble(results)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """As ``KFAC.state_dict`` with the global factors (collective: call on every rank). The
        state is the single-process one: a ``KFAC`` or a ``DistributedKFAC`` of any size loads it
        (with ``sampling="local"`` the generator state is this rank's)."""
        state = super().state_dict()
        if self.world_size > 1:
            keys = sorted(k for k in self.sync.partial if k in self.factors.A)
            A, G = self.sync.global_pairs(self.factors, keys)
            fs = state["factors"]
            fs["A"], fs["G"] = dict(fs["A"]), dict(fs["G"])
            for i, j in keys:
                fs["A"][f"{i},{j}"], fs["G"][f"{i},{j}"] = A[(i, j)], G[(i, j)]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a (global) state on every rank (collective when inverses are rebuilt); all or
        nothing, checked first, as ``KFAC.load_state_dict``."""
        with all_or_nothing(self, generators=[self.generator]):
            super().load_state_dict(state)
            self.sync.reset()
            if self.sampling == "local" and self.world_size > 1:
                g = self.generator
                g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) + 1_000_003 * self.rank)
