"""The CNN problems: shapes, parameter counts, seeds, and their K-FAC layers."""
import torch

from kfac_lab.curvature import find_layers
from kfac_lab.models import FIGURE1_CNN_PARAMS, MNIST_CNN_PARAMS, figure1_cnn, mnist_cnn
from kfac_lab.train import get_problem


def test_cnn_problems_build_their_models_on_their_data():
    for name, side, params in (("mnist-cnn", 28, MNIST_CNN_PARAMS), ("fig1-cnn", 16, FIGURE1_CNN_PARAMS)):
        p = get_problem(name, n=50)
        assert p.kind == "classifier" and p.loss == "categorical" and p.X.shape == (50, side * side)
        model = p.make_model(3)
        assert sum(q.numel() for q in model.parameters()) == params
        assert model(p.X[:4]).shape == (4, 10)
        layers = find_layers(model)
        assert [l.is_conv for l in layers] == [True, True, False]
        assert 0 <= p.error(model) <= 1 and name in p.describe() or "CNN" in p.describe()


def test_cnn_seeds_are_reproducible_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = mnist_cnn(seed=1), mnist_cnn(seed=1), mnist_cnn(seed=2)
    assert torch.rand(1) == before
    assert all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[1].weight, c[1].weight)
    assert figure1_cnn(dtype=torch.float64)[1].weight.dtype == torch.float64
