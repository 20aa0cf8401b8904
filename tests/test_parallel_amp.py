"""Mixed precision: the dynamic loss scaler against torch's GradScaler, agreement across stages, bf16 data parallel."""
from __future__ import annotations

import math

import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.parallel import DataParallel
from dmlmpi.parallel.amp import DynamicLossScaler, autocast

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def small_model() -> nn.Sequential:
    """Two Linear layers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def test_scaler_follows_torch_gradscaler() -> None:
    """fp16 steps with overflows injected: the same scales, skips and (bit for bit) parameters as torch.amp.GradScaler."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    overflow_at = {1, 2, 6}  # steps whose gradients get an inf
    ref, mine = small_model(), small_model()
    ref_opt, my_opt = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(mine.parameters(), lr=0.1)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    scaler = DynamicLossScaler(2.0 ** 10, growth_interval=3)
    scales = []
    for step in range(10):
        for model, opt in ((ref, ref_opt), (mine, my_opt)):
            opt.zero_grad()
            with autocast("fp16", torch.device("cpu")):
                loss = nn.functional.cross_entropy(model(x), y)
            if model is ref:
                torch_scaler.scale(loss).backward()
            else:
                (loss * scaler.scale).backward()
            if step in overflow_at:
                model[0].weight.grad[0, 0] = math.inf
            if model is ref:
                torch_scaler.step(opt)
                torch_scaler.update()
            else:
                stepped = scaler.unscale_(model.parameters())
                assert stepped == (step not in overflow_at)
                if stepped:
                    opt.step()
                scaler.update(stepped)
        scales.append(scaler.scale)
        assert scaler.scale == torch_scaler.get_scale(), step
    assert scales[0] == 2.0 ** 10 and scaler.skipped == len(overflow_at) and max(scales) == 2.0 ** 10
    for p, q in zip(mine.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    state = scaler.state_dict()
    again = DynamicLossScaler()
    again.load_state_dict(state)
    assert again.state_dict() == state


def test_bad_settings_and_the_none_context() -> None:
    """Scaler settings out of range are refused; autocast("none") does nothing; an unknown precision is refused."""
    with pytest.raises(ValueError, match="growth_factor > 1"):
        DynamicLossScaler(growth_factor=1.0)
    with pytest.raises(ValueError, match="init_scale > 0"):
        DynamicLossScaler(init_scale=0)
    with autocast("none", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast("bf16", torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast("fp8", torch.device("cpu"))


@pytest.mark.mpi
def test_an_overflow_on_one_stage_skips_every_stage() -> None:
    """The last rank's gradient overflows: every rank's unscale_ says skip, and every scale halves."""
    scaler = DynamicLossScaler(2.0 ** 8, comm=WORLD)
    p = nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 2.0 ** 8)
    if RANK == SIZE - 1:
        p.grad[2] = math.nan if SIZE % 2 else math.inf
    stepped = scaler.unscale_([p])
    assert stepped is False
    scaler.update(stepped)
    assert scaler.scale == 2.0 ** 7 and scaler.skipped == 1
    # a clean step everywhere: unscaled to the true gradient, no skip
    p.grad = torch.full((4,), 2.0 ** 7)
    assert scaler.unscale_([p]) is True
    assert torch.equal(p.grad, torch.ones(4))


@pytest.mark.mpi
def test_bf16_data_parallel_close_to_one_process() -> None:
    """DataParallel under bfloat16 autocast: the averaged gradients match one process's autocast gradients to bf16 precision."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    ref = small_model()
    with autocast("bf16", torch.device("cpu")):
        loss = nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    model = DataParallel(small_model(), WORLD)
    mine = torch.tensor_split(torch.arange(24), SIZE)[RANK]
    with autocast("bf16", torch.device("cpu")):
        share = nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / 24
    share.backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=2e-3)
    model.close()
