"""SyncBatchNorm: N ranks with global batch B train the model one process trains with batch B."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.comm import CollectiveMismatchError
from dmlmpi.comm.context import companion, context
from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel, SyncBatchNorm
from dmlmpi.parallel.syncbn import global_moments, local_sums

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def conv_bn(seed: int = 0) -> nn.Sequential:
    """A 1-d CNN with BatchNorm after the convolution (over batch and length) and after a Linear (batch only)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 6, 5, stride=2), nn.BatchNorm1d(6), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 18, 16), nn.BatchNorm1d(16, momentum=None), nn.ReLU(),
                         nn.Linear(16, 10))


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random global data on every rank (shifted and scaled: the statistics matter)."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def batches(steps: int, batch: int, n: int) -> list[torch.Tensor]:
    """The global batch of each step: indices into the data."""
    return [torch.arange(s * batch, (s + 1) * batch) % n for s in range(steps)]


def test_summed_moments_equal_the_whole_batch() -> None:
    """Per-piece sums, added up, give the mean and variance of the concatenation, empty pieces included."""
    g = torch.Generator().manual_seed(0)
    x = 1000.0 + torch.randn(11, 3, 4, generator=g, dtype=torch.float64)  # mean / std = 1000
    pieces = [x[:0], x[:1], x[1:5], x[5:5], x[5:]]
    total, mean, var = global_moments(np.sum([local_sums(p) for p in pieces], axis=0))
    assert total == 11 * 4
    np.testing.assert_allclose(mean, x.mean((0, 2)).numpy(), rtol=1e-15, atol=0)
    np.testing.assert_allclose(var, x.var((0, 2), unbiased=False).numpy(), rtol=1e-9, atol=0)
    half = local_sums(x[:4].to(torch.bfloat16))  # 16-bit inputs: statistics in float32, returned as float64
    assert half.dtype == np.float64 and half[0] == 16


