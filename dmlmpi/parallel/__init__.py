"""Parallel training strategies built on dmlmpi.comm."""
from .data import DataParallel

__all__ = ["DataParallel"]
