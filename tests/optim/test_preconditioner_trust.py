"""KFACPreconditioner's KL-clipping and adaptive λ, checked against dense matrices built
independently (``inverse.dense()``, ``torch.linalg.inv``), and its handling of non-finite batches."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from kfac_lab.curvature.factors import vec
from kfac_lab.errors import KFACError, NonFiniteError
from kfac_lab.optim.preconditioner import KFACPreconditioner
from kfac_lab.optim.trust import kl_clip_scale, levenberg_marquardt, omega1, reduction_ratio

from .test_preconditioner import backward, classifier, data


def grad_vector(pre):
    """``∇`` of the K-FAC layers in the paper's ordering (vec of ``[∂W | ∂b]`` per layer)."""
    return torch.cat([vec(l.grad_matrix()) for l in pre.layers])


def test_trust_formulas():
    assert kl_clip_scale(1e-4, 1e-3) == 1.0 and kl_clip_scale(1e-3, 1e-3) == 1.0
    assert kl_clip_scale(4e-3, 1e-3) == pytest.approx(0.5) and kl_clip_scale(4e-3, None) == 1.0
    assert kl_clip_scale(0.0, 1e-3) == 1.0
    assert omega1(5) == pytest.approx(0.95**5)
    assert reduction_ratio(0.5, 1.0, -1.0) == 0.5
    assert reduction_ratio(0.5, 1.0, 0.0) == -math.inf and reduction_ratio(math.nan, 1.0, -1.0) == -math.inf
    w = 0.8
    assert levenberg_marquardt(1.0, 0.9, w, 1e-8, 1e8) == 0.8
    assert levenberg_marquardt(1.0, 0.1, w, 1e-8, 1e8) == 1.25
    assert levenberg_marquardt(1.0, 0.5, w, 1e-8, 1e8) == 1.0
    assert levenberg_marquardt(1.0, 0.9, w, 0.9, 1e8) == 0.9 and levenberg_marquardt(1.0, -1, w, 1e-8, 1.1) == 1.1


@pytest.mark.parametrize("approx", ["blockdiag", "tridiag"])
@pytest.mark.parametrize("kappa", [1e-3, 10.0])
def test_kl_clipping_bounds_the_quadratic_term_of_the_step(approx, kappa):
    """``δ = −η ν F̃⁻¹∇``: ν = min(1, sqrt(κ / (η² ∇ᵀF̃⁻¹∇))), and δᵀF̃δ = κ when it bites."""
    model = classifier()
    lr = 0.5
    pre = KFACPreconditioner(model, "categorical", lr=lr, kl_clip=kappa, approx=approx, gamma=0.05,
                             stats_fraction=0.5)
    x, y = data()
    backward(model, x, y)
    info = pre.step()  # builds the factors and the inverse from this batch
    backward(model, x, y)
    g = grad_vector(pre)
    info = pre.step()
    Finv = pre.inverse.dense()
    q = lr**2 * float(g @ Finv @ g)
    assert info.quadratic == pytest.approx(q, rel=1e-10)
    nu = min(1.0, math.sqrt(kappa / q))
    assert info.kl_scale == pytest.approx(nu, rel=1e-12)
    u = grad_vector(pre)
    torch.testing.assert_close(u, nu * (Finv @ g), rtol=1e-10, atol=1e-14)
    delta = -lr * u
    quad = float(delta @ torch.linalg.solve(Finv, delta))
    if kappa < 1:
        assert nu < 1 and quad == pytest.approx(kappa, rel=1e-8)
    else:
        assert nu == 1.0 and quad < kappa


def test_clipping_never_changes_a_step_below_the_threshold():
    """Clipping on, a step below κ: the gradients are bit for bit those of clipping off."""
    x, y = data()
    results = []
    for kl_clip in (None, 1e-3):
        model = classifier()
        pre = KFACPreconditioner(model, "categorical", lr=1e-3, kl_clip=kl_clip, gamma=0.05, inverse_update_freq=2)
        infos = []
        for _ in range(4):
            backward(model, x, y)
            infos.append(pre.step())
        results.append(([p.grad.clone() for p in model.parameters()], infos))
    (off, _), (on, infos) = results
    assert all(i.kl_scale == 1.0 and 0 < i.quadratic < 1e-3 for i in infos)
    assert all(torch.equal(a, b) for a, b in zip(off, on))


