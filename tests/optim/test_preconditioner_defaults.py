"""KFACPreconditioner with its defaults on README's network: a 784-50-10 tanh classifier on the
bundled digits, torch SGD — it trains without blowing up at lr 1, 0.1 and 0.01 and beats SGD at
the same lr step for step (the numbers: benchmarks/results/preconditioner.md)."""
import warnings

import pytest
import torch

import kfac_lab as kl

STEPS = 50


@pytest.fixture(scope="module")
def digits():
    return kl.data.load_mnist()


def train(X, Y, lr, kfac, seed=0):
    """Mini-batch losses of ``STEPS`` steps and the loss on all digits before and after."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(784, 50), torch.nn.Tanh(), torch.nn.Linear(50, 10))
    criterion = torch.nn.CrossEntropyLoss()
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    pre = kl.KFACPreconditioner(model, loss="categorical", lr=sgd) if kfac else None
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        initial = criterion(model(X), Y).item()
    losses = []
    for _ in range(STEPS):
        i = torch.randint(0, len(X), (100,), generator=gen)
        sgd.zero_grad()
        loss = criterion(model(X[i]), Y[i])
        loss.backward()
        if pre is not None:
            assert not pre.step().rejected
        sgd.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = criterion(model(X), Y).item()
    return initial, losses, final


@pytest.mark.parametrize("lr", [1.0, 0.1, 0.01])
def test_defaults_train_readme_network_and_beat_sgd(digits, lr):
    X, Y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rejected step, no skipped statistics
        initial, losses, final = train(X, Y, lr, kfac=True)
    _, _, sgd_final = train(X, Y, lr, kfac=False)
    assert max(losses) < 1.05 * initial, (initial, max(losses))  # never above the start by much
    assert final < 0.5 * initial, (initial, final)
    assert final < sgd_final, (final, sgd_final)  # step for step, at the same lr
