"""Reference models, built as nn.Sequential so that pipeline stages can slice them."""
from __future__ import annotations

import torch
from torch import nn


def mnist1d_cnn(channels: int = 32, classes: int = 10) -> nn.Sequential:
    """A 1-D CNN for MNIST-1D (40 inputs): three strided convolutions, then a linear classifier."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),  # (batch, 40) -> (batch, 1 channel, 40)
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),  # -> 19
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # -> 10
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # -> 5
        nn.Flatten(),
        nn.Linear(channels * 5, classes),
    )


def mlp(sizes: tuple[int, ...] = (40, 256, 256, 10)) -> nn.Sequential:
    """A plain multi-layer perceptron with ReLU between layers."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


MODELS = {"cnn": mnist1d_cnn, "mlp": mlp}


def build(name: str, seed: int) -> nn.Sequential:
    """The named model with weights drawn from `seed` (same on every rank)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    return MODELS[name]()
