"""Pipeline: an nn.Sequential cut into stages on the ranks of a communicator, microbatches flowing through.

Each rank holds V chunks (model stage = chunk * P + rank); `train_step` cuts the batch into M
microbatches and runs this rank's list of actions from dmlmpi.parallel.schedules. A forward
receives its input from the previous stage (the first stage takes the microbatch), runs the chunk
and sends the output on; a backward receives the output's gradient from the next stage (the last
stage starts from the loss), runs autograd and sends the input's gradient back. Each tensor goes
as one nonblocking send, preceded by a small header (dtype and shape: never assumed) whenever its
tag last carried a different dtype or shape, so a steady run sends no headers; a rank waits only
on the one message its next action needs, and the schedule checker guarantees that this cannot
deadlock. With `checkpoint=True` a forward keeps only its input and backward runs
the chunk again (activation checkpointing). Under a zero-bubble schedule (zb-h1) the backward is
two actions: B computes and sends the input's gradient, W later the weights' (`splitgrad`).

After `train_step` every parameter's .grad holds (adds) the gradient of the mean loss over the whole
batch, and every rank gets that loss. With `dp_comm` (a hybrid grid) each chunk's gradients are
then averaged over the data-parallel replicas, starting as soon as the chunk's last backward is
done (overlapping the rest of the cool-down). A parameter that layers on several ranks use (tied
input and output embeddings: DeepSpeed's TiedLayerSpec) starts equal on all of them and has its
gradients summed over them after each step, so the copies take the same updates.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.comm import p2p
from dmlmpi.comm.buffers import dtype_of
from dmlmpi.comm.dtypes import BY_CODE
from dmlmpi.comm.fusion import allreduce_fused, broadcast_fused
from dmlmpi.telemetry import maybe_span

from . import splitgrad
from .data import CommThread, Future
from .partition import describe, partition, shared_parameters
from .schedules import Action, build, promised_activations

# tensors whose numpy view MPI takes as it is (bfloat16 has none: it goes through the buffer handling)
_HOST_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8})
HEADER = 8  # int64 words: dtype code, ndim, up to 6 dimensions
# a header message is HEADER words and one pad byte: an odd size, which no tensor message can have
# (every supported dtype is 2, 4 or 8 bytes), so a receiver tells the two apart by size alone
HEADER_BYTES = HEADER * 8 + 1


def _torch_dtype(code: int) -> torch.dtype:
    """The torch dtype of a dmlmpi dtype code."""
    return getattr(torch, BY_CODE[code].name)


def _header(t: torch.Tensor) -> np.ndarray:
    """dtype and shape of t as a HEADER_BYTES message."""
    if t.dim() > HEADER - 2:
        raise ValueError(f"pipeline: activations of more than {HEADER - 2} dimensions are not supported ({tuple(t.shape)})")
    h = np.zeros(HEADER_BYTES, dtype=np.uint8)
    h[:HEADER * 8].view(np.int64)[:2 + t.dim()] = (dtype_of(t).code, t.dim(), *t.shape)
    return h


def _nbytes(meta: tuple[torch.dtype, tuple[int, ...]]) -> int:
    """Bytes of a tensor of this (dtype, shape)."""
    return math.prod(meta[1]) * meta[0].itemsize


def _read_header(h: np.ndarray) -> tuple[torch.dtype, tuple[int, ...]]:
    """(dtype, shape) from a header message."""
    words = h[:HEADER * 8].view(np.int64)
    return _torch_dtype(int(words[0])), tuple(int(d) for d in words[2:2 + words[1]])


class SavedBytes:
    """Counts the bytes autograd saves for backward (activations, not parameters), per microbatch."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.param_ptrs = {p.data_ptr() for p in params}
        self.live: dict[tuple[int, int], int] = {}
        self.current: tuple[int, int] | None = None
        self.peak = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """Saved-tensor hook: count a saved activation."""
        if self.current is not None and t.data_ptr() not in self.param_ptrs:
            self.live[self.current] = self.live.get(self.current, 0) + t.numel() * t.element_size()
            self.peak = max(self.peak, sum(self.live.values()))
        return t

    def hold(self, key: tuple[int, int], nbytes: int) -> None:
        """Count bytes kept by the pipeline itself (a stage's input, gradients waiting for W) for microbatch key."""
        self.live[key] = self.live.get(key, 0) + nbytes
        self.peak = max(self.peak, sum(self.live.values()))

    def release(self, key: tuple[int, int]) -> None:
        """Microbatch key's backward is done: its activations are freed."""
        self.live.pop(key, None)


