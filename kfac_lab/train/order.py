"""The data order of a training run: epochs of seeded permutations, read in consecutive batches.

Epoch ``e`` is a permutation of the ``n`` training cases drawn from a CPU generator seeded from
``(seed, e)`` — so the order depends on the seed alone, not on the device or on what ran before.
A batch takes the next ``m`` cases of the current permutation, running into the next epoch when
it is used up: each epoch visits every case once. The position
``(epoch, pos)`` is all a checkpoint needs to continue the order exactly.
"""
from __future__ import annotations

import torch

__all__ = ["DataOrder"]


class DataOrder:
    """Seeded permutation epochs over ``n`` cases; :meth:`take` returns the next ``m`` indices
    (a tensor on ``device``). ``epoch``/``pos`` start the order at a saved position."""

    def __init__(self, n: int, seed: int, device=None, epoch: int = 0, pos: int = 0):
        self.n, self.seed = int(n), int(seed)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        if self.n < 1:
            raise ValueError(f"DataOrder needs at least one case, got n={n!r}")
        if int(epoch) < 0 or not 0 <= int(pos) <= self.n:
            raise ValueError(f"DataOrder position (epoch={epoch!r}, pos={pos!r}) is outside 0 <= pos <= n={self.n} "
                             "with epoch >= 0; was it saved for another data set?")
        self.epoch, self.pos = int(epoch), int(pos)
        self.perm = self.permutation(self.epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The permutation of epoch ``epoch`` (on ``device``)."""
        g = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 17) % 2**63)
        return torch.randperm(self.n, generator=g).to(self.device)

    def take(self, m: int) -> torch.Tensor:
        """The next ``min(m, n)`` indices; the position moves past them."""
        m = min(int(m), self.n)
        if self.pos + m <= self.n:
            idx = self.perm[self.pos:self.pos + m]
            self.pos += m
            return idx
        head = self.perm[self.pos:]
        self.epoch += 1
        self.perm = self.permutation(self.epoch)
        self.pos = m - head.shape[0]
        return torch.cat([head, self.perm[:self.pos]])

    def state(self) -> dict:
        """The position, ``{"epoch", "pos"}``: ``DataOrder(n, seed, device, **state)`` continues here."""
        return {"epoch": self.epoch, "pos": self.pos}

    def __repr__(self) -> str:
        return f"DataOrder(n={self.n}, seed={self.seed}, epoch={self.epoch}, pos={self.pos})"
