"""--elastic on Open MPI's ULFM: real rank processes are SIGKILLed mid-run and the survivors go on.

Each end-to-end test launches `mpirun --with-ft ulfm` itself (single-process pytest), kills world
ranks from outside through /proc, and reads the run directory.
"""
from __future__ import annotations

import json
import os

import pytest
from mpi4py import MPI

from dmlmpi import elastic
from dmlmpi.testing import run_mpi
from trainrun import ROOT, KillableRun, losses, records, run_train

ULFM = ["--with-ft", "ulfm"]
# default task (CNN on MNIST-1D), logged every step so the curves can be compared step by step
ARGS = ["--epochs", "16", "--log-every", "1"]

pytestmark = [pytest.mark.skipif("Open MPI" not in MPI.Get_library_version(), reason="ULFM is Open MPI's"),
              pytest.mark.launches_mpi]  # these tests start mpiexec themselves


def test_is_failure_finds_process_failures_in_the_exception_chain() -> None:
    """MPI_ERR_PROC_FAILED / _PENDING / REVOKED count, also when wrapped; other errors do not."""
    for cls in (MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED):
        assert elastic.is_failure(MPI.Exception(cls))
        try:
            try:
                raise MPI.Exception(cls)
            except MPI.Exception as inner:
                raise RuntimeError("raised while reducing a bucket") from inner
        except RuntimeError as outer:
            assert elastic.is_failure(outer)
    assert not elastic.is_failure(MPI.Exception(MPI.ERR_TRUNCATE))
    assert not elastic.is_failure(ValueError("shapes differ"))
    assert not elastic.is_failure(None)
    # another MPI error with a communicator that knows of no failure (no ULFM here) is not one either
    assert not elastic.is_failure(MPI.Exception(MPI.ERR_OTHER), MPI.COMM_SELF, patience=0.05)


def test_furthest_survivor_is_the_source() -> None:
    """The survivor with the most completed steps wins; ties go to the lowest rank; nobody left is an error."""
    assert elastic.furthest([7, 8, 8]) == 1
    assert elastic.furthest([5]) == 0
    with pytest.raises(ValueError):
        elastic.furthest([])


def test_check_available_needs_ft_enabled_at_launch() -> None:
    """Without mpirun --with-ft ulfm the check says how to launch; with it, it passes."""
    with pytest.raises(elastic.ElasticUnavailable, match="--with-ft ulfm"):
        elastic.check_available({})
    elastic.check_available({"OMPI_MCA_mpi_ft_enable": "1"})


def test_elastic_without_ulfm_is_refused_on_every_rank(tmp_path) -> None:
    """--elastic under a plain mpirun: a clear error before training, non-zero exit, no hang."""
    result = run_train(2, tmp_path / "run", ["--elastic", "--epochs", "1"], timeout=120)
    assert result.returncode != 0
    assert "--elastic needs fault tolerance enabled at launch" in result.stdout


def test_elastic_is_refused_for_modes_that_cannot_shrink(tmp_path) -> None:
    """--elastic with a pipeline: the stage of a dead rank is gone, so the option is rejected up front."""
    result = run_mpi(2, ["-m", "dmlmpi.train", "--elastic", "--mode", "pipeline", "--out", str(tmp_path / "p")],
                     timeout=120, cwd=ROOT, launcher_args=ULFM)
    assert result.returncode != 0
    assert "--elastic works with --mode" in result.stdout


def test_a_death_inside_a_barrier_counts_as_a_failure_on_every_survivor() -> None:
    """A rank dies while 3 others wait in MPI_Barrier: each survivor's error counts as a process failure
    (Open MPI 5 reports it as MPI_ERR_OTHER on some ranks; a known failed process or the survivors'
    revocation tells) and recovery finds it."""
    result = run_mpi(4, [os.path.join(ROOT, "tests", "cases", "death_in_barrier.py")], timeout=120, cwd=ROOT,
                     launcher_args=ULFM)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert len(lines) == 3, result.stdout
    for rank, line in zip((0, 2, 3), lines):
        assert line.startswith(f"rank {rank}: class "), result.stdout
        assert line.endswith("failure True dead [1] members [0, 2, 3]"), result.stdout


