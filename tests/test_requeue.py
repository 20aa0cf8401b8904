"""Time limits and preemption: a signal makes the ranks checkpoint at one step and exit 99; the job resumes.

Without Slurm: SIGUSR1 to mpirun mid-run, then `--resume`. On the local Slurm (jobs/local-slurm.sh):
jobs/dp.sbatch gets SIGUSR1 the way the time limit sends it (`scancel --signal=USR1 --batch`), requeues
itself and finishes. Either way the run's losses per step and test accuracies equal an uninterrupted
run's. Every wait has a timeout and leftover processes or jobs are killed, so nothing can hang CI.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest

from dmlmpi.mpienv import find_mpiexec, launch_env
from dmlmpi.preempt import PREEMPTED_EXIT
from test_slurm import job_env, read, run_setup
from trainrun import ROOT, losses, records, run_train

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec (and Slurm jobs) themselves

# ~75 steps per epoch: long enough (a few seconds on 2 ranks) to be interrupted mid-run
ARGS = ["--samples", "3000", "--batch-size", "32", "--log-every", "1", "--epochs", "6"]
RUN_TIMEOUT = 120
SIGNAL_AFTER_STEP = 20  # send the signal once this step is logged: the ranks are in the training loop


def accuracies(out: Path) -> list[tuple[int, float]]:
    """(epoch, test accuracy) of each epoch's evaluation."""
    return [(r["epoch"], r["test_accuracy"]) for r in records(out) if "test_accuracy" in r]


def last_step(out: Path) -> int:
    """The highest step logged so far in out/metrics.jsonl (0 before the first)."""
    try:
        return max((r["step"] for r in records(out) if "loss" in r), default=0)
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or a line half written
        return 0


def wait_for(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.2) -> None:
    """Poll `condition` every `every` seconds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def assert_same_run(resumed: Path, full: Path) -> None:
    """Every step's logged loss, every epoch's test accuracy and the final accuracy are the uninterrupted run's."""
    a, b = losses(resumed), losses(full)
    assert sorted(a) == sorted(b)
    for step in b:
        assert a[step] == pytest.approx(b[step], rel=1e-6, abs=1e-9), step
    assert accuracies(resumed) == accuracies(full)
    summary = [json.loads((d / "summary.json").read_text()) for d in (resumed, full)]
    assert summary[0]["test_accuracy"] == summary[1]["test_accuracy"]
    assert summary[0]["steps"] == summary[1]["steps"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: Any) -> Path:
    """One 2-rank run of ARGS from start to end."""
    out = tmp_path_factory.mktemp("full")
    result = run_train(2, out, ARGS, RUN_TIMEOUT)
    assert result.returncode == 0, result.stdout
    return out


