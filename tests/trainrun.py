"""What the end-to-end training tests share: launching `python -m dmlmpi.train` and reading its run directory."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dmlmpi.testing import run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(nprocs: int, out: Any, args: Sequence[str], timeout: float) -> Any:
    """Run python -m dmlmpi.train on nprocs ranks with `args` into run directory `out`; the finished process."""
    return run_mpi(nprocs, ["-m", "dmlmpi.train", *args, "--out", str(out)], timeout=timeout, cwd=ROOT)


def records(out: Any) -> list[dict[str, Any]]:
    """Every line of the run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out: Any) -> dict[int, float]:
    """step -> logged training loss."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of the training rank `rank` whose command line contains `marker` (scans /proc: no procps needed)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        program = os.path.basename(cmdline.split("\0", 1)[0])
        # a python rank, never its launcher (whose command line names the same script and run directory)
        if (program.startswith("python") and marker in cmdline and "dmlmpi.train" in cmdline
                and f"OMPI_COMM_WORLD_RANK={rank}" in environ):
            return int(entry)
    return None


class KillableRun:
    """`mpirun -n N [flags] python -m dmlmpi.train ARGS --out OUT` in the background, whose ranks a test can SIGKILL."""

    def __init__(self, nprocs: int, out: Any, args: Sequence[str], mpirun_flags: Sequence[str] = ()) -> None:
        import subprocess
        import sys

        from dmlmpi.mpienv import find_mpiexec, launch_env

        self.out = str(out)
        cmd = [find_mpiexec(), *mpirun_flags, "-n", str(nprocs), sys.executable, "-m", "dmlmpi.train", *args,
               "--out", self.out]
        # a session of its own: the whole launcher tree can be killed at the end, whatever happened
        # PYTHONFAULTHANDLER: a rank sent SIGABRT prints where every thread stands (see finish)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                     env=dict(launch_env(), PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1"),
                                     start_new_session=True)

    def wait_for_records(self, count: int, timeout: float = 120) -> None:
        """Wait until metrics.jsonl has `count` lines (the job must still be running)."""
        import time

        deadline = time.monotonic() + timeout
        metrics = os.path.join(self.out, "metrics.jsonl")
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the job ended early:\n{self.proc.communicate()[0][-3000:]}"
            if os.path.exists(metrics):
                with open(metrics) as f:
                    if sum(1 for _ in f) >= count:
                        return
            time.sleep(0.05)
        raise AssertionError(f"no {count} metrics records within {timeout} s")

    def kill_rank(self, rank: int) -> None:
        """SIGKILL the process of world rank `rank`, from outside, as a crashed node would."""
        import signal

        victim = rank_pid(self.out, rank)
        assert victim is not None, f"rank {rank} not found"
        os.kill(victim, signal.SIGKILL)

    def finish(self, timeout: float) -> str:
        """Wait for the launcher; its output. A job still running at `timeout` fails with every rank's stack."""
        import signal
        import subprocess
        import time

        try:
            return self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            for rank in range(64):
                if (pid := rank_pid(self.out, rank)) is not None:
                    os.kill(pid, signal.SIGABRT)
            time.sleep(3)
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"the job hung; its output and stacks:\n{self.proc.communicate()[0][-12000:]}") from None
        finally:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
