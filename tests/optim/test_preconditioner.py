import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_lab.curvature import KroneckerFactors, batch_factors, find_layers, make_inverse, output_gradients
from kfac_lab.errors import KFACError, UnsupportedLayerError
from kfac_lab.optim.preconditioner import KFACPreconditioner, PreconditionerInfo

DT = torch.float64


def classifier(seed=0, sizes=(6, 5, 4, 3), bias_last=True):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        mods.append(nn.Linear(a, b, bias=bias_last or not last))
        if not last:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).to(DT)


def data(seed=0, m=40, d=6, c=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, d, generator=gen, dtype=DT), torch.randint(0, c, (m,), generator=gen)


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def grads(layers):
    return [l.to_matrix(l.module.weight.grad, l.module.bias.grad if l.has_bias else None).clone() for l in layers]


def independent(model, xs, running, approx, gamma, damping_type, seed_gen):
    """Factors and F⁻¹ from the curvature core alone, blending into ``running``."""
    layers = find_layers(model)
    a, g, _ = output_gradients(model, layers, "categorical", xs, mode="sampled", generator=seed_gen)
    running.update(*batch_factors(a, g, running.pairs))
    A, G = running.diag()
    A_off, G_off = running.off_diag()
    off = (A_off, G_off) if approx == "tridiag" else (None, None)
    return layers, make_inverse(approx, A, G, *off, gamma=gamma, damping_type=damping_type)


@pytest.mark.parametrize("approx, damping_type, bias_last", [
    ("blockdiag", "factored", True), ("tridiag", "factored", True),
    ("blockdiag", "tikhonov", True), ("tridiag", "factored", False),
])
def test_grad_equals_independent_inverse_applied(approx, damping_type, bias_last):
    model = classifier(bias_last=bias_last)
    pre = KFACPreconditioner(model, "categorical", kl_clip=None, approx=approx, gamma=0.05, damping_type=damping_type,
                             stats_fraction=0.25, inverse_update_freq=1, seed=7)
    running = KroneckerFactors(3, "tridiag", 0.95)
    gen = torch.Generator().manual_seed(7)
    for step, seed in enumerate((0, 1)):  # two steps: the running average blends (ε = 0, then 1/2)
        x, y = data(seed)
        backward(model, x, y)
        layers = find_layers(model)
        original = grads(layers)
        info = pre.step()
        assert isinstance(info, PreconditionerInfo) and info.step == step + 1
        assert info.stats_updated and info.inverses_refreshed and info.stats_batch == 10
        _, inv = independent(model, x[:10], running, approx, 0.05, damping_type, gen)
        for key in running.pairs:
            torch.testing.assert_close(pre.factors.A[key], running.A[key], rtol=1e-13, atol=1e-15)
            torch.testing.assert_close(pre.factors.G[key], running.G[key], rtol=1e-13, atol=1e-15)
        expected = inv.apply(original)
        for got, want in zip(grads(layers), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
        if not bias_last:
            assert layers[-1].module.bias is None


def test_intervals_and_excluded_layer_keeps_gradient():
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", kl_clip=None, exclude=["4"], factor_update_freq=2, inverse_update_freq=3)
    assert [l.name for l in pre.layers] == ["0", "2"]
    x, y = data()
    flags = []
    for _ in range(7):
        backward(model, x, y)
        last = model[4].weight.grad.clone(), model[4].bias.grad.clone()
        info = pre.step()
        flags.append((info.stats_updated, info.inverses_refreshed))
        assert torch.equal(model[4].weight.grad, last[0]) and torch.equal(model[4].bias.grad, last[1])
    assert flags == [(True, True), (False, False), (True, False), (False, True), (True, False), (False, False),
                     (True, True)]
    assert pre.factors.k == 4


def test_trains_tiny_classifier_better_than_sgd_with_scheduler():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(256, 8, generator=gen)
    y = (z @ torch.randn(8, 3, generator=gen)).argmax(1)
    x = z * torch.logspace(-1, 1, 8)  # badly scaled inputs

    def run(kfac):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=15, gamma=0.5)
        pre = KFACPreconditioner(model, "categorical", lr=opt, gamma=0.03, inverse_update_freq=5,
                                 stats_fraction=0.25) if kfac else None
        for _ in range(40):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if pre is not None:
                pre.step()
            opt.step()
            sched.step()
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()

    sgd, kfac = run(False), run(True)
    assert kfac < 0.5 * sgd, (kfac, sgd)


def test_explicit_x_and_hook_ignores_no_grad_and_own_forward():
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", kl_clip=None)
    x, y = data()
    backward(model, x, y)
    with torch.no_grad():
        model(torch.zeros(3, 6, dtype=DT))  # evaluation: not remembered
    assert pre._last_input.data_ptr() == x.data_ptr() and pre._last_input.shape == x.shape  # no copy
    pre.step()
    assert pre._last_input.shape == x.shape  # the statistics pass on x[:5] is not remembered either
    pre.remove()
    backward(model, x, y)
    with pytest.raises(KFACError, match="hook was removed.*pass x="):
        pre.step()
    assert pre.step(x=x).stats_batch == 5


