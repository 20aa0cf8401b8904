"""Collectives over mpi4py for numpy arrays, torch tensors (CPU/CUDA) and CuPy arrays.

    from dmlmpi import comm
    y = comm.allreduce(x, op="sum", algorithm="auto")   # same kind, device and shape as x
"""
from .adasum import adasum_allreduce
from .personalized import alltoall
from .buffers import cuda_aware
from .collectives import (ALGORITHMS, allgather, allgather_inplace, allreduce, broadcast, choose_algorithm,
                          free_shared, on_one_node, reduce_scatter, reduce_scatter_inplace,
                          shared_empty)
from .guard import CollectiveMismatchError
from .ops import OPS

__all__ = ["ALGORITHMS", "OPS", "CollectiveMismatchError", "adasum_allreduce", "allgather", "alltoall", "allgather_inplace", "allreduce", "broadcast",
           "choose_algorithm", "cuda_aware", "free_shared", "on_one_node", "reduce_scatter",
           "reduce_scatter_inplace", "shared_empty"]
