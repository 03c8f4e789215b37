"""Losses as predictive distributions R_{y|z} (M&G 2015 §2.2, §5; docs/algorithm.md#notation).

Each loss is the negative log-likelihood of a distribution over targets given the network's
output ``z`` (shape ``(m, c)``: logits, or the mean for the Gaussian). It provides what K-FAC
needs of it: the NLL (summed over outputs, mean over cases), samples from the model's own
distribution (for G's sampled targets, M&G 2015 §5), the gradient with respect to ``z`` per case, and
the output Fisher ``F_R`` as a square root (``F_R = B Bᵀ``) and as products ``F_R v``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import NonFiniteError


class Loss:
    """Base class. Subclasses implement the five methods; ``name`` identifies them."""

    name = "loss"

    def nll_per_case(self, z: Tensor, y: Tensor) -> Tensor:
        """``−log r(y|z)`` per case, shape ``(m,)``."""
        raise NotImplementedError

    def nll(self, z: Tensor, y: Tensor) -> Tensor:
        """Mean over cases of the NLL summed over outputs; a scalar."""
        return self.nll_per_case(z, y).mean()

    def sample(self, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One target per case drawn from ``R_{y|z}`` (no gradient)."""
        raise NotImplementedError

    def grad_output(self, z: Tensor, y: Tensor) -> Tensor:
        """``∂ nll_case / ∂z``, shape ``(m, c)``."""
        raise NotImplementedError

    def fisher_sqrt(self, z: Tensor) -> Tensor:
        """``B`` with ``F_R = B Bᵀ`` per case: shape ``(k, m, c)`` (k directions first)."""
        raise NotImplementedError

    def fisher_vp(self, z: Tensor, v: Tensor) -> Tensor:
        """``F_R v`` per case; ``v`` shape ``(..., m, c)`` (leading batch dims allowed)."""
        raise NotImplementedError

    def check_target(self, z: Tensor, y: Tensor) -> None:
        """Raise a clear ``ValueError`` if ``y`` cannot be a target for output ``z``."""

    def checked_nll(self, z: Tensor, y: Tensor, who: str) -> Tensor:
        """``nll(z, y)`` after ``check_target`` (before the loss runs), its error prefixed by ``who``."""
        if not isinstance(y, Tensor):
            raise TypeError(f"{who}: targets must be a tensor, got {type(y).__name__}")
        try:
            self.check_target(z, y)
        except ValueError as exc:
            raise ValueError(f"{who}: {exc}") from None
        return self.nll(z, y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _range(y: Tensor) -> tuple[float, float]:
    """``(min, max)`` of ``y`` in one pass and one host sync (the price, on an accelerator, of
    refusing a bad batch before the loss runs: an out-of-range class index is a device-side
    assert on CUDA). NaN propagates, so a NaN batch passes here and is rejected as a step."""
    lo, hi = torch.stack(torch.aminmax(y.reshape(-1))).tolist()
    return lo, hi


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


class Categorical(Loss):
    """Softmax cross-entropy. Targets: class indices ``(m,)`` (any integer dtype, in
    ``[0, classes)``), or SOFT targets — probability rows ``(m, classes)`` (floating, each row
    non-negative and summing to 1): ``nll = −Σ_c y_c log softmax(z)_c`` and ``∂nll/∂z = p − y``
    (so the empirical Fisher uses the soft target; the sampled and exact Fisher depend on the
    model's distribution only)."""

    name = "categorical"
    #: rows of a soft target must sum to 1 within this tolerance (relative to the dtype's precision)
    ROW_SUM_TOL = 1e-4

    def check_target(self, z, y):
        if z.dim() != 2:
            raise ValueError(f"categorical loss: output must be (cases, classes), got shape {_shape(z)}")
        m, c = z.shape
        if y.is_floating_point():
            if y.shape != z.shape:
                raise ValueError(
                    f"categorical loss: floating targets are read as probability rows and need shape ({m}, {c}), "
                    f"got {_shape(y)}; for class labels pass integer class indices (y.long())")
            # (NaN/inf pass these checks: a non-finite batch is rejected as a step, like a NaN input)
            tol = max(self.ROW_SUM_TOL, 10 * torch.finfo(y.dtype).eps)
            err = (y.sum(1) - 1).abs()
            lo, worst = torch.stack([y.min().to(err.dtype), err.max()]).tolist() if y.numel() else (0.0, 0.0)
            if lo < 0:
                raise ValueError("categorical loss: soft targets (probability rows) must be >= 0; "
                                 "for class labels pass integer class indices (y.long())")
            if worst > tol:
                row = int(err.argmax())
                raise ValueError(
                    f"categorical loss: soft targets must be probability rows summing to 1; row {row} sums to "
                    f"{float(y[row].sum()):.6g} (normalise with y / y.sum(1, keepdim=True), or pass class labels "
                    "as integer class indices with y.long())")
            return
        if y.dtype == torch.bool or y.is_complex() or y.dtype not in (
                torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise ValueError(
                f"categorical loss: targets must be integer class indices (or floating probability rows), got "
                f"dtype {y.dtype}; use y.long() (or the 'bernoulli'/'gaussian' loss for real-valued targets)"
            )
        if y.shape != z.shape[:1]:
            raise ValueError(f"categorical loss: targets shape {_shape(y)} must be ({m},) (one class index per case)")
        lo, hi = _range(y) if y.numel() else (0, 0)
        if lo < 0 or hi >= c:
            raise ValueError(f"categorical loss: class indices must lie in [0, {c - 1}] for {c} outputs, got values "
                             f"from {lo} to {hi}; check the labels (or the model's number of outputs)")

    def nll_per_case(self, z, y):
        if y.is_floating_point():
            return -(y.to(z.dtype) * torch.log_softmax(z, dim=1)).sum(1)
        return F.cross_entropy(z, y.long(), reduction="none")

    def sample(self, z, generator=None):
        p = torch.softmax(z.detach(), dim=1)
        return torch.multinomial(p, 1, generator=generator).squeeze(1)

    def grad_output(self, z, y):
        target = y.to(z.dtype) if y.is_floating_point() else F.one_hot(y.long(), z.shape[1]).to(z.dtype)
        return torch.softmax(z, dim=1) - target

    def fisher_sqrt(self, z):
        # F_R = diag(p) − p pᵀ = Σ_c p_c (e_c − p)(e_c − p)ᵀ: column c is √p_c (e_c − p).
        p = torch.softmax(z.detach(), dim=1)  # (m, c)
        eye = torch.eye(z.shape[1], dtype=z.dtype, device=z.device)
        return p.sqrt().t().unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))  # (c, m, c)

    def fisher_vp(self, z, v):
        p = torch.softmax(z.detach(), dim=-1)
        return p * v - p * (p * v).sum(-1, keepdim=True)


