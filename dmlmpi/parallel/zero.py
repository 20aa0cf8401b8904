"""ZeroRedundancyOptimizer: optimizer state split over the data-parallel ranks (ZeRO stage 1).

Under plain data parallelism every rank holds the whole optimizer state (Adam: two more copies of
the parameters) and applies the same update to the same parameters. Here the parameters are laid
end to end in one flat vector, cut into n equal shards, and rank r keeps state for, and updates,
shard r only; one all-gather then gives every rank every updated shard (Rajbhandari et al.,
"ZeRO", 2020, stage 1; torch's ZeroRedundancyOptimizer and DeepSpeed's stage 1 do the same).

Used with DataParallel, which has already averaged the gradients when `step()` runs:

    model = DataParallel(net)
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=1e-3)

The update of an element-wise optimizer (SGD, momentum, Adam, AdamW: each element's new value
depends only on that element's gradient and state) applied shard by shard equals the update of the
whole model, so the parameters match single-process training. Optimizers that look at whole
tensors (LAMB's or LARS's per-layer norms) would not, and a shard may cut a tensor: use those
without ZeRO.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm


def shard_bounds(total: int, n: int, rank: int) -> tuple[int, int]:
    """Element range [start, stop) of rank's shard of a flat vector of `total` elements padded to n equal shards."""
    size = -(-total // n)  # ceil: every shard the same length, the last one padded
    return rank * size, (rank + 1) * size


def overlaps(sizes: list[int], start: int, stop: int) -> list[tuple[int, int, int, int]]:
    """For each tensor (laid end to end) that meets [start, stop): (index, from, to within it, offset in the shard)."""
    out, offset = [], 0
    for i, n in enumerate(sizes):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset, lo - start))
        offset += n
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors an optimizer holds."""
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))


class ZeroRedundancyOptimizer(torch.optim.Optimizer):
    """`optimizer_class` over 1/n of the parameters on each rank of `comm`; `step()` all-gathers the rest."""

    def __init__(self, params: Iterable[nn.Parameter], optimizer_class: Callable[..., torch.optim.Optimizer],
                 comm: MPI.Comm | None = None, **defaults: Any) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("ZeroRedundancyOptimizer: no parameters that require gradients")
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"ZeroRedundancyOptimizer: parameters must share one dtype and device (one flat "
                             f"vector); got {sorted(str(k) for k in kinds)}")
        self.comm = MPI.COMM_WORLD if comm is None else comm
        n, rank = self.comm.Get_size(), self.comm.Get_rank()
        self._params = params
        self._sizes = [p.numel() for p in params]
        total = sum(self._sizes)
        start, stop = shard_bounds(total, n, rank)
        # every parameter becomes a view into one flat vector (padded to n equal shards), so that
        # the all-gather writes the model in place and model.load_state_dict() reaches the shards
        self._flat = torch.zeros(shard_bounds(total, n, n - 1)[1], dtype=params[0].dtype, device=params[0].device)
        offset = 0
        for p, size in zip(params, self._sizes):
            self._flat[offset:offset + size].copy_(p.detach().reshape(-1))
            p.data = self._flat[offset:offset + size].view_as(p)
            offset += size
        self._total, self._start, self._stop = total, start, stop
        self._pieces = overlaps(self._sizes, start, stop)
        # this rank's shard, as the one parameter its local optimizer knows
        self._shard = nn.Parameter(self._flat[start:stop])
        self._shard.grad = torch.zeros_like(self._shard)
        self.optim = optimizer_class([self._shard], **defaults)
        # the parameters as schedulers see them, with the local optimizer's full defaults (betas,
        # momentum: OneCycleLR cycles them); step() passes any change on to the local optimizer
        super().__init__(params, dict(self.optim.defaults))
        self._made = True

    def _sync_hyperparameters(self) -> None:
        """Learning-rate schedulers change this optimizer's param_groups: pass the values on to the local one."""
        for key, value in self.param_groups[0].items():
            if key != "params":
                self.optim.param_groups[0][key] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once made: the flat vector and its shards are fixed at construction."""
        if getattr(self, "_made", False):  # (torch's Optimizer.__init__ adds the first group itself)
            raise NotImplementedError("ZeroRedundancyOptimizer: parameters cannot be added after construction; "
                                      "make a new one over all of them")
        super().add_param_group(param_group)

    def _check_in_place(self) -> None:
        """The parameters must still be views of the flat vector: model.to(), .double() and the like replace them."""
        base, offset = self._flat.data_ptr(), 0
        for i, (p, size) in enumerate(zip(self._params, self._sizes)):
            if p.data_ptr() != base + offset * self._flat.element_size():
                raise RuntimeError(f"ZeroRedundancyOptimizer: parameter {i} (shape {tuple(p.shape)}) no longer lives "
                                   "in the optimizer's flat vector (moved or converted after the optimizer was "
                                   "made); make the optimizer after moving the model")
            offset += size

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update this rank's shard from its slice of the (already averaged) gradients; then all-gather every shard."""
        self._check_in_place()  # else the update would silently miss the model
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad = self._shard.grad
        grad.zero_()  # padding and parameters without a gradient contribute zeros
        for i, lo, hi, at in self._pieces:
            g = self._params[i].grad
            if g is not None:
                grad[at:at + hi - lo].copy_(g.reshape(-1)[lo:hi])
        self._sync_hyperparameters()
        self.optim.step()
        # all-gather: every rank's updated shard, in rank order, into the flat vector the parameters
        # view, in place (this rank's shard is already there: the local optimizer updated it)
        dcomm.allgather_inplace(self._flat, comm=self.comm)
        return loss

    def local_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (tensors only)."""
        return state_bytes(self.optim)

    def state_dict(self) -> dict[str, Any]:
        """The whole optimizer state, gathered from every rank (collective): any world size can load it."""
        # copies: the live step counter is a tensor that later steps increment in place
        mine = {key: (value.detach().cpu().clone() if torch.is_tensor(value) else value)
                for key, value in self.optim.state.get(self._shard, {}).items()}
        shards = self.comm.allgather(mine)  # pickled: checkpoint time only
        state: dict[str, Any] = {}
        for key, value in shards[0].items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self._stop - self._start:
                # per-element state (momentum, Adam's moments): the shards end to end, padding dropped
                state[key] = torch.cat([s[key] for s in shards])[:self._total]
            else:
                state[key] = value  # per-shard scalars such as Adam's step count: the same on every rank
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        return {"zero_state": state, "param_groups": groups, "world_size": self.comm.Get_size()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take this rank's part of a state from state_dict() (saved at any world size)."""
        full = state_dict["zero_state"]
        mine: dict[str, Any] = {}
        for key, value in full.items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self._total:
                shard = torch.zeros(self._stop - self._start, dtype=value.dtype)
                piece = value[self._start:min(self._stop, self._total)]
                shard[:len(piece)] = piece
                mine[key] = shard.to(self._shard.device)
            else:
                mine[key] = value.clone() if torch.is_tensor(value) else value  # not the caller's tensor
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self._sync_hyperparameters()
        local = self.optim.state_dict()
        local["state"] = {0: mine} if mine else {}
        self.optim.load_state_dict(local)

