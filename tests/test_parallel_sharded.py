"""ShardedDataParallel (ZeRO stage 2): gradients reduce-scattered to their owners; training equals one process."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.data import rank_share
from dmlmpi.parallel import ShardedDataParallel, ZeroRedundancyOptimizer, clip_grad_norm
from dmlmpi.parallel.zero import block_layout
from zero_reference import BATCH, batch, data, one_process

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


class Net(nn.Module):
    """An MLP with a frozen layer and a layer that gets no gradient (an unused head)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(40, 40)
        self.frozen.requires_grad_(False)
        self.body = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 33),
                                  nn.Tanh(), nn.Linear(33, 10))
        self.unused = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen layer, then the body; `unused` takes no part."""
        return self.body(self.frozen(x))


def make_model(seed: int = 0) -> Net:
    """The model with seed-given weights."""
    torch.manual_seed(seed)
    return Net()


def reference(steps: int, clip: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process's AdamW run of this file's model."""
    return one_process(make_model, steps, clip)


def sharded(steps: int, first: int = 0, micro: int = 1, clip: float = 0.0, bucket_mb: float = 0.002,
            state: dict[str, Any] | None = None, device: str = "cpu") -> ShardedDataParallel:
    """ZeRO-2 over the world on global batches first..steps-1, each in `micro` accumulated micro-steps."""
    model = ShardedDataParallel(make_model(seed=0 if RANK == 0 else RANK + 5).to(device), torch.optim.AdamW,
                                bucket_mb=bucket_mb, lr=0.01, weight_decay=0.1)
    if state is not None:
        model.module.load_state_dict(state["model"])
        model.optimizer.load_state_dict(state["optimizer"])
    x, y = (t.to(device) for t in data())
    for s in range(first, steps):
        model.optimizer.zero_grad()
        mine = rank_share(batch(s).numpy(), RANK, SIZE)
        parts = [p for p in np.array_split(mine, micro)]
        for k, part in enumerate(parts):
            loss = nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum") * SIZE / BATCH
            if k < micro - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
        if clip:
            clip_grad_norm(model.optimizer.shard_parameters(), clip, comm=WORLD)
        model.optimizer.step()
    return model


def assert_same(model: nn.Module, want: nn.Module) -> None:
    """Every parameter equal within float tolerance (compared on the host)."""
    for (name, got), ref in zip(model.named_parameters(), want.parameters()):
        torch.testing.assert_close(got.detach().cpu(), ref.detach(), rtol=1e-5, atol=2e-6, msg=name)


def test_block_layout_pads_each_group_to_n_pieces() -> None:
    """Groups end to end, each padded to a multiple of n; offsets follow the groups' order."""
    offsets, blocks = block_layout([3, 5, 2, 4], [[3, 2], [1], [0]], 3)
    assert offsets == [12, 6, 4, 0]
    assert blocks == [(0, 6), (6, 12), (12, 15)]
    with pytest.raises(ValueError, match="once"):
        block_layout([3, 5], [[0], [0]], 2)


@pytest.mark.parametrize("bucket_mb", [0.002, 25.0])
def test_matches_single_process(bucket_mb: float) -> None:
    """N ranks with ZeRO-2 (several buckets, or one) equal one process with AdamW, after 5 steps."""
    want, _ = reference(5)
    model = sharded(5, bucket_mb=bucket_mb)
    assert len(model._buckets) == 1 if bucket_mb > 1 else len(model._buckets) > 3
    assert_same(model.module, want)
    model.close()


def test_reduce_scatter_inplace_sums_each_block_to_its_rank() -> None:
    """Block r of rank r's buffer holds the sum of every rank's block r (ring and native, float32 and bf16)."""
    m = 5
    for algorithm in ("ring", "mpi"):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.arange(SIZE * m, dtype=torch.float32).mul(RANK + 1).to(dtype)
            mine = dcomm.reduce_scatter_inplace(x, algorithm=algorithm)
            want = torch.arange(RANK * m, (RANK + 1) * m, dtype=torch.float32) * (SIZE * (SIZE + 1) / 2)
            torch.testing.assert_close(mine.float(), want, rtol=1e-2 if dtype == torch.bfloat16 else 0, atol=0)
            assert mine.data_ptr() == x.data_ptr() + RANK * m * x.element_size()  # a view of x
    if SIZE > 1:  # (any length makes one block)
        with pytest.raises(ValueError, match="equal blocks"):
            dcomm.reduce_scatter_inplace(torch.zeros(SIZE * m + 1))


