"""The γ grid through Cholesky solves (``gamma_grid="fast"``, curvature/grid.py) against the three
full inverses (``"full"``, the paper's way), and the adjacent cross factors collected only while
``approx="tridiag"`` is selected (estimated from the batch of a live switch)."""
import copy
import warnings

import pytest
import torch
from torch import nn

from kfac_lab.curvature import batch_factors
from kfac_lab.curvature.grid import CholeskyCandidates
from kfac_lab.curvature.inverses import BlockDiagonalInverse, BlockTridiagonalInverse
from kfac_lab.optim import KFAC

DT = torch.float64


def net(sizes=(6, 7, 5, 3), seed=0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).to(DT)


def batch(step, m=48):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(m, 6, dtype=DT, generator=g), torch.randint(0, 3, (m,), generator=g)


def spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * d, d, dtype=DT, generator=g)
    return X.t() @ X / (2 * d)


def test_cholesky_candidates_apply_the_damped_block_diagonal_inverse():
    A, G = [spd(5, 0), spd(4, 1)], [spd(3, 2), spd(6, 3)]
    V = [torch.randn(3, 5, dtype=DT), torch.randn(2, 6, 4, dtype=DT)]  # a leading batch dim on the second
    cands = CholeskyCandidates(A, G, [0.3, 1.0])
    for c, gamma in enumerate([0.3, 1.0]):
        ref = BlockDiagonalInverse(A, G, gamma)
        for u, w in zip(cands[c].apply(V), ref.apply(V)):
            torch.testing.assert_close(u, w, rtol=1e-10, atol=1e-12)
        built = cands[c].inverse()  # the explicit inverse from the factors it holds: the same as building it
        for x, y in zip(built.A_inv + built.G_inv, ref.A_inv + ref.G_inv):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
        dense = torch.linalg.inv(torch.block_diag(*[torch.kron(a + p * gamma * torch.eye(a.shape[0], dtype=DT),
                                                               g + gamma / p * torch.eye(g.shape[0], dtype=DT))
                                                    for a, g, p in zip(A, G, ref.pi)]))
        torch.testing.assert_close(built.dense(), dense, rtol=1e-8, atol=1e-10)


def run(approx, grid, steps=24, **kw):
    model = net()
    opt = KFAC(model, "categorical", approx=approx, gamma_grid=grid, damping=1.0, T1=3, T2=4, T3=4, **kw)
    infos = [opt.step(*batch(k)) for k in range(steps)]
    return opt, infos, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("approx", ["blockdiag", "tridiag"])
def test_fast_grid_picks_the_gamma_of_the_full_grid(approx):
    (_, fast, v_fast), (_, full, v_full) = run(approx, "fast"), run(approx, "full")
    grids = [(f.gamma_grid, g.gamma_grid) for f, g in zip(fast, full) if g.gamma_grid]
    assert len(grids) == 6
    assert [f.gamma for f in fast] == pytest.approx([g.gamma for g in full], rel=1e-12)  # the same γ every step
    if approx == "blockdiag":  # the same candidates' updates, by solves instead of explicit inverses
        for f, g in grids:
            assert [m for _, m in f] == pytest.approx([m for _, m in g], rel=1e-8)
    # the γ chosen was not always the middle one: the grid decided something
    assert len({round(f.gamma / prev.gamma, 6) for prev, f in zip(fast, fast[1:]) if f.gamma_grid}) > 1
    assert [f.model_change for f in fast] == pytest.approx([g.model_change for g in full], rel=1e-7)
    torch.testing.assert_close(v_fast, v_full, rtol=1e-8, atol=1e-10)


def test_fast_grid_builds_one_inverse_per_refresh(monkeypatch):
    built = []
    for cls in (BlockDiagonalInverse, BlockTridiagonalInverse):
        real = cls.__init__

        def counting(self, *a, _real=real, **kw):
            built.append(type(self).__name__)
            _real(self, *a, **kw)
        monkeypatch.setattr(cls, "__init__", counting)
    for approx, name in (("blockdiag", "BlockDiagonalInverse"), ("tridiag", "BlockTridiagonalInverse")):
        built.clear()
        opt, infos, _ = run(approx, "fast", steps=8)
        refreshes = sum(i.inverses_refreshed for i in infos)
        assert built == [name] * refreshes  # steps 1-3, 4 and 8 (grids): one inverse each
        built.clear()
        run(approx, "full", steps=8)
        assert len(built) == refreshes + 2 * 2  # the full grid: three at each of the 2 grid steps


def test_gamma_grid_setting_is_checked():
    with pytest.raises(ValueError, match="gamma_grid"):
        KFAC(net(), "categorical", gamma_grid="fastest")


# ------------------------------------------------------------------ the adjacent factors on demand

def steps(opt, ks):
    return [opt.step(*batch(k)) for k in ks]


