"""Issue #16, the inputs/state rows: one test per row of the table, each showing the clear outcome
and that nothing the user had (an optimizer's state, a model's parameters) was changed."""
from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_lab.analysis import cumulant_study
from kfac_lab.curvature import CurvatureEngine, exact_fisher
from kfac_lab.errors import MemoryLimitError, UnsupportedLayerError
from kfac_lab.optim import KFAC, Adam, DistributedKFAC, KFACPreconditioner, SGDNesterov
from kfac_lab.optim.state_check import StateError

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(*sizes, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def batch(n, d, classes=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    if classes is None:
        return x, torch.rand(n, d, generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def same(a, b) -> bool:
    """Bit-for-bit equality of nested states (dicts, lists, tensors, numbers; NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                  and torch.equal(a.nan_to_num(), b.nan_to_num())))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def params(model):
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------ row: load_state_dict of a different-width model
def _kfac_twins(sizes=(10, 8, 3), steps=2, cls=KFAC, **kw):
    x, y = batch(64, sizes[0], sizes[-1])
    pair = []
    for _ in range(2):
        model = mlp(*sizes)
        opt = cls(model, "categorical", **kw)
        for _ in range(steps):
            opt.step(x, y)
        pair.append((model, opt))
    return pair, (x, y)


def _assert_untouched(pair, data, step=lambda opt, x, y: opt.step(x, y)):
    """The optimizer that refused a load equals its untouched twin, now and after one more step."""
    (m1, o1), (m2, o2) = pair
    assert same(o1.state_dict(), o2.state_dict())
    step(o1, *data)
    step(o2, *data)
    assert same(params(m1), params(m2)) and same(o1.state_dict(), o2.state_dict())


@pytest.mark.parametrize("cls,approx", [(KFAC, "blockdiag"), (KFAC, "tridiag"), (DistributedKFAC, "tridiag")])
def test_kfac_refuses_the_state_of_a_different_width_model_and_is_unchanged(cls, approx):
    wide = KFAC(mlp(20, 8, 3), "categorical", approx=approx)
    wide.step(*batch(64, 20, 3))
    pair, data = _kfac_twins(approx=approx, cls=cls)
    with pytest.raises(StateError, match=rf"{cls.__name__}: state for layer 0 factor A has shape \(21, 21\); this "
                                         r"model needs \(11, 11\): was it saved from another model\?"):
        pair[0][1].load_state_dict(wide.state_dict())
    _assert_untouched(pair, data)


def test_kfac_corrupted_generator_or_late_failure_leaves_the_optimizer_exactly_as_before(monkeypatch):
    pair, data = _kfac_twins()
    good = pair[1][1].state_dict()
    bad = dict(good, generator=good["generator"][:100])  # truncated: torch refuses it
    with pytest.raises(StateError, match="random generator state is not valid"):
        pair[0][1].load_state_dict(bad)
    nan = dict(good, delta0=[d.clone().fill_(float("nan")) for d in good["delta0"]])
    with pytest.raises(StateError, match="previous update δ₀.*NaN or inf"):
        pair[0][1].load_state_dict(nan)
    # a failure after validation (here: the inverse's factorisation) is rolled back too
    def boom(self, gamma, damping_type):
        raise RuntimeError("factorisation failed")
    monkeypatch.setattr(CurvatureEngine, "inverse_from_inputs", boom)
    changed = dict(good, k=good["k"] + 7, damping=good["damping"] * 3)
    with pytest.raises(RuntimeError, match="factorisation failed"):
        pair[0][1].load_state_dict(changed)
    monkeypatch.undo()
    _assert_untouched(pair, data)


def test_kfac_round_trip_still_bit_for_bit():
    pair, data = _kfac_twins()
    (m1, o1), (m2, o2) = pair
    fresh_model = mlp(10, 8, 3)
    fresh_model.load_state_dict(m1.state_dict())
    fresh = KFAC(fresh_model, "categorical")
    fresh.load_state_dict(o1.state_dict())
    assert same(fresh.state_dict(), o1.state_dict())
    fresh.step(*data)
    o1.step(*data)
    assert same(params(fresh_model), params(m1))


def _pre_step(pre, model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    pre.step()


def test_preconditioner_refuses_a_different_width_state_and_is_unchanged():
    x, y = batch(64, 10, 3)
    wide_model = mlp(20, 8, 3)
    wide = KFACPreconditioner(wide_model, "categorical", lr=0.1)
    _pre_step(wide, wide_model, *batch(64, 20, 3))
    pair = []
    for _ in range(2):
        model = mlp(10, 8, 3)
        pre = KFACPreconditioner(model, "categorical", lr=0.1)
        for _ in range(2):
            _pre_step(pre, model, x, y)
        pair.append((model, pre))
    with pytest.raises(StateError, match=r"layer 0 factor A has shape \(21, 21\); this model needs \(11, 11\)"):
        pair[0][1].load_state_dict(wide.state_dict())
    good = pair[1][1].state_dict()
    with pytest.raises(StateError, match="random generator state"):
        pair[0][1].load_state_dict(dict(good, generator=torch.zeros(3, dtype=torch.uint8)))
    (m1, p1), (m2, p2) = pair
    assert same(p1.state_dict(), p2.state_dict())
    _pre_step(p1, m1, x, y)
    _pre_step(p2, m2, x, y)
    assert same([p.grad for p in m1.parameters()], [p.grad for p in m2.parameters()])
    assert same(p1.state_dict(), p2.state_dict())


@pytest.mark.parametrize("cls", [SGDNesterov, Adam])
def test_baselines_refuse_a_different_width_state_and_are_unchanged(cls):
    x, y = batch(64, 10, 3)
    wide = cls(mlp(20, 8, 3), "categorical")
    wide.step(*batch(64, 20, 3))
    pair = []
    for _ in range(2):
        model = mlp(10, 8, 3)
        opt = cls(model, "categorical")
        opt.step(x, y)
        pair.append((model, opt))
    buf = "velocity" if cls is SGDNesterov else "exp_avg"
    with pytest.raises(StateError, match=rf"buffer '{buf}'\[0\] has shape \(8, 20\); this model needs \(8, 10\)"):
        pair[0][1].load_state_dict(wide.state_dict())
    good = pair[1][1].state_dict()
    nan = dict(good, buffers={k: [t.clone().fill_(float("nan")) for t in v] for k, v in good["buffers"].items()})
    with pytest.raises(StateError, match="NaN or inf"):
        pair[0][1].load_state_dict(nan)
    with pytest.raises(StateError, match="saved settings: lr must be a number, got str '0.1'"):
        pair[0][1].load_state_dict(dict(good, hyper=dict(good["hyper"], lr="0.1")))
    _assert_untouched(pair, (x, y))


def test_session_restore_is_all_or_nothing():
    from kfac_lab.train import Session
    from kfac_lab.train.checkpointing import clone_state as _clone

    donor = Session("tiny", "kfac", checkpoint_every=None)
    donor.run(steps=2)
    ck = _clone(donor.state())
    target = Session("tiny", "kfac", checkpoint_every=None, seed=3)
    target.run(steps=3)
    before = (_clone(target.state()), target.step)
    # the model part fits; the optimizer part is damaged: the model must not be left half-loaded
    bad = _clone(ck)
    bad["optimizer"]["generator"] = bad["optimizer"]["generator"][:10]
    with pytest.raises(StateError, match="random generator state"):
        target._load_state(bad)
    assert same(_clone(target.state()), before[0]) and target.step == before[1]
    wrong = _clone(ck)
    key = next(k for k in wrong["model"] if k.endswith("weight"))
    wrong["model"][key] = torch.zeros(3, 3)
    with pytest.raises(StateError, match=rf"model entry '{key}' has shape \(3, 3\)"):
        target._load_state(wrong)
    assert same(_clone(target.state()), before[0])
    target._load_state(ck)  # and a good checkpoint loads
    assert target.step == 2 and same(target.optimizer.state_dict(), donor.optimizer.state_dict())


# ------------------------------------------------------------------ row: two layers share one weight
def test_tied_weights_are_refused_naming_the_parameter_and_both_modules():
    enc, dec = nn.Linear(6, 6), nn.Linear(6, 6)
    dec.weight = enc.weight
    model = nn.Sequential(enc, nn.Tanh(), dec)
    for make in (lambda: KFAC(model, "gaussian"), lambda: KFACPreconditioner(model, "gaussian", lr=0.1)):
        with pytest.raises(UnsupportedLayerError, match=r"parameter '0.weight' is shared by the modules '0', '2' "
                                                        r"\(tied weights\).*untie them"):
            make()
    SGDNesterov(model, "gaussian").step(torch.randn(4, 6), torch.randn(4, 6))  # the baselines handle ties


# ------------------------------------------------------------------ row: categorical loss with float targets
def _soft(n, c, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64) * 2, dim=1)


def test_categorical_soft_targets_end_to_end_against_brute_force():
    model = mlp(5, 4, 3, dtype=torch.float64)
    x = torch.randn(12, 5, dtype=torch.float64)
    y = _soft(12, 3)
    # the loss: −Σ_c y_c log softmax(z)_c, mean over cases
    from kfac_lab.curvature import get_loss

    z = model(x)
    loss = get_loss("categorical")
    brute = -(y * torch.log_softmax(z, 1)).sum(1).mean()
    assert torch.allclose(loss.nll(z, y), brute, rtol=1e-12)
    # the empirical Fisher with soft targets: mean over cases of ∇ℓ_n ∇ℓ_nᵀ, brute force per case
    ps = list(model.parameters())
    rows = []
    for n in range(12):
        ln = -(y[n] * torch.log_softmax(model(x[n:n + 1])[0], 0)).sum()
        gs = torch.autograd.grad(ln, ps)
        # the paper's ordering: per layer vec([W | b]) column-stacked
        per_layer = [torch.cat([gs[i], gs[i + 1].unsqueeze(1)], 1).t().reshape(-1) for i in range(0, len(gs), 2)]
        rows.append(torch.cat(per_layer))
    G = torch.stack(rows)
    F_brute = G.t() @ G / 12
    F_emp = exact_fisher(model, "categorical", x, y, mode="empirical").dense
    assert torch.allclose(F_emp, F_brute, rtol=1e-10, atol=1e-12)
    # the optimizers train on soft targets (their loss is the soft cross-entropy)
    info = KFAC(model, "categorical", stats_mode="empirical").step(x, y)
    assert not info.rejected and info.loss == pytest.approx(float(brute.detach()), rel=1e-12)
    assert not Adam(mlp(5, 4, 3, dtype=torch.float64), "categorical").step(x, y).rejected


def test_categorical_targets_checked_before_the_loss_runs():
    model = mlp(5, 4, 3)
    opt = KFAC(model, "categorical")
    x = torch.randn(8, 5)
    before = (opt.state_dict(), params(model))
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\] for 3 outputs, got values from 0 to 7"):
        opt.step(x, torch.tensor([0, 1, 2, 7, 0, 1, 2, 0]))
    with pytest.raises(ValueError, match="row 0 sums to 2"):
        opt.step(x, torch.full((8, 3), 2 / 3))
    with pytest.raises(ValueError, match=r"probability rows and need shape \(8, 3\), got \(8,\).*y.long\(\)"):
        opt.step(x, torch.zeros(8))
    assert same(opt.state_dict(), before[0]) and same(params(model), before[1])


# ------------------------------------------------------------------ row: bernoulli targets outside [0, 1]
def test_bernoulli_targets_outside_unit_interval_are_refused_and_nothing_changes():
    model = mlp(6, 4, 6)
    x = torch.rand(16, 6)
    for opt in (KFAC(model, "bernoulli"), SGDNesterov(model, "bernoulli")):
        before = (opt.state_dict(), params(model))
        with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\] \(probabilities\), got 96 value\(s\) outside.*x / 255"):
            opt.step(x, x * 2 + 1)
        assert same(opt.state_dict(), before[0]) and same(params(model), before[1])
    with pytest.raises(ValueError, match=r"gaussian loss: targets shape \(16, 5\) must equal output shape \(16, 6\)"):
        KFAC(model, "gaussian").step(x, x[:, :5])


# ------------------------------------------------------------------ row: model/data dtype mismatch
def test_dtype_mismatch_is_named_with_both_fixes():
    model = mlp(6, 4, 3)
    x, y = batch(8, 6, 3)
    msg = r"model parameters are float32 but the batch is float64; convert with x.float\(\) or model.double\(\)"
    for opt in (KFAC(model, "categorical"), KFAC(model, "categorical", engine="func"), Adam(model, "categorical")):
        with pytest.raises(TypeError, match=msg):
            opt.step(x.double(), y)
    pre = KFACPreconditioner(model, "categorical", lr=0.1)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(TypeError, match=msg):
        pre.step(x=x.double())


# ------------------------------------------------------------------ row: cumulant_study with far too many samples
def test_cumulant_study_with_far_too_many_samples_refuses_before_allocating(monkeypatch):
    import kfac_lab.analysis.cumulants as cum

    def never(*a, **k):
        raise AssertionError("the statistics were computed before the memory check")

    monkeypatch.setattr(cum, "output_gradients", never)
    model = mlp(20, 20, 10)
    with pytest.raises(MemoryLimitError, match=r"cumulant_study \(630 parameters, 500 cases, 100,000,000 samples per "
                                               r"case\) needs about [\d.]+ GB .*above max_bytes = 4.00 GB.*lower samples"):
        cumulant_study(model, "categorical", torch.randn(500, 20), samples=10**8)


@pytest.mark.parametrize("study", ["fisher", "damping", "invariance"])
def test_every_study_has_a_memory_guard(study):
    from kfac_lab.analysis import damping_study, fisher_study, invariance_study

    model = mlp(20, 20, 10)
    x, y = batch(50, 20, 10)
    with pytest.raises(MemoryLimitError, match="above max_bytes = 1.0 MB"):
        if study == "fisher":
            fisher_study(model, "categorical", x, max_bytes=2**20)
        elif study == "damping":
            damping_study(model, "categorical", x, y, max_bytes=2**20)
        else:
            invariance_study(sizes=(400, 400, 10), cases=100, max_bytes=2**20)


# ------------------------------------------------------------------ row: kfac-lab study --figure 1 --samples 100000000
def _cli(*args, env=None):
    import os

    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    e.pop("KFAC_LAB_DEBUG", None) if not env else None
    return subprocess.run([sys.executable, "-m", "kfac_lab", *args], capture_output=True, text=True, timeout=120,
                          env=e, cwd=ROOT)


def test_cli_study_with_huge_samples_is_one_line_and_exit_2():
    proc = _cli("study", "--figure", "1", "--samples", "100000000", "--n", "200")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("kfac-lab study: error: fisher_study") and "max_bytes" in proc.stderr
    debug = _cli("study", "--figure", "1", "--samples", "100000000", "--n", "200", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "MemoryLimitError" in debug.stderr


def test_cli_keeps_bugs_visible(monkeypatch, capsys):
    from kfac_lab import cli

    def bug(*a, **k):
        return [][1]  # an IndexError: a bug, not a user mistake

    def torch_value_error(*a, **k):
        torch.zeros(2).view(3)  # a RuntimeError inside torch

    for fn, code in ((bug, 1), (torch_value_error, 1)):
        monkeypatch.setattr(cli, "run_study", fn)
        assert cli.main(["study", "--figure", "1"]) == code
        err = capsys.readouterr().err
        assert "internal error" in err and "--debug" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(cli, "run_study", bug)
    with pytest.raises(IndexError):
        cli.main(["--debug", "study", "--figure", "1"])


# ------------------------------------------------------------------ row: a huge seed; lr="0.1"
def test_huge_seed_is_refused_at_once_everywhere():
    from kfac_lab.train import Session

    model = mlp(4, 3)
    match = r"seed=1.000e\+30 is out of range: a seed must be an integer in \[0, 2\*\*63 - 1\]"
    for make in (lambda: KFAC(model, "categorical", seed=10**30), lambda: KFACPreconditioner(model, lr=0.1, seed=10**30),
                 lambda: Session("tiny", "kfac", seed=10**30),
                 lambda: cumulant_study(model, "categorical", torch.randn(4, 4), seed=10**30)):
        with pytest.raises(ValueError, match=match):
            make()
    proc = _cli("train", "--problem", "tiny", "--steps", "1", "--seed", str(10**30), "--store", "memory://x.zarr")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "out of range" in proc.stderr


def test_lr_string_is_a_type_error_naming_the_setting():
    model = mlp(4, 3)
    for make in (lambda: KFAC(model, "categorical", lr="0.1"), lambda: KFAC(model).configure(lr="0.1"),
                 lambda: SGDNesterov(model, "categorical", lr="0.1"), lambda: Adam(model, "categorical").configure(lr="0.1")):
        with pytest.raises(TypeError, match=r"lr must be a number, got str '0.1'"):
            make()
    with pytest.raises(TypeError, match=r"damping must be a number, got str '1e-3'"):
        KFAC(model, damping="1e-3")
    for kw in (dict(lr="0.1"), dict(lr=0.1, gamma="0.1"), dict(lr=0.1, kl_clip="1e-3")):
        name, value = next((k, v) for k, v in kw.items() if isinstance(v, str))
        with pytest.raises(TypeError, match=rf"{name} must be a number, got str '{value}'"):
            KFACPreconditioner(model, "categorical", **kw)
    with pytest.raises(TypeError, match=r"lr must be a number, got str '0.1'"):
        KFACPreconditioner(model, "categorical", lr=0.1).configure(lr="0.1")


# ------------------------------------------------------------------ row: a NaN batch into KFACPreconditioner
def test_nan_batch_into_the_preconditioner_is_a_rejected_step():
    model = mlp(4, 8, 3)
    pre = KFACPreconditioner(model, "categorical", kl_clip=None)
    x, y = batch(16, 4, 3)
    _pre_step(pre, model, x, y)
    before = copy.deepcopy(pre.factors.state_dict())
    x = x.clone()
    x[0, 0] = float("nan")
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="rejected"):
        info = pre.step()
    assert info.rejected and pre.steps == 1
    assert same(pre.factors.state_dict(), before)
    assert all(p.grad is None for p in model.parameters())
