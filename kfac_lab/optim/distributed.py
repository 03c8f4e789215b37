"""Data-parallel K-FAC on ``torch.distributed`` (docs/algorithm.md#one-iteration), launched with ``torchrun``.

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

import datetime
import functools
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import errors as _errors
from ..curvature import Capture, batch_factors
from ..curvature import decompositions as dec
from ..curvature.inverses import (BlockDiagonalInverse, BlockTridiagonalInverse, add_to_diagonal, as_gamma,
                                  pi_factor, tridiagonal_side)
from ..curvature.losses import DelegatingLoss, Loss
from ..errors import KFACError
from .state_check import all_or_nothing
from .kfac import KFAC

__all__ = ["DistributedKFAC", "DistributedError", "CommStats", "init_distributed", "shard", "global_order",
           "reference_batch", "assign_lpt", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 60.0
FACTOR_SYNCS = ("eager", "lazy")
SAMPLINGS = ("global", "local")


class DistributedError(KFACError):
    """A collective failed: a peer rank raised, died, or did not answer within the timeout."""


# ---------------------------------------------------------------------------------------------
# Process group, shards and the global order of the rows.

def init_distributed(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT_S, init_method: str | None = None,
                     rank: int | None = None, world_size: int | None = None) -> tuple[int, int, torch.device]:
    """Initialise the default process group (from ``torchrun``'s environment unless ``init_method``,
    ``rank`` and ``world_size`` are given) with a ``timeout`` in seconds, so that a rank that fails
    mid-step makes the others raise instead of hanging. ``backend``: ``None`` picks NCCL when CUDA
    and NCCL are available, else gloo. Returns ``(rank, world_size, device)``; with NCCL the device
    is ``cuda:LOCAL_RANK`` (and made current). Already initialised: returns what is there."""
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this build of PyTorch")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank if rank is not None else 0)) % max(torch.cuda.device_count(), 1)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": datetime.timedelta(seconds=float(timeout))}
        if init_method is not None:
            kwargs["init_method"] = init_method
        if rank is not None:
            kwargs["rank"] = rank
        if world_size is not None:
            kwargs["world_size"] = world_size
        dist.init_process_group(**kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def shard(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s shard of a global batch: rows ``rank, rank + W, rank + 2W, …``. With these
    shards ``DistributedKFAC`` equals ``KFAC`` on the global batch in its own order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world size {world_size}")
    return t[rank::world_size]


@functools.lru_cache(maxsize=16)
def _positions(sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per rank, the global position of each local row (increasing): round-robin, j-major."""
    r = np.concatenate([np.full(s, i, dtype=np.int64) for i, s in enumerate(sizes)])
    j = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
    order = np.lexsort((r, j))                 # sort by local index j, then by rank
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return tuple(pos[starts[i]:starts[i] + s] for i, s in enumerate(sizes))


def global_order(sizes) -> Tensor:
    """Indices into ``torch.cat(shards)`` listing the rows in their global order (round-robin over
    the shards, local row first, rank second): ``torch.cat(shards)[global_order(sizes)]`` is the
    global batch (for shards made with :func:`shard`, the original batch)."""
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 0:
        raise ValueError(f"shard sizes must be non-negative, got {sizes}")
    pos = np.concatenate(_positions(sizes))
    return torch.from_numpy(np.argsort(pos, kind="stable"))


def reference_batch(xs, ys=None):
    """The global batch that ``KFAC`` must see to reproduce a ``DistributedKFAC`` run whose rank
    ``r`` got ``(xs[r], ys[r])``. Returns ``x`` (and ``y`` when ``ys`` is given)."""
    idx = global_order([x.shape[0] for x in xs])
    x = torch.cat(list(xs))[idx.to(xs[0].device)]
    if ys is None:
        return x
    return x, torch.cat(list(ys))[idx.to(ys[0].device)]


