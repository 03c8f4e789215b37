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
# # 1 · The natural gradient, the Fisher, and the identities K-FAC is built on
#
# Before any approximation: what K-FAC approximates, and why the approximation can be applied
# cheaply. Each step is derived in the text and then checked numerically, with the library,
# on a network small enough to hold every matrix densely:
#
# 1. the natural gradient `F⁻¹∇h` is the steepest-descent direction when a step's size is
#    measured by how much it changes the model's predictions (KL divergence), not its weights;
# 2. for the losses used here the Fisher `F` equals the generalised Gauss–Newton matrix (GGN);
# 3. the *true* Fisher (targets drawn from the model) is not the *empirical* Fisher (training
#    targets);
# 4. `vec` and Kronecker-product identities turn a layer's block of `F⁻¹v` into two small matrix
#    products, `U = G⁻¹ V Ā⁻¹` — the heart of K-FAC.
#
# **How the lecture cites the paper.** Martens & Grosse (2015), *Optimizing Neural Networks with
# Kronecker-factored Approximate Curvature*, [arXiv:1503.05671](https://arxiv.org/abs/1503.05671),
# cited as "M&G 2015 §n, figure n, eqn n" with the **arXiv version's** section, figure and equation
# numbers throughout every notebook (the shorter ICML version numbers them differently). How the lab
# implements each piece: [docs/algorithm.md](../docs/algorithm.md); the symbols are listed in the
# glossary at the end of this notebook. *Runs top to bottom in a few seconds on a laptop CPU.*

# %%
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from kfac_lab.curvature import (BlockDiagonalInverse, batch_factors, exact_fisher, factor_pairs, find_layers,
                                get_loss, output_gradients, params_to_vector, vec, vector_to_params)
from kfac_lab.curvature.factors import kron
from kfac_lab.lab.notebook import light_figures, record
from kfac_lab.models import mlp

light_figures()   # figures as plotly JSON only: the saved notebook stays small

# %% tags=["parameters"]
SIZES = [6, 5, 4, 3]  # a tanh network 6-5-4-3 with a softmax output: P = 74 parameters, every matrix dense
N = 400               # cases x
RANDOM_DIRECTIONS = 4000  # competitors of the natural gradient in section 2
SEED = 0

# %% [markdown]
# ## The set-up (M&G 2015 §2.1)
#
# Layer `i` computes `s_i = W_i ā_{i−1}` and `a_i = φ_i(s_i)`, where `ā` is `a` with a 1 appended:
# the bias is folded into `W_i` as the column that multiplies that homogeneous coordinate (the lab
# stores it as the last column; any fixed position works, as long as the bias shares the block of
# its layer's weights). The parameters `θ` stack `vec(W_1), …, vec(W_ℓ)`, where `vec` stacks
# columns. The network's output `z = f(x, θ)` parametrises a predictive distribution `R_{y|z}` —
# here a softmax over 3 classes — and the loss is its negative log-likelihood,
# `L(y, z) = −log r(y|z)`; the objective is `h(θ) = E_{(x,y)}[L(y, f(x, θ))]` over the training set.

# %%
torch.manual_seed(SEED)
dt = torch.float64
model = mlp(SIZES, "tanh", dtype=dt, seed=SEED)
teacher = mlp(SIZES, "tanh", dtype=dt, seed=SEED + 1)
x = torch.randn(N, SIZES[0], dtype=dt)
with torch.no_grad():
    y = (3 * teacher(x)).argmax(1)          # training targets from another network
loss = get_loss("categorical")
layers = find_layers(model)


def params_of(theta):
    """θ (the paper's ordering) → the model's parameters by name."""
    out = {}
    for layer, M in zip(layers, vector_to_params(theta, layers)):
        W, b = layer.from_matrix(M)
        out[layer.name + ".weight"], out[layer.name + ".bias"] = W, b
    return out


def logits(theta, xs=x):
    return torch.func.functional_call(model, params_of(theta), (xs,))


def h(theta):
    return loss.nll(logits(theta), y)


