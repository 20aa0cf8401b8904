"""ZeroRedundancyOptimizer: each rank keeps 1/n of the optimizer state, and training equals one process."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel, ZeroRedundancyOptimizer
from dmlmpi.parallel.zero import overlaps, shard_bounds

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()

OPTIMIZERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.1)),
    "momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
}


def make_model(seed: int = 0) -> nn.Sequential:
    """A small MLP: 5 tensors of 10 to 1280 elements, cut by the shards at every world size."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random global data on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def batch(s: int, size: int = 13) -> torch.Tensor:
    """Global batch s (13 samples: uneven over 2, 3, 4 and 8 ranks)."""
    return torch.arange(s * size, (s + 1) * size) % 64


def reference(name: str, steps: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Single-process training with the plain optimizer and a one-cycle schedule."""
    model = make_model()
    cls, kwargs = OPTIMIZERS[name]
    opt = cls(model.parameters(), **kwargs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=kwargs["lr"], total_steps=10)
    x, y = data()
    for s in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch(s)]), y[batch(s)]).backward()
        opt.step()
        sched.step()
    return model, opt


def distributed(name: str, first: int, steps: int, model: nn.Module | None = None,
                state: dict[str, Any] | None = None) -> tuple[DataParallel, ZeroRedundancyOptimizer, Any]:
    """DataParallel + ZeRO over the world, trained on global batches first..steps-1 (after loading `state`)."""
    model = DataParallel(make_model(seed=RANK) if model is None else model, bucket_mb=0.001)
    cls, kwargs = OPTIMIZERS[name]
    opt = ZeroRedundancyOptimizer(model.parameters(), cls, **kwargs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=kwargs["lr"], total_steps=10)
    if state is not None:
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
    x, y = data()
    for s in range(first, steps):
        mine = rank_share(batch(s).numpy(), RANK, SIZE)
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / 13).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def test_shards_cover_the_vector_once() -> None:
    """Shard bounds tile the padded vector; the pieces of the tensors in a shard are where they belong."""
    sizes = [3, 0, 7, 2]
    total, n = sum(sizes), 3
    bounds = [shard_bounds(total, n, r) for r in range(n)]
    assert bounds == [(0, 4), (4, 8), (8, 12)]
    assert overlaps(sizes, 0, 4) == [(0, 0, 3, 0), (2, 0, 1, 3)]
    assert overlaps(sizes, 8, 12) == [(2, 5, 7, 0), (3, 0, 2, 2)]  # elements 12.. are padding


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_matches_single_process(name: str) -> None:
    """N ranks, each updating 1/N of the parameters, equal one process with the plain optimizer."""
    want, _ = reference(name, 5)
    model, opt, _ = distributed(name, 0, 5)
    for got, ref in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    model.close()


def test_state_is_split_over_the_ranks() -> None:
    """AdamW's two moments: each rank holds ceil(P / N) elements of each, not P."""
    model, opt, _ = distributed("adamw", 0, 1)
    total = sum(p.numel() for p in model.parameters())
    shard = -(-total // SIZE)
    assert opt.local_state_bytes() == 2 * shard * 4 + 4  # exp_avg, exp_avg_sq, and the step count
    model.close()


def test_state_dict_resumes_and_reshards() -> None:
    """state_dict() is the whole state (equal to one process's); loading it continues the run exactly,

    here at N ranks and, resharded, on one rank alone (COMM_SELF)."""
    want, ref_opt = reference("adamw", 5)
    model, opt, sched = distributed("adamw", 0, 3)
    state = dict(model=model.module.state_dict(), optimizer=opt.state_dict(), schedule=sched.state_dict())
    model.close()
    _, ref3 = reference("adamw", 3)
    moments = ref3.state_dict()["state"]
    for key in ("exp_avg", "exp_avg_sq"):
        whole = torch.cat([moments[i][key].reshape(-1) for i in range(len(moments))])
        torch.testing.assert_close(state["optimizer"]["zero_state"][key], whole, rtol=1e-5, atol=1e-7)

    resumed, _, _ = distributed("adamw", 3, 5, model=make_model(seed=7), state=state)
    for got, ref in zip(resumed.parameters(), want.parameters()):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)
    resumed.close()

    alone = make_model(seed=7)
    alone.load_state_dict(state["model"])
    opt1 = ZeroRedundancyOptimizer(alone.parameters(), torch.optim.AdamW, comm=MPI.COMM_SELF, lr=0.01,
                                   weight_decay=0.1)
    sched1 = torch.optim.lr_scheduler.OneCycleLR(opt1, max_lr=0.01, total_steps=10)  # before loading: it sets lr
    opt1.load_state_dict(state["optimizer"])
    sched1.load_state_dict(state["schedule"])
    x, y = data()
    for s in range(3, 5):
        opt1.zero_grad()
        nn.functional.cross_entropy(alone(x[batch(s)]), y[batch(s)]).backward()
        opt1.step()
        sched1.step()
    for got, ref in zip(alone.parameters(), want.parameters()):
        torch.testing.assert_close(got.detach(), ref.detach(), rtol=1e-5, atol=1e-6)


def test_bad_parameters_are_refused() -> None:
    """Mixed dtypes cannot share one flat vector; nothing to optimize is an error too."""
    with pytest.raises(ValueError, match="one dtype and device"):
        ZeroRedundancyOptimizer([nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3, dtype=torch.float64))],
                                torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="no parameters"):
        ZeroRedundancyOptimizer([nn.Parameter(torch.zeros(3), requires_grad=False)], torch.optim.SGD, lr=0.1)


def test_parameters_moved_after_construction_are_an_error() -> None:
    """Converting the model after making the optimizer would leave its updates off the model: a clear error."""
    model = make_model()
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(NotImplementedError, match="cannot be added"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    model.double()
    model(torch.randn(2, 40, dtype=torch.float64)).sum().backward()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat vector"):
        opt.step()
