"""The dense exact Fisher against brute force and against independent libraries (float64)."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

from kfac_lab.curvature import batch_factors, factor_pairs, find_layers, kron_fisher_dense, output_gradients
from kfac_lab.curvature.exact import FisherMatrix, estimate_exact_fisher_bytes, exact_fisher
from kfac_lab.errors import FisherTooLargeError, NonFiniteError, UnsupportedLayerError

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # from torch.func internals

DT = torch.float64
LOSSES = ("categorical", "bernoulli", "gaussian")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Everything here is tiny: on a loaded 2-core machine, OpenMP regions for tiny ops cost
    ~0.5 ms each (a 6×3 softmax: 500 µs with 2 threads, 1.5 µs with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------
# Helpers: models, targets, the paper's ordering, a brute-force Fisher.

def mlp(dims, acts=None, bias=True, seed=0) -> nn.Sequential:
    """Linear layers ``dims[0] → … → dims[-1]`` with activations between; ``bias`` bool or per layer."""
    torch.manual_seed(seed)
    n = len(dims) - 1
    acts = acts or [nn.Tanh] * (n - 1)
    biases = [bias] * n if isinstance(bias, bool) else list(bias)
    mods: list[nn.Module] = []
    for i in range(n):
        mods.append(nn.Linear(dims[i], dims[i + 1], bias=biases[i]))
        if i < n - 1:
            mods.append(acts[i]())
    return nn.Sequential(*mods).to(DT)


def targets(loss: str, n: int, c: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if loss == "categorical":
        return torch.randint(0, c, (n,), generator=g)
    if loss == "bernoulli":
        return torch.rand(n, c, generator=g, dtype=DT).round()
    return torch.randn(n, c, generator=g, dtype=DT)


def paper_perm(model: nn.Module) -> torch.Tensor:
    """For each paper-ordered parameter (vec of [W | b], column-stacked), its index in the
    torch order (per layer: W row-major, then b)."""
    perm, start = [], 0
    for l in find_layers(model):
        w = torch.arange(l.d_out * l.d_in).view(l.d_out, l.d_in) + start
        cols = [w] + ([(torch.arange(l.d_out) + start + w.numel()).unsqueeze(1)] if l.has_bias else [])
        perm.append(torch.cat(cols, 1).t().reshape(-1))
        start += l.num_params
    return torch.cat(perm)


def to_paper(F: torch.Tensor, model: nn.Module) -> torch.Tensor:
    p = paper_perm(model)
    return F[p][:, p]


def output_fisher(loss: str, z: torch.Tensor) -> torch.Tensor:
    """F_R per case, built densely from the formulas (not from the loss classes)."""
    if loss == "categorical":
        p = torch.softmax(z, 1)
        return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    if loss == "bernoulli":
        s = torch.sigmoid(z)
        return torch.diag_embed(s * (1 - s))
    return torch.eye(z.shape[1], dtype=z.dtype).expand(z.shape[0], -1, -1)


def brute_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-case Jacobian of the outputs wrt all parameters, ``(N, C, P)`` in torch order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    return torch.cat([J[k].flatten(2) for k in params], 2)


def brute_fisher(model: nn.Module, loss: str, x: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_n J_nᵀ F_R J_n in the paper's ordering."""
    J = brute_jacobian(model, x)
    with torch.no_grad():
        z = model(x)
    F = torch.einsum("ncp,ncd,ndq->pq", J, output_fisher(loss, z), J) / x.shape[0]
    return to_paper(F, model)


