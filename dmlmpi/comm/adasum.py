"""Adasum (Maleki et al. 2021, Horovod's `op=hvd.Adasum`): combining gradients adaptively instead of summing them.

Two gradients a and b combine as

    adasum(a, b) = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b

which is a + b when they are orthogonal (independent information adds up) and their average when
they are equal (the same step twice would overshoot). n = 2^k ranks combine pairwise in a binary
tree: ranks 0+1, 2+3, ..., then (0+1)+(2+3), ... Like Horovod, each tensor gets its own dot product
and norms (a layer's gradient, not the whole model's).

The distributed algorithm halves the vector and doubles the distance: at level l rank r and its
partner r XOR 2^l each keep one half of the part they hold and swap the other, so each ends with
its half of both sides' vectors (a from the lower group, b from the upper). The per-tensor sums
a.b, |a|^2, |b|^2 over the whole tensors are the sums of the pieces that the 2^(l+1) ranks of the
group hold: recursive doubling adds them up, identically on every rank (IEEE addition commutes).
After k levels each rank holds 1/n of the result; one all-gather assembles it everywhere. Every
rank sends (n-1)/n of the vector in the halving and as much in the all-gather, as a ring
all-reduce does, plus k(k+1)/2 small messages of 3 numbers per tensor.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from .collectives import _begin, _numel

TAG = 0x6164  # the point-to-point messages of one Adasum call on dmlmpi's private communicator


def is_power_of_two(n: int) -> bool:
    """Whether n is 1, 2, 4, 8, ..."""
    return n > 0 and n & (n - 1) == 0


def coefficients(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per tensor, the factors of a and b: 1 - a.b / (2|a|^2) and 1 - a.b / (2|b|^2) from sums[t] = (a.b, |a|^2, |b|^2)."""
    dot, na, nb = sums[:, 0], sums[:, 1], sums[:, 2]
    # a zero vector contributes nothing whatever its factor: take 1 rather than divide by zero
    ca = np.where(na > 0, 1.0 - dot / (2.0 * np.where(na > 0, na, 1.0)), 1.0)
    cb = np.where(nb > 0, 1.0 - dot / (2.0 * np.where(nb > 0, nb, 1.0)), 1.0)
    return ca, cb


def segments(lo: int, hi: int, offsets: np.ndarray) -> list[tuple[int, int, int]]:
    """(tensor, start, stop) of every tensor's part inside [lo, hi), positions relative to lo."""
    starts = np.clip(offsets[:-1], lo, hi) - lo
    ends = np.clip(offsets[1:], lo, hi) - lo
    return [(int(t), int(starts[t]), int(ends[t])) for t in np.nonzero(ends > starts)[0]]


def piece_sums(a: np.ndarray, b: np.ndarray, parts: list[tuple[int, int, int]], tensors: int) -> np.ndarray:
    """(a.b, |a|^2, |b|^2) per tensor over its parts in this piece (dot products in a's dtype, summed as float64)."""
    sums = np.zeros((tensors, 3))
    for t, start, stop in parts:
        sa, sb = a[start:stop], b[start:stop]
        sums[t] = (np.dot(sa, sb), np.dot(sa, sa), np.dot(sb, sb))
    return sums


def combine_into(mine: np.ndarray, theirs: np.ndarray, mine_is_a: bool, sums: np.ndarray,
                 parts: list[tuple[int, int, int]]) -> None:
    """mine = adasum(a, b) in place, tensor by tensor (theirs is scaled in place too: it is scratch)."""
    ca, cb = coefficients(sums)
    for t, start, stop in parts:
        own, other = (ca[t], cb[t]) if mine_is_a else (cb[t], ca[t])
        m, o = mine[start:stop], theirs[start:stop]
        m *= own
        o *= other
        m += o


