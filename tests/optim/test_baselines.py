import copy
import io
import math
import threading

import pytest
import torch
from torch import nn

from kfac_lab.errors import KFACError, NonFiniteError
from kfac_lab.optim.baselines import Adam, BaselineInfo, SGDNesterov

DT = torch.float64


def regression(seed=0, m=64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 4, generator=gen, dtype=DT)
    y = x @ torch.randn(4, 2, generator=gen, dtype=DT) + 0.1 * torch.randn(m, 2, generator=gen, dtype=DT)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    return model, x, y


def autoencoder(seed=0, m=32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(m, 10, generator=gen, dtype=DT) > 0.5).to(DT)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 3), nn.Sigmoid(), nn.Linear(3, 10)).to(DT)
    return model, x


def test_nesterov_matches_hand_written_update():
    torch.manual_seed(0)
    model = nn.Linear(1, 1).to(DT)  # two parameters: w, b
    x = torch.tensor([[1.0], [2.0], [-1.0]], dtype=DT)
    y = torch.tensor([[0.5], [1.0], [3.0]], dtype=DT)
    w, b = model.weight.item(), model.bias.item()
    lr, eta, mu = 0.1, 0.01, 0.9
    opt = SGDNesterov(model, "gaussian", lr=lr, weight_decay=eta, schedule=mu)

    def h_and_grad(w, b):
        r = w * x[:, 0] + b - y[:, 0]
        h = (0.5 * r.pow(2)).mean().item() + 0.5 * eta * (w * w + b * b)
        return h, (r * x[:, 0]).mean().item() + eta * w, r.mean().item() + eta * b

    vw = vb = 0.0
    for k in range(3):
        lw, lb = w + mu * vw, b + mu * vb  # look-ahead point θ + μv
        h, gw, gb = h_and_grad(lw, lb)
        vw, vb = mu * vw - lr * gw, mu * vb - lr * gb
        w, b = w + vw, b + vb
        info = opt.step(x, y)
        assert isinstance(info, BaselineInfo) and not info.rejected
        assert info.step == k + 1 and info.mu == mu and info.lr == lr and info.batch_size == 3
        assert info.objective == pytest.approx(h, rel=1e-12)
        assert info.loss == pytest.approx(h - 0.5 * eta * (lw * lw + lb * lb), rel=1e-12)
        assert model.weight.item() == pytest.approx(w, rel=1e-12, abs=1e-14)
        assert model.bias.item() == pytest.approx(b, rel=1e-12, abs=1e-14)
    assert model.weight.grad is None  # the model's .grad is not used


def test_nesterov_sutskever_schedule_in_info():
    model, x, y = regression()
    opt = SGDNesterov(model, "gaussian", lr=0.01, mu_max=0.6)
    assert opt.step(x, y).mu == 0.5
    opt.k = 250  # jump the schedule
    assert opt.step(x, y).mu == 0.6  # 0.75 capped at mu_max
    opt.configure(schedule=lambda t: 0.25)
    assert opt.step(x, y).mu == 0.25


@pytest.mark.parametrize("make", [
    lambda m: SGDNesterov(m, "gaussian", lr=0.02, mu_max=0.9),
    lambda m: Adam(m, "gaussian", lr=0.01),
])
def test_reduces_regression_loss(make):
    model, x, y = regression()
    opt = make(model)
    first = opt.step(x, y).objective
    for _ in range(30):
        last = opt.step(x, y).objective
    assert last < 0.5 * first


@pytest.mark.parametrize("cls, kw", [(SGDNesterov, dict(lr=0.2, schedule=0.9)), (Adam, dict(lr=0.05))])
def test_reduces_autoencoder_loss(cls, kw):
    model, x = autoencoder()
    opt = cls(model, "bernoulli", **kw)
    first = opt.step(x, x).loss
    for _ in range(40):
        last = opt.step(x, x).loss
    assert last < 0.8 * first


