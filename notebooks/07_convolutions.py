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
# # 7 · Convolutions: what KFC assumes, expand vs reduce vs EKFAC, and a race
#
# A convolution layer applies one weight matrix `W = weight.reshape(O, C·kh·kw)` at every output
# location `t`: its per-case gradient is a *sum* over locations, `DW = Σ_t g_t ā_tᵀ`, with `ā_t` the
# patch the kernel sees (plus the homogeneous 1) and `g_t` the derivative of the output there. The
# exact Fisher block `E[vec(DW) vec(DW)ᵀ]` then holds every pair of locations `(t, t′)`. **KFC**
# (Grosse & Martens 2016) factors it as `Ω ⊗ Γ` with `Ω = E[Σ_t ā_t ā_tᵀ]`, `Γ = E[Σ_t g_t g_tᵀ] / |T|`
# under three assumptions — (1) activations independent of derivatives (K-FAC's own), (2) spatial
# homogeneity, (3) spatially uncorrelated derivatives. Here we measure each one on a small CNN, compare
# KFC's **expand** factors with the **reduce** factors of Eschenhagen et al. (2023) and with **EKFAC**
# (George et al. 2018) against the exact Fisher, and race K-FAC against tuned SGD and Adam on a CNN.
#
# Papers: [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671) (K-FAC),
# [Grosse & Martens 2016, arXiv:1602.01407](https://arxiv.org/abs/1602.01407) (KFC),
# [Eschenhagen et al. 2023, arXiv:2311.00636](https://arxiv.org/abs/2311.00636) (expand / reduce),
# [George et al. 2018, arXiv:1806.03884](https://arxiv.org/abs/1806.03884) (EKFAC). How the lab
# implements them: [docs/algorithm.md](../docs/algorithm.md).
# *Runs top to bottom in about a minute on a 2-core laptop at the default size; the `parameters` cell says what to change.*

# %%
import numpy as np
import pandas as pd
import torch
from kfac_lab import analysis, viz
from kfac_lab.lab.notebook import record
from kfac_lab.optim import KFAC
from kfac_lab.train import get_problem, open_store, race

# %% tags=["parameters"]
N = 500                  # cases of the Fisher studies on fig1-cnn (exact Fisher of 2,746 parameters)
KFAC_STEPS = 3           # full-batch K-FAC iterations before the studies (the network partly trained)
SEED = 0
TUNE_STEPS = 10          # iterations per grid point when tuning SGD's and Adam's learning rates
RACE_STEPS = 15          # iterations of each contender in the race on mnist-cnn
SGD_GRID = [0.05, 0.2, 0.5]      # learning rates tried for SGD-Nesterov (μ_max 0.99)
ADAM_GRID = [3e-3, 1e-2, 3e-2]   # learning rates tried for Adam
RESOLUTION = 192         # largest heatmap side drawn (block-averaged above; keeps the saved notebook light)

# %% [markdown]
# ## The network: `fig1-cnn`
#
# Two convolutions (1→6 channels, 5×5, stride 2; 6→12, 3×3, stride 2; tanh) and a softmax layer on
# 16×16 digits — small enough that its exact Fisher (2,746² entries) fits in memory. It is trained
# for a few full-batch K-FAC iterations first, as the figure-1 network of notebook 01.

# %%
problem = get_problem("fig1-cnn", seed=SEED)
model = problem.make_model(SEED)
x, y = problem.X[:N], problem.Y[:N]
opt = KFAC(model, problem.loss, damping=1e-3, stats_fraction=1.0, fisher_fraction=1.0, seed=SEED)
for _ in range(KFAC_STEPS):
    opt.step(x, y)
with torch.no_grad():
    train_error = float((model(x).argmax(1) != y).double().mean())
print(f"{problem.describe()}\n{x.shape[0]} cases, training error {100 * train_error:.1f}% after {KFAC_STEPS} K-FAC iterations")

