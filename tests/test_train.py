"""The training job end to end under mpiexec: run directory, equivalence, resume, and bad input."""
from __future__ import annotations

import json

import pytest

from dmlmpi.testing import run_mpi
from trainrun import ROOT, KillableRun, losses, records, run_train

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

SMALL = ["--samples", "600", "--batch-size", "32", "--log-every", "1"]


def train(nprocs: int, out, *extra: str, timeout: float = 240):
    """Run python -m dmlmpi.train on nprocs ranks into `out`; return the finished process."""
    return run_train(nprocs, out, [*SMALL, *extra], timeout)


@pytest.fixture(scope="module")
def three_rank_run(tmp_path_factory):
    """One uninterrupted 3-rank run of 2 epochs, shared by several tests."""
    out = tmp_path_factory.mktemp("run3")
    result = train(3, out, "--epochs", "2")
    assert result.returncode == 0, result.stdout
    return out, result


def test_run_directory(three_rank_run) -> None:
    """config, per-step metrics, test accuracy per epoch, checkpoints, a trace of every rank, a summary."""
    out, result = three_rank_run
    config = json.load(open(out / "config.json"))
    assert config["world_size"] == 3 and config["epochs"] == 2
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))  # 480 train / 32 = 15 per epoch
    assert [r["epoch"] for r in records if "test_accuracy" in r] == [1, 2]
    summary = json.load(open(out / "summary.json"))
    for key in ("mode", "world_size", "test_accuracy", "final_loss", "samples_per_s", "wall_s"):
        assert key in summary
    assert summary["mode"] == "dp" and summary["world_size"] == 3 and summary["steps"] == 30
    assert (out / "latest").read_text() == "ckpt-30.pt" and (out / "ckpt-30.pt").exists()
    trace = json.load(open(out / "trace.json"))
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1, 2}
    assert {e["cat"] for e in spans} >= {"compute", "comm", "step"}
    assert "epoch 2/2" in result.stdout and "samples/s" in result.stdout


def test_same_losses_on_one_and_three_ranks(three_rank_run, tmp_path) -> None:
    """Data parallel training equals single-process training with the same global batch."""
    out3, _ = three_rank_run
    result = train(1, tmp_path, "--epochs", "2")
    assert result.returncode == 0, result.stdout
    one, three = losses(tmp_path), losses(out3)
    assert one.keys() == three.keys()
    for step in one:
        assert three[step] == pytest.approx(one[step], rel=1e-4, abs=1e-6), step


def test_clipping_and_accumulation_equal_one_process(three_rank_run, tmp_path) -> None:
    """--clip-grad-norm with --grad-accum 3 on 2 ranks, and in a 3-stage pipeline: one process's clipped losses and norms."""
    clip = ["--epochs", "2", "--clip-grad-norm", "0.3"]
    one = train(1, tmp_path / "one", *clip)
    assert one.returncode == 0, one.stdout
    ref = {r["step"]: r for r in records(tmp_path / "one") if "loss" in r}
    assert sum(r["grad_norm"] > 0.3 for r in ref.values()) >= 5  # clipping is at work...
    plain = losses(three_rank_run[0])
    assert any(abs(plain[s] - ref[s]["loss"]) > 1e-3 for s in ref)  # ...and changes the run
    for ranks, extra in ((2, ["--grad-accum", "3"]), (3, ["--mode", "pipeline", "--microbatches", "4"])):
        result = train(ranks, tmp_path / str(ranks), *clip, *extra)
        assert result.returncode == 0, result.stdout
        got = {r["step"]: r for r in records(tmp_path / str(ranks)) if "loss" in r}
        assert got.keys() == ref.keys()
        for step in ref:
            assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-6), (extra, step)
            assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), (extra, step)
    # accumulation communicates once per global batch: one bucket all-reduce per step and rank, not three
    trace = json.load(open(tmp_path / "2" / "trace.json"))
    reduces = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["name"].startswith("allreduce bucket")]
    assert len(reduces) == 2 * len(ref)


