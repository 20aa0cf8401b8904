"""All-to-all personalized exchange (Horovod's `alltoall`): block i of rank r's rows goes to rank i.

    out = comm.alltoall(x)                          # dimension 0 split into n equal blocks
    out, received = comm.alltoall(x, splits=[...])  # block i is splits[i] rows; received[i] came from rank i

The rows of one block stay together and in order; the output holds the blocks received, in rank
order. Rows may differ in number from rank to rank and from block to block (the pattern of expert
routing), but every rank's rows must have the same shape and dtype. A call has two steps:

1. counts: every rank learns how many rows each other rank sends it (a rank whose `splits` are bad
   sends -1 instead, so every rank raises, none hangs). On ranks of one node they go through the
   exchange area (exchange.py) in the fence that is also the guard's check, and with "auto" small
   blocks ride along, so the call is done in that one fence; elsewhere the guard's own step comes
   first, then one MPI_Alltoall of n integers;
2. data: the blocks themselves, as bytes, with MPI_Alltoallv ("mpi", and "auto" beyond the area)
   or as n-1 pairwise exchanges ("pairwise": at step k, send to rank r+k and receive from rank
   r-k, each a single MPI_Sendrecv, so that every rank talks to one peer at a time).

The guard checks that every rank entered alltoall with the same row width (its "length" field),
dtype and algorithm. GPU buffers go to MPI directly when it is CUDA-aware and through host memory
otherwise, as in the other collectives.
"""
from __future__ import annotations

import math
from itertools import accumulate
from typing import Any, Sequence

import numpy as np

from . import exchange
from . import guard as _guard
from .buffers import Flat, dtype_of, kind_of, to_flat, to_result, write_back
from .collectives import _comm, _enter, _signature
from .context import context
from .ring import empty_like
from .select import ALLTOALL_AREA_BYTES, ring_threshold

ALGORITHMS = ("auto", "mpi", "pairwise")


def pairwise_steps(n: int, rank: int) -> list[tuple[int, int]]:
    """(send to, receive from) of each of the n-1 steps of the pairwise exchange."""
    return [((rank + k) % n, (rank - k) % n) for k in range(1, n)]


def displacements(counts: Sequence[int]) -> list[int]:
    """Where each block starts when blocks of these sizes lie one after another."""
    # plain Python: for a few counts, numpy's cumsum costs more than the call's messages
    return list(accumulate(counts[:-1], initial=0)) if len(counts) else []