class Pipeline(nn.Module):
    """This rank's stages of `module` (an nn.Sequential) in a P-rank pipeline over `comm`."""

    def __init__(self, module: nn.Sequential, comm: MPI.Comm | None = None, microbatches: int = 4,
                 schedule: str = "1f1b", partition_by: str | Sequence[int] = "parameters", chunks: int = 1,
                 checkpoint: bool = False, sample: torch.Tensor | None = None, dp_comm: MPI.Comm | None = None,
                 timeline: Any = None) -> None:
        super().__init__()
        if not isinstance(module, nn.Sequential):
            raise TypeError(f"Pipeline: the model must be an nn.Sequential (got {type(module).__name__})")
        world = MPI.COMM_WORLD if comm is None else comm
        self.P, self.rank, self.M, self.V = world.Get_size(), world.Get_rank(), microbatches, chunks
        self.schedule_name, self.checkpoint, self.timeline = schedule, checkpoint, timeline
        schedules = build(schedule, self.P, microbatches, chunks)  # ValueError for sizes it cannot run
        self.actions: list[Action] = schedules[self.rank]
        self.split = any(a.op == "W" for a in self.actions)  # B and W apart: the weights' gradient comes later
        self.promise = promised_activations(schedule, self.P, microbatches, chunks, self.rank)
        self.stages = self.P * chunks
        method = partition_by if isinstance(partition_by, str) else "explicit"
        self.bounds, costs = partition(module, self.stages, partition_by, sample)
        self.partition_text = describe(module, self.bounds, costs, method)
        # this rank's chunks: model stages rank, P + rank, 2P + rank, ...
        self.parts = nn.ModuleList(module[a:b] for a, b in (self.bounds[c * self.P + self.rank] for c in range(chunks)))
        self.layer_indices = [list(range(*self.bounds[c * self.P + self.rank])) for c in range(chunks)]
        self.comm = world.Dup()  # private channel for activations and gradients
        self._tie(module)
        self.dp_comm = dp_comm
        self._dp_thread = CommThread() if dp_comm is not None and dp_comm.Get_size() > 1 else None
        if self._dp_thread is not None:
            # replicas of a stage start equal: parameters from dp rank 0, in a few broadcasts (not one each)
            broadcast_fused(list(self.parameters()), root=0, comm=dp_comm)
        # (peer, tag) -> (dtype, shape) of the last tensor sent / received with that tag
        self._sent: dict[tuple[int, int], tuple[torch.dtype, tuple[int, ...]]] = {}
        self._received: dict[tuple[int, int], tuple[torch.dtype, tuple[int, ...]]] = {}
        # received tensors whose backward is done, by (shape, dtype, device), to receive into again: a
        # fresh buffer takes page faults on every message (~55 us more per 512 KiB here)
        self._spare: dict[tuple[tuple[int, ...], torch.dtype, torch.device], list[torch.Tensor]] = {}
        self.last_activation_bytes = 0  # peak activation bytes held during the last train_step
        # its forward/backward compute time, the time it was blocked waiting for a neighbour, its whole time
        self.last_compute_s = self.last_wait_s = self.last_step_s = 0.0
        self.last_action_s: dict[tuple[str, int, int], float] = {}  # (op, micro, chunk) -> its compute seconds
        self._waited = 0.0

    # -- tied parameters ---------------------------------------------------------------------
    def _tie(self, module: nn.Sequential) -> None:
        """Find the parameters that stages on other ranks share with this one; one communicator per such group."""
        params = list(module.parameters())
        # a parameter two of this rank's chunks use gets its gradient from both: averaged over the
        # replicas only after the last of them (a chunk's early average would race the other's backward)
        seen: dict[int, int] = {}
        for part in self.parts:
            for p in set(part.parameters()):
                seen[id(p)] = seen.get(id(p), 0) + 1
        self._multi_chunk = {i for i, n in seen.items() if n > 1}
        # (parameter, communicator of the ranks holding it) for the tied parameters this rank holds
        self.tied: list[tuple[nn.Parameter, MPI.Comm]] = []
        self.tied_copies: set[int] = set()  # ids of tied parameters another rank owns (counted there in norms)
        for index, stages in shared_parameters(module, self.bounds):
            ranks = sorted({s % self.P for s in stages})
            if len(ranks) == 1:
                continue  # all on one rank: one object, autograd already adds the uses up
            # split: the ranks holding this parameter (every rank takes part in the split, most with UNDEFINED)
            sub = self.comm.Split(0 if self.rank in ranks else MPI.UNDEFINED, self.rank)
            if sub == MPI.COMM_NULL:
                continue
            p = params[index]
            # broadcast: the copies start as the lowest stage's (the same seed makes them so; this makes sure)
            broadcast_fused([p.detach()], root=0, comm=sub)
            self.tied.append((p, sub))
            if self.rank != ranks[0]:
                self.tied_copies.add(id(p))

    def owned_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, a tied one only on the lowest rank holding it (for norms over the pipeline)."""
        return [p for p in self.parameters() if id(p) not in self.tied_copies]

    def _sum_tied(self) -> None:
        """Add up a tied parameter's gradients over the ranks holding it, so that every copy takes the same step."""
        if self._dp_thread is not None and self._multi_chunk:
            # all-reduce: the gradients of parameters several chunks use, averaged over the replicas now
            allreduce_fused([p.grad for p in self.parameters() if id(p) in self._multi_chunk and p.grad is not None],
                            op="avg", comm=self.dp_comm, inplace=True)
        for p, sub in self.tied:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # all-reduce: each holder's share of the tied parameter's gradient, summed
            allreduce_fused([p.grad], op="sum", comm=sub, inplace=True)

    # -- messages --------------------------------------------------------------------------
    def _tag(self, op: str, micro: int, stage: int) -> int:
        """One tag per (direction, microbatch, receiving stage): messages can never be confused."""
        return (micro * self.stages + stage) * 2 + (0 if op == "F" else 1)

    def _send(self, t: torch.Tensor, to: int, op: str, micro: int, stage: int, pending: list[p2p.Transfer]) -> None:
        """Start sending t (kept alive in `pending` until the step ends), after a header if its shape is new."""
        t = t.detach().contiguous()
        tag = self._tag(op, micro, stage)
        meta = (t.dtype, tuple(t.shape))
        if self._sent.get((to, tag)) != meta:
            # send: a header (dtype, shape) when this tag last carried a different tensor (or none):
            # the receiver remembers the last one per tag, so a steady run sends no headers at all
            self._sent[(to, tag)] = meta
            pending.append(p2p.isend_host(_header(t), to, tag, self.comm))
        if not t.is_cuda and t.dtype in _HOST_DTYPES:
            # send: a host tensor as its numpy view, straight to MPI (the few calls matter: code run
            # right after a large matrix product finds nothing in the caches and runs 10-30x slower)
            pending.append(p2p.isend_host(t.numpy(), to, tag, self.comm))
        else:
            # send: the tensor itself through the buffer handling (GPU: direct or staged), same tag
            pending.append(p2p.isend(t, to, tag, self.comm))

    def _recv(self, source: int, op: str, micro: int, stage: int, device: torch.device) -> torch.Tensor:
        """Receive a tensor from `source` (blocking: the schedule says it is on its way)."""
        tag = self._tag(op, micro, stage)
        if self.timeline is None:
            return self._receive(source, tag, stage, device)
        with self.timeline.span(f"recv {'act' if op == 'F' else 'grad'} {micro}", "comm"):
            return self._receive(source, tag, stage, device)

    def _receive(self, source: int, tag: int, stage: int, device: torch.device) -> torch.Tensor:
        """The message with `tag` from `source`, as a tensor of the dtype and shape its header gave."""
        meta = self._received.get((source, tag))
        # the steady case, one call; a message smaller than a header could not take one in its place
        if (meta is not None and device.type == "cpu" and meta[0] in _HOST_DTYPES
                and _nbytes(meta) >= HEADER_BYTES):
            out = self._quick_recv(source, tag, stage, meta, device)
            if out is not None:
                return out
        # probe: wait for the next message with this tag; the time blocked here is time this
        # stage waits for its neighbour (its bubble)
        t0 = time.perf_counter()
        message, nbytes = p2p.probe(source, tag, self.comm)
        self._waited += time.perf_counter() - t0
        if nbytes == HEADER_BYTES:
            # receive: a header, so a new dtype or shape; the tensor follows with the same tag
            header = np.empty(HEADER_BYTES, dtype=np.uint8)
            message.Recv(header)
            self._received[(source, tag)] = _read_header(header)
            message, nbytes = p2p.probe(source, tag, self.comm)
        meta = self._received.get((source, tag))
        if meta is None or nbytes != _nbytes(meta):
            raise self._size_error(source, tag, stage, f"has {nbytes} bytes", meta)
        dtype, shape = meta
        # receive: the tensor, into a recycled buffer of its shape when there is one
        out = self._buffer(shape, dtype, device)
        p2p.wait(p2p.mrecv(message, out))
        return out

    def _quick_recv(self, source: int, tag: int, stage: int, meta: tuple[torch.dtype, tuple[int, ...]],
                    device: torch.device) -> torch.Tensor | None:
        """Receive a host tensor of the shape this tag last carried in one call; None if a header came instead.

        The steady case, cut to one MPI call (see _send for why so few calls matter). A header (its
        odd size tells it apart) lands in the buffer's first bytes: the shape changed, and the
        caller receives the tensor that follows the long way. The time blocked counts as waiting
        (it includes copying the message in, which the long way counts apart).
        """
        out = self._buffer(meta[1], meta[0], device)
        status = MPI.Status()
        t0 = time.perf_counter()
        try:
            # receive: blocked until the neighbour's message is here (this stage's bubble), then copied in
            self.comm.Recv(out.numpy(), source=source, tag=tag, status=status)
        except MPI.Exception as exc:
            if exc.Get_error_class() != MPI.ERR_TRUNCATE:
                raise
            raise self._size_error(source, tag, stage, f"is larger than {_nbytes(meta)} bytes", meta) from exc
        self._waited += time.perf_counter() - t0
        nbytes = status.Get_count(MPI.BYTE)
        if nbytes == _nbytes(meta):
            return out
        if nbytes != HEADER_BYTES:
            raise self._size_error(source, tag, stage, f"has {nbytes} bytes", meta)
        self._received[(source, tag)] = _read_header(out.reshape(-1).view(torch.uint8)[:HEADER_BYTES].numpy())
        self._recycle(out)
        return None

    def _size_error(self, source: int, tag: int, stage: int, what: str,
                    meta: tuple[torch.dtype, tuple[int, ...]] | None) -> RuntimeError:
        """The error for a message whose size is not the one its tag's header announced."""
        return RuntimeError(f"pipeline (stage {stage}, rank {self.rank}): message {tag} from rank {source} {what}, "
                            f"expected {'a header' if meta is None else meta}")

    def _buffer(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor to receive into: a recycled one of this shape when there is one, else a new one."""
        spare = self._spare.get((shape, dtype, device))
        return spare.pop() if spare else torch.empty(shape, dtype=dtype, device=device)

    def _recycle(self, t: torch.Tensor | None, *sent: torch.Tensor | None) -> None:
        """Keep a received tensor that nothing uses any more for a later receive of the same shape.

        Not when one of the tensors `sent` this step shares its memory: a chunk of views only
        (Flatten, Identity) sends on its input itself, and a send's buffer is MPI's until the step ends.
        """
        if t is None or any(s is not None and s.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
                            for s in sent):
            return
        t = t.detach()  # a plain tensor on the same storage: no .grad, no autograd history
        self._spare.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def _device(self) -> torch.device:
        """Where this rank's parameters live."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # -- one batch ---------------------------------------------------------------------------
    def train_step(self, inputs: torch.Tensor | None, targets: torch.Tensor | None,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
        """Forward and backward of the whole batch through the schedule; returns its mean loss on every rank.

        `inputs` are needed on the first stage's rank, `targets` on the last's (others may pass None);
        loss_fn(output, target) is the mean loss of a microbatch. Gradients add into .grad.
        """
        device = self._device()
        start, compute, self._waited = time.perf_counter(), 0.0, 0.0
        first, last = self.rank == 0, self.rank == (self.stages - 1) % self.P
        batch = len(targets) if targets is not None else len(inputs)
        mb_in = torch.tensor_split(inputs, self.M) if first else None
        mb_tg = torch.tensor_split(targets, self.M) if last else None
        if (first and len(inputs) < self.M) or (last and len(targets) < self.M):
            raise ValueError(f"pipeline: a batch of {batch} cannot be cut into {self.M} microbatches")
        saved = SavedBytes(list(self.parameters()))
        # (micro, chunk) -> (input, output or loss, its per-layer graphs when the backward is split)
        kept: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, list[splitgrad.Segment] | None]] = {}
        pending: list[p2p.Transfer] = []
        total_loss = torch.zeros((), dtype=torch.float64)
        took = self.last_action_s = {}
        # a chunk's gradients are complete after its last backward: its last W when the backward is split
        done_op = "W" if self.split else "B"
        remaining = {c: sum(1 for a in self.actions if a.op == done_op and a.chunk == c) for c in range(self.V)}
        # (micro, chunk) -> what its W needs after its B: input, received gradient, graphs, gradient sent
        stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None, list[splitgrad.Segment], torch.Tensor | None]] = {}
        futures: list[Future] = []
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            for a in self.actions:
                key = (a.micro, a.chunk)
                part = self.parts[a.chunk]
                if a.op == "F":
                    x = mb_in[a.micro].to(device) if a.stage == 0 else self._recv(a.recv_from, "F", a.micro, a.stage, device)
                    if x.is_floating_point():
                        x.requires_grad_(a.stage > 0)  # the gradient of a received input goes back
                    with maybe_span(self.timeline, f"F{a.micro}", "forward", {"micro": a.micro, "chunk": a.chunk, "stage": a.stage}):
                        t0 = time.perf_counter()
                        saved.current = key
                        tail = self._loss_tail(loss_fn, mb_tg, a, batch, device)
                        if self.split and not self.checkpoint:
                            # one graph per layer, so that B and W can walk them apart
                            segments = splitgrad.forward(part, x, tail)
                            y = segments[-1].y
                        else:
                            segments = None
                            with torch.no_grad() if self.checkpoint else contextlib.nullcontext():
                                y = part(x)
                            if tail is not None and not self.checkpoint:
                                y = tail(y)
                        saved.current = None
                        took["F", a.micro, a.chunk] = time.perf_counter() - t0
                        compute += took["F", a.micro, a.chunk]
                    if a.send_to is not None:
                        self._send(y, a.send_to, "F", a.micro, a.stage + 1, pending)
                    kept[key] = (x, y, segments)
                    saved.hold(key, x.numel() * x.element_size())
                elif a.op == "W":
                    x, grad, segments, dx = stash.pop(key)
                    with maybe_span(self.timeline, f"W{a.micro}", "weight", {"micro": a.micro, "chunk": a.chunk, "stage": a.stage}):
                        t0 = time.perf_counter()
                        splitgrad.backward_weight(segments)
                        took["W", a.micro, a.chunk] = time.perf_counter() - t0
                        compute += took["W", a.micro, a.chunk]
                    saved.release(key)
                    # the weights' gradient is done: the received input and gradient can take later messages
                    if a.stage > 0:
                        self._recycle(x, dx)
                    self._recycle(grad, dx)
                    remaining[a.chunk] -= 1
                    if remaining[a.chunk] == 0 and self._dp_thread is not None:
                        futures.append(self._dp_thread.submit(self._average_job(a.chunk)))
                elif self.split:
                    x, y, segments = kept.pop(key)
                    grad = None if a.stage == self.stages - 1 else self._recv(a.recv_from, "B", a.micro, a.stage, device)
                    with maybe_span(self.timeline, f"B{a.micro}", "backward", {"micro": a.micro, "chunk": a.chunk, "stage": a.stage}):
                        t0 = time.perf_counter()
                        if self.checkpoint:  # recompute the forward, this time one graph per layer
                            saved.current = key
                            segments = splitgrad.forward(part, x, self._loss_tail(loss_fn, mb_tg, a, batch, device))
                            saved.current = None
                        if a.stage == self.stages - 1:
                            total_loss += segments[-1].y.detach().double().cpu()
                        # B: the input's gradient only; each layer's output gradient stays for W
                        dx = splitgrad.backward_input(segments, grad)
                        took["B", a.micro, a.chunk] = time.perf_counter() - t0
                        compute += took["B", a.micro, a.chunk]
                    saved.hold(key, splitgrad.held_bytes(segments))
                    if a.send_to is not None:
                        self._send(dx if dx is not None else torch.zeros_like(x), a.send_to, "B", a.micro, a.stage - 1, pending)
                    stash[key] = (x, grad, segments, dx)
                else:
                    x, y, _ = kept.pop(key)
                    grad = None if a.stage == self.stages - 1 else self._recv(a.recv_from, "B", a.micro, a.stage, device)
                    with maybe_span(self.timeline, f"B{a.micro}", "backward", {"micro": a.micro, "chunk": a.chunk, "stage": a.stage}):
                        t0 = time.perf_counter()
                        if self.checkpoint:  # recompute the forward, this time recording the graph
                            saved.current = key
                            y = part(x)
                            saved.current = None
                        if a.stage == self.stages - 1:
                            if self.checkpoint:
                                y = self._loss_tail(loss_fn, mb_tg, a, batch, device)(y)
                            total_loss += y.detach().double().cpu()
                            y.backward()
                        elif y.requires_grad:  # (a first stage without parameters has nothing to do)
                            torch.autograd.backward(y, grad)
                        took["B", a.micro, a.chunk] = time.perf_counter() - t0
                        compute += took["B", a.micro, a.chunk]
                    saved.release(key)
                    if a.send_to is not None:
                        self._send(x.grad, a.send_to, "B", a.micro, a.stage - 1, pending)
                    # backward is done: the received input and gradient can take later messages
                    if a.stage > 0:
                        self._recycle(x, y, x.grad)
                    self._recycle(grad, x.grad)
                    remaining[a.chunk] -= 1
                    if remaining[a.chunk] == 0 and self._dp_thread is not None:
                        futures.append(self._dp_thread.submit(self._average_job(a.chunk)))
        p2p.wait_all(pending)
        for f in futures:
            f.result()
        self._sum_tied()  # after the replicas' averages: each holder's average, summed over the holders
        self.last_activation_bytes = saved.peak
        self.last_compute_s, self.last_wait_s, self.last_step_s = compute, self._waited, time.perf_counter() - start
        # broadcast: the loss from the rank holding the last stage to every rank of the pipeline
        return float(self.comm.bcast(float(total_loss) if last else None, root=(self.stages - 1) % self.P))

    def _loss_tail(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], mb_tg: Sequence[torch.Tensor] | None,
                   a: Action, batch: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """On the last stage, output -> this microbatch's share of the whole batch's mean loss; else None."""
        if a.stage != self.stages - 1:
            return None
        tg = mb_tg[a.micro].to(device)
        return lambda out: loss_fn(out, tg) * (len(tg) / batch)

    def _average_job(self, chunk: int) -> Callable[[], None]:
        """Average one chunk's gradients over the data-parallel replicas (run on the comm thread)."""
        grads = [p.grad for p in self.parts[chunk].parameters() if p.grad is not None and id(p) not in self._multi_chunk]

        def job() -> None:
            with maybe_span(self.timeline, f"dp allreduce chunk {chunk}", "comm"):
                # all-reduce: the chunk's gradients, fused into buckets, averaged over the replicas
                allreduce_fused(grads, op="avg", comm=self.dp_comm, inplace=True)
        return job

    # -- inference -----------------------------------------------------------------------------
    def forward_only(self, inputs: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """Run `inputs` (a batch of `batch` rows, given on rank 0) through every stage; the output on the last stage's rank."""
        device = self._device()
        micro = min(self.M, batch)
        outputs, pending = [], []
        chunks_in = torch.tensor_split(inputs, micro) if self.rank == 0 else None
        with torch.no_grad():
            for c in range(self.V):
                stage = c * self.P + self.rank
                for m in range(micro):
                    x = chunks_in[m].to(device) if stage == 0 else self._recv((stage - 1) % self.P, "F", m, stage, device)
                    y = self.parts[c](x)
                    if stage < self.stages - 1:
                        self._send(y, (stage + 1) % self.P, "F", m, stage + 1, pending)
                    else:
                        outputs.append(y)
        p2p.wait_all(pending)
        return torch.cat(outputs) if outputs else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Not a plain module call: use train_step or forward_only."""
        raise RuntimeError("Pipeline: call train_step(inputs, targets, loss_fn) or forward_only(inputs, batch)")

    def close(self) -> None:
        """Stop the data-parallel thread and free the private communicator."""
        if self._dp_thread is not None:
            self._dp_thread.close()
        for _, sub in self.tied:
            sub.Free()
        self.comm.Free()
