"""Optimizer state keyed by parameter name, so that a pipeline checkpoint loads into another stage cut.

A pipeline stage's optimizer (a plain torch optimizer, or ZeroRedundancyOptimizer along dp) numbers
its parameters by their place in that stage. `by_name` turns its state into one entry per model key
('3.weight'): the per-element state shaped like the parameter, plus scalars such as Adam's step
count. `load_by_name` builds any stage's optimizer state back from the entries of all stages, for
whichever parameters that stage holds now, plain or ZeRO, at any number of stages or replicas.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .zero import ShardOptimizer


def _clone(value: Any) -> Any:
    """A tensor copied (state tensors change in place as training goes on); anything else as is."""
    return value.detach().clone() if torch.is_tensor(value) else value


def by_name(optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
            names: list[list[str]]) -> dict[str, Any]:
    """`optimizer`'s state as {"state": {name: {key: value}}, "param_groups": [...]} (collective along dp for ZeRO).

    params: the optimizer's parameters in its order; names: every model key of each (a parameter
    two layers share has two: its entry is stored under both).
    """
    saved = optimizer.state_dict()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
    entries: list[dict[str, Any] | None] = []
    if isinstance(optimizer, ShardOptimizer):  # one vector per key over the parameters end to end
        total, at = sum(p.numel() for p in params), 0
        for p in params:
            entry = {}
            for key, value in saved["zero_state"].items():
                whole = torch.is_tensor(value) and value.dim() == 1 and value.numel() == total
                entry[key] = value[at:at + p.numel()].reshape(p.shape).clone() if whole else _clone(value)
            entries.append(entry)
            at += p.numel()
    else:
        entries = [saved["state"].get(i) for i in range(len(params))]
    state = {name: {k: _clone(v) for k, v in entry.items()}
             for entry, keys in zip(entries, names) if entry for name in keys}
    return {"state": state, "param_groups": groups}


def load_by_name(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], names: list[list[str]],
                 saved: list[dict[str, Any]]) -> None:
    """Load into `optimizer` (over `params`, called `names`) the entries that by_name() gave on every stage."""
    entries: dict[str, dict[str, Any]] = {}
    for stage in saved:
        entries.update(stage["state"])
    mine = [next((entries[n] for n in keys if n in entries), None) for keys in names]
    groups = saved[0]["param_groups"]
    if isinstance(optimizer, ShardOptimizer):
        # per-element keys: shaped like their parameter; the rest (the step count) one value for all
        per_element = sorted({k for p, m in zip(params, mine) if m for k, v in m.items()
                              if torch.is_tensor(v) and v.dim() > 0 and v.shape == p.shape})
        zero_state: dict[str, Any] = {}
        for key in per_element:  # a parameter with no saved state starts from zeros, as a fresh optimizer would
            zero_state[key] = torch.cat([m[key].reshape(-1) if m and key in m else torch.zeros(p.numel())
                                         for p, m in zip(params, mine)])
        for m in mine:
            for key, value in (m or {}).items():
                if key not in per_element and key not in zero_state:
                    zero_state[key] = _clone(value)
        optimizer.load_state_dict({"zero_state": zero_state, "param_groups": groups})
        return
    local = optimizer.state_dict()
    local["state"] = {i: {k: _clone(v) for k, v in m.items()} for i, m in enumerate(mine) if m}
    for group, hyper in zip(local["param_groups"], groups):
        group.update(hyper)
    optimizer.load_state_dict(local)


def layer_names(parts: nn.Module, strip: int = 1) -> list[list[str]]:
    """Every model key of each of `parts`' parameters, in parts.parameters() order.

    strip: leading key components to drop ('0.3.weight', chunk 0's layer 3 -> '3.weight').
    """
    keys: dict[int, list[str]] = {}
    for key, p in parts.named_parameters(remove_duplicate=False):
        keys.setdefault(id(p), []).append(key.split(".", strip)[strip])
    return [keys[id(p)] for p in parts.parameters()]
