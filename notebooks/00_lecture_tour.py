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
# # K-FAC in 45 minutes — a lecture tour
#
# A path through [Martens & Grosse 2015, arXiv:1503.05671](https://arxiv.org/abs/1503.05671) with the
# lab's live figures, in the order of the paper's argument. Section and figure numbers are the arXiv
# version's throughout; the symbols are listed in the glossary at the end of
# [01](01_natural_gradient.ipynb). Each stop is a few short cells; the numbered notebooks go deeper
# and hold the derivations and exercises. Pick a preset in the `parameters` cell: `"lecture"` (each
# section runs in seconds), `"quick"` (smaller still) or `"full"` (the paper's scale: minutes to hours).
#
# | time | section | paper | notebook |
# |---|---|---|---|
# | 0–5 min | the natural gradient, the Fisher, why it is too big | §2 | [01](01_natural_gradient.ipynb) |
# | 5–15 min | Kronecker factors: F vs F̃, the error in cumulants | §3, §3.1, figure 1 | [02](02_kronecker_factored_fisher.ipynb) |
# | 15–22 min | the structure of F̃⁻¹: block-diagonal vs block-tridiagonal | §4, figures 2, 3, 5, 6 | [03](03_inverse_structure.ipynb) |
# | 22–30 min | damping, re-scaling, momentum | §6–7, figure 7 | [04](04_damping_and_momentum.ipynb) |
# | 30–40 min | the race on the autoencoders | §13, figures 9–11 | [05](05_race.ipynb) |
# | 40–45 min | invariance; wrap-up | §10 | [06](06_invariance.ipynb) |

# %%
from pathlib import Path
import torch
import kfac_lab as kl
from kfac_lab import analysis, viz
from kfac_lab.lab.notebook import light_figures, record
from kfac_lab.train import get_problem, open_store, race
from kfac_lab.train.race_record import final_table, read_race

light_figures()   # figures as plotly JSON only: no copy of plotly.js in the saved notebook

# %% tags=["parameters"]
PRESET = "lecture"   # "quick" | "lecture" | "full" (the paper's scale: long)

# %%
PRESETS = {   # n: cases of the Fisher studies; race_seconds: training seconds per contender of the live race;
              # resolution: heatmap cells per side (block-averaged above it: keeps a saved notebook small)
    "quick":   dict(n=300, kfac_steps=3, layers=[2, 3], race_seconds=1.0, problem="tiny",
                    damping_n=300, inv_steps=8, resolution=120),
    "lecture": dict(n=600, kfac_steps=5, layers=[1, 2, 3], race_seconds=3.0, problem="tiny",
                    damping_n=500, inv_steps=12, resolution=180),
    "full":    dict(n=10000, kfac_steps=7, layers=[1, 2, 3], race_seconds=1800.0, problem="mnist",
                    damping_n=5000, inv_steps=200, resolution=180),
}
P = PRESETS[PRESET]
P

# %% [markdown]
# ## 0–5 min · The natural gradient and the Fisher (§2)
#
# The natural gradient `F⁻¹∇h` is the steepest-descent direction when the size of a step is measured
# by how much it changes the model's predictive distribution (the KL divergence, to second order
# `½δᵀFδ`), with `F = E[DθDθᵀ]` and the targets drawn from the model. For the paper's MNIST
# autoencoder θ has 2.8 million entries: F would have 8·10¹² — far too many to store, let alone
# invert. K-FAC approximates `F⁻¹` with a few small matrices per layer.
#
# ## 5–15 min · F ≈ F̃ = [Ā ⊗ G] (figure 1)
#
# The paper's 256-20-20-20-20-10 tanh network after a few K-FAC iterations, on the hidden layers
# (undamped: the softmax output layer's G is singular, a lesson of notebook 03).

# %%
model, x = analysis.figure1_setup(n=P["n"], kfac_steps=P["kfac_steps"])
study = analysis.fisher_study(model, "categorical", x, layers=P["layers"], gamma=0.0)
viz.fisher_heatmaps(study, max_size=P["resolution"])

# %%
cum = analysis.cumulant_study(model, "categorical", x, layers=P["layers"], mode="exact")
viz.cumulant_totals(cum)

# %% [markdown]
# ## 15–22 min · F̃⁻¹ is nearly block-tridiagonal (§4, figures 2, 5, 6)

# %%
viz.block_average_map(study)

# %%
viz.inverse_quality(study, max_size=P["resolution"])

# %% [markdown]
# ## 22–30 min · Damping: Tikhonov alone is not enough (§6, figure 7)
#
# The K-FAC proposal `Δ = −F̆⁻¹∇h` is re-scaled and combined with the previous step by the exact
# Fisher's quadratic model `M(δ) = ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ`; λ follows the Levenberg–Marquardt rule,
# γ damps the factors. The figure: the share of the best possible decrease of M each variant reaches,
# for every γ. (Notebook 04 works every formula out and checks it against the library.)

