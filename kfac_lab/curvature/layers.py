"""Which modules are K-FAC layers, and hooks that capture ā (input with its homogeneous 1) and g.

Notation (M&G 2015 §2.1; docs/conventions.md): layer i computes ``s_i = W_i ā_{i-1}``; ``ā`` is the input with a
1 appended when the layer has a bias, so the bias is the *last column* of ``[W_i | b_i]``
(shape ``d_out × (d_in + 1)``), and ``g_i = ∂L/∂s_i``. In code, layers are numbered from 0 and
``a[i]`` is the input of layer ``i`` (the paper's ``ā_{i-1}`` for its 1-based layer ``i``).

Weight sharing (Grosse & Martens 2016, "KFC", §3; docs/conventions.md#weight-sharing): an
``nn.Conv2d`` applies ``W = weight.reshape(I, J·kh·kw)`` at every output location ``t``; its ā per
case and location are the patches the kernel sees (``F.unfold``, + the 1), so ``a[i]`` has shape
``(n, T, in_dim)`` and ``g[i]`` ``(n, T, d_out)``, and the per-case gradient is
``DW_n = Σ_t g_{n,t} ā_{n,t}ᵀ``. An ``nn.Linear`` applied to ``(N, …, d)`` inputs is the same case
with ``t`` running over the extra dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import KFACError, UnsupportedLayerError

SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True, eq=False)
class KFACLayer:
    """One K-FAC layer: a ``nn.Linear`` or ``nn.Conv2d`` at position ``index`` in forward order."""

    index: int
    name: str
    module: nn.Linear | nn.Conv2d

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def weight_sharing(self) -> bool:
        """True for a convolution (one ``W`` at every output location). A ``nn.Linear`` shares its
        weights only when applied to ``(N, …, d)`` inputs, which shows in its statistics' shapes."""
        return self.is_conv

    @property
    def d_in(self) -> int:
        """Input width without the homogeneous coordinate (``J·kh·kw`` for a convolution)."""
        m = self.module
        if self.is_conv:
            return m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        return m.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_channels if self.is_conv else self.module.out_features

    @property
    def in_dim(self) -> int:
        """Width of ā: ``d_in + 1`` with a bias, ``d_in`` without (the size of the factor A)."""
        return self.d_in + int(self.has_bias)

    @property
    def num_params(self) -> int:
        return self.d_out * self.in_dim

    @property
    def params(self) -> list[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    def to_matrix(self, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``[W | b]`` of shape ``(d_out, in_dim)`` from a weight-shaped and a bias-shaped tensor
        (a convolution's weight ``(I, J, kh, kw)`` is viewed as ``weight.reshape(I, J·kh·kw)``)."""
        if self.is_conv:
            weight = weight.reshape(self.d_out, self.d_in)
        if not self.has_bias:
            return weight
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split ``[W | b]`` (``d_out × in_dim``) into ``(W, b)`` shaped like the module's weight and
        bias (``b`` is None without bias)."""
        w, b = (mat, None) if not self.has_bias else (mat[:, :-1], mat[:, -1])
        if self.is_conv:
            w = w.reshape(self.module.weight.shape)
        return w, b

    def inputs(self, x: Tensor, rows: int | None = None) -> Tensor:
        """ā of the first ``rows`` cases of the module's input ``x`` (all without ``rows``):
        ``(n, in_dim)``, or ``(n, T, in_dim)`` when the weights are shared over ``T`` locations
        (a convolution's patches, in ``F.unfold``'s order; a Linear's extra input dimensions)."""
        x = x.detach()
        if rows is not None:
            x = x[:rows]
        if self.is_conv:
            m = self.module
            if x.dim() != 4:
                raise KFACError(f"layer {self.name!r}: K-FAC needs batched (N, C, H, W) inputs for nn.Conv2d, "
                                f"got shape {tuple(x.shape)}: add a batch dimension")
            # the module's own padding (any mode, 'same' included), then patches without padding
            pad = m._reversed_padding_repeated_twice
            if any(pad):
                x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
            return patches(x, m.kernel_size, m.stride, m.dilation, ones=self.has_bias)
        if x.dim() <= 2:
            return homogeneous(x.reshape(-1, self.d_in), self.has_bias)
        return homogeneous(x.reshape(x.shape[0], -1, self.d_in), self.has_bias)

    def outputs(self, t: Tensor, lead: int = 1) -> Tensor:
        """An output-shaped tensor (``lead`` leading dims, the cases last of them, e.g. ``(k, n, …)``)
        as ``(…, n, d_out)`` or, with weight sharing, ``(…, n, T, d_out)`` (locations in ā's order)."""
        head = t.shape[:lead]
        if self.is_conv:  # (…, n, I, Ho, Wo) -> (…, n, T, I)
            return t.reshape(*head, self.d_out, -1).transpose(-1, -2)
        if t.dim() <= lead + 1:
            return t.reshape(*head[:-1], -1, self.d_out)
        return t.reshape(*head, -1, self.d_out)

    def param_label(self, r: int, p: int) -> str:
        """The entry ``(r, p)`` of ``[W | b]`` as text: ``"W[3,17]"`` (output unit, input unit),
        ``"b[3]"``, or for a convolution ``"W[o3, c1, kh2, kw0]"`` (output channel, input channel,
        kernel row, kernel column) and ``"b[o3]"`` (:func:`kfac_lab.curvature.geometry.weight_label`)."""
        from .geometry import geometry, weight_label

        return weight_label(geometry(self), r, p)

    def weight_matrix(self) -> Tensor:
        """Current ``[W | b]``, shape ``(d_out, in_dim)``."""
        return self.to_matrix(self.module.weight, self.module.bias)

    def grad_matrix(self) -> Tensor:
        """``[∂W | ∂b]`` from the parameters' ``.grad``, shape ``(d_out, in_dim)``."""
        w = self.module.weight.grad
        if w is None:
            raise KFACError(f"layer {self.name!r} has no gradient: call loss.backward() first")
        b = self.module.bias.grad if self.has_bias else None
        if self.has_bias and b is None:
            b = torch.zeros_like(self.module.bias)
        return self.to_matrix(w, b)

    def __repr__(self) -> str:
        bias = "+bias" if self.has_bias else "no bias"
        return f"KFACLayer({self.index}, {self.name!r}, {self.d_in}->{self.d_out}, {bias})"


def _excluded_names(model: nn.Module, exclude: Iterable[str | nn.Module]) -> set[str]:
    names = {id(m): n for n, m in model.named_modules()}
    out: set[str] = set()
    for item in exclude:
        if isinstance(item, nn.Module):
            if id(item) not in names:
                raise ValueError(f"exclude: module {type(item).__name__} is not part of the model")
            out.add(names[id(item)])
        elif isinstance(item, str):
            if item not in names.values():
                known = ", ".join(repr(n) for n in names.values() if n) or "(none)"
                raise ValueError(f"exclude: the model has no module named {item!r}; modules: {known}")
            out.add(item)
        else:
            raise TypeError(f"exclude takes module names or modules, not {type(item).__name__}")
    return out


def _is_excluded(name: str, excluded: set[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in excluded if e) or "" in excluded


def find_layers(
    model: nn.Module,
    exclude: Iterable[str | nn.Module] = (),
    example_input: Tensor | None = None,
    diagonal: bool = False,
) -> list[KFACLayer]:
    """The K-FAC layers of ``model`` in forward order.

    Every module owning trainable parameters must be a supported layer (``nn.Linear``, or
    ``nn.Conv2d`` with ``groups=1``: any kernel, stride, padding and padding mode, dilation) or be
    listed in ``exclude`` (by name or module; excluding a container excludes its children);
    otherwise one ``UnsupportedLayerError`` names all offenders. Without ``example_input``
    the order is the registration order; with it, one forward pass (no grad) records the
    true call order and rejects a layer used twice. ``diagonal=True``: the other modules with
    trainable parameters are not an error (the optimizers give them diagonal Fisher blocks,
    ``curvature.diagonal``).
    """
    excluded = _excluded_names(model, exclude)
    candidates: list[tuple[str, nn.Linear]] = []
    unsupported: list[str] = []
    grouped: list[str] = []
    for name, module in model.named_modules():
        if _is_excluded(name, excluded):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, nn.Conv2d) and module.groups > 1 and own:
            grouped.append(f"{name or '<root>'} (Conv2d, groups={module.groups})")
        elif isinstance(module, SUPPORTED_MODULES):
            if module.weight.requires_grad:
                candidates.append((name, module))
        elif own:
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    if grouped and not diagonal:
        raise UnsupportedLayerError(
            f"K-FAC cannot precondition grouped convolutions: {', '.join(grouped)}. With groups > 1 the "
            "weight is block-diagonal over channel groups, not one matrix applied to every patch, so KFC's "
            "factors Ω ⊗ Γ do not describe it. Pass exclude=[...] with their names to leave them to the plain "
            "gradient, use groups=1, or pass diagonal=True (the optimizers' default) to give them diagonal "
            "Fisher blocks"
        )
    if unsupported and not diagonal:
        raise UnsupportedLayerError(
            "K-FAC supports nn.Linear and nn.Conv2d layers only; these modules have trainable parameters it "
            f"cannot precondition: {', '.join(unsupported)}. Pass exclude=[...] with their names "
            "to skip them (their parameters are then left out of the preconditioner), or freeze them; "
            "the optimizers give them diagonal Fisher blocks with diagonal=True (their default)."
        )
    if not candidates:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no trainable nn.Linear or nn.Conv2d layer for K-FAC to precondition"
        )
    _refuse_shared(model, candidates)
    if example_input is not None:
        candidates = _trace_order(model, candidates, example_input)
    return [KFACLayer(i, n, m) for i, (n, m) in enumerate(candidates)]


def _refuse_shared(model: nn.Module, candidates: list[tuple[str, nn.Module]]) -> None:
    """Tied weights: a parameter of a K-FAC layer that another module also owns would be listed
    (and updated) twice, and its gradient mixes two layers' statistics: refuse, naming both."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name or "<root>")
    pnames = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        pnames.setdefault(id(p), n)
    for name, module in candidates:
        for p in module.parameters(recurse=False):
            mods = owners.get(id(p), [])
            if p.requires_grad and len(mods) > 1:
                listed = ", ".join(repr(m) for m in mods)
                raise UnsupportedLayerError(
                    f"the parameter {pnames.get(id(p), '?')!r} is shared by the modules {listed} (tied weights); "
                    "K-FAC gives each layer its own weights (a tied one would be listed and updated twice, with "
                    "wrong curvature): untie them (give each module its own nn.Parameter), or exclude all of them "
                    f"(exclude={mods!r}) so the shared parameter is left out of K-FAC"
                )


def _trace_order(model, candidates, example_input):
    order: list[int] = []
    handles = []
    for pos, (name, module) in enumerate(candidates):
        def hook(mod, inp, out, pos=pos, name=name):
            if pos in order:
                raise KFACError(
                    f"layer {name!r} is used twice in one forward pass; K-FAC needs each layer "
                    "once (a module called twice per pass is not supported; weights shared over locations — a "
                    "convolution, a Linear on (N, …, d) inputs — are): exclude it or untie the weights"
                )
            order.append(pos)
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    unused = [candidates[p][0] for p in range(len(candidates)) if p not in order]
    if unused:
        raise KFACError(
            f"layers {unused} are not used in the forward pass; exclude them (exclude=[...])"
        )
    return [candidates[p] for p in order]


def patches(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
            ones: bool = False) -> Tensor:
    """The patches a ``kernel`` sees in the (padded) images ``x`` ``(n, J, H, W)``: ``(n, T, J·kh·kw)``,
    locations row-major over the output grid and columns in ``weight.reshape(I, -1)``'s order —
    ``F.unfold(x, …).transpose(1, 2)``, as one strided copy (``im2col`` on CPU was 10–50× slower
    and erratic under load on 2 cores, measured for the mnist-cnn layers). ``ones``: ā with the
    homogeneous 1 as a last column, ``(n, T, J·kh·kw + 1)``, written in the same copy (no second
    copy by ``torch.cat``)."""
    x = x.contiguous()
    n, J, H, W = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    Ho, Wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
    if Ho < 1 or Wo < 1:
        raise KFACError(f"the kernel {kernel} with dilation {dilation} does not fit the {H}×{W} (padded) input")
    sN, sC, sH, sW = x.stride()
    view = x.as_strided((n, Ho, Wo, J, kh, kw), (sN, sh * sH, sw * sW, sC, dh * sH, dw * sW))
    if not ones:
        return view.reshape(n, Ho * Wo, J * kh * kw)
    out = x.new_empty(n, Ho * Wo, J * kh * kw + 1)
    out[..., :-1].view(n, Ho, Wo, J, kh, kw).copy_(view)
    out[..., -1] = 1
    return out


def homogeneous(x: Tensor, has_bias: bool) -> Tensor:
    """ā = [x, 1] of shape ``(…, d_in + 1)`` (or ``x`` itself without a bias), ``x`` shape ``(…, d_in)``."""
    if not has_bias:
        return x
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


class Capture:
    """Context manager recording, per layer, ā (forward) and g = ∂L/∂s (backward).

    Lists are indexed by position in ``layers`` (which may be any subset of a model's layers).
    After a forward pass inside the context, ``a[i]`` is ā for the ``i``-th layer, shape
    ``(m, in_dim)`` (``(m, T, in_dim)`` with weight sharing: :meth:`KFACLayer.inputs`); ``s[i]`` is
    the pre-activation output (kept in the graph, for batched backward passes). After a backward
    pass, ``g[i]`` has shape ``(m, d_out)`` (``(m, T, d_out)``) and equals
    ``grad_scale · ∂L/∂s_i`` — pass ``grad_scale = m`` after a batch-*mean* loss to undo
    autograd's ``1/m`` and obtain per-case ``g`` (docs/algorithm.md#notation).
    ``rows``: keep ā of the first ``rows`` cases only (the statistics subsets: a convolution's
    patches are unfolded for those cases only).
    """

    def __init__(
        self,
        layers: Sequence[KFACLayer],
        inputs: bool = True,
        grads: bool = True,
        outputs: bool = False,
        grad_scale: float = 1.0,
        rows: int | None = None,
    ):
        self.layers = list(layers)
        self.want_inputs, self.want_grads, self.want_outputs = inputs, grads, outputs
        self.grad_scale = grad_scale
        self.rows = rows
        n = len(self.layers)
        self.a: list[Tensor | None] = [None] * n
        self.s: list[Tensor | None] = [None] * n
        self.g: list[Tensor | None] = [None] * n
        self._handles: list = []

    def __enter__(self) -> "Capture":
        for pos, layer in enumerate(self.layers):
            self._handles.append(layer.module.register_forward_hook(self._make_hook(layer, pos)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer: KFACLayer, i: int):

        def forward_hook(module, inp, out):
            if self.a[i] is not None or self.s[i] is not None:
                raise KFACError(
                    f"layer {layer.name!r} ran twice in one captured forward pass; K-FAC needs each "
                    "layer once per pass (a module called twice per pass is not supported; weights shared over "
                    "locations — a convolution, a Linear on (N, …, d) inputs — are)"
                )
            x = inp[0]
            if self.want_inputs:
                self.a[i] = layer.inputs(x, self.rows)
            else:
                self.a[i] = x.new_empty(0)  # marks the layer as seen
            if self.want_outputs:
                self.s[i] = out
            if self.want_grads and out.requires_grad:
                out.register_hook(self._grad_hook(i, layer))

        return forward_hook

    def _grad_hook(self, i: int, layer: KFACLayer):
        def hook(grad):
            g = layer.outputs(grad.detach())
            self.g[i] = g * self.grad_scale if self.grad_scale != 1.0 else g

        return hook

    def reset(self) -> None:
        n = len(self.layers)
        self.a, self.s, self.g = [None] * n, [None] * n, [None] * n
