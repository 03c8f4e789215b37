"""Data-parallel K-FAC: moved to :mod:`kfac_lab.distributed` (docs/architecture.md#distributed-k-fac);
the names importable from here before the split stay importable."""
from ..distributed import (DEFAULT_TIMEOUT_S, CommStats, DistributedError, DistributedKFAC, assign_lpt,
                           global_order, init_distributed, reference_batch, shard)

__all__ = ["DistributedKFAC", "DistributedError", "CommStats", "init_distributed", "shard", "global_order",
           "reference_batch", "assign_lpt", "DEFAULT_TIMEOUT_S"]
