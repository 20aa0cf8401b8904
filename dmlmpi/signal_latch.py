"""Catch SIGUSR1/SIGTERM from a process's first moments: remember the first one, act on it later.

`python -m dmlmpi.train` installs a latch before it imports MPI and torch (a second or two of
start-up), so a Slurm signal that lands then neither kills the rank nor is lost: the training loop's
stop agreement (dmlmpi.preempt) reads the latch and the run stops at its first agreed step with a
checkpoint. This module imports nothing heavy, for that reason.
"""
from __future__ import annotations

import signal
from types import FrameType

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class SignalLatch:
    """Remembers the first of `signals` this process receives; its handler does nothing else."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
        self.received: signal.Signals | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: note the signal (MPI calls are not safe here)."""
        if self.received is None:
            self.received = signal.Signals(signum)

    def restore(self) -> None:
        """Put back the handlers that were there before the latch."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
