"""Parallel training strategies built on dmlmpi.comm."""
from .data import DataParallel
from .pipeline import Pipeline
from .ps import ParameterServer
from .syncbn import SyncBatchNorm
from .zero import ZeroRedundancyOptimizer

__all__ = ["DataParallel", "ParameterServer", "Pipeline", "SyncBatchNorm", "ZeroRedundancyOptimizer"]
