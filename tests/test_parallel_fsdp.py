"""FullyShardedDataParallel (ZeRO stage 3): parameters split over the ranks too; training equals one process."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.data import rank_share
from dmlmpi.parallel import FullyShardedDataParallel, ShardedDataParallel, ZeroRedundancyOptimizer, clip_grad_norm
from dmlmpi.parallel.fsdp import plan_units
from zero_reference import BATCH, batch, data, one_process, zeros_for_missing

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


class Net(nn.Module):
    """Own parameters (a scale), a frozen layer, a nested block, a layer used twice, and an unused head."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.9))
        self.frozen = nn.Linear(40, 40)
        self.frozen.requires_grad_(False)
        self.block = nn.Sequential(nn.Linear(40, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh())
        self.twice = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        self.unused = nn.Linear(3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """frozen, block, `twice` two times, head; times `scale`."""
        h = self.block(self.frozen(x))
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h) * self.scale


def make_model(seed: int = 0) -> Net:
    """The model with seed-given weights."""
    torch.manual_seed(seed)
    return Net()


def reference(steps: int, clip: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process's AdamW run of this file's model."""
    return one_process(make_model, steps, clip)


def sharded(steps: int, first: int = 0, micro: int = 1, clip: float = 0.0,
            state: dict[str, Any] | None = None, device: str = "cpu", units: int = 0) -> FullyShardedDataParallel:
    """ZeRO-3 over the world on global batches first..steps-1, each in `micro` backward passes (`units`: min_unit_params)."""
    model = FullyShardedDataParallel(make_model(seed=0 if RANK == 0 else RANK + 5).to(device), torch.optim.AdamW,
                                     lr=0.01, weight_decay=0.1, min_unit_params=units)
    if state is not None:
        model.load_full_state_dict(state["model"])
        model.optimizer.load_state_dict(state["optimizer"])
    x, y = (t.to(device) for t in data())
    for s in range(first, steps):
        model.optimizer.zero_grad()
        mine = rank_share(batch(s).numpy(), RANK, SIZE)
        for part in np.array_split(mine, micro):
            (nn.functional.cross_entropy(model(x[part]), y[part], reduction="sum") * SIZE / BATCH).backward()
        if clip:
            clip_grad_norm(model.optimizer.param_groups[0]["params"], clip, comm=WORLD)
        model.optimizer.step()
    return model


def assert_same(state: dict[str, torch.Tensor], want: nn.Module) -> None:
    """Every entry of a whole state_dict equal to the reference's within float tolerance."""
    ref = want.state_dict()
    assert state.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(state[name].cpu(), ref[name], rtol=1e-5, atol=2e-6, msg=name)


# min_unit_params -> the units' modules. 1200: block.0 (1312 elements) alone, the root all the rest, which
# is not one stretch of the parameters' order (scale, then block.2, twice, head and unused after block.0)
UNIT_PLANS = {0: ["", "block.0", "block.2", "twice", "head", "unused"], 1200: ["", "block.0"], 10 ** 9: [""]}


def test_unit_plans() -> None:
    """Per layer by default; by size (torch FSDP's size-based wrapping) otherwise; each parameter in one unit."""
    model = make_model()
    names = {id(m): name for name, m in model.named_modules()}
    for min_params, modules in UNIT_PLANS.items():
        plan = plan_units(model, min_params)
        assert [names[id(m)] for m, _ in plan] == modules
        ids = [id(p) for _, ps in plan for p in ps]
        assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    root = dict((names[id(m)], ps) for m, ps in plan_units(model, 1200))[""]
    assert [p is q for p, q in zip(root, [model.scale, *model.block[2].parameters()])] == [True] * 3
    with pytest.raises(ValueError, match="must not be negative"):
        plan_units(model, -1)


@pytest.mark.parametrize("units", sorted(UNIT_PLANS))
def test_matches_single_process(units: int) -> None:
    """N ranks with ZeRO-3 equal one process with AdamW after 5 steps (own, frozen, nested, reused, unused
    parameters), with one unit per layer, a unit nested in the root's, and one unit of everything."""
    want, _ = reference(5)
    model = sharded(5, units=units)
    assert len(model.units) == len(UNIT_PLANS[units])
    assert_same(model.full_state_dict(), want)
    model.close()


def test_the_unit_a_forward_finishes_with_stays_whole_for_backward() -> None:
    """One unit of everything: one all-gather per training step (its backward finds it whole), freed after
    backward; left whole by a forward without backward, it is freed by step(), which changes the shards."""
    model = FullyShardedDataParallel(make_model(), torch.optim.SGD, lr=0.5, min_unit_params=10 ** 9)
    (unit,) = model.units
    calls = []
    gather = unit._gather
    unit._gather = lambda *a: (calls.append(1), gather(*a))[1]  # count the all-gathers
    x, y = data()
    for s in range(3):
        model.optimizer.zero_grad()
        mine = rank_share(batch(s).numpy(), RANK, SIZE)
        nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
        model.optimizer.step()
        assert not unit.gathered
    assert len(calls) == 3
    model(x[:2])  # grad enabled, no backward follows: the unit stays whole...
    assert unit.gathered
    for shard in model.optimizer.shard_parameters():
        shard.grad = torch.ones_like(shard)
    model.optimizer.step()  # ...until the shards change
    assert not unit.gathered
    ref = make_model()
    ref.load_state_dict(model.full_state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x[:4]), ref(x[:4]))
    model.close()


def test_parameters_and_gradients_live_only_in_the_shards() -> None:
    """Between steps a rank keeps 1/N of the trainable parameters and gradients; the parameters are whole in forward."""
    model = sharded(1)
    trainable = sum(p.numel() for p in make_model().parameters() if p.requires_grad)
    padded = sum(u.length for u in model.units)
    assert padded - trainable < SIZE * len(model.units)
    assert model.parameter_bytes() == 4 * padded // SIZE
    assert model.gradient_bytes() == {"shard": 4 * padded // SIZE, "param_grads": 0}
    assert all(not u.gathered for u in model.units)
    assert all(p.untyped_storage().nbytes() == 0 and p.numel() == 0 for u in model.units for p in u.params)
    assert model.parameter_count() == sum(p.numel() for p in make_model().parameters())
    with model.gathered():  # whole on request
        assert model.module.head.weight.shape == (10, 32)
    seen = []
    hook = model.module.head.register_forward_pre_hook(
        lambda m, a: seen.append(m.weight.untyped_storage().nbytes()))
    x, _ = data()
    with torch.no_grad():
        model(x[:2])
    hook.remove()
    assert seen and seen[0] > 0  # whole while it runs
    assert all(not u.gathered for u in model.units)  # freed again after
    model.close()


def test_shard_gradients_put_together_equal_one_process() -> None:
    """After one backward, every rank's shard gradients end to end (padding dropped) are one process's gradient."""
    model = FullyShardedDataParallel(make_model(), torch.optim.SGD, lr=0.1)
    assert_gradient_of_one_process(model)
    model.close()


def assert_gradient_of_one_process(model: FullyShardedDataParallel) -> None:
    """One backward on global batch 0; every rank's shard gradients end to end equal one process's gradient."""
    x, y = data()
    mine = rank_share(batch(0).numpy(), RANK, SIZE)
    (nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / BATCH).backward()
    pieces = WORLD.allgather([u.shard.grad.numpy().copy() for u in model.units])
    got = torch.cat([torch.cat([torch.from_numpy(r[u.index]) for r in pieces])[:u.used] for u in model.units])
    ref = make_model()
    nn.functional.cross_entropy(ref(x[batch(0)]), y[batch(0)]).backward()
    want = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
                      for p in ref.parameters() if p.requires_grad])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


