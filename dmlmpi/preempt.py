"""Stop cleanly before a time limit or on preemption: checkpoint at a step all ranks agree on, then exit 99.

Slurm sends SIGUSR1 before the time limit (`#SBATCH --signal=B:USR1@60`, forwarded by the batch
script to the launcher, which forwards it to the ranks) and SIGTERM on preemption or cancel. The
handler only sets a flag. Ranks may receive the signal at different steps, so at every step boundary
each rank completes the previous step's nonblocking MAX all-reduce of the flag and starts the next:
all ranks see the same result at the same step (one step after the first signal) and stop together.
The all-reduce of one int overlaps a whole step, so waiting for it costs almost nothing.
"""
from __future__ import annotations

import signal
import time

import numpy as np
from mpi4py import MPI

from dmlmpi.signal_latch import SIGNALS, SignalLatch

PREEMPTED_EXIT = 99  # exit status of a run that checkpointed on a signal: the batch script requeues it


class StopAgreement:
    """Signal flag plus a per-step nonblocking all-reduce that makes every rank stop at the same step."""

    def __init__(self, comm: MPI.Comm, signals: tuple[signal.Signals, ...] = SIGNALS,
                 latch: SignalLatch | None = None) -> None:
        self.comm = comm
        # the signal flag: a latch installed earlier (at start-up, so no signal is missed) or one of our own
        self.latch = SignalLatch(signals) if latch is None else latch
        self.seconds, self.checks = 0.0, 0  # time spent in should_stop (the agreement's cost)
        self._send, self._result = np.zeros(1, np.int32), np.zeros(1, np.int32)
        self._request: MPI.Request | None = None

    @property
    def received(self) -> signal.Signals | None:
        """The first signal this rank got, if any."""
        return self.latch.received

    def should_stop(self) -> bool:
        """Collective, once per step on every rank of comm: whether any rank had a signal by the previous call."""
        t0 = time.perf_counter()
        stop = False
        if self._request is not None:
            self._request.Wait()  # started a step ago: normally complete already
            self._request = None
            stop = bool(self._result[0])
        if not stop:
            # a separate send buffer: the handler must not change one that MPI is reading
            self._send[0] = int(self.received is not None)
            self._request = self.comm.Iallreduce(self._send, self._result, op=MPI.MAX)
        self.seconds += time.perf_counter() - t0
        self.checks += 1
        return stop

    def rebind(self, comm: MPI.Comm) -> None:
        """Agree on `comm` from now on (elastic recovery); the all-reduce pending on the old one is abandoned."""
        self.comm, self._request = comm, None
        # fresh buffers: the abandoned request failed, but nothing promises MPI no longer holds the old ones
        self._send, self._result = np.zeros(1, np.int32), np.zeros(1, np.int32)

    def close(self) -> None:
        """Complete the last all-reduce (every rank started it) and restore the previous handlers."""
        if self._request is not None:
            self._request.Wait()
            self._request = None
        self.latch.restore()


def defer_signals(signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
    """Ranks outside the stop agreement (ps servers): survive the signal and let the workers decide.

    Slurm signals every task of the job; the servers stop when the workers, having agreed to stop,
    checkpoint (the servers join the collective write) and say they are done.
    """
    for s in signals:
        signal.signal(s, lambda signum, frame: None)

