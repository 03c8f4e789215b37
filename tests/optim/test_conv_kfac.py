"""K-FAC on convolutional networks: faster per iteration than SGD, bit-for-bit resume, the
statistics subset, the refusals (tridiag, a weight_sharing mismatch on resume)."""
import io

import pytest
import torch
from torch import nn

from kfac_lab.curvature.layers import KFACLayer
from kfac_lab.errors import UnsupportedApproximationError
from kfac_lab.optim import KFAC, KFACPreconditioner
from kfac_lab.optim.baselines import SGDNesterov
from kfac_lab.optim.state_check import StateError
from kfac_lab.train import get_problem


@pytest.fixture(scope="module")
def digits():
    p = get_problem("fig1-cnn", n=600)
    return p


def batches(p, steps, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, p.n, (m,), generator=g)
        yield p.X[idx], p.Y[idx]


def test_kfac_beats_sgd_per_iteration_on_a_cnn(digits):
    p = digits
    losses = {}
    for name in ("kfac", "sgd"):
        model = p.make_model(0)
        opt = KFAC(model, "categorical", damping=1.0, seed=0) if name == "kfac" else \
            SGDNesterov(model, "categorical", **p.default_options("sgd"))
        for x, y in batches(p, 15, 200):
            opt.step(x, y)
        losses[name] = p.evaluate(model)["nll"]
    assert losses["kfac"] < 0.8 * losses["sgd"], losses


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_resume_is_bit_for_bit_with_conv_layers(digits, approx):
    p = digits
    data = list(batches(p, 8, 100, seed=1))
    opts = dict(damping=1.0, T3=2, T2=4, T1=2, seed=5, weight_sharing=approx)
    straight = p.make_model(0)
    o = KFAC(straight, "categorical", **opts)
    for x, y in data:
        o.step(x, y)
    model = p.make_model(0)
    o = KFAC(model, "categorical", **opts)
    for x, y in data[:4]:
        o.step(x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": o.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    resumed = p.make_model(1)
    resumed.load_state_dict(saved["model"])
    o2 = KFAC(resumed, "categorical", **opts)
    o2.load_state_dict(saved["opt"])
    for x, y in data[4:]:
        o2.step(x, y)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    other = "reduce" if approx == "expand" else "expand"
    o3 = KFAC(p.make_model(0), "categorical", **{**opts, "weight_sharing": other})
    with pytest.raises(StateError, match=f"saved with weight_sharing='{approx}'.*weight_sharing='{approx}'"):
        o3.load_state_dict(saved["opt"])
    assert o3.k == 0  # nothing loaded


def test_preconditioner_on_a_cnn_resumes_and_refuses_a_mismatch(digits):
    p = digits
    data = list(batches(p, 4, 64, seed=2))

    def run(model, pre, part):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in part:
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()

    a = p.make_model(0)
    pa = KFACPreconditioner(a, "categorical", weight_sharing="reduce", inverse_update_freq=2, lr=0.1)
    run(a, pa, data)
    b = p.make_model(0)
    pb = KFACPreconditioner(b, "categorical", weight_sharing="reduce", inverse_update_freq=2, lr=0.1)
    run(b, pb, data[:2])
    state = pb.state_dict()
    assert state["weight_sharing"] == "reduce"
    pc = KFACPreconditioner(b, "categorical", weight_sharing="reduce", inverse_update_freq=2, lr=0.1)
    pc.load_state_dict(state)
    pb.remove()
    run(b, pc, data[2:])
    for u, v in zip(a.parameters(), b.parameters()):
        assert torch.equal(u, v)
    with pytest.raises(StateError, match="weight_sharing='reduce'"):
        KFACPreconditioner(p.make_model(0), "categorical", lr=0.1).load_state_dict(state)


def test_tridiag_is_refused_at_construction_and_live(digits):
    model = digits.make_model(0)
    with pytest.raises(UnsupportedApproximationError, match="'1', '3'.*no cross-layer model.*blockdiag"):
        KFAC(model, "categorical", approx="tridiag")
    with pytest.raises(UnsupportedApproximationError, match="no cross-layer model"):
        KFACPreconditioner(model, "categorical", approx="tridiag", lr=0.1)
    opt = KFAC(model, "categorical")
    with pytest.raises(ValueError, match="no cross-layer model"):  # in the caller's thread
        opt.configure(approx="tridiag")
    assert opt.config.approx == "blockdiag" and opt.curvature.factors.pairs == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="weight_sharing='sum'"):
        KFAC(model, "categorical", weight_sharing="sum")


def test_linear_on_sequences_refuses_tridiag_before_touching_the_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 2))
    opt = KFAC(model, "categorical", approx="tridiag")
    x, y = torch.randn(16, 5, 3), torch.randint(0, 2, (16,))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedApproximationError, match="'0'"):
        opt.step(x, y)
    assert opt.curvature.factors.k == 0 and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.configure(approx="blockdiag")
    info = opt.step(x, y)
    assert not info.rejected and opt.curvature.tridiag_unavailable


def test_statistics_unfold_only_the_subset(digits, monkeypatch):
    seen = []
    real = KFACLayer.inputs

    def spy(self, x, rows=None):
        out = real(self, x, rows)
        seen.append((self.name, out.shape[0]))
        return out

    monkeypatch.setattr(KFACLayer, "inputs", spy)
    opt = KFAC(digits.make_model(0), "categorical", stats_fraction=1 / 8)
    opt.step(digits.X[:400], digits.Y[:400])
    assert seen and all(n == 50 for _, n in seen), seen