# %%
tiny = get_problem("tiny")
n = P["damping_n"]
damping = analysis.damping_study(tiny.make_model(seed=0), tiny.loss, tiny.X[:n], tiny.Y[:n])
viz.damping_figure(damping)

# %% [markdown]
# ## 30–40 min · The race (§13, figures 9–11)
#
# The paper: with momentum, K-FAC makes orders of magnitude more progress per iteration than SGD
# with Nesterov momentum, and much more per second although each iteration costs more (mostly
# because its mini-batches are much larger); without momentum it "wasn't significantly faster".
# (The paper did not compare with diagonal methods such as Adam.) First the lab's long race on the
# paper's MNIST autoencoder, 600 training seconds per contender (stored; notebook 05 has the table):

# %%
stored, report = read_race(Path("data/race_600s_all.csv"))
best = {c["label"]: c for c in report["contenders"]}["K-FAC blockdiag"]
record(f"K-FAC (block-diagonal) reaches the tuned SGD's best error in {best['seconds_to_target']:.0f} s of its 600: "
       f"{best['speedup']:.2f}× sooner", stored_speedup=best["speedup"])
viz.training_curves(stored, x="wall_time", y="error",
                    title="MNIST autoencoder (stored race): training error against training seconds")

# %% [markdown]
# Then a short race on this machine. The paper starts λ at 150, which on a short run keeps K-FAC
# over-damped for its first ~100 iterations; the lab's `damping="auto"` chooses λ₀ on the first
# batch (not in the paper). Both race here, against SGD-Nesterov: on this tiny network both starts
# end below SGD and close together; the automatic start's lead shows on the paper's MNIST
# autoencoder (notebook 05: 3.77× the best tuned baseline at 45 s, against 0.75× from λ₀ = 150).

# %%
threads = torch.get_num_threads()
torch.set_num_threads(1)   # the tiny autoencoder runs fastest on one thread (and other work on the machine slows it least)
store = open_store(None)
contenders = [("kfac", {"damping": "auto"}, "K-FAC, λ₀ automatic (lab)"), ("kfac", {}, "K-FAC, λ₀ = 150 (paper)"),
              ("sgd", {}, "SGD-Nesterov")]
run_ids = race(P["problem"], contenders, seconds=P["race_seconds"], store=store)
torch.set_num_threads(threads)
live = store.curves(run_ids, ["error", "loss", "wall_time"]).assign_coords(run=[c[2] for c in contenders])
table = final_table(live)
record(table.to_string(), tour_live_final={str(k): float(v) for k, v in table["final error"].items()})
viz.training_curves(live, x="wall_time", y="error",
                    title=f"Live race ({P['problem']}): training error against training seconds")

# %% [markdown]
# ## 40–45 min · Invariance (§10, Corollary 2) and wrap-up
#
# With negligible damping, no momentum and a step size that does not depend on the
# parameterisation, K-FAC's predictions are the same for a tanh network and its logistic twin, or for
# affinely transformed inputs; gradient descent's are not (notebook 06 breaks the conditions).

# %%
viz.invariance_figure(analysis.invariance_study(steps=P["inv_steps"]))

# %% [markdown]
# **Take-aways.** (1) F̃ keeps the Fisher's coarse structure at the cost of a few small matrices per
# layer; (2) its inverse is close to block-tridiagonal, so inverting per layer (or per chain) is
# accurate; (3) the approximate step needs the exact-F re-scaling, adaptive damping and momentum to
# be a good step; (4) then, over long runs, K-FAC makes far more progress than a well-tuned SGD per
# iteration and clearly more per second — and the start (λ₀) decides short races; (5) under
# Corollary 2's conditions it is invariant to affine re-parameterisations of the units and inputs.
# The dashboards (`make lab`) show all of this on the same store.

# %% [markdown]
# ## Exercises
#
# **1.** The tour's live race gives each contender the same training seconds. Why is that not the
# same as the same number of iterations, and which of the paper's two kinds of plot does each answer?
#
# <details><summary>Answer</summary>
#
# A K-FAC iteration costs several SGD iterations (larger mini-batches, the statistics, the inverses
# every T₃ iterations, the exact-F products for α and μ). Equal iterations compare the *quality of a
# step* (the paper's per-iteration curves); equal seconds compare *what a user waits for* (the
# per-second curves). K-FAC wins the first by a wide margin and the second only once its better steps
# have paid for their cost — see notebook 05.
# </details>
#
# **2.** Figure 7 above was computed at the λ the short K-FAC run ended with. Predict how the three
# curves change if λ is 100 times larger.
#
# <details><summary>Answer</summary>
#
# With a large λ the model's curvature `C = F + (λ+η)I` is dominated by λI, so every proposal is
# judged almost as a scaled gradient step: the three variants come close together and near the
# optimum. The differences (and the need for re-scaling and momentum) show when λ is small —
# notebook 04 has a λ slider for exactly this.
# </details>

