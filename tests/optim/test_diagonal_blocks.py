"""Every parameter covered (issue #15 §3): KFAC and KFACPreconditioner on models with BatchNorm2d,
LayerNorm, an embedding and free parameters precondition and move every trainable parameter,
resume bit for bit, report the parameters ``exclude=`` leaves to the plain gradient, and refuse
mismatched states and (with ``diagonal=False``) such modules with one clear error."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfac_lab.errors import UnsupportedLayerError
from kfac_lab.optim import KFAC, KFACPreconditioner
from kfac_lab.optim.state_check import StateError

DT = torch.float64


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * self.s


class Norms(nn.Module):
    """Linear → BatchNorm2d (on a (n, 2, 2, 2) view) → Linear → LayerNorm → Scale → Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm2d(2)
        self.fc2 = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.scale = Scale(8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.bn(self.fc1(x).reshape(-1, 2, 2, 2)).reshape(-1, 8))
        return self.fc3(self.scale(self.ln(torch.tanh(self.fc2(h)))))


class Tokens(nn.Module):
    """Embedding (3 tokens a case) → LayerNorm → Linear → Linear, times a free parameter of the root."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 3)
        self.ln = nn.LayerNorm(9)
        self.fc1 = nn.Linear(9, 8)
        self.fc2 = nn.Linear(8, 3)
        self.temp = nn.Parameter(torch.tensor(1.0))

    def forward(self, idx):
        return self.fc2(torch.tanh(self.fc1(self.ln(self.emb(idx).reshape(idx.shape[0], -1))))) * self.temp


def make(kind, seed=0):
    torch.manual_seed(seed)
    return (Norms() if kind == "norms" else Tokens()).to(DT)


def batch(kind, step, m=64):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(m, 6, generator=g, dtype=DT) if kind == "norms" else torch.randint(0, 11, (m, 3), generator=g)
    # a learnable rule: the class of the first feature's (token's) tercile
    y = ((x[:, 0] > -0.43).long() + (x[:, 0] > 0.43).long()) if kind == "norms" else x[:, 0] % 3
    return x, y


def run_kfac(opt, kind, steps, start=0):
    return [opt.step(*batch(kind, start + k)) for k in range(steps)]


@pytest.mark.parametrize("kind, approx, mode", [("norms", "blockdiag", "sampled"), ("norms", "tridiag", "empirical"),
                                                ("tokens", "tridiag", "sampled")])
def test_kfac_moves_every_parameter_and_the_loss_falls(kind, approx, mode):
    model = make(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(model, approx=approx, damping=1.0, stats_mode=mode, T1=5, T2=5, T3=5)
    infos = run_kfac(opt, kind, 20)
    assert not any(i.rejected for i in infos) and all(i.plain_gradient == () for i in infos)
    assert opt.plain_params == [] and len(opt.diagonal_params) == (5 if kind == "norms" else 4)
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unmoved == []
    first, last = sum(i.loss for i in infos[:3]) / 3, sum(i.loss for i in infos[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    if kind == "norms":  # the running statistics saw the training pass only: one update a step
        assert int(model.bn.num_batches_tracked) == 20


@pytest.mark.parametrize("mode", ["sampled", "exact"])
def test_preconditioner_gives_every_parameter_its_block(mode):
    model = make("norms")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    pre = KFACPreconditioner(model, lr=sgd, gamma=0.1, inverse_update_freq=5, stats_mode=mode)
    losses = []
    for k in range(25):
        x, y = batch("norms", k)
        sgd.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        raw = [p.grad.clone() for p in pre.diagonal_params]
        info = pre.step()
        # the diagonal blocks' parameters: ν (D + γ²)⁻¹ ∇, with the snapshot the inverse was built from
        for p, g, d in zip(pre.diagonal_params, raw, pre.curvature.diagonal.inputs):
            want = info.kl_scale * (g / (d + info.gamma ** 2))
            torch.testing.assert_close(p.grad, want, rtol=1e-12, atol=1e-300)
        sgd.step()
        losses.append(loss.item())
    assert [n for n, p in model.named_parameters() if torch.equal(p, before[n])] == []
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert int(model.bn.num_batches_tracked) == 25  # the statistics pass did not update them


def test_kl_clipping_and_adaptive_damping_count_the_diagonal_blocks():
    model = make("tokens")
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    pre = KFACPreconditioner(model, lr=sgd, kl_clip=1e-4, gamma=0.1, adaptive_damping=True, damping_update_freq=1)
    x, y = batch("tokens", 0)
    sgd.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    info = pre.step(closure=lambda: F.cross_entropy(model(x), y))
    # δᵀF̃δ of the unclipped step −lr F̃⁻¹∇ over every preconditioned parameter: lr² Σ ⟨F̃⁻¹∇, ∇⟩
    nu = info.kl_scale
    assert nu < 1.0
    q = sum(float((p.grad * grads[n]).sum()) for n, p in model.named_parameters()) / nu
    assert info.quadratic == pytest.approx(q, rel=1e-10)


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("kind", ["norms", "tokens"])
def test_kfac_resumes_bit_for_bit(kind):
    model = make(kind)
    opt = KFAC(model, approx="tridiag", damping=1.0, T1=2, T2=3, T3=3)
    run_kfac(opt, kind, 4)
    state, weights = _roundtrip(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert state["diagonal"]["names"] == opt.curvature.diagonal.names
    other = make(kind, seed=5)
    other.load_state_dict(weights)
    again = KFAC(other, approx="tridiag", damping=1.0, T1=2, T2=3, T3=3)
    again.load_state_dict(state)
    a, b = run_kfac(opt, kind, 4, start=4), run_kfac(again, kind, 4, start=4)
    assert [(i.loss, i.alpha, i.mu, i.damping, i.gamma) for i in a] == [(i.loss, i.alpha, i.mu, i.damping, i.gamma)
                                                                         for i in b]
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))


def test_preconditioner_resumes_bit_for_bit():
    def steps(model, sgd, pre, start, n):
        for k in range(start, start + n):
            x, y = batch("norms", k)
            sgd.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            sgd.step()

    model = make("norms")
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    pre = KFACPreconditioner(model, lr=sgd, gamma=0.1, inverse_update_freq=3)
    steps(model, sgd, pre, 0, 4)
    state = _roundtrip(pre.state_dict())
    other = make("norms", seed=5)
    other.load_state_dict(copy.deepcopy(model.state_dict()))
    sgd2 = torch.optim.SGD(other.parameters(), lr=0.2)
    pre2 = KFACPreconditioner(other, lr=sgd2, gamma=0.1, inverse_update_freq=3)
    pre2.load_state_dict(state)
    steps(model, sgd, pre, 4, 4)
    steps(other, sgd2, pre2, 4, 4)
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), other.state_dict().values()))


def test_exclude_leaves_the_plain_gradient_and_says_so():
    model = make("norms")
    ref = copy.deepcopy(model)
    opt = KFAC(model, damping=1.0, exclude=["ln"])
    assert opt.curvature.diagonal.names == ["bn.weight", "bn.bias", "scale.s"]
    x, y = batch("norms", 0)
    info = opt.step(x, y)
    assert info.plain_gradient == ("ln.weight", "ln.bias") and "plain_gradient" not in info.as_dict()
    # step 1 (no δ₀, μ = 0): the plain parameters move by α·(−∇h), the α of the quadratic model
    ln = [ref.ln.weight, ref.ln.bias]
    nll = F.cross_entropy(ref(x), y)
    grads = torch.autograd.grad(nll, ln)
    eta = opt.config.weight_decay
    for p, q, g in zip([model.ln.weight, model.ln.bias], ln, grads):
        torch.testing.assert_close(p - q, -info.alpha * (g + eta * q), rtol=1e-10, atol=1e-14)
    assert info.mu == 0.0


def test_preconditioner_reports_what_exclude_leaves_alone():
    model = make("norms")
    pre = KFACPreconditioner(model, lr=0.1, gamma=0.1, exclude=[model.scale, "bn"])
    x, y = batch("norms", 0)
    F.cross_entropy(model(x), y).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    info = pre.step()
    assert info.plain_gradient == ("bn.weight", "bn.bias", "scale.s")
    assert all(torch.equal(getattr(model.get_submodule(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]).grad, raw[n])
               for n in info.plain_gradient)
    assert not torch.equal(model.ln.weight.grad, raw["ln.weight"])


def test_diagonal_false_names_every_offender_in_one_error():
    with pytest.raises(UnsupportedLayerError) as err:
        KFAC(make("norms"), diagonal=False)
    msg = str(err.value)
    assert "bn (BatchNorm2d)" in msg and "ln (LayerNorm)" in msg and "scale (Scale)" in msg
    assert "exclude=[...]" in msg and "diagonal=True" in msg
    opt = KFAC(make("norms"), diagonal=False, exclude=["bn", "ln", "scale"])
    assert opt.curvature.diagonal is None and len(opt.plain_params) == 5


def test_states_with_and_without_diagonal_blocks_do_not_mix():
    full = KFAC(make("tokens"), damping=1.0)
    run_kfac(full, "tokens", 2)
    # the root's free parameter cannot be excluded on its own: freeze it for the optimizer without blocks
    m = make("tokens")
    m.temp.requires_grad_(False)
    plain = KFAC(m, damping=1.0, diagonal=False, exclude=["emb", "ln"])
    with pytest.raises(StateError, match="holds diagonal Fisher blocks for .*has none.*diagonal=True"):
        plain.load_state_dict(full.state_dict())
    run_kfac(plain, "tokens", 1)
    with pytest.raises(StateError, match="holds no diagonal Fisher blocks"):
        KFAC(make("tokens"), damping=1.0).load_state_dict(plain.state_dict())
    state = full.state_dict()
    state["diagonal"]["D"][1] = state["diagonal"]["D"][1][:-1]
    with pytest.raises(StateError, match=r"the diagonal blocks D\[1\] has shape"):
        KFAC(make("tokens"), damping=1.0).load_state_dict(state)
