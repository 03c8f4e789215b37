"""The one live-settings mechanism (kfac_lab/optim/live.py), exercised through every optimizer:
``validate`` checks in the caller's thread and changes nothing, ``configure`` queues, the queue
is applied at the next step boundary under one lock and recorded as ONE event."""
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_lab.optim import KFAC, Adam, DistributedKFAC, KFACPreconditioner, SGDNesterov
from kfac_lab.optim.live import LiveSettings


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(32, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (32,))
    return model, x, y


class Pre:
    """``KFACPreconditioner`` with a torch SGD: the user's loop as one ``step(x, y)``."""

    def __init__(self, model, **kw):
        self.model = model
        self.sgd = torch.optim.SGD(model.parameters(), lr=0.05)
        self.opt = KFACPreconditioner(model, "categorical", lr=self.sgd, **kw)

    def step(self, x, y):
        self.sgd.zero_grad()
        F.cross_entropy(self.model(x), y).backward()
        info = self.opt.step()
        self.sgd.step()
        return info


# name -> (build(model) -> (optimizer, step(x, y)), a valid change, a wrongly typed change, an out-of-range change)
OPTIMIZERS = {
    "kfac": (lambda m: KFAC(m, "categorical", T3=2, T2=2), {"damping": 3.0, "approx": "tridiag"},
             {"damping": "3"}, {"damping": -1.0}),
    "distributed_kfac": (lambda m: DistributedKFAC(m, "categorical", T3=2, T2=2), {"lr": 0.1, "momentum": False},
                         {"lr": "0.1"}, {"momentum": 1.5}),
    "preconditioner": (lambda m: Pre(m, inverse_update_freq=2), {"gamma": 0.1, "approx": "tridiag"},
                       {"gamma": "0.1"}, {"gamma": -1.0}),
    "sgd": (lambda m: SGDNesterov(m, "categorical", lr=0.01), {"lr": 0.02, "mu_max": 0.5},
            {"lr": "0.02"}, {"mu_max": 1.0}),
    "adam": (lambda m: Adam(m, "categorical"), {"lr": 0.002, "betas": (0.8, 0.9)},
             {"eps": "1e-8"}, {"betas": (0.9, 1.0)}),
}


def build(name):
    model, x, y = model_and_data()
    made = OPTIMIZERS[name][0](model)
    opt = made.opt if isinstance(made, Pre) else made
    return opt, (lambda: made.step(x, y))


def test_every_optimizer_uses_the_one_mechanism():
    for cls in (KFAC, DistributedKFAC, KFACPreconditioner, SGDNesterov, Adam):
        assert issubclass(cls, LiveSettings)
        for name in ("validate", "configure", "_apply_pending", "_event", "pending"):
            assert getattr(cls, name) is getattr(LiveSettings, name), (cls.__name__, name)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_validate_checks_and_changes_nothing(name):
    opt, step = build(name)
    _, good, wrong_type, out_of_range = OPTIMIZERS[name]
    before = opt.settings()
    checked = opt.validate(**good)
    assert set(checked) == set(good) and opt.settings() == before and opt.pending() == {}
    bad_key = next(iter(wrong_type))
    with pytest.raises(TypeError, match=rf"{bad_key} must be a number, got str"):
        opt.validate(**wrong_type)
    with pytest.raises(ValueError, match=next(iter(out_of_range))):
        opt.validate(**out_of_range)
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['no_such_setting'\]"):
        opt.validate(no_such_setting=1)
    with pytest.raises(TypeError):
        opt.configure(**wrong_type)  # a refused change queues nothing
    assert opt.pending() == {} and opt.settings() == before and opt.events == []


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_configure_applies_at_the_next_boundary_as_one_event(name):
    opt, step = build(name)
    _, good, _, _ = OPTIMIZERS[name]
    step()
    first, second = dict(list(good.items())[:1]), dict(list(good.items())[1:])
    opt.configure(**first)
    opt.configure(**second)
    before = opt.settings()
    assert all(before[k] != v for k, v in good.items())  # queued, not applied
    assert opt.pending() == {**first, **second}
    step()
    after = opt.settings()
    for k, v in good.items():
        assert after[k] == v
    events = [e for e in opt.events if e["kind"] == "configure"]
    expect = {k: (list(v) if isinstance(v, tuple) and name == "adam" else v) for k, v in good.items()}
    assert len(events) == 1 and events[0]["step"] == 2
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in events[0].items() if k in good} == expect
    assert opt.pending() == {}
    step()  # nothing queued: no new event
    assert len([e for e in opt.events if e["kind"] == "configure"]) == 1


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_validation_runs_in_the_callers_thread(name, monkeypatch):
    opt, _ = build(name)
    _, good, _, out_of_range = OPTIMIZERS[name]
    seen, errors = [], []
    check = type(opt)._check_settings

    def spy(self, merged, changes):
        seen.append(threading.get_ident())
        return check(self, merged, changes)

    monkeypatch.setattr(type(opt), "_check_settings", spy)

    def caller():
        opt.configure(**good)
        try:
            opt.configure(**out_of_range)
        except ValueError as exc:
            errors.append((threading.get_ident(), exc))

    t = threading.Thread(target=caller)
    t.start()
    t.join()
    assert seen == [t.ident, t.ident]
    assert len(errors) == 1 and errors[0][0] == t.ident  # raised there, not at the step
    assert opt.pending() == good


