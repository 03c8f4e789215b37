"""The lecture notebooks 01–03 at their default size: every claim their text makes holds for the
numbers their run records (``kfac_lab.lab.notebook.record``), and the executed notebook is small.

Each notebook runs once (module fixture), through papermill with nbclient's defaults — widget
state saved, as a notebook shared executed would be — into a temporary copy of ``notebooks/``.
"""
from __future__ import annotations

import math

import pytest

from kfac_lab.lab.notebook import recorded

from .test_notebooks import errors, execute

#: The most an executed lecture notebook may weigh at its default size.
MAX_BYTES = 5_000_000
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(name) -> (numbers, bytes)`` for a notebook executed at its default size (once each)."""
    done = {}

    def go(name):
        if name not in done:
            tmp = tmp_path_factory.mktemp(name)
            nb = execute(name, tmp)
            assert not errors(nb), errors(nb)
            done[name] = recorded(nb), (tmp / f"{name}.out.ipynb").stat().st_size
        return done[name]

    return go


def test_01_natural_gradient(run):
    r, size = run("01_natural_gradient")
    assert size <= MAX_BYTES, f"{size:,} bytes executed"
    # 1: KL = ½dᵀFd + O(t³): the ratio tends to 1, its error like t
    assert abs(r["kl_ratio_small"] - 1) < 1e-4 and 0.8 < r["kl_error_slope"] < 1.2
    # 2: the natural gradient gains most per KL; the formula is its gain
    assert math.isclose(r["natural_gain"], r["natural_gain_formula"], rel_tol=1e-8)
    assert r["natural_gain"] > r["best_random_gain"] and r["natural_gain"] > r["gradient_gain"]
    assert r["fisher_zero_eigenvalues"] == r["output_columns"] == 5   # the output layer's [W | b] columns
    assert r["fisher_smallest_nonzero_ratio"] < 1e-9
    steps = r["actual_decrease"]    # "at ε = 1e-10 the natural step wins; from 1e-6 it increases h; the others stay safe"
    assert steps["1e-10"]["natural"] > steps["1e-10"]["gradient"] > 0
    assert steps["1e-06"]["natural"] < 0 and steps["0.0001"]["natural"] < 0
    assert all(row["gradient"] > 0 and row["damped natural (λ = 1e-3)"] > 0 for row in steps.values())
    # 3: F = GGN to rounding, the Hessian is not and is indefinite
    assert r["hessian_z_error"] < 1e-12 and r["fr_expectation_error"] < 1e-12 and r["ggn_vs_fisher"] < 1e-12
    assert r["hessian_vs_fisher"] > 0.1 and r["hessian_min_eig"] < 0 <= r["fisher_min_eig"] + 1e-12
    # 4: the sampled Fisher converges (unbiased), the empirical one does not
    errs = r["sampled_errors"]
    assert errs[-1] < errs[0] / 5 and r["empirical_error"] > 5 * errs[0]
    # 5: the identities, and U = G⁻¹VĀ⁻¹ against the dense solve
    assert max(r["identity_errors"]) < 1e-12 and r["kron_inverse_vs_dense"] < 1e-9
    assert r["autoencoder_params"] == 2_837_314 and round(r["dense_terabytes"]) == 64


def test_02_kronecker_factored_fisher(run):
    r, size = run("02_kronecker_factored_fisher")
    assert size <= MAX_BYTES, f"{size:,} bytes executed"
    assert 0.2 < r["kron_rel_error"] < 1.5          # "far from exact ... the same order as the entries"
    assert r["total_error"] <= r["total_bound"] * (1 + 1e-9)   # eqn 3 exact ⇒ the triangle inequality
    assert 0.3 < r["total_error"] / r["total_bound"] < 1       # "of the same order as the bound"
    assert r["bias_bias_error"] < 1e-9 * r["largest_entry"]   # exact on bias–bias entries


def test_03_inverse_structure(run):
    r, size = run("03_inverse_structure")
    assert size <= MAX_BYTES, f"{size:,} bytes executed"
    assert r["kron_vs_study"] < 1e-12
    d0, d1, d2 = r["block_mean_by_distance"]        # "diagonal, adjacent ~3x smaller, two apart ~3x smaller again"
    assert d0 > 2 * d1 and d1 > 2 * d2
    b0, b1, b2 = r["regression_by_distance"]        # "the same order, milder"
    assert b0 > b1 > b2 and b0 / b2 < d0 / d2
    assert r["regression_vs_inverse"] < 1e-10
    assert max(r["construction_checks"]) < 1e-10 and max(r["library_checks"]) < 1e-10
    assert max(r["appendix_b_checks"]) < 1e-10
    assert r["far_block_error"][0] > 1e-3           # F̂ differs from F̃ two layers apart
    lo1, hi1 = r["s1_range"]                       # "[0, 1]; the A side reaches 1; the G side stays below"
    lo2, hi2 = r["s2_range"]
    assert lo1 >= -1e-12 and lo2 >= -1e-12 and abs(hi1 - 1) < 1e-9 and hi2 < 1 - 1e-6
    assert r["tridiag_error"] < r["blockdiag_error"]
    assert r["output_g_smallest"] < 1e-12 * r["output_g_largest"] and r["output_g_second"] > 1e-4 * r["output_g_largest"]


def test_07_convolutions(run):
    """The claims 07's text makes, at its default size (they used to be asserts in the lecture path)."""
    r, size = run("07_convolutions")
    assert size <= 5_000_000
    assert set(r["kfc_corr"]) == set(r["kfc_uncorrelated"]) and r["kfc_corr"]
    for k, c in r["kfc_corr"].items():
        assert c < 0.5, k                              # "small on average"
        assert r["kfc_uncorrelated"][k] > 0.5, k       # "about as much as the block itself"
    for k, e in r["layer_errors"].items():
        assert e["EKFAC"] <= e["KFC expand"] + 1e-9, k  # (a) EKFAC's diagonal is the best in that basis
    lin = r["layer_errors"][r["linear_layer"]]
    assert abs(lin["KFC expand"] - lin["KFC reduce"]) < 1e-9  # (c) they agree on the linear layer
    (kfac, k_loss), (sgd, s_loss) = r["race_final_loss"][:2]
    assert kfac.startswith("K-FAC") and sgd.startswith("SGD") and k_loss < s_loss  # "well ahead of tuned SGD"
