"""Nonblocking point-to-point sends and receives of numpy, torch (CPU/CUDA) and CuPy arrays.

Buffers go through the same handling as the collectives (dmlmpi.comm.buffers): host arrays are
handed to MPI as they are; GPU arrays go to MPI directly when the MPI is CUDA-aware, else through a
host copy (the producing stream synchronized first), and a staged receive is copied into the
destination array when it is waited for.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from mpi4py import MPI

from .buffers import Flat, pinned_empty, cuda_aware, dtype_of, kind_of, to_flat, write_back


class Transfer:
    """One posted send or receive; `finish()` (after the request completed) delivers a staged receive."""

    __slots__ = ("request", "flat", "target")

    def __init__(self, request: MPI.Request, flat: Flat | np.ndarray, target: Any = None) -> None:
        self.request = request
        self.flat = flat  # keeps the buffer MPI works on alive until the request completes
        self.target = target  # the array a receive fills (None for a send)

    def finish(self) -> None:
        """Copy a staged receive into its target (no-op for sends and for direct buffers)."""
        if self.target is not None:
            write_back(self.flat, self.target)


def isend(x: Any, dest: int, tag: int, comm: MPI.Comm) -> Transfer:
    """Start sending array x (any supported kind; read now for staged GPU data, later otherwise)."""
    flat = to_flat(x, copy=False)
    return Transfer(comm.Isend(flat.data, dest=dest, tag=tag), flat)


def isend_host(buf: np.ndarray, dest: int, tag: int, comm: MPI.Comm) -> Transfer:
    """Start sending a contiguous host numpy array as it is, with no buffer handling (protocol messages, hot paths)."""
    return Transfer(comm.Isend(buf, dest=dest, tag=tag), buf)


def _receive_buffer(x: Any) -> Flat:
    """The buffer MPI receives into for array x: x itself, or staging memory finish() copies from."""
    kind = kind_of(x)
    if kind != "numpy" and getattr(x, "is_cuda", kind == "cupy") and not cuda_aware():
        # staged: receive into page-locked host memory, copied to the device by finish()
        dtype = dtype_of(x)
        host = pinned_empty(int(x.size if kind == "cupy" else x.numel()), dtype, kind)
        return Flat(host, kind, dtype, tuple(x.shape), x.device, False, False)
    return to_flat(x, copy=False)  # a view when x is contiguous, else a copy delivered by finish()


def irecv(x: Any, source: int, tag: int, comm: MPI.Comm) -> Transfer:
    """Start receiving into array x; wait_all() (or wait()) completes it."""
    flat = _receive_buffer(x)
    return Transfer(comm.Irecv(flat.data, source=source, tag=tag), flat, x)


def probe(source: int, tag: int, comm: MPI.Comm) -> tuple[MPI.Message, int]:
    """Wait for a message from `source` with `tag`; return it, matched (for mrecv), and its size in bytes."""
    status = MPI.Status()
    message = comm.Mprobe(source=source, tag=tag, status=status)
    return message, status.Get_count(MPI.BYTE)


def mrecv(message: MPI.Message, x: Any) -> Transfer:
    """Start receiving a probed message into array x; wait() completes it."""
    flat = _receive_buffer(x)
    return Transfer(message.Irecv(flat.data), flat, x)


def wait_all(transfers: list[Transfer]) -> None:
    """Wait for every transfer, then deliver the staged receives."""
    statuses = [MPI.Status() for _ in transfers]
    try:
        MPI.Request.Waitall([t.request for t in transfers], statuses)
    except MPI.Exception as exc:
        if exc.Get_error_class() != MPI.ERR_IN_STATUS:
            raise
        # the error of the transfer that failed (e.g. its peer died), not the generic "see the statuses"
        errors = [s.Get_error() for s in statuses if s.Get_error() not in (MPI.SUCCESS, MPI.ERR_PENDING)]
        raise MPI.Exception(MPI.Get_error_class(errors[0]) if errors else MPI.ERR_IN_STATUS) from exc
    for t in transfers:
        t.finish()


def wait(transfer: Transfer) -> None:
    """Wait for one transfer and deliver it if it is a staged receive."""
    transfer.request.Wait()
    transfer.finish()
