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
# # 4 · Damping, re-scaling and momentum, written out
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), §6 (damping),
# §7 (momentum), §8 (costs). Section and figure numbers in these notebooks are the arXiv version's.
# How the lab implements each formula: [docs/algorithm.md](../docs/algorithm.md).
#
# The K-FAC proposal `Δ = −F̆⁻¹∇h` is only as good as the local quadratic model it minimises. K-FAC
# therefore **damps** it — factored Tikhonov damping γ of the approximate Fisher, and a
# Levenberg–Marquardt λ in the model used to **re-scale** the step — and adds **momentum**, a second
# direction whose coefficient the same model chooses. Momentum is not a form of damping: damping
# limits how far the model is trusted; momentum enlarges the space of steps the model is minimised
# over. Below, every formula is computed by hand at one iteration and checked against the library.
#
# | symbol | meaning |
# |---|---|
# | `h(θ)` | the objective: mean negative log-likelihood + `½η‖θ‖²` |
# | `η` | ℓ2 coefficient (weight decay), 1e-5 in the paper |
# | `F` | the exact Fisher (here: of the whole batch); `F̆` its block-diagonal Kronecker approximation |
# | `C` | `F + (λ+η)I`, the curvature of the quadratic model |
# | `M(δ)` | `½δᵀCδ + ∇hᵀδ + h(θ)`, the quadratic model of `h(θ+δ)` |
# | `λ` | Levenberg–Marquardt damping (λ₀ = 150), adapted every `T₁ = 5` iterations by the factor `ω₁ = (19/20)^T₁` |
# | `ρ` | reduction ratio `(h(θ+δ) − h(θ)) / (M(δ) − M(0))` |
# | `γ` | factored Tikhonov damping of `F̆`, tried on the grid `{ω₂γ, γ, γ/ω₂}` every `T₂ = 20` iterations, `ω₂ = (√(19/20))^T₂` |
# | `π_i` | `√[(tr Ā_{i−1,i−1}/(d_{i−1}+1)) / (tr G_{i,i}/d_i)]`, splits γ between the two factors |
# | `Δ` | the proposal `−F̆⁻¹∇h` (damped factors); `δ₀` the previous update |
# | `α, μ` | the step `δ = αΔ + μδ₀`; α alone: `α* = −∇hᵀΔ / ΔᵀCΔ` |
# | `T₃` | inverses recomputed every `T₃ = 20` iterations (and at k ≤ 3) |
# | `τ₁, τ₂` | shares of the mini-batch for the factor statistics (1/8) and for the exact-F products (1/4) |
#
# *Runs top to bottom in about a minute on a laptop CPU at the default size.*

# %%
import math
import numpy as np
import torch
import ipywidgets as ipw
import kfac_lab as kl
from kfac_lab import analysis, viz, widgets
from kfac_lab.curvature import get_loss, params_to_vector, vector_to_params
from kfac_lab.curvature.exact import exact_fisher
from kfac_lab.train import get_problem, race, open_store
from kfac_lab.lab.notebook import interactive_figure, light_figures, record

light_figures()   # figures as plotly JSON only: no copy of plotly.js in the saved notebook

# %% tags=["parameters"]
N = 1000          # cases of the batch (the 64-16-4-16-64 "tiny" autoencoder; the exact Fisher is dense)
KFAC_STEPS = 4    # K-FAC iterations before the worked one; keep KFAC_STEPS + 1 a multiple of T₁ = 5 (λ is updated there)
PROBLEM = "tiny"  # training problem of the comparison; full scale: "mnist" (with STEPS = 1000)
STEPS = 150       # iterations per run in the comparison
LAB = False       # True: the live training lab below (each of its plotly widgets stores plotly.js, ~5 MB, in an executed copy)
LIVE_STEPS = 40   # iterations of the live demo

# %% [markdown]
# ## One iteration by hand
#
# Full-batch K-FAC (τ₁ = τ₂ = 1, so the exact F of the batch is what the library uses too) in float64
# for `KFAC_STEPS` iterations; then we compute iteration `KFAC_STEPS + 1` ourselves.

# %%
tiny = get_problem("tiny")
net = tiny.make_model(seed=0).double()
x, y = tiny.X[:N].double(), tiny.Y[:N].double()
loss = get_loss(tiny.loss)
opt = kl.KFAC(net, tiny.loss, stats_fraction=1.0, fisher_fraction=1.0, seed=0)
for _ in range(KFAC_STEPS):
    opt.step(x, y)
