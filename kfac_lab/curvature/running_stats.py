"""Batch normalisation in K-FAC's extra passes (docs/algorithm.md#parameters-outside-the-kronecker-layers).

K-FAC runs the model more than once per step: the training forward pass, the statistics pass
on the τ₁ subset, the exact-F products on the τ₂ subset, the λ test (M&G 2015 §5, §6.4, §6.5). A
batch-norm layer in training mode updates its running mean and variance on *every* forward
pass; only the training pass should. :func:`frozen_running_stats` runs the extra passes with
the batch statistics of the rows they see (as the training pass does) and leaves the running
statistics and ``num_batches_tracked`` untouched. It is also what lets ``torch.func``
differentiate such a model: the in-place update of a buffer cannot be traced.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ..errors import KFACError

__all__ = ["frozen_running_stats", "training_batch_norms"]

_SINGLE_CASE = "Expected more than 1 value per channel when training"


def training_batch_norms(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The batch-norm modules of ``model`` in training mode that keep running statistics."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


@contextmanager
def frozen_running_stats(model: nn.Module, what: str = "an extra forward pass"):
    """Inside: every batch-norm module of ``model`` in training mode normalises with the batch
    statistics of its input and does not update its running statistics (``track_running_stats``
    is off while inside, then restored). A batch of one case, which training-mode batch norm
    cannot normalise, is reported as a ``KFACError`` naming the fix."""
    norms = training_batch_norms(model)
    for _, m in norms:
        m.track_running_stats = False
    try:
        yield
    except ValueError as exc:
        if norms and _SINGLE_CASE in str(exc):
            names = ", ".join(repr(n) for n, _ in norms)
            raise KFACError(
                f"{what} sees one case, and the batch-norm modules {names} in training mode need at least two "
                "(their batch statistics): raise stats_fraction / fisher_fraction or the batch size") from exc
        raise
    finally:
        for _, m in norms:
            m.track_running_stats = True
