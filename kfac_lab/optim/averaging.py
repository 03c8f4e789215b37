"""Polyak-style exponential iterate averaging (M&G 2015 §13).

``θ̄ ← ξ θ̄ + (1 − ξ) θ`` after every optimizer step, ``ξ = 0.99``. The paper reports
``min(error at θ, error at θ̄)``: :meth:`PolyakAverage.evaluate_both` gives both values.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["BothValues", "PolyakAverage"]


class BothValues(NamedTuple):
    """``fn()`` at the current iterate θ and at the average θ̄; ``best`` is their minimum
    (what the paper reports)."""

    iterate: Any
    average: Any

    @property
    def best(self):
        return min(self.iterate, self.average)


def _check_xi(xi) -> float:
    if isinstance(xi, bool) or not isinstance(xi, (int, float)) or not 0.0 <= xi < 1.0:
        raise ValueError(f"xi (the averaging decay) must be in [0, 1) (the paper: 0.99), got {xi!r}")
    return float(xi)


class PolyakAverage:
    """An exponential moving average θ̄ of parameters.

    ``PolyakAverage(model)`` averages every parameter of ``model`` (matched by name in
    ``average_into`` and ``state_dict``); ``PolyakAverage([p1, p2, …])`` averages the given
    tensors (matched by position). θ̄ starts at the parameters' values at construction
    (``θ̄₀ = θ₀``; :meth:`reset` restarts it at the current θ). The average lives on each
    parameter's device in its dtype; :meth:`update` is in place and never syncs with the host.

    Usage::

        avg = PolyakAverage(model, xi=0.99)
        for x, y in batches:
            opt.step(x, y)
            avg.update()
        err = avg.evaluate_both(lambda: error(model)).best
    """

    def __init__(self, params: nn.Module | Iterable[Tensor], xi: float = 0.99):
        self.xi = _check_xi(xi)
        if isinstance(params, nn.Module):
            named = list(params.named_parameters())
            self.names: list[str] | None = [n for n, _ in named]
            self.params = [p for _, p in named]
        else:
            if isinstance(params, Tensor):
                raise TypeError("pass a model or an iterable of parameters (e.g. model.parameters()), not one tensor")
            self.params = list(params)
            self.names = None
            for i, p in enumerate(self.params):
                if not isinstance(p, Tensor):
                    raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor")
        if not self.params:
            raise ValueError("PolyakAverage: no parameters to average")
        with torch.no_grad():
            self.average = [p.detach().clone() for p in self.params]
        self.n_updates = 0

    # -- the average --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """``θ̄ ← ξ θ̄ + (1 − ξ) θ`` for every parameter (in place; call after each step)."""
        for a, p in zip(self.average, self.params):
            a.mul_(self.xi).add_(p.detach(), alpha=1.0 - self.xi)
        self.n_updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Restart the average at the current parameters."""
        for a, p in zip(self.average, self.params):
            a.copy_(p.detach())
        self.n_updates = 0

    # -- evaluating with θ̄ ---------------------------------------------------------------------
    @contextlib.contextmanager
    def swap(self) -> Iterator["PolyakAverage"]:
        """Inside the ``with`` block the parameters hold θ̄; θ is restored on exit (also after an
        exception), bit for bit. Do not step an optimizer inside the block."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield self
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    @torch.no_grad()
    def average_into(self, model: nn.Module | Iterable[Tensor]) -> nn.Module | list[Tensor]:
        """Copy θ̄ into another model with the same parameters (e.g. a ``copy.deepcopy`` of the
        trained one), matched by name when this average was built from a model, else by
        position. Returns ``model``."""
        if isinstance(model, nn.Module):
            named = dict(model.named_parameters())
            if self.names is not None:
                missing = [n for n in self.names if n not in named]
                if missing or len(named) != len(self.names):
                    raise ValueError(
                        f"average_into: the target model's parameters differ from the averaged ones "
                        f"(missing {missing}, {len(named)} vs {len(self.names)} parameters); pass a copy of the same model"
                    )
                targets = [named[n] for n in self.names]
            else:
                targets = list(named.values())
        else:
            targets = list(model)
        if len(targets) != len(self.average):
            raise ValueError(f"average_into: {len(targets)} target parameters for {len(self.average)} averaged ones")
        for i, (t, a) in enumerate(zip(targets, self.average)):
            if t.shape != a.shape:
                name = self.names[i] if self.names else f"#{i}"
                raise ValueError(f"average_into: parameter {name} has shape {tuple(t.shape)}, the average {tuple(a.shape)}")
            t.copy_(a)
        return model

    def evaluate_both(self, fn: Callable[[], Any]) -> BothValues:
        """``BothValues(fn() at θ, fn() at θ̄)``; ``.best`` is the minimum the paper reports."""
        current = fn()
        with self.swap():
            averaged = fn()
        return BothValues(current, averaged)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{"xi", "n_updates", "names", "average"}`` (tensors cloned; loadable with ``weights_only=True``)."""
        return {
            "xi": self.xi,
            "n_updates": self.n_updates,
            "names": list(self.names) if self.names is not None else None,
            "average": [a.detach().clone() for a in self.average],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Load a ``state_dict()``, all or nothing (names, shapes, finiteness and ``xi`` first)."""
        from .state_check import Checker

        c = Checker("PolyakAverage")
        c.mapping(state, ("xi", "n_updates", "average"))
        names = state.get("names")
        if names is not None and self.names is not None and list(names) != self.names:
            c.fail("the saved average was taken over differently named parameters", "load it into the same model")
        avg = c.tensors(state["average"], "the saved average", [a.shape for a in self.average])
        try:
            xi = _check_xi(state["xi"])
        except ValueError as exc:
            c.fail(str(exc), "the state is damaged")
        n = c.integer(state["n_updates"], "n_updates")
        new = [s.detach().to(device=a.device, dtype=a.dtype, copy=True) for a, s in zip(self.average, avg)]
        for a, s in zip(self.average, new):
            a.copy_(s)
        self.xi, self.n_updates = xi, n

    def __repr__(self) -> str:
        return f"PolyakAverage(xi={self.xi}, {len(self.params)} tensors, {self.n_updates} updates)"