def test_adasum_reduction_trains(tmp_path) -> None:
    """--reduction adasum reaches DataParallel: on 2 ranks it trains, and its steps differ from the mean's."""
    runs = {}
    for red in ("mean", "adasum"):
        result = train(2, tmp_path / red, "--epochs", "2", "--reduction", red)
        assert result.returncode == 0, result.stdout
        runs[red] = losses(tmp_path / red)
    assert runs["adasum"][1] == pytest.approx(runs["mean"][1], rel=1e-6)  # the same first forward
    assert any(abs(runs["adasum"][s] - runs["mean"][s]) > 1e-3 for s in runs["mean"])
    assert runs["adasum"][30] < 0.9 * runs["adasum"][1]


def test_sync_bn_same_losses_on_one_and_three_ranks(tmp_path) -> None:
    """With BatchNorm layers, --sync-bn makes 3 ranks train what one process trains on the same global batch."""
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"r{n}"
        result = train(n, out, "--epochs", "1", "--model", "cnn-bn", "--sync-bn")
        assert result.returncode == 0, result.stdout
        runs[n] = losses(out)
    assert runs[1].keys() == runs[3].keys() and len(runs[1]) == 15
    for step in runs[1]:
        assert runs[3][step] == pytest.approx(runs[1][step], rel=1e-4, abs=1e-6), step


def test_moe_clipping_over_spread_experts_equals_one_process(tmp_path) -> None:
    """The gradient norm counts every rank's experts, and the layers every rank holds once."""
    runs = {}
    for n in (1, 4):
        result = train(n, tmp_path / f"r{n}", "--epochs", "1", "--model", "moe", "--clip-grad-norm", "0.2")
        assert result.returncode == 0, result.stdout
        runs[n] = {r["step"]: r for r in records(tmp_path / f"r{n}") if "loss" in r}
    one, four = runs[1], runs[4]
    assert one.keys() == four.keys() and len(one) == 15
    for step in one:
        assert four[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5, abs=1e-6), step
        assert four[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=1e-5), step
    assert any(r["grad_norm"] > 0.2 for r in one.values())  # the clip acted


def test_moe_expert_groups_equal_one_process_and_resume_as_one_group(tmp_path) -> None:
    """--moe-ep-size 2 on 4 ranks: two groups of two, the experts replicated over them, give one process's
    losses; stopped after 7 steps and resumed on 2 ranks as one group, the run goes on as before."""
    one = train(1, tmp_path / "one", "--epochs", "1", "--model", "moe")
    assert one.returncode == 0, one.stdout
    grouped = train(4, tmp_path / "grouped", "--epochs", "1", "--model", "moe", "--moe-ep-size", "2")
    assert grouped.returncode == 0, grouped.stdout
    assert "4 of the 8 experts on each rank, 2 group(s) of 2" in grouped.stdout
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "grouped")
    assert ref.keys() == got.keys() and len(ref) == 15
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    cut = tmp_path / "cut"
    assert train(4, cut, "--epochs", "1", "--model", "moe", "--moe-ep-size", "2", "--max-steps", "7").returncode == 0
    second = train(2, cut, "--epochs", "1", "--model", "moe", "--resume")
    assert second.returncode == 0 and "at step 7" in second.stdout, second.stdout
    resumed = losses(cut)
    for step in range(8, 16):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step


def test_moe_expert_parallel_equals_one_process_and_resumes_on_another_world_size(tmp_path) -> None:
    """--model moe: the experts spread over 4 ranks train what one process trains (balancing loss included);
    stopped after 11 steps and resumed on 2 ranks (each takes its experts and their optimizer state), it
    goes on as the uninterrupted run."""
    runs = {}
    for n in (1, 4):
        result = train(n, tmp_path / f"r{n}", "--epochs", "2", "--model", "moe")
        assert result.returncode == 0, result.stdout
        runs[n] = losses(tmp_path / f"r{n}")
    assert "expert parallel" in result.stdout  # the 4-rank run says how it splits the model
    assert runs[1].keys() == runs[4].keys() and len(runs[1]) == 30
    for step in runs[1]:
        assert runs[4][step] == pytest.approx(runs[1][step], rel=1e-5, abs=1e-6), step
    split = tmp_path / "split"
    assert train(4, split, "--epochs", "2", "--model", "moe", "--max-steps", "11").returncode == 0
    second = train(2, split, "--epochs", "2", "--model", "moe", "--resume")
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout and "at step 11" in second.stdout
    resumed = losses(split)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(12, 31):
        assert resumed[step] == pytest.approx(runs[4][step], rel=1e-5, abs=1e-6), step


