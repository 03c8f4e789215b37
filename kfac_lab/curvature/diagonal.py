"""Diagonal Fisher blocks for the parameters no Kronecker block owns
(docs/algorithm.md#parameters-outside-the-kronecker-layers).

Norm layers' scales and shifts (``BatchNorm1d/2d/3d``, ``LayerNorm``, ``GroupNorm``, …),
embeddings, free ``nn.Parameter``s on any module, and modules the Kronecker layers refuse get a
diagonal block, as kfac-jax gives them (not in M&G 2015, whose networks hold only the ``W_i``):

    D = E[(∂ℓ_n/∂θ)²]      (elementwise; per-case gradients, sampled targets, M&G 2015 §5)

blended into a running estimate with the factors' ``ε_k = min(1 − 1/k, ε)`` and inverted as
``(D + γ²)⁻¹`` (the exact Tikhonov damping of the block: the ``γ²I`` term of the factored
Kronecker damping, M&G 2015 §6.3, which is all a diagonal block can take; kfac-jax adds its
damping λ = γ² to diagonal blocks the same way).

Per-case gradients come from the same statistics pass as the Kronecker factors: a forward hook
(:class:`DiagonalTap`) records each owning module's inputs and keeps its output in the graph;
the one backward pass of the sampled targets gives the per-case output gradients ``g_n`` (the
loss's 1/m undone). The per-case gradient is that of the batch's summed loss with respect to
case ``n``'s own copy of θ (all copies equal) — the same definition as the Kronecker layers'
``DW_n = g_n ā_nᵀ``: ``∂ℓ_n/∂θ`` when the cases are independent; below a batch-norm in training
mode, whose batch statistics couple the cases, ``g_n`` (and so the per-case gradient) also holds
the other cases' losses through those statistics, for the diagonal blocks and the factors alike.
Then per module

- **batch norm**: ``∂ℓ_n/∂γ = Σ_pos g_n ⊙ x̂_n``, ``∂ℓ_n/∂β = Σ_pos g_n`` — exact per case even in
  training mode, where ``x̂`` uses the batch statistics (they do not depend on γ, β); ``x̂`` is
  normalised with the batch statistics of the rows the pass saw (training mode) or the running
  ones (evaluation mode), as the forward pass was;
- **embedding**: the per-case gradient of row ``r`` is ``Σ_{t: idx_{n,t} = r} g_{n,t}``, summed per
  (case, row) pair without forming an ``(n, V, d)`` tensor;
- **any other module**: ``torch.func.grad`` of ``⟨module(x_n), g_n⟩`` with respect to the module's
  own parameters, ``vmap``-ed over the cases (the module called on one case at a time, its
  inputs' leading dimension the case), which is the per-case gradient whenever the module
  treats cases independently (a module holding a batch-norm in training mode does not: refused
  with a clear error).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..errors import DecompositionError, KFACError, UnsupportedLayerError
from .layers import KFACLayer, _excluded_names, _is_excluded
from .running_stats import training_batch_norms

__all__ = ["DiagonalGroup", "DiagonalTap", "DiagonalBlocks", "WithDiagonal", "diagonal_groups"]


@dataclass(frozen=True, eq=False)
class DiagonalGroup:
    """The trainable parameters a module owns directly (``recurse=False``) that no Kronecker layer
    owns: ``local`` their attribute names on ``module``, ``names`` their names in the model."""

    name: str
    module: nn.Module
    local: tuple[str, ...]
    names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.modules.batchnorm._BatchNorm):
            return "batchnorm"
        if type(self.module) is nn.Embedding:
            return "embedding"
        return "generic"


def diagonal_groups(model: nn.Module, layers: Sequence[KFACLayer], exclude: Iterable = ()) -> list[DiagonalGroup]:
    """Every module of ``model`` owning trainable parameters outside ``layers`` and ``exclude``, in
    ``named_modules`` order. Refused (``UnsupportedLayerError`` naming the module and the fix): a
    parameter two modules own (tied), an ``Embedding`` with ``sparse=True`` or ``scale_grad_by_freq=True``."""
    excluded = _excluded_names(model, exclude)
    kron = {id(p) for l in layers for p in l.params}
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name or "<root>")
    groups = []
    for name, module in model.named_modules():
        if _is_excluded(name, excluded):
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and id(p) not in kron]
        if not own:
            continue
        label = name or "<root>"
        for n, p in own:
            if len(owners[id(p)]) > 1:
                raise UnsupportedLayerError(
                    f"the parameter {n!r} is shared by the modules {owners[id(p)]} (tied weights); its diagonal "
                    "Fisher block needs one owner: untie them, or exclude all of them (exclude=[...])")
        if isinstance(module, nn.Embedding) and (module.sparse or module.scale_grad_by_freq):
            what = "sparse=True (K-FAC's update is dense)" if module.sparse else \
                "scale_grad_by_freq=True (its gradient scales by the batch's word counts, so cases are coupled)"
            raise UnsupportedLayerError(f"the embedding {label!r} has {what}: construct it without, or "
                                        f"exclude it (exclude=[{name!r}]) to leave it to the plain gradient")
        prefix = f"{name}." if name else ""
        groups.append(DiagonalGroup(label, module, tuple(n for n, _ in own), tuple(prefix + n for n, _ in own),
                                    tuple(p for _, p in own)))
    return groups


class DiagonalTap:
    """Context manager: while inside, each call of a group's module records its inputs (detached)
    and keeps its output (in the graph); ``outputs`` lists the outputs for the backward pass, and
    after it the caller sets ``grads`` (one ``(k, n, …)`` tensor per output)."""

    def __init__(self, groups: Sequence[DiagonalGroup]):
        self.groups = list(groups)
        self.calls: list[list[tuple]] = [[] for _ in self.groups]
        self.outputs: list[Tensor] = []
        self.grads: list[Tensor] | None = None
        self._handles: list = []

    def __enter__(self) -> "DiagonalTap":
        for pos, group in enumerate(self.groups):
            self._handles.append(group.module.register_forward_hook(self._hook(pos, group), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, pos: int, group: DiagonalGroup):
        def hook(module, args, kwargs, out):
            if not isinstance(out, Tensor):
                raise KFACError(
                    f"the module {group.name!r} ({type(module).__name__}) returns {type(out).__name__}, not a tensor: "
                    "its diagonal Fisher block needs a module with one tensor output; exclude it "
                    f"(exclude=[{group.name!r}]) or wrap its parameters in a module that returns a tensor")
            if not out.requires_grad:
                return
            detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
            self.calls[pos].append((tuple(detach(a) for a in args), {k: detach(v) for k, v in kwargs.items()},
                                    len(self.outputs)))
            self.outputs.append(out)
        return hook

    def batch_squares(self, n: int) -> list[Tensor]:
        """``(1/n) Σ_n Σ_k (∂ℓ_{n,k}/∂θ)²`` per parameter (groups' order): the mini-batch diagonal
        blocks, ``k`` the directions of each case (one sampled target; the output-Fisher directions
        in exact mode). A parameter whose module did not run gets zeros."""
        out = []
        for group, calls in zip(self.groups, self.calls):
            if not calls:
                out += [torch.zeros_like(p) for p in group.params]
                continue
            given = [(a, kw, self.grads[i]) for a, kw, i in calls]
            if group.kind == "embedding":
                out.append(_embedding_squares(group.module, given, n))
            else:
                out += [t.pow(2).sum(dim=(0, 1)).div(n) for t in _per_case(group, given, n)]
        return out


def _per_case(group: DiagonalGroup, calls, n: int) -> list[Tensor]:
    """Per-case gradients ``(k, n, *shape)`` per parameter, summed over the module's calls."""
    total = None
    for args, kwargs, g in calls:
        part = _batchnorm(group, args[0], g) if group.kind == "batchnorm" else _generic(group, args, kwargs, g, n)
        total = part if total is None else [t + q for t, q in zip(total, part)]
    return total


def _batchnorm(group: DiagonalGroup, x: Tensor, g: Tensor) -> list[Tensor]:
    """∂ℓ_n/∂γ = Σ_pos g_n ⊙ x̂_n, ∂ℓ_n/∂β = Σ_pos g_n, with x̂ as the forward pass normalised."""
    m = group.module
    dims = [0] + list(range(2, x.dim()))
    if m.training or m.running_mean is None:
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = m.running_mean, m.running_var
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xhat = (x - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + m.eps)
    spatial = tuple(range(3, g.dim()))
    per = {"weight": (g * xhat).sum(spatial) if spatial else g * xhat, "bias": g.sum(spatial) if spatial else g}
    return [per[name] for name in group.local]


def _embedding_squares(module: nn.Embedding, calls, n: int) -> Tensor:
    """``(1/n) Σ_n Σ_k (Σ_{t: idx_{n,t}=r} g_{k,n,t})²`` per row ``r``: the per-(case, row) sums are
    formed over the pairs that occur (``torch.unique``), never an ``(n, V, d)`` tensor."""
    V, d = module.weight.shape
    idx = torch.cat([args[0].reshape(n, -1) for args, _, _ in calls], dim=1)
    g = torch.cat([gk.reshape(gk.shape[0], n, -1, d) for _, _, gk in calls], dim=2)
    k = g.shape[0]
    key = (torch.arange(n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
    pairs, inverse = torch.unique(key, return_inverse=True)
    sums = g.new_zeros(k, pairs.numel(), d).index_add_(1, inverse, g.reshape(k, -1, d))
    rows = pairs % V
    sq = sums.pow(2).sum(0)
    if module.padding_idx is not None:
        sq[rows == module.padding_idx] = 0  # the padding row gets no gradient
    return g.new_zeros(V, d).index_add_(0, rows, sq) / n


def _generic(group: DiagonalGroup, args: tuple, kwargs: dict, g: Tensor, n: int) -> list[Tensor]:
    """``torch.func.grad`` of ``⟨module(x_n), g_n⟩`` per case (vmap over cases and directions)."""
    m = group.module
    coupled = [name for name, _ in training_batch_norms(m)] + \
        [name for name, b in m.named_modules() if isinstance(b, nn.modules.batchnorm._BatchNorm) and b.training
         and not b.track_running_stats]
    if coupled:
        fix = "exclude it (exclude=[...]) to leave them to the plain gradient" if group.name != "<root>" else \
            "exclude=[...] cannot single out the root's own parameters"
        raise KFACError(
            f"the module {group.name!r} holds parameters of its own ({', '.join(group.names)}) and the batch-norm "
            f"{coupled[0]!r} in training mode, which couples the cases: their per-case gradients (the module run on "
            "one case at a time) are not defined. Move the parameters into a small module of their own (whose "
            f"forward uses them), put the batch-norm in eval mode, or {fix}")
    batched = lambda v: isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n  # noqa: E731
    a_dims = tuple(0 if batched(a) else None for a in args)
    k_names = sorted(kwargs)
    k_vals = tuple(kwargs[k] for k in k_names)
    k_dims = tuple(0 if batched(v) else None for v in k_vals)
    params = {name: p.detach() for name, p in zip(group.local, group.params)}

    def one(p, a, kv, gn):
        a = tuple(t.unsqueeze(0) if d == 0 else t for t, d in zip(a, a_dims))
        kv = {k: (t.unsqueeze(0) if d == 0 else t) for k, t, d in zip(k_names, kv, k_dims)}
        return (functional_call(m, p, a, kv) * gn.unsqueeze(0)).sum()

    cases = vmap(grad(one), in_dims=(None, a_dims, k_dims, 0), randomness="different")
    dirs = vmap(cases, in_dims=(None, None, None, 0), randomness="different")
    with torch.enable_grad():
        out = dirs(params, args, k_vals, g)
    return [out[name] for name in group.local]


class DiagonalBlocks:
    """The diagonal Fisher blocks of ``groups``: the running ``D`` (one tensor per parameter, its
    shape; None before the first update), the snapshot ``inputs`` the inverse in use was built
    from, and the parameters' ``names``."""

    def __init__(self, groups: Sequence[DiagonalGroup]):
        self.groups = list(groups)
        self.params = [p for g in self.groups for p in g.params]
        self.names = [n for g in self.groups for n in g.names]
        self.D: list[Tensor] | None = None
        self.inputs: list[Tensor] | None = None

    @classmethod
    def build(cls, model: nn.Module, layers: Sequence[KFACLayer], exclude=()) -> "DiagonalBlocks | None":
        groups = diagonal_groups(model, layers, exclude)
        return cls(groups) if groups else None

    def tap(self) -> DiagonalTap:
        return DiagonalTap(self.groups)

    def update(self, batch: Sequence[Tensor], eps: float) -> None:
        """``D ← ε D + (1 − ε) D_batch`` (the factors' ε_k; the first update takes the batch as it is)."""
        if self.D is None or eps == 0.0:
            self.D = [b.clone() for b in batch]
        else:
            for d, b in zip(self.D, batch):
                d.mul_(eps).add_(b, alpha=1.0 - eps)

    def snapshot(self) -> list[Tensor]:
        """Copy ``D`` into ``inputs`` (the blocks the next inverse is built from)."""
        if self.D is None:
            raise KFACError("the diagonal Fisher blocks have no statistics yet: update them before building an inverse")
        self.inputs = [d.detach().clone() for d in self.D]
        return self.inputs

    def state_dict(self) -> dict:
        return {"names": list(self.names), "D": None if self.D is None else list(self.D),
                "inputs": None if self.inputs is None else list(self.inputs)}

    def check_state(self, c, state, dtype, device, kron_inputs: bool) -> dict:
        """``{"D", "inputs"}`` of a saved ``state_dict()`` converted to ``dtype`` on ``device``, or a
        ``StateError`` from the checker ``c`` naming the first thing that does not fit."""
        if state is None:
            c.fail(f"the state holds no diagonal Fisher blocks; this optimizer has them for {self.names}",
                   "it was saved with diagonal=False or other exclude=: construct the optimizer the same way")
        c.mapping(state, ("names", "D", "inputs"), "the diagonal blocks")
        if list(state["names"]) != self.names:
            c.fail(f"the saved diagonal blocks are for the parameters {list(state['names'])}; this optimizer's are "
                   f"{self.names}", c.hint)
        shapes = [tuple(p.shape) for p in self.params]
        conv = lambda ts, what: None if ts is None else [  # noqa: E731
            t.detach().to(device=device, dtype=dtype, copy=True) for t in c.tensors(ts, what, shapes)]
        inputs = conv(state["inputs"], "the diagonal blocks of the inverse")
        if kron_inputs and inputs is None:
            c.fail("the saved inverse has Kronecker inputs but no diagonal blocks", "the state is damaged")
        return {"D": conv(state["D"], "the diagonal blocks D"), "inputs": inputs}

    def with_state(self, values: dict) -> "DiagonalBlocks":
        """A new object holding checked values (the old one is left as it was)."""
        new = DiagonalBlocks(self.groups)
        new.D, new.inputs = values["D"], values["inputs"]
        return new

    def __repr__(self) -> str:
        return f"DiagonalBlocks({len(self.groups)} modules, {sum(p.numel() for p in self.params)} parameters)"


class WithDiagonal:
    """A Kronecker inverse (block-diagonal or block-tridiagonal) extended by the diagonal blocks:
    ``apply`` takes the ``L`` layers' ``[W | b]`` blocks followed by the diagonal parameters'
    tensors and returns ``F̃⁻¹`` of each (``U = V / (D + γ²)`` for the diagonal ones); given only the
    ``L`` layers' blocks it is the Kronecker inverse. Anything else is the Kronecker inverse's."""

    def __init__(self, kron, D: Sequence[Tensor], gamma: float, n_layers: int, names: Sequence[str]):
        self.kron, self.D, self.n_layers, self.names_diagonal = kron, list(D), n_layers, list(names)
        g2 = float(gamma) ** 2
        dtype = getattr(kron, "dtype", D[0].dtype)
        if g2 == 0.0:
            singular = [n for n, d in zip(names, D) if bool((d <= 0).any())]
            if singular:
                raise DecompositionError(
                    f"the diagonal Fisher block of {singular[0]} is singular at γ = 0: use gamma > 0")
        self.inv = [1.0 / (d.to(dtype) + g2) for d in self.D]

    def apply(self, V: Sequence[Tensor]) -> list[Tensor]:
        L = self.n_layers
        if len(V) not in (L, L + len(self.inv)):
            raise ValueError(f"apply takes the {L} layers' blocks, then the {len(self.inv)} diagonal parameters' "
                             f"tensors; got {len(V)} tensors")
        out = list(self.kron.apply(V[:L]))
        return out + [(v.to(i.dtype) * i).to(v.dtype) for v, i in zip(V[L:], self.inv)]

    def with_gamma(self, gamma) -> "WithDiagonal":
        return WithDiagonal(self.kron.with_gamma(gamma), self.D, float(gamma), self.n_layers, self.names_diagonal)

    def __getattr__(self, name):
        if name == "kron":
            raise AttributeError(name)
        return getattr(self.kron, name)

    def __repr__(self) -> str:
        return f"WithDiagonal({self.kron!r}, {len(self.inv)} diagonal blocks)"
