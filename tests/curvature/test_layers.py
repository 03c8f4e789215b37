import pytest
import torch
from torch import nn

from kfac_lab.curvature import Capture, find_layers
from kfac_lab.errors import KFACError, UnsupportedLayerError


def mlp(bias=(True, False, True)):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4, bias=bias[0]), nn.Tanh(), nn.Linear(4, 3, bias=bias[1]), nn.Sigmoid(),
                         nn.Linear(3, 2, bias=bias[2])).double()


def test_find_layers_in_order_with_dims():
    layers = find_layers(mlp())
    assert [l.name for l in layers] == ["0", "2", "4"]
    assert [(l.in_dim, l.d_out, l.has_bias) for l in layers] == [(6, 4, True), (4, 3, False), (4, 2, True)]
    assert sum(l.num_params for l in layers) == 6 * 4 + 4 * 3 + 4 * 2


def test_forward_order_traced_differs_from_registration():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.second = nn.Linear(4, 2)
            self.first = nn.Linear(3, 4)

        def forward(self, x):
            return self.second(torch.tanh(self.first(x)))

    net = Net()
    assert [l.name for l in find_layers(net)] == ["second", "first"]
    assert [l.name for l in find_layers(net, example_input=torch.randn(2, 3))] == ["first", "second"]


def test_unsupported_modules_named_in_one_error_and_exclude_skips_them():
    net = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with pytest.raises(UnsupportedLayerError) as info:
        find_layers(net)
    msg = str(info.value)
    assert "0 (Conv1d)" in msg and "3 (LayerNorm)" in msg and "exclude" in msg
    layers = find_layers(net, exclude=["0", net[3]])
    assert [l.name for l in layers] == ["2", "4"]
    with pytest.raises(ValueError, match="no module named 'nope'"):
        find_layers(net, exclude=["nope"])


def test_layer_used_twice_is_reported():
    lin = nn.Linear(3, 3)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x)))

    with pytest.raises(KFACError, match="used twice"):
        find_layers(Tied(), example_input=torch.randn(2, 3))
    layers = find_layers(Tied())
    with pytest.raises(KFACError, match="ran twice"):
        with Capture(layers):
            Tied()(torch.randn(2, 3))


def test_capture_gives_homogeneous_inputs_and_per_case_grads():
    model = mlp()
    layers = find_layers(model)
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randn(7, 2, dtype=torch.float64)
    with Capture(layers, grad_scale=7) as cap:
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
    # ā of layer 0 is [x, 1]; layer 1 has no bias, so no ones column
    assert torch.equal(cap.a[0][:, :5], x) and torch.all(cap.a[0][:, 5] == 1)
    assert cap.a[1].shape == (7, 4)
    # per-case g of the output layer is (z - y); the gradient [dW | db] = Σ_n g ā ᵀ / m
    z = model(x).detach()
    torch.testing.assert_close(cap.g[2], z - y)
    for l in layers:
        torch.testing.assert_close(l.grad_matrix(), cap.g[l.index].t() @ cap.a[l.index] / 7)


def test_matrix_round_trip():
    layer = find_layers(mlp())[0]
    W, b = layer.from_matrix(layer.weight_matrix())
    assert torch.equal(W, layer.module.weight) and torch.equal(b, layer.module.bias)


def test_capture_and_output_gradients_on_a_subset_of_layers():
    from kfac_lab.curvature import output_gradients

    model = mlp()
    layers = find_layers(model)
    x = torch.randn(4, 5, dtype=torch.float64)
    a_all, g_all, _ = output_gradients(model, layers, "gaussian", x, mode="exact")
    a_sub, g_sub, _ = output_gradients(model, [layers[1]], "gaussian", x, mode="exact")
    assert torch.equal(a_sub[0], a_all[1]) and torch.equal(g_sub[0], g_all[1])
