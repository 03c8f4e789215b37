"""The curvature engine over ``torch.distributed`` ranks: :class:`DistributedEngine` overrides the
engine's documented extension points (docs/architecture.md#distributed-k-fac) — (a) reductions,
(b) inverses, (c) which cases — and nothing else, so the factors, their ε_k schedule, the inverse
snapshot and its refresh schedule stay the one engine's.

(c) Which cases: the batch is the global one over the shards (:mod:`.sharding`): the statistics
and exact-F rows are the first ``N1``, ``N2`` of the global order, each rank's share a prefix of
its shard; with ``sampling="global"`` the targets are the single-process draw (the generator is
seeded alike on all ranks and each rank keeps its rows of the whole draw), with ``"local"`` each
rank draws its own rows from a rank-seeded generator (statistically equivalent, not bitwise).
(a) Reductions: each rank forms its rows' share ``Σ_rows ā āᵀ / N1`` of the mini-batch factors,
summed over ranks as ``factor_sync`` says (:mod:`.factor_sync`); the scalars a step sends to the
host are weighted by the rank's share and summed. (b) Inverses: the pieces are assigned by LPT on
their flop counts, computed by their owner, broadcast and assembled with ``from_pieces`` on every
rank (:mod:`.assignment`, :mod:`.inverses`).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..curvature import batch_factors
from ..curvature.engine import CurvatureEngine, Share, subset_rows
from .assignment import run_shared
from .communicator import Communicator
from .factor_sync import FactorSync, used_pairs
from .inverses import eigen_tasks, inverse_tasks
from .sharding import ShardPlan, ShardSampling, shard_plan

__all__ = ["DistributedEngine", "SAMPLINGS", "LOCAL_SEED_STRIDE"]

SAMPLINGS = ("global", "local")
LOCAL_SEED_STRIDE = 1_000_003   # sampling="local": rank r's generator is seeded with seed + r · stride


class DistributedEngine(CurvatureEngine):
    """A :class:`CurvatureEngine` whose batch is sharded over the ranks of ``comm``.

    ``factor_sync``: ``"eager"`` or ``"lazy"`` (:class:`FactorSync`); ``approx``: a function giving
    the approximation in use (``"blockdiag"`` / ``"tridiag"``: which pairs eager sync sums);
    ``sampling``: ``"global"`` or ``"local"``. Other arguments are the engine's. ``sync_cuda``
    (default False): synchronise CUDA around the inverse work, so that its timings are exact.
    Attributes: ``shard`` (this step's :class:`ShardPlan`), ``inverse_stats`` (this rank's share of the last inverse recomputation),
    ``inverse_time`` (totals: ``compute_s`` wall and ``compute_cpu_s`` CPU seconds on this rank's
    tasks, ``comm_s`` broadcasting, ``refreshes``), ``host_syncs`` (values this engine brought to
    the host)."""

    def __init__(self, model: nn.Module, loss="categorical", exclude=(), *, comm: Communicator, approx,
                 factor_sync: str = "eager", sampling: str = "global", **options):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling={sampling!r}: choose one of {SAMPLINGS}")
        super().__init__(model, loss, exclude, **options)
        self.comm, self.rank, self.world = comm, comm.rank, comm.world
        self.sync = FactorSync(comm, factor_sync)
        self.sampling, self._approx, self.sync_cuda = sampling, approx, False
        self.loss = ShardSampling(self.loss)
        if sampling == "local" and self.world > 1:
            self.seed = self.seed + LOCAL_SEED_STRIDE * self.rank
        self.shard: ShardPlan | None = None
        self._rank_cases: tuple | None = None  # this rank's per-case statistics and its share n1/N1 (EKFAC)
        self._shard_cache: dict = {}
        self.host_syncs = 0
        self.inverse_stats: dict = {}
        self.inverse_time = {"compute_s": 0.0, "compute_cpu_s": 0.0, "comm_s": 0.0, "refreshes": 0}

    # ------------------------------------------------------------------ (c) which cases
    def subset_sizes(self, m: int, stats_fraction: float, fisher_fraction: float) -> tuple[int, int, int]:
        """``(global batch size, n1, n2)``: this rank's rows of the first ``N1``, ``N2`` global rows."""
        sizes = tuple(self.comm.all_gather_int(m, "sizes", self.device))
        self.host_syncs += self.world > 1
        M = sum(sizes)
        key = (sizes, subset_rows(M, stats_fraction), subset_rows(M, fisher_fraction))
        if key not in self._shard_cache:
            self._shard_cache = {key: shard_plan(sizes, self.rank, key[1], key[2], self.device)}
        self.shard = self._shard_cache[key]
        return M, self.shard.n1, self.shard.n2

    def statistics(self, x: Tensor, y: Tensor | None, mode: str, z: Tensor | None = None,
                   acts: list | None = None) -> tuple[dict, dict]:
        """This rank's share ``Σ_{its rows} ā āᵀ / N1`` (and ``g``'s) of the global mini-batch
        factors, keyed by pair (a rank with no statistics rows contributes zeros)."""
        sh, n1 = self.shard, x.shape[0]
        global_draw = self.sampling == "global" and self.world > 1 and mode == "sampled"
        if n1 == 0:
            if global_draw:  # keep the shared generator in step with the other ranks
                self.loss.skip(sh, z, self.generator)
            self.derivatives = None
            self._rank_cases = (None, None, 0.0)
            return self._zero_factors()
        self.loss.plan = sh if global_draw else None
        try:
            a, g = super().statistics(x, y, mode, z=z, acts=acts)
        finally:
            self.loss.plan = None
        self._rank_cases = (a, g, n1 / sh.N1)
        A, G = batch_factors(a, g, self.factors.pairs, self.weight_sharing)
        if n1 != sh.N1:
            A = {k: v * (n1 / sh.N1) for k, v in A.items()}
            G = {k: v * (n1 / sh.N1) for k, v in G.items()}
        return A, G

    def _zero_factors(self) -> tuple[dict, dict]:
        dt, dev, L = self.factor_dtype, self.device, self.layers
        A = {(i, j): torch.zeros(L[i].in_dim, L[j].in_dim, dtype=dt, device=dev) for i, j in self.factors.pairs}
        G = {(i, j): torch.zeros(L[i].d_out, L[j].d_out, dtype=dt, device=dev) for i, j in self.factors.pairs}
        return A, G

    def exact_fisher_share(self, Q: Tensor, n2: int) -> Tensor:
        """This rank's share of an exact-F product averaged over its ``n2`` rows: times ``n2 / N2``."""
        return Q * (n2 / self.shard.N2) if n2 != self.shard.N2 else Q

    # ------------------------------------------------------------------ (a) reductions
    def statistics_trace(self, stats) -> Tensor:
        """``Σ tr Ā_i + Σ tr G_i`` of this rank's share (a partial sum: summed over ranks with the
        step's checks, it is the engine's trace of the global mini-batch statistics)."""
        A_b, G_b = stats
        return sum(A_b[(i, i)].diagonal().sum() + G_b[(i, i)].diagonal().sum() for i in range(len(self.layers)))

    def update_factors(self, stats) -> None:
        """Sum the ranks' shares (as ``factor_sync`` says), then blend them into the running factors."""
        with torch.no_grad():
            used = used_pairs(len(self.layers), self._approx())
            self.factors.update(*self.sync.reduce_batch(self.factors, *stats, used))
        self._scale_cases, self._rank_cases = self._rank_cases, None

    def reduce_scales(self, scales: list[Tensor]) -> list[Tensor]:
        """(a) EKFAC's scales of this rank's share of the statistics rows, summed over ranks (every
        step they are updated: the preconditioner applies them at once)."""
        return self.comm.all_reduce_tensors(scales, "scales")

    def reduce_scalars(self, t: Tensor, shares) -> Tensor:
        """The scalars of a step summed over ranks, each weighted by what it is here (:class:`Share`):
        a mean over this shard's cases × m/M, a part of a sum × 1, the same on every rank × 1/W."""
        if self.world == 1:
            return t
        sh, W = self.shard, self.world
        weight = {Share.CASE_MEAN: sh.m / sh.M, Share.PART: 1.0, Share.SAME: 1 / W}
        t = t.double()
        if len(shares) != (t.shape[-1] if t.dim() else 1):
            raise ValueError(f"reduce_scalars: {len(shares)} shares for scalars of shape {tuple(t.shape)}")
        w = t.new_tensor([weight[s] for s in shares]).reshape(t.shape[-1:] if t.dim() else ())
        return self.comm.all_reduce_((t * w).contiguous(), "scalars")

    def global_factors(self, keys) -> tuple[dict, dict]:
        """The running ``A``, ``G`` of ``keys`` as one process would hold them (collective when a
        pair is kept as per-rank partial sums)."""
        return self.sync.global_pairs(self.factors, list(keys))

    # ------------------------------------------------------------------ (b) inverses
    def build_inverses(self, gammas: list[float], damping_type: str) -> list:
        """One inverse per γ: this rank's LPT share of the pieces, failures agreed on, pieces
        broadcast, the same inverses assembled on every rank (EKFAC: the eigendecompositions)."""
        dtype = self.inverse_dtype or self.factor_dtype
        if self.ekfac is not None:
            tasks, assemble = eigen_tasks(self.inputs["A"], self.inputs["G"], dtype, self.names)
            return self.ekfac_inverses(assemble(self._run_shared(tasks, len(gammas))), gammas)
        tasks, assemble = inverse_tasks(self.inputs, gammas, damping_type, dtype, self.names)
        return assemble(self._run_shared(tasks, len(gammas)))

    def _run_shared(self, tasks, gammas: int) -> dict:
        results, stats = run_shared(tasks, self.comm, self.inverse_dtype or self.factor_dtype, self.device,
                                    "computing its share of the K-FAC inverses", sync_cuda=self.sync_cuda)
        self.host_syncs += stats.pop("host_syncs")
        self.inverse_stats = {**stats, "gammas": gammas}
        for key in ("compute_s", "compute_cpu_s", "comm_s"):
            self.inverse_time[key] += stats[key]
        self.inverse_time["refreshes"] += 1
        return results

    def inverse_from_inputs(self, gamma: float, damping_type: str):
        if self.ekfac is not None:  # EKFAC's basis and scales, the same on every rank (none yet: the snapshot's)
            return super().inverse_from_inputs(gamma, damping_type)
        return self.build_inverses([gamma], damping_type)[0]

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """The engine's state with the global factors (collective: call on every rank): what one
        process would save, so an engine of any world size loads it."""
        state = super().state_dict()
        keys = sorted(k for k in self.sync.partial if k in self.factors.A)
        if keys:
            A, G = self.global_factors(keys)
            fs = state["factors"] = dict(state["factors"])
            fs["A"], fs["G"] = dict(fs["A"]), dict(fs["G"])
            for i, j in keys:
                fs["A"][f"{i},{j}"], fs["G"][f"{i},{j}"] = A[(i, j)], G[(i, j)]
        return state

    def load_checked(self, v: dict) -> None:
        """Take a (global) state: nothing is partial any more; with ``sampling="local"`` the loaded
        generator is re-seeded per rank from its own next draw."""
        super().load_checked(v)
        self.sync = FactorSync(self.comm, self.sync.mode)  # a new object: a failed load puts the old one back
        if self.sampling == "local" and self.world > 1:
            g = self.generator
            draw = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
            g.manual_seed(draw + LOCAL_SEED_STRIDE * self.rank)
