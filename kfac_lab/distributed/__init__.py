"""Distributed K-FAC, split by concept (docs/architecture.md#distributed-k-fac):

- :mod:`.communicator` — the process group (:func:`init_distributed`) and the collectives
  (:class:`Communicator`: bucketed, counted, clear errors; a world of one is a no-op);
- :mod:`.sharding` — shards of the global batch, their global order, a shard's share of the
  statistics subset and its sampled targets;
- :mod:`.factor_sync` — which factor statistics are summed over ranks, and when;
- :mod:`.assignment` — independent tasks assigned by longest-processing-time and shared;
- :mod:`.inverses` — the damped inverses as such tasks, and their assembly;
- :mod:`.engine` — :class:`DistributedEngine`, the curvature engine over the ranks (the above
  behind the engine's extension points);
- :mod:`.kfac` — :class:`DistributedKFAC`, the ``KFAC`` front end on that engine.
"""
from .assignment import Task, assign_lpt, run_shared, tridiag_side_cost
from .communicator import DEFAULT_TIMEOUT_S, CommStats, Communicator, DistributedError, init_distributed
from .engine import SAMPLINGS, DistributedEngine
from .factor_sync import FACTOR_SYNCS, FactorSync
from .kfac import DistributedKFAC
from .sharding import ShardPlan, global_order, reference_batch, shard, shard_plan

__all__ = ["DistributedKFAC", "DistributedEngine", "DistributedError", "init_distributed", "Communicator", "CommStats",
           "DEFAULT_TIMEOUT_S", "shard", "global_order", "reference_batch", "ShardPlan", "shard_plan", "FactorSync",
           "FACTOR_SYNCS", "SAMPLINGS", "assign_lpt", "Task", "run_shared", "tridiag_side_cost"]
