"""Gradient clipping by the norm of the whole model's gradient, when the model is spread over ranks.

`torch.nn.utils.clip_grad_norm_` sees one process's parameters. Under data parallelism that is the
whole model (every rank holds the same averaged gradients), so the local norm is the global one.
Under pipeline parallelism each stage holds a different part: the norm of the whole gradient needs
every stage's share, so each rank adds up its own |g|^p and one all-reduce over the stages
(DeepSpeed and Megatron do the same over their model-parallel groups) gives every stage the same
total, and with it the same clipping factor.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from mpi4py import MPI

from dmlmpi import comm as dcomm


def local_norm_power(grads: list[torch.Tensor], norm_type: float) -> float:
    """sum |g|^p over these gradients (max |g| for the infinity norm), in float64."""
    if math.isinf(norm_type):
        return max((float(g.detach().abs().max()) for g in grads if g.numel()), default=0.0)
    return float(sum(torch.linalg.vector_norm(g.detach(), norm_type, dtype=torch.float64) ** norm_type for g in grads))


def clip_grad_norm(parameters: Iterable[torch.nn.Parameter], max_norm: float, comm: MPI.Comm | None = None,
                   norm_type: float = 2.0, error_if_nonfinite: bool = False,
                   counted: Iterable[torch.nn.Parameter] | None = None) -> float:
    """Scale the gradients so that the norm of all of them over `comm`'s ranks is at most max_norm; returns that norm.

    `comm`: the ranks that hold *different* parameters (a pipeline's stages); None: this process
    holds the whole model. Collective over comm; every rank gets the same norm and scale.
    `counted`: the parameters whose gradients make up the norm, when not all of them (a weight tied
    across stages counts once, on one rank); every gradient is scaled.
    """
    if max_norm <= 0 or math.isnan(max_norm):
        raise ValueError(f"clip_grad_norm: max_norm must be positive, got {max_norm}")
    if norm_type <= 0:
        raise ValueError(f"clip_grad_norm: norm_type must be positive, got {norm_type}")
    grads = [p.grad for p in parameters if p.grad is not None]
    norm_grads = grads if counted is None else [p.grad for p in counted if p.grad is not None]
    mine = local_norm_power(norm_grads, norm_type)
    if comm is not None and comm.Get_size() > 1:
        # all-reduce: each stage's sum of |g|^p (or its largest |g|) into the whole model's
        mine = float(dcomm.allreduce(np.array([mine]), op="max" if math.isinf(norm_type) else "sum", comm=comm)[0])
    total = mine if math.isinf(norm_type) else mine ** (1.0 / norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(f"clip_grad_norm: the gradients' {norm_type}-norm is {total}")
    # torch's rule: scale by max_norm / (norm + 1e-6), never up (a non-finite norm scales by 0 or NaN, as there)
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.detach().mul_(coef)
    return total