class Checkpointed(Net):
    """Net with its block under activation checkpointing: recomputed during backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """As Net, the block's activations recomputed in backward."""
        h = torch.utils.checkpoint.checkpoint(self.block, self.frozen(x), use_reentrant=False)
        h = torch.tanh(self.twice(torch.tanh(self.twice(h))))
        return self.head(h) * self.scale


def test_activation_checkpointing_inside_units() -> None:
    """A block recomputed during backward (its units gathered again by the recomputed forward) gives one process's gradient."""
    torch.manual_seed(0)
    model = FullyShardedDataParallel(Checkpointed(), torch.optim.SGD, lr=0.1)
    assert_gradient_of_one_process(model)
    assert all(not u.gathered for u in model.units)
    model.close()


def test_accumulation_and_clipping_match_one_process() -> None:
    """Three backward passes per step (the shard gradients add up) with clipping over the shards equal one process."""
    want, _ = reference(4, clip=0.05)
    model = sharded(4, micro=3, clip=0.05)
    assert_same(model.full_state_dict(), want)
    model.close()


@pytest.mark.parametrize("units", [0, 1200])
def test_checkpoints_interchange_with_stages_1_and_2(units: int) -> None:
    """The optimizer's state equals one process's (in the parameters' order, whatever the units); a ZeRO-3 state
    resumes exactly, and loads into ZeRO-2 and back."""
    want, _ = reference(5)
    model = sharded(3, units=units)
    state = dict(model=model.full_state_dict(), optimizer=model.optimizer.state_dict())
    model.close()
    _, ref3 = reference(3)
    moments = ref3.state_dict()["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        whole = torch.cat([moments[i][key].reshape(-1) for i in sorted(moments)])
        torch.testing.assert_close(state["optimizer"]["zero_state"][key], whole, rtol=1e-5, atol=1e-7)
    resumed = sharded(5, first=3, state=state)
    assert_same(resumed.full_state_dict(), want)
    resumed.close()
    # into stage 2 (other layout, same format) for one step, and its state back into stage 3
    two = ShardedDataParallel(make_model(seed=3), torch.optim.AdamW, bucket_mb=0.002, lr=0.01, weight_decay=0.1)
    two.module.load_state_dict(state["model"])
    two.optimizer.load_state_dict(state["optimizer"])
    x, y = data()
    mine = rank_share(batch(3).numpy(), RANK, SIZE)
    two.optimizer.zero_grad()
    (nn.functional.cross_entropy(two(x[mine]), y[mine], reduction="sum") * SIZE / BATCH).backward()
    two.optimizer.step()
    after = dict(model=two.module.state_dict(), optimizer=two.optimizer.state_dict())
    two.close()
    again = sharded(5, first=4, state=after)
    assert_same(again.full_state_dict(), want)
    again.close()


def test_stage_1_state_loads() -> None:
    """A ZeroRedundancyOptimizer's state_dict loads into ZeRO-3 (one format for all stages)."""
    model = make_model()
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm=MPI.COMM_SELF, lr=0.01, weight_decay=0.1)
    x, y = data()
    for s in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch(s)]), y[batch(s)]).backward()
        zeros_for_missing(model)
        opt.step()
    state = dict(model=model.state_dict(), optimizer=opt.state_dict())
    want, _ = reference(5)
    resumed = sharded(5, first=3, state=state)
    assert_same(resumed.full_state_dict(), want)
    resumed.close()


def test_bad_models_are_refused() -> None:
    """Another model on one rank, nothing to train, or mixed dtypes: a clear error on every rank at construction."""
    if SIZE > 1:
        with pytest.raises(ValueError, match="differs across ranks"):
            FullyShardedDataParallel(nn.Linear(4, 3 if RANK == SIZE - 1 else 2), torch.optim.SGD, lr=0.1)
    frozen = nn.Linear(4, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters that require gradients"):
        FullyShardedDataParallel(frozen, torch.optim.SGD, lr=0.1)
    mixed = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="one dtype and device"):
        FullyShardedDataParallel(mixed, torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="unknown algorithm"):
        FullyShardedDataParallel(nn.Linear(4, 2), torch.optim.SGD, algorithm="tree", lr=0.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_single_process() -> None:
    """On the GPU (device storage freed and refilled, MPI direct or through the host): one process's AdamW."""
    want, _ = reference(3)
    model = sharded(3, device=f"cuda:{RANK % torch.cuda.device_count()}")
    assert all(u.shard.is_cuda and not u.gathered for u in model.units)
    assert_same(model.full_state_dict(), want)
    model.close()
