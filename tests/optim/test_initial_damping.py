"""damping="auto": the probe's ρ agrees with the plain K-FAC step's own ρ at each λ, the rule picks
λ₀ from them as documented, deterministically; resumes bit for bit; live re-probe; validation."""
import copy
import math

import pytest
import torch

from kfac_lab.optim.state_check import StateError
from kfac_lab.optim import KFAC
from kfac_lab.optim.initial_damping import GRID, bisect, gamma_grid

from .test_distributed import DT, batch, make_model


def _opt(damping="auto", **kw):
    return KFAC(make_model(), "categorical", damping=damping, seed=3, **kw)


def _run(opt, steps, first=1):
    infos = []
    for step in range(first, first + steps):
        infos.append(opt.step(*batch(step, 64, "categorical")))
    return infos


@pytest.mark.parametrize("approx", ["blockdiag", "tridiag"])
def test_probe_rho_is_the_plain_steps_rho_and_the_rule_picks_from_it(approx):
    opt = _opt(approx=approx)
    info = _run(opt, 1)[0]
    rec = opt.initial_damping
    table = rec["candidates"]
    lams = [c["damping"] for c in table]
    assert 1 <= len(table) <= 4 and lams == sorted(lams, reverse=True) and set(lams) <= set(GRID)  # bisection
    assert rec["damping"] in GRID and info.damping == rec["damping"] == opt.damping
    assert opt.events[-1]["kind"] == "initial_damping" and opt.events[-1]["damping"] == rec["damping"]
    # brute force: a plain KFAC at each probed λ, evaluating ρ on its first step (T1 = 1), gives the probe's ρ
    for c in table:
        plain = _opt(c["damping"], approx=approx, T1=1, adapt_gamma=False)
        ref = _run(plain, 1)[0]
        assert ref.rho == pytest.approx(c["rho"], rel=1e-6, abs=1e-9), c["damping"]
        assert ref.alpha == pytest.approx(c["alpha"], rel=1e-9)
    # the rule: ρ ≥ 3/4 at λ₀ and < 3/4 at the next smaller grid λ (probed), and, ρ being monotone here,
    # the same λ₀ as walking down the whole grid
    rho = {c["damping"]: c["rho"] for c in table}
    i = GRID.index(rec["damping"])
    assert rho[GRID[i]] >= 0.75 and (i + 1 == len(GRID) or rho[GRID[i + 1]] < 0.75)
    full = [_run(_opt(lam, approx=approx, T1=1, adapt_gamma=False), 1)[0].rho for lam in GRID]
    if all(a >= b for a, b in zip(full, full[1:])):
        first_low = next((j for j, r in enumerate(full) if r < 0.75), len(full))
        assert rec["damping"] == GRID[max(first_low - 1, 0)]
    # deterministic: a fresh optimizer on the same batch chooses the same, bit for bit
    again = _opt(approx=approx)
    _run(again, 1)
    assert again.initial_damping == rec


def _walk_down(rhos):
    first_low = next((j for j, r in enumerate(rhos) if r < 0.75), len(rhos))
    return max(first_low - 1, 0)


@pytest.mark.parametrize("rhos", [[2.0, 1.9, 0.8, 0.5, 0.4, 0.3, 0.2, 0.1], [0.1] * 8, [1.0] * 8,
                                  [1.0, 0.9, 0.8, 0.76, 0.74, -1, float("-inf"), -5],
                                  [2, 2, 2, 2, 2, 2, 2, 0.7], [0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]])
def test_bisection_is_the_walk_down_on_monotone_rho_in_at_most_4_probes(rhos):
    asked = []
    i = bisect(lambda j: asked.append(j) or rhos[j], len(rhos))
    assert i == _walk_down(rhos) and len(asked) <= 4 and len(set(asked)) == len(asked)


def test_bisection_on_non_monotone_rho_finds_a_crossing():
    rhos = [2.0, 0.5, 0.9, 0.8, 0.3, 1.0, 0.2, 0.1]
    asked = {}
    i = bisect(lambda j: asked.setdefault(j, rhos[j]), len(rhos))
    assert rhos[i] >= 0.75 and rhos[i + 1] < 0.75 and i + 1 in asked


def test_paper_default_is_unchanged():
    opt = _opt(150.0)
    _run(opt, 2)
    assert opt.initial_damping is None and opt.settings()["damping"] == 150.0
    assert KFAC(make_model(), "categorical").config.damping == 150.0
    assert not any(e["kind"] == "initial_damping" for e in opt.events)


@pytest.mark.parametrize("at", [0, 1, 3])
def test_resume_before_during_and_after_the_probe_is_bit_for_bit(at):
    ref_model = make_model()
    ref = KFAC(ref_model, "categorical", damping="auto", seed=3, T3=2, T2=2)
    ref_infos = _run(ref, 5)
    model = make_model()
    opt = KFAC(model, "categorical", damping="auto", seed=3, T3=2, T2=2)
    infos = _run(opt, at)
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model2 = make_model(seed=9)
    model2.load_state_dict(weights)
    opt2 = KFAC(model2, "categorical", damping="auto", seed=3, T3=2, T2=2)
    opt2.load_state_dict(state)
    infos += _run(opt2, 5 - at, first=at + 1)
    assert [(i.loss, i.damping, i.alpha, i.mu) for i in infos] == [(i.loss, i.damping, i.alpha, i.mu) for i in ref_infos]
    assert all(torch.equal(p, q) for p, q in zip(model2.parameters(), ref_model.parameters()))
    assert opt2.initial_damping == ref.initial_damping


