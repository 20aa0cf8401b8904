"""ShardedDataParallel: ZeRO stage 2, gradients reduce-scattered to the rank that updates them.

ZeRO stage 1 (ZeroRedundancyOptimizer under DataParallel) splits the optimizer state, but every
rank still all-reduces and holds the whole averaged gradient, of which its optimizer reads 1/n.
Stage 2 (Rajbhandari et al., "ZeRO", 2020; DeepSpeed's stage 2, fairscale's ShardedDDP, torch
FSDP's SHARD_GRAD_OP) reduces each gradient only to its owner: as backward produces gradients
they are copied, scaled by 1/n, into a bucket; a full bucket is reduce-scattered, each rank adding
its piece into the gradient of its shard, and the bucket and the parameters' .grad are freed.
A rank so holds 1/n of the gradient plus the buckets in flight instead of all of it, and sends
half what an all-reduce sends; the step's all-gather of the updated shards completes the
all-reduce's other half.

    model = ShardedDataParallel(net, torch.optim.AdamW, lr=1e-3)
    loss = criterion(model(x), y); loss.backward()    # gradients now in model.optimizer's shards
    model.optimizer.step(); model.optimizer.zero_grad()

Each bucket (parameters in reverse order, as backward reaches them) is its own block of the
optimizer's flat vector, cut into n equal pieces, so every reduce-scatter is balanced.
Staging buffers come from a pool of at most max_in_flight (2) buffers of the longest bucket's
size, kept from step to step (DeepSpeed keeps fixed reduce buffers too); a parameter that gets
no gradient holds back the buckets after its own (all ranks reduce in one order) until backward
ends, and the pool grows to hold them.
After backward the parameters' .grad are None: clip and unscale the shard gradients
(optimizer.shard_parameters()) with a norm or overflow flag reduced over the ranks.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import FusedBroadcast, broadcast_fused, plan_buckets
from dmlmpi.telemetry import maybe_span

from .data import CommThread, Future, check_same_layout
from .zero import ZeroRedundancyOptimizer, grad_bytes


class GradBucket:
    """One bucket's parameters, where they lie in its block, and its staging buffer while it fills."""

    def __init__(self, index: int, params: list[nn.Parameter], offsets: list[int], length: int) -> None:
        self.index, self.params, self.offsets, self.length = index, params, offsets, length
        self.staging: torch.Tensor | None = None  # lent from the pool by its first gradient, given back once reduced
        self.pooled: torch.Tensor | None = None  # the whole pool buffer staging is the start of
        self.arrived = [False] * len(params)
        self.pending = len(params)
        self.future: Future | None = None

    def start(self, buffer: torch.Tensor) -> None:
        """Fill the first `length` elements of a pool buffer from now on (its padding zeroed: it joins the sum)."""
        self.pooled, self.staging = buffer, buffer[:self.length]
        end = self.offsets[-1] + self.params[-1].numel()
        self.staging[end:].zero_()

    def take(self, i: int, scale: float) -> None:
        """Parameter i's .grad times `scale` into its slot (zeros if it has none); then free the .grad."""
        p, at = self.params[i], self.offsets[i]
        slot = self.staging[at:at + p.numel()].view_as(p)
        if p.grad is None:
            slot.zero_()
        else:
            torch.mul(p.grad, scale, out=slot)
            p.grad = None  # ZeRO-2's point: no rank keeps the whole gradient
        self.arrived[i] = True
        self.pending -= 1

    def reset(self) -> None:
        """Ready for the next backward pass (the staging buffer is already given back)."""
        self.arrived = [False] * len(self.params)
        self.pending = len(self.params)
        self.future = None


