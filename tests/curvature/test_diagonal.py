"""Diagonal Fisher blocks (curvature/diagonal.py): the mini-batch blocks against brute-force per-case
squared gradients (torch.func, and autograd case by case where batch norm couples the cases), the
exact-F products over every parameter against a brute-force GGN, the damped inverse, and the
errors that name their fix."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from kfac_lab.curvature.engine import CurvatureEngine
from kfac_lab.curvature.layers import find_layers
from kfac_lab.curvature.losses import get_loss
from kfac_lab.curvature.products import func_jvp, gram_from_jvps
from kfac_lab.curvature.running_stats import frozen_running_stats
from kfac_lab.errors import KFACError, UnsupportedLayerError

DT = torch.float64
V, C = 7, 3  # vocabulary, classes


class Scale(nn.Module):
    """A free parameter on a module of its own."""

    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        return x * self.s


class TokenNet(nn.Module):
    """Embedding (2 tokens per case, a padding row) → LayerNorm → Linear → GroupNorm → Scale →
    Linear, times a free parameter on the root."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 4, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 6)
        self.gn = nn.GroupNorm(2, 6)
        self.scale = Scale(6)
        self.fc2 = nn.Linear(6, C)
        self.temp = nn.Parameter(torch.tensor(0.8))

    def forward(self, idx):
        h = self.ln(self.emb(idx).reshape(idx.shape[0], -1))
        return self.fc2(self.scale(torch.tanh(self.gn(self.fc1(h))))) * self.temp


class NormNet(nn.Module):
    """Linear → BatchNorm1d → Linear → (n, 2, 2, 2) → BatchNorm2d → Linear."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 8)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc3 = nn.Linear(8, C)

    def forward(self, x):
        h = torch.tanh(self.bn1(self.fc1(x)))
        h = self.bn2(self.fc2(h).reshape(-1, 2, 2, 2)).reshape(-1, 8)
        return self.fc3(torch.tanh(h))


class GroupedConv(nn.Module):
    """A grouped convolution written with its own parameters (modules the Kronecker layers refuse
    get the same per-case rule)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 1, 3, 3) / 3)
        self.bias = nn.Parameter(torch.randn(4) / 10)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=2, padding=1, groups=2)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = GroupedConv()
        self.fc = nn.Linear(36, C)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def tokens(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (n, 2), generator=g)
    idx[0] = torch.tensor([3, 3])  # one token twice in a case: its row's per-case gradient is their sum
    idx[1, 0] = 0                   # the padding row
    return idx, torch.randint(0, C, (n,), generator=g)


def normed_model(seed=0):
    torch.manual_seed(seed)
    net = NormNet().to(DT)
    with torch.no_grad():  # non-trivial scales, shifts and running statistics
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return net


def diag_params(eng):
    return eng.diagonal.names, eng.diagonal.params


def brute_squares_func(net, names, x, targets_of):
    """(1/n) Σ_n Σ_j w_nj (∂ℓ(x_n, t_j)/∂θ)², each case alone through torch.func (per-case losses)."""
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss(p, xn, t):
        return F.cross_entropy(functional_call(net, p, (xn.unsqueeze(0),)), t.unsqueeze(0))

    total = {k: 0.0 for k in names}
    n = x.shape[0]
    for t, w in targets_of(net, x):  # t: (n,) targets, w: (n,) weights
        per = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
        for k in names:
            total[k] = total[k] + (w.reshape(-1, *[1] * (per[k].dim() - 1)) * per[k] ** 2).sum(0) / n
    return [total[k] for k in names]


def empirical(y):
    return lambda net, x: [(y, torch.ones(len(y), dtype=DT))]


def exact(net, x):
    """Every class, weighted by the model's probability: the exact expectation over targets."""
    with torch.no_grad():
        p = net(x).softmax(-1)
    return [(torch.full((x.shape[0],), c), p[:, c]) for c in range(C)]


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_layernorm_groupnorm_embedding_and_free_parameters_match_torch_func(mode):
    torch.manual_seed(1)
    net = TokenNet().to(DT)
    idx, y = tokens()
    eng = CurvatureEngine(net, "categorical")
    names, _ = diag_params(eng)
    assert names == ["temp", "emb.weight", "ln.weight", "ln.bias", "gn.weight", "gn.bias", "scale.s"]
    a, g, d = eng.statistics(idx, y, mode)
    ref = brute_squares_func(net, names, idx, empirical(y) if mode == "empirical" else exact)
    for name, got, want in zip(names, d, ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)
    assert d[1][0].abs().sum() == 0 and d[1][3].abs().sum() > 0  # the padding row gets nothing; row 3 its sum


