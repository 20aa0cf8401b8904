"""What the ZeRO-2 and ZeRO-3 tests share: the global data, its batches, and one process's AdamW run."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

BATCH = 13  # samples per global batch: uneven over 2, 3, 4 and 8 ranks


def data(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random global data on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def batch(s: int) -> torch.Tensor:
    """Global batch s."""
    return torch.arange(s * BATCH, (s + 1) * BATCH) % 64


def zeros_for_missing(model: nn.Module) -> None:
    """A trainable parameter without a gradient gets zeros, as the sharded wrappers count it (weight decay moves it)."""
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def one_process(make_model: Callable[[], nn.Module], steps: int,
                clip: float = 0.0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """One process, plain AdamW on whole batches (clipped by torch when clip > 0)."""
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1)
    x, y = data()
    for s in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch(s)]), y[batch(s)]).backward()
        zeros_for_missing(model)
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
    return model, opt