theta0 = params_to_vector([l.weight_matrix().detach() for l in layers])
grad_h = torch.func.grad(h)(theta0)
F = exact_fisher(model, loss, x, mode="exact").dense   # E_x[ E_{y~model}[Dθ Dθᵀ] ]
P = theta0.numel()
print(f"P = {P} parameters in {len(layers)} layers; h(θ) = {float(h(theta0)):.4f}")

# %% [markdown]
# ## 1. A step's size measured in distribution space (M&G 2015 §2.2)
#
# The Fisher is `F = E[Dθ Dθᵀ]` with `Dθ = −∇_θ log p(y|x, θ)`, the expectation over the inputs
# of the training set and over targets `y` drawn from **the model's own** predictive distribution.
# For a small step `d`, the KL divergence between the predictive distributions before and after it is
#
# $$\mathrm{KL}\big(P_{y|x}(\theta)\,\|\,P_{y|x}(\theta + d)\big) = \tfrac12\, d^\top F\, d + O(\|d\|^3).$$
#
# *Why:* expand `log p(y|x, θ + d)` to second order in `d`. The zeroth-order terms cancel; the
# first-order term is `−E_y[∇ log p]ᵀ d = 0`, because `E_{y~p}[∇ log p] = Σ_y ∇p(y) = ∇ Σ_y p(y) = ∇1 = 0`;
# the second-order term is `−½ dᵀ E_y[∇² log p] d`, and `−E_y[∇² log p] = E_y[∇log p ∇log pᵀ] = F`
# (differentiate `E_y[∇ log p] = 0` once more). So `F` is the metric that measures steps by how
# much they change what the network predicts.
#
# Check: along a random direction `u`, the ratio `KL / (½ t² uᵀFu)` tends to 1 as `t → 0`, with an
# error that shrinks like `t` (the cubic term).

# %%
def kl(theta_a, theta_b):
    """E_x KL(P(θ_a) ‖ P(θ_b)) for the softmax outputs."""
    la, lb = torch.log_softmax(logits(theta_a), 1), torch.log_softmax(logits(theta_b), 1)
    return float((la.exp() * (la - lb)).sum(1).mean())


gen = torch.Generator().manual_seed(SEED)
u = torch.randn(P, generator=gen, dtype=dt)
u /= u.norm()
ts = np.logspace(-4, 0, 13)
ratio = np.array([kl(theta0, theta0 + t * u) / (0.5 * t**2 * float(u @ F @ u)) for t in ts])
fig = go.Figure(go.Scatter(x=ts, y=np.abs(ratio - 1), mode="lines+markers", name="|ratio − 1|"))
fig.update_layout(title="KL(θ, θ + t·u) against its quadratic model ½t²uᵀFu", height=360,
                  xaxis=dict(type="log", title="step length t (‖u‖ = 1)"),
                  yaxis=dict(type="log", title="|KL / (½ t² uᵀFu) − 1|"))
record(f"at t = {ts[0]:g}: KL / (½t²uᵀFu) = {ratio[0]:.6f}; at t = 1: {ratio[-1]:.3f}",
       kl_ratio_small=float(ratio[0]), kl_ratio_large=float(ratio[-1]),
       kl_error_slope=float(np.polyfit(np.log(ts[:6]), np.log(np.abs(ratio[:6] - 1)), 1)[0]))
fig

# %% [markdown]
# ## 2. The natural gradient is steepest descent under KL (M&G 2015 §2.2)
#
# Among all steps whose predictions move by a fixed small KL, `½ dᵀFd = ε`, which decreases `h`
# the most (to first order, `h(θ + d) ≈ h(θ) + ∇hᵀd`)? Minimise `∇hᵀd` subject to `½ dᵀFd = ε`:
# the Lagrangian `∇hᵀd + ν(½ dᵀFd − ε)` is stationary at `∇h + νFd = 0`, so
#
# $$d^\star = -\sqrt{\frac{2\varepsilon}{\nabla h^\top F^{-1}\nabla h}}\; F^{-1}\nabla h ,
# \qquad -\nabla h^\top d^\star = \sqrt{2\varepsilon\,\nabla h^\top F^{-1}\nabla h}.$$
#
# That is the natural gradient `F⁻¹∇h`, the direction K-FAC approximates. Plain gradient descent is
# the same argument with the Euclidean `½‖d‖²` in place of the KL: it depends on how the network
# happens to be parametrised, the natural gradient does not (M&G 2015 §10).
#
# Here `F` is **singular**: adding the same row vector to the three rows of the output layer's
# `[W | b]` (for instance the same constant to the three biases) shifts all three logits equally and
# leaves the softmax — and so every prediction and `h` — unchanged: `F` has one zero eigenvalue per
# column of that matrix (recorded below). Such directions cost no KL and gain nothing
# (`∇h` is orthogonal to them), so the pseudo-inverse `F⁺` stands in for `F⁻¹` here. Notebook 02
# meets the same fact again in the output layer's factor `G`.
#
# Check: scale the natural gradient, the plain gradient and many random directions to the same small
# KL `ε`; none may decrease `h` (to first order) more than the natural gradient.

