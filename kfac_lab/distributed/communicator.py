"""The process group and the collectives distributed K-FAC uses (docs/architecture.md#distributed-k-fac).

:class:`Communicator` wraps ``torch.distributed`` (gloo or NCCL): flat buffers chunked to a bucket
size and launched asynchronously, symmetric matrices sent as upper triangles (:func:`pack` /
:func:`unpack`), the payload counted per category (:class:`CommStats`), and a failed or silent peer
raised as :class:`DistributedError` naming the rank, the operation and the step. Without a process
group (or with a group of one) every collective is the identity: a world of one is a no-op.
"""
from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .. import errors as _errors
from ..errors import KFACError

__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "init_distributed", "CommStats", "Communicator", "pack",
           "unpack", "packed_numel"]

DEFAULT_TIMEOUT_S = 60.0


class DistributedError(KFACError):
    """A collective failed: a peer rank raised, died, or did not answer within the timeout."""


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


@dataclass
class CommStats:
    """Payload bytes and calls per category (``"sizes"``, ``"gradients"``, ``"factors"``,
    ``"scalars"``, ``"inverses"``, ``"status"``, ``"parameters"``, ``"scales"`` (EKFAC)). The bytes
    are the tensors handed to the collectives; a ring all-reduce moves about 2(W−1)/W of that per
    rank on the wire.
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


# ---------------------------------------------------------------------------------------------
# Packing: many tensors into one flat buffer, symmetric ones as their upper triangle.

_TRIU: dict = {}


def _triu(d: int, device) -> tuple[Tensor, Tensor]:
    key = (d, str(device))
    if key not in _TRIU:
        iu = torch.triu_indices(d, d, device=device)
        _TRIU[key] = (iu[0], iu[1])
    return _TRIU[key]


def packed_numel(shape, sym: bool) -> int:
    """Entries a tensor of ``shape`` takes in a packed buffer (``d(d+1)/2`` when symmetric)."""
    if sym:
        return shape[0] * (shape[0] + 1) // 2
    return int(math.prod(shape))


def pack(tensors: list[Tensor], sym: list[bool], dtype) -> Tensor:
    """One flat ``dtype`` buffer holding ``tensors`` in order (the ``sym`` ones as upper triangles)."""
    parts = []
    for t, s in zip(tensors, sym):
        if s:
            i, j = _triu(t.shape[0], t.device)
            parts.append(t[i, j].to(dtype))
        else:
            parts.append(t.reshape(-1).to(dtype))
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def unpack(flat: Tensor, shapes, sym: list[bool], dtypes) -> list[Tensor]:
    """The inverse of :func:`pack`: tensors of ``shapes`` and ``dtypes`` (symmetric ones mirrored)."""
    if len(flat) != sum(packed_numel(s, y) for s, y in zip(shapes, sym)):
        raise ValueError(f"a packed buffer of {len(flat)} entries does not hold tensors of shapes {list(shapes)}")
    out, pos = [], 0
    for shape, s, dt in zip(shapes, sym, dtypes):
        n = packed_numel(shape, s)
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


# ---------------------------------------------------------------------------------------------
# The collectives.

class Communicator:
    """The collectives of distributed K-FAC on ``group`` (``None``: the default group; none
    initialised: a world of one, where every collective returns its input). Flat buffers are
    chunked to ``bucket_bytes`` and launched asynchronously; the payload is counted in ``stats``;
    failures are raised as :class:`DistributedError` naming ``step_of()``, the step in progress."""

    def __init__(self, group=None, bucket_bytes: int = 25 * 2**20, step_of: Callable[[], int] = lambda: 0):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world = dist.get_world_size(group) if self.active else 1
        self.bucket_bytes = max(int(bucket_bytes), 1)
        self.stats = CommStats()
        self._step_of = step_of

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world={self.world}, bucket_bytes={self.bucket_bytes})"

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

    def _run(self, launch, chunks: list[Tensor], op: str, category: str, nbytes: int) -> None:
        try:
            works = [launch(c) for c in chunks]
            for w in works:
                w.wait()
        except RuntimeError as exc:
            self._fail(op, category, exc)
        self.stats.add(category, nbytes, len(chunks))

    def all_reduce_(self, flat: Tensor, category: str, op=None) -> Tensor:
        """In-place sum (or ``op``) over ranks of a contiguous tensor, bucketed."""
        if self.world == 1:
            return flat
        op = dist.ReduceOp.SUM if op is None else op
        self._run(lambda c: dist.all_reduce(c, op=op, group=self.group, async_op=True), self._chunks(flat.reshape(-1)),
                  "all_reduce", category, flat.numel() * flat.element_size())
        return flat

    def all_reduce_tensors(self, tensors: list[Tensor], category: str, sym: list[bool] | None = None) -> list[Tensor]:
        """Sums of ``tensors`` over ranks (new tensors), sent as one flat buffer (upper triangles of
        the ``sym`` ones) in ≤ ``bucket_bytes`` chunks."""
        if self.world == 1 or not tensors:
            return list(tensors)
        sym = sym or [False] * len(tensors)
        flat = pack(tensors, sym, tensors[0].dtype)
        self.all_reduce_(flat, category)
        return unpack(flat, [t.shape for t in tensors], sym, [t.dtype for t in tensors])

    def broadcast_(self, flat: Tensor, src: int, category: str) -> Tensor:
        """In-place broadcast of ``flat`` from rank ``src`` of the group, bucketed."""
        if self.world == 1:
            return flat
        g = self._global_rank(src)
        self._run(lambda c: dist.broadcast(c, src=g, group=self.group, async_op=True), self._chunks(flat),
                  f"broadcast from rank {src}", category, flat.numel() * flat.element_size())
        return flat

    def all_gather_int(self, value: int, category: str, device) -> list[int]:
        """Every rank's ``value``, in rank order."""
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
        """Every rank's picklable ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            self._fail("all_gather_object", category, exc)
        self.stats.add(category, 0)
        return out

    def agree_on_failure(self, failure: BaseException | None, what: str, device) -> bool:
        """Raise on every rank if any rank failed ``what`` (the failing rank re-raises its own
        error; the others raise the same ``KFACError`` class naming the failing rank). Returns
        whether the values reached the host (a world of one: no)."""
        if self.world == 1:
            if failure is not None:
                raise failure
            return False
        flag = torch.tensor([0 if failure is None else 1], dtype=torch.int32, device=device)
        self.all_reduce_(flag, "status", op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return True
        msg = None if failure is None else (type(failure).__name__, str(failure))
        reports = self.all_gather_object(msg, "status")
        if failure is not None:
            raise failure
        r, (name, text) = next((r, m) for r, m in enumerate(reports) if m is not None)
        cls = getattr(_errors, name, None)
        if not (isinstance(cls, type) and issubclass(cls, KFACError)):
            cls = KFACError
        raise cls(f"rank {r} failed while {what} at step {self._step_of()}: {name}: {text}")