def test_cross_factors_collected_only_while_tridiag_and_estimated_at_a_switch():
    model = net()
    opt = KFAC(model, "categorical", damping=1.0, T1=3, T2=4, T3=4)
    steps(opt, range(6))
    assert opt.factors.pairs == [(0, 0), (1, 1), (2, 2)] and (0, 1) not in opt.factors.A
    opt.configure(approx="tridiag")
    x, y = batch(6)
    n1 = max(1, round(x.shape[0] / 8))
    with torch.no_grad():  # ā of the statistics rows before the step: A_{i,i+1} comes from this batch alone
        acts = []
        hooks = [l.module.register_forward_pre_hook(lambda m, a: acts.append(a[0][:n1])) for l in opt.layers]
        model(x)
        for h in hooks:
            h.remove()
    a = [torch.cat([t, torch.ones(n1, 1, dtype=DT)], 1) for t in acts]
    A_batch, _ = batch_factors(a, [torch.zeros(n1, 1, dtype=DT)] * 3, [(0, 1), (1, 2)])
    diag_before = opt.factors.A[(0, 0)].clone()
    loss_before = opt.step(x, y)
    assert loss_before.approx == "tridiag" and loss_before.inverses_refreshed and not loss_before.rejected
    assert isinstance(opt.curvature.inverse, BlockTridiagonalInverse)
    for key in ((0, 1), (1, 2)):
        torch.testing.assert_close(opt.factors.A[key], A_batch[key], rtol=1e-12, atol=1e-14)
        assert torch.isfinite(opt.factors.G[key]).all()
    assert not torch.equal(opt.factors.A[(0, 0)], diag_before)  # the diagonal ones kept averaging
    later = [opt.step(x, y) for _ in range(12)]  # on the switch's batch: its loss goes down
    assert all(torch.isfinite(torch.tensor([i.loss, i.alpha, i.mu])).all() for i in later)
    assert later[0].loss < loss_before.loss and later[-1].loss < 0.9 * loss_before.loss
    opt.configure(approx="blockdiag")  # back: the adjacent factors are dropped
    info = opt.step(*batch(20))
    assert info.approx == "blockdiag" and (0, 1) not in opt.factors.A
    assert isinstance(opt.curvature.inverse, BlockDiagonalInverse)


@pytest.mark.parametrize("reject", [False, True])
def test_state_dict_resumes_bit_for_bit_across_a_switch(reject):
    """Saved after the switch's step (or after that step was rejected, before any adjacent factor
    exists), loaded into a fresh optimizer: the rest of the run is the same, bit for bit."""
    model = net()
    opt = KFAC(model, "categorical", damping=1.0, T1=3, T2=4, T3=4)
    steps(opt, range(5))
    opt.configure(approx="tridiag")
    x, y = batch(5)
    if reject:
        x = x.clone()
        x[0, 0] = float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert opt.step(x, y).rejected
        assert (1, 2) in opt.factors.pairs and (0, 1) not in opt.factors.A
    else:
        opt.step(x, y)
    state = copy.deepcopy(opt.state_dict())
    twin = net(seed=9)
    twin.load_state_dict(model.state_dict())
    resumed = KFAC(twin, "categorical", damping=1.0, T1=3, T2=4, T3=4)
    resumed.load_state_dict(state)
    a, b = steps(opt, range(6, 14)), steps(resumed, range(6, 14))
    assert [i.loss for i in a] == [i.loss for i in b] and [i.gamma for i in a] == [i.gamma for i in b]
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
    for key in opt.factors.A:
        assert torch.equal(opt.factors.A[key], resumed.factors.A[key]) and torch.equal(opt.factors.G[key],
                                                                                      resumed.factors.G[key])
    assert (0, 1) in resumed.factors.A and a[-1].approx == "tridiag"


def test_cross_factors_true_keeps_their_running_average_across_a_switch():
    opt = KFAC(net(), "categorical", damping=1.0, cross_factors=True)
    steps(opt, range(3))
    kept = opt.factors.A[(0, 1)].clone()
    opt.configure(approx="tridiag")
    opt.step(*batch(3))
    eps = opt.factors.epsilon(opt.factors.k)  # the update just done blended into the kept average
    assert eps > 0 and not torch.equal(opt.factors.A[(0, 1)], kept)
    with pytest.raises(TypeError, match="cross_factors"):
        KFAC(net(), "categorical", cross_factors="sometimes")


def test_a_state_saved_with_the_adjacent_factors_always_kept_resumes():
    """States saved before cross_factors="auto" (they hold cross_factors=True and the adjacent
    factors under blockdiag) load into a default optimizer and resume bit for bit."""
    model = net()
    opt = KFAC(model, "categorical", damping=1.0, T1=3, T2=4, T3=4, cross_factors=True)
    steps(opt, range(5))
    twin = net(seed=4)
    twin.load_state_dict(model.state_dict())
    resumed = KFAC(twin, "categorical", damping=1.0, T1=3, T2=4, T3=4)
    resumed.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert resumed.config.cross_factors is True and (0, 1) in resumed.factors.A
    a, b = steps(opt, range(5, 9)), steps(resumed, range(5, 9))
    assert [i.loss for i in a] == [i.loss for i in b]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