# %%
EPS = 1e-10
Fp = torch.linalg.pinv(F, hermitian=True)


def to_kl(d):
    """d scaled so that ½ dᵀFd = EPS (d: one direction or a batch of rows)."""
    q = 0.5 * ((d @ F) * d).sum(-1, keepdim=True)
    return d * torch.sqrt(EPS / q)


d_nat, d_gd = to_kl(-(Fp @ grad_h)), to_kl(-grad_h)
rand = to_kl(torch.randn(RANDOM_DIRECTIONS, P, generator=gen, dtype=dt))
gain = lambda d: -(d @ grad_h)   # first-order decrease of h
g_nat, g_gd, g_rand = float(gain(d_nat)), float(gain(d_gd)), gain(rand).numpy()
theory = float(np.sqrt(2 * EPS * float(grad_h @ Fp @ grad_h)))
fig = go.Figure(go.Histogram(x=g_rand, nbinsx=60, name=f"{RANDOM_DIRECTIONS} random directions",
                             marker_color="#bbb"))
for val, name, colour in [(g_gd, "gradient −∇h", "#4C78A8"), (g_nat, "natural gradient −F⁺∇h", "#F58518")]:
    fig.add_vline(x=val, line=dict(color=colour, width=3), annotation_text=name, annotation_position="top left")
fig.update_layout(title=f"First-order decrease of h for steps of equal KL (½dᵀFd = {EPS:g})", height=380,
                  xaxis_title="−∇hᵀd (decrease of h, to first order)", yaxis_title="number of random directions",
                  showlegend=False)
record(f"decrease at KL {EPS:g}: natural {g_nat:.4g} (formula {theory:.4g}), gradient {g_gd:.4g}, "
       f"best of {RANDOM_DIRECTIONS} random {g_rand.max():.4g}",
       natural_gain=g_nat, natural_gain_formula=theory, gradient_gain=g_gd, best_random_gain=float(g_rand.max()))
ev = torch.linalg.eigvalsh(F)
null = ev <= 1e-12 * ev[-1]
record(f"F: {int(null.sum())} zero eigenvalues (the output layer's [W | b] has {layers[-1].in_dim} columns); "
       f"smallest non-zero / largest = {float(ev[~null][0] / ev[-1]):.1e}",
       fisher_zero_eigenvalues=int(null.sum()), output_columns=layers[-1].in_dim,
       fisher_smallest_nonzero_ratio=float(ev[~null][0] / ev[-1]))
fig

# %% [markdown]
# The natural gradient gains more per unit of KL than the gradient and than every random direction.
#
# **How far can one trust this?** Only as far as `½dᵀFd` describes the KL. `F`'s smallest non-zero
# eigenvalue here is below 10⁻⁹ of its largest (recorded above), and the natural gradient takes long steps along
# such directions of tiny curvature. The table below takes real steps of growing KL budget `ε` and
# measures the actual decrease `h(θ) − h(θ + d)`: at `ε = 10⁻¹⁰` the natural step wins as predicted;
# from about `ε = 10⁻⁶` it *increases* `h`, while the gradient step and a **damped** natural step
# `−(F + λI)⁻¹∇h` (λ = 10⁻³, scaled to the same `ε`) stay safe. This is why K-FAC damps its
# curvature matrix (M&G 2015 §6, notebook 04).