def test_concurrent_changes_are_checked_together():
    """Two changes valid alone, invalid together (tridiag needs factored damping), from two real
    threads at once: the one lock makes exactly one of them win, every time."""
    for _ in range(20):
        opt, step = build("preconditioner")
        barrier = threading.Barrier(2)
        outcomes = []

        def change(**kw):
            barrier.wait()
            try:
                opt.configure(**kw)
                outcomes.append("ok")
            except ValueError:
                outcomes.append("refused")

        threads = [threading.Thread(target=change, kwargs=dict(approx="tridiag")),
                   threading.Thread(target=change, kwargs=dict(damping_type="tikhonov"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["ok", "refused"]
        step()
        cfg = opt.settings()
        assert (cfg["approx"], cfg["damping_type"]) in {("tridiag", "factored"), ("blockdiag", "tikhonov")}


@pytest.mark.parametrize("name", ["kfac", "preconditioner", "sgd"])
def test_changes_from_many_threads_while_stepping(name):
    """Real threads configure while the main thread steps: every change lands at a boundary, at
    most one event per step, and the last value applied is the one in force."""
    opt, step = build(name)
    key = {"kfac": "damping", "preconditioner": "gamma", "sgd": "lr"}[name]
    values = [0.01 * (i + 1) for i in range(40)]
    stop = threading.Event()

    def writer(vs):
        for v in vs:
            if stop.is_set():
                return
            opt.configure(**{key: v})

    threads = [threading.Thread(target=writer, args=(values[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(12):
        step()
    stop.set()
    for t in threads:
        t.join()
    step()  # whatever is still queued lands here
    events = [e for e in opt.events if e["kind"] == "configure"]
    steps = [e["step"] for e in events]
    assert steps == sorted(set(steps)) and len(events) >= 1
    assert opt.settings()[key] == events[-1][key] and events[-1][key] in values
    assert opt.pending() == {}


def test_preconditioner_damping_is_a_deprecated_alias_of_gamma():
    outs = []
    for kw in (dict(gamma=0.2), dict(damping=0.2)):
        model, x, y = model_and_data()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pre = KFACPreconditioner(model, "categorical", kl_clip=None, **kw)
        deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        assert len(deprecations) == ("damping" in kw)
        if deprecations:
            assert "damping= is the deprecated name of gamma=" in str(deprecations[0].message)
            assert deprecations[0].filename == __file__  # points at the caller
        F.cross_entropy(model(x), y).backward()
        info = pre.step()
        outs.append((info.gamma, [p.grad.clone() for p in model.parameters()]))
    assert outs[0][0] == outs[1][0] == 0.2
    for a, b in zip(outs[0][1], outs[1][1]):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="not both"):
        KFACPreconditioner(model, "categorical", kl_clip=None, gamma=0.1, damping=0.1)
    with pytest.warns(DeprecationWarning, match="damping= is the deprecated name of gamma=") as rec:
        pre.configure(damping=0.5)
    assert rec[0].filename == __file__
    assert pre.pending() == {"gamma": 0.5}
    F.cross_entropy(model(x), y).backward()
    pre.step()
    assert pre.settings()["gamma"] == 0.5 and pre.events[-1] == {"step": 2, "kind": "configure", "gamma": 0.5}


def test_preconditioner_info_damping_is_a_deprecated_alias():
    model, x, y = model_and_data()
    pre = KFACPreconditioner(model, "categorical", lr=0.1, adaptive_damping=True, damping_update_freq=1)
    F.cross_entropy(model(x), y).backward()
    info = pre.step(closure=lambda: F.cross_entropy(model(x), y))
    assert info.adapted_gamma == pre.gamma()
    with pytest.warns(DeprecationWarning, match="adapted_gamma"):
        assert info.damping == info.adapted_gamma


def test_preconditioner_state_saved_with_the_old_name_loads():
    model, x, y = model_and_data()
    pre = KFACPreconditioner(model, "categorical", kl_clip=None, gamma=0.07)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    pre.configure(gamma=0.09)
    state = pre.state_dict()
    old = dict(state, config={("damping" if k == "gamma" else k): v for k, v in state["config"].items()},
               pending={"damping": 0.09})
    fresh = KFACPreconditioner(model, "categorical", kl_clip=None)
    fresh.load_state_dict(old)
    assert fresh.settings()["gamma"] == 0.07 and fresh.pending() == {"gamma": 0.09}