@pytest.mark.parametrize("settings", [{"kl_clip": None},
                                      {"kl_clip": 1e-2, "adaptive_damping": True, "damping_update_freq": 1}])
def test_state_dict_round_trip_resumes_bit_for_bit(settings):
    def setup(seed):
        model = classifier(seed)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        pre = KFACPreconditioner(model, "categorical", lr=opt, approx="tridiag", gamma=0.05, inverse_update_freq=3,
                                 stats_fraction=0.5, seed=3, **settings)
        return model, opt, pre

    def train(model, opt, pre, steps, start):
        for s in range(start, start + steps):
            x, y = data(s)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step(closure=lambda: F.cross_entropy(model(x), y))  # used by adaptive damping only
            opt.step()

    model, opt, pre = setup(0)
    train(model, opt, pre, 4, 0)  # the inverse in use was built at step 3 from older factors
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "pre": pre.state_dict()}, buf)
    train(model, opt, pre, 4, 4)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2, opt2, pre2 = setup(1)
    model2.load_state_dict(ck["model"])
    opt2.load_state_dict(ck["opt"])
    pre2.load_state_dict(ck["pre"])
    train(model2, opt2, pre2, 4, 4)
    assert pre2.steps == pre.steps == 8
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    # the settings travel (the adapted γ too); an optimizer given as lr does not: the new one stays
    assert ck["pre"]["config"]["kl_clip"] == settings["kl_clip"] and "lr" not in ck["pre"]["config"]
    assert pre2.config["lr"] is opt2 and pre2.gamma() == pre.gamma()
    assert (pre.gamma() != 0.05) == bool(settings.get("adaptive_damping"))
    with pytest.raises(KFACError, match="layers"):
        KFACPreconditioner(classifier(sizes=(6, 3)), kl_clip=None).load_state_dict(ck["pre"])


def test_configure_switches_approx_and_gamma_at_next_step():
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", kl_clip=None, inverse_update_freq=100, gamma=lambda k: 0.1 / (k + 1))
    x, y = data()
    backward(model, x, y)
    assert pre.step().gamma == 0.1
    pre.configure(approx="tridiag")
    assert pre.config["approx"] == "blockdiag"
    backward(model, x, y)
    info = pre.step()
    assert info.inverses_refreshed and pre.config["approx"] == "tridiag" and info.gamma == 0.05
    assert type(pre.inverse).__name__ == "BlockTridiagonalInverse"
    assert pre.events[-1] == {"step": 2, "kind": "configure", "approx": "tridiag"}
    backward(model, x, y)
    assert not pre.step().inverses_refreshed
    with pytest.raises(ValueError, match="damping_type='factored'"):
        pre.configure(damping_type="tikhonov")


def test_errors():
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", kl_clip=None)
    x, y = data()
    with pytest.raises(KFACError, match=r"call model\(x\) first or pass x="):
        pre.step()
    model(x)
    with pytest.raises(KFACError, match=r"call loss.backward\(\) first"):
        pre.step()
    with pytest.raises(ValueError, match="approx='diag'"):
        KFACPreconditioner(model, kl_clip=None, approx="diag")
    with pytest.raises(ValueError, match="damping_type"):
        KFACPreconditioner(model, kl_clip=None, damping_type="levenberg")
    with pytest.raises(ValueError, match="stats_mode"):
        KFACPreconditioner(model, kl_clip=None, stats_mode="true")
    with pytest.raises(ValueError, match=r"gamma \(γ"):
        KFACPreconditioner(model, kl_clip=None, gamma=-1.0)
    with pytest.raises(ValueError, match="damping_type='factored'"):
        KFACPreconditioner(model, kl_clip=None, approx="tridiag", damping_type="tikhonov")
    with pytest.raises(ValueError, match="unknown loss"):
        KFACPreconditioner(model, kl_clip=None, loss="hinge")
    with pytest.raises(ValueError, match="no module named 'nope'"):
        KFACPreconditioner(model, kl_clip=None, exclude=["nope"])
    with pytest.raises(ValueError, match="unknown setting"):
        pre.configure(learning_rate=0.1)
    with pytest.raises(ValueError, match="stats_fraction"):
        KFACPreconditioner(model, kl_clip=None, stats_fraction=0)
    with pytest.raises(ValueError, match="inverse_update_freq"):
        KFACPreconditioner(model, kl_clip=None, inverse_update_freq=0)
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        KFACPreconditioner(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), kl_clip=None, diagonal=False)
    emp = KFACPreconditioner(model, kl_clip=None, stats_mode="empirical")
    backward(model, x, y)
    with pytest.raises(KFACError, match="y="):
        emp.step()
    assert emp.step(y=y).stats_updated
