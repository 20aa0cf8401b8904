"""FullyShardedDataParallel: ZeRO stage 3, the parameters split over the ranks too, gathered layer by layer.

Stage 2 (ShardedDataParallel) still keeps every parameter whole on every rank. Stage 3
(Rajbhandari et al. 2020; DeepSpeed's stage 3, torch FSDP's FULL_SHARD) keeps 1/n of each: every
layer with parameters of its own is a unit whose trainable parameters lie end to end in one flat
vector, cut into n equal pieces, and rank r keeps piece r as the one parameter its optimizer sees.

    model = FullyShardedDataParallel(net, torch.optim.AdamW, lr=1e-3)
    loss_fn(model(x), y).backward(); model.optimizer.step(); model.optimizer.zero_grad()

A unit's whole vector exists only while the unit is in use:
- forward: just before the layer runs, an all-gather fills its vector (the parameters are views
  into it); just after, its memory is given back (the storage resized to nothing, as torch FSDP
  does: autograd's saved references stay valid and see the data again once it is refilled);
  except that in a forward that backward will follow, the unit that finished last stays whole
  until the next one finishes (or backward ends, or the optimizer steps): backward starts with it;
- backward: a hook on the layer's outputs gathers the vector again before the layer's backward
  needs it; each parameter's gradient, scaled by 1/n, goes into the unit's staging buffer and
  its .grad is freed; once the unit has all of them its vector is given back and the buffer is
  reduce-scattered, each rank adding its piece to its shard's gradient (units in backward order
  on every rank: one finished early waits for the ones before it, and one without gradients,
  an unused layer, holds the rest until backward ends).
So a rank holds its shards, their gradients and optimizer state, plus the layers in use. The
optimizer is a plain one over the shards (any element-wise optimizer: SGD, momentum, Adam, AdamW);
its step needs no communication, since the next forward gathers. Frozen parameters stay whole on
every rank, as buffers do (rank 0's, broadcast before each forward). Gradient accumulation:
call backward several times before step(); each reduces and the shard gradients add up.
Activation checkpointing (torch.utils.checkpoint) works: a forward recomputed during backward
goes through the same hooks, so its outputs gather the unit again for the backward that follows.
Between steps the sharded parameters are empty tensors (parameter_count() counts them; use
full_state_dict() or `with model.gathered():` to see them). Outputs that a later in-place
operation modifies lose the gathering hook: use such layers (ReLU(inplace=True) after a Linear)
inside a unit, not right after one.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import FusedBroadcast, broadcast_fused
from dmlmpi.telemetry import maybe_span

from .data import check_same_layout
from .zero import ShardOptimizer, block_layout, grad_bytes


def plan_units(module: nn.Module, min_params: int = 0) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """The units of `module`: (the module whose forward uses them, its trainable parameters), in module order.

    min_params 0: every module with trainable parameters of its own is a unit. Otherwise as torch
    FSDP's size-based wrapping: a submodule whose subtree holds at least min_params trainable
    elements not already in a unit below it becomes a unit with all of them, and the root takes
    whatever is left, so small layers share one gather instead of one each. Each parameter once.
    """
    if min_params < 0:
        raise ValueError(f"FullyShardedDataParallel: min_unit_params must not be negative, got {min_params}")
    seen: set[int] = set()
    if min_params == 0:
        units = []
        for m in module.modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                units.append((m, own))
        return units
    order = {id(m): i for i, m in enumerate(module.modules())}
    taken: set[int] = set()
    found: list[tuple[nn.Module, list[nn.Parameter]]] = []

    def visit(m: nn.Module) -> None:
        """Children first, so a unit takes what no unit below it took."""
        for child in m.children():
            visit(child)
        if m is not module:
            left = [p for p in m.parameters() if p.requires_grad and id(p) not in taken]
            if sum(p.numel() for p in left) >= min_params:
                taken.update(id(p) for p in left)
                found.append((m, left))
    visit(module)
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in taken]
    if rest:
        found.append((module, rest))
    return sorted(found, key=lambda unit: order[id(unit[0])])


class Unit:
    """One layer's trainable parameters as one flat vector: this rank's piece kept, the whole only while in use."""

    def __init__(self, index: int, module: nn.Module, params: list[nn.Parameter], n: int, rank: int) -> None:
        self.index, self.module, self.params = index, module, params
        self.sizes = [p.numel() for p in params]  # (kept: the parameters are empty while not gathered)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(params))]
        self.used = sum(self.sizes)
        self.length = -(-self.used // n) * n  # padded: n pieces of one length
        self.piece = self.length // n
        self.start = rank * self.piece
        self.full = torch.zeros(self.length, dtype=params[0].dtype, device=params[0].device)
        for p, at in zip(params, self.offsets):
            self.full[at:at + p.numel()].copy_(p.detach().reshape(-1))
        # each parameter's place in the vector (views stay valid while the storage comes and goes)
        self.views = [self.full[at:at + p.numel()].view_as(p) for p, at in zip(params, self.offsets)]
        self._point()
        # this rank's piece, in memory of its own (the vector's memory comes and goes)
        self.shard = nn.Parameter(self.full[self.start:self.start + self.piece].clone())
        self.nbytes = self.full.untyped_storage().nbytes()
        self.gathered = True
        self.staging: torch.Tensor | None = None  # the unit's gradients during backward
        self.got = [False] * len(params)  # which parameters' gradients this backward pass has taken
        self.arrived = 0

    def gather(self, comm: MPI.Comm, algorithm: str, timeline: Any = None) -> None:
        """Make the whole vector again: this rank's piece, then every rank's (no-op while gathered)."""
        if self.gathered:
            return
        with maybe_span(timeline, f"allgather unit {self.index}", "comm", {"bytes": self.nbytes}):
            self._gather(comm, algorithm)

    def _gather(self, comm: MPI.Comm, algorithm: str) -> None:
        """gather()'s communication and copy."""
        # all-gather: every rank's piece of this unit, in rank order (no per-call guard: every rank
        # gathers the same units in the same order, checked at construction). Into a new buffer,
        # then copied: a buffer handed to MPI is seen through numpy, and torch then refuses to
        # resize its storage, which is how the vector gives its memory back.
        whole = dcomm.allgather(self.shard.detach(), algorithm=algorithm, comm=comm, guard=False)
        self.full.untyped_storage().resize_(self.nbytes)
        self.full.copy_(whole)
        self._point()
        self.gathered = True

    def _point(self) -> None:
        """Make the parameters views into the whole vector (autograd's saved references to them see it too)."""
        for p, view in zip(self.params, self.views):
            p.data = view

    def free(self) -> None:
        """Give the whole vector's memory back; the parameters become empty tensors until the next gather."""
        if self.gathered:
            self.full.untyped_storage().resize_(0)
            for p in self.params:
                # empty, not a view of the emptied storage: reading one between steps gives no
                # elements instead of reading freed memory
                p.data = p.data.new_empty(0)
            self.gathered = False

    def take(self, i: int, scale: float) -> None:
        """Parameter i's .grad times `scale` into the staging buffer (zeros if it has none); then free the .grad."""
        if self.staging is None:
            self.staging = torch.zeros(self.length, dtype=self.full.dtype, device=self.full.device)
        p, at = self.params[i], self.offsets[i]
        if p.grad is not None:
            torch.mul(p.grad.reshape(-1), scale, out=self.staging[at:at + p.numel()])
            p.grad = None
        self.got[i] = True
        self.arrived += 1

    def reset(self) -> None:
        """Ready for the next backward pass."""
        self.got = [False] * len(self.params)
        self.arrived = 0


