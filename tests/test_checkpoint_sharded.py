"""Sharded checkpoints: every rank writes its own pieces; any world size and any ZeRO stage reads back its own."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import checkpoint
from dmlmpi.consolidate import model_state
from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel, FullyShardedDataParallel, ShardedDataParallel, ZeroRedundancyOptimizer
from zero_reference import BATCH, batch, data, one_process

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


@pytest.fixture
def shared_dir() -> Iterator[str]:
    """One new directory that every rank sees (rank 0 makes it and removes it)."""
    path = WORLD.bcast(tempfile.mkdtemp(prefix="dmlmpi-sharded-") if RANK == 0 else None, root=0)
    yield path
    WORLD.Barrier()  # everyone is done with it
    if RANK == 0:
        shutil.rmtree(path, ignore_errors=True)


def chunks(total: int) -> list[tuple[int, int]]:
    """[0, total) cut into chunks of uneven lengths (1 to 7), to be dealt to the ranks round-robin."""
    out, at, k = [], 0, 0
    while at < total:
        out.append((at, min(total, at + 1 + (k * 5) % 7)))
        at, k = out[-1][1], k + 1
    return out


def dealt(total: int) -> dict[str, Any]:
    """This rank's share of two vectors (0, 1, 2, ... and its square) in shard_state()'s form."""
    whole = torch.arange(total, dtype=torch.float64)
    ranges = chunks(total)[RANK::SIZE]
    part = lambda v: torch.cat([v[a:b] for a, b in ranges]) if ranges else torch.zeros(0, dtype=v.dtype)  # noqa: E731
    return {"ranges": ranges, "total": total, "param": part(whole),
            "state": {"sq": part(whole ** 2)}, "scalars": {"step": torch.tensor(4.0)}, "param_groups": [{"lr": 0.1}]}


def test_every_range_reads_back_from_the_files_that_hold_it(shared_dir: str) -> None:
    """Ranks write interleaved pieces; any range reads back exactly, opening only the files that hold it;
    the checkpoint is a directory of one file per rank plus meta.pt, and only the newest two are kept."""
    total = 97
    for step in (5, 6, 7):
        path = checkpoint.save_sharded(shared_dir, step, {"extra": step}, dealt(total), WORLD)
        assert path == (os.path.join(shared_dir, f"ckpt-{step}") if RANK == 0 else None)
    if RANK == 0:
        assert sorted(os.listdir(shared_dir)) == ["ckpt-6", "ckpt-7", "latest"]
        assert sorted(os.listdir(os.path.join(shared_dir, "ckpt-7"))) == \
            sorted(["meta.pt"] + [f"shard-{r}.pt" for r in range(SIZE)])
    WORLD.Barrier()
    latest = checkpoint.latest_path(shared_dir)
    assert latest == os.path.join(shared_dir, "ckpt-7")
    state = checkpoint.load(latest, WORLD)
    assert state["step"] == 7 and state["extra"] == 7 and state["shard_keys"] == ["sq"]
    assert state["shard_scalars"]["step"].item() == 4.0 and state["param_groups"] == [{"lr": 0.1}]
    reader = state["shards"]
    whole = torch.arange(total, dtype=torch.float64)
    a, b = chunks(total)[0]
    torch.testing.assert_close(reader.read("param", a, b), whole[a:b], rtol=0, atol=0)
    assert set(reader._files) == {0}  # the first chunk is rank 0's: no other file was opened
    rng = np.random.default_rng(RANK)
    for start, stop in [(0, total), (3, 40), (total - 1, total)] + [tuple(sorted(rng.integers(0, total, 2)))
                                                                     for _ in range(20)]:
        if start < stop:
            torch.testing.assert_close(reader.read("param", start, stop), whole[start:stop], rtol=0, atol=0)
            torch.testing.assert_close(reader.read("sq", start, stop), whole[start:stop] ** 2, rtol=0, atol=0)


def test_an_incomplete_save_is_never_the_latest_and_is_replaced(shared_dir: str) -> None:
    """A save that died before rank 0 renamed its directory (shard files but no meta.pt) is not a checkpoint:
    the latest stays the last complete one, and the next save of that step replaces the leftovers."""
    checkpoint.save_sharded(shared_dir, 5, {}, dealt(30), WORLD)
    partial = os.path.join(shared_dir, "ckpt-6.partial")
    if RANK == 0:  # what a crash after the shard files were written leaves behind
        os.makedirs(partial)
        for name in ("shard-0.pt", "stray.tmp123"):
            open(os.path.join(partial, name), "wb").close()
        os.remove(os.path.join(shared_dir, "latest"))  # even without the pointer
    WORLD.Barrier()
    assert checkpoint.checkpoints(shared_dir) == [5]
    assert checkpoint.latest_path(shared_dir) == os.path.join(shared_dir, "ckpt-5")
    WORLD.Barrier()
    checkpoint.save_sharded(shared_dir, 6, {}, dealt(30), WORLD)
    assert not os.path.exists(partial) and checkpoint.checkpoints(shared_dir) == [5, 6]
    assert sorted(os.listdir(os.path.join(shared_dir, "ckpt-6"))) == \
        sorted(["meta.pt"] + [f"shard-{r}.pt" for r in range(SIZE)])


def test_a_missing_shard_file_is_a_clear_error_on_every_rank(shared_dir: str) -> None:
    """A rank's file gone: reading its elements names the file, on every rank that needs them; no hang."""
    checkpoint.save_sharded(shared_dir, 3, {}, dealt(50), WORLD)
    lost = os.path.join(shared_dir, "ckpt-3", f"shard-{SIZE - 1}.pt")
    if RANK == 0:
        os.remove(lost)
    WORLD.Barrier()
    reader = checkpoint.load(checkpoint.latest_path(shared_dir), WORLD)["shards"]
    with pytest.raises(RuntimeError, match=f"cannot read checkpoint shard {lost}"):
        reader.read("param", 0, 50)


