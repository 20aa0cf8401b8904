"""Parameter-server training: server ranks own the parameters, worker ranks compute gradients.

The last S ranks of the communicator are servers, the others workers. All trainable parameters,
seen as one flat vector, are cut into S contiguous shards of (almost) equal bytes, so a large tensor
may span several servers. Each server keeps its shard and the optimizer state of that shard, and
applies the optimizer itself; an element-wise optimizer (SGD, momentum, Adam, AdamW) applied shard
by shard is the same as applied to the whole model.

A worker step: backward fills the gradient (`.grad` are views into one flat buffer); `step()` sends
each shard of it to its server and posts the receives of every server's answer at once (nonblocking
point-to-point, so a worker talks to all its servers together); the answer is the server's current
shard, received straight into the parameters (also views into one flat buffer). When a server
answers, and how it turns gradients into updates, is the consistency model (dmlmpi.parallel.
consistency): sync, async, or bounded staleness. With a gradient `budget` (async only) workers go at
their own pace until the servers have applied that many gradients, a fast worker doing more of them;
every answer then also says whether to go on, checkpoint or stop (dmlmpi.parallel.pace).

    ps = ParameterServer(model, comm, servers=1, mode="ssp", staleness=2,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9))
    if ps.is_server:
        ps.serve()                       # until every worker has finished
    else:
        for x, y in batches:
            loss_fn(ps(x), y).backward()
            ps.step()                    # push gradients, pull parameters
        ps.finish()                      # every worker ends with the same final parameters
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.comm import p2p
from dmlmpi.comm.ring import chunk_bounds
from dmlmpi.telemetry import maybe_span

from .consistency import MODES, Consistency, Update
from .flat import view_into
from .pace import GO, Pace

# what a worker's header message asks of a server
PUSH, PULL, SAVE, DONE = 1, 2, 3, 4
STOP_FLAG = 1  # header flags: this worker had a signal (own pace: the first server stops everyone)
# message tags on the private communicator
TAG_HEADER, TAG_GRAD, TAG_REPLY, TAG_PARAMS = 1, 2, 3, 4

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def shard_ranges(numel: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) element ranges of a flat parameter vector, one per server, sizes within 1."""
    return chunk_bounds(numel, servers)


def check_setup(world_size: int, servers: int) -> None:
    """ValueError unless `servers` server ranks leave at least one worker in `world_size` ranks."""
    if servers < 1:
        raise ValueError(f"parameter server: need at least one server rank, got servers={servers}")
    if servers >= world_size:
        raise ValueError(f"parameter server: {servers} server rank(s) on {world_size} rank(s) leaves no worker; "
                         f"run on more than {servers} ranks or use fewer servers")


