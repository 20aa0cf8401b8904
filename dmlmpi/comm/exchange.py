"""Small all-reduces through one shared area, in one barrier that is also the guard's check.

A small all-reduce is all latency, and dmlmpi's guard adds a collective of its own in front of
MPI's. On ranks that share a node the two become one barrier. Each rank copies its input into its
row of an area of shared memory (an MPI-3 shared window kept with the communicator) and the hash of
its call signature into its header slot, and enters a barrier. When the barrier returns every row
and every header is written; each rank compares the n headers (if they differ, every rank raises
before reading a row), then:

- small messages are reduced whole by every rank: each combines all n rows in one order that the
  plan fixes for all ranks (identical bits everywhere); one barrier in all;
- larger ones by columns: each rank reduces 1/n of the columns into a shared result row, a second
  barrier, and every rank copies the result row out (each rank reads about 2x the message, not n x).

Every guarded collective on such a communicator checks its signature the same way, with or without
data (guard.py), so ranks that disagree about a call (one posting a small message, another a large
one) meet in the same barrier and all raise.

Two sets of headers and rows alternate between calls, so a rank may write call k+1's input while a
slower one still reads call k's: call k+1's barrier cannot complete before every rank has entered
it, that is, before every rank is done with call k, and only then may anyone overwrite call k's set.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from .dtypes import DType
from .ops import divide_in_place, reduce_into

ALIGN = 64  # bytes: every row starts on a cache line of its own
_UFUNCS = {"sum": np.add, "avg": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}
_NUMPY_DTYPES = frozenset({"float32", "float64", "int32", "int64"})  # reduced by numpy ufuncs; 16-bit floats by torch


@dataclass(slots=True)
class Plan:
    """Everything one kind of call (parity, byte count, dtype, op) needs, made once: views and the reduction."""

    mine: np.ndarray  # this rank's input row
    result: np.ndarray  # the result row (used by calls reduced by columns)
    whole: bool  # every rank reduces the whole message (else its share of the columns)
    share_out: np.ndarray  # where a share's reduction goes: the result row's columns first:end
    # the reduction (_reduce_rows): every row (whole) or this rank's share of every row, combined by op
    rows: np.ndarray  # (n, columns)
    row_list: tuple[np.ndarray, ...]  # the same rows one by one (indexing them per call costs)
    ufunc: Any  # numpy's ufunc for op; None for 16-bit floats, which torch reduces (ops.reduce_into)
    one_call: bool  # reduce all rows in one numpy call (many short rows) rather than row by row
    pairs: tuple[np.ndarray, ...] | None  # 4 short rows: rows 0-1, rows 2-3, a private (2, columns) scratch, its 2 rows
    op: str
    dtype: DType


@dataclass
class Exchange:
    """A node communicator's shared area: per parity, n header slots, n input rows and one result row."""

    win: MPI.Win
    comm: MPI.Comm  # the node communicator (the caller's ranks, in the caller's order)
    capacity: int  # bytes per row: the largest message that goes through the area
    whole_bytes: int  # messages up to this size are reduced whole by every rank, larger ones by columns
    area: np.ndarray  # the whole window as bytes: per parity [headers, row 0..n-1, result row]
    headers: tuple[np.ndarray, np.ndarray]  # per parity, n int64 header slots (views of area)
    rows: tuple[np.ndarray, np.ndarray]  # per parity, the n input rows and the result row, (n + 1, capacity) bytes
    rank: int = 0
    size: int = 1
    calls: int = 0  # synchronizations completed so far; its parity picks the set of headers and rows
    _plans: dict[tuple[int, int, str], tuple[Plan, Plan]] = field(default_factory=dict)

    def plans(self, nbytes: int, dtype: DType, op: str) -> tuple[Plan, Plan]:
        """The Plans, one per parity, of a call of nbytes of `dtype` reduced by op (made on first use).

        Callers that make one kind of call often keep the pair and pass it to allreduce (collectives.HostCall).
        """
        key = (nbytes, dtype.code, op)
        found = self._plans.get(key)
        if found is None:
            found = (self._make_plan(0, nbytes, dtype, op), self._make_plan(1, nbytes, dtype, op))
            if len(self._plans) > 256:  # many distinct sizes: start over rather than grow without end
                self._plans.clear()
            self._plans[key] = found
        return found

    def _make_plan(self, parity: int, nbytes: int, dtype: DType, op: str) -> Plan:
        """Build the views and choices for one kind of call."""
        n, r, storage = self.size, self.rank, dtype.storage
        every = self.rows[parity][:, :nbytes].view(storage)
        rows, result = every[:n], every[n]
        length = nbytes // storage.itemsize
        # this rank's share of the columns, as ring.chunk_bounds splits them
        first, end = length * r // n, length * (r + 1) // n
        whole = nbytes <= self.whole_bytes
        columns = length if whole else end - first
        reduced = rows if whole else rows[:, first:end]
        # numpy reduces over the outer axis poorly for long rows, and a chain of calls costs more
        # Python than it saves for many short ones; 4 short rows take two calls in pairs, (0 op 2) op
        # (1 op 3): 0.63 against 0.96 us for one call at 4 KiB (~0.3 us of numpy's overhead per call)
        pairs = None
        if n == 4 and columns < 16384:
            scratch = np.empty((2, columns), storage)
            pairs = (reduced[:2], reduced[2:], scratch, scratch[0], scratch[1])
        return Plan(rows[r], result, whole, result[first:end], reduced, tuple(reduced),
                    _UFUNCS[op] if dtype.name in _NUMPY_DTYPES else None, n > 2 and columns < 16384, pairs, op, dtype)