layers, eta, lam, gamma = opt.layers, opt.config.weight_decay, opt.damping, opt.gamma
print(f"after {opt.k} iterations: λ = {lam:.4g}, γ = {gamma:.4g} (= √(λ+η) = {math.sqrt(lam + eta):.4g})")

# %% [markdown]
# ### π_i and the factored Tikhonov damping (§6.3)
#
# `(Ā + π_iγI) ⊗ (G + (γ/π_i)I)` adds `γ²I` plus cross terms `π_iγ I⊗G + (γ/π_i) Ā⊗I`. The choice of
# π_i minimises the norm of those cross terms (with the trace norm scaled by dimension), which gives
# the formula in the table. The inverse in use was built from the factors of its last refresh:

# %%
inv = opt.curvature.inverse
pis, lines = [], []
for i, (A, G) in enumerate(zip(inv.A, inv.G)):
    pi_hand = math.sqrt((float(A.trace()) / A.shape[0]) / (float(G.trace()) / G.shape[0]))
    pis.append([pi_hand, float(inv.pi[i])])
    lines.append(f"layer {i + 1}: Ā {tuple(A.shape)}, G {tuple(G.shape)}: π by hand {pi_hand:.6f}, library {float(inv.pi[i]):.6f}")
record("\n".join(lines), pi_hand_library=pis)

# %%
net.zero_grad(set_to_none=True)
nll = loss.nll(net(x), y)
nll.backward()
theta = params_to_vector([l.weight_matrix().detach() for l in layers])
grad = params_to_vector([l.grad_matrix().detach() for l in layers]) + eta * theta   # ∇h
net.zero_grad(set_to_none=True)
h0 = float(nll.detach()) + 0.5 * eta * float(theta @ theta)
V = vector_to_params(grad, layers)
U = []
for A, G, Vi, pi in zip(inv.A, inv.G, V, inv.pi):        # U_i = (G + γ/π I)⁻¹ V_i (Ā + πγ I)⁻¹
    pi = float(pi)
    Gd = G + gamma / pi * torch.eye(G.shape[0], dtype=G.dtype)
    Ad = A + pi * gamma * torch.eye(A.shape[0], dtype=A.dtype)
    U.append(-torch.linalg.solve(Gd, Vi) @ torch.linalg.inv(Ad))
Delta = params_to_vector(U)
Delta_lib = -params_to_vector(inv.apply(V))
delta_diff = float((Delta - Delta_lib).norm() / Delta_lib.norm())
record(f"Δ = −F̆⁻¹∇h by hand vs library: relative difference {delta_diff:.1e}", delta_hand_vs_library=delta_diff)

# %% [markdown]
# ### C, M and the 2×2 (α, μ) system (§6.4, §7)
#
# With `δ = αΔ + μδ₀`, `M(δ) − M(0) = ½[α μ] C₂ [α μ]ᵀ + [∇hᵀΔ ∇hᵀδ₀]·[α μ]`, where `C₂` is `C`
# restricted to the two directions. Setting the gradient to zero:
#
# `[ΔᵀCΔ  ΔᵀCδ₀; δ₀ᵀCΔ  δ₀ᵀCδ₀] [α; μ] = −[∇hᵀΔ; ∇hᵀδ₀]`.
#
# Without momentum only the first row remains: `α* = −∇hᵀΔ / ΔᵀCΔ`. The products `ΔᵀFΔ` need no F
# matrix in the library (one forward-mode pass per direction); here we build the dense F to check.

# %%
F = exact_fisher(net, loss, x, mode="exact", layers=layers, dtype=torch.float64).dense
C = F + (lam + eta) * torch.eye(F.shape[0], dtype=F.dtype)
d0 = params_to_vector(opt.delta0)
C2 = torch.tensor([[Delta @ C @ Delta, Delta @ C @ d0], [d0 @ C @ Delta, d0 @ C @ d0]])
alpha, mu = torch.linalg.solve(C2, -torch.stack([grad @ Delta, grad @ d0])).tolist()
alpha_star = float(-(grad @ Delta) / (Delta @ C @ Delta))
delta = alpha * Delta + mu * d0
M = float(0.5 * delta @ C @ delta + grad @ delta)
print(f"α* (no momentum) = {alpha_star:.6f};  with momentum: α = {alpha:.6f}, μ = {mu:.6f}, M(δ) − M(0) = {M:.6g}")

# %% [markdown]
# ### ρ and the Levenberg–Marquardt rule (§6.5)
#
# Every T₁ iterations: `ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`; `ρ > 3/4 ⇒ λ ← ω₁λ`, `ρ < 1/4 ⇒ λ ← λ/ω₁`.
# Iteration 5 is such an iteration (T₁ = 5). Now the library takes the same step:

