"""Forward-mode J·d by linearity (layered_jvp) against torch.func's jvp, and its fallbacks."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

from kfac_lab.curvature.layered_jvp import layered_jvp
from kfac_lab.curvature.products import func_jvp
from kfac_lab.models import figure1_cnn, mnist_cnn


def reference(model, x, tangents):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    full = [{n: t.get(n, torch.zeros_like(p)) for n, p in params.items()} for t in tangents]
    f = lambda p: functional_call(model, p, (x,))  # noqa: E731
    return torch.stack([jvp(f, (params,), (t,))[1] for t in full]).reshape(len(tangents), x.shape[0], -1)


def tangents(model, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
             if p.requires_grad} for _ in range(k)]


def odd_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Unflatten(1, (2, 8, 8)),
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
        nn.Conv2d(3, 2, 2, dilation=2, padding="same", bias=False), nn.Sigmoid(),
        nn.Flatten(), nn.Linear(2 * 4 * 4, 4), nn.ReLU(), nn.Identity(), nn.Linear(4, 3, bias=False),
    ).double()


@pytest.mark.parametrize("build,d_in", [(lambda: mnist_cnn(dtype=torch.float64), 784),
                                        (lambda: figure1_cnn(dtype=torch.float64), 256), (odd_cnn, 128)])
def test_matches_torch_func(build, d_in):
    model = build()
    x = torch.randn(5, d_in, dtype=torch.float64)
    t = tangents(model)
    out = layered_jvp(model, x, t)
    assert out.shape == (3, 5, model[-1].out_features)
    torch.testing.assert_close(out, reference(model, x, t), rtol=1e-10, atol=1e-12)


def test_linear_on_sequences_and_a_frozen_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].weight.requires_grad_(False)  # no tangent for it: a zero direction
    x = torch.randn(3, 5, 4, dtype=torch.float64)  # weights shared over 5 positions
    t = tangents(model, k=2)
    out = layered_jvp(model, x, t)
    assert out.shape == (2, 3, 10)
    torch.testing.assert_close(out, reference(model, x, t), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 2)),
    nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.Flatten(), nn.Linear(18, 2)),
    nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2)),
    nn.Sequential(nn.Conv2d(2, 2, 3), nn.MaxPool2d(1), nn.Flatten(), nn.Linear(2, 2)),
])
def test_uncovered_models_fall_back_to_torch_func(model):
    model = model.double().eval()
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    t = tangents(model, k=2)
    assert layered_jvp(model, x, t) is None
    torch.testing.assert_close(func_jvp(model, x, t), reference(model, x, t), rtol=1e-10, atol=1e-12)
