"""Telemetry: run directory, Chrome trace (on 3 real ranks), plots, progress bar."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from typing import Any

import pytest

from dmlmpi.telemetry import ProgressBar, RunDirError, RunLog, Timeline, atomic_write_json
from dmlmpi.testing import run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE = os.path.join(ROOT, "tests", "cases", "telemetry_case.py")
PNG = b"\x89PNG\r\n\x1a\n"


class FakeComm:
    """Stands in for a communicator in single-process tests: rank `rank` of `size`, no traffic."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return self.size

    def Barrier(self) -> None:
        pass

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def gather(self, obj: Any, root: int = 0) -> list[Any] | None:
        return [obj] if self.rank == root else None


def read_jsonl(path: Any) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- RunLog ------------------------------------------------------------------------------------


def test_runlog_writes_config_metrics_summary(tmp_path) -> None:
    out = tmp_path / "run" / "nested"  # created by the constructor
    with RunLog(str(out), FakeComm()) as log:
        log.write_config({"lr": 0.1, "epochs": 2})
        log.log({"step": 1, "loss": 2.5})
        log.log({"epoch": 1, "loss": 2.0, "test_accuracy": 0.5})
        assert len(read_jsonl(out / "metrics.jsonl")) == 2  # flushed per line, before close
        log.write_summary({"final_loss": 2.0})
    assert json.loads((out / "config.json").read_text()) == {"lr": 0.1, "epochs": 2}
    assert json.loads((out / "summary.json").read_text()) == {"final_loss": 2.0}
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["loss"] for r in records] == [2.5, 2.0] and records[1]["test_accuracy"] == 0.5
    assert all(r["time_s"] >= 0 for r in records) and records[0]["time_s"] <= records[1]["time_s"]
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "summary.json"]  # no temp files


