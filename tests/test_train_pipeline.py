"""`python -m dmlmpi.train --mode pipeline / hybrid` end to end: same losses as data parallel, resume, plots."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dmlmpi.plot import pipeline_blocks
from trainrun import ROOT, losses, records, run_train

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

SMALL = ["--samples", "600", "--batch-size", "32", "--log-every", "1", "--epochs", "2", "--microbatches", "4"]


def train(nprocs: int, out, *extra: str, timeout: float = 300):
    """Run python -m dmlmpi.train on nprocs ranks into `out`; return the finished process."""
    return run_train(nprocs, out, [*SMALL, *extra], timeout)


@pytest.fixture(scope="module")
def dp_one_rank(tmp_path_factory):
    """Single-process training: the reference."""
    out = tmp_path_factory.mktemp("dp1")
    result = train(1, out)
    assert result.returncode == 0, result.stdout
    return out


@pytest.mark.parametrize("ranks,extra", [
    (3, ["--mode", "pipeline", "--pipeline-schedule", "gpipe"]),
    (2, ["--mode", "pipeline", "--pipeline-schedule", "interleaved", "--chunks", "2", "--recompute"]),
    (4, ["--mode", "hybrid", "--dp", "2", "--pp", "2", "--partition", "uniform"]),
    (3, ["--mode", "pipeline", "--pipeline-schedule", "zb-h1"]),
], ids=["pipeline-gpipe-3", "pipeline-interleaved-recompute-2", "hybrid-2x2", "pipeline-zb-h1-3"])
def test_same_losses_as_single_process(ranks, extra, dp_one_rank, tmp_path) -> None:
    """Every logged loss equals single-process training's, step by step."""
    result = train(ranks, tmp_path, *extra)
    assert result.returncode == 0, result.stdout
    assert "partition (" in result.stdout
    ref, got = losses(dp_one_rank), losses(tmp_path)
    assert ref.keys() == got.keys() and len(ref) == 30
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), step


def test_resume_and_schedule_plot(dp_one_rank, tmp_path) -> None:
    """A zero-bubble hybrid run stopped at step 11 and resumed logs the uninterrupted losses; the plot draws the schedule."""
    args = ["--mode", "hybrid", "--dp", "2", "--pp", "2", "--pipeline-schedule", "zb-h1"]
    first = train(4, tmp_path, *args, "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    second = train(4, tmp_path, *args, "--resume")
    assert second.returncode == 0, second.stdout
    assert "at step 11" in second.stdout
    ref, got = losses(dp_one_rank), losses(tmp_path)
    for step in range(12, 31):
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), step
    ranks = [r for r in records(tmp_path) if r.get("role") == "worker"][-4:]  # the resumed run's (the first run's come before)
    assert sorted((r["dp_rank"], r["pp_rank"]) for r in ranks) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["peak_activation_bytes"] > 0 for r in ranks)
    done = subprocess.run([sys.executable, "-m", "dmlmpi.plot", str(tmp_path), "--out", str(tmp_path / "png")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "png" / "schedule.png").read_bytes()[:4] == b"\x89PNG"
    # the last step's actions, weight passes included: each of F, B, W once per microbatch per rank
    blocks = pipeline_blocks(json.loads((tmp_path / "trace.json").read_text()))
    assert sorted({(b[0], b[1]) for b in blocks}) == [(r, op) for r in range(4) for op in "BFW"]
    assert len(blocks) == 4 * 3 * 4


def test_hybrid_zero_same_losses_and_resume(dp_one_rank, tmp_path) -> None:
    """--zero in a 2 x 2 grid (each stage's optimizer state split over its 2 replicas), stopped and resumed:
    every loss is single-process training's."""
    args = ["--mode", "hybrid", "--dp", "2", "--pp", "2", "--optimizer", "adamw", "--zero"]
    first = train(4, tmp_path, *args, "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    second = train(4, tmp_path, *args, "--resume")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    ref, got = losses(dp_one_rank), losses(tmp_path)
    assert ref.keys() == got.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), step


def test_resumes_on_another_stage_cut_and_grid(dp_one_rank, tmp_path) -> None:
    """A 3-stage pipeline stopped at step 11 resumes as a 2 x 2 hybrid grid with --zero (other stages, replicas
    and optimizer layout: each layer takes its weights and optimizer state by name); every loss is one process's."""
    first = train(3, tmp_path, "--mode", "pipeline", "--optimizer", "adamw", "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    second = train(4, tmp_path, "--mode", "hybrid", "--dp", "2", "--pp", "2", "--optimizer", "adamw", "--zero",
                   "--resume")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    assert "the checkpoint's stages were" in second.stdout
    ref, got = losses(dp_one_rank), losses(tmp_path)
    assert ref.keys() == got.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-4, abs=1e-6), step


def test_fp16_pipeline_skips_the_steps_one_process_skips_and_resumes(tmp_path) -> None:
    """--amp fp16 from a loss scale of 2**22: a 3-stage pipeline, stopped at step 11 and resumed, skips the same
    overflowing steps and logs the same losses as one process accumulating the same 4 microbatches."""
    amp = ["--amp", "fp16", "--initial-scale-power", "22"]
    ref = train(1, tmp_path / "ref", *amp, "--grad-accum", "4")
    assert ref.returncode == 0, ref.stdout
    first = train(3, tmp_path / "pp", "--mode", "pipeline", *amp, "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    second = train(3, tmp_path / "pp", "--mode", "pipeline", *amp, "--resume")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    want = {r["step"]: r for r in records(tmp_path / "ref") if "loss" in r}
    got = {r["step"]: r for r in records(tmp_path / "pp") if "loss" in r}
    assert got.keys() == want.keys() and len(want) == 30
    assert 0 < want[30]["skipped_steps"] < 30  # overflows happened, and training went on
    for step in want:
        assert (got[step]["skipped_steps"], got[step]["loss_scale"]) == (want[step]["skipped_steps"], want[step]["loss_scale"]), step
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step


@pytest.mark.parametrize("extra,message", [
    (["--mode", "hybrid", "--dp", "2", "--pp", "2"], "--mode hybrid --dp 2 --pp 2 needs 4 ranks, but the job has 3"),
    (["--mode", "pipeline", "--pipeline-schedule", "interleaved", "--microbatches", "4"],
     "--microbatches 4 must be a multiple of the 3 pipeline ranks"),
    (["--mode", "pipeline", "--partition", "2,1"], "increasing cut points"),
    (["--mode", "pipeline", "--microbatches", "40"], "cannot give each of the 1 pipeline(s) 40 microbatches"),
])
def test_bad_pipeline_setups_fail_on_every_rank(extra, message, tmp_path) -> None:
    """A grid that does not fit, a schedule that cannot run, bad cut points: clear error, non-zero exit."""
    result = train(3, tmp_path, *extra, timeout=120)
    assert not result.timed_out and result.returncode != 0
    assert message in result.stdout, result.stdout[-3000:]
