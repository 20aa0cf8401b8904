"""Cut an nn.Sequential into consecutive stages: by layer count, parameter count, measured time, or by hand.

`balanced_cuts` is the classic linear partition: contiguous parts that minimise the largest part's
cost (dynamic programming over cut points), every part at least one layer.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

from dmlmpi.comm.ring import chunk_bounds

METHODS = ("uniform", "parameters", "time")


def balanced_cuts(costs: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """[start, stop) layer ranges of `parts` contiguous groups minimising the largest group's cost."""
    n = len(costs)
    if parts < 1 or parts > n:
        raise ValueError(f"cannot cut {n} layers into {parts} stages (each stage needs at least one layer)")
    # a tiny cost per layer breaks ties between equal splits toward equal layer counts
    unit = (sum(costs) or 1.0) * 1e-6
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c + unit)
    inf = float("inf")
    # best[k][i]: the smallest possible largest cost of cutting the first i layers into k parts
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):  # the last part is layers j..i-1
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return bounds[::-1]


def layer_times(module: nn.Sequential, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward per layer on `sample` (the median of `repeats` runs)."""
    runs: list[list[float]] = []
    for _ in range(repeats + 1):  # the first run warms up and is dropped
        x, times = sample.detach(), []
        for layer in module:
            x = x.detach().requires_grad_(x.is_floating_point())
            t0 = time.perf_counter()
            y = layer(x)
            if y.requires_grad:
                y.backward(torch.ones_like(y))
            times.append(time.perf_counter() - t0)
            x = y
        runs.append(times)
    runs = runs[1:]
    return [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(len(module))]


def layer_costs(module: nn.Sequential, method: str, sample: torch.Tensor | None = None) -> list[float]:
    """Each layer's cost under `method`."""
    if method == "uniform":
        return [1.0] * len(module)
    if method == "parameters":
        return [float(sum(p.numel() for p in layer.parameters())) for layer in module]
    if method == "time":
        if sample is None:
            raise ValueError("partition 'time' measures each layer: give a sample input batch")
        return layer_times(module, sample)
    raise ValueError(f"unknown partition {method!r}; choose from {', '.join(METHODS)} or a list of cut points")


def partition(module: nn.Sequential, parts: int, method: str | Sequence[int] = "parameters",
              sample: torch.Tensor | None = None) -> tuple[list[tuple[int, int]], list[float]]:
    """Layer ranges of `parts` stages, and each layer's cost; method may be explicit cut points."""
    n = len(module)
    if not isinstance(method, str):
        points = list(method)
        if len(points) != parts - 1 or sorted(set(points)) != points or (points and not 0 < points[0] <= points[-1] < n):
            raise ValueError(f"explicit partition: need {parts - 1} increasing cut points between 1 and {n - 1}, got {points}")
        edges = [0, *points, n]
        return [(edges[i], edges[i + 1]) for i in range(parts)], [1.0] * n
    costs = layer_costs(module, method, sample)
    if method == "uniform":
        if parts > n:
            raise ValueError(f"cannot cut {n} layers into {parts} stages (each stage needs at least one layer)")
        return chunk_bounds(n, parts), costs
    return balanced_cuts(costs, parts), costs


def shared_parameters(module: nn.Sequential, bounds: Sequence[tuple[int, int]]) -> list[tuple[int, tuple[int, ...]]]:
    """Parameters that layers of several stages use (tied weights): (index in module.parameters(), the stages)."""
    index = {id(p): i for i, p in enumerate(module.parameters())}  # parameters() lists each object once
    stages_of: dict[int, set[int]] = {}
    for stage, (a, b) in enumerate(bounds):
        for layer in range(a, b):
            for p in module[layer].parameters():
                stages_of.setdefault(index[id(p)], set()).add(stage)
    return [(i, tuple(sorted(st))) for i, st in sorted(stages_of.items()) if len(st) > 1]


def describe(module: nn.Sequential, bounds: list[tuple[int, int]], costs: list[float], method: str) -> str:
    """A table of the partition: stage, its layers, parameters, estimated cost."""
    unit = "s" if method == "time" else ""
    total = sum(costs) or 1.0
    lines = [f"partition ({method}) of {len(module)} layers into {len(bounds)} stages:"]
    for s, (a, b) in enumerate(bounds):
        names = ", ".join(f"{i}:{type(module[i]).__name__}" for i in range(a, b))
        params = sum(p.numel() for i in range(a, b) for p in module[i].parameters())
        cost = sum(costs[a:b])
        shown = f"{cost * 1e3:.2f} ms" if unit else f"{cost:g}"
        lines.append(f"  stage {s}: layers {a}-{b - 1} [{names}]  params {params}  cost {shown} ({100 * cost / total:.0f}%)")
    return "\n".join(lines)
