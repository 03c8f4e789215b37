"""damping="auto", step 4: γ₀ is the γ grid's own choice (min M(δ) − M(0) at λ₀) over the wide
grid, equal to brute force — one plain K-FAC step per γ; skipped when the user owns γ; recorded,
saved, checked."""
import copy
import math

import pytest

from kfac_lab.optim import KFAC
from kfac_lab.optim.initial_damping import GAMMA_STEPS, gamma_grid
from kfac_lab.optim.state_check import StateError

from .test_distributed import batch, make_model


def _opt(damping="auto", **kw):
    return KFAC(make_model(), "categorical", damping=damping, seed=3, **kw)


def _step(opt, step=1):
    return opt.step(*batch(step, 64, "categorical"))


def test_the_grid_is_the_documented_one():
    grid = gamma_grid(0.01, 1e-5)
    s = math.sqrt(0.01 + 1e-5)
    assert len(grid) == len(GAMMA_STEPS) == 9 and grid[0] == s and grid[-1] == pytest.approx(s * 1e-4)
    assert all(b / a == pytest.approx(10 ** -0.5) for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize("approx, grid", [("blockdiag", "fast"), ("blockdiag", "full"), ("tridiag", "fast"),
                                          ("ekfac", "fast")])
def test_gamma0_is_the_argmin_of_the_model_over_the_wide_grid(approx, grid):
    opt = _opt(approx=approx, gamma_grid=grid)
    info = _step(opt)
    rec = opt.initial_damping
    lam0, gamma0 = rec["damping"], rec["gamma"]
    GAMMA_GRID = gamma_grid(lam0, opt.config.weight_decay)
    assert info.gamma == gamma0 == opt.gamma and gamma0 in GAMMA_GRID
    assert [g for g, _ in rec["gamma_candidates"]] == list(GAMMA_GRID)
    # brute force: a plain K-FAC from λ₀ with γ fixed at each grid value — its first step's model change
    ms = []
    for g in GAMMA_GRID:
        plain = _opt(lam0, approx=approx, gamma=g, adapt_gamma=False, adapt_damping=False)
        ms.append(_step(plain).model_change)
    probed = [m for _, m in rec["gamma_candidates"]]
    if approx == "tridiag":  # ranked by the block-diagonal updates (curvature/grid.py); the step is tridiagonal
        blockdiag = [_step(_opt(lam0, gamma=g, adapt_gamma=False, adapt_damping=False)).model_change for g in GAMMA_GRID]
        assert probed == pytest.approx(blockdiag, rel=1e-5)
        assert info.model_change == pytest.approx(ms[GAMMA_GRID.index(gamma0)], rel=1e-5)
    else:
        assert probed == pytest.approx(ms, rel=1e-5)
    assert gamma0 == GAMMA_GRID[min(range(len(probed)), key=probed.__getitem__)]
    event = [e for e in opt.events if e["kind"] == "initial_damping"]
    assert len(event) == 1 and event[0]["gamma"] == gamma0 and len(event[0]["gamma_candidates"]) == len(GAMMA_GRID)
    # the next refreshes run the paper's three-point grid around γ₀
    for k in range(2, 4):
        _step(opt, k)
    assert [e["kind"] for e in opt.events].count("initial_damping") == 1


def test_a_user_gamma_or_a_frozen_gamma_is_left_alone():
    opt = _opt(gamma=0.5)
    info = _step(opt)
    assert info.gamma == 0.5 and "gamma" not in opt.initial_damping
    opt = _opt(adapt_gamma=False)
    info = _step(opt)
    lam0 = opt.initial_damping["damping"]
    assert info.gamma == pytest.approx(math.sqrt(lam0 + opt.config.weight_decay)) and "gamma" not in opt.initial_damping
    assert opt.events[-1]["kind"] == "initial_damping" and "gamma" not in opt.events[-1]


def test_the_record_is_saved_and_a_damaged_gamma_is_refused():
    opt = _opt(T3=2, T2=2)
    for k in (1, 2):
        _step(opt, k)
    state = opt.state_dict()
    again = _opt(T3=2, T2=2)
    again.load_state_dict(copy.deepcopy(state))
    assert again.initial_damping == opt.initial_damping and again.gamma == opt.gamma
    for bad_value, field in ((-0.1, "gamma"), ("x", "gamma"), ([[1.0]], "gamma_candidates")):
        bad = copy.deepcopy(state)
        bad["initial_damping"][field] = bad_value
        fresh = _opt()
        with pytest.raises(StateError, match="γ₀|gamma_candidates"):
            fresh.load_state_dict(bad)
        assert fresh.k == 0 and fresh.initial_damping is None


def test_live_auto_probes_gamma_again():
    opt = _opt(1.0, T3=2, T2=2)
    for k in (1, 2, 3):
        _step(opt, k)
    opt.configure(damping="auto")
    info = _step(opt, 4)
    rec = opt.initial_damping
    assert rec["step"] == 4 and info.gamma == rec["gamma"] in gamma_grid(rec["damping"], opt.config.weight_decay)


def test_on_an_autoencoder_the_probe_starts_gamma_below_the_papers_start():
    from kfac_lab.train import get_problem

    p = get_problem("tiny")
    opt = KFAC(p.make_model(seed=0), p.loss, damping="auto", seed=0)
    x = p.X[:500]
    info = opt.step(x, x)
    rec = opt.initial_damping
    s = math.sqrt(rec["damping"] + opt.config.weight_decay)
    assert info.gamma == rec["gamma"] < s and rec["gamma"] in gamma_grid(rec["damping"], opt.config.weight_decay)
    values = dict((g, m) for g, m in rec["gamma_candidates"])
    assert values[rec["gamma"]] < values[s]       # a lower model value than the paper's start