def brute_empirical(model: nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ with ℓ_n the per-case NLL (summed over outputs)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def nll(p, xi, yi):
        z = functional_call(model, p, (xi.unsqueeze(0),))
        if loss == "categorical":
            return nn.functional.cross_entropy(z, yi.unsqueeze(0))
        if loss == "bernoulli":
            return nn.functional.binary_cross_entropy_with_logits(z, yi.unsqueeze(0), reduction="sum")
        return 0.5 * (z - yi).pow(2).sum()

    G = vmap(torch.func.grad(nll), in_dims=(None, 0, 0))(params, x, y)
    G = torch.cat([G[k].flatten(1) for k in params], 1)
    return to_paper(G.t() @ G / x.shape[0], model)


def assert_close(a, b, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


MODELS = {
    "5-4-3 tanh": lambda: mlp([5, 4, 3]),
    "4-3-3-2 sigmoid, no bias in layer 2": lambda: mlp([4, 3, 3, 2], [nn.Sigmoid, nn.Tanh], bias=[True, False, True]),
    "5-4-3 no bias": lambda: mlp([5, 4, 3], bias=False),
}


# ------------------------------------------------------------------------------------------
# Brute force.

@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_matches_brute_force(name, loss):
    model = MODELS[name]()
    x = torch.randn(9, model[0].in_features, dtype=DT)
    F = exact_fisher(model, loss, x)
    assert isinstance(F, FisherMatrix) and F.dtype == DT
    assert_close(F.dense, brute_fisher(model, loss, x))
    assert_close(F.dense, F.dense.t(), rtol=0, atol=0)  # mirrored exactly


@pytest.mark.parametrize("loss", LOSSES)
def test_empirical_matches_brute_force(loss):
    model = MODELS["4-3-3-2 sigmoid, no bias in layer 2"]()
    x = torch.randn(11, 4, dtype=DT)
    y = targets(loss, 11, 2)
    F = exact_fisher(model, loss, x, y, mode="empirical")
    assert_close(F.dense, brute_empirical(model, loss, x, y))
    assert F.mode == "empirical"


@pytest.mark.parametrize("chunk", [1, 2, 5, 7, 1000])
def test_chunking_does_not_change_the_result(chunk):
    model = mlp([6, 5, 4, 3])
    x = torch.randn(13, 6, dtype=DT)
    ref = exact_fisher(model, "categorical", x)
    assert_close(exact_fisher(model, "categorical", x, chunk_size=chunk).dense, ref.dense, rtol=1e-12, atol=1e-14)


def test_wide_diagonal_block_uses_several_groups(monkeypatch):
    # small groups: the packed diagonal blocks are split into many row groups
    import kfac_lab.curvature.exact as ex

    monkeypatch.setattr(ex, "GROUP_ELEMS", 8 * 90)
    monkeypatch.setattr(ex, "DIAG_GROUPS", 16)
    model = mlp([40, 6, 3])
    first = find_layers(model)[0]
    lay = ex._pair_layout(first, first, True, chunk=8)
    assert len(lay.groups) > 10
    assert lay.rows < 41 * 41  # packed: fewer rows than the full square
    x = torch.randn(8, 40, dtype=DT)
    F = exact_fisher(model, "gaussian", x, chunk_size=8)
    assert_close(F.dense, brute_fisher(model, "gaussian", x))


# ------------------------------------------------------------------------------------------
# Independent libraries.

def curvlinops_ggn(model, loss_fn, x, y):
    from curvlinops import GGNLinearOperator

    params = list(model.parameters())
    op = GGNLinearOperator(model, loss_fn, params, [(x, y)], progressbar=False)
    return to_paper(op @ torch.eye(op.shape[1], dtype=DT), model)


def backpack_ggn(model, loss_fn, x, y):
    from backpack import backpack, extend
    from backpack.extensions import SqrtGGNExact

    model = extend(copy.deepcopy(model))  # BackPACK's hooks would break torch.func elsewhere
    loss_fn = extend(loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backpack(SqrtGGNExact()):
            loss_fn(model(x), y).backward()
    V = torch.cat([p.sqrt_ggn_exact.flatten(2) for p in model.parameters()], 2)  # (C, N, P)
    return to_paper(torch.einsum("cnp,cnq->pq", V, V), model)


# (loss, torch loss, factor): ours = their GGN / factor. CE with mean reduction is the Fisher
# averaged over cases; sum-reduced BCE gives N·F; sum-reduced MSE = Σ‖z − y‖² has Hessian 2I: 2N·F.
LIB_CASES = [
    ("categorical", lambda: nn.CrossEntropyLoss(), lambda n: 1.0),
    ("bernoulli", lambda: nn.BCEWithLogitsLoss(reduction="sum"), lambda n: float(n)),
    ("gaussian", lambda: nn.MSELoss(reduction="sum"), lambda n: 2.0 * n),
]


@pytest.mark.parametrize("loss,make_loss,factor", LIB_CASES, ids=[c[0] for c in LIB_CASES])
def test_matches_curvlinops(loss, make_loss, factor):
    model = mlp([4, 3, 3, 2], [nn.Sigmoid, nn.Tanh], bias=[True, False, True])
    x = torch.randn(10, 4, dtype=DT)
    y = targets(loss, 10, 2)
    ours = exact_fisher(model, loss, x).dense
    assert_close(ours, curvlinops_ggn(model, make_loss(), x, y) / factor(10))


@pytest.mark.parametrize("loss,make_loss,factor,c", [
    ("categorical", lambda: nn.CrossEntropyLoss(), lambda n: 1.0, 3),
    ("gaussian", lambda: nn.MSELoss(reduction="sum"), lambda n: 2.0 * n, 3),
    ("bernoulli", lambda: nn.BCEWithLogitsLoss(reduction="sum"), lambda n: float(n), 1),  # BackPACK: 1 output only
], ids=["categorical", "gaussian", "bernoulli-1-output"])
def test_matches_backpack(loss, make_loss, factor, c):
    model = mlp([5, 4, c])
    x = torch.randn(8, 5, dtype=DT)
    y = targets(loss, 8, c)
    ours = exact_fisher(model, loss, x).dense
    assert_close(ours, backpack_ggn(model, make_loss(), x, y) / factor(8))


# ------------------------------------------------------------------------------------------
# Sampled mode, and F̃ = F where it must hold.

def test_sampled_converges_to_exact():
    model = mlp([4, 3, 3])
    x = torch.randn(6, 4, dtype=DT)
    exact = exact_fisher(model, "categorical", x).dense
    errs = {}
    for s in (20, 2000):
        gen = torch.Generator().manual_seed(0)
        F = exact_fisher(model, "categorical", x, mode="sampled", samples=s, generator=gen)
        assert F.mode == "sampled" and F.samples == s
        errs[s] = float((F.dense - exact).norm() / exact.norm())
    assert errs[2000] < 0.1
    assert errs[2000] < errs[20]


def test_sampled_is_reproducible_with_a_generator():
    model = mlp([4, 3, 3])
    x = torch.randn(6, 4, dtype=DT)
    F1 = exact_fisher(model, "bernoulli", x, mode="sampled", samples=3, generator=torch.Generator().manual_seed(5))
    F2 = exact_fisher(model, "bernoulli", x, mode="sampled", samples=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(F1.dense, F2.dense)


def test_kronecker_approximation_is_exact_for_one_linear_layer_with_gaussian_loss():
    # z = W ā: g^k = e_k for every case, so H_n = I and F = E[ā āᵀ] ⊗ I = Ā ⊗ G = F̃.
    model = mlp([5, 3])
    x = torch.randn(12, 5, dtype=DT)
    layers = find_layers(model)
    F = exact_fisher(model, "gaussian", x)
    a, g, _ = output_gradients(model, layers, "gaussian", x, mode="exact")
    Ft = kron_fisher_dense(batch_factors(a, g, factor_pairs(1, "all")), layers)
    assert_close(F.dense, Ft)


def test_kronecker_approximation_differs_for_a_deep_net():
    model = mlp([4, 3, 3])
    x = torch.randn(12, 4, dtype=DT)
    layers = find_layers(model)
    F = exact_fisher(model, "categorical", x)
    a, g, _ = output_gradients(model, layers, "categorical", x, mode="exact")
    Ft = kron_fisher_dense(batch_factors(a, g, factor_pairs(2, "all")), layers)
    assert float((F.dense - Ft).norm() / F.dense.norm()) > 1e-3


# ------------------------------------------------------------------------------------------
# Property test.

@st.composite
def nets(draw):
    n_layers = draw(st.integers(1, 3))
    dims = [draw(st.integers(1, 5)) for _ in range(n_layers + 1)]
    bias = [draw(st.booleans()) for _ in range(n_layers)]
    act = draw(st.sampled_from([nn.Tanh, nn.Sigmoid]))
    return dims, bias, act


@settings(max_examples=15, deadline=None)
@given(net=nets(), n=st.integers(1, 20), loss=st.sampled_from(LOSSES), chunk=st.sampled_from([None, 1, 3]),
       seed=st.integers(0, 2**16))
def test_property_matches_brute_force(net, n, loss, chunk, seed):
    dims, bias, act = net
    model = mlp(dims, [act] * (len(dims) - 2), bias=bias, seed=seed)
    x = torch.randn(n, dims[0], dtype=DT, generator=torch.Generator().manual_seed(seed))
    F = exact_fisher(model, loss, x, chunk_size=chunk)
    assert_close(F.dense, brute_fisher(model, loss, x))


# ------------------------------------------------------------------------------------------
# FisherMatrix.

def test_fisher_matrix_structure_and_names():
    model = mlp([4, 3, 3, 2], bias=[True, False, True])
    x = torch.randn(7, 4, dtype=DT)
    F = exact_fisher(model, "categorical", x)
    assert F.sizes == (15, 9, 8) and F.offsets == (0, 15, 24) and F.num_params == 32
    assert F.shape == (32, 32) and F.num_cases == 7 and F.loss == "categorical"
    b = F.block(0, 1)
    assert b.shape == (15, 9) and b.data_ptr() == F.dense[0:15, 15:24].data_ptr()  # a view
    assert torch.equal(F.block(1, 0), F.block(0, 1).t())
    assert torch.equal(F.block(-1, -1), F.dense[24:, 24:])
    with pytest.raises(IndexError):
        F.block(3, 0)
    arr = np.asarray(F)
    assert arr.shape == (32, 32) and np.array_equal(arr, F.to_numpy())
    names = F.param_names()
    assert len(names) == 32
    # layer 1 is 4 → 3 with bias: column p of [W | b] holds rows p·3 + r
    assert names[:4] == ["L1 W[0,0]", "L1 W[1,0]", "L1 W[2,0]", "L1 W[0,1]"]
    assert names[12:15] == ["L1 b[0]", "L1 b[1]", "L1 b[2]"]
    assert names[15:18] == ["L2 W[0,0]", "L2 W[1,0]", "L2 W[2,0]"]  # layer 2 has no bias
    assert names[23] == "L2 W[2,2]"
    assert names[-1] == "L3 b[1]"
    assert "P=32" in repr(F)


def test_names_match_parameter_ordering():
    # perturbing the parameter named "L1 W[r,p]" changes exactly weight[r, p] of layer 1
    model = mlp([3, 2, 2])
    F = exact_fisher(model, "gaussian", torch.randn(4, 3, dtype=DT))
    names = F.param_names()
    perm = paper_perm(model)
    torch_names = []
    for l in find_layers(model):
        torch_names += [f"{l.name} W[{r},{p}]" for r in range(l.d_out) for p in range(l.d_in)]
        torch_names += [f"{l.name} b[{r}]" for r in range(l.d_out)]
    for row, name in enumerate(names):
        layer_no, rest = name.split(" ")
        expected = f"{find_layers(model)[int(layer_no[1:]) - 1].name} {rest}"
        assert torch_names[perm[row]] == expected


def test_layer_subset_is_the_corresponding_sub_block():
    model = mlp([5, 4, 3, 3, 2], bias=[True, False, True, True])
    x = torch.randn(9, 5, dtype=DT)
    full = exact_fisher(model, "categorical", x)
    layers = find_layers(model)
    # (the layers= argument, the indices of the layers it names) — KFACLayers, names, modules
    cases = [([layers[1], layers[2]], [1, 2]), (["4"], [2]), ([model[2], model[6]], [1, 3]),
             ([layers[3], layers[0]], [3, 0])]
    for sub, order in cases:
        F = exact_fisher(model, "categorical", x, layers=sub)
        rows = torch.cat([torch.arange(full.offsets[i], full.offsets[i] + full.sizes[i]) for i in order])
        assert_close(F.dense, full.dense[rows][:, rows], rtol=1e-12, atol=1e-14)
        assert [l.index for l in F.layers] == list(range(len(order)))
        assert [l.module for l in F.layers] == [layers[i].module for i in order]


def test_dtype_option_accumulates_in_float64():
    model = mlp([5, 4, 3]).float()
    x = torch.randn(9, 5)
    F32 = exact_fisher(model, "categorical", x)
    F64 = exact_fisher(model, "categorical", x, dtype=torch.float64)
    assert F32.dtype == torch.float32 and F64.dtype == torch.float64
    assert_close(F64.dense, brute_fisher(model.double(), "categorical", x.double()), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Errors.

def test_too_large_is_refused_with_a_helpful_message():
    model = mlp([5, 4, 3])  # 24 + 15 = 39 parameters
    x = torch.randn(9, 5, dtype=DT)
    with pytest.raises(FisherTooLargeError) as info:
        exact_fisher(model, "categorical", x, max_bytes=1000)
    msg = str(info.value)
    assert "39" in msg and "MB" in msg and "layers=" in msg and "max_bytes" in msg
    assert isinstance(info.value, MemoryError)
    need = estimate_exact_fisher_bytes(find_layers(model), 9, directions=3, dtype=DT)
    assert need >= 39 * 39 * 8
    exact_fisher(model, "categorical", x, max_bytes=need)  # exactly enough is accepted


def test_big_network_is_refused_before_any_work():
    model = nn.Sequential(nn.Linear(784, 1000), nn.Tanh(), nn.Linear(1000, 10))  # 795k params: 2.5 TB
    with pytest.raises(FisherTooLargeError, match=r"795,010 parameters.*GB"):
        exact_fisher(model, "categorical", torch.rand(2, 784))


@pytest.mark.parametrize("bad", ["hinge", "", 3])
def test_unknown_loss(bad):
    model = mlp([3, 2])
    with pytest.raises(ValueError, match="unknown loss"):
        exact_fisher(model, bad, torch.randn(4, 3, dtype=DT))


def test_non_finite_inputs_are_refused():
    model = mlp([3, 2])
    x = torch.randn(4, 3, dtype=DT)
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match="input"):
        exact_fisher(model, "categorical", x)
    x[1, 2] = float("inf")
    with pytest.raises(NonFiniteError):
        exact_fisher(model, "gaussian", x)
    y = torch.randn(4, 2, dtype=DT)
    y[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="targets"):
        exact_fisher(model, "gaussian", torch.randn(4, 3, dtype=DT), y, mode="empirical")


def test_non_finite_weights_are_refused():
    model = mlp([3, 2])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError):
        exact_fisher(model, "categorical", torch.randn(4, 3, dtype=DT))


def test_other_bad_arguments():
    model = mlp([3, 2])
    x = torch.randn(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="no cases"):
        exact_fisher(model, "categorical", x[:0])
    with pytest.raises(ValueError, match="mode"):
        exact_fisher(model, "categorical", x, mode="fisher")
    with pytest.raises(ValueError, match="pass y"):
        exact_fisher(model, "categorical", x, mode="empirical")
    with pytest.raises(ValueError, match="integer class"):
        exact_fisher(model, "categorical", x, torch.rand(4, dtype=DT), mode="empirical")
    with pytest.raises(ValueError, match="cases"):
        exact_fisher(model, "categorical", x, torch.zeros(3, dtype=torch.long), mode="empirical")
    with pytest.raises(ValueError, match="samples"):
        exact_fisher(model, "categorical", x, mode="sampled", samples=0)
    with pytest.raises(ValueError, match="chunk_size"):
        exact_fisher(model, "categorical", x, chunk_size=0)
    with pytest.raises(ValueError, match="no module named"):
        exact_fisher(model, "categorical", x, layers=["nope"])
    with pytest.raises(ValueError, match="twice"):
        exact_fisher(model, "categorical", x, layers=[model[0], model[0]])
    with pytest.raises(ValueError, match="not part of the model"):
        exact_fisher(model, "categorical", x, layers=[nn.Linear(3, 2)])
    with pytest.raises(TypeError):
        exact_fisher(model, "categorical", x.numpy())


def test_models_with_other_parameterised_modules_need_explicit_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    with pytest.raises(UnsupportedLayerError, match="layers="):
        exact_fisher(model, "categorical", x)
    F = exact_fisher(model, "categorical", x, layers=["0", "3"])  # LayerNorm's parameters left out
    full = brute_fisher_all(model, "categorical", x)
    keep = torch.cat([torch.arange(0, 16), torch.arange(24, 34)])  # torch order: L0 (16), LN (8), L3 (10)
    sub = full[keep][:, keep]
    perm = torch.cat([torch.arange(12).view(4, 3).t().reshape(-1), torch.arange(12, 16)])  # layer 0 → paper order
    perm = torch.cat([perm, 16 + torch.cat([torch.arange(8).view(2, 4).t().reshape(-1), torch.arange(8, 10)])])
    assert_close(F.dense, sub[perm][:, perm])


def brute_fisher_all(model, loss, x):
    """(1/N) Σ J_nᵀ F_R J_n over all parameters, torch order."""
    J = brute_jacobian(model, x)
    with torch.no_grad():
        z = model(x)
    return torch.einsum("ncp,ncd,ndq->pq", J, output_fisher(loss, z), J) / x.shape[0]