# %%
def set_params(vec):
    with torch.no_grad():
        for l, W in zip(layers, vector_to_params(vec, layers)):
            w, b = l.from_matrix(W)
            l.module.weight.copy_(w)
            l.module.bias.copy_(b)

set_params(theta + delta)
with torch.no_grad():
    h1 = float(loss.nll(net(x), y)) + 0.5 * eta * float((theta + delta) @ (theta + delta))
set_params(theta)
rho = (h1 - h0) / M
omega1 = (19 / 20) ** opt.config.T1
lam_new = lam * omega1 if rho > 0.75 else lam / omega1 if rho < 0.25 else lam
info = opt.step(x, y)
pairs = {"alpha": (alpha, info.alpha), "mu": (mu, info.mu), "model_change": (M, info.model_change),
         "rho": (rho, info.rho), "new_damping": (lam_new, info.damping)}
record("\n".join(f"{k:>12}: by hand {h:.8g}   library {l:.8g}" for k, (h, l) in pairs.items()), step_hand_library=pairs)

# %% [markdown]
# **Why ρ ≈ 1.95.** Along δ the true objective is almost linear at this scale, while the model's
# curvature is dominated by λ: below, `λ‖δ‖²` is many times `δᵀFδ`. For a step that minimises the
# model, `M(δ) − M(0) = ½∇hᵀδ`; if `h` is nearly linear along δ, `h(θ+δ) − h(θ) ≈ ∇hᵀδ`: the ratio is
# close to 2. It means λ is far too large, and the rule can shrink it only by ω₁ ≈ 0.77 every five
# iterations: from λ₀ = 150 it takes on the order of a hundred iterations to reach the scale this
# problem needs (see the traces below). This is why the start matters
# ([05 · the race](05_race.ipynb) compares λ₀ = 150 with an automatic initial λ).

# %%
dFd, dCd = float(delta @ F @ delta), float(delta @ C @ delta)
lam_dd = lam * float(delta @ delta)
record(f"δᵀFδ = {dFd:.3g},  λ‖δ‖² = {lam_dd:.3g}  → ρ = {rho:.3f} (second-order estimate 2 − δᵀFδ/δᵀCδ = "
       f"{2 - dFd / dCd:.3f}), λ: {lam:.4g} → {info.damping:.4g}", dFd=dFd, lam_dd=lam_dd, rho=rho,
       rho_estimate=2 - dFd / dCd)

# %% [markdown]
# ### The γ grid (§6.6)
#
# At every T₂-th iteration (on an inverse refresh) the library builds the damped inverse for
# `{ω₂γ, γ, γ/ω₂}`, computes each candidate's step, and keeps the γ whose step gives the lowest
# `M(δ) − M(0)`. Continue to iteration 20:

# %%
while opt.k < opt.config.T2 - 1:
    opt.step(x, y)
g_before = opt.gamma
info = opt.step(x, y)
omega2 = math.sqrt(19 / 20) ** opt.config.T2
hand = [omega2 * g_before, g_before, g_before / omega2]
record(f"ω₂ = {omega2:.4f}; candidates by hand {[round(g, 6) for g in hand]}\n"
       + "\n".join(f"  γ = {g:.6g}: M(δ) − M(0) = {m:.6g}" for g, m in info.gamma_grid)
       + f"\nkept γ = {info.gamma:.6g}  (the argmin: {min(info.gamma_grid, key=lambda t: t[1])[0]:.6g})",
       gamma_candidates_hand=hand, gamma_grid=[list(t) for t in info.gamma_grid], gamma_kept=info.gamma)

# %% [markdown]
# ## Figure 7: Tikhonov damping alone is not enough (§6.4)
#
# At the parameters after a few K-FAC iterations, for each γ: the fraction of the optimal decrease
# `−½∇hᵀC⁻¹∇h` of the model reached by the Tikhonov-damped proposal as it is (α = 1), re-scaled by
# α*, and with momentum (α, μ). Stars mark each variant's best γ. Below the axis floor (−0.25) the
# Tikhonov step *increases* M, often by orders of magnitude: those points sit on the floor as ▼ and
# the note on the figure gives the lowest value. The slider changes λ (the proposals Δ(γ) do not
# depend on λ; C, α, μ and the optimum do).

# %%
lams = [1e-3, 1e-2, 1e-1, 1.0, 10.0, 150.0]
gammas = 10.0 ** np.linspace(-4, 2, 25)
damping = analysis.damping_study(tiny.make_model(seed=0), tiny.loss, tiny.X[:N], tiny.Y[:N],
                                 kfac_steps=KFAC_STEPS, damping=lams, gammas=gammas)
