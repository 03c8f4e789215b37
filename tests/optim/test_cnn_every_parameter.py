"""A CNN with batch norm trains with K-FAC (block-diagonal and EKFAC) with every trainable parameter
moving: the convolutions and the Linear layer by their Kronecker blocks, BatchNorm2d's scale and shift
by their diagonal Fisher blocks (issue: every parameter covered)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kfac_lab.optim import KFAC, KFACPreconditioner

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")]


def cnn_bn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5),
    )


def data(n=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 10, 10, generator=g)
    y = (x[:, 0, :5].sum(dim=(1, 2)) > 0).long() + 2 * (x[:, 0, 5:].sum(dim=(1, 2)) > 0).long()
    return x, y


@pytest.mark.parametrize("approx", ["blockdiag", "ekfac"])
def test_kfac_moves_every_parameter_of_a_cnn_with_batch_norm(approx):
    model = cnn_bn()
    x, y = data()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = KFAC(model, "categorical", approx=approx, damping=1.0, T1=2, T2=4, T3=2, seed=0)
    assert {n for n, _ in model.named_parameters() if n.startswith(("1.", "4."))} == \
        {n for n, p in model.named_parameters() if any(p is q for q in opt.diagonal_params)}
    losses = [opt.step(x, y).loss for _ in range(12)]
    moved = {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}
    assert all(moved.values()), [n for n, m in moved.items() if not m]
    assert losses[-1] < 0.7 * losses[0]
    assert int(model[1].num_batches_tracked) == 12  # the extra passes leave batch norm's statistics alone


def test_preconditioner_preconditions_every_parameter_of_a_cnn_with_batch_norm():
    model = cnn_bn()
    x, y = data()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(model, "categorical", lr=sgd, inverse_update_freq=2, seed=0)
    assert pre.plain_gradient == ()
    first = None
    for _ in range(10):
        sgd.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        raw = {n: p.grad.clone() for n, p in model.named_parameters()}
        pre.step()
        changed = {n: not torch.equal(p.grad, raw[n]) for n, p in model.named_parameters()}
        sgd.step()
        first = loss.item() if first is None else first
    assert all(changed.values()), [n for n, c in changed.items() if not c]
    assert loss.item() < first


def test_gradient_blocks_with_weight_decay_are_written_once_per_layer():
    """∇h = ∇nll + ηθ as [W|b] blocks (a convolution with and without bias, a Linear layer) and the
    diagonal blocks' parameters (BatchNorm2d): the fused writes equal the plain sum, then blocks."""
    model = cnn_bn()
    opt = KFAC(model, "categorical")
    g = torch.Generator().manual_seed(3)
    fresh = lambda: [torch.randn(p.shape, generator=g) for p in opt.params]  # noqa: E731
    grads, theta, eta = fresh(), fresh(), 0.37
    expected = opt._as_blocks([a + eta * b for a, b in zip(grads, theta)])
    got = opt._as_blocks([a.clone() for a in grads], theta, eta)
    assert len(got) == len(expected) == len(opt.layers) + len(opt.params) - sum(len(l.params) for l in opt.layers)
    for u, v in zip(got, expected):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-6)
    for u, l in zip(got, opt.layers):
        assert u.shape == (l.d_out, l.in_dim)
    # without a weight decay (η = 0, or no plus) the blocks are the gradients' own
    for plain in (opt._as_blocks([a.clone() for a in grads]), opt._as_blocks([a.clone() for a in grads], theta, 0.0)):
        for u, v in zip(plain, opt._as_blocks(grads)):
            assert torch.equal(u, v)
