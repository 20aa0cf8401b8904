"""Ring collectives: reduce-scatter and all-gather in n-1 neighbour exchanges each.

Every rank sends to its right neighbour and receives from its left one at each step, so every
link carries 1/n of the data per step and each rank moves 2(n-1)/n of the array in total,
whatever n is: the bandwidth-optimal all-reduce (Patarasuk & Yuan 2009; Horovod, NCCL, Baidu).
The functions work on 1-D numpy arrays, or on device arrays when the MPI is CUDA-aware.
"""
from __future__ import annotations

from typing import Any, Callable

from mpi4py import MPI

from .dtypes import DType
from .ops import reduce_into

TAG_RS, TAG_AG = 101, 102


def chunk_bounds(length: int, n: int) -> list[tuple[int, int]]:
    """Split range(length) into n contiguous chunks; the first length % n chunks get one more."""
    base, extra = divmod(length, n)
    bounds, start = [], 0
    for i in range(n):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def empty_like(n: int, a: Any) -> Any:
    """An uninitialised 1-D array of n elements, of a's kind, dtype and device."""
    if hasattr(a, "new_empty"):
        return a.new_empty(n)  # torch
    mod = __import__(type(a).__module__.split(".")[0])  # numpy or cupy
    return mod.empty(n, dtype=a.dtype)


Scratch = Callable[[int, Any], Any]  # (n, like) -> a 1-D buffer of n elements of like's dtype


def pieces(send: tuple[int, int], recv: tuple[int, int], segment: int, longest: int) -> list[tuple[int, int, int, int]]:
    """(send start, send stop, recv start, recv stop) of each piece when one step is cut into segments.

    `longest` is the longest chunk of all, so that every rank cuts every step into the same number
    of pieces (the k-th piece sent is the k-th piece its neighbour receives); chunks differ in length
    by up to one element, and a piece past a chunk's end is empty there.
    segment <= 0: the whole step in one piece.
    """
    (s0, s1), (r0, r1) = send, recv
    if segment <= 0 or longest <= segment:
        return [(s0, s1, r0, r1)]
    return [(min(s0 + off, s1), min(s0 + off + segment, s1), min(r0 + off, r1), min(r0 + off + segment, r1))
            for off in range(0, longest, segment)]


def reduce_scatter_inplace(work: Any, comm: MPI.Comm, op: str, dtype: DType,
                           bounds: list[tuple[int, int]] | None = None, scratch: Scratch | None = None,
                           segment: int = 0) -> tuple[int, int]:
    """Ring reduce-scatter over `work`; afterwards work[start:stop] of this rank's chunk is fully reduced.

    Rank r ends up owning chunk r of `bounds` (default chunk_bounds(len(work), size)); returns it.
    segment > 0: each step moves its chunk in pieces of that many elements, each added as soon as
    it arrives, while it is still in cache (one pass over memory instead of two).
    """
    n, r = comm.Get_size(), comm.Get_rank()
    bounds = chunk_bounds(len(work), n) if bounds is None else bounds
    if n == 1:
        return bounds[0]
    right, left = (r + 1) % n, (r - 1) % n
    longest = max(b - a for a, b in bounds)
    # one receive buffer for all steps (reused across calls when the caller keeps one)
    tmp = (scratch or empty_like)(min(longest, segment) if segment > 0 else longest, work)
    for step in range(n - 1):
        # step s: pass our partial sum of chunk r-s-1 to the right; take the left's partial of
        # chunk r-s-2 and add our own elements to it. After n-1 steps chunk r has every rank's term.
        send, recv = bounds[(r - step - 1) % n], bounds[(r - step - 2) % n]
        for s0, s1, r0, r1 in pieces(send, recv, segment, longest):
            incoming = tmp[: r1 - r0]
            comm.Sendrecv(work[s0:s1], dest=right, sendtag=TAG_RS, recvbuf=incoming, source=left, recvtag=TAG_RS)
            reduce_into(work[r0:r1], incoming, op, dtype)
    return bounds[r]


def allgather_inplace(work: Any, comm: MPI.Comm, bounds: list[tuple[int, int]] | None = None) -> None:
    """Ring all-gather: each rank starts with its chunk r of `work` and ends with every chunk."""
    n, r = comm.Get_size(), comm.Get_rank()
    if n == 1:
        return
    bounds = chunk_bounds(len(work), n) if bounds is None else bounds
    right, left = (r + 1) % n, (r - 1) % n
    for step in range(n - 1):
        # step s: forward chunk r-s (ours at s=0, then the one just received) to the right,
        # and receive chunk r-s-1 from the left straight into its place
        s0, s1 = bounds[(r - step) % n]
        r0, r1 = bounds[(r - step - 1) % n]
        comm.Sendrecv(work[s0:s1], dest=right, sendtag=TAG_AG, recvbuf=work[r0:r1], source=left, recvtag=TAG_AG)


def allreduce_inplace(work: Any, comm: MPI.Comm, op: str, dtype: DType, scratch: Scratch | None = None,
                      segment: int = 0) -> None:
    """Ring all-reduce = ring reduce-scatter (in pieces of `segment` elements), then ring all-gather."""
    reduce_scatter_inplace(work, comm, op, dtype, scratch=scratch, segment=segment)
    allgather_inplace(work, comm)