def test_resume_continues_where_it_stopped(three_rank_run, tmp_path) -> None:
    """Stopped after 11 steps (mid-epoch), resumed: later losses equal the uninterrupted run's."""
    full, _ = three_rank_run
    first = train(3, tmp_path, "--epochs", "2", "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    assert max(losses(tmp_path)) == 11 and (tmp_path / "ckpt-11.pt").exists()
    second = train(3, tmp_path, "--epochs", "2", "--resume")
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout and "at step 11" in second.stdout
    resumed, uninterrupted = losses(tmp_path), losses(full)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(12, 31):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-9), step
    a = json.load(open(tmp_path / "summary.json"))["test_accuracy"]
    b = json.load(open(full / "summary.json"))["test_accuracy"]
    assert a == b


def test_zero_trains_the_same_and_resumes_on_another_world_size(three_rank_run, tmp_path) -> None:
    """--zero (optimizer state split over the ranks): the same losses; its checkpoint resumes on 2 ranks."""
    full, _ = three_rank_run
    first = train(3, tmp_path, "--epochs", "2", "--max-steps", "11", "--zero")
    assert first.returncode == 0, first.stdout
    second = train(2, tmp_path, "--epochs", "2", "--resume", "--zero")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    resumed, uninterrupted = losses(tmp_path), losses(full)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-6), step


def test_sharded_checkpoints_resume_as_another_stage_on_another_world_size(three_rank_run, tmp_path) -> None:
    """--checkpoint-format sharded: ZeRO-3 on 3 ranks writes one file per rank and stops at step 11; ZeRO-1 on 2
    ranks resumes from it, each rank reading its own pieces: the uninterrupted run's losses."""
    full, _ = three_rank_run
    first = train(3, tmp_path, "--epochs", "2", "--max-steps", "11", "--zero", "3", "--checkpoint-format", "sharded")
    assert first.returncode == 0, first.stdout
    assert (tmp_path / "latest").read_text() == "ckpt-11"
    assert sorted(p.name for p in (tmp_path / "ckpt-11").iterdir()) == ["meta.pt", "shard-0.pt", "shard-1.pt",
                                                                        "shard-2.pt"]
    second = train(2, tmp_path, "--epochs", "2", "--resume", "--zero", "--checkpoint-format", "sharded")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt-30").iterdir()) == ["meta.pt", "shard-0.pt", "shard-1.pt"]
    resumed, uninterrupted = losses(tmp_path), losses(full)
    assert sorted(resumed) == list(range(1, 31))
    for step in range(1, 31):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-4, abs=1e-6), step
    # the whole model as one plain state_dict, from the rank files (one process): the uninterrupted run's weights
    import subprocess
    import sys

    import torch

    for source, name in ((tmp_path, "sharded.pt"), (full / "ckpt-30.pt", "full.pt")):
        done = subprocess.run([sys.executable, "-m", "dmlmpi.consolidate", str(source), str(tmp_path / name)],
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 0 and "8010 elements" in done.stdout, done.stdout + done.stderr
    got, want = torch.load(tmp_path / "sharded.pt"), torch.load(tmp_path / "full.pt")
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    # without ZeRO there are no shards to read them into: said on every rank, before any step
    third = train(2, tmp_path, "--epochs", "3", "--resume", timeout=90)
    assert third.returncode != 0 and "resume it with --zero 1, 2 or 3" in third.stdout, third.stdout[-3000:]
    for rank in range(2):
        assert f"dmlmpi: rank {rank} of 2: raised ValueError: checkpoint" in third.stdout
    # a new run (no --resume) into the same directory removes the sharded checkpoints and any partial one
    (tmp_path / "ckpt-31.partial").mkdir()
    fresh = train(2, tmp_path, "--epochs", "1", "--max-steps", "2", timeout=90)
    assert fresh.returncode == 0, fresh.stdout
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-2.pt"]


@pytest.fixture(scope="module")
def clipped_one_process(tmp_path_factory):
    """One process trained with --clip-grad-norm 0.3: the reference of the ZeRO runs, step by step."""
    out = tmp_path_factory.mktemp("clip1")
    result = train(1, out, "--epochs", "2", "--clip-grad-norm", "0.3")
    assert result.returncode == 0, result.stdout
    return {r["step"]: r for r in records(out) if "loss" in r}


@pytest.mark.parametrize("stage,extra,resumed_as,spans", [
    # stage 2 with 0.01 MiB buckets (three or more), resumed as stage 1
    ("2", ["--bucket-mb", "0.01"], "1", ["reduce_scatter bucket 2"]),
    # stage 3, resumed as stage 2: every layer gathered and reduce-scattered
    ("3", [], "2", ["allgather unit 0", "reduce_scatter unit 0"]),
])
def test_zero_2_and_3_equal_one_process_and_resume_as_another_stage(
        stage: str, extra: list[str], resumed_as: str, spans: list[str], clipped_one_process, tmp_path) -> None:
    """--zero 2 or 3 with clipping and accumulation on 3 ranks, stopped at step 11 and resumed at another stage on
    2 ranks: one process's losses and gradient norms; the gradients went by reduce-scatter, no all-reduce."""
    clip = ["--epochs", "2", "--clip-grad-norm", "0.3"]
    ref = clipped_one_process
    first = train(3, tmp_path, *clip, "--zero", stage, *extra, "--grad-accum", "3", "--max-steps", "11")
    assert first.returncode == 0 and "8010 parameters" in first.stdout, first.stdout
    trace = json.load(open(tmp_path / "trace.json"))
    names = {e["name"] for e in trace["traceEvents"] if e.get("ph") == "X" and e["cat"] == "comm"}
    assert set(spans) <= names and not any(n.startswith("allreduce bucket") for n in names), names
    second = train(2, tmp_path, *clip, "--zero", resumed_as, "--resume")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    got = {r["step"]: r for r in records(tmp_path) if "loss" in r}
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-4, abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4), step


