"""Which weight each row of a study's matrices is: layer geometry → per-index coordinates and labels.

A study orders the parameters of its layers as the paper does (M&G 2015 §2.2, eq. 1; docs/conventions.md):
layer by layer, ``vec([W | b])`` column-stacked, so entry ``p·d_out + r`` of a layer's block is
column ``p`` of row ``r`` of ``[W | b]`` and the bias is the last column. A convolution's ``W``
is ``weight.reshape(O, -1)`` (Grosse & Martens 2016, KFC §3.1): column ``p`` of output channel
``o`` is ``weight[o, c, kh, kw]`` with ``(c, kh, kw) = unravel(p, (C, kh, kw))``.

:func:`parameter_coords` turns a list of :class:`LayerGeometry` into one array per coordinate
(``layer``, ``out_unit``, ``in_unit``, ``in_channel``, ``kernel_row``, ``kernel_col``,
``is_bias``, ``label``): the study Datasets carry them, and the heatmaps show the labels on hover
(``"L1 W[o3, c1, kh2, kw0]"``: layer 1, output channel 3, input channel 1, kernel row 2,
column 0; ``"L1 b[o3]"`` its bias; a linear layer's ``"L2 W[3,17]"`` / ``"L2 b[3]"``).
Pure: no model, no torch (:func:`geometry` only reads a module's weight shape), so saved studies,
the exact Fisher's ``param_names`` and tests all label indices the same way.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

__all__ = ["LayerGeometry", "geometry", "parameter_coords", "parameter_label", "weight_label", "HOVER_LEGEND",
           "to_attr", "from_attr"]

#: What the parts of a convolution weight's label mean (figures state it once, not per cell).
HOVER_LEGEND = "W[o, c, kh, kw]: output channel o, input channel c, kernel row kh, column kw; b[o]: bias"


@dataclass(frozen=True)
class LayerGeometry:
    """The shape of one K-FAC layer's ``[W | b]``.

    ``index``: the layer's position among the network's K-FAC layers (0-based; labels say
    ``L<index+1>``). ``d_out``: output units / channels. ``in_channels``: ``d_in`` of a linear
    layer, ``C`` (per group) of a convolution. ``kernel``: ``()`` for a linear layer, ``(kh, kw)``
    for a 2-D convolution (``(k,)`` / ``(kd, kh, kw)`` for 1-D / 3-D). ``has_bias``: a bias column."""

    index: int
    d_out: int
    in_channels: int
    kernel: tuple[int, ...] = ()
    has_bias: bool = True
    name: str = ""

    def __post_init__(self):
        for what, v in (("index", self.index), ("d_out", self.d_out), ("in_channels", self.in_channels)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0 or (what != "index" and v < 1):
                raise ValueError(f"LayerGeometry: {what} must be a {'non-negative' if what == 'index' else 'positive'} "
                                 f"integer, got {v!r}")
        k = tuple(self.kernel)
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in k):
            raise ValueError(f"LayerGeometry: kernel must be positive integers (e.g. (3, 3)), got {self.kernel!r}")
        object.__setattr__(self, "kernel", tuple(int(v) for v in k))

    @property
    def is_conv(self) -> bool:
        return bool(self.kernel)

    @property
    def d_in(self) -> int:
        """Columns of ``W`` without the bias: ``C·kh·kw`` (a linear layer: ``d_in``)."""
        return self.in_channels * int(np.prod(self.kernel, dtype=np.int64))

    @property
    def in_dim(self) -> int:
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.d_out * self.in_dim


def geometry(layer, index: int | None = None) -> LayerGeometry:
    """The geometry of a K-FAC layer (``KFACLayer`` or a bare ``nn.Linear`` / ``nn.Conv*d``), read
    from its weight's shape ``(O, C, *kernel)``; ``index`` defaults to ``layer.index``."""
    module = getattr(layer, "module", layer)
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() < 2:
        raise TypeError(f"geometry: {type(module).__name__} has no weight of shape (out, in, ...)")
    shape = tuple(int(v) for v in weight.shape)
    idx = getattr(layer, "index", 0) if index is None else index
    return LayerGeometry(int(idx), shape[0], shape[1], shape[2:], getattr(module, "bias", None) is not None,
                         str(getattr(layer, "name", "")))