def test_runlog_appends_when_reopened(tmp_path) -> None:
    for step in (1, 2):
        with RunLog(str(tmp_path), FakeComm()) as log:
            log.log({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_runlog_unwritable_dir_raises(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(RunDirError, match="not writable") as info:
        RunLog(str(blocker / "run"), FakeComm())
    assert isinstance(info.value, OSError)


def test_runlog_other_ranks_write_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    quiet = RunLog(str(out), FakeComm(rank=1, size=2))
    quiet.write_config({"a": 1})
    quiet.log({"loss": 1.0})
    quiet.write_summary({"b": 2})
    quiet.info("hidden")
    assert not out.exists() and capsys.readouterr().out == ""
    RunLog(str(out), FakeComm(rank=1, size=2), verbose=True).info("shown")
    RunLog(str(out), FakeComm(rank=0, size=2)).info("from rank 0")
    assert capsys.readouterr().out == "[rank 1] shown\nfrom rank 0\n"


def test_atomic_write_json_replaces_and_serialises_numpy(tmp_path) -> None:
    import numpy as np
    path = tmp_path / "x.json"
    path.write_text("old")
    atomic_write_json(str(path), {"v": np.float32(1.5), "a": np.arange(3)})
    assert json.loads(path.read_text()) == {"v": 1.5, "a": [0, 1, 2]}
    assert os.listdir(tmp_path) == ["x.json"]


# ---- Timeline ----------------------------------------------------------------------------------


def test_timeline_single_rank_cap_and_disabled(tmp_path) -> None:
    tl = Timeline(FakeComm(), max_events=3)
    for i in range(5):
        with tl.span(f"s{i}", cat="comm" if i % 2 else "compute"):
            pass
    tl.instant("mark")
    assert len(tl.events) == 3 and tl.dropped == 3
    tl.write(str(tmp_path / "trace.json"))
    trace = json.loads((tmp_path / "trace.json").read_text())
    assert trace["otherData"]["dropped_total"] == 3 and trace["displayTimeUnit"] == "ms"
    tids = {e["cat"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"}
    assert tids == {"compute": 0, "comm": 1}
    off = Timeline(FakeComm(), enabled=False)
    with off.span("x") as span, off.span("y"):
        assert span is None
    off.instant("z")
    off.write(str(tmp_path / "off.json"))
    assert off.events == [] and not (tmp_path / "off.json").exists()


@pytest.mark.launches_mpi
def test_timeline_and_runlog_on_three_ranks(tmp_path) -> None:
    out = tmp_path / "run"
    result = run_mpi(3, [CASE, str(out)], timeout=120, cwd=ROOT)
    assert result.returncode == 0 and not result.timed_out, result.stdout
    assert all(f"[rank {r}] sum 6.0" in result.stdout for r in range(3)), result.stdout
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl", "summary.json", "trace.json"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]  # rank 0 only
    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms"
    assert {e["ph"] for e in events} <= {"X", "M", "i"}
    assert {e["pid"] for e in events if e["ph"] == "X"} == {0, 1, 2}
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {0: "rank 0", 1: "rank 1", 2: "rank 2"}
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 3 * 9 and all(e["dur"] >= 0 and e["ts"] >= 0 for e in spans)
    assert {e["cat"] for e in spans} == {"step", "compute", "comm"}
    tids = {(e["cat"], e["tid"]) for e in spans}
    assert len(tids) == 3 and ("compute", 0) in tids and ("comm", 1) in tids  # same on every rank
    assert all(e["args"]["bytes"] == 32 for e in spans if e["cat"] == "comm")
    assert sum(e["ph"] == "i" for e in events) == 3


@pytest.mark.launches_mpi
def test_unwritable_out_dir_stops_every_rank(tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_mpi(3, [CASE, str(blocker / "run")], timeout=120, cwd=ROOT)
    assert not result.timed_out and result.returncode != 0, result.stdout
    assert "raised RunDirError: run directory" in result.stdout and "not writable" in result.stdout
    assert result.elapsed < 60, result.elapsed


# ---- plot --------------------------------------------------------------------------------------


def synthetic_run(run: Any) -> None:
    """A run dir: per-step training loss, per-epoch test metrics, a 3-rank trace longer than the window."""
    run.mkdir()
    lines = []
    for epoch in range(1, 4):
        for k in range(10):
            step = (epoch - 1) * 10 + k + 1
            lines.append({"epoch": epoch, "step": step, "loss": 2.0 / step, "time_s": step * 0.1})
        lines.append({"epoch": epoch, "test_loss": 1.0 / epoch, "test_accuracy": 0.5 + 0.1 * epoch})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + "not json\n")
    events = [{"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}}
              for r in range(3)]
    for r in range(3):
        for step in range(50):
            t = step * 10_000.0  # us: 10 ms per step, 500 ms in all
            events += [{"ph": "X", "name": f"step {step}", "cat": "step", "pid": r, "tid": 2, "ts": t, "dur": 9000},
                       {"ph": "X", "name": "forward", "cat": "compute", "pid": r, "tid": 0, "ts": t, "dur": 6000},
                       {"ph": "X", "name": "allreduce", "cat": "comm", "pid": r, "tid": 1, "ts": t + 6000,
                        "dur": 3000 + 100 * r}]
    (run / "trace.json").write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


def run_plot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dmlmpi.plot", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_plot_writes_three_pngs(tmp_path) -> None:
    run = tmp_path / "run"
    synthetic_run(run)
    result = run_plot(str(run))
    assert result.returncode == 0, result.stderr
    for name in ("loss.png", "accuracy.png", "timeline.png"):
        assert (run / name).read_bytes()[:8] == PNG
        assert str(run / name) in result.stdout
    assert "skipped 1 line" in result.stderr


def test_plot_one_input_and_out_dir(tmp_path) -> None:
    run = tmp_path / "run"
    synthetic_run(run)
    (run / "trace.json").unlink()
    result = run_plot(str(run), "--out", str(tmp_path / "pngs"))
    assert result.returncode == 0, result.stderr
    assert "timeline.png skipped" in result.stderr
    assert sorted(os.listdir(tmp_path / "pngs")) == ["accuracy.png", "loss.png"]


def test_plot_empty_dir_exits_2(tmp_path) -> None:
    result = run_plot(str(tmp_path))
    assert result.returncode == 2
    assert "neither metrics.jsonl nor trace.json" in result.stderr


# ---- ProgressBar -------------------------------------------------------------------------------


def test_progress_bar_plain_lines_when_not_a_tty() -> None:
    stream = io.StringIO()
    bar = ProgressBar(FakeComm(), total=20, epochs=2, stream=stream, interval_s=3600)
    for epoch in (1, 2):
        bar.start_epoch(epoch)
        for step in range(1, 21):
            bar.update(step, loss=1.0 / step, samples=32, accuracy=0.5 if step == 20 else None)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()  # one line per epoch end, nothing at close
    assert lines[0].startswith("epoch 1/2  step 20/20  ") and lines[1].startswith("epoch 2/2")
    assert all("samples/s" in line and "loss 0.0500" in line and "acc 0.5000" in line for line in lines)


def test_progress_bar_tty_redraws_and_other_ranks_are_silent() -> None:
    stream = io.StringIO()
    bar = ProgressBar(FakeComm(), total=4, stream=stream, tty=True)
    for step in range(1, 5):
        bar.update(step, loss=0.25, samples=8)
    bar.close()
    text = stream.getvalue()
    assert text.startswith("\r[") and text.endswith("\n") and text.count("\n") == 1
    assert "step 4/4" in text and "loss 0.2500" in text
    silent = io.StringIO()
    other = ProgressBar(FakeComm(rank=1, size=2), total=4, stream=silent, tty=False)
    other.update(4, loss=1.0, samples=8)
    other.close()
    assert silent.getvalue() == ""


def test_pipeline_blocks_take_each_rank_from_its_own_last_step() -> None:
    """Replicas drift: rank 1 begins its last step while rank 0 still runs a W of the step before;
    that W is not in the last step's schedule."""
    from dmlmpi.plot import pipeline_blocks

    def span(pid: int, cat: str, ts: float, dur: float, **args: int) -> dict:
        return {"ph": "X", "pid": pid, "cat": cat, "name": cat, "ts": ts, "dur": dur, "args": args}

    events = [span(0, "step", 0, 100), span(1, "step", 0, 90),  # step 1
              span(0, "forward", 10, 5, micro=0), span(0, "weight", 105, 5, micro=0),  # rank 0 finishes late
              span(1, "step", 95, 80), span(1, "forward", 100, 5, micro=0),  # rank 1's last step
              span(0, "step", 112, 60), span(0, "forward", 115, 5, micro=0), span(0, "weight", 150, 5, micro=0)]
    blocks = pipeline_blocks({"traceEvents": events})
    assert sorted((b[0], b[1], b[4]) for b in blocks) == [(0, "F", 0.115), (0, "W", 0.15), (1, "F", 0.1)]
