"""The Fisher explorers' views: which :mod:`kfac_lab.viz` figure shows which study, and how.

One catalogue for both front ends (the Panel explorer and the Jupyter widget): a view's key, its
label, the viz function that draws it, the study variables it needs, whether it takes a
resolution (``max_size``) and a colour range (``clip``); :func:`build_view` draws one with the
explorers' options (a colour range, a colour scale, one layer block).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["FISHER_VIEWS", "View", "views", "available_views", "build_view", "zoomed", "DEFAULT",
           "CLIP_OPTIONS", "COLORSCALE_OPTIONS", "clip_options"]

#: view key → label, in menu order.
FISHER_VIEWS = {
    "figure1": "F vs F̃ vs difference (figure 1)",
    "ekfac": "F vs F̃ (KFC expand / reduce) vs EKFAC",
    "figure2": "F̃ and its inverse (figure 2)",
    "block_averages": "block averages of F̃⁻¹ (figure 2, right)",
    "inverse_quality": "block-diagonal vs block-tridiagonal (vs EKFAC) inverse (figures 5–6)",
    "cumulant_maps": "Kronecker error, cumulants and bound (eqns 3–4)",
    "cumulant_totals": "total error vs bound (eqns 3–4)",
}
#: The colour range of the heatmaps: viz's default, the max |value|, or a quantile of |value|
#: (heavy tails: a few large diagonal entries would take the whole scale).
DEFAULT = "default"
CLIP_OPTIONS = [("full range (max |value|)", None), ("99.9 % of |value|", 0.999), ("99 % of |value|", 0.99),
                ("95 % of |value|", 0.95)]
#: Colour scales: viz's (diverging for signed matrices, sequential for bounds) or one for all.
COLORSCALE_OPTIONS = [("default", None), ("RdBu_r", "RdBu_r"), ("Picnic", "Picnic"), ("PuOr_r", "PuOr_r"),
                      ("Viridis", "Viridis"), ("Cividis", "Cividis")]


@dataclass(frozen=True)
class View:
    key: str
    label: str
    build: Callable[..., Any]
    needs: tuple[str, ...]
    matrix: bool        # a heatmap of matrix entries: takes max_size= and clip=, and a zoom to one block
    height: int = 430
    any_of: tuple[str, ...] = ()   # and at least one of these (the approximations beside F)


def views() -> dict[str, View]:
    """The catalogue, in menu order."""
    from .. import viz

    spec = {
        "figure1": (viz.fisher_heatmaps, ("exact", "kron", "difference"), True),
        "ekfac": (viz.approximation_heatmaps, ("exact", "kron"), True),
        "figure2": (viz.inverse_heatmaps, ("kron", "kron_inverse"), True),
        "block_averages": (viz.block_average_map, ("block_mean_abs",), False),
        "inverse_quality": (viz.inverse_quality, ("kron_inverse", "blockdiag_inverse", "blockdiag_rel_error"),
                            True),   # tridiag_* too, except on a network with weight sharing (refused there)
        "cumulant_maps": (viz.cumulant_maps, ("error", "kappa4", "kappa3_a", "kappa3_b", "bound"), True),
        "cumulant_totals": (viz.cumulant_totals, ("total_error", "total_bound"), False),
    }
    any_of = {"ekfac": ("kron_reduce", "ekfac")}  # beside F̃ alone, figure 1 says it all
    return {k: View(k, FISHER_VIEWS[k], *spec[k], height=430 if spec[k][2] else 400, any_of=any_of.get(k, ()))
            for k in FISHER_VIEWS}


def _has(ds, view: View) -> list[str]:
    """What ``ds`` lacks for ``view`` (empty: it can be shown)."""
    missing = [n for n in view.needs if n not in ds.variables]
    if view.any_of and not any(n in ds.variables for n in view.any_of):
        missing.append(" or ".join(view.any_of))
    return missing


def available_views(ds) -> list[str]:
    """The view keys ``ds`` (a fisher_study or cumulant_study Dataset) has the variables for."""
    return [k for k, v in views().items() if not _has(ds, v)]


def clip_options() -> list:
    """:data:`CLIP_OPTIONS` preceded by viz's default, named with its value."""
    from ..viz import fisher as vf

    clip = getattr(vf, "CLIP", None)
    label = "default (max |value|)" if clip is None else f"default ({100 * clip:g} % of |value|)"
    return [(label, DEFAULT)] + CLIP_OPTIONS


def zoomed(ds, zoom: str):
    """``ds`` restricted to one layer block ``"i,j"`` (rows of layer i, columns of layer j);
    ``""`` or ``"all"``: the whole matrix."""
    if zoom in ("", "all") or ds is None or "row" not in ds.dims:
        return ds
    i, j = (int(v) for v in zoom.split(","))
    rows = ds["layer"].values == i
    cols = ds["col_layer"].values == j
    if not rows.any() or not cols.any():
        return ds
    return ds.isel(row=rows.nonzero()[0], col=cols.nonzero()[0])


def build_view(ds, key: str, *, clip: Any = DEFAULT, colorscale: str | None = None, max_size: int | None = None,
               zoom: str = "all"):
    """The figure of view ``key`` of ``ds``: ``clip`` (:data:`DEFAULT`: viz's), ``colorscale``
    (None: viz's), ``max_size`` (heatmap resolution; None: viz's), ``zoom`` (one layer block of
    the matrix views: every weight gets its own cell, up to 512 a side). ``ValueError`` naming
    what is missing when ``ds`` cannot show it."""
    catalogue = views()
    if key not in catalogue:
        raise ValueError(f"view {key!r}: choose one of {list(catalogue)}")
    view = catalogue[key]
    missing = _has(ds, view)
    if missing:
        raise ValueError(f"view {key!r} needs {missing}; this study has {sorted(ds.data_vars)[:12]}")
    kw: dict[str, Any] = {}
    if view.matrix:
        part = zoomed(ds, zoom)
        if zoom not in ("", "all") and part is not ds:
            max_size = max(max_size or 0, min(512, max(part.sizes["row"], part.sizes["col"])))
        ds = part
        if max_size is not None:
            kw["max_size"] = max_size
        if clip != DEFAULT:
            kw["clip"] = clip
    fig = view.build(ds, **kw)
    if colorscale is not None:
        for name in [k for k in fig.layout if k.startswith("coloraxis")]:
            fig.layout[name].colorscale = colorscale
        fig.update_traces(colorscale=colorscale, selector=dict(type="heatmap"))
    fig.update_layout(height=view.height, margin=dict(l=60, r=30, t=80, b=50))
    return fig
