"""dmlmpi.comm.p2p: nonblocking sends and receives of numpy arrays and torch tensors between rank pairs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dmlmpi.comm import p2p

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def partner() -> int | None:
    """Ranks pair up 0-1, 2-3, ...; an odd last rank has nobody."""
    other = RANK ^ 1
    return other if other < SIZE else None


@pytest.mark.parametrize("make", [
    lambda v: np.arange(10, dtype=np.float64) + v,
    lambda v: torch.arange(7, dtype=torch.float32) * v,
    lambda v: (torch.arange(6, dtype=torch.float32) + v).to(torch.bfloat16),
    lambda v: np.arange(5, dtype=np.int64) - v,
], ids=["numpy-f64", "torch-f32", "torch-bf16", "numpy-i64"])
def test_exchange_with_partner(make) -> None:
    """Each rank sends its array and receives its partner's, both posted before either waits."""
    other = partner()
    if other is None:
        pytest.skip("odd rank out")
    mine, expect = make(RANK + 1), make(other + 1)
    got = make(0) * 0
    p2p.wait_all([p2p.isend(mine, other, 5, WORLD), p2p.irecv(got, other, 5, WORLD)])
    assert (np.asarray(got.float() if isinstance(got, torch.Tensor) else got) ==
            np.asarray(expect.float() if isinstance(expect, torch.Tensor) else expect)).all()


def test_non_contiguous_receive_is_delivered() -> None:
    """A receive into a strided view lands in the view after wait()."""
    other = partner()
    if other is None:
        pytest.skip("odd rank out")
    target = torch.zeros(4, 6)
    column = target[:, 2]  # stride 6: not contiguous
    send = p2p.isend(torch.full((4,), float(RANK + 10)), other, 6, WORLD)
    p2p.wait(p2p.irecv(column, other, 6, WORLD))
    p2p.wait(send)
    assert torch.equal(target[:, 2], torch.full((4,), float(other + 10)))
    assert target.sum() == 4 * (other + 10)


def test_probe_then_receive() -> None:
    """probe() reports a waiting message's size without taking it; mrecv() then receives exactly it."""
    other = partner()
    if other is None:
        pytest.skip("odd rank out")
    sends = [p2p.isend_host(np.full(3, RANK, dtype=np.uint8), other, 8, WORLD),
             p2p.isend(torch.arange(5, dtype=torch.float64) * (RANK + 1), other, 8, WORLD)]
    message, nbytes = p2p.probe(other, 8, WORLD)
    assert nbytes == 3  # sent first with the same tag: MPI keeps the order
    small = np.empty(3, dtype=np.uint8)
    message.Recv(small)  # raw bytes: taken by MPI directly
    message, nbytes = p2p.probe(other, 8, WORLD)
    assert nbytes == 5 * 8
    got = torch.empty(5, dtype=torch.float64)
    p2p.wait(p2p.mrecv(message, got))
    p2p.wait_all(sends)
    assert (small == other).all() and torch.equal(got, torch.arange(5, dtype=torch.float64) * (other + 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_staged_or_direct() -> None:
    """CUDA tensors go through host staging (or directly with a CUDA-aware MPI) and arrive on the device."""
    other = partner()
    if other is None:
        pytest.skip("odd rank out")
    mine = torch.arange(1000, device="cuda", dtype=torch.float32) + RANK
    got = torch.empty(1000, device="cuda")
    p2p.wait_all([p2p.isend(mine, other, 7, WORLD), p2p.irecv(got, other, 7, WORLD)])
    assert got.is_cuda and torch.equal(got.cpu(), torch.arange(1000, dtype=torch.float32) + other)
