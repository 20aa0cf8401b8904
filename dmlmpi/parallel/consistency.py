"""When a parameter server applies gradients and answers pulls: BSP, ASP and SSP as pure bookkeeping.

No MPI and no tensors here: the server loop (dmlmpi.parallel.ps) reports what arrived and asks what
to do; the rules can be tested on their own.

- `sync` (BSP): gradients are grouped by clock (a worker's clock counts its pushes); a round is
  applied as one update, the mean of its gradients, once every worker still running has pushed it;
  a worker's pull is answered when the round it just pushed has been applied.
- `ssp` with staleness s: the same rounds, but a worker that has pushed k rounds may go on as soon
  as rounds 0..k-1-s are applied, so no worker runs more than s rounds ahead of the slowest.
  s = 0 is exactly sync.
- `async` (ASP): each gradient is its own update, applied on arrival; every pull is answered at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MODES = ("sync", "async", "ssp")

Update = list[tuple[int, int]]  # the (worker, clock) gradients that one optimizer step averages


@dataclass
class Consistency:
    """Server-side state of one consistency model over a fixed set of workers."""

    mode: str
    workers: list[int]
    staleness: int = 0
    version: int = 0  # updates applied so far (what the server's parameters are the result of)
    clocks: dict[int, int] = field(default_factory=dict)  # worker -> pushes received
    finished: dict[int, int] = field(default_factory=dict)  # worker -> its final clock
    waiting: dict[int, int] = field(default_factory=dict)  # worker -> rounds its pull needs applied
    rounds: dict[int, list[int]] = field(default_factory=dict)  # clock -> workers that pushed it
    next_round: int = 0  # first round (clock) not yet applied; clocks count from this run's start

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"consistency mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.staleness < 0:
            raise ValueError(f"staleness must not be negative, got {self.staleness}")
        if self.mode == "sync":
            self.staleness = 0
        self.clocks = {w: 0 for w in self.workers}

    def push(self, worker: int) -> list[Update]:
        """A gradient from `worker` arrived; return the updates to apply now, in order."""
        clock = self.clocks[worker]
        self.clocks[worker] = clock + 1
        if self.mode == "async":
            self.waiting[worker] = 0  # answered as soon as its own gradient is in
            self.version += 1
            return [[(worker, clock)]]
        self.rounds.setdefault(clock, []).append(worker)
        # its next step may start once every round up to `clock - staleness` is applied
        self.waiting[worker] = clock + 1 - self.staleness
        return self._complete_rounds()

    def finish(self, worker: int) -> list[Update]:
        """`worker` has stopped pushing; rounds that only waited for it can be applied."""
        self.finished[worker] = self.clocks[worker]
        self.waiting.pop(worker, None)
        return [] if self.mode == "async" else self._complete_rounds()

    def _needed(self, clock: int) -> set[int]:
        """Workers whose gradient round `clock` must contain."""
        return {w for w in self.workers if w not in self.finished or self.finished[w] > clock}

    def _complete_rounds(self) -> list[Update]:
        """Pop the rounds, in clock order, that every worker they need has pushed."""
        out: list[Update] = []
        while self.next_round in self.rounds and set(self.rounds[self.next_round]) >= self._needed(self.next_round):
            pushed = sorted(self.rounds.pop(self.next_round))  # worker order: a deterministic sum
            out.append([(w, self.next_round) for w in pushed])
            self.next_round += 1
            self.version += 1
        return out

    def answerable(self) -> list[int]:
        """Workers whose pull can be answered now (removed from the waiting list), in worker order."""
        ready = sorted(w for w, need in self.waiting.items() if self.next_round >= need)
        for w in ready:
            del self.waiting[w]
        return ready

    def all_finished(self) -> bool:
        """Every worker has said it is done."""
        return len(self.finished) == len(self.workers)

    def quiescent(self) -> bool:
        """No gradient waits to be applied (every pushed round is complete)."""
        return not self.rounds