def test_at_most_two_buckets_alive(monkeypatch: pytest.MonkeyPatch) -> None:
    """With reduce-scatters slower than backward, the staging pool stays at max_in_flight=2 buffers of the longest bucket."""
    reduce_scatter = dcomm.reduce_scatter_inplace

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.02)  # slower than backward makes the next buckets: they would pile up unbounded
        return reduce_scatter(*args, **kwargs)

    monkeypatch.setattr(dcomm, "reduce_scatter_inplace", slow)
    model = ShardedDataParallel(make_model().body, torch.optim.SGD, bucket_mb=0.002, lr=0.1)  # every layer used
    x, y = data()
    model(x[:4]).sum().backward()
    largest = max(b.length for b in model._buckets) * 4
    total = sum(b.length for b in model._buckets) * 4
    assert len(model._buckets) > 3 and model.gradient_bytes()["staging"] <= 2 * largest < total
    model.close()


def test_gradients_live_only_in_the_shards() -> None:
    """After backward no parameter keeps a .grad; the shard gradients are 1/N of the model and equal the average."""
    model = ShardedDataParallel(make_model(seed=RANK), torch.optim.SGD, bucket_mb=0.002, lr=0.1)
    x, y = data()
    mine = rank_share(batch(0).numpy(), RANK, SIZE)
    (nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / BATCH).backward()
    assert all(p.grad is None for p in model.module.parameters())
    sizes = model.gradient_bytes()
    trainable = sum(p.numel() * 4 for p in model.module.parameters() if p.requires_grad)
    assert sizes["param_grads"] == 0
    assert sizes["shard"] <= trainable / SIZE + 4 * len(model._buckets) * SIZE  # each block pads < N elements
    # the whole averaged gradient, put back together from every rank's shard, equals one process's
    whole = torch.cat([s.grad for s in model.optimizer.shard_parameters()])
    pieces = WORLD.allgather(whole.numpy())
    ref = make_model(seed=0)
    nn.functional.cross_entropy(ref(x[batch(0)]), y[batch(0)]).backward()
    opt = model.optimizer
    flat = torch.zeros(len(opt._flat))
    for q, got in enumerate(pieces):
        at = 0
        for a, b in opt._blocks:
            m = (b - a) // SIZE
            flat[a + q * m:a + (q + 1) * m] = torch.from_numpy(got[at:at + m])
            at += m
    want = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in ref.parameters() if p.requires_grad])
    torch.testing.assert_close(opt._to_params_order(flat), want, rtol=1e-5, atol=1e-7)
    model.close()


def test_accumulation_and_clipping_match_one_process() -> None:
    """3 micro-steps under no_sync() and clipping by the norm over the shards equal one process's clipped steps."""
    want, _ = reference(4, clip=0.05)
    model = sharded(4, micro=3, clip=0.05)
    assert_same(model.module, want)
    model.close()


def test_state_dict_resumes_and_loads_into_stage_1() -> None:
    """state_dict() equals one process's AdamW state; a resumed run continues exactly; stage 1 on one rank loads it."""
    want, _ = reference(5)
    model = sharded(3)
    state = dict(model=model.module.state_dict(), optimizer=model.optimizer.state_dict())
    model.close()
    _, ref3 = reference(3)
    moments = ref3.state_dict()["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        whole = torch.cat([moments[i][key].reshape(-1) for i in sorted(moments)])
        torch.testing.assert_close(state["optimizer"]["zero_state"][key], whole, rtol=1e-5, atol=1e-7)
    resumed = sharded(5, first=3, state=state)
    assert_same(resumed.module, want)
    resumed.close()
    alone = make_model(seed=9)
    alone.load_state_dict(state["model"])
    opt1 = ZeroRedundancyOptimizer(alone.parameters(), torch.optim.AdamW, comm=MPI.COMM_SELF, lr=0.01,
                                   weight_decay=0.1)
    opt1.load_state_dict(state["optimizer"])
    x, y = data()
    for s in range(3, 5):
        opt1.zero_grad()
        nn.functional.cross_entropy(alone(x[batch(s)]), y[batch(s)]).backward()
        opt1.step()
    assert_same(alone, want)


def test_a_model_that_differs_across_ranks_is_refused() -> None:
    """Other shapes on one rank: a clear error on every rank at construction."""
    if SIZE == 1:
        pytest.skip("needs two ranks to differ")
    net = nn.Linear(4, 3 if RANK == SIZE - 1 else 2)
    with pytest.raises(ValueError, match="differs across ranks"):
        ShardedDataParallel(net, torch.optim.SGD, lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_single_process() -> None:
    """On the GPU (parameters, staging buckets and shards on the device; MPI direct or through the host): one process's AdamW."""
    want, _ = reference(3)
    model = sharded(3, device=f"cuda:{RANK % torch.cuda.device_count()}")
    assert all(s.is_cuda and s.grad.is_cuda for s in model.optimizer.shard_parameters())
    assert_same(model.module, want)
    model.close()