def check_splits(splits: Sequence[int] | None, rows: int, n: int) -> tuple[list[int], str | None]:
    """The rows sent to each rank, and what is wrong with `splits` (None when nothing is)."""
    if splits is None:
        if rows % n:
            return [-1] * n, f"{rows} rows do not split into {n} equal blocks (pass splits)"
        return [rows // n] * n, None
    counts = [int(s) for s in splits]
    if len(counts) != n:
        return [-1] * n, f"splits has {len(counts)} entries for a {n}-rank communicator"
    if any(c < 0 for c in counts):
        return [-1] * n, f"splits {counts} has a negative entry"
    if sum(counts) != rows:
        return [-1] * n, f"splits {counts} add up to {sum(counts)}, but dimension 0 has {rows} rows"
    return counts, None


def _bytes(a: Any) -> Any:
    """The same memory as a flat array of bytes (numpy, torch or CuPy)."""
    if hasattr(a, "new_empty"):  # torch
        import torch

        return a.view(torch.uint8)
    return a.view(np.uint8) if isinstance(a, np.ndarray) else a.view(__import__("cupy").uint8)


def alltoall(x: Any, splits: Sequence[int] | None = None, algorithm: str = "auto", comm: Any = None,
             guard: bool | None = None, out: Any = None) -> Any:
    """Send block i of x's rows to rank i; return the blocks received in rank order (and their sizes, with splits).

    out: where to write them (x's kind, device and dtype; as many rows as arrive), instead of new memory.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"dmlmpi.comm.alltoall: unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    dtype = dtype_of(x)
    ctx = context(_comm(comm))
    n, r = ctx.size, ctx.rank
    shape = tuple(x.shape) or (1,)
    row = math.prod(shape[1:])
    unit = row * dtype.storage.itemsize  # bytes per row
    counts, problem = check_splits(splits, shape[0], n)
    flat = to_flat(x, copy=False, dtype=dtype)
    send = _bytes(flat.data)
    posted = False
    if ctx.exchange is not None:
        # 1. counts, on one node: through the exchange area, in one fence with the guard's check; with
        # "auto" the blocks ride along when they fit
        sig = _signature(ctx, guard, "alltoall", row, dtype, None, algorithm)
        table = exchange.post_blocks(ctx.exchange, send, counts, None if sig is None else _guard.signature_hash(sig),
                                     offer=algorithm == "auto" and isinstance(send, np.ndarray)
                                     and send.nbytes <= ring_threshold(n, ALLTOALL_AREA_BYTES))
        if table is None:
            _guard.mismatch(ctx, sig)  # type: ignore[arg-type]  # every rank found it
        got = [t[r] for t in table]
        posted = all(t[n] for t in table)
        if not posted:
            exchange.advance(ctx.exchange)  # the blocks go by MPI below: the area is free for the next call
    else:
        # guard: every rank entered alltoall with the same row width, dtype and algorithm
        _enter(ctx, guard, "alltoall", row, dtype, None, algorithm)
        # 1. counts: rows to each rank out, rows from each rank in (-1: that rank's splits are bad)
        incoming = np.empty(n, dtype=np.int64)
        ctx.comm.Alltoall(np.array(counts, dtype=np.int64), incoming)
        got = incoming.tolist()
    bad = [i for i in range(n) if got[i] < 0]
    if problem is not None or bad:
        if posted:
            exchange.advance(ctx.exchange)
        if problem is not None:
            raise ValueError(f"dmlmpi.comm.alltoall on rank {r}: {problem}")
        raise ValueError(f"dmlmpi.comm.alltoall on rank {r}: rank(s) {bad} passed splits that do not fit their "
                         f"input (their error says how); nothing was sent")
    total = sum(got)
    target, unfit = _target(out, x, dtype, (total,) + shape[1:])
    into = target.data if target is not None else empty_like(total * row, flat.data)
    recv = _bytes(into)
    s_count, r_count = [c * unit for c in counts], [c * unit for c in got]
    s_at, r_at = displacements(s_count), displacements(r_count)
    if posted:
        # 2. data, on one node: block r of every rank's posted row, straight into ours
        exchange.take_blocks(ctx.exchange, table, unit, recv, r_at)
        return _result(flat, into, target, out, unfit, splits, got)
    # our own block: a local copy, no message
    recv[r_at[r]:r_at[r] + r_count[r]] = send[s_at[r]:s_at[r] + s_count[r]]
    if n > 1 and algorithm == "pairwise":
        for to, source in pairwise_steps(n, r):
            # 2. data, one step: our block for `to` out, `source`'s block for us in
            ctx.comm.Sendrecv(send[s_at[to]:s_at[to] + s_count[to]], to, 7,
                              recv[r_at[source]:r_at[source] + r_count[source]], source, 7)
    elif n > 1:
        # 2. data: every other rank's block in one MPI_Alltoallv (our own block as 0 bytes: copied above;
        # Ialltoallv with the copy made while the blocks travel measured the same, 50 us at 2 ranks and 1 MiB)
        s_count[r] = r_count[r] = 0
        ctx.comm.Alltoallv([send, (s_count, s_at)], [recv, (r_count, r_at)])
    return _result(flat, into, target, out, unfit, splits, got)


def _target(out: Any, x: Any, dtype: Any, shape: tuple[int, ...]) -> tuple[Flat | None, str | None]:
    """The caller's `out` as a flat receive buffer (None without one), and why it cannot take the result (None if it can)."""
    if out is None:
        return None, None
    try:
        kind, got = kind_of(out), dtype_of(out)
    except (TypeError, ValueError) as exc:
        return None, f"out cannot hold the result ({exc})"
    if kind != kind_of(x) or got != dtype or tuple(out.shape) != shape:
        return None, f"out is a {kind} {got.name} array of shape {tuple(out.shape)}, but {shape} of {dtype.name} arrived"
    return to_flat(out, copy=False, dtype=dtype), None


def _result(flat: Flat, into: Any, target: Flat | None, out: Any, unfit: str | None,
            splits: Sequence[int] | None, got: list[int]) -> Any:
    """The output (`out` itself when given), with the received sizes when the caller passed splits (Horovod's convention).

    A bad `out` is reported only now, after the exchange, so that the other ranks do not wait for this one forever.
    """
    if unfit is not None:
        raise ValueError(f"dmlmpi.comm.alltoall: {unfit} (the exchange completed; the result is dropped)")
    result = write_back(target, out) if target is not None else to_result(flat, into, (sum(got),) + flat.shape[1:])
    return result if splits is None else (result, got)