best_fractions, lines = {}, []
for lam_v in lams:
    d = damping.sel(damping=lam_v)
    best = {k: float(d[f"best_{k}"] / d["reduction_ideal"]) for k in ("tikhonov", "rescaled", "momentum")}
    best_fractions[f"{lam_v:g}"] = best
    lines.append(f"λ = {lam_v:>6g}: best fraction of the optimal decrease — Tikhonov alone {best['tikhonov']:.3f}, "
                 f"re-scaled {best['rescaled']:.3f}, with momentum {best['momentum']:.3f}")
record("\n".join(lines), best_fractions=best_fractions)

# %%
def figure7(lam_v=1.0):
    return viz.damping_figure(damping.sel(damping=lam_v))

interactive_figure(figure7, lam_v=ipw.SelectionSlider(options=lams, value=1.0, description="λ", continuous_update=False))

# %% [markdown]
# What the figure shows: Tikhonov damping alone reaches a fraction of the optimum only in a narrow
# band of γ and falls far below zero elsewhere (too little damping: huge steps); re-scaling by α*
# makes every γ safe (a re-scaled step can never increase M) and momentum adds a further share. With
# large λ, C ≈ λI and all variants look alike; the differences grow as λ shrinks — which is where
# training spends most of its time once λ has adapted.

# %% [markdown]
# ## Training with and without momentum and re-scaling
#
# Four runs on the same problem and data order: K-FAC as in the paper; without momentum (α*, μ = 0);
# without re-scaling or momentum (fixed α = 1); and SGD with Nesterov momentum.

# %%
threads = torch.get_num_threads()
torch.set_num_threads(1)   # the tiny autoencoder trains fastest on one thread (the dense F above wanted them all)
store = open_store(None)
variants = [("kfac", {}, "K-FAC"), ("kfac", {"momentum": False}, "K-FAC, no momentum"),
            ("kfac", {"momentum": False, "lr": 1.0}, "K-FAC, no re-scaling, no momentum (α = 1)"),
            ("sgd", {}, "SGD-Nesterov")]
run_ids = race(PROBLEM, variants, steps=STEPS, store=store)
torch.set_num_threads(threads)
curves = store.curves(run_ids, ["error", "wall_time", "damping", "gamma", "alpha", "mu", "rho"])
curves = curves.assign_coords(run=[label for _, _, label in variants])
viz.training_curves(curves, x="step", y="error",
                    title=f"Training reconstruction error against iterations ({PROBLEM})")

# %%
viz.traces(curves.isel(run=[0, 1]))

# %%
def at(run, var, step):
    s = curves[var].sel(run=run).dropna("step")
    return float(s.sel(step=min(step, int(s["step"][-1])), method="nearest"))

mu_run = curves["mu"].sel(run="K-FAC").dropna("step")
rho_run = curves["rho"].sel(run="K-FAC").dropna("step")
early, late = rho_run.sel(step=slice(None, 40)), rho_run.sel(step=slice(STEPS - 30, None))
errors = {str(r): [at(r, "error", 40), at(r, "error", STEPS)] for r in curves["run"].values}
record(f"K-FAC: ρ over iterations 1–40: median {float(early.median()):.2f}, over the last 30: {float(late.median()):.2f};  "
       f"λ at 40: {at('K-FAC', 'damping', 40):.3g}, at {STEPS}: {at('K-FAC', 'damping', STEPS):.3g}\n"
       f"K-FAC: μ < 0 at {int((mu_run < 0).sum())} of {mu_run.size} iterations; μ range [{float(mu_run.min()):.2f}, {float(mu_run.max()):.2f}]\n"
       + "\n".join(f"{r:>42}: error at iteration 40 {e[0]:6.3f}, at {STEPS} {e[1]:6.3f}" for r, e in errors.items()),
       rho_early=float(early.median()), rho_late=float(late.median()), mu_negative=int((mu_run < 0).sum()),
       mu_count=int(mu_run.size), mu_max=float(mu_run.max()), run_errors=errors)