def survive(out, nprocs: int, args: list[str], kills: list[tuple[int, int]]) -> tuple[str, dict]:
    """Run `--elastic` ARGS under ULFM, SIGKILL rank r once `after` records are logged for each (after, r)
    in `kills`; the job must end with exit 0. Returns its output and summary.json."""
    job = KillableRun(nprocs, out, ["--elastic", *args], mpirun_flags=ULFM)
    for after, rank in kills:
        job.wait_for_records(after)
        job.kill_rank(rank)
    output = job.finish(timeout=300)
    assert job.proc.returncode == 0, output[-4000:]
    with open(os.path.join(out, "summary.json")) as f:
        return output, json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same job with no failure: the reference curve."""
    out = tmp_path_factory.mktemp("elastic-ref")
    result = run_mpi(4, ["-m", "dmlmpi.train", *ARGS, "--out", str(out)], timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    return out


def test_dp_survives_two_killed_ranks_and_reaches_the_target(tmp_path, uninterrupted) -> None:
    """4 ranks; world rank 2 and then world rank 0 (the logger) are SIGKILLed: 2 survivors finish the run.

    After each failure the survivors re-shard the same global batches, so the steps right after the
    first recovery equal the uninterrupted run's (the order of float sums differs: tolerance).
    """
    out = tmp_path / "elastic"
    output, summary = survive(out, 4, ARGS, [(60, 2), (400, 0)])
    failures = summary["failures"]
    assert [f["dead_ranks"] for f in failures] == [[2], [0]], failures
    assert [f["world_size"] for f in failures] == [3, 2]
    assert failures[1]["members"] == [1, 3]
    assert summary["world_size_end"] == 2 and summary["epochs_done"] == 16
    assert summary["test_accuracy"] >= 0.92, summary  # the default task's target, with half the ranks gone
    # the run said what happened, on the launcher's output and in metrics.jsonl
    assert "--elastic: rank(s) [2] died; 3 survivor(s)" in output
    assert "--elastic: rank(s) [0] died; 2 survivor(s)" in output
    def what(event: dict) -> tuple:
        """An event without its timings (each rank measured its own)."""
        return event["event"], event["step"], event["dead_ranks"], event["world_size"], event["members"]

    assert [what(r) for r in records(out) if r.get("event")] == [what(f) for f in failures]
    # no step trained twice or skipped: logged steps only increase, and one goes unlogged at most where
    # the logger died between completing a step and logging it
    logged = [r["step"] for r in records(out) if "loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == summary["steps"] == 16 * 62
    assert all(s in logged or any(abs(s - f["step"]) <= 1 for f in failures) for s in range(1, logged[-1] + 1))
    # same batches on fewer ranks: the curve goes on as without the failure (sums in another order)
    first = failures[0]["step"]
    mine, ref = losses(out), losses(uninterrupted)
    after = [s for s in range(first + 1, first + 21) if s in mine]
    assert len(after) >= 19
    for step in after:
        assert mine[step] == pytest.approx(ref[step], rel=1e-4), step


FL = ["--mode", "fl", "--samples", "1000", "--clients", "20", "--fraction", "0.25", "--rounds", "50",
      "--local-epochs", "2"]


def reference_fl(failure_round: int, dead_world_rank: int, world: int) -> list[dict]:
    """Single-process simulation of FL's run where the dead rank's clients drop out from the next round on."""
    from dmlmpi import config
    from dmlmpi.data import load_dataset
    from dmlmpi.federated.simulation import FLConfig, Simulation
    from dmlmpi.models import build

    args = config.parse(FL, 1)
    data = load_dataset(args.dataset, MPI.COMM_SELF, None, args.data_seed, args.samples)
    cfg = FLConfig.from_args(args)
    sim = Simulation(build(args.model, args.seed, data.x_train.shape[1:], args.dataset), data, cfg, MPI.COMM_SELF)
    out = []
    while sim.round < cfg.rounds:
        if sim.round == failure_round:  # client c lived on world rank c % world
            sim.lost = {c for c in range(cfg.clients) if c % world == dead_world_rank}
        out.append(sim.step())
    return out


def test_fl_dead_client_rank_drops_its_clients_for_the_rest_of_the_run(tmp_path) -> None:
    """4 ranks of federated rounds; world rank 2 is SIGKILLed: its clients count as dropped, the rest go on.

    The survivors redo the interrupted round without those clients, so the run equals a single-process
    simulation in which they drop out from that round on.
    """
    out = tmp_path / "fl"
    output, summary = survive(out, 4, FL, [(5, 2)])
    (failure,) = summary["failures"]
    assert failure["dead_ranks"] == [2] and failure["world_size"] == 3 and failure["lost_clients"] == 5
    assert summary["world_size_end"] == 3 and summary["rounds"] == 50
    assert "their 5 client(s) count as dropped from now on" in output
    rounds = [r for r in records(out) if "round" in r and "event" not in r]
    assert [r["round"] for r in rounds] == list(range(1, 51))  # the interrupted round was redone, none twice
    ref = reference_fl(failure["round"], 2, 4)
    for mine, expected in zip(rounds, ref):
        assert mine["participants"] == expected["participants"], mine["round"]
        assert mine["dropped"] == expected["dropped"], mine["round"]
        assert mine["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-4), mine["round"]
    after = rounds[failure["round"]:]
    assert all(r["lost"] == r["dropped"] for r in after) and sum(r["lost"] for r in after) > 0
    assert all("lost" not in r for r in rounds[:failure["round"]])


def test_fl_dead_server_ends_the_job_with_a_clear_message(tmp_path) -> None:
    """The server (world rank 0) holds the global model: its death ends the run, non-zero, saying so."""
    job = KillableRun(3, tmp_path / "fl0", ["--elastic", *FL], mpirun_flags=ULFM)
    job.wait_for_records(3)
    job.kill_rank(0)
    output = job.finish(timeout=120)
    assert job.proc.returncode != 0
    assert "the federated server (world rank 0) died" in output, output[-3000:]


PS = ["--mode", "ps", "--servers", "1", "--ps-mode", "async", "--epochs", "10"]


def test_ps_async_servers_go_on_with_the_remaining_workers(tmp_path) -> None:
    """3 workers + 1 server, async; worker world rank 1 is SIGKILLed: the server serves the other two to the end."""
    out = tmp_path / "ps"
    _, summary = survive(out, 4, PS, [(30, 1)])
    (failure,) = summary["failures"]
    assert failure["dead_ranks"] == [1] and failure["members"] == [0, 2, 3]
    assert summary["workers"] == 2 and summary["servers"] == 1 and summary["epochs_done"] == 10
    assert summary["test_accuracy"] >= 0.8, summary  # it kept learning after the failure
    stats = [r for r in records(out) if "role" in r]
    workers = [r for r in stats if r["role"] == "worker"]
    (server,) = [r for r in stats if r["role"] == "server"]
    # every step of the run is made by each survivor, but one that was behind the furthest survivor at the
    # failure takes that survivor's position: its missing steps count as adopted, not made (at most 2:
    # the per-step stop agreement keeps the workers within a step or so of each other)
    assert len(workers) == 2 and all(w["steps"] + w["steps_adopted"] == 10 * 62 for w in workers)
    assert all(0 <= w["steps_adopted"] <= 2 for w in workers)
    # every gradient the survivors pushed after the failure was applied (a push in flight at the failure
    # may be lost), plus what all three pushed before it
    after = sum(w["steps"] for w in workers) - 2 * failure["step"]
    assert server["updates"] >= after + 2 * failure["step"] - 2
    assert server["updates"] > after + 3 * (failure["step"] - 5)


def test_ps_dead_server_ends_the_job_with_a_clear_message(tmp_path) -> None:
    """A server's shard dies with it: the workers say so and the job ends non-zero."""
    job = KillableRun(4, tmp_path / "ps-server", ["--elastic", *PS], mpirun_flags=ULFM)
    job.wait_for_records(20)
    job.kill_rank(3)
    output = job.finish(timeout=120)
    assert job.proc.returncode != 0
    assert "parameter server rank(s) [3] died" in output, output[-3000:]
