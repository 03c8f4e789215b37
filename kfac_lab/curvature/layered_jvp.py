"""Forward-mode ``J d`` for sequential networks of convolutions and Linear layers, by linearity.

The exact-F products ``dᵀ F d`` (M&G 2015 §6.4) need ``J d``, the derivative of the outputs in the
direction ``d`` of the parameters. For a layer ``s = W ⋆ h + b`` (``⋆``: a convolution or a matrix
product) followed by ``h' = φ(s)`` the chain rule gives

    ``ds = W ⋆ dh + (dW ⋆ h + db)``,   ``dh' = φ'(s) ⊙ ds``

(the forward-mode rule of M&G 2015 §6.4 with ``⋆`` for weight sharing; KFC, Grosse & Martens 2016 §2).
Both terms are the layer's own operation — ``F.conv2d`` / ``F.linear`` — the first on all directions
at once (directions folded into the cases), the second with the directions' weights stacked along
the output channels: one convolution for every direction. On the mnist-cnn step this replaces
``torch.func``'s vmapped ``jvp`` (batching-rule and dual-tensor overheads around the same
convolutions). :func:`layered_jvp` returns ``None`` for any model it does not cover; the caller
(:func:`.products.func_jvp`) then uses ``torch.func``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .products import ACTIVATIONS, _flatten, activation_derivative

__all__ = ["layered_jvp"]


def _plan(model: nn.Module) -> list[nn.Module] | None:
    """The modules in order when ``model`` is a (nested) ``nn.Sequential`` of Linear layers,
    convolutions (groups 1, zero padding), elementwise activations, Flatten and Unflatten; else None."""
    if not isinstance(model, nn.Sequential) or any(True for _ in model.buffers()):
        return None
    mods = _flatten(model)
    for m in mods:
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros":
                return None
        elif isinstance(m, nn.Flatten):
            if m.start_dim == 0 or m.end_dim == 0:
                return None
        elif isinstance(m, nn.Unflatten):
            if m.dim == 0:
                return None
        elif not isinstance(m, nn.Linear) and type(m) not in ACTIVATIONS:
            return None
    return mods


def _stacked(tangents: Sequence[dict[str, Tensor]], name: str, like: Tensor) -> Tensor:
    """The directions' tangents of one parameter, concatenated along dim 0 (zeros where absent:
    a frozen parameter)."""
    return torch.cat([t[name] if name in t else torch.zeros_like(like) for t in tangents])


def layered_jvp(model: nn.Module, x: Tensor, tangents: Sequence[dict[str, Tensor]]) -> Tensor | None:
    """``J d`` for each tangent dict (parameter name → tensor), ``(k, n, c)``; None when ``model``
    is not a sequential network this module covers (module doc)."""
    mods = _plan(model)
    if mods is None:
        return None
    names = {id(p): n for n, p in model.named_parameters()}
    K, n = len(tangents), x.shape[0]
    h, dh = x.detach(), None  # dh: (K, n, …); None while it is zero (before the first layer)
    with torch.no_grad():
        for m in mods:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                W, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
                dW = _stacked(tangents, names[id(m.weight)], W)
                db = None if b is None else _stacked(tangents, names[id(m.bias)], b)
                if isinstance(m, nn.Conv2d):
                    conv = lambda inp, w, bias, m=m: F.conv2d(inp, w, bias, m.stride, m.padding, m.dilation)  # noqa: E731
                    ds = conv(h, dW, db)                                   # (n, K·O, Ho, Wo)
                    ds = ds.view(n, K, -1, *ds.shape[2:]).transpose(0, 1)  # (K, n, O, Ho, Wo)
                    if dh is not None:
                        ds = ds + conv(dh.flatten(0, 1), W, None).view(ds.shape)
                    h = conv(h, W, b)
                else:
                    ds = F.linear(h, dW, db)                               # (n, …, K·O)
                    ds = ds.view(*ds.shape[:-1], K, -1).movedim(-2, 0)     # (K, n, …, O)
                    if dh is not None:
                        ds = ds + F.linear(dh, W)
                    h = F.linear(h, W, b)
                dh = ds
            elif type(m) in ACTIVATIONS:
                h = m(h)
                d = activation_derivative(ACTIVATIONS[type(m)], h)
                if dh is not None and d is not None:
                    dh = dh * d
            else:  # Flatten / Unflatten: the same reshape of every direction
                h = m(h)
                if dh is not None:
                    dh = m(dh.flatten(0, 1)).unflatten(0, (K, n))
    if dh is None:
        return None
    return dh.reshape(K, n, -1)
