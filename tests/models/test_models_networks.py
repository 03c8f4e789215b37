"""Architectures of the section-13 autoencoders and the figure-1 MLP; sparse init."""

import pytest
import torch
from torch import nn

from kfac_lab.models import (
    AUTOENCODER_LOSS,
    AUTOENCODER_SIZES,
    autoencoder,
    count_parameters,
    figure1_network,
    layer_sizes,
    linear_layers,
    mlp,
    sparse_init_,
)

EXPECTED_SIZES = {
    "mnist": (784, 1000, 500, 250, 30, 250, 500, 1000, 784),
    "curves": (784, 400, 200, 100, 50, 25, 6, 25, 50, 100, 200, 400, 784),
    "faces": (625, 2000, 1000, 500, 30, 500, 1000, 2000, 625),
}
# sum over layers of (fan_in + 1) * fan_out
EXPECTED_PARAMS = {"mnist": 2_837_314, "curves": 842_340, "faces": 7_537_655}


@pytest.fixture(scope="module")
def models():
    return {k: autoencoder(k) for k in EXPECTED_SIZES}


@pytest.mark.parametrize("name", sorted(EXPECTED_SIZES))
def test_autoencoder_architecture(models, name):
    m = models[name]
    sizes = EXPECTED_SIZES[name]
    assert AUTOENCODER_SIZES[name] == sizes and m.layer_sizes == sizes
    assert layer_sizes(m) == list(sizes)
    assert count_parameters(m) == EXPECTED_PARAMS[name]
    pairs = zip(sizes[:-1], sizes[1:], strict=True)
    assert EXPECTED_PARAMS[name] == sum((a + 1) * b for a, b in pairs)
    assert isinstance(m, nn.Sequential)
    assert all(isinstance(x, (nn.Linear, nn.Sigmoid)) for x in m)
    # logistic after every Linear except the code layer and the output layer
    lin_pos = [i for i, x in enumerate(m) if isinstance(x, nn.Linear)]
    code = len(sizes) // 2 - 1                           # index (among Linears) of the code layer
    assert m.code_layer == code and linear_layers(m)[code].out_features == min(sizes)
    for j, i in enumerate(lin_pos):
        followed_by_sigmoid = i + 1 < len(m) and isinstance(m[i + 1], nn.Sigmoid)
        assert followed_by_sigmoid == (j not in (code, len(lin_pos) - 1)), (name, j)
    assert not isinstance(m[-1], nn.Sigmoid)             # logits / linear output


def test_loss_names(models):
    assert AUTOENCODER_LOSS == {"mnist": "bernoulli", "curves": "bernoulli", "faces": "gaussian"}
    for k, m in models.items():
        assert m.kfac_loss == AUTOENCODER_LOSS[k] and m.kfac_name == k
    assert figure1_network().kfac_loss == "categorical"


def test_output_is_logits_and_code_is_linear(models):
    m = models["curves"]
    x = torch.rand(64, 784)
    out = m(x)
    assert out.shape == (64, 784)
    assert (out < 0).any() or (out > 1).any()            # not squashed into (0, 1)
    lin_pos = [i for i, layer in enumerate(m) if isinstance(layer, nn.Linear)]
    code = m[: lin_pos[m.code_layer] + 1](x)
    assert code.shape == (64, 6) and ((code < 0).any() or (code > 1).any())


def test_sparse_init_autoencoders(models):
    for m in models.values():
        for lin in linear_layers(m):
            nnz = (lin.weight != 0).sum(1)
            assert torch.all(nnz == min(15, lin.in_features))
            assert torch.all(lin.bias == 0)
    # the CURVES decoder's first layer has fan_in 6 < 15: all 6 weights nonzero
    lin = linear_layers(models["curves"])[6]
    assert lin.in_features == 6 and torch.all(lin.weight != 0)


def test_sparse_init_statistics_and_determinism():
    a = autoencoder("curves", seed=3)
    b = autoencoder("curves", seed=3)
    c = autoencoder("curves", seed=4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert not torch.equal(a[0].weight, c[0].weight)
    w = a[0].weight[a[0].weight != 0]                      # 400*15 N(0,1) draws
    assert abs(w.mean().item()) < 0.1 and abs(w.std().item() - 1) < 0.1
    # positions spread over the inputs, not clustered
    assert (a[0].weight != 0).any(0).sum() > 600
    # global RNG untouched
    torch.manual_seed(0)
    r1 = torch.rand(3)
    torch.manual_seed(0)
    autoencoder("curves")
    assert torch.equal(torch.rand(3), r1)


def test_sparse_init_small_fan_in_and_options():
    m = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 30, bias=False))
    sparse_init_(m, nonzero=5, seed=1)
    assert torch.all((m[0].weight != 0).sum(1) == 4) and torch.all(m[0].bias == 0)
    assert torch.all((m[2].weight != 0).sum(1) == 5)
    m64 = mlp([50, 40, 3], "relu", dtype=torch.float64, init="sparse", nonzero=2, seed=0)
    assert m64[0].weight.dtype == torch.float64
    assert torch.all((m64[0].weight != 0).sum(1) == 2)
    with pytest.raises(ValueError):
        sparse_init_(m, nonzero=0)


def test_figure1_network():
    net = figure1_network()
    assert count_parameters(net) == 6610
    assert layer_sizes(net) == [256, 20, 20, 20, 20, 10]
    assert [type(x) for x in net] == [nn.Linear, nn.Tanh] * 4 + [nn.Linear]
    out = net(torch.rand(5, 256))
    assert out.shape == (5, 10)
    assert torch.equal(figure1_network(seed=2)[0].weight, figure1_network(seed=2)[0].weight)
    assert not torch.equal(figure1_network(seed=2)[0].weight, net[0].weight)
    bound = 1 / 256 ** 0.5
    assert net[0].weight.abs().max() <= bound and net[0].weight.abs().max() > 0.9 * bound


def test_mlp_options():
    m = mlp([3, 5, 2], "logistic", bias=False, output_activation="sigmoid")
    assert [type(x) for x in m] == [nn.Linear, nn.Sigmoid, nn.Linear, nn.Sigmoid]
    assert count_parameters(m) == 3 * 5 + 5 * 2
    assert [type(x) for x in mlp([3, 5, 2], None)] == [nn.Linear, nn.Linear]
    assert isinstance(mlp([3, 5, 2], nn.GELU)[1], nn.GELU)
    assert mlp([3, 2], dtype=torch.float64)[0].weight.dtype == torch.float64
    with pytest.raises(ValueError, match="activation"):
        mlp([3, 5, 2], "swoosh")
    with pytest.raises(ValueError):
        mlp([3])
    with pytest.raises(ValueError):
        autoencoder("cifar")
    with pytest.raises(ValueError):
        autoencoder("mnist", init="orthogonal")


def test_autoencoder_dtype_and_default_init():
    m = autoencoder("curves", dtype=torch.float64, init="default")
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert (m[0].weight != 0).float().mean() > 0.99
    assert m(torch.rand(2, 784, dtype=torch.float64)).shape == (2, 784)