# %% [markdown]
# ## KFC's assumptions, measured
#
# `analysis.kfc_assumptions` computes, per convolution, from the same per-case `ā_t`, `g_t`
# (expectations over the model's own predictive distribution):
#
# - **(3) spatially uncorrelated derivatives** — the correlation `E[g_tᵀ g_t′] / √(E‖g_t‖² E‖g_t′‖²)`
#   between locations (left panel: KFC says 0 off the diagonal);
# - **(2) spatial homogeneity** — `E‖g_t‖²` and `E‖ā_t‖²` on the output grid (middle, right: KFC says
#   flat; the title quotes std/mean);
# - how much of the layer's exact block comes from **cross-location terms**: `‖F_ℓ − F_unc‖ / ‖F_ℓ‖` with
#   `F_unc = E[Σ_t ā_t ā_tᵀ ⊗ g_t g_tᵀ]`, and KFC-expand's own error `‖F_ℓ − Ω ⊗ Γ‖ / ‖F_ℓ‖`.

# %%
kfc = analysis.kfc_assumptions(model, problem.loss, x, seed=SEED)
convs = [int(k) for k in kfc.attrs["conv_layers"].strip("[]").split(",")]
table = pd.DataFrame({
    f"L{k + 1}": {
        "mean |corr(g_t, g_t′)|, t ≠ t′": float(kfc[f"g_offdiag_corr_{k}"]),
        "std/mean of E‖g_t‖² over t": float(kfc[f"g_power_cv_{k}"]),
        "std/mean of E‖ā_t‖² over t": float(kfc[f"a_power_cv_{k}"]),
        "‖F_ℓ − F_unc‖/‖F_ℓ‖ (cross-location terms)": float(kfc[f"uncorrelated_rel_error_{k}"]),
        "‖F_ℓ − Ω⊗Γ‖/‖F_ℓ‖ (KFC expand)": float(kfc[f"expand_rel_error_{k}"]),
    } for k in convs})
table.round(3)

# %%
viz.kfc_assumption_maps(kfc, convs[0])

# %% [markdown]
# The second convolution (`|T| = 16`: its 4×4 output grid):

# %%
viz.kfc_assumption_maps(kfc, convs[1])

# %% [markdown]
# What to see. The correlations between *different* locations are small on average — assumption 3
# looks nearly right location by location — yet dropping the cross-location terms changes the block by
# about as much as the block itself (fourth row): there are `|T|(|T| − 1)` of them against `|T|`
# diagonal ones (the first layer has `|T| = 64`), so small correlations add up, and with both signs.
# Homogeneity is rough too: the border locations see the zero padding, so `E‖ā_t‖²` drops there.
# KFC-expand's error on these blocks is therefore large; it is a *usable* approximation because, like
# K-FAC's, its inverse is cheap and roughly right in the directions that matter — the race below is
# the test of that.

# %%
corr = {f"L{k + 1}": float(kfc[f"g_offdiag_corr_{k}"]) for k in convs}
dropped = {f"L{k + 1}": float(kfc[f"uncorrelated_rel_error_{k}"]) for k in convs}
record("mean |corr(g_t, g_t′)| between locations: " + ", ".join(f"{k} {v:.2f}" for k, v in corr.items())
       + ";  dropping the cross-location terms changes the block by " + ", ".join(f"{k} {v:.2f}" for k, v in dropped.items()),
       kfc_corr=corr, kfc_uncorrelated=dropped)

# %% [markdown]
# ## Expand vs reduce vs EKFAC, against the exact Fisher
#
# `analysis.approximation_study` computes, from the same statistics: the exact Fisher `F` of all
# three layers; KFC-expand's Khatri–Rao `F̃` (K-FAC's `F̃` for the linear layer); KFC-reduce's, whose
# factors average `ā` and sum `g` over the locations per case (`A = E[ā̄ ā̄ᵀ]`, `G = E[ḡ ḡᵀ]`); and EKFAC,
# the expand factors' Kronecker eigenbasis with its eigenvalues replaced by the second moments of the
# per-case gradients projected into it (block-diagonal). Hover a cell: the two weights it couples —
# layer, output channel `o`, input channel `c`, kernel row `kh` and column `kw` (`b` = bias).

