"""Mixed precision: autocast for the forward, and a dynamic loss scaler whose skip decision every rank shares.

bfloat16 has float32's exponent range and needs no scaling. float16 does: gradients smaller than
2^-24 vanish, so the loss is multiplied by a large scale before backward and the gradients divided
by it after; an overflow (inf or NaN) skips the step and halves the scale, and every
`growth_interval` clean steps double it (torch's GradScaler, DeepSpeed's dynamic loss scale). Under
data parallelism every rank holds the same averaged gradients and so sees the same overflow; a
pipeline's stages do not: an overflow on one stage must skip the step on all of them, or the
stages' parameters would stop belonging to one model. So the overflow flag goes through one
all-reduce over the stages' communicator.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterable

import numpy as np
import torch
from mpi4py import MPI

from dmlmpi import comm as dcomm

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp: str | None, device: torch.device) -> ContextManager[Any]:
    """torch.autocast in the chosen 16-bit type on this device; a no-op for None or "none"."""
    if amp in (None, "none"):
        return contextlib.nullcontext()
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp: unknown precision {amp!r}; choose from none, {', '.join(AMP_DTYPES)}")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


class DynamicLossScaler:
    """Scale the loss up, unscale the gradients, skip steps that overflowed on any rank of `comm`, adapt the scale."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, comm: MPI.Comm | None = None) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError(f"DynamicLossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, "
                             f"growth_interval >= 1; got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.comm = growth_interval, comm
        self.clean_steps = 0  # steps without overflow since the scale last changed
        self.skipped = 0  # steps skipped for an overflow, over the whole run

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide every gradient by the scale; True when all are finite on every rank of comm (else skip the step)."""
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1)
        inv = torch.full((1,), 1.0 / self.scale)
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _), group in by_device.items():
            # torch's own fused kernel: unscale in place and raise the flag on any inf or NaN
            flag = found.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, flag, inv.to(device))
            found = torch.maximum(found, flag.cpu())
        overflow = bool(found.item())
        if self.comm is not None and self.comm.Get_size() > 1:
            # all-reduce: an overflow on any stage skips the step on every stage
            overflow = bool(dcomm.allreduce(np.array([int(overflow)], dtype=np.int32), op="max", comm=self.comm)[0])
        return not overflow

    def update(self, stepped: bool) -> None:
        """After a step (stepped=True) or a skip: grow the scale after growth_interval clean steps, halve it on a skip."""
        if not stepped:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: the scale and the counters."""
        return dict(scale=self.scale, clean_steps=self.clean_steps, skipped=self.skipped)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from state_dict()."""
        self.scale, self.clean_steps, self.skipped = float(state["scale"]), int(state["clean_steps"]), int(state["skipped"])
