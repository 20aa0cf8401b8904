"""Parallel training strategies built on dmlmpi.comm."""
from .clip import clip_grad_norm
from .data import DataParallel
from .experts import ExpertParallelMoE, all_to_all
from .fsdp import FullyShardedDataParallel
from .pipeline import Pipeline
from .ps import ParameterServer
from .sharded import ShardedDataParallel
from .syncbn import SyncBatchNorm
from .zero import ZeroRedundancyOptimizer

__all__ = ["DataParallel", "ExpertParallelMoE", "FullyShardedDataParallel", "all_to_all", "clip_grad_norm", "ParameterServer", "Pipeline",
           "ShardedDataParallel", "SyncBatchNorm", "ZeroRedundancyOptimizer"]
