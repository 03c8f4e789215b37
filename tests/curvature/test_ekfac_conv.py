"""EKFAC on convolution layers (KFC's expand eigenbasis, per-case scales summed over locations)
against curvlinops' EKFACLinearOperator, on a CNN with stride, padding, dilation and no bias."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_lab.curvature import batch_factors, factor_pairs, find_layers, output_gradients
from kfac_lab.curvature.ekfac import eigenbasis, projected_moments

from .test_conv_factors import cnn

curvlinops = pytest.importorskip("curvlinops")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def our_ekfac_products(model, x, V):
    """Our EKFAC (exact expectation over the outputs) times the per-parameter tensors ``V``:
    ``U_G [(U_Gᵀ V U_A) ⊙ s] U_Aᵀ`` per layer, on ``[W | b]``."""
    layers = find_layers(model)
    a, g, _ = output_gradients(model, layers, "categorical", x, None, mode="exact")
    A, G = batch_factors(a, g, factor_pairs(len(layers), "diag"), "expand")
    basis = eigenbasis([A[(i, i)] for i in range(len(layers))], [G[(i, i)] for i in range(len(layers))])
    out, pos = [], 0
    for l, ai, gi, b in zip(layers, a, g, basis):
        s = projected_moments(ai, gi, b)
        w, bias = V[pos], (V[pos + 1] if l.has_bias else None)
        pos += 1 + l.has_bias
        M = l.to_matrix(w, bias)
        mw, mb = l.from_matrix(b.U_G @ ((b.U_G.t() @ M @ b.U_A) * s) @ b.U_A.t())
        out += [mw] + ([mb] if mb is not None else [])
    return out


def their_ekfac_products(model, x, y, V):
    params = list(model.parameters())
    op = curvlinops.EKFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], fisher_type="type-2",
                                        kfac_approx="expand", check_deterministic=False,
                                        separate_weight_and_bias=False, progressbar=False)
    return list(op @ [v.clone() for v in V])


@pytest.mark.parametrize("bias", [True, False])
def test_conv_ekfac_matches_curvlinops(bias):
    model = cnn(bias)
    x = torch.randn(7, 2, 9, 9, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    torch.manual_seed(4)
    V = [torch.randn_like(p) for p in model.parameters()]
    theirs = their_ekfac_products(model, x, y, V)
    ours = our_ekfac_products(model, x, V)
    assert len(theirs) == len(ours)
    for t, o in zip(theirs, ours):
        torch.testing.assert_close(o, t, rtol=1e-8, atol=1e-11)