def assign_lpt(costs, workers: int) -> list[int]:
    """Greedy longest-processing-time: tasks by decreasing cost (ties: lower index first), each to
    the least-loaded worker (ties: lower rank). Deterministic, so every rank agrees."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        w = min(range(workers), key=lambda r: (load[r], r))
        owner[i] = w
        load[w] += float(costs[i])
    return owner


# ---------------------------------------------------------------------------------------------
# Communication: bucketed, counted, with clear errors.

@dataclass
class CommStats:
    """Payload bytes and calls per category (``"sizes"``, ``"gradients"``, ``"factors"``,
    ``"scalars"``, ``"inverses"``, ``"status"``, ``"parameters"``). The bytes are the tensors handed
    to the collectives; a ring all-reduce moves about 2(W−1)/W of that per rank on the wire.
    ``"gradients (DDP)"`` is the payload DDP all-reduced (counted, not sent, here)."""

    bytes: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, category: str, nbytes: int, calls: int = 1) -> None:
        self.bytes[category] = self.bytes.get(category, 0) + int(nbytes)
        self.calls[category] = self.calls.get(category, 0) + int(calls)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def snapshot(self) -> dict:
        return {"bytes": dict(self.bytes), "calls": dict(self.calls)}


_TRIU: dict = {}


def _triu(d: int, device) -> tuple[Tensor, Tensor]:
    key = (d, str(device))
    if key not in _TRIU:
        iu = torch.triu_indices(d, d, device=device)
        _TRIU[key] = (iu[0], iu[1])
    return _TRIU[key]


def _pack(tensors: list[Tensor], sym: list[bool], dtype) -> Tensor:
    parts = []
    for t, s in zip(tensors, sym):
        if s:
            i, j = _triu(t.shape[0], t.device)
            parts.append(t[i, j].to(dtype))
        else:
            parts.append(t.reshape(-1).to(dtype))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def _packed_numel(shape, sym: bool) -> int:
    if sym:
        return shape[0] * (shape[0] + 1) // 2
    return int(math.prod(shape))


def _unpack(flat: Tensor, shapes, sym: list[bool], dtypes) -> list[Tensor]:
    out, pos = [], 0
    for shape, s, dt in zip(shapes, sym, dtypes):
        n = _packed_numel(shape, s)
        seg = flat[pos:pos + n]
        pos += n
        if s:
            d = shape[0]
            i, j = _triu(d, flat.device)
            M = flat.new_empty((d, d))
            M[i, j] = seg
            M[j, i] = seg
            out.append(M.to(dt))
        else:
            out.append(seg.reshape(shape).to(dt))
    return out


class _Comm:
    """The collectives DistributedKFAC uses, on ``group``: flat buffers chunked to ``bucket_bytes``,
    launched asynchronously, payload counted in ``stats``, failures raised as ``DistributedError``."""

    def __init__(self, group, bucket_bytes: int, step_of):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world = dist.get_world_size(group) if self.active else 1
        self.bucket_bytes = max(int(bucket_bytes), 1)
        self.stats = CommStats()
        self._step_of = step_of

    def _global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _fail(self, op: str, category: str, exc: BaseException):
        raise DistributedError(
            f"rank {self.rank} of {self.world}: {op} of {category} failed at K-FAC step {self._step_of()}: a peer rank "
            "raised, died, or did not answer within the process group's timeout (set it with "
            f"init_distributed(timeout=...), default {DEFAULT_TIMEOUT_S:g} s); look for the first error in the "
            f"other ranks' output. Cause: {type(exc).__name__}: {exc}"
        ) from exc

    def _chunks(self, flat: Tensor) -> list[Tensor]:
        n = max(self.bucket_bytes // flat.element_size(), 1)
        return [flat[i:i + n] for i in range(0, flat.numel(), n)] or [flat]

    def all_reduce_(self, flat: Tensor, category: str, op=None) -> Tensor:
        """In-place sum (or ``op``) of a contiguous 1-D or small tensor, bucketed."""
        if self.world == 1:
            return flat
        op = dist.ReduceOp.SUM if op is None else op
        chunks = self._chunks(flat.reshape(-1))
        try:
            works = [dist.all_reduce(c, op=op, group=self.group, async_op=True) for c in chunks]
            for w in works:
                w.wait()
        except RuntimeError as exc:
            self._fail("all_reduce", category, exc)
        self.stats.add(category, flat.numel() * flat.element_size(), len(chunks))
        return flat

    def all_reduce_tensors(self, tensors: list[Tensor], category: str, sym: list[bool] | None = None) -> list[Tensor]:
        """Sums of ``tensors`` over ranks (new tensors), sent as one flat buffer (upper triangles of
        the ``sym`` ones) in ≤ ``bucket_bytes`` chunks."""
        if self.world == 1 or not tensors:
            return list(tensors)
        sym = sym or [False] * len(tensors)
        dtype = tensors[0].dtype
        flat = _pack(tensors, sym, dtype)
        self.all_reduce_(flat, category)
        return _unpack(flat, [t.shape for t in tensors], sym, [t.dtype for t in tensors])

    def broadcast_(self, flat: Tensor, src: int, category: str) -> Tensor:
        if self.world == 1:
            return flat
        chunks = self._chunks(flat)
        try:
            works = [dist.broadcast(c, src=self._global_rank(src), group=self.group, async_op=True) for c in chunks]
            for w in works:
                w.wait()
        except RuntimeError as exc:
            self._fail(f"broadcast from rank {src}", category, exc)
        self.stats.add(category, flat.numel() * flat.element_size(), len(chunks))
        return flat

    def all_gather_int(self, value: int, category: str, device) -> list[int]:
        if self.world == 1:
            return [int(value)]
        mine = torch.tensor([int(value)], dtype=torch.int64, device=device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        try:
            dist.all_gather(out, mine, group=self.group)
        except RuntimeError as exc:
            self._fail("all_gather", category, exc)
        self.stats.add(category, mine.numel() * mine.element_size() * self.world)
        return [int(v) for v in torch.cat(out).tolist()]

    def all_gather_object(self, obj, category: str) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            self._fail("all_gather_object", category, exc)
        self.stats.add(category, 0)
        return out


# ---------------------------------------------------------------------------------------------
# Sampled targets: every rank draws all N1 rows and keeps its own.

class _ShardSampling(DelegatingLoss):
    """Wraps the optimizer's loss; ``sample`` draws the targets of the whole global statistics
    subset (this rank's rows at their global positions, zeros elsewhere) with the shared
    generator and returns this rank's rows. Everything else is delegated."""

    def __init__(self, base: Loss, opt: "DistributedKFAC"):
        super().__init__(base)
        self._opt = opt

    def __getattr__(self, name):
        if name in ("base", "_opt"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def sample(self, z, generator=None):
        sh = self._opt._sampling_shard
        if sh is None or z.shape[0] != sh.n1:
            return self.base.sample(z, generator)
        full = z.new_zeros((sh.N1,) + tuple(z.shape[1:]))
        full[sh.stats_pos] = z.detach()
        return self.base.sample(full, generator)[sh.stats_pos]

    def __repr__(self):
        return f"{self.base!r} (sampled across shards)"


@dataclass(frozen=True)
class _Shard:
    """This rank's part of the step: ``m`` of ``M`` cases, ``n1`` of ``N1`` statistics rows (at
    global positions ``stats_pos``), ``n2`` of ``N2`` exact-F rows."""

    m: int
    M: int
    n1: int
    N1: int
    n2: int
    N2: int
    stats_pos: Tensor


# ---------------------------------------------------------------------------------------------
# Inverses computed in pieces across ranks.

@dataclass
class _Task:
    key: tuple
    cost: float
    shapes: list          # output shapes
    sym: list             # output symmetric (sent as upper triangle)
    fn: object            # () -> list[Tensor]


def _tridiag_side_cost(d: int, d_next: int) -> float:
    """Flops of one side of one layer's tridiagonal pieces: two Cholesky factorisations, the Ψ
    solve and product, two triangular solves, one symmetric eigendecomposition (~4d³), one more solve."""
    return d_next**3 / 3 + 2 * d * d_next**2 + d**3 / 3 + 2 * d**3 + 4 * d**3 + d**3


# ---------------------------------------------------------------------------------------------
# The optimizer.

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
        self.comm = _Comm(process_group, int(bucket_mb * 2**20), lambda: self.k + 1)
        self.rank, self.world_size = self.comm.rank, self.comm.world
        self.loss = _ShardSampling(self.loss, self)
        if sampling == "local" and self.world_size > 1:
            self.generator.manual_seed(int(kwargs.get("seed", 0)) + 1_000_003 * self.rank)
        self._partial: set = set()
        self._shard: _Shard | None = None
        self._sampling_shard: _Shard | None = None
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
            pos = _positions(sizes)[self.rank]
            n1, n2 = int(np.searchsorted(pos, N1)), int(np.searchsorted(pos, N2))
            sh = _Shard(m, M, n1, N1, n2, N2, torch.as_tensor(pos[:n1], device=self.device))
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
                self.loss.base.sample(z1.new_zeros((sh.N1,) + tuple(z1.shape[1:])), self.generator)
            return self._zero_factors()
        self._sampling_shard = sh if global_draw else None
        try:
            A, G = batch_factors(*super()._batch_statistics(x1, y1, z1, acts, n1), self.factors.pairs)
        finally:
            self._sampling_shard = None
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
    def _used_pairs(self, approx: str) -> list:
        L = len(self.layers)
        return [(i, i) for i in range(L)] + ([(i, i + 1) for i in range(L - 1)] if approx == "tridiag" else [])

    def _statistics_trace(self, stats) -> Tensor:
        A_b, G_b = stats
        return sum(t.diagonal().sum() for t in A_b.values()) + sum(t.diagonal().sum() for t in G_b.values())

    def _update_factors(self, stats) -> None:
        """All-reduce this rank's share of the mini-batch factors, then blend them in."""
        self.factors.update(*self._reduce_statistics(*stats))

    def _reduce_statistics(self, A_b: dict, G_b: dict) -> tuple[dict, dict]:
        if self.world_size == 1:
            return A_b, G_b
        F = self.factors
        synced = set() if self.factor_sync == "lazy" else set(self._used_pairs(self.config.approx))
        for key in F.pairs:  # pairs no longer reduced every step become partial sums: rank 0 keeps the value
            if key not in synced and key not in self._partial:
                if self.rank != 0 and key in F.A:
                    F.A[key].zero_()
                    F.G[key].zero_()
                self._partial.add(key)
        joining = [k for k in F.pairs if k in synced and k in self._partial and k in F.A]
        batch = [k for k in F.pairs if k in synced]
        tensors, sym = [], []
        for k in joining:
            tensors += [F.A[k], F.G[k]]
            sym += [k[0] == k[1]] * 2
        for k in batch:
            tensors += [A_b[k], G_b[k]]
            sym += [k[0] == k[1]] * 2
        reduced = self.comm.all_reduce_tensors(tensors, "factors", sym)
        pos = 0
        for k in joining:  # partial running sums become the global running average
            F.A[k].copy_(reduced[pos])
            F.G[k].copy_(reduced[pos + 1])
            pos += 2
        self._partial -= set(k for k in F.pairs if k in synced)
        A_out, G_out = dict(A_b), dict(G_b)
        for k in batch:
            A_out[k], G_out[k] = reduced[pos], reduced[pos + 1]
            pos += 2
        return A_out, G_out

    def _global_pairs(self, keys) -> tuple[dict, dict]:
        """Global running ``A``, ``G`` of ``keys`` (partial sums are all-reduced into copies)."""
        F = self.factors
        need = [k for k in keys if k in self._partial and k in F.A] if self.world_size > 1 else []
        tensors, sym = [], []
        for k in need:
            tensors += [F.A[k], F.G[k]]
            sym += [k[0] == k[1]] * 2
        reduced = self.comm.all_reduce_tensors(tensors, "factors", sym)
        A = {k: F.A[k] for k in keys}
        G = {k: F.G[k] for k in keys}
        for n, k in enumerate(need):
            A[k], G[k] = reduced[2 * n], reduced[2 * n + 1]
        return A, G

    def global_factors(self) -> tuple[dict, dict]:
        """All running factors as the single-process run would hold them (collective)."""
        return self._global_pairs(list(self.factors.A))

    # ------------------------------------------------------------------ inverses
    def _make_inverses(self, gammas: list[float]) -> list:
        approx = self.config.approx
        L = len(self.layers)
        A, G = self._global_pairs(self._used_pairs(approx))
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

    def _inverse_tasks(self, inp: dict, gammas: list) -> tuple[list[_Task], object]:
        """The independent pieces of the inverses for every γ, with their flop counts, and a
        function assembling the inverses from the pieces."""
        dt = self.inverse_dtype
        A = [a.to(dt) for a in inp["A"]]
        G = [g.to(dt) for g in inp["G"]]
        L = len(A)
        names = [f"layer {l.index} ({l.name})" for l in self.layers]
        damping = self.config.damping_type
        gam = [as_gamma(g, A[0]) for g in gammas]
        pi = [pi_factor(a, g) for a, g in zip(A, G)]
        tasks: list[_Task] = []
        if inp["A_off"] is None and damping == "tikhonov":
            for i in range(L):
                for side, M in (("A", A[i]), ("G", G[i])):
                    d = M.shape[0]
                    tasks.append(_Task(("eig", side, i), 4.0 * d**3, [(d,), (d, d)], [False, False],
                                       functools.partial(lambda M, w: list(dec.eigh(M, w)), M, f"{side} of {names[i]}")))

            def assemble(results):
                eig = [(tuple(results[("eig", "A", i)]), tuple(results[("eig", "G", i)])) for i in range(L)]
                return [BlockDiagonalInverse.from_pieces(A, G, g, damping_type=damping, inverse_dtype=dt, names=names,
                                                         eig=eig) for g in gam]
            return tasks, assemble

        if inp["A_off"] is None:
            def damped_inverse(M, shift, what):
                return [dec.cholesky_inverse(add_to_diagonal(M, shift), what)]

            for c, g in enumerate(gam):
                for i in range(L):
                    a, gg = A[i], G[i]
                    tasks.append(_Task(("inv", c, "A", i), float(a.shape[0]) ** 3, [tuple(a.shape)], [True],
                                       functools.partial(damped_inverse, a, pi[i] * g, f"damped A of {names[i]}")))
                    tasks.append(_Task(("inv", c, "G", i), float(gg.shape[0]) ** 3, [tuple(gg.shape)], [True],
                                       functools.partial(damped_inverse, gg, g / pi[i], f"damped G of {names[i]}")))

            def assemble(results):
                return [BlockDiagonalInverse.from_pieces(
                    A, G, g, damping_type=damping, inverse_dtype=dt, names=names,
                    A_inv=[results[("inv", c, "A", i)][0] for i in range(L)],
                    G_inv=[results[("inv", c, "G", i)][0] for i in range(L)]) for c, g in enumerate(gam)]
            return tasks, assemble

        if damping != "factored":
            raise ValueError("the block-tridiagonal inverse needs factored Tikhonov damping (damping='factored')")
        A_off = [t.to(dt) for t in inp["A_off"]]
        G_off = [t.to(dt) for t in inp["G_off"]]

        def side(F, F_off, i, shift_i, shift_next, label):
            L_next = dec.cholesky(add_to_diagonal(F[i + 1], shift_next), f"damped {label} of {names[i + 1]}")
            L_i = dec.cholesky(add_to_diagonal(F[i], shift_i), f"damped {label} of {names[i]}")
            return list(tridiagonal_side(L_i, L_next, F_off[i], f"Σ {label}-side of {names[i]}"))

        def last(M, shift, what):
            return [dec.cholesky_inverse(add_to_diagonal(M, shift), what)]

        for c, g in enumerate(gam):
            for i in range(L - 1):
                for label, F, F_off, sh_i, sh_n in (("A", A, A_off, pi[i] * g, pi[i + 1] * g),
                                                    ("G", G, G_off, g / pi[i], g / pi[i + 1])):
                    d, dn = F[i].shape[0], F[i + 1].shape[0]
                    tasks.append(_Task(("tri", c, label, i), _tridiag_side_cost(d, dn), [(d, dn), (d, d), (d,)],
                                       [False, False, False], functools.partial(side, F, F_off, i, sh_i, sh_n, label)))
            for label, M, shift in (("A", A[-1], pi[-1] * g), ("G", G[-1], g / pi[-1])):
                d = M.shape[0]
                tasks.append(_Task(("last", c, label), float(d) ** 3, [(d, d)], [True],
                                   functools.partial(last, M, shift, f"damped {label} of {names[-1]}")))

        def assemble(results):
            out = []
            for c, g in enumerate(gam):
                r = lambda label, i: results[("tri", c, label, i)]
                out.append(BlockTridiagonalInverse.from_pieces(
                    A, G, A_off, G_off, g, inverse_dtype=dt, names=names,
                    sides_A=[r("A", i) for i in range(L - 1)], sides_G=[r("G", i) for i in range(L - 1)],
                    last_A_inv=results[("last", c, "A")][0], last_G_inv=results[("last", c, "G")][0]))
            return out
        return tasks, assemble

    def _build_distributed(self, gammas: list) -> list:
        """Compute this rank's share of the inverse pieces (LPT on flops), agree on failures,
        broadcast each owner's pieces, assemble the same inverses on every rank."""
        tasks, assemble = self._inverse_tasks(self._inverse_inputs, gammas)
        W, rank = self.world_size, self.rank
        owners = assign_lpt([t.cost for t in tasks], W)
        cuda = self.device.type == "cuda" and self.profile
        if cuda:
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        results, failure = {}, None
        for t, o in zip(tasks, owners):
            if o == rank:
                try:
                    results[t.key] = t.fn()
                except Exception as exc:  # noqa: BLE001 — re-raised on every rank below
                    failure = exc
                    break
        if cuda:
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        self._agree_on_failure(failure, "computing its share of the K-FAC inverses")
        if W > 1:
            for src in range(W):
                mine = [t for t, o in zip(tasks, owners) if o == src]
                if not mine:
                    continue
                shapes = [s for t in mine for s in t.shapes]
                sym = [s for t in mine for s in t.sym]
                dtype = self.inverse_dtype
                if src == rank:
                    flat = _pack([x for t in mine for x in results[t.key]], sym, dtype)
                else:
                    flat = torch.empty(sum(_packed_numel(s, y) for s, y in zip(shapes, sym)), dtype=dtype,
                                       device=self.device)
                self.comm.broadcast_(flat, src, "inverses")
                pieces = _unpack(flat, shapes, sym, [dtype] * len(shapes))
                for t in mine:
                    results[t.key], pieces = pieces[:len(t.shapes)], pieces[len(t.shapes):]
        if cuda:
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        load = [0.0] * W
        for t, o in zip(tasks, owners):
            load[o] += t.cost
        self.inverse_stats = {"compute_s": t1 - t0, "compute_cpu_s": c1 - c0, "comm_s": t2 - t1, "tasks": sum(o == rank for o in owners),
                              "total_tasks": len(tasks), "flops": load[rank], "total_flops": sum(load),
                              "gammas": len(gammas)}
        self.inverse_time["compute_s"] += t1 - t0
        self.inverse_time["compute_cpu_s"] += c1 - c0
        self.inverse_time["comm_s"] += t2 - t1
        self.inverse_time["refreshes"] += 1
        return assemble(results)

    def _agree_on_failure(self, failure: BaseException | None, what: str) -> None:
        """Raise on every rank if any rank failed (the failing rank re-raises its own error)."""
        if self.world_size == 1:
            if failure is not None:
                raise failure
            return
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=self.device)
        self.comm.all_reduce_(flag, "status", op=dist.ReduceOp.MAX)
        self.host_syncs += 1
        if not int(flag.item()):
            return
        msg = None if failure is None else (type(failure).__name__, str(failure))
        reports = self.comm.all_gather_object(msg, "status")
        if failure is not None:
            raise failure
        r, (name, text) = next((r, m) for r, m in enumerate(reports) if m is not None)
        cls = getattr(_errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, KFACError)):
            cls = KFACError
        raise cls(f"rank {r} failed while {what} at step {self.k + 1}: {name}: {text}")

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """As ``KFAC.state_dict`` with the global factors (collective: call on every rank). The
        state is the single-process one: a ``KFAC`` or a ``DistributedKFAC`` of any size loads it
        (with ``sampling="local"`` the generator state is this rank's)."""
        state = super().state_dict()
        if self.world_size > 1:
            keys = sorted(k for k in self._partial if k in self.factors.A)
            A, G = self._global_pairs(keys)
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
            self._partial = set()
            if self.sampling == "local" and self.world_size > 1:
                g = self.generator
                g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)) + 1_000_003 * self.rank)
