"""Reference models, built as nn.Sequential so that pipeline stages can slice them."""
from __future__ import annotations

import math

import torch
from torch import nn

# the default model of each dataset (`--model auto`)
DEFAULT_FOR = {"mnist1d": "cnn", "mnist": "convnet", "cifar10": "convnet"}


# the models with BatchNorm layers (what --sync-bn synchronizes)
WITH_BATCHNORM = ("cnn-bn",)


def mnist1d_cnn(channels: int = 32, classes: int = 10, batchnorm: bool = False) -> nn.Sequential:
    """A 1-D CNN for MNIST-1D (40 inputs): three strided convolutions, then a linear classifier.

    batchnorm: a BatchNorm1d after each convolution (model `cnn-bn`).
    """
    def norm() -> list[nn.Module]:
        return [nn.BatchNorm1d(channels)] if batchnorm else []
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),  # (batch, 40) -> (batch, 1 channel, 40)
        nn.Conv1d(1, channels, 5, stride=2, padding=1), *norm(), nn.ReLU(),  # -> 19
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), *norm(), nn.ReLU(),  # -> 10
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), *norm(), nn.ReLU(),  # -> 5
        nn.Flatten(),
        nn.Linear(channels * 5, classes),
    )


def mlp(inputs: int, hidden: tuple[int, ...] = (256, 256), classes: int = 10) -> nn.Sequential:
    """A multi-layer perceptron on flattened inputs, ReLU between layers."""
    sizes = (inputs, *hidden, classes)
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def moe_mlp(inputs: int, hidden: int = 64, experts: int = 8, k: int = 1, classes: int = 10) -> nn.Sequential:
    """An MLP whose middle layer is a top-k mixture of `experts` MLPs (hidden -> 2 hidden -> hidden).

    Built whole, on one rank (every expert here); data-parallel training spreads the experts over the
    ranks (parallel/experts.py: spread).
    """
    from mpi4py import MPI

    from dmlmpi.parallel.experts import ExpertParallelMoE

    gate = nn.Linear(hidden, experts)
    mixture = [nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
               for _ in range(experts)]
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                         ExpertParallelMoE(gate, mixture, experts, MPI.COMM_SELF, k), nn.ReLU(),
                         nn.Linear(hidden, classes))


def convnet(channels: int, height: int, width: int, classes: int = 10) -> nn.Sequential:
    """A small 2-D CNN for MNIST (1x28x28, given flat) and CIFAR-10 (3x32x32)."""
    return nn.Sequential(
        nn.Unflatten(1, (channels, height, width)) if channels == 1 else nn.Identity(),
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 4) * (width // 4), 128), nn.ReLU(),
        nn.Linear(128, classes),
    )


def build(name: str, seed: int, sample_shape: tuple[int, ...], dataset: str = "mnist1d", experts: int = 8,
          k: int = 1) -> nn.Sequential:
    """The named model for inputs of `sample_shape`, with weights drawn from `seed` (same on every rank).

    experts, k: the mixture of model `moe`.
    """
    name = DEFAULT_FOR.get(dataset, "mlp") if name == "auto" else name
    torch.manual_seed(seed)
    if name in ("cnn", "cnn-bn"):
        if tuple(sample_shape) != (40,):
            raise ValueError(f"model {name!r} is the MNIST-1D CNN (40 inputs); inputs here are {sample_shape}")
        return mnist1d_cnn(batchnorm=name == "cnn-bn")
    if name == "mlp":
        return mlp(math.prod(sample_shape))
    if name == "moe":
        return moe_mlp(math.prod(sample_shape), experts=experts, k=k)
    if name == "linear":
        return mlp(math.prod(sample_shape), hidden=())  # logistic regression: the tiny federated benchmark model
    if name == "convnet":
        if tuple(sample_shape) == (784,):
            return convnet(1, 28, 28)
        if len(sample_shape) == 3:
            return convnet(*sample_shape)
        raise ValueError(f"model 'convnet' needs images (784 = 28x28, or CxHxW); inputs here are {sample_shape}")
    raise ValueError(f"unknown model {name!r}; choose from auto, cnn, cnn-bn, mlp, moe, linear, convnet")