class FullyShardedDataParallel(nn.Module):
    """Wrap `module` for ZeRO stage 3 over `comm`; `self.optimizer` updates this rank's shards."""

    def __init__(self, module: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer],
                 comm: MPI.Comm | None = None, algorithm: str = "auto", broadcast_buffers: bool = True,
                 timeline: Any = None, min_unit_params: int = 0, **optimizer_kwargs: Any) -> None:
        super().__init__()
        if algorithm not in dcomm.ALGORITHMS:
            raise ValueError(f"FullyShardedDataParallel: unknown algorithm {algorithm!r}; "
                             f"choose from {', '.join(dcomm.ALGORITHMS)}")
        self.module = module
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.algorithm, self.timeline = algorithm, timeline
        n, rank = self.comm.Get_size(), self.comm.Get_rank()
        # units: every module with trainable parameters of its own, or (min_unit_params) subtrees of
        # at least that many elements, in module order
        groups = plan_units(module, min_unit_params)
        if not groups:
            raise ValueError("FullyShardedDataParallel: no parameters that require gradients")
        kinds = {(p.dtype, p.device) for _, ps in groups for p in ps}
        if len(kinds) > 1:
            raise ValueError(f"FullyShardedDataParallel: parameters must share one dtype and device; "
                             f"got {sorted(str(k) for k in kinds)}")
        check_same_layout(module, self.comm, [[tuple(p.shape) for p in ps] for _, ps in groups],
                          "FullyShardedDataParallel")
        # rank 0's parameters and buffers everywhere, before each rank keeps its pieces
        broadcast_fused(list(module.parameters()) + list(module.buffers()), root=0, comm=self.comm)
        self.units = [Unit(i, m, ps, n, rank) for i, (m, ps) in enumerate(groups)]
        self._where = {p: (u, i) for u in self.units for i, p in enumerate(u.params)}
        self._scale = 1.0 / n  # pre-divided as it enters the staging buffer: the sums are averages
        self._next = len(self.units) - 1  # the next unit to reduce: backward meets them last to first
        self._forwarding = False  # inside forward()
        self._kept: Unit | None = None  # the unit left whole after the forward, for the backward that starts with it
        self._backward_queued = False
        self._hooks: list[Any] = []
        for u in self.units:
            self._hooks.append(u.module.register_forward_pre_hook(self._before_forward(u)))
            self._hooks.append(u.module.register_forward_hook(self._after_forward(u)))
            for p in u.params:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        for u in self.units:
            u.free()  # from here on, each unit is whole only while it is used
        synced = list(module.buffers()) if broadcast_buffers else []
        self._sync_buffers = FusedBroadcast(synced, root=0, comm=self.comm) if synced else None
        order = [p for p in module.parameters() if p.requires_grad]  # the optimizer state's order
        self.optimizer = ShardedOptimizer(self.units, order, optimizer_class, self.comm, **optimizer_kwargs)
        self._closed = False

    # -- forward -----------------------------------------------------------------------------
    def _before_forward(self, unit: Unit) -> Callable[..., None]:
        """The unit's forward pre-hook: gather its parameters."""
        def hook(module: nn.Module, args: Any) -> None:
            unit.gather(self.comm, self.algorithm, self.timeline)
        return hook

    def _after_forward(self, unit: Unit) -> Callable[..., None]:
        """The unit's forward hook: free its parameters; if backward will come, gather them again before it.

        In a forward that backward will follow, the unit that finished last stays whole instead (the
        one finished before it is freed now): it is the one backward needs first (the root, when the
        root is a unit, as torch FSDP2 keeps its root), which saves one all-gather per step.
        """
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._forwarding and torch.is_grad_enabled():
                if self._kept is not None and self._kept is not unit:
                    self._kept.free()
                self._kept = unit
            else:  # no backward to come (evaluation), or a forward recomputed during backward
                unit.free()
            if torch.is_grad_enabled():
                for t in _tensors(output):
                    if t.requires_grad:
                        # runs when the output's gradient is ready, before the layer's own backward
                        t.register_hook(lambda grad, u=unit: self._before_backward(u))
        return hook

    def _before_backward(self, unit: Unit) -> None:
        """Gather the unit's parameters for its backward (a no-op for its other outputs: already gathered)."""
        unit.gather(self.comm, self.algorithm, self.timeline)

    # -- backward ----------------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        """A parameter's gradient is ready: into its unit's staging buffer; a complete unit is freed and reduced."""
        if not self._backward_queued:
            # run _finish once, when the autograd engine has finished this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._backward_queued = True
        unit, i = self._where[p]
        unit.take(i, self._scale)
        if unit.arrived == len(unit.params):
            unit.free()  # its backward is done: every use of its parameters has produced their gradients
            self._reduce_ready()

    def _reduce_ready(self) -> None:
        """Reduce-scatter the complete units from the next one on, in backward order (the same on every rank)."""
        while self._next >= 0 and self.units[self._next].arrived == len(self.units[self._next].params):
            self._reduce(self.units[self._next])
            self._next -= 1

    def _reduce(self, unit: Unit) -> None:
        """Reduce-scatter one unit's staging buffer and add this rank's piece to its shard's gradient."""
        # reduce-scatter: piece r of every rank's (pre-scaled) gradients summed on rank r
        with maybe_span(self.timeline, f"reduce_scatter unit {unit.index}", "comm", {"bytes": unit.nbytes}):
            mine = dcomm.reduce_scatter_inplace(unit.staging, op="sum", algorithm=self.algorithm, comm=self.comm,
                                                guard=False)
        if unit.shard.grad is None:
            unit.shard.grad = mine.clone()
        else:
            unit.shard.grad.add_(mine)  # accumulates over backward passes until zero_grad()
        unit.staging = None

    def _finish(self) -> None:
        """End of backward: units that missed gradients count zeros for them; all reduced and freed."""
        self._backward_queued = False
        for unit in self.units[:self._next + 1]:
            for i, got in enumerate(unit.got):
                if not got:  # no gradient in this pass: zeros
                    unit.take(i, self._scale)
        self._reduce_ready()
        for unit in self.units:
            unit.free()
            unit.reset()
        self._next = len(self.units) - 1
        self._kept = None

    # -- user API ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (buffers such as BatchNorm statistics first come from rank 0)."""
        if self._closed:
            raise RuntimeError("FullyShardedDataParallel: used after close(); wrap the module in a new one")
        if self._sync_buffers is not None:
            self._sync_buffers()
        self._forwarding = True  # (a forward recomputed during backward runs its hooks with this False)
        try:
            return self.module(*args, **kwargs)
        finally:
            self._forwarding = False

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Inside, every parameter is whole (collective): for reading or changing the model as a whole."""
        for u in self.units:
            u.gather(self.comm, self.algorithm)
        try:
            yield
        finally:
            for u in self.units:
                u.shard.data.copy_(u.full[u.start:u.start + u.piece])  # changes made inside are kept
                u.free()
            self._kept = None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The wrapped module's whole state_dict, on every rank (collective)."""
        with self.gathered():
            return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a whole state_dict (from full_state_dict or an unsharded model) into the shards (collective)."""
        with self.gathered():
            self.module.load_state_dict(state)

    def parameter_count(self) -> int:
        """Elements of the wrapped module's parameters, trainable (sharded) and frozen (whole)."""
        frozen = sum(p.numel() for p in self.module.parameters() if not p.requires_grad)
        return sum(u.used for u in self.units) + frozen

    def gradient_bytes(self) -> dict[str, int]:
        """Gradient memory on this rank: the shards' and any .grad now held (ShardedDataParallel's keys, no staging pool)."""
        return {"shard": grad_bytes(u.shard for u in self.units), "param_grads": grad_bytes(self.module.parameters())}

    def parameter_bytes(self) -> int:
        """Bytes of trainable parameters this rank keeps between steps: its shards' (plus any unit left gathered)."""
        return sum(u.shard.numel() * u.shard.element_size() + (u.nbytes if u.gathered else 0) for u in self.units)

    def close(self) -> None:
        """Remove the hooks and leave every parameter whole again (collective)."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        for u in self.units:
            u.gather(self.comm, self.algorithm)


def _tensors(output: Any) -> Iterable[torch.Tensor]:
    """The tensors in a module's output (a tensor, or tuples, lists and dicts of them)."""
    if torch.is_tensor(output):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


