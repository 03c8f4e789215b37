"""Shared pieces of the studies: layer selection, parameter coordinates, provenance attrs.

Every study returns an ``xarray.Dataset`` whose attrs are ``str``/``int``/``float`` only (anything
else is JSON-encoded into a ``str``), so it can be written to zarr and to netCDF unchanged.
"""
from __future__ import annotations

import copy
import json
import math
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..curvature import KFACLayer, find_layers
from ..curvature.geometry import geometry, parameter_coords

__all__ = ["library_version", "clean_attrs", "provenance", "select_layers", "param_coords",
           "block_coords", "factor_dims", "model_copy"]


def library_version() -> str:
    """The installed ``kfac-lab`` version (``"unknown"`` when not installed as a package)."""
    try:
        from importlib.metadata import version

        return version("kfac-lab")
    except Exception:  # pragma: no cover - running from a bare checkout
        return "unknown"


def _attr_value(value: Any) -> str | int | float:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        value = float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return str(value)  # also str subclasses such as torch.__version__
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    return json.dumps(value, default=str)


def clean_attrs(attrs: dict) -> dict:
    """Attrs with every value a ``str``, ``int`` or ``float`` (bools → 0/1, others → JSON text)."""
    return {str(k): _attr_value(v) for k, v in attrs.items() if v is not None}


def describe_model(model: nn.Module, layers: Sequence[KFACLayer]) -> str:
    """A one-line description: class, layer widths and activation types,
    e.g. ``"Sequential 256-20-20-20-20-10 (Linear, Tanh)"``."""
    widths = [layers[0].d_in] + [l.d_out for l in layers]
    chain = all(a.d_out == b.d_in for a, b in zip(layers[:-1], layers[1:]))
    shape = "-".join(map(str, widths)) if chain else ", ".join(f"{l.d_in}->{l.d_out}" for l in layers)
    kinds = []
    for m in model.modules():
        if m is model or len(list(m.children())):
            continue
        name = type(m).__name__
        if name not in kinds:
            kinds.append(name)
    return f"{type(model).__name__} {shape} ({', '.join(kinds)})"


