"""Optimizers: the full K-FAC (Algorithm 2), the plain preconditioner, the baselines, and the
small reusable pieces of the paper's training loop (batch-size schedule, Polyak averaging)."""
from .averaging import BothValues, PolyakAverage
from .baselines import Adam, BaselineInfo, SGDNesterov
from .config import KFACConfig
from .kfac import KFAC, StepInfo
from .preconditioner import KFACPreconditioner, PreconditionerInfo
from .quadratic import Products, coefficients, model_change
from .schedules import BatchSizeSchedule, SutskeverMomentum, batch_size, sutskever_momentum

__all__ = [
    "KFAC", "DistributedKFAC", "KFACConfig", "StepInfo", "Products", "coefficients", "model_change",
    "KFACPreconditioner", "PreconditionerInfo", "SGDNesterov", "Adam", "BaselineInfo",
    "PolyakAverage", "BothValues", "BatchSizeSchedule", "SutskeverMomentum", "batch_size", "sutskever_momentum",
]


def __getattr__(name: str):
    # loaded on first use: kfac_lab.distributed builds on this package (KFAC), so importing it here eagerly would be circular
    if name == "DistributedKFAC":
        from ..distributed import DistributedKFAC
        return DistributedKFAC
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
