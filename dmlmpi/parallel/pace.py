"""Own-pace async parameter servers: what the first server tells each worker after its push.

In async mode with own pace, workers do not split each epoch evenly and stop together; each goes
through its own share of the data at its own speed, again and again, until the servers have applied
a budget of gradients (epochs x steps per epoch x workers: the same samples as an even run). A fast
worker therefore does more of the work, which is what asynchronous training is for when one worker
is slow (Downpour SGD; TensorFlow's ParameterServerStrategy dispatches steps the same way).

The first server decides, for every answer to a worker, one code: go on, checkpoint then go on,
stop (budget spent), or stop for a signal (preemption: a worker flags it in its push header).
Every worker must join the same checkpoints (they are collective), so a checkpoint, once due, is
announced to every running worker before any stop is given. No MPI here: the rules are tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GO, DONE, PREEMPTED, CHECKPOINT = 1, 0, 2, 3  # answer codes; DONE and PREEMPTED end the worker's loop


@dataclass
class Pace:
    """The first server's bookkeeping of the budget, the periodic checkpoints and a stop request."""

    workers: list[int]
    budget: int  # gradients to apply over the whole run (resumes included)
    checkpoint_every: int = 0  # gradients between checkpoints (0: only at the stop)
    version: int = 0  # gradients applied so far (resumes included)
    stop_requested: bool = False  # a worker had a signal
    owed: set[int] = field(default_factory=set)  # workers not yet told of the checkpoint that is due
    next_checkpoint: int = 0  # version at which the next checkpoint falls due
    finished: set[int] = field(default_factory=set)  # workers that were told to stop

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"own-pace budget must be at least one gradient, got {self.budget}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint interval must not be negative, got {self.checkpoint_every}")
        self.next_checkpoint = self._after(self.version)

    def _after(self, version: int) -> int:
        """The first checkpoint version above `version` (never, without periodic checkpoints)."""
        if not self.checkpoint_every:
            return self.budget + len(self.workers)  # past the last gradient that can arrive
        return (version // self.checkpoint_every + 1) * self.checkpoint_every

    def applied(self, version: int) -> None:
        """The server has now applied `version` gradients: a checkpoint may fall due."""
        self.version = version
        if self.owed:  # the last one is still being announced: the next is called once it is out
            return
        if version >= self.next_checkpoint and version < self.budget and not self.stop_requested:
            # everyone still running must hear of it (and join it) before anyone is told to stop
            self.owed |= set(self.workers) - self.finished
            self.next_checkpoint = self._after(version)

    def code(self, worker: int) -> int:
        """What to tell `worker` in the answer to its push (or its first pull)."""
        if worker in self.owed:
            self.owed.discard(worker)
            return CHECKPOINT
        if self.owed:  # a checkpoint others still have to hear of: no stop yet, keep going
            return GO
        if self.stop_requested:
            self.finished.add(worker)
            return PREEMPTED
        if self.version >= self.budget:
            self.finished.add(worker)
            return DONE
        return GO
