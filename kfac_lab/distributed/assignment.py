"""Work shared across ranks: independent tasks with a flop count, assigned by greedy
longest-processing-time (LPT), computed by their owner and broadcast, so every rank ends with
every result (docs/architecture.md#distributed-k-fac)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .communicator import Communicator, pack, packed_numel, unpack

__all__ = ["Task", "assign_lpt", "tridiag_side_cost", "run_shared"]


@dataclass
class Task:
    """One independent piece of work: ``fn()`` returns tensors of ``shapes`` (the ``sym`` ones
    symmetric, sent as upper triangles); ``cost`` is its flop count."""

    key: tuple
    cost: float
    shapes: list
    sym: list
    fn: Callable[[], list]


def assign_lpt(costs, workers: int) -> list[int]:
    """Greedy longest-processing-time: tasks by decreasing cost (ties: lower index first), each to
    the least-loaded worker (ties: lower rank). Deterministic, so every rank agrees; the largest
    load is at most 4/3 − 1/(3·workers) times the optimum (Graham 1969)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    load = [0.0] * workers
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        w = min(range(workers), key=lambda r: (load[r], r))
        owner[i] = w
        load[w] += float(costs[i])
    return owner


def tridiag_side_cost(d: int, d_next: int) -> float:
    """Flops of one side (A or G) of one layer's block-tridiagonal pieces: two Cholesky
    factorisations, the Ψ solve and product, two triangular solves, one symmetric
    eigendecomposition (~4d³), one more solve (M&G 2015 §4.3, Appendix B)."""
    return d_next**3 / 3 + 2 * d * d_next**2 + d**3 / 3 + 2 * d**3 + 4 * d**3 + d**3


def run_shared(tasks: list[Task], comm: Communicator, dtype, device, what: str, category: str = "inverses",
               sync_cuda: bool = False) -> tuple[dict, dict]:
    """Compute this rank's LPT share of ``tasks``, agree on failures (raised on every rank), and
    broadcast each owner's results (one packed ``dtype`` buffer per owner, bucketed, counted as
    ``category``). Returns
    ``(results by task key — every task's, on every rank, stats)``; ``stats``: ``compute_s`` and
    ``compute_cpu_s`` (this rank's tasks), ``comm_s``, ``tasks`` (this rank's), ``total_tasks``,
    ``flops`` (this rank's), ``total_flops``, ``host_syncs``."""
    W, rank = comm.world, comm.rank
    owners = assign_lpt([t.cost for t in tasks], W)
    if sync_cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    results, failure = {}, None
    for t, o in zip(tasks, owners):
        if o == rank:
            try:
                results[t.key] = t.fn()
            except Exception as exc:  # noqa: BLE001 — re-raised on every rank by agree_on_failure
                failure = exc
                break
    if sync_cuda:
        torch.cuda.synchronize()
    t1, c1 = time.perf_counter(), time.process_time()
    synced = comm.agree_on_failure(failure, what, device)
    for src in range(W if W > 1 else 0):
        mine = [t for t, o in zip(tasks, owners) if o == src]
        if not mine:
            continue
        shapes = [s for t in mine for s in t.shapes]
        sym = [s for t in mine for s in t.sym]
        if src == rank:
            flat = pack([x for t in mine for x in results[t.key]], sym, dtype)
        else:
            flat = torch.empty(sum(packed_numel(s, y) for s, y in zip(shapes, sym)), dtype=dtype, device=device)
        comm.broadcast_(flat, src, category)
        pieces = unpack(flat, shapes, sym, [dtype] * len(shapes))
        for t in mine:
            results[t.key], pieces = pieces[:len(t.shapes)], pieces[len(t.shapes):]
    if sync_cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    load = [0.0] * W
    for t, o in zip(tasks, owners):
        load[o] += t.cost
    stats = {"compute_s": t1 - t0, "compute_cpu_s": c1 - c0, "comm_s": t2 - t1,
             "tasks": sum(o == rank for o in owners), "total_tasks": len(tasks), "flops": load[rank],
             "total_flops": sum(load), "host_syncs": int(synced)}
    return results, stats
