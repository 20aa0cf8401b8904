"""PowerSGD: gradients all-reduced as low-rank factors, with error feedback (Vogels et al. 2019).

A gradient matrix M (rows x cols; a convolution's weight is (out channels) x (the rest)) is sent
as two thin factors instead of itself: with a rank-r matrix Q (cols x r) kept from the last step,

    P = sum over ranks of M Q          (all-reduce rows x r)
    P = orthonormalize(P)
    Q = sum over ranks of M^T P        (all-reduce cols x r)
    M_hat = P Q^T                      (what every rank takes as the summed gradient)

one step of subspace (power) iteration, warm-started by the last step's Q. What a rank's M loses
to the projection (M - P P^T M) is kept and added to its next gradient (error feedback), so
nothing is dropped for good: summed over steps, the applied gradients plus the ranks' kept errors
equal the true gradients exactly. Vectors (biases), matrices whose factors would not be smaller
than the matrix, and tensors of other dtypes than float32/float64 are all-reduced whole.

With r >= min(rows, cols) and a full-rank Q, P spans the summed gradient's columns and M_hat is
the exact sum: the tests use that. The pure math is `factor_plan`, `orthonormalize`; `PowerSGD`
keeps each matrix's Q and error and runs the collectives for a DataParallel bucket.
"""
from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import allreduce_fused


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """t as rows x cols: dimension 0 against the rest (a view)."""
    return t.reshape(t.shape[0], -1)


def compressible(shape: tuple[int, ...], dtype: torch.dtype, rank: int) -> bool:
    """Whether a tensor goes as factors: a matrix (or more) whose two factors are smaller than it."""
    if len(shape) < 2 or dtype not in (torch.float32, torch.float64):
        return False
    rows = shape[0]
    cols = 1
    for d in shape[1:]:
        cols *= d
    return (rows + cols) * min(rank, rows, cols) < rows * cols


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning p's (reduced QR; columns of zeros stay zero)."""
    q, r = torch.linalg.qr(p, mode="reduced")
    # a column QR found no new direction for (its diagonal is ~0) carries no information: zero it,
    # so that P P^T projects onto the gradient's span and nothing else
    scale = p.abs().max().clamp_min(torch.finfo(p.dtype).tiny)
    keep = r.diagonal().abs() > scale * torch.finfo(p.dtype).eps * max(p.shape)
    return q * keep.to(q.dtype)


class PowerSGD:
    """Per-matrix state (Q, error) and the low-rank all-reduce of DataParallel buckets."""

    def __init__(self, rank: int, comm: MPI.Comm, seed: int = 0, warmup_steps: int = 0) -> None:
        if rank < 1:
            raise ValueError(f"PowerSGD: rank must be at least 1, got {rank}")
        if warmup_steps < 0:
            raise ValueError(f"PowerSGD: warmup_steps must not be negative, got {warmup_steps}")
        self.rank, self.comm, self.seed, self.warmup_steps = rank, comm, seed, warmup_steps
        self.q: dict[tuple[int, int], torch.Tensor] = {}  # (bucket, slot) -> cols x r, the same on every rank
        self.error: dict[tuple[int, int], torch.Tensor] = {}  # (bucket, slot) -> what this rank still owes
        self.calls: dict[int, int] = {}  # bucket -> reductions so far (the first warmup_steps go whole)

    def _q(self, key: tuple[int, int], cols: int, r: int, like: torch.Tensor) -> torch.Tensor:
        """The matrix's Q: random at first, drawn from (seed, key) so that every rank draws the same."""
        q = self.q.get(key)
        if q is not None and q.device != like.device:  # loaded from a checkpoint onto the host
            q = self.q[key] = q.to(like.device)
        if q is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + key[0] * 10_007 + key[1])
            q = self.q[key] = torch.randn(cols, r, generator=g, dtype=like.dtype).to(like.device)
        return q

    def reduce(self, index: int, slots: list[torch.Tensor], buffer: torch.Tensor, algorithm: str) -> None:
        """Sum bucket `index` over the ranks in place: matrices as factors, the rest whole."""
        calls = self.calls[index] = self.calls.get(index, 0) + 1
        if calls <= self.warmup_steps:
            dcomm.allreduce(buffer, op="sum", algorithm=algorithm, comm=self.comm, inplace=True)
            return
        low = [i for i, s in enumerate(slots) if compressible(tuple(s.shape), s.dtype, self.rank)]
        whole = [i for i in range(len(slots)) if i not in set(low)]
        if whole:  # vectors and small matrices: one all-reduce of them packed together
            allreduce_fused([slots[i] for i in whole], op="sum", algorithm=algorithm, comm=self.comm, inplace=True)
        if not low:
            return
        # this rank's matrices plus what it still owes from earlier steps (error feedback), in place
        ms = []
        for i in low:
            m = as_matrix(slots[i])
            err = self.error.get((index, i))
            if err is not None:
                if err.device != m.device:  # loaded from a checkpoint onto the host
                    err = self.error[(index, i)] = err.to(m.device)
                m.add_(err)
            ms.append(m)
        rs = [min(self.rank, *m.shape) for m in ms]
        qs = [self._q((index, i), m.shape[1], r, m) for i, m, r in zip(low, ms, rs)]
        # P = sum over ranks of M Q, every matrix's in one all-reduce
        ps = allreduce_fused([m @ q for m, q in zip(ms, qs)], op="sum", algorithm=algorithm, comm=self.comm,
                             inplace=True)
        bases = [orthonormalize(p) for p in ps]
        # Q = sum over ranks of M^T P, in one all-reduce (out of place: this rank's own stay for the error)
        mine = [m.T @ p for m, p in zip(ms, bases)]
        qsums = allreduce_fused(mine, op="sum", algorithm=algorithm, comm=self.comm)
        for i, m, p, q_mine, q in zip(low, ms, bases, mine, qsums):
            # what P P^T M leaves out of this rank's M stays here as error (one pass, kept buffer)
            err = self.error.get((index, i))
            err = self.error[(index, i)] = m.clone() if err is None else err.copy_(m)
            err.addmm_(p, q_mine.T, alpha=-1)
            self.q[(index, i)] = q  # the warm start of the next step (a fresh result: nothing reuses it)
            torch.mm(p, q.T, out=m)  # the summed gradient, rank r, written over the slot

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly (collective: every rank's errors are gathered)."""
        errors = self.comm.allgather({k: v.cpu() for k, v in self.error.items()})  # pickled: checkpoint time
        return {"q": {k: v.cpu() for k, v in self.q.items()}, "calls": dict(self.calls), "errors": errors,
                "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Continue from state_dict(); returns False when the errors were saved at another world size (dropped)."""
        if state["rank"] != self.rank:
            raise ValueError(f"PowerSGD: the state was saved with rank {state['rank']}, this one has {self.rank}")
        self.q = {k: v.clone() for k, v in state["q"].items()}  # moved to the gradients' device on first use
        self.calls = dict(state["calls"])
        errors = state["errors"]
        if len(errors) != self.comm.Get_size():
            self.error = {}  # another world size: whose error is whose no longer holds; start afresh
            return False
        self.error = {k: v.clone() for k, v in errors[self.comm.Get_rank()].items()}
        return True
