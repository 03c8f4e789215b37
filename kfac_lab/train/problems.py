"""Training problems: a model factory, a loss, the training data and the paper's metric.

    >>> from kfac_lab.train import get_problem
    >>> p = get_problem("tiny")                       # doctest: +SKIP
    >>> p.describe()
    'tiny: 64-16-4-16-64 autoencoder (logistic, linear code, Bernoulli) on 5000 8x8 MNIST digits'
    >>> model = p.make_model(seed=0); p.error(model)  # training reconstruction error

Names (:data:`PROBLEMS`):

* ``"mnist"`` — the paper's MNIST autoencoder 784-1000-500-250-30 (mirrored decoder, logistic
  units, linear code, Bernoulli output, sparse init) on the 5,000 bundled real digits
  (``n`` smaller takes a stratified subset; ``source="idx", data_dir=...`` reads the full files).
* ``"curves"`` — the CURVES autoencoder 784-400-200-100-50-25-6 on generated curves
  (default ``n=2000``; the paper's set is ``n=20000``).
* ``"faces"`` — the FACES autoencoder 625-2000-1000-500-30 (Gaussian output) on a user file:
  ``get_problem("faces", path=...)`` or ``$KFAC_LAB_FACES`` (see :func:`kfac_lab.data.load_faces`).
* ``"figure1"`` — the 256-20-20-20-20-10 tanh classifier (softmax) of figures 1–2 on 16×16
  down-scaled MNIST; its metric is the error rate (and the NLL).
* ``"mnist-small"`` — a 784-200-30-200-784 autoencoder (logistic units, linear code,
  Bernoulli, sparse init) on the bundled digits: the MNIST experiment at lecture speed.
* ``"tiny"`` — a 64-16-4-16-64 autoencoder on 8×8 down-scaled digits: a step takes
  milliseconds (tests, smoke runs).
* ``"mnist-cnn"`` — a CNN classifier (conv 1→8 5×5/2 + ReLU, conv 8→16 3×3/2 + ReLU, Linear
  400→10; :func:`kfac_lab.models.mnist_cnn`) on the bundled 28×28 digits: K-FAC with
  convolution layers (KFC), seconds per step at batch 1,000 on a laptop CPU.
* ``"fig1-cnn"`` — a small CNN (2,746 parameters; :func:`kfac_lab.models.figure1_cnn`) on 16×16
  down-scaled digits, whose exact Fisher fits in memory (the Fisher studies of a CNN).

The metric (``Problem.error``) is the paper's: **training** reconstruction error — squared
error summed over pixels (after the sigmoid for Bernoulli outputs), mean over cases — for the
autoencoders, and the error rate for the classifier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor, nn

from ..curvature import get_loss

__all__ = ["Problem", "PROBLEMS", "OPTIMIZERS", "get_problem", "canonical_optimizer", "problem_names",
           "reconstruction_error", "classification_error", "FACES_ENV_VAR"]

#: Optimizer names the sessions accept (aliases map onto them, see :func:`canonical_optimizer`).
OPTIMIZERS = ("kfac", "sgd", "adam")
_OPT_ALIASES = {"k-fac": "kfac", "sgd-nesterov": "sgd", "sgd_nesterov": "sgd", "nesterov": "sgd",
                "sgdnesterov": "sgd"}
FACES_ENV_VAR = "KFAC_LAB_FACES"
_EVAL_CHUNK = 2500


def canonical_optimizer(name: str) -> str:
    """``"kfac"``, ``"sgd"`` or ``"adam"`` from a name or alias (``"sgd-nesterov"`` …); ValueError otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"optimizer must be a name, one of {list(OPTIMIZERS)}; got {name!r}")
    key = _OPT_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)} "
                         f"(aliases: {sorted(_OPT_ALIASES)})")
    return key