class ParameterServer(nn.Module):
    """This rank's role in parameter-server training of `module` (collective over `comm` to create)."""

    def __init__(self, module: nn.Module, comm: MPI.Comm | None = None, servers: int = 1, mode: str = "sync",
                 staleness: int = 0, optimizer: OptimizerFactory | None = None,
                 schedule: Callable[[torch.optim.Optimizer], Any] | None = None, timeline: Any = None,
                 budget: int | None = None, checkpoint_every: int = 0) -> None:
        """`budget` (async only): own pace, until the servers have applied that many gradients (resumes
        included); `checkpoint_every` gradients the workers are told to checkpoint (see dmlmpi.parallel.pace)."""
        super().__init__()
        world = MPI.COMM_WORLD if comm is None else comm
        size, rank = world.Get_size(), world.Get_rank()
        check_setup(size, servers)
        if mode not in MODES:
            raise ValueError(f"parameter server: mode must be one of {', '.join(MODES)}, got {mode!r}")
        if budget is not None and mode != "async":
            raise ValueError(f"parameter server: own pace (a gradient budget) needs mode async, got {mode!r}")
        self.budget, self.checkpoint_every = budget, checkpoint_every
        self.module, self.mode, self.staleness = module, mode, staleness
        self.timeline = timeline  # a dmlmpi.telemetry.Timeline: server updates become "compute" spans
        self.comm = world.Dup()  # private channel: PS messages never match the user's own
        self.workers = list(range(size - servers))
        self.servers = list(range(size - servers, size))
        self.is_server = rank >= size - servers
        # the workers alone, for what they do together (evaluation, logging); servers get their own
        self.worker_comm = world.Split(1 if self.is_server else 0, rank)
        self.params = [p for p in module.parameters() if p.requires_grad]
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise ValueError(f"parameter server: parameters must share one floating dtype, got {sorted(map(str, dtypes))}")
        self.sizes = [p.numel() for p in self.params]
        self.ranges = shard_ranges(sum(self.sizes), servers)
        flat = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.bytes_sent = self.bytes_received = self.steps = 0  # over step() calls only
        if self.is_server:
            self.index = rank - self.servers[0]
            start, stop = self.ranges[self.index]
            self.shard = nn.Parameter(flat[start:stop].clone())
            self.optimizer = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.01)))([self.shard])
            self.schedule = schedule(self.optimizer) if schedule else None
            self.version = 0  # updates this server has applied, over all runs (resumes included)
            self.updates_run = 0  # updates applied in this run
            self.staleness_log: list[int] = []  # per applied gradient: version at apply - version it saw
            self.pace: Pace | None = None  # own pace: made in serve(), from the version a resume restored
        else:
            self._init_worker(flat)
        # the servers' optimizers exist (torch's first optimizer import can take a second) before
        # any worker starts its first step and waits on them
        self.comm.Barrier()

    # ------------------------------------------------------------------------------------------
    # worker side
    # ------------------------------------------------------------------------------------------

    def _init_worker(self, flat: torch.Tensor) -> None:
        """Make parameters and gradients views into two flat buffers (one message per server each)."""
        self.flat_params = flat
        self.flat_grads = torch.zeros_like(flat)
        self.slots = view_into(self.params, flat, self.flat_grads)
        self.seen = [0] * len(self.servers)  # version of each server's shard our parameters hold
        self.clock = 0  # pushes done in this run
        self.pulled = False
        self.code = GO  # own pace: what the first server said with its last answer (dmlmpi.parallel.pace)
        self.stop_requested = False  # own pace: set to ask the servers to stop every worker (a signal)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped module's forward; the first call pulls the servers' parameters."""
        if not self.pulled:
            self.pull()
        return self.module(*args, **kwargs)

    def _headers(self, kind: int) -> list[np.ndarray]:
        """One header per server: what we ask, our clock, the version of its shard we hold, our flags."""
        flags = STOP_FLAG if self.stop_requested else 0
        return [np.array([kind, self.clock, v, flags], dtype=np.int64) for v in self.seen]

    def _exchange(self, kind: int, with_grads: bool) -> tuple[int, int]:
        """Send a header (and gradient shards) to every server, receive every server's shard; bytes (sent, received)."""
        transfers, sent, received = [], 0, 0
        headers = self._headers(kind)
        replies = [np.zeros(2, dtype=np.int64) for _ in self.servers]  # (version, what to do next)
        for s, server in enumerate(self.servers):
            start, stop = self.ranges[s]
            # push: header, then this server's gradient shard
            transfers.append(p2p.isend(headers[s], server, TAG_HEADER, self.comm))
            sent += headers[s].nbytes
            if with_grads:
                transfers.append(p2p.isend(self.flat_grads[start:stop], server, TAG_GRAD, self.comm))
                sent += (stop - start) * self.flat_grads.element_size()
            # pull: the answer (version, then the shard) lands straight in the parameters
            transfers.append(p2p.irecv(replies[s], server, TAG_REPLY, self.comm))
            transfers.append(p2p.irecv(self.flat_params[start:stop], server, TAG_PARAMS, self.comm))
            received += replies[s].nbytes + (stop - start) * self.flat_params.element_size()
        p2p.wait_all(transfers)  # all servers at once; how long this takes is the consistency model
        self.seen = [int(r[0]) for r in replies]
        self.code = int(replies[0][1])  # only the first server keeps the budget
        return sent, received

    def pull(self) -> int:
        """Fetch the servers' current parameters (the start of training, or after a resume); the first server's code."""
        self._check_worker("pull")
        self._exchange(PULL, with_grads=False)
        self.pulled = True
        return self.code

    def step(self) -> int:
        """Push this step's gradients, pull parameters (waiting as the consistency model says), zero the gradients.

        Returns the first server's code (dmlmpi.parallel.pace): always GO unless a budget was set.
        """
        self._check_worker("step")
        if not self.pulled:
            raise RuntimeError("parameter server: step() before the first forward (or pull()): no parameters yet")
        for p, slot in zip(self.params, self.slots):
            if p.grad is None:  # no gradient this step (e.g. an unused layer): it contributes zeros
                slot.zero_()
            elif p.grad.data_ptr() != slot.data_ptr():
                slot.copy_(p.grad)  # a gradient tensor made elsewhere (grads were set to None)
            p.grad = slot
        sent, received = self._exchange(PUSH, with_grads=True)
        self.bytes_sent += sent
        self.bytes_received += received
        self.clock += 1
        self.steps += 1
        self.flat_grads.zero_()
        return self.code

    def finish(self) -> None:
        """Stop pushing; return when every worker has, holding the servers' final parameters."""
        self._check_worker("finish")
        self._exchange(DONE, with_grads=False)

    def _check_worker(self, what: str) -> None:
        """Only workers push and pull."""
        if self.is_server:
            raise RuntimeError(f"parameter server: {what}() is for worker ranks; this rank is a server (call serve())")

    # ------------------------------------------------------------------------------------------
    # checkpoints (collective over the whole communicator, servers included)
    # ------------------------------------------------------------------------------------------

    def request_checkpoint(self) -> None:
        """Worker: ask every server to join a checkpoint once all workers have asked (then call state())."""
        self._check_worker("request_checkpoint")
        # only the header: the servers answer nothing, they join the collective state() instead
        reqs = [p2p.isend(header, server, TAG_HEADER, self.comm) for header, server in zip(self._headers(SAVE), self.servers)]
        p2p.wait_all(reqs)

    def server_state(self) -> dict[str, Any]:
        """Server: its shard, optimizer, schedule and counters (no communication)."""
        return dict(shard=self.shard.detach().cpu().clone(), optimizer=self.optimizer.state_dict(),
                    version=self.version, schedule=self.schedule.state_dict() if self.schedule is not None else None,
                    updates_run=self.updates_run, staleness=list(self.staleness_log))

    def load_server_state(self, mine: dict[str, Any]) -> None:
        """Server: take over server_state() (a checkpoint's piece, or this server's own across a recovery)."""
        with torch.no_grad():
            self.shard.copy_(mine["shard"])
        self.optimizer.load_state_dict(mine["optimizer"])
        if self.schedule is not None and mine["schedule"] is not None:
            self.schedule.load_state_dict(mine["schedule"])
        self.version = mine["version"]
        self.updates_run = mine.get("updates_run", self.updates_run)
        self.staleness_log = list(mine.get("staleness", self.staleness_log))

    def state(self) -> dict[str, Any] | None:
        """Collective: on rank 0 the whole PS state (all parameters, every server's optimizer); None elsewhere."""
        mine = None
        if self.is_server:
            mine = self.server_state()
            del mine["updates_run"], mine["staleness"]  # this run's statistics, not the model's state
        # gather: every server's shard and optimizer state to rank 0
        everyone = self.comm.gather(mine, root=0)
        if self.comm.Get_rank() != 0:
            return None
        servers = [everyone[r] for r in self.servers]
        return dict(flat=torch.cat([s["shard"] for s in servers]), servers=servers, mode=self.mode,
                    ranges=self.ranges)

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what state() returned (every rank calls it with the same dict)."""
        if len(state["servers"]) != len(self.servers):
            raise ValueError(f"parameter server: the checkpoint has {len(state['servers'])} server shard(s), "
                             f"this run has {len(self.servers)}; resume with --servers {len(state['servers'])}")
        if self.is_server:
            self.load_server_state(state["servers"][self.index])
        else:
            with torch.no_grad():
                self.flat_params.copy_(state["flat"])
            self.pulled = False  # the servers' versions are fetched again by the next pull

    # ------------------------------------------------------------------------------------------
    # server side
    # ------------------------------------------------------------------------------------------

    def serve(self, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
        """Server: answer workers until all have finished; return this server's statistics.

        `on_checkpoint` runs when every running worker has asked for a checkpoint (all their
        gradients applied); it must make the same collective calls as the workers (state(), ...).
        """
        if not self.is_server:
            raise RuntimeError("parameter server: serve() is for server ranks; this rank is a worker")
        book = Consistency(self.mode, self.workers, self.staleness)
        grads: dict[tuple[int, int], torch.Tensor] = {}
        seen: dict[tuple[int, int], int] = {}
        sends: list[p2p.Transfer] = []
        saving: set[int] = set()
        if self.budget is not None and self.index == 0:
            self.pace = Pace(self.workers, self.budget, self.checkpoint_every, version=self.version)
        header = np.zeros(4, dtype=np.int64)
        status = MPI.Status()
        start = time.perf_counter()
        while not book.all_finished():
            # receive: the next header from any worker
            self.comm.Recv(header, source=MPI.ANY_SOURCE, tag=TAG_HEADER, status=status)
            worker, (kind, clock, version_seen, flags) = status.Get_source(), header.tolist()
            if flags & STOP_FLAG and self.pace is not None:
                self.pace.stop_requested = True
            updates: list[Update] = []
            if kind == PUSH:
                grad = torch.empty_like(self.shard)
                # receive: the gradient shard that follows the header
                p2p.wait(p2p.irecv(grad, worker, TAG_GRAD, self.comm))
                grads[(worker, clock)], seen[(worker, clock)] = grad, version_seen
                updates = book.push(worker)
            elif kind == PULL:
                sends += self._reply(worker)
            elif kind == DONE:
                updates = book.finish(worker)
            elif kind == SAVE:
                saving.add(worker)
            else:
                raise RuntimeError(f"parameter server {self.comm.Get_rank()}: unknown request {kind} from rank {worker}")
            if updates:
                p2p.wait_all(sends)  # answers in flight still read the shard: let them go first
                sends = []
                for update in updates:
                    with maybe_span(self.timeline, f"update {self.version + 1}", args={"gradients": len(update)}):
                        self._apply(update, grads, seen)
            if self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_HEADER):
                continue  # more requests already here: take them in first, so answers are fresher
            for w in book.answerable():
                sends += self._reply(w)
            running = {w for w in self.workers if w not in book.finished}
            if saving and saving >= running and book.quiescent():
                p2p.wait_all(sends)
                sends = []
                if on_checkpoint is not None:
                    on_checkpoint()
                saving.clear()
        # every worker is done: all get the final parameters (they sent DONE and wait for this)
        p2p.wait_all(sends)
        p2p.wait_all([t for w in self.workers for t in self._reply(w)])
        wall = time.perf_counter() - start
        return dict(server=self.index, updates=self.updates_run, version=self.version, wall_s=wall,
                    staleness=list(self.staleness_log))

    def _apply(self, update: Update, grads: dict[tuple[int, int], torch.Tensor], seen: dict[tuple[int, int], int]) -> None:
        """One optimizer step on the shard with the mean of the update's gradients (summed in worker order)."""
        total = grads.pop(update[0])
        for key in update[1:]:
            total += grads.pop(key)
        if len(update) > 1:
            total /= len(update)
        stale = [self.version - seen.pop(key) for key in update]
        self.staleness_log += stale
        self.shard.grad = total
        factor = self._lr_factor()
        if factor != 1.0:
            kept = [group["lr"] for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["lr"] *= factor
            self.optimizer.step()
            for group, lr in zip(self.optimizer.param_groups, kept):
                group["lr"] = lr  # the schedule owns the rate: only this update is scaled
        else:
            self.optimizer.step()
        self.version += 1
        self.updates_run += 1
        if self.pace is not None:
            self.pace.applied(self.version)
        # the schedule counts global steps: in async mode one per len(workers) updates
        if self.schedule is not None and (self.mode != "async" or self.updates_run % len(self.workers) == 0):
            self.schedule.step()

    def _lr_factor(self) -> float:
        """How much of the scheduled step size this update takes.

        async: each update is one worker's gradient, from 1/W of the global batch: the rate scales
        by sqrt(1/W), the square-root rule for a smaller batch (with W times as many updates; on the
        default task 1/W under-trains and 1 diverges). sync and ssp: whole rounds at the full rate;
        in ssp the bound on staleness is what keeps stale rounds safe (Ho et al. 2013). Dividing by
        1 + staleness (Zhang et al. 2016) under-trained ssp here: 92.8-93.9% against 94.8-95.6%
        with the full rate (3 runs each; sync 95.2%).
        """
        if self.mode == "async":
            return 1.0 / len(self.workers) ** 0.5
        return 1.0

    def _reply(self, worker: int) -> list[p2p.Transfer]:
        """Start sending `worker` our version and shard."""
        code = self.pace.code(worker) if self.pace is not None else GO
        answer = np.array([self.version, code], dtype=np.int64)
        return [p2p.isend(answer, worker, TAG_REPLY, self.comm),
                p2p.isend(self.shard.detach(), worker, TAG_PARAMS, self.comm)]

    def close(self) -> None:
        """Free the communicators this object made (a revoked one, after a rank died, is left to MPI_Finalize)."""
        for c in (self.comm, self.worker_comm):
            if c != MPI.COMM_NULL and not c.Is_revoked():
                c.Free()
