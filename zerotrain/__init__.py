"""zerotrain: ZeRO (stages 0–3), tensor parallelism and mixed precision on torch.distributed."""
from .distributed import Mesh, comm_report, init_distributed, reset_comm_report
from .parallel import checkpointing
from .parallel.precision import LossScaleConfig, MixedPrecision
from .parallel.zero import ShardedOptimizer, StepInfo, memory_report, shard_model
from .engine import Engine, add_config_arguments, initialize
from . import zero

__version__ = "0.1.0"

__all__ = [
    "init_distributed", "Mesh", "shard_model", "ShardedOptimizer", "StepInfo", "MixedPrecision",
    "LossScaleConfig", "memory_report", "comm_report", "reset_comm_report", "initialize", "Engine", "add_config_arguments", "checkpointing", "zero", "__version__",
]
