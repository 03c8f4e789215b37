"""Invariance of K-FAC to re-parameterisation (M&G 2015 §10, Corollary 2; docs/algorithm.md#analysis).

A tanh network, its logistic twin (``σ(u) = (tanh(u/2)+1)/2``: the twin's pre-activations are
twice the base's and its hidden outputs ``a' = (a+1)/2``, so its ``[W | b]`` is the base's
through an invertible linear map) and the base network on affinely transformed inputs
``x' = Px + q`` compute the same function. Trained side by side with K-FAC (negligible damping,
no momentum, fixed learning rate) their predictions stay equal at every iteration; with plain
gradient descent they drift apart.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from .. import checks
from ..curvature import find_layers, get_loss
from ..models import mlp
from ..optim import KFAC
from ..curvature.memory import itemsize, refuse_if_too_large
from ._common import clean_attrs, library_version

__all__ = ["invariance_study", "twin_networks"]

VARIANTS = ("logistic", "affine")
OPTIMIZERS = ("kfac", "sgd")


@torch.no_grad()
def twin_networks(sizes: Sequence[int], seed: int = 0, dtype: torch.dtype = torch.float64):
    """``(base, logistic_twin, affine_twin, P, q)``: three networks computing the same function —
    ``base(x) = logistic_twin(x) = affine_twin(P x + q)``.

    Twin: for hidden layer ``i``, ``W'_i = c_i W_i T_i`` with ``c_i = 2`` (1 at the output) and
    ``T_i = [[2I, −1], [0, 1]]`` for ``i > 0`` (``a = 2a' − 1`` on its inputs), ``T_0 = I``.
    Affine: ``W'_0 = W_0 [[P⁻¹, −P⁻¹q], [0, 1]]``."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    base = mlp(sizes, "tanh", dtype=dtype, seed=seed)
    twin = mlp(sizes, "logistic", dtype=dtype, seed=seed)
    affine = mlp(sizes, "tanh", dtype=dtype, seed=seed)
    d = sizes[0]
    P = torch.randn(d, d, dtype=dtype, generator=gen) + 3 * torch.eye(d, dtype=dtype)
    q = torch.randn(d, dtype=dtype, generator=gen)
    Lb, Lt, La = find_layers(base), find_layers(twin), find_layers(affine)
    for i, (lb, lt, la) in enumerate(zip(Lb, Lt, La)):
        W = lb.weight_matrix()
        c = 2.0 if i < len(Lb) - 1 else 1.0
        T = torch.eye(W.shape[1], dtype=dtype)
        if i > 0:
            T[:-1, :-1] *= 2
            T[:-1, -1] = -1
        Wt = c * W @ T
        lt.module.weight.copy_(Wt[:, :-1])
        lt.module.bias.copy_(Wt[:, -1])
        Wa = W.clone()
        if i == 0:
            Pi = torch.linalg.inv(P)
            M = torch.eye(d + 1, dtype=dtype)
            M[:d, :d], M[:d, d] = Pi, -Pi @ q
            Wa = W @ M
        la.module.weight.copy_(Wa[:, :-1])
        la.module.bias.copy_(Wa[:, -1])
    return base, twin, affine, P, q


def _sgd_step(model: nn.Module, loss, x: Tensor, y: Tensor, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.enable_grad():
        nll = loss.nll(model(x), y)
        grads = torch.autograd.grad(nll, params)
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)
    return float(nll.detach())


def invariance_study(
    steps: int = 20,
    seed: int = 0,
    sizes: Sequence[int] = (5, 6, 6, 4),
    cases: int = 400,
    lr: float = 0.2,
    sgd_lr: float | None = None,
    approx: str = "blockdiag",
    gamma: float = 1e-12,
    momentum: bool | float = False,
    damping: float = 1e-8,
    dtype: torch.dtype = torch.float64,
    max_bytes: int = 2**32,
) -> xr.Dataset:
    """Base vs twin predictions over training, for K-FAC and for plain gradient descent.

    A regression problem (Gaussian output loss, so no singular output factor): ``cases`` inputs
    ``x ~ N(0, I)`` and targets ``sin(2xR₁) + 0.1xR₂`` (random ``R``; all seeded by ``seed``).
    K-FAC: ``gamma`` (negligible damping), ``adapt_gamma=False``, ``adapt_damping=False``,
    ``momentum=False``, fixed ``lr``, ``weight_decay=0``, statistics on the whole batch, inverses
    every step. SGD: ``θ ← θ − sgd_lr·∇h`` (default ``sgd_lr = lr``).

    ``gamma`` and ``momentum`` break Corollary 2's conditions on purpose (exercises): γ adds
    ``γ I``-type terms that are not invariant; ``momentum`` (K-FAC only) is ``False`` (none), a
    fixed μ in ``[0, 1)`` (``δ = −α F̆⁻¹∇h + μδ₀``), or ``True`` (μ from the quadratic model
    ``½δᵀ(F + λI)δ + ∇hᵀδ`` with the fixed λ ``damping``, not adapted).

    Returns an ``xarray.Dataset`` with ``distance`` over ``(optimizer, variant, step)``:
    ``‖z_twin − z_base‖ / ‖z_base‖`` of the predictions on the training inputs (the affine
    twin sees ``Px + q``), ``step`` 0 (before training) … ``steps``; and ``loss`` over
    ``(optimizer, step)`` (the base network's mean NLL before each step; the final value at
    ``steps``). K-FAC's distance stays at rounding level (≤ 1e-6); SGD's grows.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if len(sizes) < 2:
        raise ValueError(f"sizes needs at least an input and an output width, got {sizes!r}")
    seed = checks.seed(seed)
    cases = checks.integer("cases", cases, minimum=1)
    sizes = [checks.integer(f"sizes[{i}]", s_, minimum=1) for i, s_ in enumerate(sizes)]
    b = itemsize(dtype)
    widths = sum(sizes)
    factors = sum((i + 1) ** 2 + o * o + (i + 1) * (o + 1) for i, o in zip(sizes[:-1], sizes[1:]))
    refuse_if_too_large(
        f"invariance_study (sizes {sizes}, {cases:,} cases)",
        {"the data and each network's activations": (3 * cases * (sizes[0] + sizes[-1]) + 3 * 6 * cases * widths) * b,
         "three K-FAC optimizers' factors, statistics and inverses": 3 * 6 * factors * b},
        max_bytes, "use smaller sizes (layer widths) or fewer cases")
    sgd_lr = lr if sgd_lr is None else sgd_lr
    gen = torch.Generator().manual_seed(int(seed))
    d, c = int(sizes[0]), int(sizes[-1])
    x = torch.randn(cases, d, dtype=dtype, generator=gen)
    R1 = torch.randn(d, c, dtype=dtype, generator=gen) / d**0.5
    R2 = torch.randn(d, c, dtype=dtype, generator=gen) / d**0.5
    y = torch.sin(2 * x @ R1) + 0.1 * x @ R2
    loss = get_loss("gaussian")
    if not (isinstance(momentum, bool) or 0 <= float(momentum) < 1):
        raise ValueError(f"momentum must be True, False or a fixed μ in [0, 1), got {momentum!r}")
    settings = dict(approx=approx, gamma=gamma, adapt_gamma=False, adapt_damping=False, momentum=momentum, lr=lr,
                    damping=damping,
                    weight_decay=0.0, stats_fraction=1.0, T3=1, T2=1, seed=seed + 7)

    dist = np.zeros((len(OPTIMIZERS), len(VARIANTS), steps + 1))
    losses = np.zeros((len(OPTIMIZERS), steps + 1))
    for o, name in enumerate(OPTIMIZERS):
        base, twin, affine, P, q = twin_networks(sizes, seed, dtype)
        xa = x @ P.t() + q
        nets, inputs = (base, twin, affine), (x, x, xa)
        opts = [KFAC(m, loss, **settings) for m in nets] if name == "kfac" else None
        for k in range(steps + 1):
            with torch.no_grad():
                zb, zt, za = base(x), twin(x), affine(xa)
                scale = zb.norm()
                dist[o, 0, k] = float((zt - zb).norm() / scale)
                dist[o, 1, k] = float((za - zb).norm() / scale)
                losses[o, k] = float(loss.nll(zb, y))
            if k == steps:
                break
            for j, (m, xi) in enumerate(zip(nets, inputs)):
                if name == "kfac":
                    opts[j].step(xi, y)
                else:
                    _sgd_step(m, loss, xi, y, sgd_lr)

    ds = xr.Dataset(
        {
            "distance": (("optimizer", "variant", "step"), dist,
                         {"long_name": "‖z_twin − z_base‖ / ‖z_base‖ (relative distance of the predictions)"}),
            "loss": (("optimizer", "step"), losses, {"long_name": "base network's mean NLL (Gaussian)"}),
        },
        coords={
            "optimizer": ("optimizer", np.asarray(OPTIMIZERS, dtype=object)),
            "variant": ("variant", np.asarray(VARIANTS, dtype=object)),
            "step": ("step", np.arange(steps + 1, dtype=np.int64)),
        },
    )
    from datetime import datetime, timezone

    ds.attrs = clean_attrs({
        "study": "invariance",
        "model": f"MLP {'-'.join(map(str, sizes))} tanh (twin: logistic; affine: x' = Px + q)",
        "loss": "gaussian",
        "seed": int(seed),
        "steps": int(steps),
        "num_cases": int(cases),
        "lr": float(lr),
        "sgd_lr": float(sgd_lr),
        "approx": approx,
        "gamma": float(gamma),
        "momentum": momentum if isinstance(momentum, bool) else float(momentum),
        "damping": float(damping),
        "kfac_settings": {k: v for k, v in settings.items()},
        "dtype": dtype,
        "kfac_lab_version": library_version(),
        "torch_version": torch.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return ds
