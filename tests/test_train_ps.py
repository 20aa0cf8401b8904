"""`python -m dmlmpi.train --mode ps` end to end: equivalence, consistency models, resume, accuracy."""
from __future__ import annotations

import json

import pytest

from trainrun import ROOT, losses, records, run_train

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

SMALL = ["--samples", "600", "--batch-size", "32", "--log-every", "1", "--epochs", "2"]


def train(nprocs: int, out, *extra: str, small: bool = True, timeout: float = 240):
    """Run python -m dmlmpi.train on nprocs ranks into `out`; return the finished process."""
    return run_train(nprocs, out, [*(SMALL if small else []), *extra], timeout)


@pytest.fixture(scope="module")
def dp_two_ranks(tmp_path_factory):
    """Data parallel on 2 ranks: the reference for 2 workers."""
    out = tmp_path_factory.mktemp("dp2")
    result = train(2, out)
    assert result.returncode == 0, result.stdout
    return out


@pytest.fixture(scope="module")
def ps_sync(tmp_path_factory):
    """Sync PS with 2 workers and 1 server."""
    out = tmp_path_factory.mktemp("ps3")
    result = train(3, out, "--mode", "ps")
    assert result.returncode == 0, result.stdout
    return out, result


@pytest.mark.parametrize("servers", [1, 2])
def test_sync_ps_equals_data_parallel(servers, dp_two_ranks, ps_sync, tmp_path) -> None:
    """2 workers with 1 or 2 servers log the same losses as 2-rank data parallel (same global batches)."""
    if servers == 1:
        out = ps_sync[0]
    else:
        out = tmp_path
        result = train(4, out, "--mode", "ps", "--servers", "2")
        assert result.returncode == 0, result.stdout
    dp, ps = losses(dp_two_ranks), losses(out)
    assert dp.keys() == ps.keys() and len(dp) == 30
    for step in dp:
        assert ps[step] == pytest.approx(dp[step], rel=1e-4, abs=1e-6), step
    summary = json.load(open(out / "summary.json"))
    assert summary["mode"] == "ps" and summary["servers"] == servers and summary["workers"] == 2