def provenance(study: str, model: nn.Module, all_layers: Sequence[KFACLayer], loss_name: str,
               seed: int, extra: dict | None = None) -> dict:
    """The provenance attrs every study carries (plus the model's ``kfac_provenance``, if any,
    under ``data_*``/its own keys: e.g. what ``figure1_setup`` recorded about data and training)."""
    attrs = {
        "study": study,
        "model": describe_model(model, all_layers),
        "model_layers": [l.name for l in all_layers],
        "loss": loss_name,
        "seed": int(seed),
        "kfac_lab_version": library_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for k, v in (getattr(model, "kfac_provenance", None) or {}).items():
        attrs.setdefault(k, v)
    attrs.update(extra or {})
    return clean_attrs(attrs)


def model_copy(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A deep copy of ``model`` in ``dtype`` (the studies never touch the caller's model)."""
    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    m.requires_grad_(True)
    return m


def select_layers(model: nn.Module, x: torch.Tensor, layers) -> tuple[list[KFACLayer], list[int], list[KFACLayer]]:
    """``(selected, indices, all_layers)``: the K-FAC layers of ``model`` (forward order) and the
    chosen ones, renumbered ``0..n-1`` (as ``output_gradients``/``exact_fisher`` expect) while
    ``indices`` keeps their positions in the whole network (the ``layer`` coordinate).

    ``layers``: ``None`` (all), or indices into the forward-ordered layers (negative allowed),
    or module names."""
    all_layers = find_layers(model, example_input=x[:1])
    n = len(all_layers)
    if layers is None:
        idx = list(range(n))
    else:
        if isinstance(layers, (int, str)):
            layers = [layers]
        names = {l.name: l.index for l in all_layers}
        idx = []
        for item in layers:
            if isinstance(item, str):
                if item not in names:
                    raise ValueError(f"layers: no K-FAC layer named {item!r}; layers: {list(names)}")
                k = names[item]
            elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
                k = int(item)
                if not -n <= k < n:
                    raise ValueError(f"layers: index {k} is out of range for a network with {n} K-FAC layers "
                                     f"(0..{n - 1}: {[l.name for l in all_layers]})")
                k %= n
            else:
                raise TypeError(f"layers takes layer indices or module names, not {type(item).__name__}")
            if k in idx:
                raise ValueError(f"layers: layer {k} is listed twice")
            idx.append(k)
        if not idx:
            raise ValueError("layers is empty: pass at least one layer index (or None for all)")
        if idx != sorted(idx):
            raise ValueError(f"layers must be in forward order (ascending), got {idx}")
    sel = [KFACLayer(k, all_layers[i].name, all_layers[i].module) for k, i in enumerate(idx)]
    return sel, idx, all_layers


def param_coords(sel: Sequence[KFACLayer], idx: Sequence[int], prefix: str = "") -> dict:
    """Coordinates of the paper-ordered parameters of the selected layers (``vec([W | b])`` per
    layer, column-stacked: entry ``p·d_out + r`` is ``W[r, p]``, the bias column last).

    Returns ``{prefix+"layer": int, "out_unit": int, "in_unit": int (−1 for the bias),
    "is_bias": bool, "label": str}`` arrays (labels like ``"L2 W[3,17]"`` / ``"L2 b[3]"``, with the
    paper's 1-based layer number ``layer + 1``); with a convolution among the layers also
    ``in_channel``, ``kernel_row``, ``kernel_col`` and labels ``"L1 W[o3, c1, kh2, kw0]"``
    (:func:`kfac_lab.curvature.geometry.parameter_coords`)."""
    geoms = [geometry(l, k) for l, k in zip(sel, idx)]
    out = parameter_coords(geoms, prefix)
    if not any(g.is_conv for g in geoms):
        for k in ("in_channel", "kernel_row", "kernel_col"):
            del out[prefix + k]
    return out


def matrix_coords(sel: Sequence[KFACLayer], idx: Sequence[int]) -> dict:
    """Coords for dims ``(row, col)``: ``row``/``col`` (0..P−1) plus the parameter coords of
    :func:`param_coords` on ``row`` (``layer``, ``out_unit``, …) and on ``col`` (``col_layer``, …)."""
    P = sum(l.num_params for l in sel)
    rc = param_coords(sel, idx)
    cc = param_coords(sel, idx, prefix="col_")
    coords = {"row": ("row", np.arange(P, dtype=np.int64)), "col": ("col", np.arange(P, dtype=np.int64))}
    coords.update({k: ("row", v) for k, v in rc.items()})
    coords.update({k: ("col", v) for k, v in cc.items()})
    return coords


def block_coords(sel: Sequence[KFACLayer], idx: Sequence[int]) -> dict:
    """Coords for dims ``(block_row, block_col)``: the layer indices, each block's first and
    one-past-last row (``block_start``, ``block_stop``) and its label ``"L<k+1>"``."""
    sizes = [l.num_params for l in sel]
    starts = np.cumsum([0] + sizes[:-1]).astype(np.int64)
    ids = np.asarray(idx, dtype=np.int64)
    return {
        "block_row": ("block_row", ids),
        "block_col": ("block_col", ids.copy()),
        "block_start": ("block_row", starts),
        "block_stop": ("block_row", starts + np.asarray(sizes, dtype=np.int64)),
        "block_label": ("block_row", np.asarray([f"L{k + 1}" for k in idx], dtype=object)),
    }


def factor_dims(k: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """Dim names of the factors of layer ``k``: ``(("a<k>_row", "a<k>_col"), ("g<k>_row", "g<k>_col"))``."""
    return (f"a{k}_row", f"a{k}_col"), (f"g{k}_row", f"g{k}_col")


def factor_coords(l: KFACLayer, k: int) -> dict:
    """Coords of the factor dims of layer ``k``: input units (−1 for the homogeneous 1 / bias) and
    output units."""
    (ar, ac), (gr, gc) = factor_dims(k)
    units = np.arange(l.in_dim, dtype=np.int64)
    if l.has_bias:
        units[-1] = -1
    outs = np.arange(l.d_out, dtype=np.int64)
    return {ar: (ar, units), ac: (ac, units.copy()), gr: (gr, outs), gc: (gc, outs.copy())}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def block_slices(sel: Sequence[KFACLayer]) -> list[slice]:
    out, start = [], 0
    for l in sel:
        out.append(slice(start, start + l.num_params))
        start += l.num_params
    return out