# ------------------------------------------------------------------------------ metrics
@torch.no_grad()
def reconstruction_error(model: nn.Module, X: Tensor, Y: Tensor, loss: str = "bernoulli") -> tuple[float, float]:
    """``(error, nll)``: the paper's training reconstruction error — ``Σ_pixels (ŷ − y)²``
    averaged over cases, with ``ŷ = sigmoid(z)`` for a Bernoulli output and ``ŷ = z`` for a
    Gaussian one — and the mean NLL (the loss), in chunks of cases."""
    lf = get_loss(loss)
    sq, nll, n = 0.0, 0.0, X.shape[0]
    for s in range(0, n, _EVAL_CHUNK):
        x, y = X[s:s + _EVAL_CHUNK], Y[s:s + _EVAL_CHUNK]
        z = model(x)
        out = torch.sigmoid(z) if lf.name == "bernoulli" else z
        both = torch.stack([(out - y.to(out.dtype)).pow(2).sum(), lf.nll_per_case(z, y).sum()])
        a, b = both.double().tolist()
        sq, nll = sq + a, nll + b
    return sq / n, nll / n


@torch.no_grad()
def classification_error(model: nn.Module, X: Tensor, Y: Tensor, loss: str = "categorical") -> tuple[float, float]:
    """``(error rate, mean NLL)`` of a classifier with logits out, in chunks of cases."""
    lf = get_loss(loss)
    wrong, nll, n = 0.0, 0.0, X.shape[0]
    for s in range(0, n, _EVAL_CHUNK):
        x, y = X[s:s + _EVAL_CHUNK], Y[s:s + _EVAL_CHUNK]
        z = model(x)
        both = torch.stack([(z.argmax(1) != y).sum().to(z.dtype), lf.nll_per_case(z, y).sum()])
        a, b = both.double().tolist()
        wrong, nll = wrong + a, nll + b
    return wrong / n, nll / n


# ------------------------------------------------------------------------------ the problem
@dataclass
class Problem:
    """One training problem.

    Attributes:
        name: registry name (``"mnist"``, ``"tiny"`` …) or a user's name.
        make_model: ``seed -> nn.Module`` (a fresh, deterministically initialised model, CPU float32).
        loss: ``"bernoulli"``, ``"gaussian"`` or ``"categorical"``.
        X: ``(n, d)`` training inputs.
        Y: training targets: ``X`` itself for the autoencoders, ``(n,)`` int64 labels for a classifier.
        kind: ``"autoencoder"`` or ``"classifier"``.
        batch_sizes: default mini-batch size per optimizer (``"kfac"``, ``"sgd"``, ``"adam"``);
            for K-FAC also ``m₁`` of the paper's growing schedule.
        options: default hyper-parameters per optimizer (passed to ``KFAC``/``SGDNesterov``/``Adam``).
        description: what it is, in words.
        params: how it was built (``n``, ``seed``, extra keywords) — enough for
            :func:`get_problem` to build it again (recorded in run attrs).
    """

    name: str
    make_model: Callable[[int], nn.Module]
    loss: str
    X: Tensor
    Y: Tensor
    kind: str = "autoencoder"
    batch_sizes: dict = field(default_factory=lambda: {"kfac": 1000, "sgd": 500, "adam": 500})
    options: dict = field(default_factory=lambda: {"kfac": {}, "sgd": {"lr": 0.01, "mu_max": 0.99},
                                                   "adam": {"lr": 1e-3}})
    description: str = ""
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("autoencoder", "classifier"):
            raise ValueError(f"Problem.kind must be 'autoencoder' or 'classifier', got {self.kind!r}")
        if self.X.shape[0] != self.Y.shape[0] or self.X.shape[0] == 0:
            raise ValueError(f"Problem {self.name!r}: X has {self.X.shape[0]} cases and Y {self.Y.shape[0]}; "
                             "both need the same number, >= 1")

    @property
    def n(self) -> int:
        """Number of training cases."""
        return int(self.X.shape[0])

    # -- metric -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, X: Tensor | None = None, Y: Tensor | None = None) -> dict[str, float]:
        """``{"error": …, "nll": …}`` on ``(X, Y)`` (default: the whole training set). ``error``
        is the paper's metric (see :meth:`error`); ``nll`` the mean loss without the ℓ2 term."""
        X = self.X if X is None else X
        Y = self.Y if Y is None else Y
        fn = classification_error if self.kind == "classifier" else reconstruction_error
        was_training = model.training
        model.eval()
        try:
            err, nll = fn(model, X, Y, self.loss)
        finally:
            model.train(was_training)
        return {"error": err, "nll": nll}

    def error(self, model: nn.Module, X: Tensor | None = None, Y: Tensor | None = None) -> float:
        """The paper's metric on ``(X, Y)`` (default: the training set): the training
        reconstruction error (squared error summed over pixels, after the sigmoid for Bernoulli
        outputs, mean over cases) for autoencoders; the error rate for a classifier."""
        return self.evaluate(model, X, Y)["error"]

    # -- defaults -----------------------------------------------------------------------
    def default_batch_size(self, optimizer: str) -> int:
        return min(int(self.batch_sizes[canonical_optimizer(optimizer)]), self.n)

    def default_options(self, optimizer: str) -> dict:
        return dict(self.options.get(canonical_optimizer(optimizer), {}))

    def describe(self) -> str:
        """A one-line description."""
        return f"{self.name}: {self.description}" if self.description else self.name

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Problem":
        """The same problem with ``X`` (and floating ``Y``) on ``device`` in ``dtype`` (a copy only
        when something changes; the model factory is unchanged — move models yourself)."""
        X = self.X.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else self.X
        if self.Y is self.X:
            Y = X
        elif self.Y.is_floating_point():
            Y = self.Y.to(device=device, dtype=dtype)
        else:
            Y = self.Y.to(device=device)
        return replace(self, X=X, Y=Y)

    def __repr__(self) -> str:
        return f"Problem({self.describe()!r}, loss={self.loss!r}, n={self.n})"