# %%
study = analysis.approximation_study(model, problem.loss, x, seed=SEED)
viz.approximation_heatmaps(study, max_size=RESOLUTION)

# %% [markdown]
# Relative Frobenius errors `‖F_ij − X_ij‖ / ‖F_ij‖`, per diagonal block (each layer's own Fisher block)
# and over the whole matrix:

# %%
names = {"kron": "KFC expand", "kron_reduce": "KFC reduce", "ekfac": "EKFAC"}
layer_ids = [int(v) for v in study["block_row"].values]
errors = pd.DataFrame({
    label: [float(study[f"block_rel_error_{v}"].sel(block_row=k, block_col=k)) for k in layer_ids]
    + [float(study[f"rel_error_{v}"])] for v, label in names.items()},
    index=[f"L{k + 1}" for k in layer_ids] + ["whole F"])
errors.round(3)

# %% [markdown]
# Three things to read off. (a) On every diagonal block EKFAC's error is at most KFC-expand's: in the
# same eigenbasis, EKFAC's diagonal is the Frobenius-best one, and the Kronecker eigenvalues are just
# one diagonal among many (George et al. 2018, §3.2). (b) Over the whole matrix EKFAC gives some of that
# back: it is block-diagonal, while `F̃` also approximates the blocks *between* layers. (c) Expand and
# reduce agree on the linear layer (no weight sharing there) and differ on the convolutions — neither
# dominates in general (here reduce is closer); reduce is also the cheaper one (no `|T|`-fold sums).

# %%
lin = layer_ids[-1]   # (c): the last layer is the linear one
record(f"whole-matrix errors: expand {errors.loc['whole F', 'KFC expand']:.3f}, "
       f"reduce {errors.loc['whole F', 'KFC reduce']:.3f}, EKFAC {errors.loc['whole F', 'EKFAC']:.3f}",
       layer_errors={f"L{k + 1}": {c: float(errors.loc[f"L{k + 1}", c]) for c in ("KFC expand", "KFC reduce", "EKFAC")}
                     for k in layer_ids},
       linear_layer=f"L{lin + 1}")

# %% [markdown]
# ## A short race on `mnist-cnn`
#
# `mnist-cnn` (conv 1→8 5×5/2, conv 8→16 3×3/2, ReLU, softmax; 28×28 digits) with K-FAC (KFC-expand,
# block-diagonal, its defaults) against SGD-Nesterov and Adam, each **tuned** on a small grid of learning
# rates first: every grid point runs `TUNE_STEPS` iterations and the lowest final training loss wins.

# %%
store = open_store(None)   # in memory
grid = [("sgd", {"lr": lr, "mu_max": 0.99}, f"SGD lr={lr:g}") for lr in SGD_GRID] \
    + [("adam", {"lr": lr}, f"Adam lr={lr:g}") for lr in ADAM_GRID]
tune_ids = race("mnist-cnn", grid, steps=TUNE_STEPS, store=store, seed=SEED, eval_every=TUNE_STEPS)
tuned = store.curves(tune_ids, ["loss"]).assign_coords(run=[label for _, _, label in grid])
final = {label: float(tuned["loss"].sel(run=label).dropna("step")[-1]) for _, _, label in grid}
best = {name: min((c for c in grid if c[0] == name), key=lambda c: final[c[2]]) for name in ("sgd", "adam")}
pd.Series(final, name=f"training loss after {TUNE_STEPS} iterations").round(4).to_frame()

# %%
contenders = [("kfac", {}, "K-FAC (KFC expand)"), best["sgd"], best["adam"]]
run_ids = race("mnist-cnn", contenders, steps=RACE_STEPS, store=store, seed=SEED, eval_every=2)
curves = store.curves(run_ids, ["error", "loss", "wall_time"]).assign_coords(run=[c[2] for c in contenders])
viz.training_curves(curves, x="step", y="loss", title="mnist-cnn: training loss per iteration")

