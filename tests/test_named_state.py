"""Optimizer state by parameter name: what lets a pipeline checkpoint load into another stage cut."""
from __future__ import annotations

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.parallel import ZeroRedundancyOptimizer
from dmlmpi.parallel.named_state import by_name, layer_names, load_by_name


def tied_model() -> nn.Sequential:
    """Linear, Tanh, Linear whose weight is the first one's (shape 6 x 6), then a head."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    return model


def trained(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    """A few AdamW steps on fixed data."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_names_cover_every_use_of_a_tied_parameter() -> None:
    """A parameter two layers share is known by both keys; chunk prefixes are stripped."""
    model = tied_model()
    assert layer_names(model, strip=0) == [["0.weight", "2.weight"], ["0.bias"], ["2.bias"], ["3.weight"], ["3.bias"]]
    parts = nn.ModuleList([model[2:]])  # a stage's chunk 0 (a slice keeps the model's keys): '0.2.weight' -> '2.weight'
    assert layer_names(parts) == [["2.weight"], ["2.bias"], ["3.weight"], ["3.bias"]]


def test_a_stage_with_other_layers_takes_their_state_by_name() -> None:
    """Saved by one optimizer over the whole model; loaded into one over layers 2-3 only (the tied weight found
    under its second name), plain and ZeRO: each parameter's moments and step count are the saved ones."""
    model = tied_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    trained(model, opt)
    names = layer_names(model, strip=0)
    saved = [by_name(opt, list(model.parameters()), names)]
    assert torch.equal(saved[0]["state"]["0.weight"]["exp_avg"], saved[0]["state"]["2.weight"]["exp_avg"])
    want = {n: opt.state[p] for p, ns in zip(model.parameters(), names) for n in ns}
    # a second stage holding layers 2 and 3 (its own copies: another process), keys 2.* and 3.*
    stage = nn.ModuleList([tied_model()[2:]])
    params = list(stage.parameters())
    stage_names = layer_names(stage)
    for make in (lambda: torch.optim.AdamW(params, lr=0.5),
                 lambda: ZeroRedundancyOptimizer(params, torch.optim.AdamW, comm=MPI.COMM_SELF, lr=0.5)):
        fresh = make()
        load_by_name(fresh, params, stage_names, saved)
        assert fresh.param_groups[0]["lr"] == 0.01  # the saved hyperparameters
        got = by_name(fresh, params, stage_names)["state"]
        for name in ("2.weight", "2.bias", "3.weight", "3.bias"):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                torch.testing.assert_close(got[name][key], want[name][key], rtol=0, atol=0, msg=f"{name} {key}")


def test_zero_and_plain_give_the_same_entries() -> None:
    """The same training under ZeRO (one rank) and a plain AdamW: by_name gives equal entries, so either loads
    what the other saved."""
    plain_model, zero_model = tied_model(), tied_model()
    plain = torch.optim.AdamW(plain_model.parameters(), lr=0.01)
    zero = ZeroRedundancyOptimizer(zero_model.parameters(), torch.optim.AdamW, comm=MPI.COMM_SELF, lr=0.01)
    trained(plain_model, plain)
    trained(zero_model, zero)
    names = layer_names(plain_model, strip=0)
    a = by_name(plain, list(plain_model.parameters()), names)["state"]
    b = by_name(zero, list(zero_model.parameters()), names)["state"]
    assert a.keys() == b.keys()
    for name in a:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(b[name][key], a[name][key], rtol=1e-6, atol=1e-8, msg=f"{name} {key}")
