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
# # 6 · Invariance: when K-FAC follows the same path whatever the parameterisation
#
# Paper: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671), §10 (Theorem 1,
# Corollaries 2–3). Section and figure numbers in these notebooks are the arXiv version's.
#
# **The transformed network.** Replace each layer's `ā_i = φ̄_i(s_i)` by `ā†_i = Ω_i φ̄_i(Φ_i s†_i)`
# with invertible `Ω_i`, `Φ_i` (`Ω_ℓ = I`; `Ω_0` transforms the inputs). Theorem 1: there is an
# invertible **linear** map `θ = ζ(θ†)` under which both networks compute the same function, and the
# update `−αF̆⁻¹∇h` in one network is the image of `−αF̆†⁻¹∇h†` in the other.
#
# **Corollary 2** — K-FAC's path through the space of *predictions* is the same for both networks,
# provided
# 1. the initialisations are equivalent (`θ₀ = ζ(θ†₀)`),
# 2. damping is **absent or negligible**,
# 3. **momentum is not used**,
# 4. the learning rate is chosen **independently of the parameterisation** (a fixed α here).
#
# Two instances: a tanh network and its logistic twin (`tanh(s) = 2σ(2s) − 1`: Φ = 2I, Ω an affine
# map), and the same network on inputs transformed by `x ↦ Px + q` (any affine pre-processing).
# Gradient descent has no such property. What makes the proof work is that the bias sits in the
# same block as its weights, with the homogeneous coordinate 1 appended to `a` (`ā = [a; 1]`), so
# a translation of the units is a *linear* map of `[W | b]`; which column holds the bias is a
# convention (the lab uses the last). **Corollary 3**: undamped block-diagonal K-FAC is gradient
# descent on a network whose activities and back-propagated gradients are centred and whitened.
#
# *Runs top to bottom in well under a minute on a laptop CPU at the default size.*

# %%
import numpy as np
import torch
import ipywidgets as ipw
from kfac_lab import analysis, viz
from kfac_lab.lab.notebook import interactive_figure, light_figures, record

light_figures()   # figures as plotly JSON only: no copy of plotly.js in the saved notebook
torch.set_num_threads(1)   # these small networks run fastest on one thread (and other work on the machine slows them least)

# %% tags=["parameters"]
STEPS = 20    # iterations of each optimizer (full scale: 200)
SEED = 0

# %% [markdown]
# ## The conditions met: K-FAC's twins agree, gradient descent's do not
#
# A 5-6-6-4 tanh regression network (Gaussian output), its logistic twin and its affine-input twin,
# each trained by K-FAC with γ = 1e-12, no momentum and α = 0.2 (and by gradient descent with the
# same step). The y axis is the relative distance `‖z_twin − z_base‖ / ‖z_base‖` of the predictions.

# %%
inv = analysis.invariance_study(steps=STEPS, seed=SEED)
viz.invariance_figure(inv)

# %%
def final_distances(ds):
    d = ds["distance"].isel(step=-1)
    return {f"{o} · {v}": float(d.sel(optimizer=o, variant=v)) for o in ("kfac", "sgd") for v in ("logistic", "affine")}

base = final_distances(inv)
record("\n".join(f"{k:>16}: {v:.2g}" for k, v in base.items()), invariance_final=base)

# %% [markdown]
# K-FAC's twins agree to rounding level (printed above: below 1e-6) while gradient descent's drift by
# tens of per cent. Both optimizers did train the base network (its loss before each iteration):

# %%
loss = inv[["loss"]].rename(optimizer="run")
viz.training_curves(loss, x="step", y="loss", title="Base network's loss (mean Gaussian NLL) against iterations")

# %% [markdown]
# The block-tridiagonal `F̂⁻¹` is covered by Corollary 2 as well:

# %%
tri = final_distances(analysis.invariance_study(steps=STEPS, seed=SEED, approx="tridiag"))
record(f"block-tridiagonal K-FAC: logistic twin {tri['kfac · logistic']:.2g}, affine twin {tri['kfac · affine']:.2g}",
       invariance_tridiag=tri)

# %% [markdown]
# ## Breaking the conditions: γ and momentum
#
# - **γ** adds `π_iγI` and `(γ/π_i)I` to the factors. The twins' factors have different scales, so the
#   same γ damps them differently: the updates no longer correspond.
# - **Momentum with a fixed μ**, `δ = −αF̆⁻¹∇h + μδ₀`, is a fixed linear combination of updates that
#   each correspond under the *linear* map ζ — so it keeps the invariance. Corollary 2 excludes
#   momentum because K-FAC's μ comes from the quadratic model `½δᵀ(F + λI)δ + ∇hᵀδ`, whose `λ‖δ‖²`
#   term depends on the parameterisation. With λ negligible that μ stays (nearly) invariant; with the
#   paper's λ₀ = 150 it does not.