# %%
import pandas as pd

LAMBDA = 1e-3
d_damped_dir = -torch.linalg.solve(F + LAMBDA * torch.eye(P, dtype=dt), grad_h)
rows = []
for eps in [1e-10, 1e-8, 1e-6, 1e-4]:
    scale = lambda d: d * np.sqrt(eps / EPS)   # to_kl scaled to KL budget eps instead of EPS
    steps = {"natural": scale(d_nat), "damped natural (λ = 1e-3)": scale(to_kl(d_damped_dir)), "gradient": scale(d_gd)}
    rows.append({"ε (KL budget)": eps, **{k: float(h(theta0) - h(theta0 + d)) for k, d in steps.items()}})
table = pd.DataFrame(rows).set_index("ε (KL budget)")
record(table.to_string(float_format=lambda v: f"{v:.3g}"),
       actual_decrease={str(k): v for k, v in table.to_dict(orient="index").items()})

# %% [markdown]
# ## 3. The Fisher is the generalised Gauss–Newton matrix (M&G 2015 §2.2)
#
# Write `J = ∂z/∂θ` for the Jacobian of the network's output. Then `Dθ = Jᵀ ∇_z L(y, z)` and
#
# $$F = \mathbb{E}_x\big[J^\top F_R\, J\big], \qquad F_R = \mathbb{E}_{y\sim R_{y|z}}\big[\nabla_z \log r\, \nabla_z \log r^\top\big].$$
#
# For the losses of this lab — softmax cross-entropy, sigmoid (Bernoulli) cross-entropy, squared
# error (a Gaussian with unit variance) — `z` is the natural parameter of an exponential family, so
# `−log r(y|z) = A(z) − yᵀz + const` and its Hessian in `z` is `∇²A(z)`, **whatever `y` is**; and
# `F_R = Cov(y) = ∇²A(z)` too. So `F_R = ∇²_z L`, and `F = E[Jᵀ (∇²_z L) J]` is exactly the
# generalised Gauss–Newton matrix (GGN), the curvature matrix of Hessian-free optimisation. For the
# softmax, `∇²_z L = diag(p) − ppᵀ`. Neither is the Hessian of `h`: that adds `Σ_c (∂L/∂z_c) ∇²z_c`,
# the curvature of the network itself, which can be indefinite.
#
# Checks: (a) for one case, autograd's Hessian of the loss in `z`, `diag(p) − ppᵀ` and
# `E_y[(p − e_y)(p − e_y)ᵀ]` coincide; (b) the GGN assembled from autograd's Jacobians equals the
# library's exact Fisher; (c) the Hessian of `h` does not.

# %%
z0 = logits(theta0).detach()
p0 = torch.softmax(z0[0], 0)
H_z = torch.autograd.functional.hessian(lambda z: loss.nll_per_case(z[None], y[:1]).sum(), z0[0])
E_y = sum(p0[c] * torch.outer(p0 - torch.eye(3, dtype=dt)[c], p0 - torch.eye(3, dtype=dt)[c]) for c in range(3))
J = torch.func.jacrev(logits)(theta0)                       # (N, classes, P)
p = torch.softmax(z0, 1)
FR = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]    # ∇²_z L per case
GGN = torch.einsum("ncp,ncd,ndq->pq", J, FR, J) / N
H = torch.func.hessian(h)(theta0)
rel = lambda X, Y: float((X - Y).norm() / Y.norm())   # relative Frobenius (or 2-) norm
record(f"(a) |∇²_z L − (diag p − ppᵀ)| = {float((H_z - (torch.diag(p0) - torch.outer(p0, p0))).abs().max()):.1e}, "
       f"|E_y[(p−e_y)(p−e_y)ᵀ] − (diag p − ppᵀ)| = {float((E_y - (torch.diag(p0) - torch.outer(p0, p0))).abs().max()):.1e}\n"
       f"(b) ‖GGN − F‖/‖F‖ = {rel(GGN, F):.1e}\n(c) ‖Hessian of h − F‖/‖F‖ = {rel(H, F):.3f}",
       hessian_z_error=float((H_z - (torch.diag(p0) - torch.outer(p0, p0))).abs().max()),
       fr_expectation_error=float((E_y - (torch.diag(p0) - torch.outer(p0, p0))).abs().max()),
       ggn_vs_fisher=rel(GGN, F), hessian_vs_fisher=rel(H, F),
       hessian_min_eig=float(torch.linalg.eigvalsh(H)[0]), fisher_min_eig=float(torch.linalg.eigvalsh(F)[0]))

