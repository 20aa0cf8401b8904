"""SyncBatchNorm: batch normalization over the global batch, however it is split across ranks.

Plain BatchNorm under data parallelism normalizes each rank's share with that share's statistics:
with small per-rank batches the statistics are noisy and the model trained is not the one a single
process would train on the global batch. SyncBatchNorm computes mean and variance over every
rank's samples, so N ranks with global batch B match one process with batch B (gradients and
running statistics too). torch's own SyncBatchNorm refuses CPU tensors; this one works on any device
the collectives handle.

Per training step, one small collective each way (Ioffe & Szegedy 2015 for the math; Chan et
al. 1979 for combining moments):

- forward: every rank gathers every rank's (count, mean, sum of squared deviations) per channel
  and combines them into the global mean and variance, the same bits on every rank;
- backward: one all-reduce of the per-channel sums of dy and dy * x_hat, the two terms through
  which every sample's gradient depends on the whole batch.

The statistics travel on a companion duplicate of the communicator, never on the one DataParallel
reduces gradients on from its own thread: collectives from two threads on one communicator could
be matched across ranks in different orders.
"""
from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI
from torch import nn
from torch.nn import functional as F

from dmlmpi import comm as dcomm
from dmlmpi.comm.context import companion


def channel_dims(x: torch.Tensor) -> list[int]:
    """The dimensions BatchNorm reduces over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def local_moments(x: torch.Tensor) -> torch.Tensor:
    """[count, mean per channel, sum of squared deviations per channel] of x, as one float64 row."""
    channels = x.shape[1]
    count = x.numel() // channels
    if count == 0:  # a rank without samples adds nothing (and no NaN mean) to the combination
        moments = torch.zeros(2 * channels, dtype=torch.float64, device=x.device)
    else:
        dims = channel_dims(x)
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()  # 16-bit inputs: float32 statistics
        mean = wide.mean(dims, keepdim=True)
        m2 = (wide - mean).square().sum(dims)  # two passes: no cancellation of E[x^2] - E[x]^2
        moments = torch.cat([mean.reshape(-1), m2]).double()
    return torch.cat([torch.tensor([float(count)], dtype=torch.float64, device=x.device), moments])


def combine_moments(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Global count, mean and biased variance per channel from stacked local_moments rows (Chan et al.)."""
    channels = (rows.shape[1] - 1) // 2
    counts, means, m2 = rows[:, :1], rows[:, 1:1 + channels], rows[:, 1 + channels:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    # each rank's squared deviations, plus its count times its mean's squared distance to the global mean
    m2_total = (m2 + counts * (means - mean).square()).sum(0)
    return int(total.item()), mean, m2_total / total


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize x with global batch statistics; backward all-reduces the two per-channel sums."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                momentum: float, comm: MPI.Comm) -> torch.Tensor:
        # every rank's (count, mean, M2) per channel, gathered in rank order: combined alike everywhere
        rows = dcomm.allgather(local_moments(x).unsqueeze(0), comm=comm)
        total, mean, var = combine_moments(rows)
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks in training, "
                             f"got {total} (input of shape {tuple(x.shape)} on this rank)")
        if running_mean is not None and running_var is not None:
            with torch.no_grad():  # the unbiased variance of the global batch, as BatchNorm keeps it
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_((var * total / (total - 1)).to(running_var.dtype),
                                                    alpha=momentum)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean_c, invstd = mean.to(acc).view(shape), (var + eps).rsqrt().to(acc).view(shape)
        scale = invstd if weight is None else invstd * weight.to(acc).view(shape)
        shift = -mean_c * scale if bias is None else bias.to(acc).view(shape) - mean_c * scale
        ctx.save_for_backward(x, weight, mean_c, invstd)
        ctx.total, ctx.comm, ctx.bias_dtype = total, comm, None if bias is None else bias.dtype
        return torch.addcmul(shift, x, scale).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        acc, dims = mean.dtype, channel_dims(x)
        dy_wide = dy.to(acc)
        x_hat = (x.to(acc) - mean) * invstd
        sum_dy, sum_dy_xhat = dy_wide.sum(dims), (dy_wide * x_hat).sum(dims)
        # weight and bias see this rank's samples only: DataParallel averages them like any gradient
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        grad_x = None
        if ctx.needs_input_grad[0]:  # the same on every rank (same model), so all ranks join this collective
            # the global sums of dy and dy * x_hat per channel: every input's gradient depends on them
            sums = dcomm.allreduce(torch.cat([sum_dy, sum_dy_xhat]).double(), op="sum", comm=ctx.comm).to(acc)
            channels = x.shape[1]
            shape = [1, -1] + [1] * (x.dim() - 2)
            mean_dy = (sums[:channels] / ctx.total).view(shape)
            mean_dy_xhat = (sums[channels:] / ctx.total).view(shape)
            scale = invstd if weight is None else invstd * weight.to(acc).view(shape)
            grad_x = ((dy_wide - mean_dy - x_hat * mean_dy_xhat) * scale).to(x.dtype)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics cover the whole batch across the ranks of `comm`."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, comm: MPI.Comm | None = None,
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.comm = comm  # None: MPI.COMM_WORLD, looked up when first needed

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2-D input (batch, channels, ...), got {x.dim()}-D")
        if x.shape[1] != self.num_features:
            raise ValueError(f"SyncBatchNorm: expected {self.num_features} channels in dimension 1, "
                             f"got input of shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize x: over all ranks' samples in training, with the running statistics in eval."""
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked.item())
        world = MPI.COMM_WORLD if self.comm is None else self.comm
        if not self.training or world.Get_size() == 1:
            # nothing to synchronize: eval (running statistics, or the local batch's when none are
            # kept, as torch's SyncBatchNorm does), or a world of one
            use_batch = self.training or self.running_mean is None
            track = self.training and self.track_running_stats
            return F.batch_norm(x, self.running_mean if not self.training or track else None,
                                self.running_var if not self.training or track else None,
                                self.weight, self.bias, use_batch, momentum, self.eps)
        keep = self.track_running_stats  # in training, update the running statistics when kept
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.running_mean if keep else None,
                                            self.running_var if keep else None, self.eps, momentum,
                                            companion(world, "syncbn"))

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, comm: MPI.Comm | None = None) -> nn.Module:
        """`module` with every BatchNorm layer replaced by a SyncBatchNorm on `comm` (same parameters and statistics)."""
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            converted = cls(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, comm=comm)
            if module.affine:
                with torch.no_grad():  # the very same Parameter objects: an optimizer made before still holds them
                    converted.weight, converted.bias = module.weight, module.bias
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
            converted.train(module.training)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, comm))
        return converted