# ------------------------------------------------------------------------------ registry
def _autoencoder_factory(sizes, code: int, loss: str, tag: str) -> Callable[[int], nn.Module]:
    """A ``seed -> model`` factory of a small autoencoder (logistic hidden units, linear code
    layer ``code``, linear output; the paper's sparse init)."""
    from ..models import sparse_init_

    def make(seed: int = 0) -> nn.Module:
        layers: list[nn.Module] = []
        n_lin = len(sizes) - 1
        for i in range(n_lin):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i != code and i != n_lin - 1:
                layers.append(nn.Sigmoid())
        model = nn.Sequential(*layers)
        sparse_init_(model, seed=seed)
        model.kfac_loss, model.kfac_name, model.layer_sizes, model.code_layer = loss, tag, tuple(sizes), code
        return model

    return make


def _paper_autoencoder(name: str) -> Callable[[int], nn.Module]:
    from ..models import autoencoder

    def make(seed: int = 0) -> nn.Module:
        return autoencoder(name, seed=seed)

    return make


def _figure1_model(seed: int = 0) -> nn.Module:
    from ..models import figure1_network

    return figure1_network(seed=seed)


def _cnn_model(name: str) -> Callable[[int], nn.Module]:
    from ..models import figure1_cnn, mnist_cnn

    build = {"mnist-cnn": mnist_cnn, "fig1-cnn": figure1_cnn}[name]

    def make(seed: int = 0) -> nn.Module:
        return build(seed=seed)

    return make


def _cnn_problem(name: str, X: Tensor, y: Tensor, side: int, params: dict) -> Problem:
    what = {"mnist-cnn": "conv 1-8 5x5/2 ReLU, conv 8-16 3x3/2 ReLU, Linear 400-10",
            "fig1-cnn": "conv 1-6 5x5/2 tanh, conv 6-12 3x3/2 tanh, Linear 192-10"}[name]
    return Problem(name, _cnn_model(name), "categorical", X, y, kind="classifier",
                   batch_sizes={"kfac": 1000, "sgd": 500, "adam": 500},
                   options={"kfac": {"damping": 1.0}, "sgd": {"lr": 0.05, "mu_max": 0.99}, "adam": {"lr": 1e-3}},
                   description=f"CNN classifier ({what}; softmax) on {X.shape[0]} {side}x{side} MNIST digits",
                   params=params)


_DATA_CACHE: dict = {}


def _mnist(n, seed, source="bundled", data_dir=None):
    from ..data import load_mnist

    key = ("mnist", n, seed, source, str(data_dir))
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = load_mnist(n, source=source, data_dir=data_dir, seed=seed)
    return _DATA_CACHE[key]


def _down(X, side, key):
    from ..data import downscale

    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = downscale(X, side).clamp_(0.0, 1.0).contiguous()  # (area sums round past 1)
    return _DATA_CACHE[key]