# %% [markdown]
# The GGN and the Fisher agree to rounding; the Hessian differs by a large fraction and, unlike `F`
# (positive semi-definite by construction), has negative eigenvalues here (recorded above as
# `hessian_min_eig`) — one reason second-order methods for neural networks use `F` or the GGN.
#
# ## 4. True Fisher vs empirical Fisher (M&G 2015 §5)
#
# `F` takes targets from the **model's** distribution. Replacing them by the training targets gives
# the *empirical Fisher* `E_{(x,y)∈data}[Dθ Dθᵀ]` — cheaper to think about, but a different matrix: it
# is not the GGN, it is not a metric on predictions, and far from a good fit it mostly measures how
# wrong the model is. K-FAC estimates `F` without enumerating the classes by **sampling**: one target
# per case from the model's distribution, in one extra backward pass. That estimate is unbiased, so
# its error falls like `1/√samples`; the empirical Fisher's error does not fall at all.

# %%
fisher_emp = exact_fisher(model, loss, x, y=y, mode="empirical").dense
samples = [1, 4, 16, 64, 256]
sampled_err = [rel(exact_fisher(model, loss, x, mode="sampled", samples=k,
                                generator=torch.Generator().manual_seed(SEED + k)).dense, F) for k in samples]
emp_err = rel(fisher_emp, F)
fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                    subplot_titles=["relative error of the estimate of F", "F (left) vs empirical Fisher (right)"])
fig.add_trace(go.Scatter(x=samples, y=sampled_err, mode="lines+markers", name="sampled targets (K-FAC's)"), 1, 1)
fig.add_trace(go.Scatter(x=[samples[0], samples[-1]], y=[emp_err] * 2, mode="lines", name="training targets (empirical)",
                         line=dict(dash="dash")), 1, 1)
both = torch.cat([F, torch.full((P, 2), float("nan"), dtype=dt), fisher_emp], 1).numpy()
lim = float(np.nanquantile(np.abs(both), 0.995))
fig.add_trace(go.Heatmap(z=both, colorscale="RdBu_r", zmin=-lim, zmax=lim, zmid=0, showscale=True,
                         colorbar=dict(title="entry", x=1.02), name="F | empirical"), 1, 2)
fig.update_xaxes(type="log", title_text="targets drawn per case", row=1, col=1)
fig.update_yaxes(type="log", title_text="‖estimate − F‖ / ‖F‖", row=1, col=1)
fig.update_xaxes(title_text="parameter (F | empirical Fisher)", row=1, col=2)
fig.update_yaxes(title_text="parameter", autorange="reversed", row=1, col=2)
fig.update_layout(height=420, title="Sampled Fisher converges to F; the empirical Fisher does not",
                  legend=dict(x=0.0, y=-0.25, orientation="h"))
record(f"‖empirical − F‖/‖F‖ = {emp_err:.3f}; sampled: " + ", ".join(f"{k}: {e:.3f}" for k, e in zip(samples, sampled_err)),
       empirical_error=emp_err, sampled_errors=sampled_err, samples=samples)
fig

