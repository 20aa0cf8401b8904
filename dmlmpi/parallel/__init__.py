"""Parallel training strategies built on dmlmpi.comm."""
from .data import DataParallel
from .ps import ParameterServer

__all__ = ["DataParallel", "ParameterServer"]
