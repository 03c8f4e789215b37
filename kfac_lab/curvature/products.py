"""Exact-Fisher products for the quadratic model (M&G 2015 §6.4, §7, Appendix C;
docs/algorithm.md#the-quadratic-model) and fast statistics.

``fisher_gram(dirs)`` returns ``Q[k, l] = d_kᵀ F d_l`` with ``F`` the exact Fisher on a subset
of cases: ``F = (1/n) Σ_n J_nᵀ F_R J_n``, so ``Q = (1/n) Σ_n (J_n d_k)ᵀ F_R (J_n d_l)`` — one
forward-mode pass for all directions together, no matrix is ever formed.

Two engines:
- ``SequentialPlan`` — for ``nn.Sequential`` stacks of ``nn.Linear`` and elementwise
  activations (tanh, logistic, ReLU, identity): hand-written forward mode (and the sampled
  backward for the statistics) through activations stored during the training forward pass.
  ``φ'`` is read off the stored outputs (``1 − a²``, ``a(1 − a)``, ``[a > 0]``).
- ``torch.func`` (``jvp`` under ``vmap``) for any other model.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from .layers import KFACLayer
from .losses import Loss
from .running_stats import frozen_running_stats

ACTIVATIONS = {nn.Tanh: "tanh", nn.Sigmoid: "logistic", nn.ReLU: "relu", nn.Identity: "identity"}


def activation_derivative(kind: str | None, out: Tensor) -> Tensor | None:
    """``φ'(s)`` from ``a = φ(s)``; ``None`` means 1 (identity)."""
    if kind is None or kind == "identity":
        return None
    if kind == "tanh":
        return 1.0 - out * out
    if kind == "logistic":
        return out * (1.0 - out)
    if kind == "relu":
        return (out > 0).to(out.dtype)
    raise ValueError(f"no derivative rule for activation {kind!r}")


def _flatten(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, nn.Sequential):
        return [m for child in module for m in _flatten(child)]
    return [module]


class SequentialPlan:
    """Layer ``i`` is followed by activation ``acts[i]`` (``None`` = none) before layer ``i+1``."""

    def __init__(self, layers: Sequence[KFACLayer], acts: Sequence[str | None]):
        self.layers, self.acts = list(layers), list(acts)

    @classmethod
    def build(cls, model: nn.Module, layers: Sequence[KFACLayer]) -> "SequentialPlan | None":
        """A plan when ``model`` is a (nested) ``nn.Sequential`` of Linear layers (all of them K-FAC
        layers, output layer last) with at most one supported activation between them; else ``None``."""
        if not isinstance(model, nn.Sequential):
            return None
        mods = [m for m in _flatten(model) if not isinstance(m, nn.Identity)]
        by_module = {id(l.module): l for l in layers}
        acts: list[str | None] = []
        order: list[KFACLayer] = []
        pending: str | None = None
        for m in mods:
            if isinstance(m, nn.Linear):
                if id(m) not in by_module:
                    return None
                if order:
                    acts.append(pending)
                order.append(by_module[id(m)])
                pending = None
            elif type(m) in ACTIVATIONS and order and pending is None:
                pending = ACTIVATIONS[type(m)]
            else:
                return None
        if pending is not None or [l.index for l in order] != list(range(len(layers))):
            return None
        if any(p.requires_grad for p in model.parameters() if not any(p is q for l in layers for q in l.params)):
            return None
        return cls(order, acts + [None])

    def derivatives(self, a: Sequence[Tensor]) -> list[Tensor | None]:
        """``φ'_i`` at the cases of ``a`` for every layer but the last (``None`` = identity),
        read off ā of layer ``i+1`` (its ones column dropped). Shapes ``(n, d_out_i)``.
        Compute once per step and share between ``backward`` and ``jvp``."""
        return [activation_derivative(self.acts[i], a[i + 1][..., : self.layers[i + 1].d_in])
                for i in range(len(self.layers) - 1)]

    def backward(self, a: Sequence[Tensor], dz: Tensor, derivs: Sequence[Tensor | None] | None = None) -> list[Tensor]:
        """Per-case ``g_i`` for all layers from ``dz = ∂ℓ/∂z`` (rows of ``a`` and ``dz`` aligned):
        ``g_ℓ = dz``, ``g_i = (g_{i+1} W_{i+1}) ⊙ φ'_i(s_i)``. Shapes ``(n, d_out_i)``.
        ``derivs``: ``derivatives(a)`` (or of more rows: the first ``n`` are used)."""
        n = dz.shape[0]
        L = len(self.layers)
        derivs = self.derivatives([t[:n] for t in a]) if derivs is None else derivs
        g: list[Tensor] = [None] * L  # type: ignore[list-item]
        g[L - 1] = dz
        for i in range(L - 2, -1, -1):
            back = g[i + 1] @ self.layers[i + 1].module.weight.detach()
            d = derivs[i]
            g[i] = back if d is None else back.mul_(d[:n])
        return g

    def jvp(self, a: Sequence[Tensor], directions: Sequence[Sequence[Tensor]],
            derivs: Sequence[Tensor | None] | None = None) -> Tensor:
        """``J d`` at the cases of ``a`` for each direction ``directions[k]`` (a list of per-layer
        ``[dW|db]`` matrices, shapes ``(d_out_i, in_dim_i)``):
        ``ds_i = ā_i dWᵀ + (φ'_{i−1} ⊙ ds_{i−1}) W_iᵀ``. The directions share one buffer per layer, so
        the second term is one GEMM for all of them (``k·n`` rows: fewer, larger products) and the
        first writes straight into it (no stacked copies of the directions).
        ``derivs``: ``derivatives(a)`` (or of more rows). Returns ``(k, n, d_out_ℓ)``."""
        n, K = a[0].shape[0], len(directions)
        derivs = self.derivatives(a) if derivs is None else derivs
        ds = None
        for i, layer in enumerate(self.layers):
            t = a[i].new_empty(K, n, layer.d_out)
            for k, dirs in enumerate(directions):
                torch.mm(a[i], dirs[i].t(), out=t[k])
            if ds is not None:
                d = derivs[i - 1]
                back = ds if d is None else ds.mul_(d[:n])
                t.view(K * n, -1).addmm_(back.view(K * n, -1), layer.module.weight.detach().t())
            ds = t
        return ds


