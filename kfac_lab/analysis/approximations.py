"""The exact Fisher against its approximations side by side: K-FAC / KFC-expand ``F̃``, KFC-reduce
``F̃`` and EKFAC (Grosse & Martens 2016, KFC §3; Eschenhagen et al. 2023 §3; George et al. 2018 §3;
docs/algorithm.md#analysis).

:func:`approximation_study` returns one ``xarray.Dataset`` with ``exact``, ``kron`` (the
expand / plain K-FAC ``F̃``), ``kron_reduce`` (for networks with weight-sharing layers) and ``ekfac``
(when the installed study computes it), over the studies' ``(row, col)`` parameter order, plus
their relative Frobenius errors; :func:`approximation_errors` computes those errors for any study
Dataset that holds ``exact`` and some of the approximations.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import xarray as xr

__all__ = ["APPROXIMATIONS", "approximation_errors", "approximation_study", "NAMES"]

#: The approximations of ``F`` a study may hold, in display order.
APPROXIMATIONS = ("kron", "kron_reduce", "ekfac")
#: Their names on figures and in tables.
NAMES = {"kron": "K-FAC F̃ (KFC expand)", "kron_reduce": "KFC reduce F̃", "ekfac": "EKFAC"}


def _blocks(ds: xr.Dataset) -> list[np.ndarray]:
    layer = np.asarray(ds["layer"].values)
    return [np.flatnonzero(layer == k) for k in dict.fromkeys(layer.tolist())]


def approximation_errors(ds: xr.Dataset, names: Sequence[str] | None = None) -> xr.Dataset:
    """Relative Frobenius errors of the approximations in ``ds`` against ``exact``:

    - ``rel_error_<name>`` = ‖F − X‖_F / ‖F‖_F (a scalar);
    - ``block_rel_error_<name>`` over ``(block_row, block_col)``: ‖F_ij − X_ij‖_F / ‖F_ij‖_F, each
      layer pair against its own block of F (NaN where F_ij = 0).

    ``names``: which of :data:`APPROXIMATIONS` (default: those present). A ``ValueError``
    names what is missing."""
    if "exact" not in ds.data_vars:
        raise ValueError(f"approximation_errors needs the exact Fisher 'exact'; the dataset has {sorted(ds.data_vars)}")
    present = [n for n in APPROXIMATIONS if n in ds.data_vars]
    names = present if names is None else list(names)
    missing = [n for n in names if n not in ds.data_vars]
    if missing or not names:
        raise ValueError(f"approximation_errors: the dataset lacks {missing or list(APPROXIMATIONS)}; it has "
                         f"{present or 'none of them'} (ekfac needs a study with the EKFAC variable, kron_reduce a "
                         "network with weight-sharing layers: approximation_study computes both)")
    F = np.asarray(ds["exact"].values, dtype=np.float64)
    blocks = _blocks(ds)
    ids = [int(ds["layer"].values[b[0]]) for b in blocks]
    norm = float(np.linalg.norm(F))
    fnorm = np.array([[np.linalg.norm(F[np.ix_(bi, bj)]) for bj in blocks] for bi in blocks])
    out = {}
    for n in names:
        D = F - np.asarray(ds[n].values, dtype=np.float64)
        err = np.array([[np.linalg.norm(D[np.ix_(bi, bj)]) for bj in blocks] for bi in blocks])
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(fnorm > 0, err / np.where(fnorm > 0, fnorm, 1.0), np.nan)
        label = NAMES.get(n, n)
        out[f"rel_error_{n}"] = xr.Variable((), float(np.linalg.norm(D)) / norm if norm > 0 else float("nan"),
                                            attrs={"long_name": f"‖F − X‖_F / ‖F‖_F, X = {label}"})
        out[f"block_rel_error_{n}"] = xr.Variable(("block_row", "block_col"), rel,
                                                  attrs={"long_name": f"‖F_ij − X_ij‖_F / ‖F_ij‖_F, X = {label}"})
    coords = {"block_row": ("block_row", np.asarray(ids)), "block_col": ("block_col", np.asarray(ids))}
    return xr.Dataset(out, coords=coords)


def _has_weight_sharing(a) -> bool:
    return any(t.dim() > 2 for t in a)


def approximation_study(model, loss, x, layers=None, mode: str = "exact", samples: int = 1, seed: int = 0,
                        dtype=None, inverses: bool = False, gamma: float | None = None,
                        max_bytes: int = 2**32) -> xr.Dataset:
    """:func:`~kfac_lab.analysis.fisher_study` (``exact``, ``kron`` = KFC-expand / K-FAC ``F̃``,
    ``ekfac`` (block-diagonal EKFAC of the same statistics), the factors, and the inverses with
    ``inverses=True``) plus,
    for a network with weight-sharing layers (convolutions), ``kron_reduce``: the Khatri–Rao ``F̃``
    of the KFC-reduce factors (Eschenhagen et al. 2023 §3.2) from the same ``ā``, ``g`` (same seed,
    same sampled targets), and the errors of :func:`approximation_errors`.

    Arguments as for ``fisher_study`` (``dtype`` default float64). For a network without weight
    sharing the two KFC variants are K-FAC itself: ``kron_reduce`` is left out and the attr
    ``weight_sharing_layers`` is empty."""
    import torch

    from ..curvature import batch_factors, factor_pairs, get_loss, kron_fisher_dense, output_gradients
    from .fisher import fisher_study
    from ._common import model_copy, select_layers

    dtype = torch.float64 if dtype is None else dtype
    ds = fisher_study(model, loss, x, layers=layers, mode=mode, samples=samples, seed=seed, dtype=dtype,
                      inverses=inverses, gamma=gamma, max_bytes=max_bytes)
    net = model_copy(model, dtype)
    xx = x.to(dtype)
    sel, idx, _ = select_layers(net, xx, layers)
    gen = torch.Generator(device=xx.device).manual_seed(int(ds.attrs["seed"]))
    a, g, _ = output_gradients(net, sel, get_loss(loss), xx, mode=mode, samples=int(samples), generator=gen)
    shared = [k for k, t in zip(idx, a) if t.dim() > 2]
    a = [t.to(dtype) for t in a]
    g = [t.to(dtype) for t in g]
    if shared:
        A, G = batch_factors(a, g, factor_pairs(len(sel), "all"), "reduce")
        ds["kron_reduce"] = xr.Variable(("row", "col"), kron_fisher_dense((A, G), sel).detach().cpu().numpy(), attrs={
            "long_name": "KFC-reduce approximation F̃ (Khatri-Rao, all blocks; Eschenhagen et al. 2023)",
            "symbol": "F̃ reduce"})
    del a, g
    errs = approximation_errors(ds)
    ds = ds.merge(errs.drop_vars(["block_row", "block_col"]), compat="override")
    ds.attrs["weight_sharing_layers"] = json.dumps(shared)
    ds.attrs["study"] = "approximations"
    return ds