def test_run_directory_has_staleness_and_worker_throughput(ps_sync, tmp_path) -> None:
    """Per-worker throughput and bytes, per-server staleness of every update; the plot draws the histogram."""
    import subprocess
    import sys

    out, result = ps_sync
    recs = records(out)
    workers = [r for r in recs if r.get("role") == "worker"]
    servers = [r for r in recs if r.get("role") == "server"]
    assert [r["rank"] for r in workers] == [0, 1] and [r["rank"] for r in servers] == [2]
    for r in workers:
        assert r["samples_per_s"] > 0 and len(r["epoch_samples_per_s"]) == 2
        # 8010 float32 gradients + a 32-byte header to the one server per step
        assert r["bytes_sent_per_step"] == 8010 * 4 + 32
    assert servers[0]["updates"] == 30 and servers[0]["staleness"] == [0] * 60  # sync: never stale
    assert "parameter server (sync) on 3 ranks: 2 worker(s), 1 server(s)" in result.stdout
    done = subprocess.run([sys.executable, "-m", "dmlmpi.plot", str(out), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "staleness.png").read_bytes()[:4] == b"\x89PNG"


def test_ssp_zero_equals_sync(ps_sync, tmp_path) -> None:
    """--ps-mode ssp --staleness 0 ends with exactly the parameters and test loss of sync."""
    import torch

    result = train(3, tmp_path, "--mode", "ps", "--ps-mode", "ssp", "--staleness", "0")
    assert result.returncode == 0, result.stdout
    ssp, sync = (torch.load(d / "ckpt-30.pt", weights_only=False)["model"] for d in (tmp_path, ps_sync[0]))
    assert ssp.keys() == sync.keys()
    for name in ssp:
        assert torch.equal(ssp[name], sync[name]), name
    summaries = [json.load(open(d / "summary.json")) for d in (tmp_path, ps_sync[0])]
    assert summaries[0]["test_loss"] == summaries[1]["test_loss"]


def test_sync_resume_continues_where_it_stopped(ps_sync, tmp_path) -> None:
    """Stopped after 11 steps, resumed: later losses equal the uninterrupted run's (servers' Adam state restored)."""
    first = train(3, tmp_path, "--mode", "ps", "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    assert (tmp_path / "ckpt-11.pt").exists()
    second = train(3, tmp_path, "--mode", "ps", "--resume")
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout and "at step 11" in second.stdout
    resumed, full = losses(tmp_path), losses(ps_sync[0])
    assert sorted(resumed) == list(range(1, 31))
    for step in range(12, 31):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6, abs=1e-9), step


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_async_and_ssp_resume_and_finish(mode, tmp_path) -> None:
    """A straggling worker, a checkpoint every 5 steps, a stop at 12 and a resume: the run completes."""
    first = train(4, tmp_path, "--mode", "ps", "--ps-mode", mode, "--straggler", "1:0.005",
                  "--checkpoint-every", "5", "--max-steps", "12")
    assert first.returncode == 0, first.stdout
    assert (tmp_path / "ckpt-10.pt").exists() and (tmp_path / "ckpt-12.pt").exists()
    second = train(4, tmp_path, "--mode", "ps", "--ps-mode", mode, "--resume")
    assert second.returncode == 0, second.stdout
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["steps"] == 30 and summary["ps_mode"] == mode  # 480 / 32 = 15 steps per epoch, 2 epochs
    stale = [s for r in records(tmp_path) if r.get("role") == "server" for s in r["staleness"]]
    assert stale and (mode == "async" or max(stale) <= 2)


def test_async_and_ssp_reach_the_default_target(tmp_path) -> None:
    """The default MNIST-1D task with 3 workers: sync, async (both paces) and ssp (s=2) reach 92%, within 2 points of sync."""
    accuracy = {}
    for name in ("sync", "async", "ssp", "async-own"):
        mode, _, pace = name.partition("-")
        result = train(4, tmp_path / name, "--mode", "ps", "--ps-mode", mode, "--ps-pace", pace or "even",
                       small=False, timeout=300)
        assert result.returncode == 0, result.stdout
        accuracy[name] = json.load(open(tmp_path / name / "summary.json"))["test_accuracy"]
    print(accuracy)
    assert min(accuracy.values()) >= 0.92, accuracy
    assert all(accuracy[name] >= accuracy["sync"] - 0.02 for name in accuracy), accuracy


def server_record(out) -> dict:
    """The server's statistics record of the last finished run in `out` (one server)."""
    return [r for r in records(out) if r.get("role") == "server"][-1]


def worker_steps(out) -> dict[int, int]:
    """Each worker's steps in the run, by rank."""
    return {r["rank"]: r["steps"] for r in records(out) if r.get("role") == "worker"}


def test_own_pace_fast_workers_take_more_of_the_budget(tmp_path) -> None:
    """--ps-pace own with worker 1 slowed: the servers apply the run's budget, the fast workers most of it."""
    # 480 / 32 = 15 global steps per epoch, 2 epochs, 3 workers: a budget of 90 gradients
    result = train(4, tmp_path, "--mode", "ps", "--ps-mode", "async", "--ps-pace", "own", "--straggler", "1:0.03")
    assert result.returncode == 0, result.stdout
    server = server_record(tmp_path)
    assert 90 <= server["version"] <= 90 + 2, server["version"]  # at most one more push per other worker
    steps = worker_steps(tmp_path)
    assert sum(steps.values()) == server["updates"]  # every push applied, none lost
    # the fast workers together take more than their equal share (two thirds), the straggler fewer
    # than the fastest: not fewer than each, since on a loaded shared machine a fast worker can be
    # starved too (a CI run under outside load read {0: 18, 1: 19, 2: 55})
    assert steps[0] + steps[2] > 2 * steps[1] and steps[1] < max(steps[0], steps[2]), steps
    assert (tmp_path / "summary.json").exists()


def test_own_pace_resumes_where_the_budget_stood(tmp_path) -> None:
    """A run stopped by --max-steps at 6 global steps (18 gradients), resumed without: it completes the budget."""
    first = train(4, tmp_path, "--mode", "ps", "--ps-mode", "async", "--ps-pace", "own", "--max-steps", "6")
    assert first.returncode == 0, first.stdout
    before = server_record(tmp_path)["version"]
    assert 18 <= before <= 20
    second = train(4, tmp_path, "--mode", "ps", "--ps-mode", "async", "--ps-pace", "own", "--resume")
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout
    server = server_record(tmp_path)  # the resumed run's
    assert 90 <= server["version"] <= 92 and server["updates"] == server["version"] - before, (before, server)
    summary = json.load(open(tmp_path / "summary.json"))
    assert not summary["stopped_early"] and summary["final_loss"] == summary["final_loss"]  # finished, not NaN


def test_own_pace_is_refused_where_it_cannot_work(tmp_path) -> None:
    """Own pace needs ps async and no --elastic: a clear error before training."""
    for extra in (["--mode", "ps", "--ps-mode", "sync"], ["--mode", "dp"]):
        result = train(3, tmp_path / extra[-1], *extra, "--ps-pace", "own")
        assert result.returncode == 2 and "--ps-pace own needs --mode ps --ps-mode async" in result.stdout, result.stdout


def test_own_pace_signal_stops_every_worker_and_resume_completes(tmp_path) -> None:
    """SIGTERM to every rank of an own-pace run: the servers stop all workers, checkpoint, exit 99; --resume finishes."""
    import os
    import signal

    from dmlmpi.preempt import PREEMPTED_EXIT
    from trainrun import KillableRun, rank_pid

    # 2400 / 32 = 75 global steps per epoch, 12 epochs, 3 workers: a budget of 2700 gradients
    args = ["--samples", "3000", "--batch-size", "32", "--log-every", "1", "--epochs", "12", "--mode", "ps",
            "--ps-mode", "async", "--ps-pace", "own"]
    job = KillableRun(4, tmp_path, args)
    # rank 0 logs its own steps, and may start a second before the others: wait until all surely train
    # (a rank signalled before it set its handler would just die)
    job.wait_for_records(300)
    for rank in range(4):
        os.kill(rank_pid(job.out, rank), signal.SIGTERM)
    output = job.finish(timeout=60)
    assert job.proc.returncode == PREEMPTED_EXIT, output[-3000:]
    assert "stopped for a signal" in output and not (tmp_path / "summary.json").exists()
    before = server_record(tmp_path)["version"]
    assert 0 < before < 2700
    second = train(4, tmp_path, *args, "--resume", small=False)
    assert second.returncode == 0, second.stdout
    server = server_record(tmp_path)
    assert 2700 <= server["version"] <= 2702 and server["updates"] == server["version"] - before, (before, server)