def test_sigusr1_to_mpirun_checkpoints_and_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    """SIGUSR1 to mpirun: both ranks stop at one step, checkpoint it, exit 99; --resume ends as the full run."""
    cmd = [find_mpiexec(), "-n", "2", sys.executable, "-m", "dmlmpi.train", *ARGS, "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=launch_env() | {"PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        wait_for(lambda: last_step(tmp_path) >= SIGNAL_AFTER_STEP or proc.poll() is not None, 60, "training steps")
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:  # mpirun, its daemon and the ranks share the session's process group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert proc.returncode == PREEMPTED_EXIT, out
    step = last_step(tmp_path)
    assert SIGNAL_AFTER_STEP <= step < max(losses(uninterrupted)), out
    assert f"stopped for a signal (SIGUSR1) at step {step}" in out, out
    assert (tmp_path / "latest").read_text() == f"ckpt-{step}.pt"
    assert not (tmp_path / "summary.json").exists()  # written only by a run that ended
    # both ranks report the same number of steps: they stopped together
    assert [r["steps"] for r in records(tmp_path) if r.get("role") == "worker"] == [step, step]

    second = run_train(2, tmp_path, [*ARGS, "--resume"], RUN_TIMEOUT)
    assert second.returncode == 0, second.stdout
    assert f"at step {step}" in second.stdout, second.stdout
    assert_same_run(tmp_path, uninterrupted)


def job_state(job_id: str) -> str:
    """JobState from `scontrol show job` ('GONE' once Slurm has forgotten the job)."""
    result = subprocess.run(["scontrol", "-o", "show", "job", job_id], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=30)
    for word in result.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return "GONE"


def dp_job_interrupted(tmp_path: Path, ntasks: int, interrupt: Callable[[str, Path], None],
                       **variables: str) -> tuple[Path, str]:
    """Submit jobs/dp.sbatch (sbatch --wait), call interrupt(job name, run dir) mid-training, wait for the end.

    Returns the run directory and the job's output; the job must end with exit 0.
    """
    run_setup()
    run, output = tmp_path / "run", tmp_path / "dp.out"
    name = f"dmlmpi-test-{uuid.uuid4().hex[:8]}"
    cmd = ["sbatch", "--wait", f"--ntasks={ntasks}", f"--job-name={name}", f"--chdir={ROOT}", f"--output={output}",
           "--time=5", "jobs/dp.sbatch"]
    env = job_env(dict(DMLMPI_ARGS=" ".join(ARGS), DMLMPI_OUT=str(run), **variables))
    sbatch = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: last_step(run) >= SIGNAL_AFTER_STEP or sbatch.poll() is not None, 90, "training steps")
        interrupt(name, run)
        sbatch_out, _ = sbatch.communicate(timeout=150)
    except BaseException:
        subprocess.run(["scancel", f"--name={name}"], timeout=30)
        sbatch.kill()
        raise
    log = f"--- sbatch (exit {sbatch.returncode}):\n{sbatch_out}\n--- job output:\n{read(output)}"
    assert sbatch.returncode == 0, log
    return run, read(output)