def test_adam_matches_torch_adam():
    model, x, y = regression()
    twin = copy.deepcopy(model)
    opt = Adam(model, "gaussian", lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3)
    ref = torch.optim.Adam(twin.parameters(), lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3)
    for _ in range(3):
        info = opt.step(x, y)
        ref.zero_grad()
        nll = 0.5 * (twin(x) - y).pow(2).sum(1).mean()
        nll.backward()
        ref.step()
        assert info.mu == 0.8
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cls, kw", [(SGDNesterov, dict(lr=0.02)), (Adam, dict(lr=0.01))])
def test_resume_bit_for_bit(cls, kw):
    model, x, y = regression()
    opt = cls(model, "gaussian", **kw)
    for _ in range(3):
        opt.step(x, y)
    model_sd = copy.deepcopy(model.state_dict())
    opt_sd = _roundtrip(opt.state_dict())
    for _ in range(3):
        opt.step(x + 0.1, y)
    model2, _, _ = regression(seed=5)
    model2.load_state_dict(model_sd)
    opt2 = cls(model2, "gaussian", lr=0.5)
    opt2.load_state_dict(opt_sd)
    infos = [opt2.step(x + 0.1, y) for _ in range(3)]
    assert infos[-1].step == 6 and opt2.k == opt.k
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_batch_rejected_params_untouched():
    model, x, y = regression()
    opt = SGDNesterov(model, "gaussian", lr=0.02, schedule=0.9, max_rejections=3)
    opt.step(x, y)
    opt.step(x, y)  # velocity is non-zero now: the look-ahead moves the parameters
    before = [p.detach().clone() for p in model.parameters()]
    vel = [v.clone() for v in opt.velocity]
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="rejected"):
        info = opt.step(bad, y)
    assert info.rejected and info.reason == "non-finite loss" and math.isnan(info.loss) and info.step == 3
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for v, w in zip(opt.velocity, vel):
        assert torch.equal(v, w)
    assert opt.k == 2
    assert opt.events[-1]["kind"] == "rejected" and opt.events[-1]["step"] == 3
    assert opt.events[-1]["reason"] == "non-finite loss"
    assert not opt.step(x, y).rejected and opt.consecutive_rejects == 0
    with pytest.warns(RuntimeWarning):
        opt.step(bad, y)
        opt.step(bad, y)
    with pytest.raises(NonFiniteError, match="in a row"):
        opt.step(bad, y)


def test_adam_nonfinite_rejected():
    model, x, y = regression()
    opt = Adam(model, "gaussian")
    opt.step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning):
        assert opt.step(x, torch.full_like(y, float("inf"))).rejected
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_configure_applied_at_next_step_and_recorded():
    model, x, y = regression()
    opt = SGDNesterov(model, "gaussian", lr=0.02)
    threads = [threading.Thread(target=opt.configure, kwargs=dict(lr=0.001 * (i + 1))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert opt.hyper["lr"] == 0.02
    info = opt.step(x, y)
    assert info.lr in {0.001, 0.002, 0.003, 0.004}
    assert opt.events[0]["kind"] == "configure" and opt.events[0]["step"] == 1 and opt.events[0]["lr"] == info.lr
    assert set(info.as_dict()) >= {"step", "loss", "objective", "lr", "mu", "batch_size", "time_total", "rejected"}
    opt.configure(mu_max=0.3)
    assert opt.step(x, y).mu == 0.3


def test_validation_messages():
    model, x, y = regression()
    with pytest.raises(ValueError, match="unknown loss"):
        SGDNesterov(model, "hinge")
    with pytest.raises(ValueError, match="lr"):
        SGDNesterov(model, "gaussian", lr=-1)
    with pytest.raises(ValueError, match="mu_max"):
        SGDNesterov(model, "gaussian", mu_max=1.0)
    with pytest.raises(ValueError, match="schedule"):
        SGDNesterov(model, "gaussian", schedule="cosine")
    with pytest.raises(ValueError, match="betas"):
        Adam(model, "gaussian", betas=(0.9,))
    opt = SGDNesterov(model, "gaussian")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['momentum'\]"):
        opt.configure(momentum=0.9)
    with pytest.raises(ValueError, match=r"SGDNesterov.step\(x, y\): gaussian loss: targets shape"):
        opt.step(x, y[:, :1])
    cat = Adam(model, "categorical")
    with pytest.raises(ValueError, match="integer class indices"):
        cat.step(x, y)
    with pytest.raises(KFACError, match="kind"):
        cat.load_state_dict(opt.state_dict())