_SIZES = {
    "mnist": "784-1000-500-250-30-250-500-1000-784",
    "curves": "784-400-200-100-50-25-6-25-50-100-200-400-784",
    "faces": "625-2000-1000-500-30-500-1000-2000-625",
}
# SGD-Nesterov defaults: from the paper's grid (lr × μ_max ∈ {0.99, 0.995, 0.999}), the best
# short-run settings measured by benchmarks/race.py on these problems (see race.md).
_SGD = {"lr": 0.01, "mu_max": 0.99}


def _small_autoencoder(name: str, sizes: tuple, X: Tensor, *, batch: int, adam_lr: float, params: dict,
                       data: str, init: str | None = None) -> Problem:
    """A one-hidden-layer-per-side Bernoulli autoencoder of ``sizes`` on ``X`` (``mnist-small``, ``tiny``):
    K-FAC's batch ``batch``, the baselines' half of it."""
    kind = "logistic, linear code, Bernoulli" + (f", {init}" if init else "")
    return Problem(name, _autoencoder_factory(sizes, 1, "bernoulli", name), "bernoulli", X, X,
                   batch_sizes={"kfac": batch, "sgd": batch // 2, "adam": batch // 2},
                   options={"kfac": {}, "sgd": dict(_SGD), "adam": {"lr": adam_lr}},
                   description=f"{'-'.join(map(str, sizes))} autoencoder ({kind}) on {data}", params=params)


def _build(name: str, n, seed: int, kw: dict) -> Problem:
    src = dict(source=kw.pop("source", "bundled"), data_dir=kw.pop("data_dir", None))
    params = {"n": n, "seed": seed, **{k: v for k, v in src.items() if v not in (None, "bundled")}}
    if name == "mnist":
        X, _ = _mnist(n, seed, **src)
        return Problem(name, _paper_autoencoder("mnist"), "bernoulli", X, X,
                       batch_sizes={"kfac": 1000, "sgd": 500, "adam": 500},
                       options={"kfac": {}, "sgd": dict(_SGD), "adam": {"lr": 1e-3}},
                       description=f"{_SIZES['mnist']} autoencoder (logistic, linear code, Bernoulli, sparse init) "
                                   f"on {X.shape[0]} MNIST digits ({src['source']})",
                       params=params)
    if name == "mnist-small":
        X, _ = _mnist(n, seed, **src)
        return _small_autoencoder(name, (784, 200, 30, 200, 784), X, batch=1000, adam_lr=1e-3, params=params,
                                  data=f"{X.shape[0]} MNIST digits", init="sparse init")
    if name == "tiny":
        X28, _ = _mnist(n, seed, **src)
        X = _down(X28, 8, ("tiny", n, seed, src["source"], str(src["data_dir"])))
        return _small_autoencoder(name, (64, 16, 4, 16, 64), X, batch=500, adam_lr=1e-2, params=params,
                                  data=f"{X.shape[0]} 8x8 MNIST digits")
    if name == "figure1":
        X28, y = _mnist(n, seed, **src)
        X = _down(X28, 16, ("figure1", n, seed, src["source"], str(src["data_dir"])))
        return Problem(name, _figure1_model, "categorical", X, y, kind="classifier",
                       batch_sizes={"kfac": 1000, "sgd": 500, "adam": 500},
                       # λ₀ = 150 (the autoencoders') barely moves this small tanh net for ~100
                       # steps; analysis.figure1_setup uses 1e-3 full-batch. 1.0 suits mini-batches.
                       options={"kfac": {"damping": 1.0}, "sgd": {"lr": 0.1, "mu_max": 0.99}, "adam": {"lr": 1e-3}},
                       description="256-20-20-20-20-10 tanh classifier (softmax) on "
                                   f"{X.shape[0]} 16x16 down-scaled MNIST digits",
                       params=params)
    if name == "mnist-cnn":
        X, y = _mnist(n, seed, **src)
        return _cnn_problem(name, X, y, 28, params)
    if name == "fig1-cnn":
        X28, y = _mnist(n, seed, **src)
        X = _down(X28, 16, ("figure1", n, seed, src["source"], str(src["data_dir"])))
        return _cnn_problem(name, X, y, 16, params)
    if name == "curves":
        from ..data import make_curves

        n_c = 2000 if n is None else int(n)
        key = ("curves", n_c, seed)
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = make_curves(n_c, seed=seed)
        X = _DATA_CACHE[key]
        return Problem(name, _paper_autoencoder("curves"), "bernoulli", X, X,
                       batch_sizes={"kfac": 1000, "sgd": 250, "adam": 250},
                       options={"kfac": {}, "sgd": dict(_SGD), "adam": {"lr": 1e-3}},
                       description=f"{_SIZES['curves']} autoencoder (logistic, linear code, Bernoulli, sparse init) "
                                   f"on {n_c} generated CURVES images",
                       params={**params, "n": n_c})
    if name == "faces":
        from ..data import load_faces

        path = kw.pop("path", None) or os.environ.get(FACES_ENV_VAR, "").strip() or None
        if path is None:
            raise FileNotFoundError(
                "the 'faces' problem needs face images, which kfac_lab does not ship: pass "
                "get_problem('faces', path='.../faces.npz') (or olivetti_faces.npy, or a directory holding "
                f"one), set ${FACES_ENV_VAR}=PATH, or on the command line `kfac-lab train --problem faces "
                "--faces PATH`; see kfac_lab.data.load_faces for the accepted formats")
        X = load_faces(path, n=n, standardize=kw.pop("standardize", False))
        return Problem(name, _paper_autoencoder("faces"), "gaussian", X, X,
                       batch_sizes={"kfac": 1000, "sgd": 500, "adam": 500},
                       options={"kfac": {}, "sgd": {"lr": 1e-3, "mu_max": 0.99}, "adam": {"lr": 1e-3}},
                       description=f"{_SIZES['faces']} autoencoder (logistic, linear code, Gaussian, sparse init) "
                                   f"on {X.shape[0]} 25x25 faces from {path}",
                       params={**params, "path": os.fspath(path)})
    raise AssertionError(name)  # pragma: no cover


#: Registry names, with one line each.
PROBLEMS = {
    "mnist": "the paper's MNIST autoencoder on the 5,000 bundled digits",
    "curves": "the paper's CURVES autoencoder on generated curves (n=2000 by default)",
    "faces": "the paper's FACES autoencoder (needs a faces file: path=... or $KFAC_LAB_FACES)",
    "figure1": "the 256-20-20-20-20-10 tanh classifier of figures 1-2 on 16x16 MNIST",
    "mnist-small": "a 784-200-30-200-784 autoencoder on the bundled digits (lecture speed)",
    "tiny": "a 64-16-4-16-64 autoencoder on 8x8 digits (milliseconds per step)",
    "mnist-cnn": "a CNN classifier (two conv layers + Linear) on the bundled 28x28 digits",
    "fig1-cnn": "a 2,746-parameter CNN on 16x16 digits whose exact Fisher fits in memory",
}


def problem_names() -> list[str]:
    return list(PROBLEMS)


def get_problem(name: str, n: int | None = None, seed: int = 0, **kw) -> Problem:
    """A :class:`Problem` by name (see :data:`PROBLEMS`).

    ``n``: number of training cases (``None``: the problem's default — all 5,000 bundled digits,
    2,000 curves, every face). ``seed``: the data seed (MNIST's stratified shuffle, CURVES'
    generator); the model's seed is given to ``make_model``. Extra keywords: ``source`` and
    ``data_dir`` (MNIST-based problems: ``source="idx"`` reads the standard files), ``path`` and
    ``standardize`` (``"faces"``). Data are cached per process (the tensors are shared: treat
    them as read-only). Raises ValueError naming the choices for an unknown name or keyword.
    """
    if isinstance(name, Problem):
        return name
    if not isinstance(name, str):
        raise ValueError(f"problem must be a name ({problem_names()}) or a Problem, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {problem_names()}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive integer (number of training cases) or None, got {n!r}")
    allowed = {"faces": {"path", "standardize"}}.get(key, set()) | (
        {"source", "data_dir"} if key in ("mnist", "mnist-small", "tiny", "figure1", "mnist-cnn", "fig1-cnn")
        else set())
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise ValueError(f"get_problem({key!r}): unknown keyword(s) {unknown}; accepted: {sorted(allowed)}")
    problem = _build(key, n, int(seed), dict(kw))
    if key != "faces":
        problem.params.update({k: v for k, v in kw.items() if v is not None and k not in problem.params
                               and not (k == "source" and v == "bundled")})
    if key == "faces" and "standardize" in kw:
        problem.params["standardize"] = bool(kw["standardize"])
    return problem
