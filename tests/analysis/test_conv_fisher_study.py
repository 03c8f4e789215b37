"""The Fisher study of a CNN: F, the Khatri–Rao F̃ with all pairs, the block-diagonal inverse."""
import numpy as np
import pytest
import torch

from kfac_lab.analysis import fisher_study
from kfac_lab.curvature import exact_fisher, find_layers
from kfac_lab.curvature.factors import batch_factors, factor_pairs, kron
from kfac_lab.curvature.factors import output_gradients
from kfac_lab.models import figure1_cnn


@pytest.fixture(scope="module")
def cnn_and_x():
    torch.manual_seed(0)
    return figure1_cnn(seed=0), torch.rand(60, 256)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_fisher_study_of_a_cnn(cnn_and_x, approx):
    model, x = cnn_and_x
    ds = fisher_study(model, "categorical", x, layers=[0, 1], gamma=1e-3, weight_sharing=approx)
    net = figure1_cnn(seed=0, dtype=torch.float64)
    sel = find_layers(net)[:2]
    F = exact_fisher(net, "categorical", x.double(), layers=sel)
    np.testing.assert_allclose(ds["exact"].values, F.dense.numpy(), rtol=1e-10, atol=1e-14)
    a, g, _ = output_gradients(net, sel, "categorical", x.double(), mode="exact")
    A, G = batch_factors(a, g, factor_pairs(2, "all"), approx)
    kr = ds["kron"].values
    np.testing.assert_allclose(kr[:156, :156], kron(A[(0, 0)], G[(0, 0)]).numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(kr[:156, 156:], kron(A[(0, 1)], G[(0, 1)]).numpy(), rtol=1e-10, atol=1e-14)
    assert "tridiag_inverse" not in ds and "blockdiag_rel_error" in ds and "kron_inverse" in ds
    assert "no cross-layer model" in ds.attrs["tridiag"] and ds.attrs["weight_sharing"] == approx
    # hover coordinates: output channel, input channel, kernel row / column; bias marked
    assert ds["label"].values[6 * 7] == "L1 W[o0, c0, kh1, kw2]"
    row = 6 * 7
    assert (ds["out_unit"].values[row], ds["in_channel"].values[row], ds["kernel_row"].values[row],
            ds["kernel_col"].values[row]) == (0, 0, 1, 2)
    assert ds["is_bias"].values[150] and ds["label"].values[150] == "L1 b[o0]" and ds["kernel_row"].values[150] == -1


def test_fisher_study_of_the_whole_cnn_without_inverses(cnn_and_x):
    model, x = cnn_and_x
    ds = fisher_study(model, "categorical", x[:20], inverses=False)
    assert ds["exact"].shape == (2746, 2746) and ds["label"].values[-1] == "L3 b[9]"
    assert ds["in_channel"].values[-12] == -1  # the Linear layer has no kernel coordinates