def reference(vectors: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray:
    """The binary-tree Adasum of n = 2^k vectors in one process (float64): what every rank should end with."""
    if not is_power_of_two(len(vectors)):
        raise ValueError(f"adasum: the number of vectors must be a power of two, got {len(vectors)}")
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    level = [np.array(v, dtype=np.float64) for v in vectors]
    parts = segments(0, int(offsets[-1]), offsets)
    while len(level) > 1:
        for a, b in zip(level[::2], level[1::2]):
            combine_into(a, b, True, piece_sums(a, b, parts, len(sizes)), parts)
        level = level[::2]
    return level[0]


def pieces(n: int, length: int) -> list[tuple[int, int]]:
    """The [lo, hi) of the result each of n = 2^k ranks holds after the halving (pure: the same on every rank)."""
    out = []
    for r in range(n):
        lo, hi, d = 0, length, 1
        while d < n:
            mid = lo + (hi - lo) // 2
            lo, hi = (lo, mid) if r & d == 0 else (mid, hi)
            d <<= 1
        out.append((lo, hi))
    return out


def _group_sum(sums: np.ndarray, comm: MPI.Comm, rank: int, group: int) -> np.ndarray:
    """Sum `sums` over the `group` ranks that share rank // group (recursive doubling; same bits everywhere)."""
    d = 1
    while d < group:
        theirs = np.empty_like(sums)
        # send/receive: this rank's running sum for the partner's, at distance d inside the group
        comm.Sendrecv(sums, dest=rank ^ d, sendtag=TAG, recvbuf=theirs, source=rank ^ d, recvtag=TAG)
        sums = sums + theirs  # commutative: both partners get the same bits
        d <<= 1
    return sums


def _working_copy(x: Any) -> tuple[np.ndarray, bool]:
    """A flat host float32/float64 array to work in, and whether it is x's own memory (nothing to copy back)."""
    if isinstance(x, np.ndarray):
        host = x
    elif hasattr(x, "detach") and not x.is_cuda:  # a CPU torch tensor: its numpy view, where numpy has the type
        import torch

        host = x.detach().numpy() if x.dtype in (torch.float32, torch.float64) else None
    else:
        host = None
    if host is not None and host.dtype in (np.float32, np.float64):
        # x's own memory when contiguous; a strided one (a clone keeps the strides) is copied
        return (host.reshape(-1), True) if host.flags.c_contiguous else (np.array(host, copy=True).reshape(-1), False)
    # 16-bit floats (as float32: exact) and device memory: a host copy
    if hasattr(x, "detach"):
        import torch

        wide = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.detach().reshape(-1).to(device="cpu", dtype=wide).numpy().copy(), False
    if isinstance(x, np.ndarray):
        return x.astype(np.float32).reshape(-1), False
    return np.asarray(x.ravel().get(), dtype=np.float64 if x.dtype == np.float64 else np.float32), False  # CuPy


def _into(x: Any, result: np.ndarray) -> None:
    """Write the result into x, in x's own dtype and device."""
    if isinstance(x, np.ndarray):
        x[...] = result.reshape(x.shape)
    elif hasattr(x, "detach"):
        import torch

        with torch.no_grad():
            x.copy_(torch.from_numpy(result).reshape(x.shape))
    else:
        import cupy

        x[...] = cupy.asarray(result).reshape(x.shape)


def adasum_allreduce(x: Any, sizes: Sequence[int] | None = None, comm: MPI.Comm | None = None,
                     inplace: bool = False, guard: bool | None = None) -> Any:
    """Adasum of every rank's `x` (a flat concatenation of tensors of `sizes` elements; default one tensor).

    The number of ranks must be a power of two (as in Horovod); every rank gets the same result,
    of x's kind, device and floating dtype; in place with inplace=True. float32 and float64 are
    combined in their own type (a CPU buffer in place: without a copy), 16-bit floats in float32.
    """
    ctx, dtype, _, _ = _begin(x, comm, guard, "adasum", None, "mpi")
    n, r = ctx.size, ctx.rank
    if not dtype.floating:
        raise TypeError(f"dmlmpi.comm.adasum_allreduce: Adasum combines floating-point gradients, not {dtype.name}")
    if not is_power_of_two(n):
        raise ValueError(f"dmlmpi.comm.adasum_allreduce: Adasum combines ranks in a binary tree and needs a "
                         f"power-of-two number of ranks, got {n}")
    length = _numel(x)
    sizes = [length] if sizes is None else list(sizes)
    if sum(sizes) != length or any(s < 0 for s in sizes):
        raise ValueError(f"dmlmpi.comm.adasum_allreduce: tensor sizes add up to {sum(sizes)}, "
                         f"not the {length} elements given")
    out = x if inplace else (x.clone() if hasattr(x, "clone") else x.copy())
    if n == 1:
        return out
    work, own = _working_copy(out)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    scratch = np.empty(length - length // 2, dtype=work.dtype)  # the partner's half, the largest piece received
    lo, hi, d = 0, length, 1
    while d < n:
        mid = lo + (hi - lo) // 2
        lower = r & d == 0  # this rank's vector is the lower group's (a) at this level
        keep, give = ((lo, mid), (mid, hi)) if lower else ((mid, hi), (lo, mid))
        theirs = scratch[:keep[1] - keep[0]]
        # send/receive: the half this rank gives up, for the partner's copy of the half it keeps
        ctx.comm.Sendrecv(work[give[0]:give[1]], dest=r ^ d, sendtag=TAG, recvbuf=theirs, source=r ^ d, recvtag=TAG)
        mine = work[keep[0]:keep[1]]
        parts = segments(keep[0], keep[1], offsets)
        a, b = (mine, theirs) if lower else (theirs, mine)
        # the whole tensors' dot products and norms: the group of 2d ranks holds them in pieces
        sums = _group_sum(piece_sums(a, b, parts, len(sizes)), ctx.comm, r, 2 * d)
        combine_into(mine, theirs, lower, sums, parts)
        lo, hi = keep
        d <<= 1
    # all-gather: each rank's piece of the result to every rank, in place
    bounds = pieces(n, length)
    mpi_type = MPI.DOUBLE if work.dtype == np.float64 else MPI.FLOAT
    ctx.comm.Allgatherv(MPI.IN_PLACE, [work, [b - a for a, b in bounds], [a for a, _ in bounds], mpi_type])
    if not own:
        _into(out, work)
    return out
