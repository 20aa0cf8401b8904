"""PowerSGD in DataParallel: exact when the rank covers the gradient, error feedback loses nothing otherwise."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.comm import CollectiveMismatchError
from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel
from dmlmpi.parallel.powersgd import compressible, orthonormalize
from test_parallel_data import data, local_loss, make_model, train_reference

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def test_which_tensors_go_as_factors() -> None:
    """Matrices whose factors are smaller than they are; never vectors or integer tensors."""
    assert compressible((32, 144), torch.float32, 16)  # (32 + 144) * 16 < 32 * 144
    assert not compressible((10, 32), torch.float32, 16)  # (10 + 32) * 10 > 320
    assert compressible((64, 8, 3), torch.float64, 2)  # a convolution: 64 x 24
    assert not compressible((4096,), torch.float32, 1)
    assert not compressible((32, 144), torch.float16, 1)


def test_orthonormalize_zeroes_directions_that_are_not_there() -> None:
    """A rank-2 input with 4 columns: two orthonormal columns, two of zeros, the same span."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(9, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    p = orthonormalize(a @ b)
    norms = p.norm(dim=0)
    assert sorted(np.round(norms.numpy(), 12).tolist()) == [0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(p @ (p.T @ a), a)  # projecting onto the columns keeps the span


def test_full_rank_equals_plain_averaging() -> None:
    """Rank 16 >= the 13-sample batch's gradient rank: training equals one process, as without compression."""
    steps, batch = 5, 13
    expect = train_reference(steps, batch)
    model = DataParallel(make_model(seed=RANK), compression="powersgd", powersgd_rank=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data()
    for s in range(steps):
        idx = rank_share((torch.arange(s * batch, (s + 1) * batch) % len(x)).numpy(), RANK, SIZE)
        opt.zero_grad()
        local_loss(model, x[idx], y[idx], batch).backward()
        opt.step()
    # the 32 x 144 weight went as factors, the rest whole (one rank communicates nothing at all)
    assert len(model._powersgd.q) == (1 if SIZE > 1 else 0)
    for got, want in zip(model.parameters(), expect):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-5)
    model.close()


@pytest.mark.skipif(SIZE < 2, reason="one rank communicates nothing: no compression")
def test_error_feedback_keeps_what_rank_1_drops() -> None:
    """Rank 1 on a rank-13 gradient: each step differs from the average, but the steps' sum plus every
    rank's kept error equals the sum of the true averages."""
    x, y = data()
    dense = DataParallel(make_model(), bucket_mb=0.0001)
    low = DataParallel(make_model(), bucket_mb=0.0001, compression="powersgd", powersgd_rank=1)
    weight = 4  # module index of the 32 x 144 Linear
    sums = {"dense": torch.zeros(32, 144), "low": torch.zeros(32, 144)}
    for s in range(4):  # no optimizer step: the same parameters, a new batch each time
        idx = rank_share(np.arange(s * 13, (s + 1) * 13), RANK, SIZE)
        for name, m in (("dense", dense), ("low", low)):
            m.zero_grad()
            local_loss(m, x[idx], y[idx], 13).backward()
            sums[name] += m.module[weight].weight.grad
    assert (sums["low"] - sums["dense"]).abs().max() > 1e-3  # rank 1 did drop something
    b, i = low._where[low.module[weight].weight]
    kept = WORLD.allreduce(low._powersgd.error[(b, i)].numpy(), op=MPI.SUM)
    torch.testing.assert_close(sums["low"] + torch.from_numpy(kept), sums["dense"], rtol=1e-4, atol=1e-5)
    dense.close(), low.close()


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_ranks_with_other_factor_ranks_are_refused() -> None:
    """Different powersgd_rank on rank 0: factor lengths differ, and every rank says so instead of hanging."""
    model = DataParallel(make_model(), compression="powersgd", powersgd_rank=2 if RANK == 0 else 3)
    x, y = data(8)
    with pytest.raises(CollectiveMismatchError):
        local_loss(model, x, y, 8).backward()


def test_bad_settings_are_refused() -> None:
    """A factor rank below 1 is an error."""
    with pytest.raises(ValueError, match="rank must be at least 1"):
        DataParallel(make_model(), compression="powersgd", powersgd_rank=0)


@pytest.mark.skipif(SIZE < 2, reason="one rank communicates nothing: no compression")
def test_state_moves_to_other_buckets() -> None:
    """comm_state() keyed by parameter name: loaded into a DataParallel with other buckets, the next step is the same."""
    x, y = data()
    first = DataParallel(make_model(), bucket_mb=0.0001, compression="powersgd", powersgd_rank=1)
    for s in range(2):
        first.zero_grad()
        idx = rank_share(np.arange(s * 13, (s + 1) * 13), RANK, SIZE)
        local_loss(first, x[idx], y[idx], 13).backward()
    state = first.comm_state()
    other = DataParallel(make_model(), bucket_mb=25.0, compression="powersgd", powersgd_rank=1)  # one bucket
    assert other.load_comm_state(state)
    idx = rank_share(np.arange(26, 39), RANK, SIZE)
    for m in (first, other):
        m.zero_grad()
        local_loss(m, x[idx], y[idx], 13).backward()
    for a, b in zip(first.parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="names parameters this model does not have"):
        DataParallel(nn.Sequential(nn.Linear(40, 3)), compression="powersgd").load_comm_state(state)
    first.close(), other.close()
