"""DistributedEngine in one process is the CurvatureEngine (the two-rank runs are in
tests/optim/test_distributed.py): the same subsets, factors, inverses and state."""
import pytest
import torch
from torch import nn

from kfac_lab.curvature.engine import CurvatureEngine
from kfac_lab.distributed import Communicator, DistributedEngine

DT = torch.float64


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize("capture", ["sequential", "func"])
@pytest.mark.parametrize("approx", ["blockdiag", "tridiag"])
def test_world_of_one_is_the_engine(capture, approx):
    net = model()
    opts = dict(pairs="tridiag", capture=capture, seed=4)
    plain = CurvatureEngine(net, "categorical", **opts)
    dist = DistributedEngine(net, "categorical", comm=Communicator(), approx=lambda: approx, **opts)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(21, 5, dtype=DT, generator=g)
        sizes = [e.subset_sizes(21, 1 / 4, 1 / 2) for e in (plain, dist)]
        assert sizes[0] == sizes[1] == (21, 5, 10)
        n1 = sizes[0][1]
        for e in (plain, dist):
            z, acts = e.forward(net, x, n1)
            stats = e.statistics(x[:n1], None, "sampled", z=z[:n1].detach(), acts=acts)
            e.update_factors(stats)
    for k in plain.factors.pairs:
        assert torch.allclose(dist.factors.A[k], plain.factors.A[k], rtol=1e-12, atol=1e-14), k
        assert torch.allclose(dist.factors.G[k], plain.factors.G[k], rtol=1e-12, atol=1e-14), k
    V = [torch.randn(l.d_out, l.in_dim, dtype=DT) for l in plain.layers]
    for a, b in zip(plain.refresh(approx, [0.5, 2.0], "factored"), dist.refresh(approx, [0.5, 2.0], "factored")):
        for u, w in zip(a.apply(V), b.apply(V)):
            assert torch.allclose(u, w, rtol=1e-10, atol=1e-12)
    assert dist.inverse_stats["tasks"] == dist.inverse_stats["total_tasks"] and dist.inverse_time["refreshes"] == 1
    # the state is the engine's: a plain engine loads it
    state = dist.state_dict()
    other = CurvatureEngine(model(), "categorical", **opts)
    other.load_checked(other.check_state(state, _checker()))
    for k in plain.factors.pairs:
        assert torch.equal(other.factors.A[k], dist.factors.A[k])
    assert dist.host_syncs == 0 and dist.comm.stats.total_bytes == 0


def test_statistics_trace_matches_the_engine():
    net = model()
    plain = CurvatureEngine(net, "categorical", capture="sequential")
    dist = DistributedEngine(net, "categorical", comm=Communicator(), approx=lambda: "tridiag", capture="sequential")
    x = torch.randn(8, 5, dtype=DT)
    traces = []
    for e in (plain, dist):
        e.subset_sizes(8, 1.0, 1.0)
        z, acts = e.forward(net, x, 8)
        traces.append(e.statistics_trace(e.statistics(x, None, "sampled", z=z.detach(), acts=acts)))
    assert torch.allclose(traces[0], traces[1], rtol=1e-12)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="sampling"):
        DistributedEngine(model(), comm=Communicator(), approx=lambda: "blockdiag", sampling="nowhere")
    with pytest.raises(ValueError, match="factor_sync"):
        DistributedEngine(model(), comm=Communicator(), approx=lambda: "blockdiag", factor_sync="sometimes")


def _checker():
    from kfac_lab.optim.state_check import Checker
    return Checker("test")
