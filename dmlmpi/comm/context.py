"""Per-communicator state kept with the communicator itself, through MPI attribute caching.

dmlmpi talks on a private duplicate of the user's communicator (so its messages can never match
the user's own), counts the collectives made on it (for the guard's call-order check), and keeps
the node split that hierarchical all-reduce needs. MPI's attribute cache ties all of this to the
communicator's lifetime without a module-level registry.
"""
from __future__ import annotations

import os
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mpi4py import MPI

from . import exchange
from .ring import empty_like
from .select import (EXCHANGE_BYTES, EXCHANGE_WHOLE_BYTES, RING_MIN_BYTES_16BIT, SHM_MIN_BYTES, ring_segment_bytes,
                     ring_threshold)

_KEYVAL: list[int] = []  # the attribute key, created once per process on first use
# (communicator, Context) of the last call: most programs call dmlmpi on one communicator, and
# MPI_Comm_get_attr costs 0.3 us per call (about 1 us of a 2-rank 4 KiB all-reduce's time). One
# tuple, replaced whole, so that a thread never sees one communicator paired with another's Context.
_LAST: list[tuple[Any, Any]] = [(None, None)]


@dataclass
class Context:
    """dmlmpi's state for one user communicator."""

    comm: MPI.Comm  # private duplicate that carries dmlmpi traffic
    size: int = 1
    rank: int = 0
    calls: int = 0  # collectives entered so far on this communicator
    nodes: dict[int, tuple[MPI.Comm, MPI.Comm]] = field(default_factory=dict)  # ranks_per_node -> (local, leaders)
    # settings read from the environment once, when dmlmpi first uses the communicator
    # (an os.environ lookup per call would cost about a microsecond each)
    guard: bool = field(default_factory=lambda: _env_flag("DMLMPI_GUARD", True))
    ring_min_bytes: int = 0  # auto's ring/native crossover for this size (DMLMPI_RING_MIN_BYTES overrides)
    ring_min_bytes_16bit: int = 0  # the same for reductions of 16-bit floats (the same override)
    ring_segment_bytes: int = 0  # piece size of the ring's reduce-scatter steps (DMLMPI_RING_SEGMENT_BYTES)
    shm_min_bytes: int = 0  # smallest buffer in a shared window that auto reduces where it lies (DMLMPI_SHM_MIN_BYTES)
    buffers: dict[Any, Any] = field(default_factory=dict)  # reusable host buffers, by (purpose, dtype)
    node: Any = None  # the ranks of comm as one node communicator, for shared memory (made with the context)
    segments: dict[int, Any] = field(default_factory=dict)  # shared_empty windows, by this rank's address
    window_arrays: dict[int, Any] = field(default_factory=dict)  # id -> (numpy array, its window): found before
    staging: Any = None  # the shared window that other host buffers are staged through for "shm"
    exchange: Any = None  # exchange.Exchange: where small host all-reduces meet, when all ranks share a node
    host_calls: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # collectives.HostCall by kind of call
    guard_pair: array = field(default_factory=lambda: array("q", (0, 0)))  # the guard's message: hash, ~hash
    companions: dict[str, MPI.Comm] = field(default_factory=dict)  # purpose -> a duplicate of the user's comm

    def scratch(self, n: int, like: Any) -> Any:
        """A reusable uninitialised 1-D host buffer of n elements of like's dtype (grown on demand).

        Reusing it avoids mapping fresh pages (and taking their page faults) on every large call.
        """
        if not isinstance(like, np.ndarray):
            return empty_like(n, like)  # device memory: allocated per call by the array library
        key = ("scratch", like.dtype)
        buf = self.buffers.get(key)
        if buf is None or len(buf) < n:
            buf = self.buffers[key] = np.empty(n, dtype=like.dtype)
        return buf[:n]


def _env_flag(name: str, default: bool) -> bool:
    """A boolean environment setting: 0/false/off/no are false."""
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() not in ("0", "false", "off", "no")


def _env_int(name: str) -> int | None:
    """An integer environment setting, or None when unset."""
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def context(comm: MPI.Comm) -> Context:
    """The Context of `comm`, created (collectively: it duplicates comm) on first use."""
    last_comm, last_ctx = _LAST[0]
    if comm is last_comm and comm:  # the same live communicator as last time (a freed one is false)
        return last_ctx
    if not _KEYVAL:
        _KEYVAL.append(MPI.Comm.Create_keyval())
    ctx = comm.Get_attr(_KEYVAL[0])
    if ctx is None:
        size = comm.Get_size()
        override = _env_int("DMLMPI_RING_MIN_BYTES")
        shm_override = _env_int("DMLMPI_SHM_MIN_BYTES")
        segment = _env_int("DMLMPI_RING_SEGMENT_BYTES")
        ctx = Context(comm.Dup(), size, comm.Get_rank(),
                      ring_min_bytes=ring_threshold(size) if override is None else override,
                      ring_min_bytes_16bit=ring_threshold(size, RING_MIN_BYTES_16BIT) if override is None else override,
                      shm_min_bytes=ring_threshold(size, SHM_MIN_BYTES) if shm_override is None else shm_override,
                      # the world size stands in for ranks per node: a bigger world spread over
                      # nodes only loses the pieces, which is how every ring ran before them
                      ring_segment_bytes=ring_segment_bytes(size, os.cpu_count() or 1) if segment is None else segment)
        _share_node(ctx, _env_int("DMLMPI_EXCHANGE_BYTES"))
        comm.Set_attr(_KEYVAL[0], ctx)
    _LAST[0] = (comm, ctx)
    return ctx


def _share_node(ctx: Context, override: int | None) -> None:
    """Split ctx's ranks by node and, when one node holds them all (and more than one), make the exchange area (collective)."""
    # made here, when every rank creates the context together: made on first need, a rank whose
    # message is small would allocate (collectively) while one whose message is large would not
    ctx.node = ctx.comm.Split_type(MPI.COMM_TYPE_SHARED, key=ctx.rank)
    capacity = ring_threshold(ctx.size, EXCHANGE_BYTES) if override is None else override
    if ctx.size > 1 and ctx.node.Get_size() == ctx.size and capacity > 0:
        ctx.exchange = exchange.allocate(ctx.node, capacity, ring_threshold(ctx.size, EXCHANGE_WHOLE_BYTES))


def companion(comm: MPI.Comm, purpose: str) -> MPI.Comm:
    """A duplicate of `comm` kept for one purpose, made (collectively) on first use.

    Collectives on it can never interleave with those dmlmpi makes on comm from another thread
    (DataParallel's communication thread), which MPI would match in whatever order they came.
    """
    ctx = context(comm)
    made = ctx.companions.get(purpose)
    if made is None:
        made = ctx.companions[purpose] = comm.Dup()
    return made


def existing_comms(comm: MPI.Comm) -> list[MPI.Comm]:
    """The communicators dmlmpi made for `comm` so far (its duplicate, node splits); creates nothing."""
    ctx = comm.Get_attr(_KEYVAL[0]) if _KEYVAL else None
    if ctx is None:
        return []
    made = [ctx.comm] + [c for pair in ctx.nodes.values() for c in pair if c != MPI.COMM_NULL]
    made += [c for dup in ctx.companions.values() for c in [dup, *existing_comms(dup)]]
    return made + ([ctx.node] if ctx.node is not None else [])