@pytest.mark.parametrize("mode", ["empirical", "exact"])
def test_a_module_of_free_parameters_matches_torch_func(mode):
    torch.manual_seed(2)
    net = ConvNet().to(DT)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 2, 5, 5, generator=g, dtype=DT), torch.randint(0, C, (6,), generator=g)
    eng = CurvatureEngine(net, "categorical")
    names, _ = diag_params(eng)
    assert names == ["conv.weight", "conv.bias"]
    d = eng.statistics(x, y, mode)[2]
    for name, got, want in zip(names, d, brute_squares_func(net, names, x, empirical(y) if mode == "empirical"
                                                            else exact)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)


def per_case_copies(net, x, y):
    """(1/n) Σ_n (∂L/∂θ_n)² for the batch-norm scales and shifts, θ_n case n's own copy of θ (all
    equal) and L the batch's summed loss: batch norm written out (``F.batch_norm`` without its affine
    part, then each case's copy) and differentiated by autograd — the per-case gradient of a
    parameter whose cases are coupled by the batch statistics (without coupling: ∂ℓ_n/∂θ)."""
    n = x.shape[0]
    copies = {name: p.detach().expand(n, -1).clone().requires_grad_(True)
              for name, p in net.named_parameters() if name.startswith("bn")}

    def bn(mod, h, name):
        use_batch = mod.training
        out = F.batch_norm(h, None if use_batch else mod.running_mean, None if use_batch else mod.running_var,
                           training=use_batch, eps=mod.eps)
        shape = (n, -1) + (1,) * (h.dim() - 2)
        return out * copies[name + ".weight"].reshape(shape) + copies[name + ".bias"].reshape(shape)

    h = torch.tanh(bn(net.bn1, net.fc1(x), "bn1"))
    h = bn(net.bn2, net.fc2(h).reshape(-1, 2, 2, 2), "bn2").reshape(-1, 8)
    loss = F.cross_entropy(net.fc3(torch.tanh(h)), y, reduction="sum")
    names = list(copies)
    gs = torch.autograd.grad(loss, [copies[k] for k in names])
    return [(g ** 2).sum(0) / n for g in gs]


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_blocks_match_per_case_autograd_in_both_modes(train):
    net = normed_model().train(train)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 5, generator=g, dtype=DT), torch.randint(0, C, (10,), generator=g)
    eng = CurvatureEngine(net, "categorical")
    names, _ = diag_params(eng)
    assert names == ["bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"]
    before = {k: b.clone() for k, b in net.named_buffers()}
    _, _, d = eng.statistics(x, y, "empirical")
    for name, got, want in zip(names, d, per_case_copies(net, x, y)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14, msg=name)
    # the statistics pass left the running statistics (and num_batches_tracked) alone
    assert all(torch.equal(b, before[k]) for k, b in net.named_buffers())


def brute_ggn(net, x):
    """The exact GGN of the batch forward, (1/n) Jᵀ F_R J, J over every trainable parameter (jacrev)."""
    params = {k: p.detach() for k, p in net.named_parameters()}
    with frozen_running_stats(net):
        z = functional_call(net, params, (x,))
        J = jacrev(lambda p: functional_call(net, p, (x,)))(params)
    J = torch.cat([J[k].reshape(z.shape[0], C, -1) for k in params], dim=2)  # (n, c, P)
    p = z.softmax(-1)
    FR = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", J, FR, J) / z.shape[0], list(params)


