# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3 · The structure of F̃⁻¹: regression, Ψ and Σ, and the block-tridiagonal inverse
#
# K-FAC never inverts `F̃` itself — no efficient method inverts a Khatri–Rao product. It approximates
# the **inverse** as block-diagonal (`F̆⁻¹`, one small Kronecker product per layer) or as
# block-tridiagonal (`F̂⁻¹`, a chain over layers, like a Gaussian graphical model). This notebook
# shows why `F̃⁻¹` has that structure (the regression view of M&G 2015 §4.1 and figure 2), builds
# `F̂⁻¹ = ΞᵀΛΞ` step by step from `Ψ` and `Σ` (§4.3, figure 3), inverts each `Σ` with the trick for
# differences of Kronecker products (the paper's Appendix B, written out below), checks every step
# against the library, and measures both approximations (figures 5–6, §4.4).
#
# Citations: [M&G 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), arXiv section, figure and
# equation numbers (as in notebook 01, whose glossary lists the symbols); how the lab implements it:
# [docs/algorithm.md](../docs/algorithm.md). *Runs top to bottom in about a minute on a laptop CPU.*

# %%
import copy

import numpy as np
import plotly.graph_objects as go
import torch

import kfac_lab as kl
from kfac_lab import analysis, viz, widgets
from kfac_lab.curvature import (BlockTridiagonalInverse, batch_factors, factor_pairs, find_layers, kron_fisher_dense,
                                output_gradients, params_to_vector, tridiagonal_side, vec, vector_to_params)
from kfac_lab.curvature.factors import kron
from kfac_lab.lab.notebook import light_figures, record

light_figures()   # figures as plotly JSON only: the saved notebook stays small

# %% tags=["parameters"]
N = 1000               # cases; full scale: 5000 (the bundled MNIST subset)
KFAC_STEPS = 5         # full-batch K-FAC iterations before the study; the paper: 7
LAYERS = [1, 2, 3]     # the hidden 20→20 layers L2–L4 (0-based); [1, 2, 3, 4] adds the softmax layer L5 (needs GAMMA > 0)
GAMMA = 0.0            # γ of the inverses: none, so every matrix below is exactly the paper's
SUBSET = 60            # coordinates of the regression check in §4.1 (a dense P-fold regression is slow)
RESOLUTION = 180       # heatmap cells per side (block-averaged above it): small saved notebooks
STORE = None           # a path such as "../runs/lab.zarr" saves the study where the dashboards look
SEED = 0

# %% [markdown]
# ## The network and its F̃
#
# The figure-1 network of notebook 02 (256-20-20-20-20-10, tanh, softmax, 16×16 MNIST, a few
# K-FAC iterations). By default the study covers the three hidden 20→20 layers: their factors are
# non-singular, so `F̃⁻¹` exists without damping and everything below is the paper's undamped
# construction. (The softmax layer is the lesson at the end.)