# %% [markdown]
# ## 5. vec and Kronecker identities: why `U = G⁻¹ V Ā⁻¹` (M&G 2015 §3, §4.2)
#
# Three identities, with `vec` stacking columns and `⊗` the Kronecker product:
#
# 1. `vec(u vᵀ) = v ⊗ u`. A layer's per-case gradient is an outer product, `DW_i = g_i ā_{i−1}ᵀ`
#    (with `g_i = Ds_i`), so `vec(DW_i) = ā_{i−1} ⊗ g_i` and the Fisher's `(i, j)` block is
#    `F_{i,j} = E[ā_{i−1}ā_{j−1}ᵀ ⊗ g_i g_jᵀ]`. K-FAC's approximation (eqn 1, notebook 02) replaces it by
#    `F̃_{i,j} = Ā_{i−1,j−1} ⊗ G_{i,j}` with `Ā_{i,j} = E[ā_i ā_jᵀ]` and `G_{i,j} = E[g_i g_jᵀ]`.
# 2. `(A ⊗ B) vec(X) = vec(B X Aᵀ)`.
# 3. `(A ⊗ B)⁻¹ = A⁻¹ ⊗ B⁻¹` (and `(A ⊗ B)(C ⊗ D) = AC ⊗ BD`).
#
# The block-diagonal approximation `F̆ = diag(Ā_{0,0} ⊗ G_{1,1}, …, Ā_{ℓ−1,ℓ−1} ⊗ G_{ℓ,ℓ})` therefore
# has the inverse `diag(Ā_{i−1,i−1}⁻¹ ⊗ G_{i,i}⁻¹)`, and for `v = [vec(V_1); …; vec(V_ℓ)]`, by 2,
#
# $$u = \breve F^{-1} v \iff U_i = G_{i,i}^{-1}\, V_i\, \bar A_{i-1,i-1}^{-1}.$$
#
# A dense solve with the `P × P` matrix costs `O(P³)`; this costs two small inverses per layer.

# %%
a, g, _ = output_gradients(model, layers, loss, x, y=y, mode="empirical")
n = 7                                                       # one case, one layer: DW = g āᵀ
model.zero_grad()
loss.nll_per_case(model(x[n:n + 1]), y[n:n + 1]).sum().backward()
DW = layers[1].grad_matrix()
outer = torch.outer(g[1][0, n], a[1][n])
A_, B_, X_ = (torch.randn(k, l, generator=gen, dtype=dt) for k, l in [(3, 3), (4, 4), (4, 3)])
identity_errors = {
    "DW = g āᵀ (autograd)": float((DW - outer).abs().max()),
    "vec(g āᵀ) = ā ⊗ g": float((vec(outer) - kron(a[1][n, :, None], g[1][0, n, :, None])[:, 0]).abs().max()),
    "(A⊗B)vec(X) = vec(BXAᵀ)": float((kron(A_, B_) @ vec(X_) - vec(B_ @ X_ @ A_.t())).abs().max()),
    "(A⊗B)⁻¹ = A⁻¹⊗B⁻¹": float((torch.linalg.inv(kron(A_, B_)) - kron(torch.linalg.inv(A_), torch.linalg.inv(B_)))
                              .abs().max()),
}
record("\n".join(f"{k}: max |difference| = {v:.1e}" for k, v in identity_errors.items()),
       identity_errors=list(identity_errors.values()))

# %% [markdown]
# Now the whole inverse. The hidden layers' factors (the output layer's `G` is singular, as in
# section 2) from the exact expectations over the model's distribution; `F̆` built densely from
# them; `F̆⁻¹v` by a dense solve against the library's `BlockDiagonalInverse`, which applies
# `U_i = G⁻¹ V_i Ā⁻¹` (here with no damping, γ = 0).

# %%
hidden = layers[:-1]
a, g, _ = output_gradients(model, hidden, loss, x, mode="exact")
A, G = batch_factors(a, g, factor_pairs(len(hidden), "all"))
F_breve = torch.block_diag(*[kron(A[i, i], G[i, i]) for i in range(len(hidden))])
v = torch.randn(F_breve.shape[0], generator=gen, dtype=dt)
u_dense = torch.linalg.solve(F_breve, v)
V = vector_to_params(v, hidden)
U = BlockDiagonalInverse([A[i, i] for i in range(len(hidden))], [G[i, i] for i in range(len(hidden))],
                         gamma=0.0).apply(V)
u_kfac = params_to_vector(U)
record(f"‖U (Kronecker) − F̆⁻¹v (dense)‖ / ‖F̆⁻¹v‖ = {float((u_kfac - u_dense).norm() / u_dense.norm()):.1e}",
       kron_inverse_vs_dense=float((u_kfac - u_dense).norm() / u_dense.norm()))