class ShardedOptimizer(ShardOptimizer):
    """`optimizer_class` over this rank's shards of the units; no communication in step(): the next forward gathers.

    Its layout is the units end to end, each padded to n pieces (as each unit's own vector is), so
    state_dict() is ZeroRedundancyOptimizer's: the whole state in the parameters' order (`order`:
    the module's trainable parameters as module.parameters() lists them, whatever the units).
    """

    def __init__(self, units: list[Unit], order: list[nn.Parameter],
                 optimizer_class: Callable[..., torch.optim.Optimizer], comm: MPI.Comm, **defaults: Any) -> None:
        index = {id(p): i for i, p in enumerate(order)}
        groups = [[index[id(p)] for p in u.params] for u in units]  # each unit one block
        sizes = [0] * len(order)
        for u in units:
            for p, n in zip(u.params, u.sizes):
                sizes[index[id(p)]] = n  # (kept by the unit: the parameters are empty when this is made)
        offsets, blocks = block_layout(sizes, groups, comm.Get_size())
        shards = [u.shard for u in units]
        self._units = units
        # the shards are what schedulers and zero_grad() see: the layers' parameters are empty between steps
        super().__init__(shards, shards, sizes, offsets, blocks, optimizer_class, comm, **defaults)

    def _free_units(self) -> None:
        """Free any unit still whole (one a forward left for its backward): the next use gathers the changed shards."""
        for u in self._units:
            u.free()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Update this rank's shards."""
        self._free_units()
        self._sync_hyperparameters()
        return self.optim.step(closure)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ShardOptimizer's (the shards' state; parameters come with load_full_state_dict)."""
        self._free_units()
        super().load_state_dict(state_dict)

    def load_shard_state(self, read: Callable[[str, int, int], torch.Tensor], keys: list[str],
                         scalars: dict[str, Any], param_groups: list[dict[str, Any]]) -> None:
        """As ShardOptimizer's: the shards' parameters and state, read by range."""
        self._free_units()
        super().load_shard_state(read, keys, scalars, param_groups)
