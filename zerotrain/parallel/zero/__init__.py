from .api import ShardedModule, shard_model
from .optimizer import ShardedOptimizer, StepInfo
from .policy import STAGES, StagePolicy
from .report import memory_report

__all__ = ["shard_model", "ShardedModule", "ShardedOptimizer", "StepInfo", "memory_report",
           "STAGES", "StagePolicy"]