# %% [markdown]
# **Reading the runs.**
# - **ρ near 2, then falling towards 1.** For the first few dozen iterations λ is too large (see
#   above): the steps are short, h is nearly linear along them, and K-FAC with and without momentum
#   are almost indistinguishable (their errors at iteration 40, printed above). As λ shrinks, ρ
#   drops towards 1: the model has become accurate at the scale of the steps.
# - **When momentum matters.** Only after λ has come down: from then on K-FAC with momentum pulls
#   away from the run without it (the errors at the last iteration). The paper (§13) found momentum
#   essential on its long runs (without it K-FAC "wasn't significantly faster" than the baseline);
#   [05 · the race](05_race.ipynb) shows what it is worth on the MNIST autoencoder here.
# - **Negative μ.** μ is whatever minimises M given Δ and δ₀; it is negative when the previous step
#   overshot along a direction that Δ now corrects, so the model takes part of δ₀ back. It happens
#   at a few iterations here (the count above). μ above 1 is allowed too: nothing bounds it.
# - **Fixed α = 1** (no re-scaling): early on it trails (the unscaled damped step is too short while
#   λ and γ are large); later, on this small problem, it keeps up. What it lacks is the guarantee of
#   exercise 3 below: nothing stops a step that increases M when γ is small (figure 7's blue curve).

# %% [markdown]
# ## Live toggles
#
# With `LAB = True` in the parameters cell, the training lab runs here: turn momentum off and on,
# change λ or freeze its adaptation while K-FAC trains; each change leaves a marker on the curves.
# The code does the same as clicking: momentum off for the second half. (It is off by default only
# to keep an executed copy of this notebook small; `make lab` opens the same lab in the browser.)

# %%
if LAB:
    lab = widgets.TrainingLabWidget(PROBLEM, optimizers=("kfac",), store=store, steps=LIVE_STEPS)
    display(lab)
    lab.start(steps=LIVE_STEPS // 2); lab.wait()
    lab.controls["momentum"].value = False       # what unticking "momentum" does
    lab.start(steps=LIVE_STEPS - LIVE_STEPS // 2); lab.wait()
    print("momentum:", lab.session.optimizer.config.momentum, "| events:", lab.events)

# %% [markdown]
# ## Exercises
#
# **1.** Implement α* and check it against the library: run `KFAC(..., momentum=False)` one more
# iteration after the worked one and compare `info.alpha` with your `−∇hᵀΔ / ΔᵀCΔ`.
#
# <details><summary>Answer</summary>
#
# ```python
# opt_nm = kl.KFAC(net2, tiny.loss, momentum=False, stats_fraction=1.0, fisher_fraction=1.0)
# # … after a few steps, with Δ computed as above (no refresh at this iteration):
# alpha_star = -(grad @ Delta) / (Delta @ F @ Delta + (lam + eta) * (Delta @ Delta))
# info = opt_nm.step(x, y); assert abs(info.alpha - alpha_star) < 1e-8 * abs(alpha_star)
# ```
# α* is the exact line minimum of M along Δ: `d/dα [½α²ΔᵀCΔ + α∇hᵀΔ] = 0`.
# </details>
#
# **2.** Show that a step that minimises M over its directions always has `M(δ) − M(0) = ½∇hᵀδ`, and
# deduce ρ ≈ 2 when `h` is linear along δ.
#
# <details><summary>Answer</summary>
#
# At the minimiser over span{Δ, δ₀}, `Cδ + ∇h` is orthogonal to both directions, hence to δ:
# `δᵀCδ = −∇hᵀδ`. So `M(δ) − M(0) = ½δᵀCδ + ∇hᵀδ = ½∇hᵀδ`. If `h(θ+δ) − h(θ) ≈ ∇hᵀδ`, then
# `ρ ≈ ∇hᵀδ / (½∇hᵀδ) = 2`. If along δ the objective curved like the model's Fisher part,
# `h(θ+δ) − h(θ) ≈ ∇hᵀδ + ½δᵀFδ` and, with `∇hᵀδ = −δᵀCδ`, `ρ ≈ 2 − δᵀFδ/δᵀCδ`. The cell above prints
# both: they agree to a few hundredths (h is not exactly quadratic, and its Hessian along δ is not
# exactly F); either way the Fisher is only a few per cent of the model's curvature — λ dominates.
# </details>
#
# **3.** Why is re-scaled Tikhonov (orange in figure 7) never above zero, while plain Tikhonov (blue)
# can be?
#
# <details><summary>Answer</summary>
#
# The re-scaled step minimises M along the line through Δ, and α = 0 (no step, M(0) − M(0) = 0) is on
# that line, so its minimum is ≤ 0. The α = 1 step has no such guarantee: with small γ, Δ is large and
# `½ΔᵀCΔ` dwarfs `∇hᵀΔ`.
# </details>

# %% [markdown]
# Previous: 03 · the inverse's structure ([all notebooks](README.md)) · next: [05 · the race](05_race.ipynb).
