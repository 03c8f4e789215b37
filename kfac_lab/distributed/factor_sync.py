"""Which factor statistics are summed over ranks, and when (docs/architecture.md#distributed-k-fac).

Each rank forms its rows' share of a mini-batch factor, ``Σ_{its rows} ā āᵀ / N1``, so the sum over
ranks is the global mini-batch factor (M&G 2015 §5). The running average
``F ← ε F + (1−ε) F_batch`` is linear, so a pair may instead be kept as *per-rank partial running
sums* (rank 0 holding the value the pair had when it became partial, the others zero): their sum
over ranks is the global running factor, and it is summed only when needed.

- ``"eager"``: the pairs the current approximation uses (diagonal; plus adjacent for the
  block-tridiagonal one) are summed on every update; the others stay partial.
- ``"lazy"``: every pair stays partial and is summed only when the inverses are recomputed
  (every T3 steps) or the state is saved: the same factors, ~T3× fewer bytes.
"""
from __future__ import annotations

from .communicator import Communicator

__all__ = ["FACTOR_SYNCS", "FactorSync", "used_pairs"]

FACTOR_SYNCS = ("eager", "lazy")


def used_pairs(n_layers: int, approx: str) -> list[tuple[int, int]]:
    """The factor pairs an ``approx`` inverse reads: ``(i, i)``, plus ``(i, i+1)`` for ``"tridiag"``."""
    return [(i, i) for i in range(n_layers)] + ([(i, i + 1) for i in range(n_layers - 1)] if approx == "tridiag" else [])


class FactorSync:
    """The per-rank partial pairs of a ``KroneckerFactors`` and the sums that resolve them, on
    ``comm`` (a world of one: nothing is ever partial, nothing is sent)."""

    def __init__(self, comm: Communicator, mode: str = "eager"):
        if mode not in FACTOR_SYNCS:
            raise ValueError(f"factor_sync={mode!r}: choose one of {FACTOR_SYNCS}")
        self.comm, self.mode = comm, mode
        self.partial: set = set()

    def reduce_batch(self, factors, A_b: dict, G_b: dict, used: list) -> tuple[dict, dict]:
        """The mini-batch factors to blend into ``factors`` (a ``KroneckerFactors``): the pairs
        synced now (``used`` when eager, none when lazy) summed over ranks, the others this rank's
        share. A pair no longer synced becomes partial; a partial pair synced again is summed
        back into the global running factor first."""
        if self.comm.world == 1:
            return A_b, G_b
        F = factors
        synced = set() if self.mode == "lazy" else set(used)
        for key in F.pairs:  # pairs no longer reduced every step become partial sums: rank 0 keeps the value
            if key not in synced and key not in self.partial:
                if self.comm.rank != 0 and key in F.A:
                    F.A[key].zero_()
                    F.G[key].zero_()
                self.partial.add(key)
        joining = [k for k in F.pairs if k in synced and k in self.partial and k in F.A]
        batch = [k for k in F.pairs if k in synced]
        reduced = self._sum([(F.A[k], F.G[k]) for k in joining] + [(A_b[k], G_b[k]) for k in batch],
                            joining + batch)
        for n, k in enumerate(joining):  # partial running sums become the global running average
            F.A[k].copy_(reduced[n][0])
            F.G[k].copy_(reduced[n][1])
        self.partial -= set(batch)
        A_out, G_out = dict(A_b), dict(G_b)
        for n, k in enumerate(batch, start=len(joining)):
            A_out[k], G_out[k] = reduced[n]
        return A_out, G_out

    def global_pairs(self, factors, keys) -> tuple[dict, dict]:
        """The global running ``A``, ``G`` of ``keys`` (partial ones summed into new tensors; the
        stored factors are not changed). Collective whenever a pair of ``keys`` is partial."""
        F = factors
        need = [k for k in keys if k in self.partial and k in F.A]
        reduced = self._sum([(F.A[k], F.G[k]) for k in need], need)
        A = {k: F.A[k] for k in keys}
        G = {k: F.G[k] for k in keys}
        for k, (a, g) in zip(need, reduced):
            A[k], G[k] = a, g
        return A, G

    def _sum(self, pairs: list, keys: list) -> list[tuple]:
        tensors = [t for pair in pairs for t in pair]
        sym = [k[0] == k[1] for k in keys for _ in (0, 1)]
        out = self.comm.all_reduce_tensors(tensors, "factors", sym)
        return [(out[2 * n], out[2 * n + 1]) for n in range(len(pairs))]