class Bernoulli(Loss):
    """Sigmoid cross-entropy per output unit; targets in [0, 1], same shape as ``z``."""

    name = "bernoulli"

    def check_target(self, z, y):
        if y.shape != z.shape:
            raise ValueError(f"bernoulli loss: targets shape {_shape(y)} must equal output shape {_shape(z)}")
        if not y.is_floating_point():
            raise ValueError(f"bernoulli loss: targets must be floats in [0, 1], got dtype {y.dtype}; use y.float()")
        lo, hi = _range(y) if y.numel() else (0.0, 0.0)  # NaN passes: a non-finite batch is rejected as a step
        if lo < 0 or hi > 1:
            bad = y[(y < 0) | (y > 1)]
            raise ValueError(f"bernoulli loss: targets must lie in [0, 1] (probabilities), got {bad.numel()} value(s) "
                             f"outside (from {lo:.6g} to {hi:.6g}); rescale the data (e.g. x / 255) or use the "
                             "'gaussian' loss for unbounded targets")

    def nll_per_case(self, z, y):
        return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none").flatten(1).sum(1)

    def sample(self, z, generator=None):
        # u < p with u ~ U[0, 1) is Bernoulli(p); ~3.5x faster than torch.bernoulli on CPU
        p = torch.sigmoid(z.detach())
        u = torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device)
        return (u < p).to(p.dtype)

    def grad_output(self, z, y):
        return torch.sigmoid(z) - y.to(z.dtype)

    def _var(self, z):
        p = torch.sigmoid(z.detach())
        return p * (1 - p)

    def fisher_sqrt(self, z):
        return torch.diag_embed(self._var(z).sqrt()).permute(2, 0, 1)  # (c, m, c)

    def fisher_vp(self, z, v):
        return self._var(z) * v


