"""What every K-FAC front end (``KFAC``, ``KFACPreconditioner``, ``DistributedKFAC``) reads from
its curvature engine: one definition of the shared attributes (docs/architecture.md#the-curvature-engine)."""
from __future__ import annotations

from ..curvature.engine import CurvatureEngine


def _engine_attribute(name: str, doc: str, settable: bool = False) -> property:
    get = lambda self: getattr(self.curvature, name)  # noqa: E731
    put = (lambda self, value: setattr(self.curvature, name, value)) if settable else None
    return property(get, put, doc=doc)


class CurvatureFrontEnd:
    """A front end over ``self.curvature`` (a :class:`CurvatureEngine`): its layers, loss, running
    factors, sampling generator and sequential plan are the engine's."""

    curvature: CurvatureEngine
    layers = _engine_attribute("layers", "The K-FAC layers (``KFACLayer``), in the model's order.")
    loss = _engine_attribute("loss", "The predictive distribution (a ``Loss``).", settable=True)
    factors = _engine_attribute("factors", "The running Kronecker factors (``KroneckerFactors``).")
    generator = _engine_attribute("generator", "The generator of the sampled targets (on the model's device).")
    plan = _engine_attribute("plan", "The hand-written sequential plan, or None (torch.func).")
