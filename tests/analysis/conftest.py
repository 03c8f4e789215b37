import pytest
import torch
from torch import nn

DT = torch.float64


@pytest.fixture(autouse=True, scope="package")
def _one_thread():
    """Everything here is tiny: on a loaded 2-core machine OpenMP regions for tiny ops cost more
    than the ops themselves."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_net(sizes=(4, 3, 3, 2), act=nn.Tanh, seed=0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b).to(DT)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=DT) * 1.2 / a**0.5)
            lin.bias.copy_(torch.randn(b, generator=g, dtype=DT) * 0.3)
        mods.append(lin)
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


def tiny_data(m=40, d=4, c=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, d, generator=g, dtype=DT)
    y = torch.randint(0, c, (m,), generator=g)
    return x, y
