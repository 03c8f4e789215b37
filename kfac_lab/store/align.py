"""Runs side by side: per-run ``(step, values)`` rows aligned on the union of their steps.

The one (run, step) alignment of the library: :meth:`Store.curves` and the training labs'
datasets (:mod:`kfac_lab.lab.runs`) both build their ``(run, step)`` Datasets here.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["align_runs"]


def align_runs(labels: Sequence[str], runs: Sequence[tuple[Any, Mapping[str, Any]]],
               fills: Mapping[str, Any]) -> xr.Dataset:
    """A Dataset over ``(run, step)``: ``step`` is the union of the runs' steps (sorted), each
    variable of ``fills`` a ``(run, step)`` block holding run ``i``'s values at its steps and the
    variable's fill value (``NaN``, or ``""`` for text) where run ``i`` has no row or no such
    variable. ``runs[i]`` is ``(steps, {variable: values})`` with values aligned to ``steps``
    (strictly increasing within a run); coord ``run`` holds ``labels``."""
    if len(labels) != len(runs):
        raise ValueError(f"align_runs: {len(labels)} labels for {len(runs)} runs")
    per_run = [np.asarray(s, dtype=np.int64) for s, _ in runs]
    steps = np.unique(np.concatenate(per_run or [np.zeros(0, np.int64)])).astype(np.int64)
    data = {}
    for name, fill in fills.items():
        block = np.full((len(runs), len(steps)), fill, dtype=object if isinstance(fill, str) else np.float64)
        for i, (s, (_, values)) in enumerate(zip(per_run, runs)):
            if name in values and len(s):
                block[i, np.searchsorted(steps, s)] = np.asarray(values[name])
        data[name] = (("run", "step"), block)
    return xr.Dataset(data, coords={"run": ("run", np.array([str(x) for x in labels], dtype=object)),
                                    "step": ("step", steps)})