def allocate(node: MPI.Comm, capacity: int, whole_bytes: int) -> Exchange:
    """The shared area for messages of up to `capacity` bytes on the node communicator `node` (collective)."""
    capacity = -(-capacity // ALIGN) * ALIGN
    n = node.Get_size()
    header = -(-8 * n // ALIGN) * ALIGN
    per_parity = header + (n + 1) * capacity
    # one segment, on node rank 0, holds every row: one strided view then covers all of them, and a
    # reduction over the ranks is one numpy call (pages are placed where they are first written)
    win = MPI.Win.Allocate_shared(2 * per_parity if node.Get_rank() == 0 else 0, 1, comm=node)
    buf, _ = win.Shared_query(0)
    area = np.frombuffer(buf, dtype=np.uint8, count=2 * per_parity)
    sets = [area[p * per_parity:(p + 1) * per_parity] for p in (0, 1)]
    headers = tuple(s[:8 * n].view(np.int64) for s in sets)
    rows = tuple(s[header:].reshape(n + 1, capacity) for s in sets)
    # one passive-target epoch for the window's whole life: win.Sync() is then legal at any time
    win.Lock_all(MPI.MODE_NOCHECK)
    return Exchange(win, node, capacity, whole_bytes, area, headers, rows, node.Get_rank(), n)  # type: ignore[arg-type]


def fence(ex: Exchange) -> None:
    """Make every rank's stores so far visible to every rank (MPI-3 shared-memory model)."""
    # flush our stores, wait for everyone, then see everyone's
    ex.win.Sync()
    ex.comm.Barrier()
    ex.win.Sync()


def agree(ex: Exchange, signature_hash: int) -> bool:
    """The guard's check alone: post this rank's signature hash, fence, compare all n; then advance."""
    headers = ex.headers[ex.calls & 1]
    headers[ex.rank] = signature_hash
    fence(ex)
    ex.calls += 1  # the headers are read below: the next call posts to the other set
    return headers.tolist().count(signature_hash) == ex.size


def _reduce_rows(plan: Plan, out: np.ndarray) -> None:
    """out = plan.rows[0] op plan.rows[1] op ..., in an order fixed by the plan (so every rank gets the same bits)."""
    fn = plan.ufunc
    if fn is None:  # 16-bit floats: torch's kernels
        out[:] = plan.row_list[0]
        for row in plan.row_list[1:]:
            reduce_into(out, row, plan.op, plan.dtype)
    elif plan.pairs is not None:
        top, bottom, scratch, first, second = plan.pairs
        # out= by keyword: numpy deprecates a positional output for maximum and minimum
        fn(top, bottom, out=scratch)  # rows 0 op 2 and 1 op 3, in one call
        fn(first, second, out=out)
    elif plan.one_call:
        fn.reduce(plan.rows, axis=0, out=out)
    else:
        rows = plan.row_list
        fn(rows[0], rows[1], out=out)
        for row in rows[2:]:
            fn(out, row, out=out)


def allreduce(ex: Exchange, data: np.ndarray, op: str, dtype: DType, signature_hash: int | None,
              plans: tuple[Plan, Plan] | None = None) -> bool:
    """All-reduce the 1-D host array `data` in place (avg divided once per element).

    signature_hash: the guard's hash of this call, checked in the same barrier (None: guard off).
    plans: ex.plans(data.nbytes, dtype, op), if the caller keeps them.
    Returns False, having reduced nothing, when the ranks' hashes differ (on every rank alike).
    """
    plan = (plans or ex.plans(data.nbytes, dtype, op))[ex.calls & 1]
    headers = ex.headers[ex.calls & 1]
    plan.mine[:] = data  # our input where every rank can read it
    if signature_hash is not None:
        headers[ex.rank] = signature_hash
    # 1. every rank's row and header are in place after the fence (fence(), inlined: this path is all latency)
    ex.win.Sync()
    ex.comm.Barrier()
    ex.win.Sync()
    if signature_hash is not None and headers.tolist().count(signature_hash) != ex.size:
        ex.calls += 1  # as on every rank: they all read the same headers
        return False
    if plan.whole:
        # 2. every rank reduces the whole message itself
        _reduce_rows(plan, data)
        ex.calls += 1  # this call's set is read: the next call writes the other one
        if op == "avg":
            divide_in_place(data, ex.size, dtype)
        return True
    # 2. our share of the columns, reduced over the ranks into the result row
    _reduce_rows(plan, plan.share_out)
    if op == "avg":
        divide_in_place(plan.share_out, ex.size, dtype)
    # 3. every share is reduced
    fence(ex)
    # 4. everybody's shares, in one copy
    data[:] = plan.result
    ex.calls += 1
    return True


def post_blocks(ex: Exchange, send: np.ndarray, counts: list[int], signature_hash: int | None, offer: bool = True) -> list[list[int]] | None:
    """All-to-all's first step: post this rank's row counts (and, if offer, its rows when they fit) and its hash, fence.

    Returns every rank's posted counts as n lists of n + 1 integers (list j: rank j's rows for each
    rank, then 1 if rank j's blocks are in its row), or None when the hashes differ (every rank
    alike). The set stays this call's until take_blocks or advance: until then no rank may post again.
    """
    n = ex.size
    parity = ex.calls & 1
    row, head = ex.rows[parity][ex.rank], 8 * (n + 1)
    nbytes = send.nbytes
    fits = offer and head + nbytes <= ex.capacity
    meta = row[:head].view(np.int64)
    meta[:n] = counts
    meta[n] = int(fits)
    if fits:
        row[head:head + nbytes] = send  # our blocks, one after another, where every rank can read them
    if signature_hash is not None:
        ex.headers[parity][ex.rank] = signature_hash
    # every rank's counts (and blocks) and header are in place after the fence
    fence(ex)
    if signature_hash is not None and ex.headers[parity].tolist().count(signature_hash) != n:
        ex.calls += 1
        return None
    # as Python integers: a few numpy scalar operations on them would cost more than the copies
    return ex.rows[parity][:n, :head].view(np.int64).tolist()


def take_blocks(ex: Exchange, table: list[list[int]], unit: int, out: np.ndarray, at: list[int]) -> None:
    """All-to-all's second step, when every rank's blocks were posted: copy block `rank` of each rank's row into out."""
    r = ex.rank
    rows, head = ex.rows[ex.calls & 1], 8 * (ex.size + 1)
    for j, counts in enumerate(table):
        start = head + sum(counts[:r]) * unit
        size = counts[r] * unit
        out[at[j]:at[j] + size] = rows[j, start:start + size]
    advance(ex)


def advance(ex: Exchange) -> None:
    """This call is done with its set of rows: the next call posts to the other one."""
    ex.calls += 1
