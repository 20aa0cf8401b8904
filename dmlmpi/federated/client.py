"""Local training of one federated client at a time, on one rank or on a rank group (cross-silo).

The model's parameters and gradients are views into two flat tensors, so loading the global
weights, taking an SGD step (with the FedProx and SCAFFOLD corrections) and computing the client's
delta are each one vector operation. On a group of N ranks each local minibatch is split over the
ranks and their gradient sums are all-reduced: the same step as one rank on the whole minibatch.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.data import rank_share
from dmlmpi.federated.rounds import shuffle_seed
from dmlmpi.parallel.flat import view_into


@contextmanager
def small_batch_kernels() -> Iterator[None]:
    """Use PyTorch's own CPU convolution kernels: half the time of oneDNN's on client-sized batches here."""
    saved = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = saved


@dataclass
class LocalResult:
    """What a client sends back: delta, sample count, steps, mean training loss, SCAFFOLD control delta, start loss."""

    delta: np.ndarray
    examples: int
    steps: int
    loss: float
    control_delta: np.ndarray | None = None
    start_loss: float | None = None  # mean loss over the client's samples at the global weights (q-FedAvg)


class LocalTrainer:
    """Trains clients in turn from the global weights with plain SGD (plus FedProx / SCAFFOLD terms)."""

    def __init__(self, model: nn.Module, x: np.ndarray, y: np.ndarray, group: MPI.Comm, device: torch.device,
                 lr: float, momentum: float = 0.0, prox_mu: float = 0.0) -> None:
        """Flatten the model's parameters into views of one vector; keep the training data as tensors."""
        if any(b.is_floating_point() for b in model.buffers()):
            raise ValueError("federated mode averages parameters only: models with floating buffers "
                             "(e.g. BatchNorm statistics) are not supported")
        self.model, self.group, self.device = model.to(device), group, device
        self.lr, self.momentum, self.prox_mu = lr, momentum, prox_mu
        params = list(self.model.parameters())
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        self.size = self.flat.numel()
        # one extra slot after the gradient carries the loss, so one all-reduce serves both in a group
        self.grad_buf = torch.zeros(self.size + 1, device=device)
        view_into(params, self.flat, self.grad_buf)
        self.grad = self.grad_buf[:self.size]
        self.velocity = torch.zeros_like(self.flat)
        self.x = torch.from_numpy(np.ascontiguousarray(x)).to(device)
        self.y = torch.from_numpy(np.ascontiguousarray(y)).to(device)

    def weights(self) -> np.ndarray:
        """The current flat weights as a float32 numpy copy."""
        return self.flat.detach().cpu().numpy().copy()

    def load(self, weights: np.ndarray) -> None:
        """Set the model to the given flat weights."""
        self.flat.copy_(torch.from_numpy(np.asarray(weights, dtype=np.float32)).to(self.device))

    def train(self, client: int, indices: np.ndarray, global_weights: torch.Tensor, round_: int, seed: int,
              epochs: int, batch: int, control: torch.Tensor | None = None,
              server_control: torch.Tensor | None = None, start_loss: bool = False) -> LocalResult:
        """Run `epochs` of local SGD on the client's samples from the global weights; return its delta.

        start_loss: first score the global weights on all the client's samples (q-FedAvg's F_k).
        """
        global_weights = global_weights.to(self.device)  # the server's vectors arrive in host memory
        if server_control is not None:
            server_control = server_control.to(self.device)
        self.flat.copy_(global_weights)
        self.velocity.zero_()
        gen = torch.Generator().manual_seed(shuffle_seed(seed, round_, client))
        idx = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        n = len(idx)
        bsz = n if batch == 0 else batch
        # the client's samples, gathered once; each epoch permutes them once and takes contiguous slices
        x_client, y_client = self.x[idx], self.y[idx]
        rank, size = self.group.Get_rank(), self.group.Get_size()
        first = self._mean_loss(x_client, y_client, rank, size) if start_loss else None
        steps, loss_total = 0, torch.zeros((), device=self.device)
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(self.device)
            x_epoch, y_epoch = x_client[perm], y_client[perm]
            for start in range(0, n, bsz):
                count = min(bsz, n - start)
                self.grad.zero_()
                if size == 1:
                    loss = nn.functional.cross_entropy(self.model(x_epoch[start:start + count]),
                                                       y_epoch[start:start + count])
                    loss.backward()
                    loss_total += loss.detach()
                else:
                    self._group_backward(x_epoch[start:start + count], y_epoch[start:start + count], rank, size)
                    loss_total += self.grad_buf[self.size]
                self._sgd_step(global_weights, control, server_control)
                steps += 1
        delta = (self.flat - global_weights).cpu().numpy()
        result = LocalResult(delta, n, steps, float(loss_total) / max(1, steps), start_loss=first)
        if control is not None and server_control is not None and steps:
            # SCAFFOLD option II: c_i+ = c_i - c + (x - y_i) / (K * lr); send c_i+ - c_i, keep c_i+
            new_control = control - server_control - (self.flat - global_weights) / (steps * self.lr)
            result.control_delta = (new_control - control).cpu().numpy()
            control.copy_(new_control)
        return result

    @torch.no_grad()
    def _mean_loss(self, x: torch.Tensor, y: torch.Tensor, rank: int, size: int, chunk: int = 4096) -> float:
        """Mean cross-entropy of the current weights over (x, y); in a group each rank scores its share."""
        mine = torch.from_numpy(rank_share(np.arange(len(y)), rank, size)).to(self.device)
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        self.model.eval()  # the loss of the model itself, not of a dropout sample of it
        for start in range(0, len(mine), chunk):
            part = mine[start:start + chunk]
            total += nn.functional.cross_entropy(self.model(x[part]), y[part], reduction="sum").double()
        self.model.train()
        if size > 1:
            # the group's sum of per-sample losses
            dcomm.allreduce(total, comm=self.group, inplace=True)
        return float(total) / max(1, len(y))

    def _group_backward(self, x: torch.Tensor, y: torch.Tensor, rank: int, size: int) -> None:
        """This rank's share of one minibatch; the group's all-reduce leaves the whole batch's gradient and loss."""
        mine = torch.from_numpy(rank_share(np.arange(len(y)), rank, size)).to(self.device)
        loss = torch.zeros((), device=self.device)
        if len(mine):
            # sum of per-sample losses / whole minibatch: the shares' gradients add up to the mean's
            loss = nn.functional.cross_entropy(self.model(x[mine]), y[mine], reduction="sum") / len(y)
            loss.backward()
        self.grad_buf[self.size] = loss.detach()
        # all-reduce over the client's rank group: gradient and loss of the whole minibatch
        dcomm.allreduce(self.grad_buf, comm=self.group, inplace=True)

    @torch.no_grad()
    def _sgd_step(self, global_weights: torch.Tensor, control: torch.Tensor | None,
                  server_control: torch.Tensor | None) -> None:
        """w -= lr * (g + mu (w - w_global) - c_i + c), with optional heavy-ball momentum."""
        g = self.grad
        if self.prox_mu:
            g = g + self.prox_mu * (self.flat - global_weights)
        if control is not None and server_control is not None:
            g = g - control + server_control
        if self.momentum:
            self.velocity.mul_(self.momentum).add_(g)
            g = self.velocity
        self.flat.add_(g, alpha=-self.lr)
