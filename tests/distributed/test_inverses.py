"""The inverses in pieces: assembled from shared tasks, they equal the library's inverses."""
import pytest
import torch

from kfac_lab.curvature import make_inverse
from kfac_lab.distributed import Communicator, run_shared
from kfac_lab.distributed.inverses import inverse_tasks

DT = torch.float64


def spd(n, seed):
    X = torch.randn(n, 2 * n, dtype=DT, generator=torch.Generator().manual_seed(seed))
    return X @ X.t() / (2 * n)


def factors(tri: bool):
    dims_a, dims_g = [4, 6, 3], [5, 2, 4]
    A = [spd(d, i) for i, d in enumerate(dims_a)]
    G = [spd(d, 10 + i) for i, d in enumerate(dims_g)]
    inp = {"A": A, "G": G, "A_off": None, "G_off": None}
    if tri:
        inp["A_off"] = [0.3 * torch.randn(dims_a[i], dims_a[i + 1], dtype=DT) for i in range(2)]
        inp["G_off"] = [0.3 * torch.randn(dims_g[i], dims_g[i + 1], dtype=DT) for i in range(2)]
    return inp


@pytest.mark.parametrize("approx,damping_type", [("blockdiag", "factored"), ("blockdiag", "tikhonov"),
                                                 ("tridiag", "factored")])
def test_assembled_inverses_are_the_library_ones(approx, damping_type):
    torch.manual_seed(0)
    inp = factors(approx == "tridiag")
    gammas = [0.3, 1.7]
    names = [f"layer {i}" for i in range(3)]
    tasks, assemble = inverse_tasks(inp, gammas, damping_type, DT, names)
    assert len({t.key for t in tasks}) == len(tasks) and all(t.cost > 0 for t in tasks)
    results, _ = run_shared(tasks, Communicator(), DT, torch.device("cpu"), "testing")
    got = assemble(results)
    assert len(got) == len(gammas)
    V = [torch.randn(g.shape[0], a.shape[0], dtype=DT) for a, g in zip(inp["A"], inp["G"])]
    for inv, g in zip(got, gammas):
        ref = make_inverse(approx, inp["A"], inp["G"], inp["A_off"], inp["G_off"], gamma=g, damping_type=damping_type)
        assert type(inv) is type(ref)
        for u, w in zip(inv.apply(V), ref.apply(V)):
            assert torch.allclose(u, w, rtol=1e-10, atol=1e-12)


def test_tridiagonal_needs_factored_damping():
    with pytest.raises(ValueError, match="factored"):
        inverse_tasks(factors(True), [1.0], "tikhonov", DT, ["a", "b", "c"])
