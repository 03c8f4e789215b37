"""The exact Fisher of small CNNs against a brute-force torch.func Fisher and curvlinops' GGN."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from kfac_lab.curvature import exact_fisher, find_layers
from kfac_lab.curvature.exact import estimate_exact_fisher_bytes
from kfac_lab.curvature.exact_shared import layer_locations
from kfac_lab.errors import FisherTooLargeError
from kfac_lab.models import figure1_cnn


def small_cnn(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias), nn.Tanh(),
        nn.Conv2d(3, 2, 2, dilation=2, padding="same", bias=False), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 4, bias=bias),
    ).double()


def paper_order(model):
    """Indices into torch's flat parameters (named_parameters order) in the paper's order."""
    layers = find_layers(model)
    starts, pos = {}, 0
    for name, p in model.named_parameters():
        starts[name] = (pos, p)
        pos += p.numel()
    idx = []
    for l in layers:
        w0, w = starts[f"{l.name}.weight"]
        wi = torch.arange(w0, w0 + w.numel()).reshape(w.shape)
        bi = None
        if l.has_bias:
            b0, b = starts[f"{l.name}.bias"]
            bi = torch.arange(b0, b0 + b.numel())
        idx.append(l.to_matrix(wi, bi).t().reshape(-1))  # vec: column-stacked
    return torch.cat(idx)


def brute_force_fisher(model, x):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(logits), in_dims=(None, 0))(params, x)  # dict of (n, c, *shape)
    J = torch.cat([jac[k].flatten(2) for k in params], dim=2)   # (n, c, P)
    p = torch.softmax(logits_all := model(x).detach(), dim=1)
    FR = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    F = torch.einsum("ncp,ncd,ndq->pq", J, FR, J) / x.shape[0]
    order = paper_order(model)
    return F[order][:, order], logits_all


@pytest.mark.parametrize("bias", [True, False])
def test_exact_fisher_of_a_cnn_matches_brute_force(bias):
    model = small_cnn(bias)
    x = torch.randn(6, 2, 8, 8, dtype=torch.float64)
    F = exact_fisher(model, "categorical", x)
    ref, _ = brute_force_fisher(model, x)
    torch.testing.assert_close(F.dense, ref, rtol=1e-9, atol=1e-12)
    names = F.param_names()  # output channel, input channel, kernel row, kernel column
    assert names[1] == "L1 W[o1, c0, kh0, kw0]" and names[3 * 4] == "L1 W[o0, c0, kh1, kw1]"
    if bias:
        assert names[3 * 19 - 1] == "L1 b[o2]"


def test_exact_fisher_of_fig1_cnn_matches_curvlinops_ggn():
    curvlinops = pytest.importorskip("curvlinops")
    model = figure1_cnn(seed=0, dtype=torch.float64)
    x = torch.rand(20, 256, dtype=torch.float64)
    y = torch.randint(0, 10, (20,))
    F = exact_fisher(model, "categorical", x, chunk_size=7)  # several chunks
    params = list(model.parameters())
    op = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)
    G = op @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    order = paper_order(model)
    torch.testing.assert_close(F.dense, G[order][:, order], rtol=1e-8, atol=1e-12)


def test_linear_on_sequences_exact_fisher_matches_brute_force():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3)).double()
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    ref, _ = brute_force_fisher(model, x)
    torch.testing.assert_close(exact_fisher(model, "categorical", x).dense, ref, rtol=1e-9, atol=1e-12)


def test_exact_fisher_of_a_cnn_is_refused_before_allocating(monkeypatch):
    model = figure1_cnn()
    x = torch.rand(5000, 256)
    layers = find_layers(model)
    T = layer_locations(model, layers, x[:1])
    assert T == [64, 16, 0]
    need = estimate_exact_fisher_bytes(layers, 5000, 10, locations=T)
    allocated = []
    real_zeros = torch.zeros
    monkeypatch.setattr(torch, "zeros", lambda *a, **k: allocated.append(a) or real_zeros(*a, **k))
    with pytest.raises(FisherTooLargeError, match=r"2,746 parameters.*\|T\| = 64, 16, 1.*max_bytes"):
        exact_fisher(model, "categorical", x, max_bytes=need // 2)
    assert not any(a and a[0] == 2746 for a in allocated)
