"""Hierarchical all-reduce: reduce inside each node, ring among node leaders, broadcast inside nodes.

Only one rank per node (its leader) talks across the network, so inter-node traffic is that of a
ring over nodes rather than over all ranks; inside the node the exchanges go through shared memory.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from . import ring
from .dtypes import DType


def split_nodes(comm: MPI.Comm, ranks_per_node: int = 0) -> tuple[MPI.Comm, MPI.Comm]:
    """(local, leaders): ranks sharing a node, and the communicator of local rank 0s (NULL elsewhere).

    ranks_per_node > 0 groups consecutive ranks instead of asking MPI which share memory, so that
    several "nodes" can be exercised on one machine.
    """
    if ranks_per_node > 0:
        local = comm.Split(color=comm.Get_rank() // ranks_per_node, key=comm.Get_rank())
    else:
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    is_leader = local.Get_rank() == 0
    leaders = comm.Split(color=0 if is_leader else MPI.UNDEFINED, key=comm.Get_rank())
    return local, leaders


def allreduce_inplace(work: Any, local: MPI.Comm, leaders: MPI.Comm, op: str, dtype: DType) -> None:
    """All-reduce `work` over local x leaders; every rank ends with identical bits."""
    # 1. node-local reduce to the leader: ring reduce-scatter, then the leader gathers the chunks
    start, stop = ring.reduce_scatter_inplace(work, local, op, dtype)
    bounds = ring.chunk_bounds(len(work), local.Get_size())
    counts = [b - a for a, b in bounds]
    displs = [a for a, _ in bounds]
    if local.Get_size() > 1:
        if local.Get_rank() == 0:
            local.Gatherv(MPI.IN_PLACE, [work, counts, displs, _mpi_type(work)], root=0)
        else:
            local.Gatherv(work[start:stop], None, root=0)
    # 2. leaders all-reduce the node sums with the ring
    if leaders != MPI.COMM_NULL:
        ring.allreduce_inplace(work, leaders, op, dtype)
    # 3. each leader broadcasts the result to its node
    if local.Get_size() > 1:
        local.Bcast(work, root=0)


def _mpi_type(work: Any) -> MPI.Datatype:
    """The MPI datatype of a 1-D array's elements (numpy, or device arrays by their dtype)."""
    return MPI._typedict[np.dtype(str(work.dtype).replace("torch.", "").replace("bfloat16", "int16")).char]
