"""The hand-written forward/backward modes of ``SequentialPlan`` against autograd and torch.func."""
import pytest
import torch
from torch import nn

from kfac_lab.curvature import Capture, find_layers, get_loss
from kfac_lab.curvature.products import SequentialPlan, func_jvp, gram_from_jvps

DT = torch.float64


def make_net(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 3, bias=False), act(), nn.Linear(3, 2)).to(DT)


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid, nn.ReLU])
def test_plan_jvp_and_backward_match_autograd(act):
    model = make_net(act)
    layers = find_layers(model)
    plan = SequentialPlan.build(model, layers)
    assert plan is not None
    x = torch.randn(7, 5, dtype=DT)
    with Capture(layers, inputs=True, grads=False) as cap:
        z = model(x)
    # forward mode: three directions at once equal torch.func.jvp
    dirs = [[torch.randn(l.d_out, l.in_dim, dtype=DT) for l in layers] for _ in range(3)]
    names = [n for n, _ in model.named_parameters()]
    tangents = []
    for d in dirs:
        flat = []
        for l, m in zip(layers, d):
            w, b = l.from_matrix(m)
            flat += [w] + ([b] if b is not None else [])
        tangents.append(dict(zip(names, flat)))
    Jd = plan.jvp(cap.a, dirs)
    torch.testing.assert_close(Jd, func_jvp(model, x, tangents))
    # shared derivatives of more rows give the same answer on a prefix of the cases
    derivs = plan.derivatives(cap.a)
    torch.testing.assert_close(plan.jvp([t[:4] for t in cap.a], dirs, derivs), Jd[:, :4])
    # backward mode: per-case g equals autograd's ∂(dz·z)/∂s_i
    dz = torch.randn(4, 2, dtype=DT)
    with Capture(layers, inputs=True, grads=False, outputs=True) as cap2:
        z = model(x[:4])
    g_auto = torch.autograd.grad(z, cap2.s, dz)
    for mine, ref in zip(plan.backward(cap.a, dz, derivs), g_auto):
        torch.testing.assert_close(mine, ref)
    # the Gram of the JVPs is dᵀ F d with the output Fisher
    Q = gram_from_jvps(get_loss("gaussian"), z.detach(), Jd[:, :4])
    torch.testing.assert_close(Q, torch.einsum("knc,lnc->kl", Jd[:, :4], Jd[:, :4]) / 4)