# %%
cases = {
    "γ = 1e-2": dict(gamma=1e-2),
    "fixed μ = 0.5": dict(momentum=0.5),
    "μ from the model, λ = 1e-8": dict(momentum=True, damping=1e-8),
    "μ from the model, λ = 150": dict(momentum=True, damping=150.0),
}
broken, lines = {}, []
for name, kw in cases.items():
    d = final_distances(analysis.invariance_study(steps=STEPS, seed=SEED, **kw))
    broken[name] = [d["kfac · logistic"], d["kfac · affine"]]
    lines.append(f"K-FAC, {name:>27}: logistic twin {d['kfac · logistic']:.2g}, affine twin {d['kfac · affine']:.2g}")
record("\n".join(lines), invariance_broken=broken)

# %% [markdown]
# ## Sliders: γ and momentum
#
# Move γ (log scale) or μ and the study re-runs (a few seconds each): watch K-FAC's solid lines rise
# from the rounding floor as γ grows, and stay there for any fixed μ.

# %%
def explore(log10_gamma=-12.0, mu=0.0):
    ds = analysis.invariance_study(steps=STEPS, seed=SEED, gamma=10.0 ** log10_gamma, momentum=float(mu))
    fig = viz.invariance_figure(ds)
    fig.update_layout(title=dict(text=f"Twin distance with γ = 1e{log10_gamma:g}, fixed μ = {mu:g}"))
    return fig

interactive_figure(explore,
                   log10_gamma=ipw.FloatSlider(value=-12.0, min=-12.0, max=0.0, step=1.0, description="log₁₀ γ",
                                               continuous_update=False),
                   mu=ipw.FloatSlider(value=0.0, min=0.0, max=0.9, step=0.1, description="μ (fixed)",
                                      continuous_update=False))

# %% [markdown]
# ## Exercises
#
# **1.** Derive Φ and Ω for tanh ↔ logistic: write `tanh(s) = 2σ(2s) − 1` as `Ω φ̄(Φ s)` for a layer
# of d units (with the homogeneous coordinate).
#
# <details><summary>Answer</summary>
#
# With φ = σ: `Φ = 2I` (d×d) and, acting on `φ̄ = [σ(2s); 1]`, `Ω = [[2I, −1], [0ᵀ, 1]]` — it maps
# `[σ(2s); 1]` to `[2σ(2s) − 1; 1] = [tanh(s); 1]`. Ω is invertible (upper block-triangular with
# non-zero diagonal), so Theorem 1 applies. `analysis.twin_networks` builds exactly these maps:
# `W'_i = c_i W_i T_i` with `c_i = 2` and `T_i = Ω` for the layer's inputs.
# </details>
#
# **2.** Why does gradient descent lose the invariance while `−αF̆⁻¹∇h` keeps it?
#
# <details><summary>Answer</summary>
#
# With `θ = Zθ†` (ζ linear), `∇h† = Zᵀ∇h` and the (block-wise) Fisher transforms as `F† = ZᵀFZ`.
# Gradient descent gives `δ† = −αZᵀ∇h`, i.e. `Zδ† = −αZZᵀ∇h ≠ −α∇h` unless Z is orthogonal. The
# natural-gradient step gives `δ† = −α(ZᵀFZ)⁻¹Zᵀ∇h = −αZ⁻¹F⁻¹∇h`, i.e. `Zδ† = δ` exactly. K-FAC keeps
# this because Z acts layer by layer as a Kronecker product: `s_i = Φ_i s†_i` and `ā†_i = Ω_i ā_i`
# give `W_i = Φ_i W†_i Ω_{i−1}`, i.e. `vec W_i = (Ω_{i−1}ᵀ ⊗ Φ_i) vec W†_i`, while the factors
# transform as `Ā† = Ω Ā Ωᵀ`, `G† = Φᵀ G Φ` — so `Ā† ⊗ G†` is `Ā ⊗ G` seen through Z (Theorem 1).
# </details>
#
# **3.** Break the invariance with momentum. (Hint: the table above.)
#
# <details><summary>Answer</summary>
#
# A fixed μ does not break it (`δ = −αF̆⁻¹∇h + μδ₀` is a combination of corresponding vectors). What
# breaks it is choosing μ (or α) from a model that is not invariant: `μ` from
# `½δᵀ(F + λI)δ + ∇hᵀδ` with λ = 150 — the `λ‖δ‖²` term measures steps in the Euclidean norm of
# *this* parameterisation. `analysis.invariance_study(momentum=True, damping=150.0)` shows the twins
# separating; with `damping=1e-8` they stay together.
# </details>

# %% [markdown]
# Previous: [05 · the race](05_race.ipynb) · the whole tour: [00 · lecture tour](00_lecture_tour.ipynb).
