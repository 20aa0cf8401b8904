"""DataParallel: every rank holds the whole model; gradients are averaged over ranks during backward.

The semantics are PyTorch DDP's: parameters and buffers are broadcast from rank 0 at start; after
`loss.backward()` returns, every `.grad` holds the average over ranks; nothing else to call.

How: parameters are grouped, in reverse registration order (roughly the order backward produces
their gradients), into buckets of up to `bucket_mb` MiB. Each `.grad` is made a view into its
bucket (DDP's gradient_as_bucket_view): a hook on each parameter copies a freshly allocated gradient,
scaled by 1/n, into its slot once and re-points `.grad` there, and with `zero_grad(set_to_none=False)` backward
accumulates straight into the bucket with no copy at all. When a bucket is full it is handed to a
communication thread, which all-reduces it (ring, native or hierarchical, through dmlmpi.comm)
while backward goes on computing earlier layers. Buckets are launched strictly in bucket order, so every rank issues the same
collectives in the same order even when some parameters get no gradient on some ranks. When
backward ends, the launched buckets are awaited and those still waiting (a parameter without a
gradient counts as zeros) are reduced in the training thread, in order; the averages are then
already in `.grad`. With reduction="adasum" (Horovod's op=hvd.Adasum, power-of-two rank counts)
each bucket is combined by dmlmpi.comm.adasum_allreduce instead of summed, every parameter with
its own dot products and norms, and no 1/n scaling: .grad holds the Adasum of the ranks' gradients.

local_params (DDP's parameters to ignore): parameters each rank holds alone, such as the experts of
an ExpertParallelMoE. They are neither broadcast nor averaged; their gradients are only scaled by
1/n like the others', which makes them the gradient of the ranks' mean loss when their forward
served every rank's samples (an expert receives the tokens of all ranks and sends the gradient of
each rank's loss back through the all-to-all).
"""
from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import FusedBroadcast, broadcast_fused, plan_buckets
from dmlmpi.telemetry import maybe_span

from .powersgd import PowerSGD
from .syncbn import SyncBatchNorm

# gradient compression: the bucket dtype on the wire (powersgd: full precision, sent as low-rank factors)
COMPRESSION = {None: None, "none": None, "fp16": torch.float16, "bf16": torch.bfloat16, "powersgd": None}


class CommThread:
    """One background thread that runs submitted communication jobs in submission order."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], "Future"] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="dmlmpi-comm", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Take jobs one by one; MPI calls release the GIL, so backward keeps computing meanwhile."""
        while (item := self._jobs.get()) is not None:
            job, future = item
            try:
                future.set(job(), None)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set(None, exc)

    def submit(self, job: Callable[[], Any]) -> "Future":
        """Queue `job`; the returned Future's result() waits for it."""
        future = Future()
        self._jobs.put((job, future))
        return future

    def close(self) -> None:
        """Stop the thread after the jobs already queued."""
        self._jobs.put(None)
        self._thread.join()