# %%
viz.training_curves(curves, x="wall_time", y="loss", title="mnist-cnn: training loss per second")

# %%
summary = pd.DataFrame({
    "iterations": [int(curves["loss"][i].dropna("step")["step"].max()) for i in range(len(run_ids))],
    "seconds": curves["wall_time"].max("step").values.round(1),
    "final loss": [float(curves["loss"][i].dropna("step")[-1]) for i in range(len(run_ids))],
    "final error": [float(curves["error"][i].dropna("step")[-1]) for i in range(len(run_ids))],
}, index=curves["run"].values)
summary

# %% [markdown]
# Per iteration K-FAC is well ahead of tuned SGD and at least level with tuned Adam after a few steps
# (the check below); per second the picture depends on the machine — a K-FAC iteration on this CNN
# costs several SGD steps (the patches of the statistics subset, the exact-F products for α and μ, the
# factor inverses at each of the first iterations) — so raise `RACE_STEPS` and watch the second plot to
# see whether, and where, the curves cross on yours.

# %%
loss = summary["final loss"]
record(f"final loss after {RACE_STEPS} iterations: " + ", ".join(f"{k} {v:.3f}" for k, v in loss.items()),
       race_final_loss=[[str(k), float(v)] for k, v in loss.items()])

# %% [markdown]
# ## Exercises
#
# 1. Re-run the study with `mode="sampled"` (one target per case) in `approximation_study`. Which errors
#    change, and why does EKFAC's advantage on the diagonal blocks survive?
#
# <details><summary>Answer</summary>
#
# All three approximations and `F` itself are now estimated from one sampled target per case, so every
# error changes a little (sampling noise). EKFAC's advantage survives because it is a property of the
# *same* statistics: its diagonal is the Frobenius-best in the eigenbasis for the `F` built from those
# per-case gradients, and `Ω ⊗ Γ`'s eigenvalues are one particular diagonal in the same basis.
# </details>
#
# 2. Why are expand and reduce identical on the last layer, and what would make them differ there?
#
# <details><summary>Answer</summary>
#
# The last layer is an `nn.Linear` on `(N, d)` inputs: one location, `|T| = 1`, so `ā̄ = ā` and `ḡ = g`
# and both give K-FAC's `E[ā āᵀ] ⊗ E[g gᵀ]`. Applied to `(N, T, d)` inputs (a sequence, or a grid of
# features) the same Linear shares its weights over `T` locations and the two differ as on a convolution.
# </details>
#
# 3. The cross-location terms are as large as `F_ℓ` itself although the average correlation is small.
#    Estimate their weight from `|T|` and the mean |correlation| alone, and compare with the table.
#
# <details><summary>Answer</summary>
#
# The diagonal terms contribute about `|T|·p` (with `p` a typical `E‖ā_t‖²E‖g_t‖²`), the cross terms up
# to `|T|(|T| − 1)·ρ·p` for an average |correlation| `ρ`: their ratio is at most about `(|T| − 1)ρ` — with
# `|T| = 64` and `ρ ≈ 0.1` that is ≈ 6. Their signs vary, so much of that cancels, and what is left is
# still of the block's own size, as the table's fourth row says.
# </details>

# %% [markdown]
# ## Explore
#
# The same views behind selectors: `widgets.FisherExplorerWidget({"fig1-cnn": study}, view="ekfac",
# max_size=128)` in a cell of your own (not run here: a plotly `FigureWidget` embeds plotly.js, about
# 5 MB, in the saved notebook), or the dashboard's Fisher explorer (`make lab`), which computes them live
# for the figure-1 CNN (network *figure-1 CNN*, tab *F vs F̃ vs EKFAC*; one convolution at a time for
# the cumulant and inverse tabs).
