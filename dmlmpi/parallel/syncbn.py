"""SyncBatchNorm: batch normalization over the global batch, however it is split across ranks.

Plain BatchNorm under data parallelism normalizes each rank's share with that share's statistics:
with small per-rank batches the statistics are noisy and the model trained is not the one a single
process would train on the global batch. SyncBatchNorm computes mean and variance over every
rank's samples, so N ranks with global batch B match one process with batch B (gradients and
running statistics too). torch's own SyncBatchNorm refuses CPU tensors; this one works on any device
the collectives handle.

Per training step, one small collective each way (Ioffe & Szegedy 2015 for the math; Chan et
al. 1979 for combining moments):

- forward: one all-reduce of each rank's count and per-channel sums, from which every rank gets
  the global mean and variance (the same bits everywhere);
- backward: one all-reduce of the per-channel sums of dy and dy * x_hat, the two terms through
  which every sample's gradient depends on the whole batch.

The statistics travel on a companion duplicate of the communicator, never on the one DataParallel
reduces gradients on from its own thread: collectives from two threads on one communicator could
be matched across ranks in different orders.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn
from torch.nn import functional as F

from dmlmpi import comm as dcomm
from dmlmpi.comm.context import companion


def channel_dims(x: torch.Tensor) -> list[int]:
    """The dimensions BatchNorm reduces over: all but the channel dimension 1."""
    return [0, *range(2, x.dim())]


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in the type its statistics are computed in: float32 for 16-bit floats, else its own."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def local_sums(x: torch.Tensor) -> np.ndarray:
    """[count, sum per channel, M2 + count * mean^2 per channel] of x, one float64 row on the host.

    M2, the sum of squared deviations from x's own mean, is computed in two passes (no
    cancellation); adding count * mean^2 makes the rows of all ranks add up (see global_moments).
    """
    channels = x.shape[1]
    count = x.numel() // channels
    row = np.zeros(1 + 2 * channels)  # a rank without samples adds nothing
    row[0] = count
    if count:
        dims = channel_dims(x)
        wide = _wide(x)
        mean = wide.mean(dims, keepdim=True)
        m2 = (wide - mean).square_().sum(dims)
        mean_m2 = torch.cat([mean.reshape(-1), m2]).double().cpu().numpy()
        row[1:1 + channels] = count * mean_m2[:channels]
        row[1 + channels:] = mean_m2[channels:] + count * np.square(mean_m2[:channels])
    return row


def global_moments(sums: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean and biased variance per channel of the whole batch, from local_sums summed over ranks.

    Chan et al.'s combination, M2 = sum_r M2_r + sum_r n_r mean_r^2 - n mean^2, in float64: the
    subtraction loses about eps64 * (mean / std)^2 of the variance, far below float32 data's own
    resolution, and needs one all-reduce, where combining pairwise would gather every rank's row.
    """
    channels = (len(sums) - 1) // 2
    total = sums[0]
    mean = sums[1:1 + channels] / total
    m2 = np.maximum(sums[1 + channels:] - total * np.square(mean), 0.0)
    return int(total), mean, m2 / total


def _tensor(values: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Per-channel host values as a tensor of like's dtype and device."""
    if like.is_cpu:  # numpy's cast and a shared-memory wrap: a few microseconds less than torch's .to()
        return torch.from_numpy(values.astype(np.float64 if like.dtype == torch.float64 else np.float32))
    return torch.from_numpy(values).to(device=like.device, dtype=like.dtype)


def _lerp_(stat: torch.Tensor, values: np.ndarray, weight: float) -> None:
    """stat += weight * (values - stat), in place (a running statistic)."""
    if stat.is_cpu and stat.dtype != torch.bfloat16:
        view = stat.numpy()  # the buffer itself, through numpy: cheaper per call on a few hundred bytes
        view += weight * (values - view)
    else:
        stat.lerp_(torch.from_numpy(values).to(stat), weight)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize x with global batch statistics; backward all-reduces the two per-channel sums.

    The element-wise passes are torch's own batch-norm kernels in their eval form (given mean and
    variance); the per-channel arithmetic runs in numpy on the host, where the statistics travel
    (a few hundred bytes: host collectives, whatever device x is on). With the formulas written
    out in torch ops and the moments gathered (a guarded all-gather: two meetings of the ranks),
    SyncBatchNorm made the 2-rank `bench dp --models bn-cnn` step 110% longer than BatchNorm's;
    this way, 63% (see the README).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, eps: float,
                momentum: float, comm: MPI.Comm) -> torch.Tensor:
        # the batch's count and per-channel sums over all ranks: the same bits everywhere
        total, mean, var = global_moments(dcomm.allreduce(local_sums(x), op="sum", comm=comm, inplace=True))
        if total <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel over all ranks in training, "
                             f"got {total} (input of shape {tuple(x.shape)} on this rank)")
        wide = _wide(x)
        mean_t, var_t = _tensor(mean, wide), _tensor(var, wide)
        if running_mean is not None and running_var is not None:
            # moved toward the batch's mean and unbiased variance, as BatchNorm does
            _lerp_(running_mean, mean, momentum)
            _lerp_(running_var, var * (total / (total - 1)), momentum)
        ctx.save_for_backward(x, weight, mean_t, var_t)
        ctx.total, ctx.eps, ctx.comm, ctx.var = total, eps, comm, var
        ctx.bias_dtype = None if bias is None else bias.dtype
        # (x - mean) / sqrt(var + eps) * weight + bias, in one pass
        return F.batch_norm(wide, mean_t, var_t, weight, bias, False, 0.0, eps).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Any, ...]:
        x, weight, mean, var = ctx.saved_tensors
        wide = _wide(x)
        if wide.numel() == 0:  # no samples here (torch's kernel dies of SIGFPE on empty input)
            grad_x, sum_dy_xhat, sum_dy = torch.zeros_like(wide), torch.zeros_like(mean), torch.zeros_like(mean)
        else:
            # one pass: dy * weight / sqrt(var + eps), and this rank's sums of dy * x_hat and of dy per channel
            grad_x, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy.to(wide.dtype), wide, weight, mean, var, None, None, False, ctx.eps,
                [ctx.needs_input_grad[0], True, True])
        if ctx.needs_input_grad[0]:  # the same on every rank (same model), so all ranks join this collective
            # the global sums of dy and dy * x_hat per channel: every input's gradient depends on them
            sums = dcomm.allreduce(torch.cat([sum_dy, sum_dy_xhat]).double().cpu().numpy(), op="sum",
                                   comm=ctx.comm, inplace=True)
            channels = x.shape[1]
            scale = 1.0 / np.sqrt(ctx.var + ctx.eps)
            if weight is not None:
                scale *= weight.detach().double().cpu().numpy()
            mean_dy, mean_dy_xhat = sums[:channels] / ctx.total, sums[channels:] / ctx.total
            # the rest of the gradient, -scale * (mean_dy + x_hat * mean_dy_xhat), is itself a
            # batch norm of x with the same statistics: weight -scale*mean_dy_xhat, bias -scale*mean_dy
            grad_x.add_(F.batch_norm(wide, mean, var, _tensor(-scale * mean_dy_xhat, wide),
                                     _tensor(-scale * mean_dy, wide), False, 0.0, ctx.eps))
            grad_x = grad_x.to(x.dtype)
        # weight and bias see this rank's samples only: DataParallel averages them like any gradient
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
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