class Gaussian(Loss):
    """Unit-variance Gaussian: NLL = ½‖y − z‖² (+ const); targets same shape as ``z``."""

    name = "gaussian"

    def check_target(self, z, y):
        if y.shape != z.shape:
            raise ValueError(f"gaussian loss: targets shape {_shape(y)} must equal output shape {_shape(z)} "
                             "(one target per output; reshape y, e.g. y.view_as(z) when only the layout differs)")
        if not y.is_floating_point():
            raise ValueError(f"gaussian loss: targets must be floats, got dtype {y.dtype}; use y.float()")

    def nll_per_case(self, z, y):
        return 0.5 * (z - y.to(z.dtype)).pow(2).flatten(1).sum(1)

    def sample(self, z, generator=None):
        z = z.detach()
        return z + torch.randn(z.shape, generator=generator, dtype=z.dtype, device=z.device)

    def grad_output(self, z, y):
        return z - y.to(z.dtype)

    def fisher_sqrt(self, z):
        m, c = z.shape
        eye = torch.eye(c, dtype=z.dtype, device=z.device)
        return eye.unsqueeze(1).expand(c, m, c)

    def fisher_vp(self, z, v):
        return v


class DelegatingLoss(Loss):
    """A loss that forwards everything to ``base``; subclasses override what they change
    (e.g. ``sample``, to replay or shard the sampled targets)."""

    def __init__(self, base: "str | Loss"):
        self.base = get_loss(base)
        self.name = self.base.name

    def nll_per_case(self, z, y):
        return self.base.nll_per_case(z, y)

    def nll(self, z, y):
        return self.base.nll(z, y)

    def sample(self, z, generator=None):
        return self.base.sample(z, generator)

    def grad_output(self, z, y):
        return self.base.grad_output(z, y)

    def fisher_sqrt(self, z):
        return self.base.fisher_sqrt(z)

    def fisher_vp(self, z, v):
        return self.base.fisher_vp(z, v)

    def check_target(self, z, y):
        return self.base.check_target(z, y)


LOSSES = {cls.name: cls for cls in (Categorical, Bernoulli, Gaussian)}
ALIASES = {"softmax": "categorical", "cross_entropy": "categorical", "sigmoid": "bernoulli",
           "logistic": "bernoulli", "squared_error": "gaussian", "mse": "gaussian"}


def get_loss(loss: str | Loss) -> Loss:
    """A ``Loss`` from a name (``"categorical"``, ``"bernoulli"``, ``"gaussian"``) or an instance."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        key = ALIASES.get(loss.lower(), loss.lower())
        if key in LOSSES:
            return LOSSES[key]()
    raise ValueError(
        f"unknown loss {loss!r}: choose one of {sorted(LOSSES)} (or aliases {sorted(ALIASES)}), "
        "or pass a kfac_lab.curvature.Loss instance"
    )


def check_finite(t: Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` naming ``what`` if ``t`` holds NaN or ±inf (one host sync)."""
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(f"{what} is not finite (NaN or inf); check the inputs and lower the learning rate or raise the damping")
