import copy
import io

import pytest
import torch
from torch import nn

from kfac_lab.optim.averaging import BothValues, PolyakAverage


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def perturb(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def test_matches_hand_rolled_loop():
    model = make_model()
    avg = PolyakAverage(model, xi=0.9)
    ref = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        perturb(model, gen)
        avg.update()
        ref = [0.9 * r + 0.1 * p.detach() for r, p in zip(ref, model.parameters())]
    for a, r in zip(avg.average, ref):
        torch.testing.assert_close(a, r, rtol=1e-14, atol=1e-14)
    assert avg.n_updates == 7


def test_params_iterable_and_dtype_device():
    w = torch.zeros(2, 2, dtype=torch.float32, requires_grad=True)
    avg = PolyakAverage([w], xi=0.5)
    with torch.no_grad():
        w.fill_(4.0)
    avg.update()
    assert avg.average[0].dtype == torch.float32 and avg.average[0].device == w.device
    assert torch.equal(avg.average[0], torch.full((2, 2), 2.0))
    assert not avg.average[0].requires_grad


def test_swap_restores_exactly_even_on_error():
    model = make_model()
    avg = PolyakAverage(model, xi=0.5)
    perturb(model, torch.Generator().manual_seed(2))
    avg.update()
    before = [p.detach().clone() for p in model.parameters()]
    with avg.swap():
        for p, a in zip(model.parameters(), avg.average):
            assert torch.equal(p, a)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    with pytest.raises(RuntimeError, match="boom"):
        with avg.swap():
            raise RuntimeError("boom")
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_evaluate_both_and_average_into():
    model = make_model()
    avg = PolyakAverage(model, xi=0.5)
    perturb(model, torch.Generator().manual_seed(3))
    avg.update()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = avg.evaluate_both(lambda: model(x).pow(2).sum().item())
    assert isinstance(out, BothValues)
    twin = avg.average_into(copy.deepcopy(model))
    assert out.iterate == model(x).pow(2).sum().item()
    assert out.average == pytest.approx(twin(x).pow(2).sum().item(), rel=1e-14)
    assert out.best == min(out.iterate, out.average)
    with pytest.raises(ValueError, match="differ"):
        avg.average_into(nn.Linear(3, 4))


def test_state_dict_round_trip_weights_only():
    model = make_model()
    avg = PolyakAverage(model, xi=0.95)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        perturb(model, gen)
        avg.update()
    buf = io.BytesIO()
    torch.save(avg.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = PolyakAverage(copy.deepcopy(model), xi=0.5)
    other.load_state_dict(sd)
    assert other.xi == 0.95 and other.n_updates == 3
    for a, b in zip(avg.average, other.average):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        PolyakAverage(nn.Linear(2, 2)).load_state_dict(sd)


def test_reset_and_validation():
    model = make_model()
    avg = PolyakAverage(model)
    perturb(model, torch.Generator().manual_seed(5))
    avg.reset()
    for p, a in zip(model.parameters(), avg.average):
        assert torch.equal(p, a)
    for xi in (1.0, -0.1, "x"):
        with pytest.raises(ValueError, match="xi"):
            PolyakAverage(model, xi=xi)
    with pytest.raises(ValueError, match="no parameters"):
        PolyakAverage([])


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    from kfac_lab.optim.state_check import StateError

    model = nn.Linear(3, 2)
    avg = PolyakAverage(model, 0.9)
    before = [a.clone() for a in avg.average]
    good = avg.state_dict()
    for bad, match in ((dict(good, average=[torch.zeros(5, 3), good["average"][1]]), r"average\[0\] has shape \(5, 3\)"),
                       (dict(good, average=[torch.full((2, 3), float("nan")), good["average"][1]]), "NaN or inf"),
                       (dict(good, xi=1.5), "xi"), (dict(good, n_updates=-1), "n_updates")):
        with pytest.raises(StateError, match=match):
            avg.load_state_dict(bad)
        assert all(torch.equal(a, b) for a, b in zip(avg.average, before)) and avg.xi == 0.9
