"""Networks of the K-FAC experiments, built only from ``nn.Linear`` and activation modules
inside an ``nn.Sequential`` (so K-FAC finds every layer in order).

* :func:`autoencoder` — the deep autoencoders of Hinton & Salakhutdinov (2006) used in
  section 13 of Martens & Grosse (2015): logistic hidden units, a LINEAR code layer, and an
  output layer that returns LOGITS (MNIST, CURVES: the Bernoulli loss applies the sigmoid)
  or linear outputs (FACES: Gaussian loss).
* :func:`mlp` / :func:`figure1_network` — plain MLPs; 256-20-20-20-20-10 tanh is the
  network of figures 1–2 (6,610 parameters, logits out: the softmax is in the loss).
* :func:`sparse_init_` — the sparse initialisation of Martens (2010).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "AUTOENCODER_ENCODERS",
    "AUTOENCODER_LOSS",
    "AUTOENCODER_SIZES",
    "FIGURE1_SIZES",
    "autoencoder",
    "count_parameters",
    "default_init_",
    "figure1_network",
    "layer_sizes",
    "linear_layers",
    "mlp",
    "sparse_init_",
]

#: Encoder sizes (input first, code last) of the three autoencoders.
AUTOENCODER_ENCODERS: dict[str, tuple[int, ...]] = {
    "mnist": (784, 1000, 500, 250, 30),
    "curves": (784, 400, 200, 100, 50, 25, 6),
    "faces": (625, 2000, 1000, 500, 30),
}
#: Full layer sizes: encoder followed by the mirrored decoder.
AUTOENCODER_SIZES: dict[str, tuple[int, ...]] = {
    k: v + v[-2::-1] for k, v in AUTOENCODER_ENCODERS.items()
}
#: Loss of each autoencoder's output: "bernoulli" = sigmoid cross-entropy on logits,
#: "gaussian" = squared error on linear outputs.
AUTOENCODER_LOSS: dict[str, str] = {"mnist": "bernoulli", "curves": "bernoulli",
                                    "faces": "gaussian"}

FIGURE1_SIZES: tuple[int, ...] = (256, 20, 20, 20, 20, 10)

#: Activation names -> module factories. None / "linear" / "identity" mean no module.
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "logistic": nn.Sigmoid,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}
_NO_ACTIVATION = (None, "linear", "identity", "none")


def _activation(act) -> nn.Module | None:
    if act in _NO_ACTIVATION:
        return None
    if isinstance(act, str):
        try:
            return ACTIVATIONS[act.lower()]()
        except KeyError:
            raise ValueError(
                f"unknown activation {act!r}; known: {sorted(ACTIVATIONS)} or "
                f"None/'linear'/'identity'"
            ) from None
    if isinstance(act, nn.Module):
        raise TypeError("pass an activation name or a module class/factory, not an instance "
                        "(it would be shared between layers)")
    if callable(act):
        mod = act()
        if not isinstance(mod, nn.Module):
            raise TypeError(f"activation factory returned {type(mod).__name__}, not a Module")
        return mod
    raise TypeError(f"activation must be a name, None or a module factory, got {act!r}")


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    """All ``nn.Linear`` modules of ``model`` in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def layer_sizes(model: nn.Module) -> list[int]:
    """``[in_0, out_0, out_1, ...]`` of the chain of Linear layers (checks it is a chain)."""
    lins = linear_layers(model)
    if not lins:
        return []
    sizes = [lins[0].in_features]
    for lin in lins:
        if lin.in_features != sizes[-1]:
            raise ValueError("the Linear layers do not form a chain")
        sizes.append(lin.out_features)
    return sizes


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def sparse_init_(model: nn.Module, nonzero: int = 15, seed: int = 0,
                 scale: float = 1.0) -> nn.Module:
    """Sparse initialisation (Martens 2010), in place; returns ``model``.

    Every unit (row) of every ``nn.Linear`` gets exactly ``min(nonzero, fan_in)`` nonzero
    incoming weights at uniformly random distinct positions, drawn from ``N(0, scale^2)``;
    all other weights and all biases are 0. Deterministic: a CPU ``torch.Generator``
    seeded with ``seed`` draws the layers in forward order (positions by ``topk`` of
    uniform noise per row; no loop over units).
    """
    if nonzero < 1:
        raise ValueError(f"nonzero must be >= 1, got {nonzero}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    for lin in linear_layers(model):
        w = lin.weight
        out_f, in_f = w.shape
        k = min(int(nonzero), in_f)
        pos = torch.rand(out_f, in_f, generator=g, dtype=torch.float64).topk(k, dim=1).indices
        val = torch.randn(out_f, k, generator=g, dtype=torch.float64) * scale
        val = torch.where(val == 0, torch.full_like(val, scale), val)  # measure-zero guard
        dense = torch.zeros(out_f, in_f, dtype=torch.float64).scatter_(1, pos, val)
        w.copy_(dense.to(dtype=w.dtype, device=w.device))
        if lin.bias is not None:
            lin.bias.zero_()
    return model


@torch.no_grad()
def default_init_(model: nn.Module, seed: int = 0) -> nn.Module:
    """PyTorch's default Linear initialisation, but from a seeded generator (in place):
    weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Returns ``model``."""
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    for lin in linear_layers(model):
        bound = 1.0 / math.sqrt(lin.in_features) if lin.in_features > 0 else 0.0
        w = (torch.rand(lin.weight.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
        lin.weight.copy_(w.to(lin.weight.dtype))
        if lin.bias is not None:
            b = (torch.rand(lin.bias.shape, generator=g, dtype=torch.float64) * 2 - 1) * bound
            lin.bias.copy_(b.to(lin.bias.dtype))
    return model


def _initialise(model: nn.Module, init: str, seed: int, nonzero: int, device) -> nn.Module:
    """Materialise a model built on the meta device (so that building it neither costs a
    default initialisation nor touches the global RNG) and initialise it from ``seed``."""
    if init not in ("sparse", "default"):
        raise ValueError(f"init must be 'sparse' or 'default', got {init!r}")
    model = model.to_empty(device=device if device is not None else "cpu")
    if init == "sparse":
        sparse_init_(model, nonzero=nonzero, seed=seed)
    else:
        default_init_(model, seed=seed)
    return model


def mlp(
    sizes: Sequence[int],
    activation="tanh",
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    output_activation=None,
    init: str = "default",
    nonzero: int = 15,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """A multilayer perceptron ``Linear, act, Linear, act, ..., Linear[, output_act]``.

    Args:
        sizes: layer widths, input first, e.g. ``[256, 20, 20, 20, 20, 10]``.
        activation: hidden nonlinearity — a name from :data:`ACTIVATIONS` ("tanh",
            "logistic"/"sigmoid", "relu", ...), None/"linear", or a module factory.
        bias: whether the Linear layers have biases.
        dtype, device: of the parameters.
        seed: initialisation seed (deterministic; the global RNG is not touched).
        output_activation: appended after the last Linear (default None: logits out).
        init: "default" (U(±1/sqrt(fan_in)), seeded) or "sparse" (:func:`sparse_init_`).
        nonzero: nonzero incoming weights per unit for ``init="sparse"``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"sizes needs >= 2 positive widths, got {sizes}")
    layers: list[nn.Module] = []
    n_lin = len(sizes) - 1
    for i in range(n_lin):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias, dtype=dtype, device="meta"))
        act = _activation(activation if i < n_lin - 1 else output_activation)
        if act is not None:
            layers.append(act)
    model = _initialise(nn.Sequential(*layers), init, seed, nonzero, device)
    model.layer_sizes = tuple(sizes)
    return model


def figure1_network(seed: int = 0, dtype: torch.dtype = torch.float32,
                    init: str = "default") -> nn.Sequential:
    """The 256-20-20-20-20-10 tanh network of figures 1–2 (16x16 MNIST in, 10 logits out;
    6,610 parameters). Its loss is the categorical (softmax) one: ``kfac_loss`` =
    "categorical"."""
    model = mlp(FIGURE1_SIZES, "tanh", dtype=dtype, seed=seed, init=init)
    model.kfac_loss = "categorical"
    return model


def autoencoder(
    name: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    init: str = "sparse",
    nonzero: int = 15,
    device: torch.device | str | None = None,
) -> nn.Sequential:
    """A deep autoencoder of section 13 (Hinton & Salakhutdinov 2006).

    ``name`` is "mnist" (784-1000-500-250-30, mirrored), "curves"
    (784-400-200-100-50-25-6, mirrored) or "faces" (625-2000-1000-500-30, mirrored). Hidden
    units are logistic (``nn.Sigmoid``); the code layer (the encoder's last Linear) is
    linear; the output layer has no nonlinearity — logits for the Bernoulli loss
    (mnist, curves), linear means for the Gaussian loss (faces).

    Attributes set on the returned ``nn.Sequential``: ``kfac_loss`` ("bernoulli" or
    "gaussian", as :data:`AUTOENCODER_LOSS`), ``kfac_name`` (the name), ``layer_sizes``
    (as :data:`AUTOENCODER_SIZES`) and ``code_layer`` (index of the code Linear among the
    Linear layers). Initialisation: ``init="sparse"`` (the paper's: 15 nonzero N(0,1)
    incoming weights per unit, biases 0) or ``"default"``.
    """
    key = name.lower()
    if key not in AUTOENCODER_SIZES:
        raise ValueError(
            f"unknown autoencoder {name!r}; expected one of {sorted(AUTOENCODER_SIZES)}"
        )
    sizes = AUTOENCODER_SIZES[key]
    code = len(AUTOENCODER_ENCODERS[key]) - 2   # index of the Linear producing the code
    layers: list[nn.Module] = []
    n_lin = len(sizes) - 1
    for i in range(n_lin):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], dtype=dtype, device="meta"))
        if i != code and i != n_lin - 1:
            layers.append(nn.Sigmoid())
    model = _initialise(nn.Sequential(*layers), init, seed, nonzero, device)
    model.kfac_loss = AUTOENCODER_LOSS[key]
    model.kfac_name = key
    model.layer_sizes = tuple(sizes)
    model.code_layer = code
    return model