def weight_label(geom: LayerGeometry, r: int, p: int) -> str:
    """Entry ``[W | b][r, p]`` of layer ``geom`` as text, without the layer: ``"W[3,17]"`` / ``"b[3]"``
    (linear), ``"W[o3, c1, kh2, kw0]"`` / ``"b[o3]"`` (convolution)."""
    if geom.has_bias and p == geom.d_in:
        return f"b[o{r}]" if geom.is_conv else f"b[{r}]"
    if not geom.is_conv:
        return f"W[{r},{p}]"
    c, *k = np.unravel_index(p, (geom.in_channels,) + geom.kernel)
    names = {1: ("k",), 2: ("kh", "kw"), 3: ("kd", "kh", "kw")}.get(len(k), tuple(f"k{d}" for d in range(len(k))))
    return f"W[o{r}, c{c}, " + ", ".join(f"{n}{int(v)}" for n, v in zip(names, k)) + "]"


def parameter_label(geom: LayerGeometry, r: int, p: int) -> str:
    """The label of ``[W | b][r, p]`` of layer ``geom``: ``"L<index+1> "`` and :func:`weight_label`."""
    return f"L{geom.index + 1} {weight_label(geom, r, p)}"


def parameter_coords(geoms: Sequence[LayerGeometry], prefix: str = "") -> dict[str, np.ndarray]:
    """One entry per parameter, in the studies' order (layer by layer, ``vec([W | b])``
    column-stacked): ``layer``, ``out_unit`` (row of ``[W | b]``: output unit / channel),
    ``in_unit`` (its column; −1 for the bias), ``in_channel``, ``kernel_row``, ``kernel_col``
    (a convolution's; −1 for the bias and for linear layers), ``is_bias`` and ``label``; each
    name prefixed by ``prefix`` (``"col_"`` for the column dim)."""
    parts: dict[str, list] = {k: [] for k in ("layer", "out_unit", "in_unit", "in_channel", "kernel_row",
                                              "kernel_col", "is_bias", "label")}
    for g in geoms:
        P, O = g.in_dim, g.d_out
        p = np.repeat(np.arange(P), O)          # column of [W | b] (slow index: column-stacked)
        r = np.tile(np.arange(O), P)            # row of [W | b]
        bias = (p == g.d_in) if g.has_bias else np.zeros(P * O, dtype=bool)
        w = np.where(bias, 0, p)
        grid = np.unravel_index(w, (g.in_channels,) + g.kernel)
        kh = grid[-2] if len(g.kernel) >= 2 else (grid[-1] if g.kernel else np.full(w.shape, -1))
        kw = grid[-1] if len(g.kernel) >= 2 else np.full(w.shape, -1)
        parts["layer"].append(np.full(P * O, g.index))
        parts["out_unit"].append(r)
        parts["in_unit"].append(np.where(bias, -1, p))
        parts["in_channel"].append(np.where(bias | (not g.is_conv), -1, grid[0]))
        parts["kernel_row"].append(np.where(bias, -1, kh))
        parts["kernel_col"].append(np.where(bias, -1, kw))
        parts["is_bias"].append(bias)
        labels = [parameter_label(g, int(rr), int(pp)) for rr, pp in zip(r, p)]
        parts["label"].append(np.asarray(labels, dtype=object))
    out = {}
    for k, v in parts.items():
        dtype = object if k == "label" else (bool if k == "is_bias" else np.int64)
        out[prefix + k] = np.concatenate(v).astype(dtype) if v else np.zeros(0, dtype=dtype)
    return out


def to_attr(geoms: Sequence[LayerGeometry]) -> str:
    """The geometries as JSON text (a Dataset attr that survives zarr and netCDF)."""
    return json.dumps([asdict(g) for g in geoms])


def from_attr(text: str) -> list[LayerGeometry]:
    """The inverse of :func:`to_attr`."""
    try:
        items = json.loads(text)
        return [LayerGeometry(**{**d, "kernel": tuple(d.get("kernel", ()))}) for d in items]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"layer geometry attr is not the JSON list to_attr writes: {exc}") from exc