def make_model(seed: int = 0) -> nn.Sequential:
    """Two Linear layers (1642 elements, cut by the shards at every world size)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 10))


def wrap(stage: int, comm: MPI.Comm, seed: int) -> tuple[nn.Module, Any]:
    """The model under ZeRO `stage` (1: DataParallel and ZeroRedundancyOptimizer) on `comm`, and its optimizer."""
    settings = dict(lr=0.01, weight_decay=0.1)
    if stage == 1:
        model = DataParallel(make_model(seed), comm)
        return model, ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm=comm, **settings)
    cls = ShardedDataParallel if stage == 2 else FullyShardedDataParallel
    model = cls(make_model(seed), torch.optim.AdamW, comm, **settings)
    return model, model.optimizer


def train(model: nn.Module, opt: Any, comm: MPI.Comm, first: int, last: int) -> None:
    """Global batches first..last-1, each rank of `comm` on its share."""
    x, y = data()
    for s in range(first, last):
        opt.zero_grad()
        mine = rank_share(batch(s).numpy(), comm.Get_rank(), comm.Get_size())
        loss = nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * comm.Get_size() / BATCH
        loss.backward()
        opt.step()


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    """The wrapped module's whole state_dict."""
    if isinstance(model, FullyShardedDataParallel):
        return model.full_state_dict()
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


@pytest.mark.parametrize("saved,loaded,fewer", [(2, 3, True), (3, 1, False), (1, 2, True), (3, 3, True)])
def test_a_stage_resumes_as_another_on_another_world_size(shared_dir: str, saved: int, loaded: int,
                                                          fewer: bool) -> None:
    """Saved by ZeRO stage `saved` on every rank after 3 steps; loaded into stage `loaded` (on one rank fewer when
    `fewer`, from other initial weights) and trained 2 more steps: one process's 5 steps of AdamW."""
    model, opt = wrap(saved, WORLD, seed=0)
    train(model, opt, WORLD, 0, 3)
    shard = opt.shard_state()
    # each rank's file holds its own share, no more: the shares tile the parameters once
    counts = WORLD.allgather(sum(b - a for a, b in shard["ranges"]))
    assert sum(counts) == shard["total"] == 1642 and max(counts) <= -(-1642 // SIZE) + 1
    checkpoint.save_sharded(shared_dir, 3, {}, shard, WORLD)
    model.close()
    n = max(1, SIZE - 1) if fewer else SIZE
    sub = WORLD.Split(0 if RANK < n else MPI.UNDEFINED, RANK)
    if sub != MPI.COMM_NULL:
        state = checkpoint.load(os.path.join(shared_dir, "ckpt-3"), sub)
        resumed, opt2 = wrap(loaded, sub, seed=7)
        opt2.load_shard_state(state["shards"].read, state["shard_keys"], state["shard_scalars"],
                              state["param_groups"])
        train(resumed, opt2, sub, 3, 5)
        want, _ = one_process(make_model, 5)
        got = whole(resumed)
        for name, ref in want.state_dict().items():
            torch.testing.assert_close(got[name], ref, rtol=1e-5, atol=2e-6, msg=name)
        resumed.close()
        sub.Free()
    WORLD.Barrier()


@pytest.mark.parametrize("stage", [1, 3])
def test_consolidate_gives_the_whole_model(shared_dir: str, stage: int) -> None:
    """model_state() on a sharded checkpoint (one process, no MPI) equals the trained model's state_dict, bit for bit."""
    model, opt = wrap(stage, WORLD, seed=0)
    train(model, opt, WORLD, 0, 2)
    names = [name for name, _ in make_model().named_parameters()]  # the trainer's names, shapes and the rest
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    checkpoint.save_sharded(shared_dir, 2, dict(names=names, shapes=shapes, rest={}), opt.shard_state(), WORLD)
    want = whole(model)
    model.close()
    if RANK == 0:
        got = model_state(shared_dir)  # the run directory: its latest checkpoint
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name