# %% [markdown]
# What that saves at the paper's scale: the MNIST autoencoder of M&G 2015 §13
# (784-1000-500-250-30, mirrored) has 2.8 million parameters. Its dense Fisher would take 64 TB in
# double precision and about 10¹⁹ flops to factor; its Kronecker factors take a few tens of MB and
# about 10¹⁰ flops.

# %%
enc = [784, 1000, 500, 250, 30]
sizes = enc + enc[-2::-1]
shapes = [(d_in + 1, d_out) for d_in, d_out in zip(sizes[:-1], sizes[1:])]
P_ae = sum(i * o for i, o in shapes)
dense_bytes, kron_bytes = 8 * P_ae**2, 8 * sum(i * i + o * o for i, o in shapes)
dense_flops, kron_flops = P_ae**3 / 3, sum(i**3 + o**3 for i, o in shapes) / 3
record(f"P = {P_ae:,}; dense F: {dense_bytes / 1e12:.0f} TB, {dense_flops:.1e} flops (Cholesky); "
       f"Kronecker factors: {kron_bytes / 1e6:.0f} MB, {kron_flops:.1e} flops",
       autoencoder_params=P_ae, dense_terabytes=dense_bytes / 1e12, kron_megabytes=kron_bytes / 1e6,
       dense_flops=dense_flops, kron_flops=kron_flops)