class Future:
    """The result of a CommThread job."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

    def set(self, value: Any, error: BaseException | None) -> None:
        """Record the outcome (called by the communication thread)."""
        self._value, self._error = value, error
        self._done.set()

    def result(self) -> Any:
        """Wait for the job; re-raise its exception here."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class Bucket:
    """A flat gradient buffer for a group of parameters, and which of them have arrived."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, shared_comm: MPI.Comm | None = None,
                 index: int = 0) -> None:
        self.params = params
        self.index = index  # its place in the bucket order (telemetry names, compression state keys)
        sizes = [p.numel() for p in params]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.shared_comm = shared_comm  # set: the buffer lives in a node-shared window on it
        if shared_comm is None:
            self.buffer = torch.zeros(sum(sizes), dtype=dtype, device=params[0].device)
        else:
            # in a shared window, the all-reduce reads the other ranks' buckets where they lie
            storage = dcomm.shared_empty(sum(sizes), str(dtype).replace("torch.", ""), shared_comm)
            self.buffer = torch.from_numpy(storage).view(dtype).zero_()
        # each parameter's slot, shaped like it (made once: slicing per step costs in the hooks)
        self.slots = [self.buffer[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, params)]
        # and as numpy views, for host buckets numpy can hold: numpy's multiply costs a few
        # microseconds less per gradient than torch's, on a path that runs for every parameter
        host = self.buffer.device.type == "cpu" and dtype != torch.bfloat16
        self.host_slots = [s.numpy() for s in self.slots] if host else None
        self.arrived = [False] * len(params)  # which gradients this backward pass has delivered
        self.pending = len(params)
        self.future: Future | None = None

    def take_gradient(self, i: int, scale: float) -> None:
        """Put parameter i's current .grad times `scale` into its slot (zeros if it has none), in one pass."""
        p, slot, grad = self.params[i], self.slots[i], self.params[i].grad
        if grad is None:
            slot.zero_()
        elif grad.data_ptr() != slot.data_ptr():
            # a new gradient tensor (or 16-bit wire format): scaled on its way in, one pass
            if (self.host_slots is not None and grad.dtype == slot.dtype and grad.is_cpu
                    and grad.layout == torch.strided and not grad.requires_grad):
                np.multiply(grad.numpy(), scale, out=self.host_slots[i])
            else:
                torch.mul(grad, scale, out=slot)
            if slot.dtype == p.dtype:
                p.grad = slot  # from now on backward can accumulate into the bucket itself
        elif scale != 1.0:
            slot.mul_(scale)  # backward accumulated into the bucket itself

    def reset(self) -> None:
        """Ready for the next backward pass."""
        self.arrived = [False] * len(self.params)
        self.pending = len(self.params)
        self.future = None

    def release(self) -> None:
        """Give back a shared buffer (collective), first moving any .grad that lives in it to private memory."""
        if self.shared_comm is None:
            return
        for p, slot in zip(self.params, self.slots):
            if p.grad is not None and p.grad.data_ptr() == slot.data_ptr():
                p.grad = p.grad.clone()  # the window's memory is unmapped below
        dcomm.free_shared(self.buffer, self.shared_comm)
        self.shared_comm = None



@dataclass
class Join:
    """Settings and progress of a DataParallel.join() block on this rank."""

    divide_by_initial_world_size: bool
    throw_on_early_termination: bool
    optimizer: Any = None  # stepped by a rank that ran out, after each of the others' synced steps
    steps: int = 0  # training steps this rank took inside the block


def join_round(comm: MPI.Comm, training: int, syncs: bool) -> tuple[int, int]:
    """One round of join(): (ranks still training, ranks of them that synchronize gradients this step)."""
    flags = np.array([training, int(bool(training) and syncs)], dtype=np.int64)
    dcomm.allreduce(flags, comm=comm, inplace=True)
    return int(flags[0]), int(flags[1])


def check_round(active: int, syncing: int, world: int, throw: bool, joined: bool = False) -> None:
    """Raise on every rank alike when a join() round cannot go on (pure: the counts are the same everywhere)."""
    if syncing not in (0, active):
        raise RuntimeError(f"DataParallel.join: {active - syncing} of the {active} training ranks are inside "
                           f"no_sync() and {syncing} are not: all must accumulate, or all synchronize, together")
    if throw and active < world:
        raise RuntimeError(f"DataParallel.join: {world - active} of {world} ranks ran out of inputs"
                           + (" (this one among them)" if joined else "")
                           + "; throw_on_early_termination=True stops every rank here")


def check_same_layout(module: nn.Module, comm: MPI.Comm, layout: list[list[Any]], who: str) -> None:
    """Every rank must have the same buckets and state: checked once at construction, so steps can skip the per-call guard.

    (The broadcasts of parameters and buffers move raw bytes: equal byte counts with other
    shapes would pass their guard and scramble the values.)
    """
    state = [(name, tuple(t.shape), str(t.dtype).replace("torch.", ""))
             for name, t in list(module.named_parameters()) + list(module.named_buffers())]
    # one gather of every rank's layout (pickled; construction time only)
    state_key = "parameters and buffers"
    layouts = comm.allgather({state_key: state, "buckets": layout})
    differ = [r for r, other in enumerate(layouts) if other != layouts[0]]
    if differ:
        r = differ[0]
        what = state_key if layouts[r][state_key] != layouts[0][state_key] else "buckets"
        ours, theirs = layouts[0][what], layouts[r][what]
        i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        first, other = (ours[i] if i < len(ours) else "none"), (theirs[i] if i < len(theirs) else "none")
        raise ValueError(f"{who}: the model differs across ranks: rank(s) {differ} have other parameter "
                         f"or buffer shapes or dtypes than rank 0; first difference, {what} entry {i}: "
                         f"rank 0 {first}, rank {r} {other}")


