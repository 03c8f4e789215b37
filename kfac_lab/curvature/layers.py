"""Which modules are K-FAC layers, and hooks that capture ā (input with its homogeneous 1) and g.

Notation (M&G 2015 §2.1; docs/conventions.md): layer i computes ``s_i = W_i ā_{i-1}``; ``ā`` is the input with a
1 appended when the layer has a bias, so the bias is the *last column* of ``[W_i | b_i]``
(shape ``d_out × (d_in + 1)``), and ``g_i = ∂L/∂s_i``. In code, layers are numbered from 0 and
``a[i]`` is the input of layer ``i`` (the paper's ``ā_{i-1}`` for its 1-based layer ``i``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..errors import KFACError, UnsupportedLayerError

SUPPORTED_MODULES = (nn.Linear,)


@dataclass(frozen=True, eq=False)
class KFACLayer:
    """One K-FAC layer: a ``nn.Linear`` at position ``index`` in forward order."""

    index: int
    name: str
    module: nn.Linear

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def d_in(self) -> int:
        """Input width without the homogeneous coordinate."""
        return self.module.in_features

    @property
    def d_out(self) -> int:
        return self.module.out_features

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
        """``[W | b]`` of shape ``(d_out, in_dim)`` from a weight-shaped and a bias-shaped tensor."""
        if not self.has_bias:
            return weight
        return torch.cat([weight, bias.unsqueeze(1)], dim=1)

    def from_matrix(self, mat: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split ``[W | b]`` (``d_out × in_dim``) into ``(W, b)`` (``b`` is None without bias)."""
        if not self.has_bias:
            return mat, None
        return mat[:, :-1], mat[:, -1]

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

    Every module owning trainable parameters must be a supported layer (``nn.Linear``) or be
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
    for name, module in model.named_modules():
        if _is_excluded(name, excluded):
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, SUPPORTED_MODULES):
            if module.weight.requires_grad:
                candidates.append((name, module))
        elif own:
            unsupported.append(f"{name or '<root>'} ({type(module).__name__})")
    if unsupported and not diagonal:
        raise UnsupportedLayerError(
            "K-FAC supports nn.Linear layers only; these modules have trainable parameters it "
            f"cannot precondition: {', '.join(unsupported)}. Pass exclude=[...] with their names "
            "to skip them (their parameters are then left out of the preconditioner), or freeze them; "
            "the optimizers give them diagonal Fisher blocks with diagonal=True (their default)."
        )
    if not candidates:
        raise UnsupportedLayerError(
            f"{type(model).__name__} has no trainable nn.Linear layer for K-FAC to precondition"
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
                    "once (weight sharing is not supported): exclude it or untie the weights"
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


def homogeneous(x: Tensor, has_bias: bool) -> Tensor:
    """ā = [x, 1] of shape ``(m, d_in + 1)`` (or ``x`` itself without a bias), ``x`` shape ``(m, d_in)``."""
    if not has_bias:
        return x
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class Capture:
    """Context manager recording, per layer, ā (forward) and g = ∂L/∂s (backward).

    Lists are indexed by position in ``layers`` (which may be any subset of a model's layers).
    After a forward pass inside the context, ``a[i]`` is ā for the ``i``-th layer, shape
    ``(m, in_dim)``; ``s[i]`` is the pre-activation output (kept in the graph, for batched
    backward passes). After a backward pass, ``g[i]`` has shape ``(m, d_out)`` and equals
    ``grad_scale · ∂L/∂s_i`` — pass ``grad_scale = m`` after a batch-*mean* loss to undo
    autograd's ``1/m`` and obtain per-case ``g`` (docs/algorithm.md#notation).
    Inputs with extra leading dimensions are flattened into cases. ``rows``: keep ā of the
    first ``rows`` cases only (the statistics subsets), saving the copies of the rest.
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
                    "layer once per pass (weight sharing is not supported)"
                )
            x = inp[0]
            if self.want_inputs:
                flat = x.detach().reshape(-1, layer.d_in)
                self.a[i] = homogeneous(flat if self.rows is None else flat[: self.rows], layer.has_bias)
            else:
                self.a[i] = x.new_empty(0)  # marks the layer as seen
            if self.want_outputs:
                self.s[i] = out
            if self.want_grads and out.requires_grad:
                out.register_hook(self._grad_hook(i, layer.d_out))

        return forward_hook

    def _grad_hook(self, i: int, d_out: int):
        def hook(grad):
            g = grad.detach().reshape(-1, d_out)
            self.g[i] = g * self.grad_scale if self.grad_scale != 1.0 else g

        return hook

    def reset(self) -> None:
        n = len(self.layers)
        self.a, self.s, self.g = [None] * n, [None] * n, [None] * n