def test_learning_rate_from_the_optimizer_param_groups():
    """Per-group rates and schedulers are followed: q = Σ_l η_l² ⟨F̃⁻¹∇_l, ∇_l⟩ (block-diagonal)."""
    model = classifier()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.2},
                           {"params": list(model[2].parameters()) + list(model[4].parameters())}], lr=0.05)
    pre = KFACPreconditioner(model, "categorical", lr=opt, kl_clip=1e-4, gamma=0.05)
    x, y = data()
    for step in range(2):
        backward(model, x, y)
        g = [vec(l.grad_matrix()) for l in pre.layers]
        info = pre.step()
        Finv = pre.inverse.dense()
        sizes = [len(t) for t in g]
        blocks = torch.split(Finv @ torch.cat(g), sizes)
        rates = [0.2, 0.05, 0.05] if step == 0 else [0.02, 0.005, 0.005]
        q = sum(r * r * float(b @ t) for r, b, t in zip(rates, blocks, g))
        assert info.quadratic == pytest.approx(q, rel=1e-10)
        u = torch.cat([vec(l.grad_matrix()) for l in pre.layers])
        delta = -torch.cat([r * b for r, b in zip(rates, torch.split(u, sizes))])
        assert float(delta @ torch.linalg.solve(Finv, delta)) == pytest.approx(1e-4, rel=1e-8)
        for group in opt.param_groups:  # as an LR scheduler would
            group["lr"] /= 10
    pre.configure(lr=lambda k: 1e-6)  # a callable step -> lr, live
    backward(model, x, y)
    assert pre.step().kl_scale == 1.0


def test_learning_rate_errors():
    model = classifier()
    with pytest.raises(ValueError, match=r"needs the learning rate.*lr=<your torch optimizer>.*kl_clip=None"):
        KFACPreconditioner(model, "categorical")
    with pytest.raises(ValueError, match=r"adaptive damping needs the learning rate"):
        KFACPreconditioner(model, "categorical", kl_clip=None, adaptive_damping=True)
    other = torch.optim.SGD(classifier(1).parameters(), lr=0.1)
    with pytest.raises(KFACError, match=r"does not train layer '0'"):
        KFACPreconditioner(model, "categorical", lr=other)
    with pytest.raises(ValueError, match="lr must be your optimizer's learning rate"):
        KFACPreconditioner(model, "categorical", lr=-0.1)
    with pytest.raises(ValueError, match="kl_clip must be a positive number"):
        KFACPreconditioner(model, "categorical", lr=0.1, kl_clip=0)
    pre = KFACPreconditioner(model, "categorical", lr=0.1)
    with pytest.raises(ValueError, match="needs the learning rate"):
        pre.configure(lr=None)
    with pytest.raises(KFACError, match="does not train layer"):
        pre.configure(lr=other)
    pre.configure(kl_clip=None)
    pre.configure(lr=None)  # clipping off: no learning rate needed
    backward(model, *data())
    assert pre.step().quadratic is None and pre.config["kl_clip"] is None
    with pytest.raises(ValueError, match=r"lr\(0\) returned nan"):
        KFACPreconditioner(model, "categorical", lr=lambda k: float("nan"))
    pre = KFACPreconditioner(model, "categorical", lr=lambda k: 0.1 if k < 1 else -1.0)
    backward(model, *data())
    pre.step()
    backward(model, *data())
    with pytest.raises(ValueError, match=r"lr\(1\) returned -1.0"):
        pre.step()


def test_adaptive_damping_follows_the_levenberg_marquardt_rule():
    """ρ from independently computed h and M (dense F̃_γ), λ = γ² moved by ω₁ = (19/20)^T₁;
    the parameters are restored bit for bit after the trial step."""
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    pre = KFACPreconditioner(model, "categorical", lr=opt, kl_clip=None, adaptive_damping=True,
                             damping_update_freq=2, gamma=0.05, inverse_update_freq=1, stats_fraction=0.5)
    omega = (19 / 20) ** 2
    rhos = []
    for step in range(8):
        x, y = data(step)
        backward(model, x, y)
        before = [p.detach().clone() for p in model.parameters()]
        g = grad_vector(pre)
        gamma = pre.gamma()
        lr = opt.param_groups[0]["lr"] = 0.03 if step < 4 else 1.5  # short steps: ρ ≈ 1; long ones: ρ small
        info = pre.step(closure=lambda: F.cross_entropy(model(x), y))
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        if step % 2 == 0:
            assert info.rho is None and info.adapted_gamma is None and pre.gamma() == gamma
        else:
            Finv = pre.inverse.dense()
            delta = -lr * (Finv @ g)
            M = float(g @ delta + 0.5 * delta @ torch.linalg.solve(Finv, delta))
            with torch.no_grad():
                h0 = F.cross_entropy(model(x), y).item()
                moved, pos = dict(model.named_parameters()), 0
                for l in pre.layers:
                    w = l.module.weight
                    n = w.numel() + w.shape[0]
                    dW = delta[pos:pos + n].reshape(w.shape[1] + 1, w.shape[0]).t()  # unvec: columns stacked
                    moved[f"{l.name}.weight"] = w + dW[:, :-1]
                    moved[f"{l.name}.bias"] = l.module.bias + dW[:, -1]
                    pos += n
                h1 = F.cross_entropy(torch.func.functional_call(model, moved, (x,)), y).item()
            rho = (h1 - h0) / M
            assert info.rho == pytest.approx(rho, rel=1e-8)
            lam = gamma**2 * (omega if rho > 0.75 else 1 / omega if rho < 0.25 else 1.0)
            assert info.adapted_gamma == pytest.approx(math.sqrt(lam), rel=1e-12) and pre.gamma() == info.adapted_gamma
            rhos.append(rho)
        opt.step()
    assert any(r > 0.75 for r in rhos) and any(r < 0.25 for r in rhos)  # both branches of the rule
    backward(model, *data())
    assert pre.step(closure=lambda: 1.0).inverses_refreshed  # the new γ is in use from the next step


