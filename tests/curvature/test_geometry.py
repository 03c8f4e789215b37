"""Per-index labels of the studies' parameters against brute force: every weight of a layer gets a
unique value, the layer's ``vec([W | b])`` (the studies' order) is built the way the curvature code
builds it, and each index's value is unravelled back to ``(o, c, kh, kw)`` by the weight's shape."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from kfac_lab.curvature.geometry import (LayerGeometry, from_attr, geometry, parameter_coords, parameter_label,
                                        to_attr)

BIAS = 10**6


def _brute_force(modules):
    """``[(layer, o, c, kernel…, is_bias)]`` of each index of the paper-ordered parameter vector."""
    rows = []
    for k, m in enumerate(modules):
        w = torch.arange(m.weight.numel(), dtype=torch.float64).reshape(m.weight.shape)
        mat = w.reshape(w.shape[0], -1)
        if m.bias is not None:
            mat = torch.cat([mat, (BIAS + torch.arange(w.shape[0], dtype=torch.float64))[:, None]], dim=1)
        for v in mat.t().reshape(-1).tolist():  # vec(): column-stacked
            if v >= BIAS:
                rows.append((k, int(v) - BIAS, -1, (), True))
            else:
                o, c, *kern = np.unravel_index(int(v), tuple(w.shape))
                rows.append((k, int(o), int(c), tuple(int(x) for x in kern), False))
    return rows


MODELS = {
    "conv2d+bias, linear": lambda: [nn.Conv2d(3, 4, (2, 3)), nn.Linear(5, 2)],
    "conv2d no bias, stride": lambda: [nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=False)],
    "conv1d": lambda: [nn.Conv1d(2, 3, 4)],
    "linear no bias": lambda: [nn.Linear(3, 2, bias=False), nn.Linear(2, 2)],
}


@pytest.mark.parametrize("name", MODELS)
def test_coords_match_the_unravelled_weight(name):
    modules = MODELS[name]()
    geoms = [geometry(m, k) for k, m in enumerate(modules)]
    c = parameter_coords(geoms)
    truth = _brute_force(modules)
    assert len(c["label"]) == len(truth) == sum(g.num_params for g in geoms)
    for i, (layer, o, ch, kern, bias) in enumerate(truth):
        assert c["layer"][i] == layer and c["out_unit"][i] == o and bool(c["is_bias"][i]) == bias
        lab = str(c["label"][i])
        assert lab.startswith(f"L{layer + 1} ")
        if bias:
            assert c["in_unit"][i] == c["in_channel"][i] == c["kernel_row"][i] == c["kernel_col"][i] == -1
            assert re.fullmatch(rf"L{layer + 1} b\[(o)?{o}\]", lab), lab
            continue
        assert c["in_channel"][i] == (ch if kern else -1)       # a linear layer has no channels: in_unit
        assert c["in_unit"][i] == (np.ravel_multi_index((ch, *kern), modules[layer].weight.shape[1:]) if kern else ch)
        if len(kern) == 2:
            assert (c["kernel_row"][i], c["kernel_col"][i]) == kern
            assert lab == f"L{layer + 1} W[o{o}, c{ch}, kh{kern[0]}, kw{kern[1]}]"
        elif len(kern) == 1:
            assert c["kernel_row"][i] == kern[0] and c["kernel_col"][i] == -1
            assert lab == f"L{layer + 1} W[o{o}, c{ch}, k{kern[0]}]"
        else:
            assert c["kernel_row"][i] == c["kernel_col"][i] == -1
            assert lab == f"L{layer + 1} W[{o},{ch}]"


def test_labels_are_unique_and_prefix_applies():
    geoms = [geometry(nn.Conv2d(2, 3, 2), 0), geometry(nn.Linear(12, 4), 1)]
    c = parameter_coords(geoms, prefix="col_")
    assert set(c) == {f"col_{k}" for k in ("layer", "out_unit", "in_unit", "in_channel", "kernel_row", "kernel_col",
                                           "is_bias", "label")}
    assert len(set(c["col_label"])) == len(c["col_label"]) == 3 * 9 + 4 * 13
    assert parameter_label(geoms[0], 2, 8) == "L1 b[o2]" and parameter_label(geoms[1], 3, 12) == "L2 b[3]"


def test_geometry_round_trips_through_attrs_and_refuses_nonsense():
    geoms = [geometry(nn.Conv2d(2, 3, (3, 1), bias=False), 4), LayerGeometry(5, 10, 7)]
    assert from_attr(to_attr(geoms)) == geoms
    assert geoms[0].kernel == (3, 1) and geoms[0].in_dim == 6 and not geoms[0].has_bias
    with pytest.raises(ValueError, match="kernel must be positive"):
        LayerGeometry(0, 2, 2, (0, 3))
    with pytest.raises(ValueError, match="d_out must be a positive"):
        LayerGeometry(0, 0, 2)
    with pytest.raises(ValueError, match="JSON list"):
        from_attr("{not json")
    with pytest.raises(TypeError, match="no weight"):
        geometry(nn.ReLU())


def test_a_cnn_study_labels_every_row_by_brute_force():
    """The figure-1 CNN's study (its two convolutions and the linear layer): each row's coords and
    label name the weight the brute-force unravelling of the module's weight shape finds there."""
    from kfac_lab.analysis import fisher_study
    from kfac_lab.models import figure1_cnn

    model = figure1_cnn(seed=0)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    x = torch.randn(8, 256)
    ds = fisher_study(model, "categorical", x, layers=[0, 1], inverses=False)
    truth = _brute_force(convs[:2])
    assert ds.sizes["row"] == len(truth) == 156 + 660
    for i, (layer, o, ch, kern, bias) in enumerate(truth):
        row = ds.isel(row=i)
        assert (int(row["layer"]), int(row["out_unit"]), bool(row["is_bias"])) == (layer, o, bias)
        want = f"L{layer + 1} b[o{o}]" if bias else f"L{layer + 1} W[o{o}, c{ch}, kh{kern[0]}, kw{kern[1]}]"
        assert str(row["label"].values) == want == str(ds["col_label"].values[i])
        if not bias:
            assert (int(row["in_channel"]), int(row["kernel_row"]), int(row["kernel_col"])) == (ch, *kern)
