"""approx="ekfac" in the optimizers: the engine's running scales (EMA, carried across bases), resume bit
for bit, live switching, damaged states refused, training (float64, tiny problems)."""
import io
import warnings

import pytest
import torch
from torch import nn

from kfac_lab.curvature.ekfac import EKFACInverse, projected_moments, rotate
from kfac_lab.curvature.inverses import BlockDiagonalInverse, BlockTridiagonalInverse
from kfac_lab.optim import KFAC, KFACPreconditioner
from kfac_lab.optim.state_check import StateError

from .test_kfac import current_vector, data, net

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


def test_engine_scales_are_the_ema_of_projected_moments_carried_across_bases():
    """By hand through the engine: refresh on steps 1 and 3 only; the scales are ε_k-blended
    projected second moments in the basis in use, the running value rotated at the refresh."""
    model = net()
    opt = KFAC(model, "categorical", approx="ekfac", ema_decay=0.6)
    eng = opt.curvature
    batches = [data(m=24, seed=s) for s in range(4)]
    want, basis = None, None
    for k, (x, y) in enumerate(batches, start=1):
        a, g = eng.statistics(x, y, "empirical")
        eng.update_factors((a, g))
        if k in (1, 3):
            eng.adopt(eng.refresh("ekfac", [1.0], "factored")[0], 1.0)
            new = eng.ekfac.basis
            if want is not None:
                want = [rotate(s, o, n) for s, o, n in zip(want, basis, new)]
            basis = new
        eng.update_scales()
        batch = [projected_moments(ai, gi, b) for ai, gi, b in zip(a, g, basis)]
        eps = min(1 - 1 / k, 0.6)
        want = batch if want is None else [eps * w + (1 - eps) * b for w, b in zip(want, batch)]
        for s, w in zip(eng.ekfac.scales, want):
            torch.testing.assert_close(s, w, rtol=1e-12, atol=1e-15)
    assert eng.ekfac.k == 4 and isinstance(eng.inverse, EKFACInverse)


def _kfac(model, **kw):
    return KFAC(model, "categorical", approx="ekfac", T1=2, T2=4, T3=4, **kw)


def test_kfac_resume_is_bit_for_bit():
    x, y = data(m=48)
    model = net()
    opt = _kfac(model)
    for _ in range(6):
        opt.step(x, y)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    later = [opt.step(x, y) for _ in range(6)]  # refreshes (step 8, 12) and the γ grid (step 8, 12) included
    final = current_vector(model)

    model2 = net(seed=5)
    model2.load_state_dict(saved)
    opt2 = _kfac(model2)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert isinstance(opt2.curvature.inverse, EKFACInverse) and opt2.curvature.ekfac.k == 6
    again = [opt2.step(x, y) for _ in range(6)]
    assert torch.equal(current_vector(model2), final)
    assert [(i.alpha, i.mu, i.damping, i.gamma) for i in again] == [(i.alpha, i.mu, i.damping, i.gamma) for i in later]


def test_preconditioner_resume_is_bit_for_bit():
    x, y = data(m=48)

    def run(model, pre, sgd, steps):
        for _ in range(steps):
            sgd.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()

    def make(model):
        sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return KFACPreconditioner(model, "categorical", approx="ekfac", lr=sgd, gamma=0.1,
                                  inverse_update_freq=3), sgd

    model = net()
    pre, sgd = make(model)
    run(model, pre, sgd, 4)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "pre": pre.state_dict(), "sgd": sgd.state_dict()}, buf)
    run(model, pre, sgd, 5)
    final = current_vector(model)
    model2 = net(seed=7)
    pre2, sgd2 = make(model2)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    model2.load_state_dict(state["model"])
    sgd2.load_state_dict(state["sgd"])
    pre2.load_state_dict(state["pre"])
    run(model2, pre2, sgd2, 5)
    assert torch.equal(current_vector(model2), final)


def test_live_switch_takes_effect_at_the_next_step():
    x, y = data(m=40)
    opt = KFAC(net(), "categorical", approx="blockdiag", T3=20, T2=20)
    kinds = []
    for approx in ("blockdiag", "ekfac", "ekfac", "tridiag", "ekfac"):
        opt.configure(approx=approx)
        info = opt.step(x, y)
        kinds.append((info.approx, type(opt.curvature.inverse).__name__, info.inverses_refreshed))
    assert kinds == [("blockdiag", "BlockDiagonalInverse", True), ("ekfac", "EKFACInverse", True),
                     ("ekfac", "EKFACInverse", True), ("tridiag", "BlockTridiagonalInverse", True),
                     ("ekfac", "EKFACInverse", True)]
    # the scales started again when EKFAC came back (their old basis is gone)
    assert opt.curvature.ekfac.k == 1
    opt.step(x, y)
    opt.step(x, y)  # k = 7: no refresh, the scales still re-estimated
    assert opt.curvature.ekfac.k == 3