def test_adaptive_damping_errors_leave_the_model_as_it_was():
    model = classifier()
    x, y = data()
    with pytest.raises(ValueError, match="give gamma as a number"):
        KFACPreconditioner(model, "categorical", lr=0.1, adaptive_damping=True, gamma=lambda k: 0.1)
    pre = KFACPreconditioner(model, "categorical", lr=0.1, adaptive_damping=True, damping_update_freq=1)
    backward(model, x, y)
    with pytest.raises(KFACError, match=r"pass pre.step\(closure="):
        pre.step()

    def with_backward():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    def zeroing():
        model.zero_grad()
        return F.cross_entropy(model(x), y)

    params = [p.detach().clone() for p in model.parameters()]
    for closure, match in ((with_backward, "ran backward"), (lambda: torch.ones(2), "1-element tensor"),
                           (lambda: "loss", "got str"), (zeroing, "changed the gradients")):
        backward(model, x, y)
        with pytest.raises(KFACError, match=match):
            pre.step(closure=closure)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_non_finite_batch_is_rejected_and_the_factors_stay_finite():
    """A NaN batch: a warning, every .grad None (SGD with momentum then leaves the parameters and its
    buffers alone), factors and step count unchanged; training goes on with the next batch."""
    model = classifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre = KFACPreconditioner(model, "categorical", lr=opt, gamma=0.05)
    x, y = data()
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"step 1 rejected \(non-finite gradient"):  # no factors yet either
        backward(model, bad, y)
        info = pre.step()
    assert info.rejected and pre.steps == 0 and pre.factors.k == 0 and pre.inverse is None
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
    A = {k: v.clone() for k, v in pre.factors.A.items()}
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    for value in (float("nan"), float("inf")):
        bad = x.clone()
        bad[0, 0] = value
        opt.zero_grad()
        F.cross_entropy(model(bad), y).backward()
        with pytest.warns(RuntimeWarning, match="step 3 rejected"):
            info = pre.step()
        opt.step()
        assert info.rejected and "non-finite gradient" in info.reason and pre.steps == 2
        assert all(p.grad is None for p in model.parameters())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
        assert all(torch.equal(opt.state[p]["momentum_buffer"], b) for p, b in zip(model.parameters(), buffers))
        assert all(torch.equal(pre.factors.A[k], A[k]) for k in A) and pre.factors.k == 2
    assert [e["kind"] for e in pre.events].count("rejected") == 3
    backward(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        info = pre.step()
    assert not info.rejected and info.step == 3 and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.isfinite(t).all() for t in pre.factors.A.values())


def test_non_finite_statistics_alone_keep_the_previous_factors():
    """Finite gradients but a non-finite statistics batch (x= given): the factors are kept, the step is taken."""
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", lr=0.1, gamma=0.05)
    x, y = data()
    backward(model, x, y)
    pre.step()
    A = {k: v.clone() for k, v in pre.factors.A.items()}
    backward(model, x, y)
    with pytest.warns(RuntimeWarning, match="kept the previous factors"):
        info = pre.step(x=torch.full_like(x, float("nan")))
    assert not info.rejected and not info.stats_updated and info.step == 2
    assert all(torch.equal(pre.factors.A[k], A[k]) for k in A)


def test_rejections_in_a_row_raise():
    model = classifier()
    pre = KFACPreconditioner(model, "categorical", lr=0.1, max_rejections=3)
    x, y = data()
    x[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            backward(model, x, y)
            assert pre.step().rejected
        backward(model, x, y)
        with pytest.raises(NonFiniteError, match="rejected 3 steps in a row.*check the batches for NaN"):
            pre.step()
    with pytest.raises(ValueError, match="max_rejections"):
        KFACPreconditioner(model, "categorical", lr=0.1, max_rejections=0)