class DataParallel(nn.Module):
    """Wrap `module` so that backward averages its gradients over the ranks of `comm`."""

    def __init__(self, module: nn.Module, comm: MPI.Comm | None = None, bucket_mb: float = 25.0,
                 algorithm: str = "auto", compression: str | None = None, broadcast_buffers: bool = True,
                 timeline: Any = None, shared_buckets: bool = True, powersgd_rank: int = 1,
                 powersgd_warmup: int = 0, reduction: str = "mean",
                 local_params: Iterable[nn.Parameter] | None = None) -> None:
        super().__init__()
        if compression not in COMPRESSION:
            raise ValueError(f"DataParallel: compression must be one of none, fp16, bf16, powersgd; got {compression!r}")
        if reduction not in ("mean", "adasum"):
            raise ValueError(f"DataParallel: reduction must be mean or adasum, got {reduction!r}")
        if algorithm not in dcomm.ALGORITHMS:
            raise ValueError(f"DataParallel: unknown algorithm {algorithm!r}; choose from {', '.join(dcomm.ALGORITHMS)}")
        if bucket_mb <= 0:
            raise ValueError(f"DataParallel: bucket_mb must be positive, got {bucket_mb}")
        self.module = module
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self._local = {id(p) for p in (local_params or ())}  # each rank's own: not broadcast, not averaged
        # Adasum (Horovod's op=Adasum): ranks' gradients combined per tensor by dmlmpi.comm.adasum_allreduce
        self._adasum = reduction == "adasum"
        if self._adasum and compression not in (None, "none"):
            raise ValueError("DataParallel: reduction='adasum' combines whole gradients; it does not work with "
                             f"compression={compression!r}")
        if self._adasum and not dcomm.adasum.is_power_of_two(self.comm.Get_size()):
            raise ValueError(f"DataParallel: reduction='adasum' needs a power-of-two number of ranks (a binary "
                             f"tree), got {self.comm.Get_size()}")
        self.algorithm = algorithm
        self.broadcast_buffers = broadcast_buffers
        # the buffers forward() refreshes from rank 0, listed once (as DDP does): walking the module
        # tree on every forward cost a few percent of a small model's step
        self._synced_buffers = list(module.buffers()) if broadcast_buffers else []
        self.timeline = timeline  # a dmlmpi.telemetry.Timeline: bucket all-reduces become "comm" spans
        self._wire_dtype = COMPRESSION[compression]
        # low-rank factors instead of whole gradient matrices, with error feedback (parallel/powersgd.py)
        self._powersgd = (PowerSGD(powersgd_rank, self.comm, warmup_steps=powersgd_warmup)
                          if compression == "powersgd" else None)
        self._sync = True
        self._backward_queued = False
        self._join: Join | None = None  # set inside join(): uneven inputs across ranks
        # DDP's pre-division: each rank's gradient is scaled by 1/n as it enters its bucket (no extra
        # pass over the data) and the buckets are summed, so .grad ends with the average
        self._scale = self._default_scale()
        # CPU ranks of one node keep their buckets in shared memory, where the "shm" all-reduce sums
        # them without messages (shared_buckets=False keeps them private: freeing a window is
        # collective, which a communicator that lost a rank cannot do)
        self._shared = (shared_buckets and self.comm.Get_size() > 1 and self._on_cpu(module)
                        and dcomm.on_one_node(self.comm))
        self._buckets, self._where = self._make_buckets(int(bucket_mb * (1 << 20)))
        self._broadcast_state()
        # before every forward: rank 0's buffers, all in one planned broadcast (DDP coalesces them too)
        self._sync_buffers = (FusedBroadcast(self._synced_buffers, root=0, comm=self.comm)
                              if self._synced_buffers else None)
        self._thread = CommThread()
        self._hooks: list[Any] = []  # removed by close(): the buckets they write into are gone then
        self._closed = False
        last = set(self._buckets[-1].params) if self._buckets else set()
        for p in self.module.parameters() if self.comm.Get_size() > 1 else []:  # alone, .grad is the average
            if p.requires_grad and id(p) in self._local:
                # a rank's own parameter: its gradient scaled like the others', nothing sent
                self._hooks.append(p.register_hook(lambda g: g * self._scale))
            elif p.requires_grad:
                # the last bucket is reduced when backward ends anyway: its hooks only make sure
                # that _finish runs (cheaper than moving each gradient as it arrives)
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    self._on_late_grad if p in last else self._on_grad))

    # -- start -------------------------------------------------------------------------------
    def _broadcast_state(self, root: int = 0) -> None:
        """Every rank takes root's parameters and buffers (any dtype: bool masks too); rank 0's at start."""
        # from root as raw bytes, in a few buckets: one guarded broadcast each, not one per tensor
        shared = [p for p in self.module.parameters() if id(p) not in self._local]
        broadcast_fused(shared + list(self.module.buffers()), root=root, comm=self.comm)

    def _default_scale(self) -> float:
        """Each gradient's factor entering its bucket: 1/n (the sum is the mean), 1 with Adasum (whole gradients)."""
        return 1.0 if self._adasum else 1.0 / self.comm.Get_size()

    def _on_cpu(self, module: nn.Module) -> bool:
        """Whether every parameter is in host memory, on every rank (one small all-reduce)."""
        mine = all(p.device.type == "cpu" for p in module.parameters())
        return bool(self.comm.allreduce(mine, op=MPI.LAND))

    def _make_buckets(self, bucket_bytes: int) -> tuple[list[Bucket], dict[nn.Parameter, tuple[int, int]]]:
        """Buckets over the parameters in reverse order, grouped by device and dtype."""
        params = [p for p in self.module.parameters() if p.requires_grad and id(p) not in self._local][::-1]
        dtypes = [self._wire_dtype or p.dtype for p in params]
        plan = plan_buckets([p.numel() * d.itemsize for p, d in zip(params, dtypes)],
                            [(p.device, d) for p, d in zip(params, dtypes)], bucket_bytes)
        # checked before any bucket is made: making shared ones is collective, once per bucket
        check_same_layout(self.module, self.comm,
                          [[tuple(params[i].shape) for i in idx] + [str(dtypes[idx[0]])] for idx in plan], "DataParallel")
        shared = self.comm if self._shared else None
        buckets = [Bucket([params[i] for i in idx], dtypes[idx[0]], shared, b) for b, idx in enumerate(plan)]
        where = {p: (b, i) for b, bucket in enumerate(buckets) for i, p in enumerate(bucket.params)}
        return buckets, where

    # -- during backward ---------------------------------------------------------------------
    def _on_late_grad(self, p: nn.Parameter) -> None:
        """A gradient of the last bucket is ready: just make sure _finish runs after this backward."""
        if self._sync and not self._backward_queued:
            # run _finish once, when the autograd engine has finished this backward pass
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._backward_queued = True

    def _on_grad(self, p: nn.Parameter) -> None:
        """A parameter's gradient is ready: copy it into its bucket; launch buckets that are full."""
        if not self._sync:
            return  # no_sync(): gradients just accumulate in .grad
        self._on_late_grad(p)
        b, i = self._where[p]
        bucket = self._buckets[b]
        bucket.take_gradient(i, self._scale)
        bucket.arrived[i] = True
        bucket.pending -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        """Hand full buckets to the communication thread, in bucket order, while the next one is full."""
        for bucket in self._buckets[:-1]:  # the last one is reduced by _finish: backward is over by then
            if bucket.future is not None:
                continue
            if bucket.pending > 0:
                return  # an earlier bucket is incomplete: later ones wait, so all ranks keep one order
            bucket.future = self._thread.submit(self._allreduce_job(bucket))

    def _allreduce_job(self, bucket: Bucket) -> Callable[[], Any]:
        """The communication thread's job: sum one bucket (already scaled by 1/n) over the ranks, in place."""
        def job() -> Any:
            with maybe_span(self.timeline, f"allreduce bucket {bucket.index}", "comm",
                            {"bytes": bucket.buffer.numel() * bucket.buffer.element_size()}):
                if self._powersgd is not None:  # matrices as factors (their guarded all-reduces)
                    return self._powersgd.reduce(bucket.index, bucket.slots, bucket.buffer, self.algorithm)
                if self._adasum:  # each parameter's gradient combined with its own dot products and norms
                    return dcomm.adasum_allreduce(bucket.buffer, [p.numel() for p in bucket.params], comm=self.comm,
                                                  inplace=True, guard=False)
                # no per-call guard: the bucket layout was checked across ranks at construction and
                # buckets are reduced in one fixed order, so ranks cannot disagree on these calls
                return dcomm.allreduce(bucket.buffer, op="sum", algorithm=self.algorithm, comm=self.comm,
                                       inplace=True, guard=False)
        return job

    def _finish(self) -> None:
        """End of backward: wait for the launched buckets, reduce the rest here, leave averages in .grad."""
        self._backward_queued = False
        for bucket in self._buckets:
            if bucket.future is not None:
                bucket.future.result()  # re-raises a communication error here, in the training thread
                continue
            # Not launched yet (e.g. a parameter got no gradient on this rank): every earlier bucket
            # is done, and no backward work is left to overlap with, so reduce it in this thread
            # (same order on every rank; a handoff to the other thread would only add latency).
            for i in range(len(bucket.params)):
                if not bucket.arrived[i]:  # no gradient in this pass: contribute what .grad holds, zeros if nothing
                    bucket.take_gradient(i, self._scale)
            self._allreduce_job(bucket)()
        self._grads_from_buckets()
        for bucket in self._buckets:
            bucket.reset()

    def _grads_from_buckets(self) -> None:
        """Every .grad the reduced average in its bucket (already so, where .grad is the slot itself)."""
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                slot = bucket.slots[i]
                if slot.dtype != p.dtype:  # compressed on the wire: back to the parameter's type
                    p.grad = slot.to(p.dtype) if p.grad is None else p.grad.copy_(slot)
                elif p.grad is None or p.grad.data_ptr() != slot.data_ptr():
                    p.grad = slot  # a parameter that got no gradient here still gets the average

    # -- user API ----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module (buffers such as BatchNorm statistics first come from rank 0)."""
        if self._closed:  # its buckets are given back: training on would not average anything
            raise RuntimeError("DataParallel: used after close(); wrap the module in a new DataParallel")
        counted = self._join is None or (self.training and torch.is_grad_enabled())
        if self._join is not None and counted:
            self._count_active()  # inside join(): how many ranks still train this step
        # (inside join() only in training steps: ranks that ran out mirror those, not evaluations)
        if self._sync_buffers is not None and self._sync and counted:
            self._sync_buffers()  # one collective for all buffers (a ResNet-50 has 159), not one each
        return self.module(*args, **kwargs)

    # -- uneven inputs -----------------------------------------------------------------------
    def _count_active(self) -> None:
        """A training step inside join(): agree on how many ranks train it, and whether they sync."""
        join = self._join
        # one small all-reduce: ranks still training send (1, syncs?), ranks that ran out (0, 0)
        active, syncing = join_round(self.comm, 1, self._sync)
        check_round(active, syncing, self.comm.Get_size(), join.throw_on_early_termination)
        if not join.divide_by_initial_world_size:
            self._scale = 1.0 / active  # the average over the ranks that train this step
        join.steps += 1

    def _shadow(self) -> None:
        """This rank ran out of inputs: join every step the others still take, with zero gradients."""
        join = self._join
        n = self.comm.Get_size()
        while True:
            active, syncing = join_round(self.comm, 0, False)
            if active == 0:
                break  # every rank has run out
            check_round(active, syncing, n, join.throw_on_early_termination, joined=True)
            if not syncing:
                continue  # a no_sync() step: the others only run forward and backward
            # the same collectives, in the same order, as a synced step of the ranks still training:
            # rank 0's buffers, then every bucket in bucket order (zeros from here)
            if self._sync_buffers is not None:
                self._sync_buffers()
            for bucket in self._buckets:
                bucket.buffer.zero_()
                self._allreduce_job(bucket)()
            if join.optimizer is not None:
                # the others' averaged gradients are in the buckets now: step with them (a ZeRO
                # optimizer's step is collective, and this rank's shard is this rank's to update)
                self._grads_from_buckets()
                join.optimizer.step()
        # parameters and buffers from the rank that trained longest (the others stopped updating)
        _, last = self.comm.allreduce((join.steps, -self.comm.Get_rank()), op=MPI.MAX)
        self._broadcast_state(root=-last)

    @contextlib.contextmanager
    def join(self, divide_by_initial_world_size: bool = True, throw_on_early_termination: bool = False,
             optimizer: Any = None) -> Iterator[None]:
        """Ranks with fewer batches than others leave the loop early without hanging the rest (DDP's join).

        Inside, each training forward first counts the ranks still training (one small all-reduce).
        A rank that leaves the block keeps taking part in the others' steps with zero gradients until
        all have left; then every rank takes the parameters and buffers of the rank that trained
        longest (optimizer state stays each rank's own, as with DDP). Gradients are divided by the
        whole world size (DDP's default), or with divide_by_initial_world_size=False by the number of
        ranks training that step. throw_on_early_termination=True: every rank raises instead, at the
        first step some rank no longer takes.

        optimizer: stepped by ranks that ran out, after each synced step of the others, with the
        averaged gradients they received. Required for a ZeroRedundancyOptimizer (its step is
        collective, and each rank's shard is its own to update); with any other it keeps those
        ranks' parameters and optimizer state current.
        """
        if self._adasum:
            raise ValueError("DataParallel.join: not supported with reduction='adasum' (its divisor options "
                             "have no meaning there)")
        if any(isinstance(m, SyncBatchNorm) for m in self.module.modules()):
            raise ValueError("DataParallel.join: the model has SyncBatchNorm layers, whose collectives a rank "
                             "without inputs cannot take part in; use BatchNorm, or even inputs")
        if self._local:
            raise ValueError("DataParallel.join: not supported with local_params (their forward, such as an "
                             "expert-parallel layer's all-to-all, needs every rank)")
        if self._join is not None:
            raise RuntimeError("DataParallel.join: already inside join()")
        self._join = Join(divide_by_initial_world_size, throw_on_early_termination, optimizer)
        try:
            yield
            self._shadow()  # only after a normal exit: an exception ends the job instead
        finally:
            self._join = None
            self._scale = self._default_scale()

    def _slot_names(self) -> dict[tuple[int, int], str]:
        """(bucket, slot) -> the parameter's name: how compression state is keyed inside, and in checkpoints."""
        return {self._where[p]: n for n, p in self.module.named_parameters() if p in self._where}

    def comm_state(self) -> dict[str, Any]:
        """What gradient compression carries from step to step (PowerSGD's factors and errors; collective), for checkpoints.

        Keyed by parameter name, so that a run resumed with other buckets (--bucket-mb) gets each
        matrix's own state back.
        """
        if self._powersgd is None:
            return {}
        state, names = self._powersgd.state_dict(), self._slot_names()
        return {"powersgd": dict(state, q={names[k]: v for k, v in state["q"].items()},
                                 errors=[{names[k]: v for k, v in e.items()} for e in state["errors"]],
                                 calls={n: state["calls"].get(k[0], 0) for k, n in names.items()})}

    def load_comm_state(self, state: dict[str, Any]) -> bool:
        """Continue from comm_state(); False when part of it could not be used (another world size)."""
        if self._powersgd is None or "powersgd" not in state:
            return True
        saved, names = state["powersgd"], self._slot_names()
        slot_of = {n: k for k, n in names.items()}
        unknown = sorted(set(saved["q"]) - set(slot_of))
        if unknown:
            raise ValueError(f"DataParallel: the PowerSGD state names parameters this model does not have: {unknown[:3]}")
        calls: dict[int, int] = {}
        for n, c in saved["calls"].items():  # a bucket has taken as many steps as its parameters had
            if n in slot_of:
                calls[slot_of[n][0]] = max(calls.get(slot_of[n][0], 0), c)
        return self._powersgd.load_state_dict(dict(
            saved, q={slot_of[n]: v for n, v in saved["q"].items()},
            errors=[{slot_of[n]: v for n, v in e.items()} for e in saved["errors"]], calls=calls))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside, backward only accumulates local gradients; the next synced backward averages the sum."""
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def close(self) -> None:
        """Stop the communication thread and give back shared buckets (collective: every rank calls it)."""
        if self._closed:
            return
        self._closed = True
        for hook in self._hooks:
            hook.remove()  # a backward after this must not write into buckets that are unmapped below
        self._thread.close()
        for bucket in self._buckets:
            bucket.release()