@pytest.mark.parametrize("bucket_mb", [0.0001, 25.0])
def test_matches_single_process_batchnorm(bucket_mb: float) -> None:
    """DataParallel + SyncBatchNorm on N ranks equals nn.BatchNorm on one process: parameters and running stats."""
    steps, batch = 4, 13  # 13 does not divide evenly over 2, 3, 4 or 8 ranks
    x, y = data()
    reference = conv_bn()
    opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for idx in batches(steps, batch, len(x)):
        opt.zero_grad()
        nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()

    # bucket_mb 0.0001: one bucket per parameter, reduced on the communication thread while backward
    # runs the SyncBatchNorm all-reduces in this thread (on the companion communicator)
    model = DataParallel(SyncBatchNorm.convert_sync_batchnorm(conv_bn(seed=RANK)), bucket_mb=bucket_mb)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in batches(steps, batch, len(x)):
        mine = rank_share(idx.numpy(), RANK, SIZE)
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / batch).backward()
        opt.step()
    for (name, got), want in zip(model.module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, got), want in zip(model.module.named_buffers(), reference.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    model.eval()  # then the running statistics, as nn.BatchNorm's eval
    reference.eval()
    torch.testing.assert_close(model(x[:8]), reference(x[:8]), rtol=1e-5, atol=1e-5)
    model.close()


def test_gradients_and_running_stats_match_without_data_parallel() -> None:
    """One step of SyncBatchNorm alone: input, weight and bias gradients (summed over ranks) equal BatchNorm2d's."""
    g = torch.Generator().manual_seed(3)
    x = (5.0 + torch.randn(10, 3, 4, 2, generator=g, dtype=torch.float64)).requires_grad_()
    dy = torch.randn(10, 3, 4, 2, generator=g, dtype=torch.float64)
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.uniform_(-1, 1, generator=g)
    (ref(x) * dy).sum().backward()

    bn = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm2d(3, dtype=torch.float64))
    with torch.no_grad():
        bn.weight.copy_(ref.weight)
        bn.bias.copy_(ref.bias)
    mine = torch.as_tensor(rank_share(torch.arange(10).numpy(), RANK, SIZE))  # 10 over 8 ranks: some get 1
    xs = x.detach()[mine].requires_grad_()
    (bn(xs) * dy[mine]).sum().backward()
    torch.testing.assert_close(xs.grad, x.grad[mine], rtol=1e-10, atol=1e-12)
    # weight and bias gradients are this rank's share: their sum over ranks is the whole batch's
    summed = WORLD.allreduce(torch.stack([bn.weight.grad, bn.bias.grad]).numpy(), op=MPI.SUM)
    torch.testing.assert_close(torch.from_numpy(summed), torch.stack([ref.weight.grad, ref.bias.grad]),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    # the same bits on every rank: all combine the same gathered rows in the same order
    stats = torch.cat([bn.running_mean, bn.running_var]).numpy()
    assert all((other == stats).all() for other in WORLD.allgather(stats))


def test_ranks_without_samples_take_part() -> None:
    """A global batch smaller than the world: empty ranks still join both collectives and get empty gradients."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2, 5, generator=g).requires_grad_()
    ref = nn.BatchNorm1d(2)
    ref(x).square().sum().backward()
    bn = SyncBatchNorm(2)
    mine = torch.as_tensor(rank_share(torch.arange(3).numpy(), RANK, SIZE))
    xs = x.detach()[mine].requires_grad_()
    bn(xs).square().sum().backward()
    torch.testing.assert_close(xs.grad, x.grad[mine], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-6, atol=1e-6)


def test_eval_communicates_nothing() -> None:
    """In eval mode SyncBatchNorm uses its running statistics and makes no collective."""
    bn = SyncBatchNorm(4)
    bn(torch.randn(8, 4))  # training: makes the companion communicator
    calls = context(companion(WORLD, "syncbn")).calls if SIZE > 1 else 0
    bn.eval()
    out = bn(torch.randn(8, 4) + RANK)  # different data per rank is fine: nothing is exchanged
    assert out.shape == (8, 4)
    if SIZE > 1:
        assert context(companion(WORLD, "syncbn")).calls == calls


def test_bad_inputs_are_refused() -> None:
    """Wrong rank or channel count, and a single value per channel over all ranks, are clear errors."""
    bn = SyncBatchNorm(4)
    with pytest.raises(ValueError, match="at least 2-D"):
        bn(torch.randn(4))
    with pytest.raises(ValueError, match="expected 4 channels"):
        bn(torch.randn(8, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(torch.randn(1 if RANK == 0 else 0, 4))


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_different_channel_counts_are_refused_on_every_rank() -> None:
    """Ranks whose layers differ raise on every rank (the consistency guard) instead of hanging."""
    bn = SyncBatchNorm(4 if RANK == 0 else 5)
    with pytest.raises(CollectiveMismatchError, match="allreduce"):
        bn(torch.randn(6, bn.num_features))


def test_convert_keeps_parameters_and_statistics() -> None:
    """convert_sync_batchnorm swaps every BatchNorm, keeping the same Parameter objects and buffers."""
    model = conv_bn()
    before = list(model.parameters())
    stats = model[2].running_var
    model[2].running_var.fill_(2.0)
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert [type(m) for m in converted if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [SyncBatchNorm] * 2
    assert all(a is b for a, b in zip(converted.parameters(), before))
    assert converted[2].running_var is stats and converted[6].momentum is None
    assert converted.state_dict().keys() == conv_bn().state_dict().keys()  # checkpoints load either way


def test_bfloat16_inputs_follow_float32() -> None:
    """16-bit inputs: statistics and gradients in float32, output and input gradient in bfloat16."""
    g = torch.Generator().manual_seed(5)
    x = 2.0 + torch.randn(8 * SIZE, 4, 6, generator=g)
    mine = slice(8 * RANK, 8 * RANK + 8)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        bn = SyncBatchNorm(4)
        xs = x[mine].to(dtype).requires_grad_()
        y = bn(xs)
        y.float().square().sum().backward()
        assert y.dtype == dtype and xs.grad.dtype == dtype
        outs.append((y.float(), xs.grad.float(), bn.weight.grad, bn.running_var))
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_match_batchnorm() -> None:
    """On the GPU: statistics through the host, output and gradients on the device, equal to BatchNorm2d's."""
    g = torch.Generator().manual_seed(6)
    x = (1.0 + torch.randn(4 * SIZE, 3, 5, 5, generator=g)).cuda().requires_grad_()
    ref = nn.BatchNorm2d(3).cuda()
    ref(x).square().sum().backward()
    bn = SyncBatchNorm(3).cuda()
    xs = x.detach()[4 * RANK:4 * RANK + 4].clone().requires_grad_()
    y = bn(xs)
    y.square().sum().backward()
    assert y.is_cuda and xs.grad.is_cuda and bn.running_var.is_cuda
    torch.testing.assert_close(xs.grad, x.grad[4 * RANK:4 * RANK + 4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-5, atol=1e-5)
