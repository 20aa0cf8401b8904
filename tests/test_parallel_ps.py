"""ParameterServer against data parallel and single-process training, at any world size (>= 2)."""
from __future__ import annotations

import time
from typing import Callable

import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel, ParameterServer

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
STEPS, BATCH = 4, 13  # 13 does not divide evenly over the workers

OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def make_model() -> nn.Sequential:
    """Several parameter tensors of different sizes (shards will cut through some of them)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The same random global data on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS * BATCH, 40, generator=g), torch.randint(0, 10, (STEPS * BATCH,), generator=g)


def batch_idx(step: int) -> torch.Tensor:
    """The global batch of a step."""
    return torch.arange(step * BATCH, (step + 1) * BATCH)


def reference(optimizer: str) -> torch.Tensor:
    """Single-process training on each whole global batch; the parameters as one flat vector."""
    model = make_model()
    opt = OPTIMIZERS[optimizer](list(model.parameters()))
    x, y = data()
    for s in range(STEPS):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch_idx(s)]), y[batch_idx(s)]).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run_ps(servers: int, mode: str, optimizer: str, staleness: int = 0) -> tuple[ParameterServer, torch.Tensor]:
    """Train with a parameter server; returns it and this rank's flat parameters (a server: its shard)."""
    ps = ParameterServer(make_model(), WORLD, servers=servers, mode=mode, staleness=staleness,
                         optimizer=OPTIMIZERS[optimizer])
    if ps.is_server:
        stats = ps.serve()
        assert stats["updates"] == (STEPS if mode != "async" else STEPS * len(ps.workers))
        return ps, ps.shard.detach().clone()
    x, y = data()
    workers, me = len(ps.workers), ps.worker_comm.Get_rank()
    for s in range(STEPS):
        mine = torch.from_numpy(rank_share(batch_idx(s).numpy(), me, workers))
        # this worker's share of the global mean loss, times W (the servers average the W gradients)
        loss = nn.functional.cross_entropy(ps(x[mine]), y[mine], reduction="sum") * workers / BATCH
        loss.backward()
        ps.step()
    ps.finish()
    return ps, torch.cat([p.detach().reshape(-1) for p in ps.module.parameters()])


def my_part(ps: ParameterServer, full: torch.Tensor) -> torch.Tensor:
    """The part of a flat parameter vector this rank holds (the whole of it on a worker)."""
    if not ps.is_server:
        return full
    start, stop = ps.ranges[ps.index]
    return full[start:stop]


def needs(servers: int) -> None:
    """Skip where the world has no room for `servers` servers and a worker."""
    if SIZE <= servers:
        pytest.skip(f"needs more than {servers} ranks")


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_sync_equals_single_process_and_data_parallel(servers: int, optimizer: str) -> None:
    """Sync PS with W workers = one process with the global batch = W-rank DataParallel."""
    needs(servers)
    ps, got = run_ps(servers, "sync", optimizer)
    expect = reference(optimizer)
    torch.testing.assert_close(got, my_part(ps, expect), rtol=1e-5, atol=1e-6)
    if not ps.is_server:  # data parallel on the same workers, same batches
        dp = DataParallel(make_model(), ps.worker_comm)
        opt = OPTIMIZERS[optimizer](list(dp.parameters()))
        x, y = data()
        workers, me = ps.worker_comm.Get_size(), ps.worker_comm.Get_rank()
        for s in range(STEPS):
            mine = torch.from_numpy(rank_share(batch_idx(s).numpy(), me, workers))
            opt.zero_grad()
            (nn.functional.cross_entropy(dp(x[mine]), y[mine], reduction="sum") * workers / BATCH).backward()
            opt.step()
        dp.close()
        torch.testing.assert_close(got, torch.cat([p.detach().reshape(-1) for p in dp.parameters()]),
                                   rtol=1e-5, atol=1e-6)
    ps.close()


@pytest.mark.parametrize("servers", [1, 2])
def test_ssp_with_zero_staleness_equals_sync(servers: int) -> None:
    """Bounded staleness 0 is bulk-synchronous: the same parameters bit for bit."""
    needs(servers)
    a, sync = run_ps(servers, "sync", "adam")
    b, ssp = run_ps(servers, "ssp", "adam", staleness=0)
    assert torch.equal(sync, ssp)
    a.close()
    b.close()


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_end_with_the_same_parameters_everywhere(mode: str) -> None:
    """All workers finish with the servers' final parameters; a straggling worker 0 holds nobody up forever."""
    needs(1)
    ps = ParameterServer(make_model(), WORLD, servers=1, mode=mode, staleness=1, optimizer=OPTIMIZERS["sgd"])
    if ps.is_server:
        stats = ps.serve()
        final = ps.shard.detach().clone()
        assert max(stats["staleness"]) <= (1 if mode == "ssp" else STEPS * len(ps.workers))
    else:
        x, y = data()
        for s in range(STEPS):
            if ps.worker_comm.Get_rank() == 0:
                time.sleep(0.01)  # a straggler
            nn.functional.cross_entropy(ps(x[batch_idx(s)]), y[batch_idx(s)]).backward()
            ps.step()
        ps.finish()
        final = torch.cat([p.detach().reshape(-1) for p in ps.module.parameters()])
    # every rank's view of the final parameters, gathered: all workers hold the (one) server's shard
    views = WORLD.allgather(final)
    for w in ps.workers:
        assert torch.equal(views[w], views[ps.servers[0]])
    ps.close()


def test_checkpoint_state_round_trip() -> None:
    """state() gathers every shard and optimizer state; load_state() puts them back on a fresh server."""
    servers = 2 if SIZE >= 3 else 1
    needs(servers)
    ps, _ = run_ps(servers, "sync", "momentum")
    # the servers have stopped serving, so every rank can call the collective state() directly
    state = ps.state()
    state = WORLD.bcast(state, root=0)
    fresh = ParameterServer(make_model(), WORLD, servers=servers, mode="sync", optimizer=OPTIMIZERS["momentum"])
    fresh.load_state(state)
    if fresh.is_server:
        torch.testing.assert_close(fresh.shard.detach(), ps.shard.detach(), rtol=0, atol=0)
        assert fresh.version == ps.version == STEPS
        buf = fresh.optimizer.state_dict()["state"][0]["momentum_buffer"]
        torch.testing.assert_close(buf, ps.optimizer.state_dict()["state"][0]["momentum_buffer"], rtol=0, atol=0)
    else:
        torch.testing.assert_close(fresh.flat_params, ps.flat_params, rtol=0, atol=0)
    with pytest.raises(ValueError, match="server shard"):
        ParameterServer(make_model(), WORLD, servers=1, mode="sync").load_state(
            dict(state, servers=state["servers"] * 2))
    ps.close()
    fresh.close()