def gram_from_jvps(loss: Loss, z: Tensor, Jd: Tensor) -> Tensor:
    """``Q[k, l] = (1/n) Σ_n (J_n d_k)ᵀ F_R(z_n) (J_n d_l)``; ``Jd`` shape ``(k, n, c)``, ``z`` ``(n, c)``."""
    n = z.shape[0]
    FJd = loss.fisher_vp(z, Jd)
    return torch.einsum("knc,lnc->kl", Jd.flatten(2), FJd.flatten(2)) / n


def func_jvp(model: nn.Module, x: Tensor, tangents: Sequence[dict[str, Tensor]]) -> Tensor:
    """``J d`` for each tangent dict (parameter name → tensor, trainable parameters) with
    ``torch.func.jvp`` vmapped over the tangents — or, for a sequential network of convolutions and
    Linear layers, by linearity with the layers' own operations (:mod:`.layered_jvp`, cheaper).
    Returns ``(k, n, c)``."""
    from .layered_jvp import layered_jvp  # noqa: PLC0415 (it imports this module)

    out = layered_jvp(model, x, tangents)
    if out is not None:
        return out
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def f(p):
        return functional_call(model, (p, buffers), (x,))

    stacked = {n: torch.stack([t[n] for t in tangents]) for n in params}
    with frozen_running_stats(model, "the exact-Fisher products"):  # batch norm: no buffer updates to trace
        try:
            out = vmap(lambda t: jvp(f, (params,), (t,))[1])(stacked)
        except RuntimeError:  # an op without a batching rule: one jvp per tangent
            out = torch.stack([jvp(f, (params,), ({n: t[n] for n in params},))[1] for t in tangents])
    return out.reshape(out.shape[0], out.shape[1], -1)


def dot(u: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``Σ_i ⟨u_i, v_i⟩`` over lists of same-shaped tensors (one fused pass each, no temporaries)."""
    return sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(u, v))


def sq_norm(ts: Sequence[Tensor]) -> Tensor:
    """``Σ_i ‖t_i‖²``."""
    return dot(ts, ts)
