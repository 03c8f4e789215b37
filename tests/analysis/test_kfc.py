"""KFC's assumptions measured on a small CNN, against brute force: per-case Jacobians from torch.func,
patches cut by slicing, sums over locations written as loops — nothing shared with the library's
unfold / einsum code. The exact Fisher of a softmax output per case is ``J_zᵀ (diag p − p pᵀ) J_z``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from kfac_lab.analysis import kfc_assumptions


def _net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 2, 2, stride=2, bias=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).double()


def _patches(x, conv):
    """ā per location (row-major over the output grid), cut by slicing: (T, C·kh·kw [+1])."""
    ph, pw = conv.padding
    xp = F.pad(x, (pw, pw, ph, ph))
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    H = (xp.shape[-2] - kh) // sh + 1
    W = (xp.shape[-1] - kw) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            p = xp[:, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(-1)
            rows.append(torch.cat([p, p.new_ones(1)]) if conv.bias is not None else p)
    return torch.stack(rows)


def _brute_force(net, x, k):
    """For conv layer ``k`` (0 or 2 in the Sequential): F_ℓ, F_unc, Ω ⊗ Γ and M[t, t'] = E[g_tᵀ g_t']."""
    conv = net[k]
    head, tail = net[:k], net[k + 1:]
    Fs, Func, Om, Ga, M = 0, 0, 0, 0, 0
    n = x.shape[0]
    names = dict(conv.named_parameters())
    for xi in x:
        inp = head(xi[None])[0]
        s = conv(inp[None])[0]                                       # (O, H, W)
        z = tail(s[None])[0]
        p = torch.softmax(z, 0)
        R = torch.diag(p) - torch.outer(p, p)
        Js = jacrev(lambda s_: tail(s_[None])[0])(s.detach())         # (C, O, H, W)
        O = s.shape[0]
        Jt = Js.reshape(Js.shape[0], O, -1).permute(2, 0, 1)          # (T, C, O)
        A = _patches(inp.detach(), conv)                              # (T, I)
        H_t = torch.einsum("tco,cd,sdp->tsop", Jt, R, Jt).contiguous()           # E[g_t g_sᵀ] of this case
        T = A.shape[0]
        M = M + torch.stack([torch.stack([torch.trace(H_t[t, u]) for u in range(T)]) for t in range(T)])
        for t in range(T):
            Func = Func + torch.kron(torch.outer(A[t], A[t]), H_t[t, t])
            Om = Om + torch.outer(A[t], A[t])
            Ga = Ga + H_t[t, t] / T

        def logits(params):
            return functional_call(tail, {}, (functional_call(conv, params, (inp[None],)),))[0]

        J = jacrev(logits)({kk: v.detach() for kk, v in names.items()})
        cols = J["weight"].reshape(J["weight"].shape[0], O, -1)
        if "bias" in J:
            cols = torch.cat([cols, J["bias"][:, :, None]], dim=2)
        Jv = cols.transpose(1, 2).reshape(cols.shape[0], -1)          # vec([W | b]), column-stacked
        Fs = Fs + Jv.t() @ R @ Jv
    return tuple(t.detach() for t in (Fs / n, Func / n, torch.kron(Om / n, Ga / n), M / n))


@pytest.mark.parametrize("k, layer", [(0, 0), (2, 1)])
def test_measures_match_brute_force(k, layer):
    net = _net()
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ds = kfc_assumptions(net, "categorical", x, mode="exact")
    Fl, Func, kfc, M = _brute_force(net, x, k)
    rel = lambda a, b: float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))  # noqa: E731
    assert float(ds[f"uncorrelated_rel_error_{layer}"]) == pytest.approx(rel(Func, Fl), rel=1e-9)
    assert float(ds[f"expand_rel_error_{layer}"]) == pytest.approx(rel(kfc, Fl), rel=1e-9)
    p = torch.diagonal(M)
    np.testing.assert_allclose(ds[f"g_power_{layer}"].values.reshape(-1), p.numpy(), rtol=1e-9, atol=1e-15)
    live = p > p.max() * 1e-12
    C = (M / torch.sqrt(torch.outer(torch.where(live, p, 1), torch.where(live, p, 1))))[live][:, live]
    got = ds[f"g_corr_{layer}"].values
    np.testing.assert_allclose(got[np.ix_(live.numpy(), live.numpy())], C.numpy(), rtol=1e-9, atol=1e-12)
    assert np.isnan(got[~live.numpy()]).all() and int(ds[f"dead_locations_{layer}"]) == int((~live).sum())
    off = ~torch.eye(int(live.sum()), dtype=torch.bool)
    assert float(ds[f"g_offdiag_corr_{layer}"]) == pytest.approx(float(C[off].abs().mean()), rel=1e-9)


def test_a_strided_crop_leaves_locations_that_never_reach_the_loss():
    """5×5 → (pad 1) 5×5 → 2×2 kernel, stride 2: the last row and column of layer 1's output are never
    read (9 of 25 locations): their g is 0, and their correlation is undefined (NaN), not 0."""
    ds = kfc_assumptions(_net(), "categorical", torch.randn(4, 1, 5, 5, dtype=torch.float64))
    assert int(ds["dead_locations_0"]) == 9 and int(ds["dead_locations_1"]) == 0
    assert ds.attrs["conv_layers"] == "[0, 1]" and ds["g_power_0"].shape == (5, 5)


def test_refuses_a_network_without_convolutions():
    with pytest.raises(ValueError, match="none of the selected layers is a convolution"):
        kfc_assumptions(nn.Sequential(nn.Linear(3, 2)), "categorical", torch.randn(4, 3))
    with pytest.raises(ValueError, match="mode="):
        kfc_assumptions(_net(), "categorical", torch.randn(4, 1, 5, 5), mode="nope")


def test_cumulants_of_a_convolution_are_over_case_location_draws():
    """cumulant_study on one convolution: |T| × error = E[Σ_t ā_tā_tᵀ ⊗ g_tg_tᵀ] − Ω ⊗ Γ (brute force),
    eqn 3 exact under the model's distribution; layers with different |T| are refused with the fix."""
    from kfac_lab.analysis import cumulant_study

    net = _net()
    x = torch.randn(6, 1, 5, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ds = cumulant_study(net, "categorical", x, layers=[0], mode="exact")
    _, Func, kfc, _ = _brute_force(net, x, 0)
    T = ds.attrs["locations"]
    assert T == 25
    np.testing.assert_allclose(T * ds["error"].values, (Func - kfc).numpy(), rtol=1e-8, atol=1e-12)
    assert float(ds["total_residual"]) < 1e-10 * float(ds["total_error"])
    with pytest.raises(ValueError, match="same number of output locations.*layers=\\[k\\]"):
        cumulant_study(net, "categorical", x, layers=[0, 1])