def test_live_auto_reprobes_and_a_number_ends_it():
    opt = _opt(1.0, T3=2, T2=2)
    _run(opt, 3)
    assert opt.initial_damping is None
    opt.configure(damping="auto")
    info = _run(opt, 1, first=4)[0]
    assert opt.initial_damping["step"] == 4 and info.damping == opt.initial_damping["damping"]
    kinds = [e["kind"] for e in opt.events]
    assert kinds[-2:] == ["configure", "initial_damping"]
    _run(opt, 1, first=5)  # no second probe
    assert [e["kind"] for e in opt.events].count("initial_damping") == 1
    opt.configure(damping=30.0)
    assert _run(opt, 1, first=6)[0].damping == 30.0


@pytest.mark.parametrize("bad, error", [("Auto", TypeError), ("150", TypeError), (None, TypeError), (-1.0, ValueError),
                                        (math.inf, ValueError)])
def test_bad_damping_names_auto(bad, error):
    with pytest.raises(error, match="'auto'"):
        _opt(bad)
    opt = _opt(1.0)
    with pytest.raises(error, match="'auto'"):
        opt.configure(damping=bad)


def test_states_without_the_record_load_and_a_damaged_record_is_refused():
    opt = _opt()
    _run(opt, 2)
    state = opt.state_dict()
    old = copy.deepcopy(state)
    del old["initial_damping"]                       # a state saved before damping="auto" existed
    other = _opt(1.0)
    other.load_state_dict(old)
    assert other.initial_damping is None and other.k == 2
    bad = copy.deepcopy(state)
    bad["initial_damping"]["damping"] = -1.0
    fresh = _opt()
    with pytest.raises(StateError, match="initial_damping"):
        fresh.load_state_dict(bad)
    assert fresh.k == 0 and fresh.initial_damping is None          # nothing loaded


def test_probe_follows_the_model_dtype():
    opt = _opt()
    _run(opt, 1)
    assert all(p.dtype == DT for p in opt.model.parameters())
    assert all(isinstance(c["rho"], float) for c in opt.initial_damping["candidates"])


def test_a_probe_whose_inverses_all_fail_starts_from_the_paper_lambda(monkeypatch):
    from kfac_lab.errors import DecompositionError

    opt = _opt()
    real, real_grid, calls = opt.curvature.refresh, opt.curvature.grid_candidates, []

    def refresh(approx, gammas, damping_type=None):
        calls.append(gammas)
        if opt.initial_damping is None:  # every candidate of the probe
            raise DecompositionError("factor not positive definite (injected)")
        return real(approx, gammas, damping_type)

    def grid_candidates(approx, gammas):
        calls.append(gammas)
        if opt.initial_damping is None:
            raise DecompositionError("factor not positive definite (injected)")
        return real_grid(approx, gammas)

    monkeypatch.setattr(opt.curvature, "refresh", refresh)
    monkeypatch.setattr(opt.curvature, "grid_candidates", grid_candidates)
    info = _run(opt, 1)[0]
    # ≤ 4 probes of one candidate each, then the step's γ₀ grid at the paper's λ₀
    assert [len(g) for g in calls[:-1]] == [1] * (len(calls) - 1) and 1 <= len(calls) - 1 <= 4
    assert len(calls[-1]) == 9 and opt.initial_damping["gamma"] in calls[-1]
    assert opt.initial_damping["damping"] == 150.0 and "probe failed" in opt.initial_damping["rule"]
    assert all("failed" in c for c in opt.initial_damping["candidates"])
    assert info.damping == 150.0 and not info.rejected and opt.events[-1]["rule"].endswith("(probe failed)")


def test_the_benchmark_tabulates_lambda0_per_problem(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "initial_damping.py"
    spec = importlib.util.spec_from_file_location("initial_damping_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "id"
    assert bench.main(["--problems", "tiny", "--seconds", "0.2", "--threads", "1", "--out", str(out)]) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    (row,) = res["problems"]
    assert row["problem"] == "tiny" and row["lambda0"] in GRID and row["lambda_probe_seconds"] > 0
    assert row["probe_seconds"] == pytest.approx(row["first_step_seconds"][0] - row["first_step_seconds"][1])
    assert [c["label"] for c in row["contenders"]] == [bench.AUTO, bench.PAPER_GAMMA, bench.PAPER]
    assert row["contenders"][1]["damping"] == row["lambda0"]          # the probe's λ₀, without the probe
    grid = gamma_grid(row["lambda0"], 1e-5)
    assert row["gamma0"] in grid and row["paper_gamma0"] == pytest.approx((row["lambda0"] + 1e-5) ** 0.5)
    assert [g for g, _ in row["gamma_candidates"]] == grid
    rho = {c["damping"]: c["rho"] for c in row["candidates"]}
    assert rho[row["lambda0"]] >= 0.75 or row["lambda0"] == GRID[0]
    assert "| tiny |" in out.with_suffix(".md").read_text()
