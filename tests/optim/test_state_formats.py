"""The saved states of KFAC and KFACPreconditioner keep their layout now that the curvature is the
engine's (users' stores hold such states), and states in the preconditioner's earlier layout load."""
import copy

import pytest
import torch

from kfac_lab.curvature import batch_factors, find_layers, output_gradients
from kfac_lab.optim import KFAC, KFACPreconditioner

from .test_preconditioner import DT, backward, classifier, data

KFAC_KEYS = ["format", "config", "k", "damping", "gamma", "factors", "inverse_inputs", "inverse_gamma", "stale",
             "delta0", "generator", "rejections", "events", "initial_damping"]
PRE_KEYS = ["format", "steps", "names", "config", "pending", "factors", "inverse_inputs", "rebuild", "generator",
            "seed", "events"]
FACTOR_KEYS = ["k", "decay", "pairs", "A", "G"]


@pytest.mark.parametrize("approx", ["blockdiag", "tridiag"])
def test_kfac_state_layout_is_frozen(approx):
    model = classifier()
    opt = KFAC(model, "categorical", approx=approx)
    x, y = data()
    for _ in range(2):
        opt.step(x, y)
    s = opt.state_dict()
    assert list(s) == KFAC_KEYS and s["format"] == "kfac_lab.KFAC/1"
    assert list(s["factors"]) == FACTOR_KEYS and sorted(s["factors"]["A"]) == ["0,0", "0,1", "1,1", "1,2", "2,2"]
    assert list(s["inverse_inputs"]) == ["A", "G", "A_off", "G_off"]
    assert (s["inverse_inputs"]["A_off"] is None) == (approx == "blockdiag")
    assert isinstance(s["inverse_gamma"], float) and s["stale"] is False and s["generator"].dtype == torch.uint8
    # and it resumes bit for bit
    other = KFAC(classifier(seed=1), "categorical", approx=approx)
    other.model.load_state_dict(model.state_dict())
    other.load_state_dict(copy.deepcopy(s))
    a, b = opt.step(x, y), other.step(x, y)
    assert a.loss == b.loss and a.alpha == b.alpha and all(
        torch.equal(p, q) for p, q in zip(model.parameters(), other.model.parameters()))


def _pre(model, approx="blockdiag", **kw):
    return KFACPreconditioner(model, "categorical", kl_clip=None, approx=approx, gamma=0.05,
                              inverse_update_freq=3, **kw)


def test_preconditioner_state_layout_is_frozen_and_its_earlier_layout_loads():
    model = classifier()
    pre = _pre(model)
    x, y = data()
    for _ in range(2):
        backward(model, x, y)
        pre.step(x=x)
    s = pre.state_dict()
    assert list(s) == PRE_KEYS and s["format"] == "kfac_lab.KFACPreconditioner/1"
    assert list(s["factors"]) == FACTOR_KEYS
    assert list(s["inverse_inputs"]) == ["A", "G", "A_off", "G_off", "gamma"] and s["inverse_inputs"]["gamma"] == 0.05
    # the earlier layout: the cross factors saved for a block-diagonal inverse too, no generator before first use
    old = copy.deepcopy(s)
    old["inverse_inputs"]["A_off"] = [pre.factors.A[(i, i + 1)].clone() for i in range(2)]
    old["inverse_inputs"]["G_off"] = [pre.factors.G[(i, i + 1)].clone() for i in range(2)]
    runs = []
    for state in (s, old):
        m = classifier(seed=3)
        m.load_state_dict(model.state_dict())
        p = _pre(m)
        p.load_state_dict(copy.deepcopy(state))
        assert type(p.inverse).__name__ == "BlockDiagonalInverse"
        backward(m, x, y)
        p.step(x=x)
        runs.append([q.grad for q in m.parameters()])
    assert all(torch.equal(u, v) for u, v in zip(*runs))
    fresh = _pre(classifier())
    fresh.load_state_dict(dict(copy.deepcopy(fresh.state_dict()), generator=None))  # saved before the first step
    assert torch.equal(fresh.curvature.generator.get_state(), torch.Generator().manual_seed(0).get_state())


def test_preconditioner_statistics_use_the_engines_subset_rule():
    # round(m·τ₁), as KFAC: 20 cases at τ₁ = 1/8 give 2 statistics cases (the preconditioner took 3 before)
    model = classifier()
    pre = _pre(model, stats_fraction=1 / 8, seed=4)
    x, y = data(m=20)
    backward(model, x, y)
    info = pre.step(x=x)
    assert info.stats_batch == 2
    a, g, _ = output_gradients(model, find_layers(model), "categorical", x[:2], mode="sampled",
                               generator=torch.Generator().manual_seed(4))
    A, G = batch_factors(a, g, pre.factors.pairs)
    for key in A:
        torch.testing.assert_close(pre.factors.A[key], A[key].to(DT), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(pre.factors.G[key], G[key].to(DT), rtol=1e-13, atol=1e-15)
