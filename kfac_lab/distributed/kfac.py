"""Data-parallel K-FAC on ``torch.distributed`` (docs/algorithm.md#one-iteration,
docs/architecture.md#distributed-k-fac), launched with ``torchrun``: the ``KFAC`` front end over a
:class:`~kfac_lab.distributed.engine.DistributedEngine`.

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

from ..optim.kfac import KFAC
from .communicator import Communicator
from .engine import SAMPLINGS, DistributedEngine
from .factor_sync import FACTOR_SYNCS

__all__ = ["DistributedKFAC"]


class DistributedKFAC(KFAC):
    """K-FAC (Algorithm 2) over ``torch.distributed`` ranks; see the module docstring.

    ``model``: a ``DistributedDataParallel`` model (layers found on ``.module``; its gradients come
    from DDP's all-reduce) or a plain model (its gradients are all-reduced here; its parameters are
    broadcast from rank 0 at construction unless ``broadcast_parameters=False``).
    ``process_group``: the group (default: the default group; none initialised: one process).
    ``bucket_mb``: the largest single collective, in MiB. ``factor_sync``: ``"eager"`` (reduce the
    used factor statistics on every update) or ``"lazy"`` (only when inverses are recomputed).
    ``sampling``: ``"global"`` (the single-process draw, exactly) or ``"local"``.
    All other arguments are ``KFAC``'s. ``self.curvature`` is the :class:`DistributedEngine`.
    Attributes: ``comm.stats`` (bytes and calls per category), ``inverse_stats`` (this rank's
    share of the last inverse recomputation) and ``inverse_time`` (totals: ``compute_s`` wall and
    ``compute_cpu_s`` process CPU seconds on this rank's tasks, ``comm_s`` broadcasting,
    ``refreshes``). ``state_dict`` holds the global factors (collective): a ``KFAC`` or a
    ``DistributedKFAC`` of any size loads it (with ``sampling="local"`` the generator state is
    this rank's).
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
        self.comm = Communicator(process_group, int(bucket_mb * 2**20), lambda: self.k + 1)
        self.factor_sync, self.sampling = factor_sync, sampling
        self.rank, self.world_size = self.comm.rank, self.comm.world
        super().__init__(ddp.module if ddp is not None else model, loss, **kwargs)
        self.ddp = ddp
        self.curvature.sync_cuda = self.profile
        if broadcast_parameters and ddp is None and self.world_size > 1:
            with torch.no_grad():
                params = [p.detach() for p in self.params]
                flat = torch.cat([p.reshape(-1) for p in params])
                self.comm.broadcast_(flat, 0, "parameters")
                pos = 0
                for p in params:
                    p.copy_(flat[pos:pos + p.numel()].view_as(p))
                    pos += p.numel()

    def _new_curvature(self, model: nn.Module, loss, exclude, **options) -> DistributedEngine:
        return DistributedEngine(model, loss, exclude, comm=self.comm, approx=lambda: self.config.approx,
                                 factor_sync=self.factor_sync, sampling=self.sampling, **options)

    # ------------------------------------------------------------------ what the engine measures
    @property
    def host_syncs(self) -> int:
        """Values brought to the host: the step's own and the engine's (batch sizes, agreement on failures)."""
        return self._step_syncs + self.curvature.host_syncs

    @host_syncs.setter
    def host_syncs(self, value: int) -> None:
        self._step_syncs = value - self.curvature.host_syncs

    inverse_stats = property(lambda self: self.curvature.inverse_stats,
                             doc="This rank's share of the last inverse recomputation (the engine's).")
    inverse_time = property(lambda self: self.curvature.inverse_time,
                            doc="Totals of the inverse work on this rank (the engine's).")

    def global_factors(self) -> tuple[dict, dict]:
        """All running factors as the single-process run would hold them (collective)."""
        return self.curvature.global_factors(list(self.factors.A))

    # ------------------------------------------------------------------ the front end's parts of a step
    def _forward_backward(self, x: Tensor, y: Tensor, rows: int):
        """The global mean gradient: this rank's, weighted by its share ``m/M`` and summed over
        ranks (a DDP model: DDP's backward averages them; not reduced again)."""
        sh = self.curvature.shard
        if self.ddp is None:
            z, acts, nll, grads = super()._forward_backward(x, y, rows)
            if self.world_size > 1:
                w = sh.m / sh.M
                grads = self.comm.all_reduce_tensors([g * w for g in grads], "gradients")
            return z, acts, nll, grads
        z, acts = self.curvature.forward(self.ddp, x, rows)
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

    def _fisher_gram(self, x2, z2, acts, n2, dirs):
        """This rank's share of ``Q = dᵀ F d`` over the global exact-F rows (summed over ranks with
        the step's other products)."""
        if n2 == 0:
            return torch.zeros(len(dirs), len(dirs), dtype=self.dtype, device=self.device)
        return self.curvature.exact_fisher_share(super()._fisher_gram(x2, z2, acts, n2, dirs), n2)
