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


def block_layout(sizes: list[int], groups: list[list[int]], n: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Each tensor's offset in the flat vector, and each block's range: the groups end to end, each padded to n equal pieces."""
    if sorted(i for g in groups for i in g) != list(range(len(sizes))):
        raise ValueError(f"block_layout: the groups {groups} must hold each of the {len(sizes)} tensors once")
    offsets, blocks, at = [0] * len(sizes), [], 0
    for group in groups:
        start = at
        for i in group:
            offsets[i] = at
            at += sizes[i]
        at = start + shard_bounds(at - start, n, n - 1)[1]  # padded: n pieces of one length
        blocks.append((start, at))
    return offsets, blocks


def overlaps(sizes: list[int], start: int, stop: int,
             offsets: list[int] | None = None) -> list[tuple[int, int, int, int]]:
    """For each tensor that meets [start, stop): (index, from, to within it, offset in the range).

    The tensors lie at `offsets` in the flat vector (default: end to end).
    """
    out, offset = [], 0
    for i, n in enumerate(sizes):
        if offsets is not None:
            offset = offsets[i]
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            out.append((i, lo - offset, hi - offset, lo - start))
        offset += n
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state tensors an optimizer holds on this rank (a DTensor's local part: torch FSDP's state)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for state in optimizer.state.values()
             for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in local)


def _runs(sizes: list[int], offsets: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The flat range [start, stop) as runs (offset in the range, start in the parameters end to end, length)."""
    ends = [0]
    for n in sizes:
        ends.append(ends[-1] + n)
    runs: list[tuple[int, int, int]] = []
    for i, lo, hi, at in overlaps(sizes, start, stop, offsets):
        begin = ends[i] + lo
        if runs and runs[-1][0] + runs[-1][2] == at and runs[-1][1] + runs[-1][2] == begin:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + hi - lo)  # continues the last run in both orders
        else:
            runs.append((at, begin, hi - lo))
    return runs


