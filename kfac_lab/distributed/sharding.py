"""Shards of the global batch, their global order, and the sampled targets of a shard
(docs/architecture.md#distributed-k-fac).

Shard ``r`` of ``W`` holds rows ``r, r+W, r+2W, …`` of the global batch (:func:`shard`). The
global order is round-robin over the shards: local row ``j`` of rank ``r`` is global row
``j·W + r`` (for shards of unequal size, the ranks that have run out are skipped;
:func:`global_order`). The statistics subset (τ₁) and the exact-F subset (τ₂) are the first
``N1`` and ``N2`` rows of that order — what ``KFAC`` uses on the global batch — so each rank's
share is a prefix of its shard (:func:`shard_plan`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..curvature.losses import DelegatingLoss, Loss

__all__ = ["shard", "global_order", "reference_batch", "ShardPlan", "shard_plan", "ShardSampling"]


def shard(t: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s shard of a global batch: rows ``rank, rank + W, rank + 2W, …``. With these
    shards ``DistributedKFAC`` equals ``KFAC`` on the global batch in its own order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is out of range for world size {world_size}")
    return t[rank::world_size]


@functools.lru_cache(maxsize=16)
def positions(sizes: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """Per rank, the global position of each local row (increasing): round-robin, j-major."""
    r = np.concatenate([np.full(s, i, dtype=np.int64) for i, s in enumerate(sizes)])
    j = np.concatenate([np.arange(s, dtype=np.int64) for s in sizes])
    order = np.lexsort((r, j))                 # sort by local index j, then by rank
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return tuple(pos[starts[i]:starts[i] + s] for i, s in enumerate(sizes))


def _check_sizes(sizes) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    if not sizes or min(sizes) < 0:
        raise ValueError(f"shard sizes must be non-negative, got {sizes}")
    return sizes


def global_order(sizes) -> Tensor:
    """Indices into ``torch.cat(shards)`` listing the rows in their global order (round-robin over
    the shards, local row first, rank second): ``torch.cat(shards)[global_order(sizes)]`` is the
    global batch (for shards made with :func:`shard`, the original batch)."""
    pos = np.concatenate(positions(_check_sizes(sizes)))
    return torch.from_numpy(np.argsort(pos, kind="stable"))


def reference_batch(xs, ys=None):
    """The global batch that ``KFAC`` must see to reproduce a ``DistributedKFAC`` run whose rank
    ``r`` got ``(xs[r], ys[r])``. Returns ``x`` (and ``y`` when ``ys`` is given)."""
    idx = global_order([x.shape[0] for x in xs])
    x = torch.cat(list(xs))[idx.to(xs[0].device)]
    if ys is None:
        return x
    return x, torch.cat(list(ys))[idx.to(ys[0].device)]


@dataclass(frozen=True)
class ShardPlan:
    """One rank's part of a step: ``m`` of ``M`` cases, ``n1`` of ``N1`` statistics rows (at
    global positions ``stats_pos``), ``n2`` of ``N2`` exact-F rows."""

    m: int
    M: int
    n1: int
    N1: int
    n2: int
    N2: int
    stats_pos: Tensor


def shard_plan(sizes, rank: int, N1: int, N2: int, device=None) -> ShardPlan:
    """Rank ``rank``'s :class:`ShardPlan` when the shards have ``sizes`` rows and the global
    subsets are the first ``N1`` (statistics) and ``N2`` (exact F) rows of the global order."""
    sizes = _check_sizes(sizes)
    M = sum(sizes)
    if not 0 <= rank < len(sizes):
        raise ValueError(f"rank {rank} is out of range for {len(sizes)} shards")
    if not (1 <= N1 <= M and 1 <= N2 <= M):
        raise ValueError(f"the subsets must hold 1 to {M} rows, got N1={N1}, N2={N2}")
    pos = positions(sizes)[rank]
    n1, n2 = int(np.searchsorted(pos, N1)), int(np.searchsorted(pos, N2))
    return ShardPlan(sizes[rank], M, n1, N1, n2, N2, torch.as_tensor(pos[:n1], device=device))


class ShardSampling(DelegatingLoss):
    """Wraps a loss so that ``sample`` draws the targets of the whole global statistics subset —
    this rank's rows at their global positions (``plan.stats_pos``), zeros elsewhere — with the
    shared generator, and returns this rank's rows: the single-process draw, exactly, with no
    communication (valid for samplers whose use of the generator does not depend on the values —
    the three built-in losses). Active only while ``plan`` is set; everything else is delegated."""

    def __init__(self, base: Loss):
        super().__init__(base)
        self.plan: ShardPlan | None = None

    def __getattr__(self, name):
        if name in ("base", "plan"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def sample(self, z, generator=None):
        plan = self.plan
        if plan is None or z.shape[0] != plan.n1:
            return self.base.sample(z, generator)
        full = z.new_zeros((plan.N1,) + tuple(z.shape[1:]))
        full[plan.stats_pos] = z.detach()
        return self.base.sample(full, generator)[plan.stats_pos]

    def skip(self, plan: ShardPlan, z_like: Tensor, generator) -> None:
        """Draw (and discard) the targets of ``plan``'s whole statistics subset: a rank with no
        statistics rows keeps the shared generator in step with the others."""
        self.base.sample(z_like.new_zeros((plan.N1,) + tuple(z_like.shape[1:])), generator)

    def __repr__(self):
        return f"{self.base!r} (sampled across shards)"
