"""Memory guards: estimate what a computation will allocate and refuse BEFORE allocating.

One mechanism for the exact Fisher and every study (``kfac_lab.analysis``): the caller adds up
the big buffers it will hold (``parts``: what → bytes) and :func:`refuse_if_too_large` raises a
:class:`~kfac_lab.errors.MemoryLimitError` naming the estimate, its largest parts, the limit
(``max_bytes``) and the parameters to lower — in microseconds, whatever the request.
"""
from __future__ import annotations

import numbers

import torch

from ..errors import MemoryLimitError

__all__ = ["fmt_bytes", "itemsize", "check_max_bytes", "refuse_if_too_large"]


def fmt_bytes(b: float) -> str:
    """``b`` bytes as text: ``"1.50 GB"`` (binary GB) or ``"12.3 MB"``; huge estimates in ``e`` notation."""
    if b >= 2**30 * 1e6:
        return f"{b / 2**30:.3g} GB"
    if b >= 2**30:
        return f"{b / 2**30:.2f} GB"
    return f"{b / 2**20:.1f} MB"


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per entry of ``dtype``."""
    return torch.empty(0, dtype=dtype).element_size()


def check_max_bytes(max_bytes) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral) or max_bytes < 1:
        raise TypeError(f"max_bytes must be a positive integer number of bytes (e.g. 2**32), got {max_bytes!r}")
    return int(max_bytes)


def refuse_if_too_large(what: str, parts: dict[str, float], max_bytes: int, lower: str,
                        error: type[MemoryLimitError] = MemoryLimitError) -> int:
    """The estimate ``sum(parts)`` in bytes; ``error`` if it exceeds ``max_bytes``. The message
    names the estimate and its parts (largest first), the limit, and ``lower`` (what to reduce)."""
    max_bytes = check_max_bytes(max_bytes)
    total = sum(parts.values())
    if total > max_bytes:
        shown = ", ".join(f"{fmt_bytes(v)} for {k}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:3]
                          if v > 0)
        raise error(f"{what} needs about {fmt_bytes(total)} ({shown}), above max_bytes = {fmt_bytes(max_bytes)}. "
                    f"To reduce it: {lower}; or raise max_bytes if the memory is there.")
    return int(total)