def grad_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the gradients the tensors hold (those without one count nothing)."""
    return sum(t.grad.numel() * t.grad.element_size() for t in tensors if t.grad is not None)


def block_pieces(blocks: list[tuple[int, int]], n: int, rank: int) -> list[tuple[int, int]]:
    """Rank's piece [start, stop) of each block (every block cut into n equal pieces)."""
    return [(a + rank * ((b - a) // n), a + (rank + 1) * ((b - a) // n)) for a, b in blocks]


class ShardOptimizer(torch.optim.Optimizer):
    """`optimizer_class` over this rank's pieces of a flat layout of the parameters; state_dict() is the whole state.

    The layout: parameters of `sizes` at `offsets` in a flat vector of `blocks`, each block cut into
    n equal pieces; `shards[j]` holds this rank's piece of block j. Per-element state is saved as
    one vector over the parameters end to end in their given order, whatever the layout, so a state
    saved by any stage of ZeRO at any world size loads into any other. `visible` are the
    parameters schedulers and zero_grad() see.
    """

    shard_gradients = False  # True: the caller reduces gradients straight into the shards; zero_grad clears them

    def __init__(self, visible: list[nn.Parameter], shards: list[nn.Parameter], sizes: list[int],
                 offsets: list[int], blocks: list[tuple[int, int]],
                 optimizer_class: Callable[..., torch.optim.Optimizer], comm: MPI.Comm, **defaults: Any) -> None:
        self.comm = comm
        self._sizes, self._offsets, self._blocks, self._shards = sizes, offsets, blocks, shards
        self._total = sum(sizes)
        self._pieces = block_pieces(blocks, comm.Get_size(), comm.Get_rank())
        self._runs = [_runs(sizes, offsets, a, b) for a, b in self._pieces]
        self.optim = optimizer_class(shards, **defaults)
        # the parameters as schedulers see them, with the local optimizer's full defaults (betas,
        # momentum: OneCycleLR cycles them); step() passes any change on to the local optimizer
        super().__init__(visible, dict(self.optim.defaults))
        self._made = True

    def _sync_hyperparameters(self) -> None:
        """Learning-rate schedulers change this optimizer's param_groups: pass the values on to the local one."""
        for key, value in self.param_groups[0].items():
            if key != "params":
                self.optim.param_groups[0][key] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once made: the flat layout and its shards are fixed at construction."""
        if getattr(self, "_made", False):  # (torch's Optimizer.__init__ adds the first group itself)
            raise NotImplementedError(f"{type(self).__name__}: parameters cannot be added after construction; "
                                      "make a new one over all of them")
        super().add_param_group(param_group)

    def layout(self) -> tuple[list[int], list[tuple[int, int]]]:
        """Each parameter's offset in the flat vector, and each block's range in it."""
        return list(self._offsets), list(self._blocks)

    def shard_parameters(self) -> list[nn.Parameter]:
        """This rank's pieces of the flat vector, as the local optimizer's parameters (their .grad: the shard gradients)."""
        return list(self._shards)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the visible parameters' gradients and, when the caller reduces into them, the shard gradients."""
        super().zero_grad(set_to_none)
        if self.shard_gradients:
            for shard in self._shards:
                shard.grad.zero_()  # kept allocated: the reduce-scatters add into them

    def local_state_bytes(self) -> int:
        """Bytes of optimizer state held on this rank (tensors only)."""
        return state_bytes(self.optim)

    def _to_params_order(self, flat: torch.Tensor) -> torch.Tensor:
        """A per-element vector in the flat layout as the parameters end to end in their given order (no padding)."""
        return torch.cat([flat[o:o + n] for o, n in zip(self._offsets, self._sizes)])

    def _from_params_order(self, whole: torch.Tensor) -> torch.Tensor:
        """The inverse of _to_params_order: padding becomes zeros."""
        flat = torch.zeros(self._blocks[-1][1], dtype=whole.dtype)
        at = 0
        for o, n in zip(self._offsets, self._sizes):
            flat[o:o + n] = whole[at:at + n]
            at += n
        return flat

    def _per_element(self, value: Any, shard: torch.Tensor) -> bool:
        """Whether a state value holds one number per element of its shard (momentum, Adam's moments)."""
        return torch.is_tensor(value) and value.dim() == 1 and value.numel() == shard.numel()

    def shard_state(self) -> dict[str, Any]:
        """This rank's pieces of the parameters and of the per-element state, no communication (a sharded checkpoint's file).

        `ranges`: (start, stop) in the parameters end to end, in their given order (padding left
        out); `param` and each `state[key]`: the values over those ranges, one after another;
        `scalars`: the state that is one value for all pieces (Adam's step count).
        """
        keys = sorted({k for shard in self._shards for k, v in self.optim.state.get(shard, {}).items()
                       if self._per_element(v, shard)})
        ranges, param, state, scalars = [], [], {k: [] for k in keys}, {}
        for j, shard in enumerate(self._shards):
            own = self.optim.state.get(shard, {})
            for key, value in own.items():
                if key not in state:  # copies: the live step counter is a tensor that later steps increment
                    scalars[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
            for at, start, length in self._runs[j]:
                ranges.append((start, start + length))
                param.append(shard.detach()[at:at + length])
                for key in keys:  # (a piece without this state yet: zeros, as a fresh optimizer would start)
                    value = own.get(key)
                    state[key].append(value[at:at + length] if value is not None
                                      else torch.zeros(length, dtype=shard.dtype, device=shard.device))
        cat = (lambda parts: torch.cat(parts).cpu().clone() if parts else torch.zeros(0))
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        return {"ranges": ranges, "total": self._total, "param": cat(param),
                "state": {k: cat(v) for k, v in state.items()}, "scalars": scalars, "param_groups": groups}

    def load_shard_state(self, read: Callable[[str, int, int], torch.Tensor], keys: list[str],
                         scalars: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """Take this rank's pieces of the parameters and state from `read(key, start, stop)` (ranges as in shard_state).

        Any world size and any stage may have written what `read` reads: each rank asks for its own
        pieces only. `keys`: the per-element state keys; `scalars` and `param_groups` as saved.
        """
        mine: list[dict[str, Any]] = [{} for _ in self._shards]
        with torch.no_grad():
            for j, shard in enumerate(self._shards):
                for at, start, length in self._runs[j]:
                    shard[at:at + length].copy_(read("param", start, start + length))
                for key in keys:
                    value = torch.zeros_like(shard)  # the padding's state: zeros
                    for at, start, length in self._runs[j]:
                        value[at:at + length].copy_(read(key, start, start + length))
                    mine[j][key] = value
                for key, value in scalars.items():
                    mine[j][key] = value.clone() if torch.is_tensor(value) else value
        self._load_local(mine, param_groups)

    def _load_local(self, mine: list[dict[str, Any]], param_groups: list[dict[str, Any]]) -> None:
        """Give the local optimizer each piece's state and every group's hyperparameters."""
        for group, saved in zip(self.param_groups, param_groups):
            group.update(saved)
        self._sync_hyperparameters()
        local = self.optim.state_dict()
        local["state"] = {j: m for j, m in enumerate(mine) if m}
        self.optim.load_state_dict(local)

    def state_dict(self) -> dict[str, Any]:
        """The whole optimizer state, gathered from every rank (collective): any world size or layout can load it."""
        # copies: the live step counter is a tensor that later steps increment in place
        mine = [{key: (value.detach().cpu().clone() if torch.is_tensor(value) else value)
                 for key, value in self.optim.state.get(shard, {}).items()} for shard in self._shards]
        ranks = self.comm.allgather(mine)  # pickled: checkpoint time only
        n = self.comm.Get_size()
        state: dict[str, Any] = {}
        for key, value in ranks[0][0].items():
            if self._per_element(value, self._shards[0]):
                # per-element state (momentum, Adam's moments): every rank's pieces into place, padding dropped
                flat = torch.zeros(self._blocks[-1][1], dtype=value.dtype)
                for b, (a, c) in enumerate(self._blocks):
                    m = (c - a) // n
                    for q in range(n):
                        flat[a + q * m:a + (q + 1) * m] = ranks[q][b][key]
                state[key] = self._to_params_order(flat)
            else:
                state[key] = value  # per-piece scalars such as Adam's step count: the same everywhere
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        return {"zero_state": state, "param_groups": groups, "world_size": n}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take this rank's pieces of a state from state_dict() (saved at any world size, by any stage)."""
        full = state_dict["zero_state"]
        mine: list[dict[str, Any]] = [{} for _ in self._shards]
        for key, value in full.items():
            if torch.is_tensor(value) and value.dim() == 1 and value.numel() == self._total:
                flat = self._from_params_order(value)
                for j, (a, b) in enumerate(self._pieces):
                    mine[j][key] = flat[a:b].clone().to(self._shards[j].device)
            else:
                for j in range(len(self._shards)):
                    mine[j][key] = value.clone() if torch.is_tensor(value) else value  # not the caller's tensor
        self._load_local(mine, state_dict["param_groups"])


class ZeroRedundancyOptimizer(ShardOptimizer):
    """`optimizer_class` over 1/n of the parameters on each rank of `comm`; `step()` all-gathers the rest.

    groups: the parameters (indices into `params`) in blocks, each laid out in its own stretch of
    the flat vector and cut into n pieces of its own (ZeRO stage 2 cuts each gradient bucket
    this way, so that every bucket's reduce-scatter is balanced); default one block of all, in order.
    shard_gradients: True (stage 2) when the caller reduces the gradients straight into
    shard_parameters(); step() then reads those instead of the parameters' .grad.
    """

    def __init__(self, params: Iterable[nn.Parameter], optimizer_class: Callable[..., torch.optim.Optimizer],
                 comm: MPI.Comm | None = None, *, groups: list[list[int]] | None = None,
                 shard_gradients: bool = False, **defaults: Any) -> None:
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("ZeroRedundancyOptimizer: no parameters that require gradients")
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(f"ZeroRedundancyOptimizer: parameters must share one dtype and device (one flat "
                             f"vector); got {sorted(str(k) for k in kinds)}")
        comm = MPI.COMM_WORLD if comm is None else comm
        n, rank = comm.Get_size(), comm.Get_rank()
        self._params = params
        sizes = [p.numel() for p in params]
        offsets, blocks = block_layout(sizes, groups or [list(range(len(params)))], n)
        # every parameter becomes a view into one flat vector (each block padded to n equal pieces),
        # so that the all-gathers write the model in place and model.load_state_dict() reaches the shards
        self._flat = torch.zeros(blocks[-1][1], dtype=params[0].dtype, device=params[0].device)
        for p, offset, size in zip(params, offsets, sizes):
            self._flat[offset:offset + size].copy_(p.detach().reshape(-1))
            p.data = self._flat[offset:offset + size].view_as(p)
        # this rank's piece of each block, each one parameter of the local optimizer
        shards = [nn.Parameter(self._flat[a:b]) for a, b in block_pieces(blocks, n, rank)]
        for shard in shards:
            shard.grad = torch.zeros_like(shard)
        self.shard_gradients = shard_gradients
        super().__init__(params, shards, sizes, offsets, blocks, optimizer_class, comm, **defaults)
        self._within = [overlaps(sizes, a, b, offsets) for a, b in self._pieces]

    def _check_in_place(self) -> None:
        """The parameters must still be views of the flat vector: model.to(), .double() and the like replace them."""
        base = self._flat.data_ptr()
        for i, (p, offset) in enumerate(zip(self._params, self._offsets)):
            if p.data_ptr() != base + offset * self._flat.element_size():
                raise RuntimeError(f"ZeroRedundancyOptimizer: parameter {i} (shape {tuple(p.shape)}) no longer lives "
                                   "in the optimizer's flat vector (moved or converted after the optimizer was "
                                   "made); make the optimizer after moving the model")

    def load_shard_state(self, read: Callable[[str, int, int], torch.Tensor], keys: list[str],
                         scalars: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """As ShardOptimizer's; then every rank's pieces into every rank's model (collective)."""
        self._check_in_place()
        super().load_shard_state(read, keys, scalars, param_groups)
        self._gather_blocks()  # each rank read only its pieces of the parameters; the model needs all of them

    def _gather_blocks(self) -> None:
        """Every rank's piece of each block into every rank's flat vector, which the parameters view."""
        # all-gather, block by block, in rank order, in place (this rank's piece is already there)
        for a, b in self._blocks:
            dcomm.allgather_inplace(self._flat[a:b], comm=self.comm)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update this rank's shard from its slice of the (already averaged) gradients; then all-gather every shard."""
        self._check_in_place()  # else the update would silently miss the model
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.shard_gradients:
            for shard, pieces in zip(self._shards, self._within):
                grad = shard.grad
                grad.zero_()  # padding and parameters without a gradient contribute zeros
                for i, lo, hi, at in pieces:
                    g = self._params[i].grad
                    if g is not None:
                        grad[at:at + hi - lo].copy_(g.reshape(-1)[lo:hi])
        self._sync_hyperparameters()
        self.optim.step()
        self._gather_blocks()  # every rank's updated piece into the model
        return loss