# %%
model, x = analysis.figure1_setup(n=N, seed=SEED, kfac_steps=KFAC_STEPS)
study = analysis.fisher_study(model, "categorical", x, layers=LAYERS, gamma=GAMMA, seed=SEED)
net = copy.deepcopy(model).double()
sel = [find_layers(net)[k] for k in LAYERS]
a, g, _ = output_gradients(net, sel, "categorical", x.double(), mode="exact")
A, G = batch_factors(a, g, factor_pairs(len(sel), "all"))     # Ā_{i,j}, G_{i,j} for every pair
Ft = kron_fisher_dense((A, G), sel)                             # F̃, block (i, j) = Ā_{i−1,j−1} ⊗ G_{i,j}
ell = len(sel)
sizes = [l.num_params for l in sel]
edges = np.cumsum([0] + sizes)
blk = lambda M, i, j: M[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
names = [f"L{k + 1}" for k in LAYERS]
print(f"{study.sizes['row']} parameters in layers {names}, {study.attrs['num_cases']} cases, γ = {GAMMA:g}")
record(f"F̃ here vs the study's: max |difference| = {float(np.abs(Ft.numpy() - study['kron'].values).max()):.1e}",
       kron_vs_study=float(np.abs(Ft.numpy() - study["kron"].values).max()))

# %% [markdown]
# ## Figure 2: F̃ is dense, its inverse is not
#
# Left, `F̃`; right, its exact inverse, each with its own colour scale (colours saturate at the
# 99.5th percentile of |entry|, said in the subtitle; the data are not clipped). Most of the
# inverse's mass sits in the diagonal blocks and the blocks next to them.

# %%
viz.inverse_heatmaps(study, max_size=RESOLUTION)

# %% [markdown]
# The mean |entry| of each block of `F̃⁻¹` (figure 2, right):

# %%
bm = study["block_mean_abs"].values
offsets = {d: float(np.mean([bm[i, i + d] for i in range(ell - d)])) for d in range(ell)}
record("mean |entry| of F̃⁻¹'s blocks, by distance between the layers: "
       + ", ".join(f"{d}: {v:.3g}" for d, v in offsets.items()), block_mean_by_distance=list(offsets.values()))
viz.block_average_map(study)

# %% [markdown]
# The diagonal blocks are the largest, the blocks of adjacent layers come next (about three times
# smaller), and the block of layers two apart is the smallest (about three times smaller again;
# recorded above, by distance). Why?
#
# ## §4.1: the inverse covariance is a regression
#
# For any covariance matrix `Σ`, let `B_{ij}` (`i ≠ j`) be the coefficient of variable `j` in the
# best linear predictor of variable `i` from all the others, `B_{ii} = 0`, and `D_{ii}` the variance of
# that predictor's error. Then (Pourahmadi 2011)
#
# $$\Sigma^{-1} = D^{-1}(I - B).$$
#
# *Derivation:* for variable `i`, the predictor solves `Σ_{−i,−i} b = Σ_{−i,i}` and leaves the error
# variance `D_ii = Σ_ii − Σ_{i,−i} b` — the Schur complement, whose inverse is `(Σ⁻¹)_ii`; the
# block-inverse formula gives `(Σ⁻¹)_{i,−i} = −(Σ⁻¹)_ii bᵀ`. So row `i` of `Σ⁻¹` is `(1, −bᵀ)/D_ii`.
#
# The Fisher is a covariance: `F = E[Dθ Dθᵀ]` with `E[Dθ] = 0` under the model's distribution. So an
# entry of `F⁻¹` is large only where one weight's gradient helps predict another's. A layer's
# gradient `DW_i = g_i ā_{i−1}ᵀ` is built from the layer below (`ā_{i−1}`, forward pass) and the
# layer above (`g_i`, backward pass): its own entries and its neighbours' are the useful predictors.
#
# Check: run the regressions for `SUBSET` coordinates of `F̃` (a covariance of its own: the marginal
# of those coordinates) and compare `D⁻¹(I − B)` with the inverse.

# %%
rng = np.random.default_rng(SEED)
idx = np.sort(rng.choice(Ft.shape[0], size=min(SUBSET, Ft.shape[0]), replace=False))
S = Ft[np.ix_(idx, idx)]
k = len(idx)
B, D = torch.zeros(k, k, dtype=S.dtype), torch.zeros(k, dtype=S.dtype)
for i in range(k):
    rest = [j for j in range(k) if j != i]
    b = torch.linalg.solve(S[np.ix_(rest, rest)], S[rest, i])     # best linear predictor of i from the rest
    B[i, rest] = b
    D[i] = S[i, i] - S[i, rest] @ b                                # its error variance
regression = torch.diag(1 / D) @ (torch.eye(k, dtype=S.dtype) - B)
rel = lambda X, Y: float((X - Y).norm() / Y.norm())   # relative Frobenius (or 2-) norm
record(f"‖D⁻¹(I − B) − inverse‖ / ‖inverse‖ = {rel(regression, torch.linalg.inv(S)):.1e} on {k} coordinates",
       regression_vs_inverse=rel(regression, torch.linalg.inv(S)))

# %% [markdown]
# On the whole `F̃`, the same identity read backwards gives every regression coefficient,
# `B = I − D F̃⁻¹` with `D = diag(F̃⁻¹)⁻¹`. Their mean |value| per pair of layers: which layer's
# gradients predict which. The same order appears — same layer, then adjacent, then two apart — but
# the differences in the coefficients are milder than in `F̃⁻¹`'s block means: a coefficient only
# says how much one weight is *used* in the prediction, and the many small coefficients of a whole
# layer add up.

# %%
Ft_inv = torch.linalg.inv(Ft)
Bfull = torch.eye(Ft.shape[0], dtype=Ft.dtype) - Ft_inv / torch.diagonal(Ft_inv)[:, None]
Bfull.fill_diagonal_(float("nan"))
coef = np.array([[float(np.nanmean(np.abs(blk(Bfull, i, j).numpy()))) for j in range(ell)] for i in range(ell)])
fig = go.Figure(go.Heatmap(z=coef, x=names, y=names, text=[[f"{v:.2g}" for v in r] for r in coef],
                           texttemplate="%{text}", colorscale="Viridis", colorbar=dict(title="mean |B_ij|")))
fig.update_layout(title="Mean |regression coefficient|: predicting a weight of layer (row) from one of layer (column)",
                  height=380, xaxis=dict(title="predictor's layer", type="category"),
                  yaxis=dict(title="predicted weight's layer", type="category", autorange="reversed"))
record("mean |B| by distance between the layers: "
       + ", ".join(f"{d}: {np.mean([coef[i, i + d] for i in range(ell - d)]):.3g}" for d in range(ell)),
       regression_by_distance=[float(np.mean([coef[i, i + d] for i in range(ell - d)])) for d in range(ell)])
fig

# %% [markdown]
# ## Figure 3: the chain model behind F̂⁻¹ (§4.3)
#
# If the gradients `DW_1, …, DW_ℓ` were jointly Gaussian with potentials only between adjacent layers
# (an undirected Gaussian graphical model, left), the inverse covariance would be exactly
# block-tridiagonal. The same distribution is a directed model (right): draw `DW_ℓ`, then each
# `DW_i` from `DW_{i+1}` by a linear regression plus independent noise:
#
# $$DW_\ell \sim \mathcal N(0, \Sigma_\ell),\qquad DW_i \mid DW_{i+1} \sim \mathcal N\big(\Psi_{i,i+1}\, DW_{i+1},\ \Sigma_{i|i+1}\big).$$

# %%
fig = go.Figure()
for panel, (x0, title) in enumerate([(0.0, "undirected (UGGM)"), (1.6, "directed (DGGM)")]):
    xs = [x0 + 0.3 * i for i in range(ell)]
    fig.add_trace(go.Scatter(x=xs, y=[0] * ell, mode="markers+text", text=[f"DW_{i + 1}" for i in range(ell)],
                             textposition="bottom center", marker=dict(size=34, color="#9ecae1"), hoverinfo="text",
                             showlegend=False))
    for i in range(ell - 1):
        fig.add_annotation(x=xs[i] + 0.045, y=0, ax=xs[i + 1] - 0.045, ay=0, xref="x", yref="y", axref="x", ayref="y",
                           showarrow=True, arrowhead=2 if panel else 0, arrowwidth=2,
                           text="")
    fig.add_annotation(x=x0 + 0.15 * (ell - 1), y=0.6, text=title, showarrow=False, font=dict(size=14))
fig.update_layout(title="Figure 3: the two graphical models whose inverse covariance is block-tridiagonal",
                  height=260, xaxis=dict(visible=False, range=[-0.3, 1.9 + 0.3 * ell]),
                  yaxis=dict(visible=False, range=[-0.8, 0.9]), plot_bgcolor="white")
fig

# %% [markdown]
# K-FAC fits that chain to `F̃`. The regression of layer `i` on layer `i + 1` and its error covariance:
#
# $$\Psi_{i,i+1} = \tilde F_{i,i+1}\tilde F_{i+1,i+1}^{-1},\qquad
# \Sigma_{i|i+1} = \tilde F_{i,i} - \Psi_{i,i+1}\tilde F_{i+1,i+1}\Psi_{i,i+1}^\top,\qquad \Sigma_\ell = \tilde F_{\ell,\ell}.$$
#
# Because `F̃`'s blocks are Kronecker products and `(A ⊗ B)(C ⊗ D) = AC ⊗ BD`, both stay small:
# `Ψ_{i,i+1} = Ψ^Ā_{i−1,i} ⊗ Ψ^G_{i,i+1}` with `Ψ^Ā_{i−1,i} = Ā_{i−1,i}Ā_{i,i}⁻¹` and
# `Ψ^G_{i,i+1} = G_{i,i+1}G_{i+1,i+1}⁻¹`, and
# `Σ_{i|i+1} = Ā_{i−1,i−1} ⊗ G_{i,i} − Ψ^ĀĀ_{i,i}Ψ^Āᵀ ⊗ Ψ^G G_{i+1,i+1}Ψ^Gᵀ` — a *difference* of two
# Kronecker products. Writing the model as `Ξ DW = noise`, with `Ξ` block upper-bidiagonal (identity
# blocks on the diagonal, `−Ψ_{i,i+1}` at block `(i, i + 1)`) and `Λ = diag(Σ_{1|2}⁻¹, …, Σ_ℓ⁻¹)`,
#
# $$\hat F^{-1} = \Xi^\top \Lambda\, \Xi .$$
#
# Step by step, densely (`i` counts the studied layers from 0 here):

# %%
Psi, Sigma = [], []
for i in range(ell):
    if i < ell - 1:
        psi = blk(Ft, i, i + 1) @ torch.linalg.inv(blk(Ft, i + 1, i + 1))
        Psi.append(psi)
        Sigma.append(blk(Ft, i, i) - psi @ blk(Ft, i + 1, i + 1) @ psi.t())
    else:
        Sigma.append(blk(Ft, i, i))
psi_A = [A[i, i + 1] @ torch.linalg.inv(A[i + 1, i + 1]) for i in range(ell - 1)]
psi_G = [G[i, i + 1] @ torch.linalg.inv(G[i + 1, i + 1]) for i in range(ell - 1)]
Xi = torch.eye(Ft.shape[0], dtype=Ft.dtype)
for i in range(ell - 1):
    Xi[edges[i]:edges[i + 1], edges[i + 1]:edges[i + 2]] = -Psi[i]
Lam = torch.block_diag(*[torch.linalg.inv(s) for s in Sigma])
Fhat_inv = Xi.t() @ Lam @ Xi
Fhat = torch.linalg.inv(Fhat_inv)
checks = {
    "Ψ = Ψ^Ā ⊗ Ψ^G": max(rel(kron(pa, pg), p) for pa, pg, p in zip(psi_A, psi_G, Psi)),
    "F̂ = F̃ on the tridiagonal blocks": max(rel(blk(Fhat, i, j), blk(Ft, i, j))
                                          for i in range(ell) for j in range(ell) if abs(i - j) <= 1),
    "F̂⁻¹ is zero two or more blocks apart": max([float(blk(Fhat_inv, i, j).abs().max())
                                                  for i in range(ell) for j in range(ell) if abs(i - j) > 1] or [0.0]),
}
record("\n".join(f"{k}: {v:.1e}" for k, v in checks.items()), construction_checks=list(checks.values()))

# %% [markdown]
# Where `F̂` differs from `F̃`: two layers apart, the chain can only route the dependence through the
# layer between them, `F̂_{i,i+2} = Ψ_{i,i+1} F̃_{i+1,i+2}`, instead of the actual `F̃_{i,i+2}`.
# Against the library: the same `F̂⁻¹` from `BlockTridiagonalInverse` (its `dense()`, and its `apply`
# on a random vector, which never forms a `P × P` matrix) and from the study.

# %%
far = {f"{names[i]},{names[i + 2]}": rel(blk(Fhat, i, i + 2), blk(Ft, i, i + 2)) for i in range(ell - 2)}
inv = BlockTridiagonalInverse([A[i, i] for i in range(ell)], [G[i, i] for i in range(ell)],
                              [A[i, i + 1] for i in range(ell - 1)], [G[i, i + 1] for i in range(ell - 1)], gamma=GAMMA)
v = torch.randn(Ft.shape[0], dtype=Ft.dtype, generator=torch.Generator().manual_seed(SEED))
u_lib = params_to_vector(inv.apply(vector_to_params(v, sel)))
lib = {"library dense()": rel(inv.dense(), Fhat_inv), "library apply(v)": rel(u_lib, Fhat_inv @ v),
       "the study's tridiag_inverse": rel(torch.from_numpy(study["tridiag_inverse"].values), Fhat_inv)}
record("‖F̂ − F̃‖/‖F̃‖ two layers apart: " + ", ".join(f"{k}: {v:.2f}" for k, v in far.items()) + "\n"
       + "\n".join(f"{k} vs the steps above: {v:.1e}" for k, v in lib.items()),
       far_block_error=list(far.values()), library_checks=list(lib.values()))

# %% [markdown]
# ## Inverting Σ = M ⊗ N − C ⊗ D without forming it (the paper's Appendix B)
#
# `Σ_{i|i+1}` is `(d_in·d_out)²` — too big to invert densely in a real network — but it is a
# difference of two Kronecker products with `M = Ā_{i−1,i−1}`, `N = G_{i,i}` positive definite and
# `C = Ψ^ĀĀ_{i,i}Ψ^Āᵀ`, `D = Ψ^G G_{i+1,i+1}Ψ^Gᵀ`. Diagonalise each side *relative to* its `M`:
#
# 1. eigendecompose `M^{−½} C M^{−½} = E₁ S₁ E₁ᵀ` and set `K₁ = M^{−½}E₁`, so `K₁ᵀMK₁ = I`, `K₁ᵀCK₁ = S₁`;
#    the same for `N`, `D`: `K₂`, `S₂`;
# 2. then `(K₁⊗K₂)ᵀ Σ (K₁⊗K₂) = I − S₁⊗S₂`, a **diagonal** matrix, so
#    `Σ⁻¹ = (K₁⊗K₂)(I − S₁⊗S₂)⁻¹(K₁⊗K₂)ᵀ`;
# 3. in matrix form (identity 2 of notebook 01), for a layer-shaped `Y`:
#    `Σ⁻¹vec(Y) = vec(K₂ [(K₂ᵀ Y K₁) ⊘ (11ᵀ − s₂s₁ᵀ)] K₁ᵀ)`, with `⊘` elementwise division.
#
# The eigenvalues lie in `[0, 1]`: `Σ` is a Schur complement of the positive semi-definite `F̃`, so
# `C ≼ M` and `D ≼ N`. One of the A side's reaches 1 (to rounding): the homogeneous coordinate, a
# constant 1 in every layer, is predicted exactly by the next layer's. `1 − s₂s₁ᵀ` stays positive
# because the G side's eigenvalues stay below 1. (The library clamps them a hair below 1, so that
# rounding in float32 cannot make `Σ` indefinite.) Each step below runs on the first layer's `Σ`.

# %%
i = 0
M_, N_, C_, D_ = A[i, i], G[i, i], psi_A[i] @ A[i + 1, i + 1] @ psi_A[i].t(), psi_G[i] @ G[i + 1, i + 1] @ psi_G[i].t()


def relative_eig(M, C):
    """K, s with Kᵀ M K = I and Kᵀ C K = diag(s) (symmetric inverse square root of M)."""
    e, Q = torch.linalg.eigh(M)
    M_half_inv = Q @ torch.diag(e.rsqrt()) @ Q.t()
    s, E = torch.linalg.eigh(M_half_inv @ C @ M_half_inv)
    return M_half_inv @ E, s


K1, s1 = relative_eig(M_, C_)
K2, s2 = relative_eig(N_, D_)
Y = torch.randn(N_.shape[0], M_.shape[0], dtype=Ft.dtype, generator=torch.Generator().manual_seed(SEED + 1))
X_trick = K2 @ ((K2.t() @ Y @ K1) / (1 - s2[:, None] * s1[None, :])) @ K1.t()
X_dense = torch.linalg.solve(kron(M_, N_) - kron(C_, D_), vec(Y))           # the (d_in·d_out)² system
chol = lambda T: torch.linalg.cholesky(T)
side_A = tridiagonal_side(chol(A[i, i]), chol(A[i + 1, i + 1]), A[i, i + 1], "A")   # the library's pieces
side_G = tridiagonal_side(chol(G[i, i]), chol(G[i + 1, i + 1]), G[i, i + 1], "G")
X_lib = side_G.K @ ((side_G.K.t() @ Y @ side_A.K) / (1 - side_G.s[:, None] * side_A.s[None, :])) @ side_A.K.t()
trick = {"M ⊗ N − C ⊗ D vs the Σ built above": rel(kron(M_, N_) - kron(C_, D_), Sigma[i]),
         "Appendix B vs dense solve": rel(vec(X_trick), X_dense),
         "library's K, s (Cholesky instead of M^{−½}) vs dense": rel(vec(X_lib), X_dense),
         "eigenvalues s: library vs here": float((torch.sort(side_A.s).values - s1).abs().max()
                                                 + (torch.sort(side_G.s).values - s2).abs().max())}
record("\n".join(f"{k}: {v:.1e}" for k, v in trick.items())
       + f"\nA side: s₁ in [{float(s1.min()):.2e}, {float(s1.max()):.15f}]; G side: s₂ in "
       f"[{float(s2.min()):.2e}, {float(s2.max()):.4f}]",
       appendix_b_checks=list(trick.values()), s1_range=[float(s1.min()), float(s1.max())],
       s2_range=[float(s2.min()), float(s2.max())])

# %% [markdown]
# The cost: two eigendecompositions of `d × d` factors and a few `d × d` products, instead of
# factoring a `(d_in·d_out)²` matrix — for a 1000 × 1001 layer of the MNIST autoencoder, about 10⁹
# flops instead of 10¹⁸.
#
# ## Figures 5–6: how good are the approximate inverses? (§4.4)
#
# `F̃⁻¹`, the block-diagonal `F̆⁻¹` and the block-tridiagonal `F̂⁻¹` on one colour scale, and the
# relative errors `‖X − F̃⁻¹‖ / ‖F̃⁻¹‖`. The tridiagonal one keeps the blocks of adjacent layers, which
# the block-diagonal one sets to zero.

# %%
err_bd, err_td = float(study["blockdiag_rel_error"]), float(study["tridiag_rel_error"])
record(f"relative error: block-diagonal {err_bd:.4f}, block-tridiagonal {err_td:.4f}",
       blockdiag_error=err_bd, tridiag_error=err_td)
viz.inverse_quality(study, max_size=RESOLUTION)

# %% [markdown]
# Where the block-diagonal approximation errs, per block (normalised by the whole matrix): in the
# off-diagonal blocks, which it leaves out.

# %%
viz.block_average_map(study, var="blockdiag_block_rel_error")

# %% [markdown]
# ## The output layer: a singular G, as a lesson
#
# The paper's figures use the "middle 4 layers", which here include the softmax output layer L5.
# Its `g = p − e_y` sums to zero over the 10 classes for every target, so `G·1 = E[g gᵀ]1 = 0`: `G`
# is exactly singular (rank 9), `F̃` has no inverse, and the study needs `γ > 0` to include it. Then
# the damped direction `1` of `G` has eigenvalue `γ/π` alone, and the inverse is huge along it — the
# output layer's block dominates the maps and the errors (try `LAYERS = [1, 2, 3, 4]`,
# `GAMMA = 1e-3`). The same fact made `F` singular in notebook 01.

# %%
out = [find_layers(net)[-1]]
_, g_out, _ = output_gradients(net, out, "categorical", x.double(), mode="exact")
_, G_out = batch_factors([torch.zeros(len(x), 1, dtype=torch.float64)], g_out, [(0, 0)])
ev = torch.linalg.eigvalsh(G_out[0, 0])
record(f"output layer's G: eigenvalues {float(ev[0]):.1e} (smallest) … {float(ev[-1]):.3g} (largest); "
       f"‖G·1‖ = {float((G_out[0, 0] @ torch.ones(10, dtype=torch.float64)).norm()):.1e}",
       output_g_smallest=float(ev[0]), output_g_second=float(ev[1]), output_g_largest=float(ev[-1]))

# %% [markdown]
# ## Exercises
#
# **1.** Prove `Σ⁻¹ = D⁻¹(I − B)` for two variables with variances `σ₁², σ₂²` and covariance `c`.
#
# <details><summary>Worked answer</summary>
#
# Predicting variable 1 from 2: coefficient `B₁₂ = c/σ₂²`, error variance `D₁₁ = σ₁² − c²/σ₂²`; likewise
# `B₂₁ = c/σ₁²`, `D₂₂ = σ₂² − c²/σ₁²`. Then `D⁻¹(I − B)` has rows `(1, −c/σ₂²)/D₁₁` and `(−c/σ₁², 1)/D₂₂`,
# i.e. `[[σ₂², −c], [−c, σ₁²]] / (σ₁²σ₂² − c²)` — the inverse of `[[σ₁², c], [c, σ₂²]]`.
# </details>
#
# **2.** Predict the block-average map of figure 2 for `LAYERS = [1, 2, 3, 4]` and `GAMMA = 1e-3`, then run it.
#
# <details><summary>Worked answer</summary>
#
# The L5 diagonal block dominates by orders of magnitude: `G` of L5 is singular, so the damped factor has an
# eigenvalue `γ/π` of about 10⁻³-ish along `1` and `(Ā ⊗ (G + γ/π I))⁻¹` is of order `π/γ` there. The
# hidden layers' blocks keep the pattern above (diagonal > adjacent > two apart), but on a shared colour
# scale they look empty, and the relative errors of figures 5–6 are dominated by L5's block.
# </details>
#
# **3.** Why is `F̂⁻¹ = ΞᵀΛΞ` block-tridiagonal, and why does `F̂` agree with `F̃` on the tridiagonal blocks?
#
# <details><summary>Worked answer</summary>
#
# `Ξ` has non-zero blocks only at `(i, i)` and `(i, i + 1)`; `Λ` is block-diagonal. Block `(i, j)` of
# `ΞᵀΛΞ` is `Σ_k Ξ_{ki}ᵀ Λ_k Ξ_{kj}`, non-zero only when both `k ∈ {i − 1, i}` and `k ∈ {j − 1, j}`, i.e.
# `|i − j| ≤ 1`. For the second part, `F̂` is the covariance of the chain: `DW_i = Ψ_{i,i+1}DW_{i+1} + noise`
# gives `Cov(DW_i, DW_{i+1}) = Ψ_{i,i+1} F̂_{i+1,i+1}` and `Cov(DW_i) = Ψ F̂_{i+1,i+1} Ψᵀ + Σ_{i|i+1}`; by
# induction from `F̂_{ℓ,ℓ} = Σ_ℓ = F̃_{ℓ,ℓ}`, these equal `F̃_{i,i+1}` and `F̃_{i,i}` by the definitions of
# `Ψ` and `Σ`.
# </details>
#
# ## Explore
#
# The same views with sliders for N, the training stage, γ and the layers: every change recomputes the
# study (a few seconds). The study above is saved to `STORE` when one is given, where the dashboards'
# Fisher explorer (`make lab`) finds it. Previous: [02 · F vs F̃](02_kronecker_factored_fisher.ipynb) ·
# next: [04 · damping and momentum](04_damping_and_momentum.ipynb).

# %%
if STORE:
    with kl.Store(STORE) as store:
        store.save_study("figure1-inverse", study, overwrite=True)
widgets.FisherExplorerWidget.figure1(cases=N, kfac_steps=KFAC_STEPS, layers=LAYERS, gamma=GAMMA, cumulants=False,
                                     view="block_averages", light=True, max_size=RESOLUTION)