@pytest.mark.parametrize("which", ["tokens", "batchnorm"])
def test_exact_fisher_products_cover_every_parameter(which):
    torch.manual_seed(3)
    net, x = (TokenNet().to(DT), tokens()[0]) if which == "tokens" else \
        (normed_model(), torch.randn(8, 5, dtype=DT, generator=torch.Generator().manual_seed(3)))
    G, names = brute_ggn(net, x)
    shapes = {k: p.shape for k, p in net.named_parameters()}
    gen = torch.Generator().manual_seed(4)
    dirs = [{k: torch.randn(shapes[k], generator=gen, dtype=DT) for k in names} for _ in range(3)]
    if which == "tokens":  # the padding row: reverse mode (jacrev) gives it no derivative, forward mode does;
        for d in dirs:     # the optimizer's directions never move it (its gradient and block are zero)
            d["emb.weight"][0] = 0
    before = {k: b.clone() for k, b in net.named_buffers()}
    Jd = func_jvp(net, x, dirs)
    with frozen_running_stats(net):
        zx = net(x).detach()
    Q = gram_from_jvps(get_loss("categorical"), zx, Jd)
    vecs = torch.stack([torch.cat([d[k].reshape(-1) for k in names]) for d in dirs])
    torch.testing.assert_close(Q, vecs @ G @ vecs.t(), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(b, before[k]) for k, b in net.named_buffers())


def test_damped_inverse_of_the_diagonal_blocks_is_one_over_d_plus_gamma_squared():
    torch.manual_seed(5)
    net = TokenNet().to(DT)
    idx, y = tokens()
    eng = CurvatureEngine(net, "categorical")
    stats = eng.statistics(idx, y, "sampled")
    eng.update_factors(stats)
    assert eng.factors.k == 1 and all(torch.equal(d, b) for d, b in zip(eng.diagonal.D, stats[2]))  # ε_1 = 0
    eng.update_factors(eng.statistics(idx, y, "sampled"))
    inv = eng.refresh("blockdiag", [0.3, 0.6], "factored")
    grads = [l.weight_matrix().detach() for l in eng.layers] + [p.detach() for p in eng.diagonal.params]
    for gamma, I in zip([0.3, 0.6], inv):
        out = I.apply(grads)
        for v, d, u in zip(grads[2:], eng.diagonal.inputs, out[2:]):
            torch.testing.assert_close(u, v / (d + gamma ** 2), rtol=1e-14, atol=0)
        kron = I.kron.apply(grads[:2])
        assert all(torch.equal(a, b) for a, b in zip(out[:2], kron))
    with pytest.raises(ValueError, match="2 layers' blocks, then the 7 diagonal"):
        inv[0].apply(grads[:3])


def test_errors_name_the_module_and_the_fix():
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"1 \(LayerNorm\).*exclude=.*diagonal=True"):
        CurvatureEngine(net, diagonal=False)
    assert CurvatureEngine(net, diagonal=False, exclude=["1"]).diagonal is None
    assert CurvatureEngine(net).diagonal.names == ["1.weight", "1.bias"]
    # a Linear with a frozen weight and a trainable bias: the bias gets a diagonal block
    net[2].weight.requires_grad_(False)
    assert CurvatureEngine(net).diagonal.names == ["1.weight", "1.bias", "2.bias"]
    with pytest.raises(UnsupportedLayerError, match="sparse=True.*exclude"):
        CurvatureEngine(nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2)))
    with pytest.raises(UnsupportedLayerError, match="scale_grad_by_freq"):
        CurvatureEngine(nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Linear(3, 2)))
    # find_layers alone (the studies) still refuses them
    with pytest.raises(UnsupportedLayerError, match="LayerNorm"):
        find_layers(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))


class RootScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)
        self.temp = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return self.out(self.bn(self.fc(x))) * self.temp


def test_batch_norm_coupling_and_single_cases_are_refused_with_the_fix():
    net = RootScaled().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 2, (6,))
    eng = CurvatureEngine(net)
    with pytest.raises(KFACError, match=r"'<root>' holds parameters of its own \(temp\).*'bn'.*eval mode"):
        eng.statistics(x, y, "sampled")
    net.eval()
    assert len(eng.statistics(x, y, "sampled")) == 3  # in eval mode the cases are independent
    net.train()
    net.temp.requires_grad_(False)
    eng = CurvatureEngine(net)
    with pytest.raises(KFACError, match="the statistics pass sees one case.*stats_fraction"):
        eng.statistics(x[:1], y[:1], "sampled")
    assert net.bn.track_running_stats  # restored after the error


def test_a_module_with_a_tuple_output_is_named():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w, x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(self.pair(x)[0])

    eng = CurvatureEngine(Net())
    with pytest.raises(KFACError, match="'pair' \\(Pair\\) returns tuple.*exclude"):
        eng.statistics(torch.randn(4, 3), torch.randint(0, 2, (4,)), "sampled")