def test_zero2_and_3_fp16_skip_the_steps_plain_dp_skips(tmp_path) -> None:
    """--amp fp16 from 2^30 with --zero 2 and 3: each rank sees only its shard of the gradient, yet every rank skips
    the steps plain data parallelism skips (the overflow flag is all-reduced), and the losses are the same."""
    fp16 = ["--epochs", "2", "--amp", "fp16", "--initial-scale-power", "30", "--bucket-mb", "0.01"]
    runs = {}
    for stage in ("0", "2", "3"):
        result = train(3, tmp_path / stage, *fp16, "--zero", stage, timeout=120)
        assert result.returncode == 0, result.stdout
        runs[stage] = {r["step"]: r for r in records(tmp_path / stage) if "loss" in r}
    plain = runs["0"]
    assert plain[30]["skipped_steps"] >= 5  # overflows happen...
    for sharded in (runs["2"], runs["3"]):
        for step in plain:
            assert sharded[step]["skipped_steps"] == plain[step]["skipped_steps"], step
            assert sharded[step]["loss"] == pytest.approx(plain[step]["loss"], rel=1e-4, abs=1e-6), step


def test_powersgd_resumes_exactly(tmp_path) -> None:
    """--compression powersgd stopped mid-epoch and resumed: the factors' warm starts and every rank's error
    feedback come back from the checkpoint, so later losses equal an uninterrupted run's."""
    args = ["--epochs", "2", "--compression", "powersgd", "--powersgd-rank", "1"]
    full = train(3, tmp_path / "full", *args)
    assert full.returncode == 0, full.stdout
    first = train(3, tmp_path / "cut", *args, "--max-steps", "11")
    assert first.returncode == 0, first.stdout
    second = train(3, tmp_path / "cut", *args, "--resume")
    assert second.returncode == 0 and "at step 11" in second.stdout, second.stdout
    resumed, uninterrupted = losses(tmp_path / "cut"), losses(tmp_path / "full")
    assert sorted(resumed) == list(range(1, 31))
    for step in range(12, 31):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-6, abs=1e-9), step


