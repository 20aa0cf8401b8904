"""Shared-memory all-reduce for ranks on one node, over an MPI shared-memory window.

Every rank's buffer lives in its segment of a window made by MPI_Win_allocate_shared, which every
other rank of the node can read and write directly. The all-reduce then needs no messages, only two
barriers: each rank reduces its 1/n of the elements by reading that chunk from all n segments,
block by block, and writes each reduced block into every segment, its own and the others'. A rank
reads and writes about 2x the buffer, where message passing copies each byte into and out of a
transfer area at every step. This is what DeepSpeed's CPU all-reduce
and NCCL's single-node paths do; MPI users get it here through MPI-3 windows.

A buffer allocated by `shared_empty` is reduced where it lies. Any other host buffer is staged:
copied into a window segment kept for the purpose, reduced there, and copied back out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from .dtypes import DType
from .ops import divide_in_place, reduce_into
from .ring import chunk_bounds

BLOCK_BYTES = 256 << 10  # the reduction walks its chunk in blocks this size, so each block's partial
# sum stays in cache while the other ranks' terms are added to it


@dataclass
class Segment:
    """One shared window on a node communicator: this rank's memory and every rank's, readable here."""

    win: MPI.Win
    comm: MPI.Comm  # the node communicator (same ranks, same order as the caller's)
    capacity: int  # bytes per rank
    memory: list[np.ndarray]  # each rank's segment as raw bytes, indexed by rank

    @property
    def address(self) -> int:
        """Address of this rank's segment: how a buffer is recognised as living in it."""
        return self.memory[self.comm.Get_rank()].__array_interface__["data"][0]

    def view(self, rank: int, dtype: np.dtype, length: int) -> np.ndarray:
        """The first `length` elements of `rank`'s segment as an array of `dtype`."""
        return self.memory[rank][: length * dtype.itemsize].view(dtype)

    def fence(self) -> None:
        """Make every rank's writes so far visible to every rank (MPI-3 shared-memory model)."""
        # flush our stores, wait for everyone, then see everyone's
        self.win.Sync()
        self.comm.Barrier()
        self.win.Sync()

    def free(self) -> None:
        """Release the window (collective over the node communicator)."""
        self.memory = []
        self.win.Unlock_all()
        self.win.Free()


def allocate(node: MPI.Comm, nbytes: int) -> Segment:
    """A window of `nbytes` per rank on the node communicator `node` (collective)."""
    # at least one byte, so that every rank's segment has an address of its own
    win = MPI.Win.Allocate_shared(max(nbytes, 1), 1, comm=node)
    memory = []
    for rank in range(node.Get_size()):
        buf, _ = win.Shared_query(rank)
        memory.append(np.frombuffer(buf, dtype=np.uint8, count=max(nbytes, 1)))
    # one passive-target epoch for the window's whole life: win.Sync() is then legal at any time
    win.Lock_all(MPI.MODE_NOCHECK)
    return Segment(win, node, nbytes, memory)


def allreduce_inplace(data: np.ndarray, seg: Segment, op: str, dtype: DType, in_window: bool) -> None:
    """All-reduce the 1-D host array `data` through `seg`; avg is divided here, once per element.

    in_window: `data` is this rank's segment itself (no staging copies).
    """
    n, r = seg.comm.Get_size(), seg.comm.Get_rank()
    length = len(data)
    views = [seg.view(j, dtype.storage, length) for j in range(n)]
    mine = views[r]
    if not in_window:
        mine[:] = data  # stage our contribution where the other ranks can read it
    bounds = chunk_bounds(length, n)
    # 1. every contribution is in place
    seg.fence()
    # 2. reduce our chunk block by block into our own segment, and write each finished block into
    #    every other rank's segment while it is still in cache (only we touch these columns)
    start, stop = bounds[r]
    step = max(BLOCK_BYTES // dtype.storage.itemsize, 1)
    others = [views[(r + k) % n] for k in range(1, n)]
    for s in range(start, stop, step):
        e = min(s + step, stop)
        block = mine[s:e]
        for other in others:
            reduce_into(block, other[s:e], op, dtype)
        if op == "avg":
            divide_in_place(block, n, dtype)
        for other in others:
            other[s:e] = block
    # 3. every chunk is reduced and in every segment; nobody touches ours after this fence, so the
    #    caller may overwrite it when we return
    seg.fence()
    if not in_window:
        data[:] = mine  # staged: the result back into the caller's buffer
