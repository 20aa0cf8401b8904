"""Cross-rank consistency guard: every rank checks that all ranks entered the same collective.

Before a collective, ranks all-reduce (MAX) their call signature next to its negation, which gives
each field's maximum and minimum in one small message. If any field's max differs from its min the
ranks disagree: they then gather everyone's signature (this path only runs on error) and every rank
raises the same CollectiveMismatchError naming the ranks and what differs. MPI itself would hang,
fail with a truncation error on some ranks only, or silently return garbage instead.
"""
from __future__ import annotations

import os

import numpy as np
from mpi4py import MPI

from .context import Context
from .dtypes import BY_CODE
from .ops import OP_CODES

FIELDS = ("collective", "length", "dtype", "op", "algorithm", "root", "call number")
COLLECTIVES = ("allreduce", "reduce_scatter", "allgather", "broadcast", "allreduce_fused")
ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "none")


class CollectiveMismatchError(RuntimeError):
    """Ranks entered a collective with different arguments (or in a different order)."""


def enabled(guard: bool | None) -> bool:
    """The guard setting: the call's own, else DMLMPI_GUARD (default on; 0/false/off disables)."""
    if guard is not None:
        return guard
    return os.environ.get("DMLMPI_GUARD", "1").strip().lower() not in ("0", "false", "off", "no")


def signature(collective: str, length: int, dtype_code: int, op: str | None, algorithm: str,
              root: int, call: int) -> np.ndarray:
    """The integers that must agree across ranks for one collective call."""
    return np.array([COLLECTIVES.index(collective) + 1, length, dtype_code,
                     OP_CODES.get(op or "", 0), ALGORITHMS.index(algorithm) + 1, root, call], dtype=np.int64)


def _describe(value: int, name: str) -> str:
    """A field value in words."""
    if name == "collective":
        return COLLECTIVES[value - 1]
    if name == "dtype":
        return BY_CODE[value].name if value in BY_CODE else str(value)
    if name == "op":
        return {v: k for k, v in OP_CODES.items()}.get(value, "none")
    if name == "algorithm":
        return ALGORITHMS[value - 1]
    return str(value)


def _rank_list(ranks: list[int]) -> str:
    """'rank 3' or 'ranks 0,1,2'."""
    return ("rank " if len(ranks) == 1 else "ranks ") + ",".join(map(str, ranks))


def mismatch_message(signatures: list[list[int]]) -> str:
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


def check(ctx: Context, sig: np.ndarray) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks passed the same signature."""
    both = np.concatenate([sig, -sig])
    # one small collective: the max of each field and the max of its negation (= -min)
    ctx.comm.Allreduce(MPI.IN_PLACE, both, op=MPI.MAX)
    k = len(sig)
    if np.array_equal(both[:k], -both[k:]):
        return
    # error path only: gather all signatures so the message can say who differs and how
    signatures = ctx.comm.allgather(sig.tolist())
    raise CollectiveMismatchError(f"dmlmpi.comm ({sig_name(sig)} on rank {ctx.comm.Get_rank()} of "
                                  f"{ctx.comm.Get_size()}): {mismatch_message(signatures)}")


def sig_name(sig: np.ndarray) -> str:
    """The collective's name from its signature."""
    return COLLECTIVES[int(sig[0]) - 1]