def test_yaml_config_and_command_line(tmp_path) -> None:
    """A YAML file sets options; the command line overrides it."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("epochs: 3\nbatch-size: 16\nschedule: cosine\ntrace: false\n")
    out = tmp_path / "out"
    result = train(2, out, "--config", str(cfg), "--epochs", "1")
    assert result.returncode == 0, result.stdout
    config = json.load(open(out / "config.json"))
    assert config["epochs"] == 1 and config["batch_size"] == 32 and config["schedule"] == "cosine"
    assert config["trace"] is False and not (out / "trace.json").exists()


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "2"], "--batch-size 2 is smaller than the 3 training ranks"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--algorithm", "tree"], "invalid choice: 'tree'"),
    (["--dataset", "mnist"], "--dataset mnist reads files: give --data-dir"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/mnist"], "/nonexistent/mnist"),
    (["--out", "/proc/dmlmpi-cannot-write-here"], "not writable"),
    (["--mode", "ps", "--servers", "3"], "--servers 3 on 3 rank(s): ps mode needs at least one server and one worker"),
    (["--mode", "ps", "--straggler", "2:0.1"], "rank 2 does not train (training ranks are 0..1)"),
    (["--mode", "ps", "--straggler", "1-0.1"], "expected RANK:SECONDS"),
    (["--mode", "ps", "--ps-mode", "ssp", "--staleness", "-1"], "--staleness must not be negative"),
    (["--sync-bn"], "--sync-bn needs a model with BatchNorm layers (--model cnn-bn); --model auto has none"),
])
def test_bad_input_fails_fast_on_every_rank(extra: list[str], message: str, tmp_path) -> None:
    """Each bad setting: non-zero exit, the reason in the output from every rank, no hang."""
    args = ["-m", "dmlmpi.train", "--samples", "600", "--out", str(tmp_path / "o"), *extra]
    result = run_mpi(3, args, timeout=90, cwd=ROOT)
    assert not result.timed_out and result.returncode != 0
    assert message in result.stdout, result.stdout[-3000:]
    for rank in range(3):  # each rank says it stops (they wait for each other briefly before aborting)
        assert f"dmlmpi: rank {rank} of 3:" in result.stdout, result.stdout[-3000:]


def test_bad_yaml_is_refused(tmp_path) -> None:
    """Unknown keys in a config file are named."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    result = run_mpi(2, ["-m", "dmlmpi.train", "--config", str(cfg)], timeout=90, cwd=ROOT)
    assert result.returncode != 0 and "unknown option 'epochz'" in result.stdout


def test_plot_draws_a_real_run(three_rank_run, tmp_path) -> None:
    """python -m dmlmpi.plot on a run directory writes the loss, accuracy and timeline PNGs."""
    import subprocess
    import sys

    out, _ = three_rank_run
    done = subprocess.run([sys.executable, "-m", "dmlmpi.plot", str(out), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in ("loss.png", "accuracy.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_checkpoint_fails_fast_and_damages_nothing(three_rank_run, damage: str, tmp_path) -> None:
    """--resume from a damaged latest checkpoint: a clear error, non-zero exit, every checkpoint file untouched."""
    import shutil
    import time

    out = tmp_path / "run"
    shutil.copytree(three_rank_run[0], out)
    ckpts = sorted(out.glob("ckpt-*.pt"))
    assert len(ckpts) == 2  # one per epoch
    latest = ckpts[-1]
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 64)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("ckpt-") or p.name == "latest"}
    start = time.monotonic()
    result = train(3, out, "--epochs", "3", "--resume", timeout=90)
    assert not result.timed_out and result.returncode != 0
    assert f"cannot read checkpoint {latest}" in result.stdout, result.stdout[-3000:]
    for rank in range(3):  # rank 0 read it and told the others: every rank stops with the reason
        assert f"dmlmpi: rank {rank} of 3: raised RuntimeError: cannot read checkpoint" in result.stdout
    assert time.monotonic() - start < 60
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("ckpt-") or p.name == "latest"}
    assert after == before  # the damaged file, the older checkpoint and the pointer are as they were


def test_a_killed_rank_ends_the_job_promptly(tmp_path) -> None:
    """Without --elastic, SIGKILL on one rank mid-run ends the whole job quickly, non-zero, the dead rank named."""
    import time

    job = KillableRun(3, tmp_path / "killed-run", [*SMALL, "--epochs", "50"])
    job.wait_for_records(5)
    job.kill_rank(1)
    killed = time.monotonic()
    output = job.finish(timeout=60)
    ended = time.monotonic() - killed
    proc = job.proc
    assert proc.returncode != 0
    assert ended < 30, f"the job took {ended:.1f} s to end after rank 1 was killed"
    # Open MPI's launcher names the dead rank: "process rank 1 with PID ... exited on signal 9 (Killed)"
    assert "rank 1" in output and "signal 9" in output, output[-3000:]
