"""The curvature engine on its own: its statistics against brute force, the subset rule, the ε_k
schedule, the refresh schedule, the generator and its validated, all-or-nothing state."""
import copy

import pytest
import torch
from torch import nn

from kfac_lab.curvature import batch_factors, factor_pairs, find_layers, make_inverse, output_gradients
from kfac_lab.curvature.engine import CurvatureEngine, subset_rows
from kfac_lab.optim.state_check import Checker, StateError, all_or_nothing

DT = torch.float64


def model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def test_subset_rule_is_the_rounded_fraction_and_at_least_one_case():
    # M&G 2015 §5: τ₁ = 1/8 of the batch; round(), as KFAC always did (m = 20 → 2 cases)
    assert [subset_rows(m, 1 / 8) for m in (1, 4, 8, 20, 28, 64, 1000)] == [1, 1, 1, 2, 4, 8, 125]
    assert subset_rows(7, 1.0) == 7 and subset_rows(3, 1e-9) == 1


@pytest.mark.parametrize("capture", ["sequential", "func"])
def test_statistics_and_running_factors_match_brute_force(capture):
    net = model()
    eng = CurvatureEngine(net, "categorical", capture=capture, pairs="tridiag", ema_decay=0.9, seed=3)
    x = torch.randn(40, 5, dtype=DT)
    ref_gen = torch.Generator().manual_seed(3)
    layers = find_layers(net)
    expected = {}
    for k in range(1, 4):
        xs = x[: subset_rows(40, 1 / 8)] * k
        if capture == "sequential":
            z, acts = eng.forward(net, xs, xs.shape[0])
            stats = eng.statistics(xs, None, "sampled", z=z, acts=acts)
        else:
            stats = eng.statistics(xs, None, "sampled")
        a, g, _ = output_gradients(net, layers, "categorical", xs, mode="sampled", generator=ref_gen)
        A, G = batch_factors(a, g, factor_pairs(3, "tridiag"))
        eps = min(1 - 1 / k, 0.9)  # ε_k (M&G 2015 §5)
        for key in A:
            expected[key] = A[key] if k == 1 else eps * expected[key] + (1 - eps) * A[key]
            expected[("G",) + key] = G[key] if k == 1 else eps * expected[("G",) + key] + (1 - eps) * G[key]
        eng.update_factors(stats)
        assert torch.isfinite(eng.statistics_trace(stats))
    for key in factor_pairs(3, "tridiag"):
        torch.testing.assert_close(eng.factors.A[key], expected[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(eng.factors.G[key], expected[("G",) + key], rtol=1e-12, atol=1e-14)


def test_refresh_schedule_snapshot_and_adopt():
    net = model()
    eng = CurvatureEngine(net, "categorical", seed=1)
    eng.update_factors(eng.statistics(torch.randn(16, 5, dtype=DT), None, "sampled"))
    assert eng.refresh_due(7, 20)  # no inverse yet
    inverses = eng.refresh("tridiag", [0.5, 0.1], "factored")
    assert eng.refresh_due(7, 20)  # candidates only: nothing adopted
    eng.adopt(inverses[1], 0.1)
    assert not eng.refresh_due(7, 20) and eng.refresh_due(40, 20) and eng.refresh_due(3, 20, first=3)
    # the snapshot is a copy: later statistics do not change the inverse's inputs
    A0 = eng.inputs["A"][0].clone()
    eng.update_factors(eng.statistics(torch.randn(16, 5, dtype=DT), None, "sampled"))
    assert torch.equal(eng.inputs["A"][0], A0)
    V = [torch.randn(l.d_out, l.in_dim, dtype=DT) for l in eng.layers]
    ref = make_inverse("tridiag", eng.inputs["A"], eng.inputs["G"], eng.inputs["A_off"], eng.inputs["G_off"], gamma=0.1)
    assert all(torch.equal(u, w) for u, w in zip(eng.inverse.apply(V), ref.apply(V)))
    eng.stale = True
    assert eng.refresh_due(7, 20)
    assert eng.snapshot("blockdiag")["A_off"] is None


def test_state_round_trip_continues_bit_for_bit_and_a_bad_state_changes_nothing():
    def run(eng, n):
        for _ in range(n):
            eng.update_factors(eng.statistics(torch.randn(16, 5, dtype=DT, generator=data), None, "sampled"))

    data = torch.Generator().manual_seed(0)
    a = CurvatureEngine(model(), "categorical", seed=5)
    run(a, 2)
    a.adopt(a.refresh("blockdiag", [0.3], "factored")[0], 0.3)
    state = copy.deepcopy(a.state_dict())
    b = CurvatureEngine(model(), "categorical", seed=99)
    b.load_checked(b.check_state(state, Checker("test")))
    assert b.inverse is None and b.inverse_gamma is None  # the front end rebuilds it
    b.adopt(b.inverse_from_inputs(state["inverse_gamma"], "factored"), state["inverse_gamma"])
    snapshot = data.get_state()
    run(a, 2)
    data.set_state(snapshot)
    run(b, 2)
    for key in a.factors.A:
        assert torch.equal(a.factors.A[key], b.factors.A[key]) and torch.equal(a.factors.G[key], b.factors.G[key])
    # a damaged state: named, and nothing of the engine changes
    before = copy.deepcopy(b.state_dict())
    bad = dict(state, inverse_inputs={**state["inverse_inputs"], "A": [state["inverse_inputs"]["A"][0]]})
    with pytest.raises(StateError, match=r"the inverse's A holds 1 tensors; this model needs 3"):
        with all_or_nothing(b):
            b.load_checked(b.check_state(bad, Checker("test")))
    with pytest.raises(StateError, match="A_off or G_off without the other"):
        b.check_state(dict(state, inverse_inputs={**state["inverse_inputs"], "A_off": []}), Checker("test"))
    after = b.state_dict()
    assert all(torch.equal(after["factors"]["A"][k], t) for k, t in before["factors"]["A"].items())
    assert torch.equal(after["generator"], before["generator"])


def test_generator_is_made_on_first_use_restored_from_a_state_and_reseeded_on_a_new_device():
    eng = CurvatureEngine(model(), "categorical", seed=11)
    assert torch.equal(eng.generator.get_state(), torch.Generator().manual_seed(11).get_state())
    torch.randn(3, generator=eng.generator)
    state = eng.generator.get_state()
    other = CurvatureEngine(model(), "categorical", seed=0)
    other.load_checked(other.check_state(eng.state_dict(), Checker("test")))
    assert torch.equal(other.generator.get_state(), state)
    with pytest.raises(ValueError, match="engine='warp'"):
        CurvatureEngine(model(), capture="warp")