class ShardedDataParallel(nn.Module):
    """Wrap `module` for ZeRO stage 2 over `comm`; `self.optimizer` holds and updates this rank's shard."""

    def __init__(self, module: nn.Module, optimizer_class: Callable[..., torch.optim.Optimizer],
                 comm: MPI.Comm | None = None, bucket_mb: float = 25.0, algorithm: str = "auto",
                 broadcast_buffers: bool = True, timeline: Any = None, max_in_flight: int = 2,
                 **optimizer_kwargs: Any) -> None:
        super().__init__()
        if max_in_flight < 1:
            raise ValueError(f"ShardedDataParallel: max_in_flight must be at least 1, got {max_in_flight}")
        if algorithm not in dcomm.ALGORITHMS:
            raise ValueError(f"ShardedDataParallel: unknown algorithm {algorithm!r}; "
                             f"choose from {', '.join(dcomm.ALGORITHMS)}")
        if bucket_mb <= 0:
            raise ValueError(f"ShardedDataParallel: bucket_mb must be positive, got {bucket_mb}")
        self.module = module
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.algorithm, self.timeline = algorithm, timeline
        n = self.comm.Get_size()
        params = [p for p in module.parameters() if p.requires_grad]
        # buckets over the parameters in reverse order (backward's), by bytes; the optimizer's flat
        # vector is laid out bucket by bucket, each bucket one block cut into n pieces
        order = list(range(len(params)))[::-1]
        plan = [[order[j] for j in idx] for idx in
                plan_buckets([params[i].numel() * params[i].element_size() for i in order],
                             [(params[i].device, params[i].dtype) for i in order], int(bucket_mb * (1 << 20)))]
        check_same_layout(module, self.comm, [[tuple(params[i].shape) for i in idx] for idx in plan],
                          "ShardedDataParallel")
        # rank 0's parameters and buffers everywhere, before the optimizer copies them into its vector
        broadcast_fused(list(module.parameters()) + list(module.buffers()), root=0, comm=self.comm)
        self.optimizer = ZeroRedundancyOptimizer(params, optimizer_class, comm=self.comm, groups=plan,
                                                 shard_gradients=True, **optimizer_kwargs)
        offsets, blocks = self.optimizer.layout()
        self._shards = self.optimizer.shard_parameters()  # one per bucket, in bucket order
        self._buckets = [GradBucket(b, [params[i] for i in idx], [offsets[i] - blocks[b][0] for i in idx],
                                    blocks[b][1] - blocks[b][0]) for b, idx in enumerate(plan)]
        self._where = {p: (b, i) for b, bucket in enumerate(self._buckets) for i, p in enumerate(bucket.params)}
        self._scale = 1.0 / n  # pre-divided as it enters its bucket: the sums are averages
        synced = list(module.buffers()) if broadcast_buffers else []
        self._sync_buffers = FusedBroadcast(synced, root=0, comm=self.comm) if synced else None
        self._sync = True
        self._backward_queued = False
        # staging buffers alive at once, at most (more wait for the oldest launched reduce-scatter):
        # what bounds the gradient memory besides the shard, as DeepSpeed's fixed reduce buckets do
        self.max_in_flight = max_in_flight
        self._longest = max(b.length for b in self._buckets)
        self._spare: list[torch.Tensor] = []  # pool buffers not lent to a bucket now
        self._pool_bytes = 0  # all pool buffers, lent or not (for gradient_bytes())
        self._thread = CommThread()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]
        self._closed = False

    # -- during backward ---------------------------------------------------------------------
    def _on_grad(self, p: nn.Parameter) -> None:
        """A parameter's gradient is ready: move it into its bucket; launch buckets that are full."""
        if not self._sync:
            return  # no_sync(): gradients accumulate in .grad, the next synced backward takes the sum
        if not self._backward_queued:
            # run _finish once, when the autograd engine has finished this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._backward_queued = True
        b, i = self._where[p]
        bucket = self._buckets[b]
        self._stage(bucket)
        bucket.take(i, self._scale)
        # in bucket order on every rank: an incomplete bucket holds the later ones; the last one is
        # reduced by _finish, in this thread (backward is over by then: nothing left to overlap)
        for ready in self._buckets[:-1]:
            if ready.future is None:
                if ready.pending > 0:
                    return
                ready.future = self._thread.submit(self._reduce_job(ready))

    def _stage(self, bucket: GradBucket) -> None:
        """Lend `bucket` a pool buffer, first waiting for launched buckets while max_in_flight hold one."""
        if bucket.staging is not None:
            return
        for other in self._buckets:
            if sum(b.staging is not None for b in self._buckets) < self.max_in_flight:
                break
            if other.future is not None and other.staging is not None:
                other.future.result()  # its job gives its buffer back before it returns
        if not self._spare:  # the pool grows only while buffers are all lent (kept: no allocation per step)
            p = bucket.params[0]
            self._spare.append(torch.empty(self._longest, dtype=p.dtype, device=p.device))
            self._pool_bytes += self._longest * p.element_size()
        bucket.start(self._spare.pop())

    def _reduce_job(self, bucket: GradBucket) -> Callable[[], None]:
        """The communication thread's job: reduce-scatter one bucket, add this rank's piece to its shard's gradient."""
        def job() -> None:
            staging = bucket.staging
            with maybe_span(self.timeline, f"reduce_scatter bucket {bucket.index}", "comm",
                            {"bytes": staging.numel() * staging.element_size()}):
                # reduce-scatter: piece r of every rank's (pre-scaled) bucket summed on rank r; no
                # per-call guard: the layout was checked at construction and buckets go in one order
                mine = dcomm.reduce_scatter_inplace(staging, op="sum", algorithm=self.algorithm, comm=self.comm,
                                                    guard=False)
            self._shards[bucket.index].grad.add_(mine)  # accumulates until zero_grad()
            self._spare.append(bucket.pooled)
            bucket.staging = bucket.pooled = None
        return job

    def _finish(self) -> None:
        """End of backward: wait for the launched buckets, reduce the rest here, in order."""
        self._backward_queued = False
        for bucket in self._buckets:
            if bucket.future is not None:
                bucket.future.result()  # re-raises a communication error here, in the training thread
                continue
            # not launched: a parameter got no gradient in this pass; it adds what .grad holds (zeros if nothing)
            self._stage(bucket)
            for i in range(len(bucket.params)):
                if not bucket.arrived[i]:
                    bucket.take(i, self._scale)
            self._reduce_job(bucket)()
        for bucket in self._buckets:
            bucket.reset()

    # -- user API ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (buffers such as BatchNorm statistics first come from rank 0)."""
        if self._closed:
            raise RuntimeError("ShardedDataParallel: used after close(); wrap the module in a new one")
        if self._sync_buffers is not None and self._sync:
            self._sync_buffers()  # one collective for all buffers
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside, backward only accumulates local gradients in .grad; the next synced backward reduces the sum."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def gradient_bytes(self) -> dict[str, int]:
        """Gradient memory on this rank: the shard's, the staging pool's, and any .grad now held."""
        return {"shard": grad_bytes(self.optimizer.shard_parameters()), "staging": self._pool_bytes,
                "param_grads": grad_bytes(self.module.parameters())}

    def close(self) -> None:
        """Stop the communication thread and remove the hooks."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()
        self._thread.close()
