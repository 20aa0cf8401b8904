"""Cross-rank consistency guard: every rank checks that all ranks entered the same collective.

Before a collective, ranks compare a 64-bit hash of their call signature (signature_hash). Ranks
that share a node (a communicator with an exchange area) write it into their header slot of shared
memory, pass a barrier and read everyone's (exchange.py; a small all-reduce's data rides along in
the same step).
Other communicators all-reduce (MAX) the hash next to its bitwise complement, which gives the hash's
maximum and minimum in one message of two integers. If the ranks disagree they then gather everyone's
signature (this path only runs on error) and every rank raises the same CollectiveMismatchError
naming the ranks and what differs. MPI itself would hang, fail with a truncation error on some
ranks only, or silently return garbage instead.

Equal signatures always hash equal; two different ones collide with probability about 2**-64 (a
tuple of integers hashes the same way in every process of one Python version, whatever
PYTHONHASHSEED says: only str and bytes hashes are salted).
"""
from __future__ import annotations

from array import array
from typing import NoReturn

from mpi4py import MPI

from . import exchange
from .context import Context
from .dtypes import BY_CODE, RAW_BYTES
from .ops import OP_CODES

FIELDS = ("collective", "length", "dtype", "op", "algorithm", "root", "call number", "buffer")
COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "broadcast", "allreduce_fused", "broadcast_fused", "adasum",
               "alltoall")
ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "none", "shm", "pairwise")


class CollectiveMismatchError(RuntimeError):
    """Ranks entered a collective with different arguments (or in a different order)."""


CALL = FIELDS.index("call number")  # the one field that changes from call to call
_COLLECTIVE_CODES = {name: i + 1 for i, name in enumerate(COLLECTIVES)}
_ALGORITHM_CODES = {name: i + 1 for i, name in enumerate(ALGORITHMS)}


def signature(collective: str, length: int, dtype_code: int, op: str | None, algorithm: str,
              root: int, call: int, shared: bool = False) -> tuple[int, ...]:
    """The integers that must agree across ranks for one collective call.

    shared: the buffer lives in a dmlmpi shared-memory window (those are reduced where they lie,
    others are staged, so all ranks must agree on it).
    """
    return (_COLLECTIVE_CODES[collective], length, dtype_code, OP_CODES[op] if op else 0,
            _ALGORITHM_CODES[algorithm], root, call, int(shared))


def kind_hash(sig: tuple[int, ...]) -> int:
    """The hash of a signature without its call number: what every call of one kind shares."""
    return hash(sig[:CALL] + sig[CALL + 1:])


def signature_hash(sig: tuple[int, ...]) -> int:
    """The 64-bit value that ranks compare: kind_hash XOR the call number.

    Split so that a hot path can hash a kind of call once and pay one XOR per call (collectives.py).
    """
    return kind_hash(sig) ^ sig[CALL]


def _describe(value: int, name: str) -> str:
    """A field value in words."""
    if name == "collective":
        return COLLECTIVES[value - 1]
    if name == "dtype":
        return BY_CODE[value].name if value in BY_CODE else RAW_BYTES.name if value == RAW_BYTES.code else str(value)
    if name == "op":
        return {v: k for k, v in OP_CODES.items()}.get(value, "none")
    if name == "algorithm":
        return ALGORITHMS[value - 1]
    if name == "buffer":
        return "in a shared window" if value else "private"
    return str(value)


def _rank_list(ranks: list[int]) -> str:
    """'rank 3' or 'ranks 0,1,2'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def mismatch_message(signatures: list[tuple[int, ...]]) -> str:
    """Name every field on which ranks differ, with which ranks hold which value."""
    parts = []
    for i, name in enumerate(FIELDS):
        values = [s[i] for s in signatures]
        if len(set(values)) > 1:
            groups: dict[int, list[int]] = {}
            for rank, v in enumerate(values):
                groups.setdefault(v, []).append(rank)
            parts.append(f"{name}: " + "; ".join(f"{_rank_list(r)} {_describe(v, name)}" for v, r in groups.items()))
    return "ranks entered a collective with different arguments -- " + " | ".join(parts)


def agree(ctx: Context, sig: tuple[int, ...]) -> bool:
    """One synchronizing step after which every rank knows whether all ranks passed the same signature."""
    h = signature_hash(sig)
    if ctx.exchange is not None:
        # through shared memory: header slots and a barrier (cheaper than an all-reduce here)
        return exchange.agree(ctx.exchange, h)
    # two int64 kept with the communicator (building them per call costs more)
    high, low = extremes(ctx.comm, h, ctx.guard_pair)
    return high == low


def extremes(comm: MPI.Comm, value: int, pair: array | None = None) -> tuple[int, int]:
    """The largest and smallest of every rank's 64-bit `value`, in one small all-reduce (collective).

    pair: an array("q") of two to use as the message (a new one if None).
    """
    pair = array("q", (0, 0)) if pair is None else pair
    # the complement ~v = -v - 1 reverses the order like negation, but fits in 64 bits for every v
    # (-v overflows for v = -2**63)
    pair[0], pair[1] = value, ~value
    # the max of the values and the max of their complements (= ~min)
    comm.Allreduce(MPI.IN_PLACE, pair, op=MPI.MAX)
    return pair[0], ~pair[1]


def mismatch(ctx: Context, sig: tuple[int, ...]) -> NoReturn:
    """Raise CollectiveMismatchError naming who differs and how (collective: every rank found the mismatch)."""
    # error path only: gather all signatures so the message can say who differs and how
    signatures = ctx.comm.allgather(sig)
    raise CollectiveMismatchError(f"dmlmpi.comm ({COLLECTIVES[sig[0] - 1]} on rank {ctx.comm.Get_rank()} of "
                                  f"{ctx.comm.Get_size()}): {mismatch_message(signatures)}")


def check(ctx: Context, sig: tuple[int, ...]) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks passed the same signature."""
    if not agree(ctx, sig):
        mismatch(ctx, sig)