def test_preconditioner_switches_live():
    x, y = data(m=40)
    model = net()
    pre = KFACPreconditioner(model, "categorical", approx="tridiag", gamma=0.1, kl_clip=None, inverse_update_freq=50)
    types = []
    for approx in ("tridiag", "ekfac", "blockdiag"):
        pre.configure(approx=approx)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert pre.step().inverses_refreshed
        types.append(type(pre.curvature.inverse))
    assert types == [BlockTridiagonalInverse, EKFACInverse, BlockDiagonalInverse]
    assert pre.curvature.ekfac is None


@pytest.mark.parametrize("damage,match", [
    (lambda e: e["basis"][0].__setitem__(1, e["basis"][0][1] * 2), "not orthonormal"),
    (lambda e: e["scales"].__setitem__(1, -e["scales"][1]), "negative"),
    (lambda e: e["scales"].__setitem__(0, e["scales"][0][:, :-1]), "shape"),
    (lambda e: e.__setitem__("scales", None), "no scales"),
    (lambda e: e.__setitem__("basis", None), "no eigenbasis"),
    (lambda e: e.__setitem__("basis", e["basis"][:1]), "one entry per layer"),
])
def test_damaged_ekfac_state_is_refused_and_nothing_changes(damage, match):
    x, y = data(m=40)
    opt = _kfac(net())
    for _ in range(2):
        opt.step(x, y)
    state = opt.state_dict()
    state["ekfac"] = {k: (None if v is None else [list(b) if isinstance(b, list) else b.clone() for b in v])
                      if k != "k" else v for k, v in state["ekfac"].items()}
    damage(state["ekfac"])
    other = _kfac(net(seed=3))
    other.step(x, y)
    before = (other.curvature.ekfac, other.curvature.inverse, other.k)
    with pytest.raises(StateError, match=match):
        other.load_state_dict(state)
    assert (other.curvature.ekfac, other.curvature.inverse, other.k) == before


def test_states_saved_before_ekfac_still_load():
    x, y = data(m=40)
    opt = KFAC(net(), "categorical", approx="blockdiag")
    opt.step(x, y)
    state = opt.state_dict()
    del state["ekfac"]
    KFAC(net(), "categorical").load_state_dict(state)


def test_ekfac_trains_and_refuses_nothing_the_others_take():
    x, _ = data(m=128)
    y = (x @ torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=DT)).argmax(1)  # learnable labels
    losses = {}
    for approx in ("blockdiag", "ekfac"):
        model = net()
        opt = KFAC(model, "categorical", approx=approx, damping=1.0, cross_factors=False, damping_type="tikhonov")
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no rejected step
            infos = [opt.step(x, y) for _ in range(25)]
        losses[approx] = infos[-1].loss
        assert infos[-1].loss < 0.5 * infos[0].loss, approx
    assert losses["ekfac"] < 1.2 * losses["blockdiag"]


def test_approx_is_validated():
    with pytest.raises(ValueError, match="'ekfac'"):
        KFAC(net(), "categorical", approx="eigen")
    with pytest.raises(ValueError, match="ekfac"):
        KFACPreconditioner(net(), "categorical", approx="eigen")


def test_preconditioner_switching_to_ekfac_between_statistics_starts_from_kfac():
    """A refresh with no statistics in that step (factor_update_freq > 1): EKFAC's scales start as
    K-FAC's eigenvalues in the new basis (so the first step equals K-FAC's exact-Tikhonov one),
    and the next statistics replace them."""
    x, y = data(m=40)
    model = net()
    pre = KFACPreconditioner(model, "categorical", approx="blockdiag", gamma=0.1, kl_clip=None, factor_update_freq=5,
                             damping_type="tikhonov")

    def step():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return pre.step()

    step()
    step()
    pre.configure(approx="ekfac")
    V = [l.grad_matrix().clone() for l in pre.layers]  # the gradients of the step about to be preconditioned
    info = step()
    assert not info.stats_updated and info.inverses_refreshed and pre.curvature.ekfac.k == 0
    kfac = BlockDiagonalInverse(pre.curvature.inputs["A"], pre.curvature.inputs["G"], 0.1, "tikhonov")
    for u, w in zip(pre.curvature.inverse.apply(V), kfac.apply(V)):
        torch.testing.assert_close(u, w)
    for _ in range(3):
        step()
    assert pre.curvature.ekfac.k == 1  # step 6: statistics, the first scale update
