"""Problems: shapes, losses, defaults and the paper's metric on hand-computable cases."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from kfac_lab.train import PROBLEMS, Problem, canonical_optimizer, get_problem
from kfac_lab.train.problems import classification_error, reconstruction_error


def test_registry_names_and_unknown_name_lists_them():
    assert set(PROBLEMS) == {"mnist", "curves", "faces", "figure1", "mnist-small", "tiny", "mnist-cnn", "fig1-cnn"}
    with pytest.raises(ValueError, match="unknown problem 'nope'.*tiny"):
        get_problem("nope")
    with pytest.raises(ValueError, match="unknown keyword"):
        get_problem("tiny", colour="red")
    with pytest.raises(ValueError, match="n must be a positive integer"):
        get_problem("tiny", n=0)


@pytest.mark.parametrize("name, d, loss, kind", [
    ("tiny", 64, "bernoulli", "autoencoder"),
    ("mnist-small", 784, "bernoulli", "autoencoder"),
    ("mnist", 784, "bernoulli", "autoencoder"),
    ("figure1", 256, "categorical", "classifier"),
])
def test_shapes_losses_and_models(name, d, loss, kind):
    p = get_problem(name, n=300)
    assert p.n == 300 and p.X.shape == (300, d) and p.loss == loss and p.kind == kind
    assert p.name in p.describe() and "\n" not in p.describe()
    if kind == "autoencoder":
        assert p.Y is p.X
    else:
        assert p.Y.dtype == torch.int64 and p.Y.shape == (300,)
    assert float(p.X.min()) >= 0.0 and float(p.X.max()) <= 1.0
    if name != "mnist":  # (the big one is built in the model tests)
        model = p.make_model(0)
        with torch.no_grad():
            out = model(p.X[:5])
        assert out.shape == ((5, d) if kind == "autoencoder" else (5, 10))
        again = p.make_model(0)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    for opt in ("kfac", "sgd", "adam"):
        assert 1 <= p.default_batch_size(opt) <= p.n
        assert isinstance(p.default_options(opt), dict)


def test_tiny_and_small_architectures():
    tiny = get_problem("tiny").make_model(0)
    lin = [m for m in tiny if isinstance(m, nn.Linear)]
    assert [l.in_features for l in lin] + [lin[-1].out_features] == [64, 16, 4, 16, 64]
    # logistic hidden units, linear code layer (no activation after the 2nd Linear), linear output
    kinds = [type(m).__name__ for m in tiny]
    assert kinds == ["Linear", "Sigmoid", "Linear", "Linear", "Sigmoid", "Linear"]
    small = get_problem("mnist-small").make_model(0)
    sizes = [m.out_features for m in small if isinstance(m, nn.Linear)]
    assert sizes == [200, 30, 200, 784]
    # sparse init: 15 nonzero incoming weights per unit, zero biases
    first = [m for m in small if isinstance(m, nn.Linear)][0]
    assert (first.weight != 0).sum(1).eq(15).all() and first.bias.eq(0).all()


def test_curves_default_size_and_faces_needs_a_file(tmp_path, monkeypatch):
    assert get_problem("curves", n=50).X.shape == (50, 784)
    monkeypatch.delenv("KFAC_LAB_FACES", raising=False)
    with pytest.raises(FileNotFoundError, match=r"path=.*KFAC_LAB_FACES.*--faces"):
        get_problem("faces")
    imgs = np.random.default_rng(0).random((12, 25, 25)).astype(np.float32)
    np.savez(tmp_path / "faces.npz", images=imgs)
    p = get_problem("faces", path=str(tmp_path / "faces.npz"))
    assert p.X.shape == (12, 625) and p.loss == "gaussian" and p.params["path"].endswith("faces.npz")
    monkeypatch.setenv("KFAC_LAB_FACES", str(tmp_path))
    assert get_problem("faces", n=5).n == 5


class Const(nn.Module):
    """Outputs a fixed tensor row for every case."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.as_tensor(row, dtype=torch.float32)
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.row.expand(x.shape[0], -1) + 0 * self.w


def test_reconstruction_error_by_hand():
    X = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    model = Const([0.0, 0.0])  # logits 0 -> sigmoid 0.5 everywhere
    err, nll = reconstruction_error(model, X, X, "bernoulli")
    assert err == pytest.approx(0.5)          # each case: 0.25 + 0.25, mean over cases
    assert nll == pytest.approx(2 * math.log(2))
    # Gaussian output: no sigmoid; errors 0+1 and 1+1 -> mean 1.5
    err, nll = reconstruction_error(model, X, X, "gaussian")
    assert err == pytest.approx(1.5) and nll == pytest.approx(0.75)
    p = Problem("hand", lambda seed: Const([0.0, 0.0]), "bernoulli", X, X)
    assert p.error(model) == pytest.approx(0.5)
    assert p.evaluate(model)["nll"] == pytest.approx(2 * math.log(2))


def test_classification_error_by_hand():
    X = torch.zeros(4, 3)
    Y = torch.tensor([0, 1, 0, 2])
    model = Const([2.0, 0.0, 0.0])  # always predicts class 0
    err, nll = classification_error(model, X, Y)
    assert err == pytest.approx(0.5)
    logp = torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), 0)
    assert nll == pytest.approx(float(-(2 * logp[0] + logp[1] + logp[2]) / 4), rel=1e-6)
    p = Problem("cls", lambda seed: model, "categorical", X, Y, kind="classifier")
    assert p.evaluate(model) == pytest.approx({"error": 0.5, "nll": nll})


def test_problem_validation_and_optimizer_names():
    with pytest.raises(ValueError, match="same number"):
        Problem("bad", lambda s: None, "bernoulli", torch.zeros(3, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="kind"):
        Problem("bad", lambda s: None, "bernoulli", torch.zeros(3, 2), torch.zeros(3, 2), kind="gan")
    assert canonical_optimizer("SGD-Nesterov") == "sgd" and canonical_optimizer("K-FAC") == "kfac"
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        canonical_optimizer("rmsprop")


def test_to_dtype_keeps_autoencoder_targets_identical():
    p = get_problem("tiny", n=20).to(dtype=torch.float64)
    assert p.X.dtype == torch.float64 and p.Y is p.X