# %% [markdown]
# ## Exercises
#
# **1.** Show that `E_{y~p(·|x,θ)}[∇_θ log p(y|x, θ)] = 0`, and use it to derive
# `KL(P(θ) ‖ P(θ + d)) = ½ dᵀFd + O(‖d‖³)`.
#
# <details><summary>Worked answer</summary>
#
# `E_y[∇ log p] = Σ_y p(y) ∇p(y)/p(y) = ∇ Σ_y p(y) = ∇ 1 = 0`. Differentiating `Σ_y p ∇log p = 0` once
# more gives `Σ_y p ∇²log p + Σ_y p ∇log p ∇log pᵀ = 0`, i.e. `−E[∇² log p] = E[∇log p ∇log pᵀ] = F`.
# Now `KL = E_y[log p_θ(y) − log p_{θ+d}(y)]` with `log p_{θ+d} = log p_θ + ∇log pᵀd + ½ dᵀ∇²log p d + O(‖d‖³)`:
# the constant cancels, the linear term has expectation 0, and the quadratic one is `−½dᵀE[∇²log p]d = ½dᵀFd`.
# (Then average over the inputs `x`.)
# </details>
#
# **2.** For the softmax, `L(y, z) = −z_y + log Σ_c e^{z_c}`. Compute `∇_z L` and `∇²_z L` and show
# `∇²_z L = E_{y~p}[∇_z L ∇_z Lᵀ]`. Why does this give `F = GGN`?
#
# <details><summary>Worked answer</summary>
#
# `∇_z L = p − e_y` and `∇²_z L = diag(p) − ppᵀ` (no `y` in it). `E_y[(p − e_y)(p − e_y)ᵀ] = ppᵀ − 2ppᵀ +
# E[e_y e_yᵀ] = diag(p) − ppᵀ`. So `F_R = ∇²_z L`; with `Dθ = Jᵀ∇_z L`, `F = E_x[Jᵀ E_y[∇_zL∇_zLᵀ] J] =
# E_x[Jᵀ (∇²_z L) J]`, the GGN. Check (a) of section 3 is this identity, to rounding.
# </details>
#
# **3.** Prove `(A ⊗ B) vec(X) = vec(B X Aᵀ)`, then count the multiply-adds of `U = G⁻¹VĀ⁻¹` for a
# layer with `d_out × d_in` weights (given the two inverses) against a product with the dense
# `(d_out·d_in)²` block.
#
# <details><summary>Worked answer</summary>
#
# Column `k` of `BXAᵀ` is `Σ_l A_{kl} (B x_l)` where `x_l` is column `l` of `X`; stacking the columns
# gives the block row `[A_{k1}B, …, A_{kn}B]` acting on `vec(X)` — row block `k` of `A ⊗ B`.
# `G⁻¹V` costs `d_out²·d_in` and `(G⁻¹V)Ā⁻¹` costs `d_out·d_in²`: `d_out·d_in·(d_out + d_in)` in all,
# against `(d_out·d_in)²` for the dense block — for a 1000 × 785 layer, 1.4·10⁹ vs 6.2·10¹¹.
# </details>
#
# ## Glossary of the lecture's symbols
#
# | symbol | meaning | where |
# |---|---|---|
# | `θ`, `ℓ` | all parameters, `[vec(W_1); …; vec(W_ℓ)]`; the number of layers | §2.1 |
# | `ā_i`, `s_i`, `g_i` | a layer's activities with the homogeneous 1 appended; its inputs `W_i ā_{i−1}`; `g_i = Ds_i` | §2.1 |
# | `h`, `Dv` | the objective (mean loss over the training set); `Dv = ∂L/∂v = −∂ log p/∂v` | §2.1 |
# | `F` | the exact Fisher `E[Dθ Dθᵀ]`, targets from the model (= the GGN here) | §2.2 |
# | `Ā_{i,j}`, `G_{i,j}` | `E[ā_i ā_jᵀ]`, `E[g_i g_jᵀ]`: the Kronecker factors | §3 |
# | `F̃` | the Kronecker-factored Fisher, blocks `Ā_{i−1,j−1} ⊗ G_{i,j}` (eqn 1) | §3 |
# | `F̆` | block-diagonal approximation: the diagonal blocks of `F̃`; `F̆⁻¹` is block-diagonal | §4.2 |
# | `F̂` | the matrix agreeing with `F̃` on the tridiagonal blocks whose inverse `F̂⁻¹` is block-tridiagonal | §4.3 |
# | `Ψ_{i,i+1}`, `Σ_{i|i+1}`, `Ξ`, `Λ` | the regression coefficients of layer `i` on layer `i+1`, its residual covariance; `F̂⁻¹ = ΞᵀΛΞ` | §4.3 |
# | `ε` | decay of the running averages of `Ā` and `G`: `ε = min(1 − 1/k, 0.95)` at iteration `k` | §5 |
# | `τ₁`, `τ₂` | fractions of the mini-batch for the statistics (1/8) and for the exact-`F` products (1/4) | §8 |
# | `M(δ)` | the quadratic model `½δᵀCδ + ∇hᵀδ + h(θ)` the update minimises | §6.4, §6.5 |
# | `C` | its curvature matrix `F + (λ + η)I` | §6.4, §6.5 |
# | `λ` | the damping of the quadratic model, adapted by the Levenberg–Marquardt rule (`λ₀ = 150`) | §6.5 |
# | `ρ` | the reduction ratio `(h(θ + δ) − h(θ)) / (M(δ) − M(0))` that drives `λ` | §6.5 |
# | `ω₁` | `λ`'s factor, `(19/20)^{T₁}`: `λ ← ω₁λ` when `ρ > 3/4`, `λ ← λ/ω₁` when `ρ < 1/4` | §6.5 |
# | `η` | the ℓ2 regularisation coefficient (1e-5); it adds `ηI` to the curvature | §6, §13 |
# | `γ` | the damping of the approximate Fisher's inverse (factored Tikhonov), from `√(λ + η)` | §6.3, §6.6 |
# | `π_i` | the factored-Tikhonov split: `(Ā + π_i γ I) ⊗ (G + γ/π_i I)`, `π_i = √((tr Ā/dim Ā)/(tr G/dim G))` | §6.3 |
# | `ω₂` | `γ`'s grid factor, `(√(19/20))^{T₂}`: every `T₂` steps try `{ω₂γ, γ, γ/ω₂}` | §6.6 |
# | `α`, `μ` | the step's re-scaling and momentum: `δ = αΔ + μδ₀`, both from `M` (a 2 × 2 system) | §6.4, §7 |
# | `T₁`, `T₂`, `T₃` | intervals (iterations) for updating `λ` (5), `γ` (20) and the factor inverses (20) | §6.5, §6.6, §8 |
#
# Next: [02 · the Kronecker-factored Fisher](02_kronecker_factored_fisher.ipynb), where `F̃` meets
# the exact `F` of a real network (figure 1).
