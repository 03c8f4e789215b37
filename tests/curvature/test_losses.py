import pytest
import torch

from kfac_lab.curvature import get_loss


def dense_output_fisher(name, z):
    """F_R per case as dense (m, c, c) from the Hessian of the NLL wrt z (GGN = Fisher for these)."""
    loss = get_loss(name)
    y = loss.sample(z)  # the Hessian of these NLLs does not depend on y
    H = []
    for n in range(z.shape[0]):
        f = lambda zz: loss.nll_per_case(zz.unsqueeze(0), y[n:n + 1]).sum()
        H.append(torch.autograd.functional.hessian(f, z[n]))
    return torch.stack(H)


@pytest.mark.parametrize("name", ["categorical", "bernoulli", "gaussian"])
def test_fisher_sqrt_and_products_match_the_hessian(name):
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.float64)
    loss = get_loss(name)
    FR = dense_output_fisher(name, z)
    B = loss.fisher_sqrt(z)  # (k, m, c)
    torch.testing.assert_close(torch.einsum("kmc,kmd->mcd", B, B), FR)
    v = torch.randn(2, 4, 3, dtype=torch.float64)
    torch.testing.assert_close(loss.fisher_vp(z, v), torch.einsum("mcd,bmd->bmc", FR, v))


@pytest.mark.parametrize("name", ["categorical", "bernoulli", "gaussian"])
def test_grad_output_is_autograd_and_fisher_is_expected_outer_product_of_sampled_grads(name):
    torch.manual_seed(1)
    loss = get_loss(name)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = loss.sample(z)
    (auto,) = torch.autograd.grad(loss.nll_per_case(z, y).sum(), z)
    torch.testing.assert_close(loss.grad_output(z, y), auto)
    # E_y[∇ ∇ᵀ] under the model's distribution is F_R (Monte Carlo, 20k samples)
    gen = torch.Generator().manual_seed(0)
    zz = z.detach()[:1].expand(20000, 4)
    g = loss.grad_output(zz, loss.sample(zz, gen))
    torch.testing.assert_close(g.t() @ g / 20000, dense_output_fisher(name, z.detach()[:1])[0], atol=0.05, rtol=0.1)


def test_nll_values():
    z = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    assert get_loss("categorical").nll(z, torch.tensor([1])).item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert get_loss("gaussian").nll(z, torch.ones(1, 2, dtype=torch.float64)).item() == pytest.approx(1.0)
    assert get_loss("bernoulli").nll(z, torch.ones(1, 2, dtype=torch.float64)).item() == pytest.approx(2 * 0.6931471805599453)


def test_bad_names_and_targets():
    with pytest.raises(ValueError, match="unknown loss 'hinge'.*categorical"):
        get_loss("hinge")
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="integer class indices"):
        get_loss("categorical").check_target(z, torch.zeros(2))
    with pytest.raises(ValueError, match="must equal output shape"):
        get_loss("bernoulli").check_target(z, torch.zeros(2, 2))
    assert get_loss("softmax").name == "categorical" and get_loss("mse").name == "gaussian"