def test_dp_job_requeues_itself_and_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    """jobs/dp.sbatch given SIGUSR1 (as before a time limit): checkpoint, requeue, resume, same result."""
    def usr1(name: str, run: Path) -> None:
        """What Slurm's --signal=B:USR1@60 does before the time limit."""
        signalled = subprocess.run(["scancel", "--signal=USR1", "--batch", f"--name={name}"], timeout=30,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert signalled.returncode == 0, signalled.stdout

    run, text = dp_job_interrupted(tmp_path, 2, usr1)
    assert "requeueing" in text and "resumed from" in text, text
    assert_same_run(run, uninterrupted)


# the other modes (pipeline and hybrid share dp's loop), stopped by SIGTERM sent to the ranks themselves (as Slurm's scancel and preemption do;
# SIGTERM to mpirun instead makes Open MPI's launcher kill its ranks at once)
OTHER_MODES = {
    "fl": ["--mode", "fl", "--samples", "1000", "--clients", "20", "--fraction", "0.25", "--rounds", "40",
           "--local-epochs", "2"],
    "ps-sync": ["--mode", "ps", "--servers", "1", "--ps-mode", "sync", *ARGS, "--epochs", "3"],
}


def curve(out: Path) -> dict[tuple, tuple]:
    """What must equal between a resumed and an uninterrupted run: losses and accuracies by step (or round).

    A step logged after the interrupted run's last checkpoint is logged again by the resumed run: the
    later record wins, as it should.
    """
    out_ = {}
    for r in records(out):
        if "event" in r or not ("loss" in r or "round" in r or "test_accuracy" in r):
            continue
        key = (r.get("step"), r.get("round"), "test" if "test_accuracy" in r and "round" not in r else "train")
        out_[key] = (r.get("loss"), r.get("train_loss"), r.get("test_accuracy"))
    return out_


@pytest.mark.parametrize("mode", sorted(OTHER_MODES))
def test_sigterm_to_the_ranks_checkpoints_and_resumes(mode: str, tmp_path: Path) -> None:
    """SIGTERM to every rank mid-run: checkpoint, exit 99; --resume ends exactly as an uninterrupted run."""
    from trainrun import KillableRun, rank_pid

    args = OTHER_MODES[mode]
    full = run_train(2 if mode != "ps-sync" else 3, tmp_path / "full", args, RUN_TIMEOUT)
    assert full.returncode == 0, full.stdout
    nprocs = 3 if mode == "ps-sync" else 2
    job = KillableRun(nprocs, tmp_path / "run", args)
    job.wait_for_records(15)
    for rank in range(nprocs):
        os.kill(rank_pid(job.out, rank), signal.SIGTERM)
    output = job.finish(timeout=60)
    assert job.proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "stopped for a signal" in output and not (tmp_path / "run" / "summary.json").exists()
    second = run_train(nprocs, tmp_path / "run", [*args, "--resume"], RUN_TIMEOUT)
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout
    resumed, reference = curve(tmp_path / "run"), curve(tmp_path / "full")
    assert sorted(resumed, key=str) == sorted(reference, key=str)
    for key, values in reference.items():
        for a, b in zip(resumed[key], values):
            assert a == (pytest.approx(b, rel=1e-6, abs=1e-9) if isinstance(b, float) else b), (key, resumed[key], values)


def test_elastic_dp_job_loses_a_rank_and_finishes(tmp_path: Path) -> None:
    """jobs/dp.sbatch with DMLMPI_ELASTIC=1 on 3 tasks: a rank SIGKILLed mid-run, the job ends well on 2."""
    from trainrun import rank_pid

    def kill_rank_1(name: str, run: Path) -> None:
        """A crashed node, as far as rank 1 is concerned."""
        victim = rank_pid(str(run), 1)
        assert victim is not None, "rank 1 not found"
        os.kill(victim, signal.SIGKILL)

    run, text = dp_job_interrupted(tmp_path, 3, kill_rank_1, DMLMPI_ELASTIC="1")
    assert "mpirun --with-ft ulfm -n 3" in text and "--elastic: rank(s) [1] died" in text, text
    summary = json.loads((run / "summary.json").read_text())
    assert [f["dead_ranks"] for f in summary["failures"]] == [[1]] and summary["world_size_end"] == 2
    assert summary["epochs_done"] == 6


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _has_loaded_torch(pid: int) -> bool:
    """Whether torch's library is mapped into process `pid` yet."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "libtorch" in f.read()
    except OSError:
        return True  # gone: count it as too late


def test_sigterm_during_start_up_stops_at_the_first_step_with_a_checkpoint(tmp_path: Path) -> None:
    """SIGTERM to each rank while it is still importing torch: it neither dies nor loses the signal;
    the run stops at its first agreed step with a checkpoint (exit 99) and --resume finishes it."""
    from trainrun import KillableRun, rank_pid

    job = KillableRun(2, tmp_path / "run", ARGS)
    pids: dict[int, int] = {}

    def caught_early() -> bool:
        """Both ranks found, each with its SIGTERM handler installed."""
        for rank in range(2):
            if rank not in pids and (pid := rank_pid(job.out, rank)) is not None:
                pids[rank] = pid  # /proc is scanned only until each rank is found
        return len(pids) == 2 and all(_catches(pid, signal.SIGTERM) for pid in pids.values())

    # polled every 5 ms: the window between the latch and torch's import is a second or two
    wait_for(caught_early, 60, "both ranks' SIGTERM handlers", every=0.005)
    early = [not _has_loaded_torch(pid) for pid in pids.values()]
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    output = job.finish(timeout=RUN_TIMEOUT)
    # the handler was there before torch was imported: start-up is covered, not only the training loop
    assert all(early), "a rank installed its handler only after importing torch"
    assert job.proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "stopped for a signal" in output and not (tmp_path / "run" / "summary.json").exists()
    assert last_step(tmp_path / "run") <= 2  # the step after the first agreement
    from dmlmpi.checkpoint import checkpoints
    written = checkpoints(str(tmp_path / "run"))
    assert written and max(written) <= 2
    second = run_train(2, tmp_path / "run", [*ARGS, "--resume"], RUN_TIMEOUT)
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout and (tmp_path / "run" / "summary.json").exists()
