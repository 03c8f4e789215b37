"""The quadratic model may not promise more than the objective holds: M(δ) − M(0) ≥ −h, with λ
raised at once when it would (optim/trust.py ``bounded_by_objective``; not in the paper). Without
it, a classifier driven to near-zero loss — the Fisher vanishing, λ at ~1e-7 — took 2×2 solves
with μ = −33, −1,060, … and reached NaN in three steps (mnist-cnn, step 114 of a race)."""
import math

import pytest
import torch
from torch import nn

from kfac_lab.optim import KFAC
from kfac_lab.optim.quadratic import Products, coefficients, model_change
from kfac_lab.optim.trust import bounded_by_objective

OMEGA = (19 / 20) ** 5


def test_the_smallest_lambda_on_the_grid_whose_model_keeps_above_minus_h():
    # nearly collinear Δ, δ₀ with vanishing curvature: the 2×2 solve promises a huge decrease
    p = Products(dFd=1e-6, dFp=0.99e-6, pFp=1e-6, dd=1.0, dp=0.99, pp=1.0, gd=-1e-3, gp=-0.5e-3)
    lam0, eta, h = 1e-7, 1e-5, 0.01
    a0, m0 = coefficients(p, lam0 + eta, True, None, True)
    assert model_change(p, lam0 + eta, a0, m0) < -h
    lam, alpha, mu, M = bounded_by_objective(p, lam0, eta, h, True, True, OMEGA, 1e8)
    assert M >= -h and (alpha, mu) == coefficients(p, lam + eta, True, None, True)
    j = round(math.log(lam / lam0) / math.log(1 / OMEGA))
    assert lam == pytest.approx(lam0 / OMEGA ** j, rel=1e-9) and j >= 1
    below = lam * OMEGA                                   # one grid step less still breaks the bound
    ab, mb = coefficients(p, below + eta, True, None, True)
    assert model_change(p, below + eta, ab, mb) < -h
    # a model within the bound is left alone
    assert bounded_by_objective(p, 1.0, eta, h, True, True, OMEGA, 1e8)[0] == 1.0
    # the ceiling holds
    assert bounded_by_objective(p, lam0, eta, 1e-30, True, True, OMEGA, 1e-3)[0] == 1e-3


def _separable_run(steps=300):
    """ReLU classifier on separable data, mini-batches of 64 of 2,048: the loss goes to ~0."""
    torch.manual_seed(0)
    X = torch.randn(2048, 8)
    Y = (X[:, 0] > 0).long()
    X[:, 0] += torch.where(Y == 1, 0.5, -0.5)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = KFAC(model, "categorical", damping=1e-3, seed=0)
    g = torch.Generator().manual_seed(1)
    infos = []
    for _ in range(steps):
        i = torch.randint(0, 2048, (64,), generator=g)
        infos.append(opt.step(X[i], Y[i]))
    return infos


def test_a_classifier_at_near_zero_loss_stays_finite_and_within_the_bound():
    infos = _separable_run()
    assert all(math.isfinite(i.loss) and not i.rejected for i in infos)
    assert all(i.model_change >= -i.objective * (1 + 1e-9) for i in infos)
    bounded = [i for i in infos if i.model_bounded]
    assert bounded and infos[-1].loss < 1e-3
    assert max(abs(i.mu) for i in infos) < 100


def test_without_the_bound_the_same_run_diverges(monkeypatch):
    """The same run with the model's promise taken as it is (the paper's rule alone)."""
    import kfac_lab.optim.kfac as kfac_module
    from kfac_lab.errors import NonFiniteError

    def unbounded(p, damping, eta, h, momentum, has_prev, omega, upper):
        alpha, mu = coefficients(p, damping + eta, momentum, None, has_prev)
        return damping, alpha, mu, model_change(p, damping + eta, alpha, mu)

    monkeypatch.setattr(kfac_module, "bounded_by_objective", unbounded)
    with pytest.raises(NonFiniteError, match="rejected 10 consecutive steps"):
        _separable_run()
