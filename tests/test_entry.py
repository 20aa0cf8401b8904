"""An exception on one rank of a dmlmpi entry point ends the whole job promptly, naming the rank."""
from __future__ import annotations

import json
import os

import pytest

from dmlmpi.testing import run_mpi

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("nprocs,bad", [(2, 0), (3, 2)])
def test_exception_aborts_job(nprocs: int, bad: int) -> None:
    """The other ranks are blocked in a collective; the job still ends fast and non-zero."""
    result = run_mpi(nprocs, [os.path.join(ROOT, "tests", "cases", "raise_on_one_rank.py"), str(bad)],
                     timeout=60, cwd=ROOT)
    assert not result.timed_out, result.stdout
    assert result.returncode != 0
    assert f"dmlmpi: rank {bad} of {nprocs}: raised RuntimeError: deliberate failure" in result.stdout
    assert result.elapsed < 45, result.elapsed


def test_bad_option_fails_on_every_rank() -> None:
    """A bad value for the training job is refused before training, with a non-zero exit."""
    result = run_mpi(3, ["-m", "dmlmpi.train", "--epochs", "0"], timeout=60, cwd=ROOT)
    assert not result.timed_out and result.returncode != 0
    assert "--epochs must be positive" in result.stdout


def test_allreduce_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench allreduce` on 3 ranks: table, targets, JSON records and a PNG."""
    out_json, out_png = tmp_path / "ar.json", tmp_path / "ar.png"
    result = run_mpi(3, ["-m", "dmlmpi.bench", "allreduce", "--sizes", "4K,64K", "--samples", "2",
                         "--sample-seconds", "0.002", "--json", str(out_json), "--plot", str(out_png)],
                     timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "busbw(GB/s)" in result.stdout and "# targets" in result.stdout
    records = json.loads(out_json.read_text())
    keys = {"algorithm", "ranks", "bytes", "dtype", "time_s_median", "time_s_min", "time_s_max",
            "algbw_GBps", "busbw_GBps"}
    assert all(keys <= set(r) for r in records)
    algos = {r["algorithm"] for r in records}
    assert {"auto", "ring", "mpi", "hierarchical", "shm", "auto-shared", "native", "native-again", "gloo",
            "fusion:fused"} <= algos
    assert "native-again vs native at   4K" in result.stdout
    assert all(r["wrong"] == 0 and r["ranks"] == 3 for r in records)
    assert all(r["time_s_min"] <= r["time_s_median"] <= r["time_s_max"] for r in records)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dp_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench dp` on 2 ranks: the three variants, a table, JSON records."""
    out_json = tmp_path / "dp.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--samples", "2",
                         "--sample-seconds", "0.01", "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "samples/s" in result.stdout and "communication adds" in result.stdout
    records = json.loads(out_json.read_text())
    assert {r["variant"] for r in records} == {"local", "dmlmpi", "ddp"}
    assert all(r["ranks"] == 2 and r["samples_per_s_min"] <= r["samples_per_s_median"] <= r["samples_per_s_max"]
               for r in records)


@pytest.mark.parametrize("compression", ["fp16", "powersgd"])
def test_dp_bench_compression(compression: str, tmp_path) -> None:
    """`bench dp --compression X`: dmlmpi and DDP (its fp16 / PowerSGD hook) both run compressed, local does not."""
    out_json = tmp_path / "dpc.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--samples", "2", "--sample-seconds",
                         "0.01", "--compression", compression, "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0 and f"gradient compression {compression}" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert {v: r["compression"] for v, r in records.items()} == {"local": "none", "dmlmpi": compression,
                                                                   "ddp": compression}


def test_dp_bench_amp(tmp_path) -> None:
    """`bench dp --amp bf16`: three more rows under bfloat16 autocast, each against the bf16 local row."""
    out_json = tmp_path / "dpamp.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--amp", "bf16", "--samples", "2",
                         "--sample-seconds", "0.01", "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0 and "bf16 autocast: local step" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert {v: r["amp"] for v, r in records.items()} == {
        "local": "none", "dmlmpi": "none", "ddp": "none", "local-bf16": "bf16", "dmlmpi-bf16": "bf16", "ddp-bf16": "bf16"}
    assert records["local-bf16"]["comm_overhead"] == 0.0 and records["local"]["comm_overhead"] == 0.0


def test_dp_bench_adasum(tmp_path) -> None:
    """`bench dp --reduction adasum`: a dmlmpi-adasum row beside the others."""
    out_json = tmp_path / "dpada.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--reduction", "adasum", "--samples", "2",
                         "--sample-seconds", "0.01", "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0 and "Adasum adds" in result.stdout, result.stdout
    assert {r["variant"] for r in json.loads(out_json.read_text())} == {"local", "dmlmpi", "ddp", "dmlmpi-adasum"}


def test_dp_bench_sync_bn(tmp_path, capsys) -> None:
    """`bench dp --sync-bn`: a fourth row, dmlmpi with SyncBatchNorm layers; refused for models without BatchNorm."""
    out_json = tmp_path / "dpsbn.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "bn-cnn", "--sync-bn", "--samples", "2",
                         "--sample-seconds", "0.01", "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0 and "SyncBatchNorm adds" in result.stdout, result.stdout
    assert {r["variant"] for r in json.loads(out_json.read_text())} == {"local", "dmlmpi", "ddp", "dmlmpi-syncbn"}
    from dmlmpi.bench.dp import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--models", "cnn", "--sync-bn"])
    assert "has no BatchNorm layer" in capsys.readouterr().err


def test_dp_bench_zero(tmp_path) -> None:
    """`bench dp --zero --optimizer adamw`: dmlmpi's and torch's ZeRO rows, each holding about half of AdamW's state."""
    out_json = tmp_path / "dpzero.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--zero", "--optimizer", "adamw",
                         "--samples", "2", "--sample-seconds", "0.01", "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0 and "dmlmpi-zero / ddp-zero" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert set(records) == {"local", "dmlmpi", "ddp", "dmlmpi-zero", "ddp-zero"}
    whole = records["dmlmpi"]["optimizer_state_bytes"]
    assert whole == records["ddp"]["optimizer_state_bytes"] > 2 * 4 * 8000  # two moments of 8k parameters
    for v in ("dmlmpi-zero", "ddp-zero"):
        assert 0.3 * whole < records[v]["optimizer_state_bytes"] < 0.7 * whole, (v, records[v])


def test_dp_bench_zero_2_and_3_rows_over_grouped_units(tmp_path) -> None:
    """`bench dp --zero 3 --zero3-unit-params N` (the whole CNN one unit, for dmlmpi and FSDP2 alike): the stage-2
    and stage-3 rows keep half of the gradients, the stage-3 rows half of the parameters."""
    out_json = tmp_path / "dpzero3.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "dp", "--models", "cnn", "--zero", "3", "--optimizer", "adamw",
                         "--zero3-unit-params", "100000", "--samples", "2", "--sample-seconds", "0.01",
                         "--json", str(out_json)], timeout=240, cwd=ROOT)
    assert result.returncode == 0 and "dmlmpi-zero3 / fsdp-zero3" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert {"dmlmpi-zero2", "fsdp-zero2", "dmlmpi-zero3", "fsdp-zero3"} <= set(records)
    whole = records["dmlmpi"]["param_bytes"]
    assert whole == records["dmlmpi"]["grad_bytes"] == 4 * 8010
    for v in ("dmlmpi-zero2", "fsdp-zero2", "dmlmpi-zero3", "fsdp-zero3"):
        assert 0.45 * whole < records[v]["grad_bytes"] < 0.55 * whole, (v, records[v])
    for v in ("dmlmpi-zero3", "fsdp-zero3"):
        assert 0.45 * whole < records[v]["param_bytes"] < 0.55 * whole, (v, records[v])


def test_broadcast_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench broadcast` on 2 ranks: every row, each leaving rank 0's values everywhere, JSON records."""
    out_json = tmp_path / "bc.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "broadcast", "--samples", "2", "--json", str(out_json)],
                     timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "24 buffers of bn-cnn" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert set(records) == {"fused", "fused-once", "one-each", "native-each", "gloo-coalesced"}
    assert all(r["wrong"] == 0 and r["ranks"] == 2 and r["tensors"] == 24 for r in records.values())


def test_checkpoint_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench checkpoint` on 3 ranks: every row saves and loads back what it saved; a sharded
    rank writes about a third of what the whole checkpoint's one writer does; JSON records."""
    out_json = tmp_path / "ck.json"
    result = run_mpi(3, ["-m", "dmlmpi.bench", "checkpoint", "--hidden", "256", "--samples", "2",
                         "--dir", str(tmp_path), "--json", str(out_json)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "13066 parameters, AdamW) on 3 ranks" in result.stdout, result.stdout
    records = {(r["row"], r["operation"]): r for r in json.loads(out_json.read_text())}
    assert {row for row, _ in records} == {"dmlmpi-full", "dmlmpi-sharded", "torch-dcp"}
    assert all(r["restored"] and r["samples"] == 2 for r in records.values())
    whole = records[("dmlmpi-full", "save")]["written_most_one_rank"]
    assert whole > 3 * 13066 * 4  # the parameters and AdamW's two moments, on rank 0
    assert records[("dmlmpi-sharded", "save")]["written_most_one_rank"] < 0.5 * whole
    assert list(tmp_path.iterdir()) == [out_json]  # its checkpoints removed


def test_callcost_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench callcost` on 2 ranks: every row, Python costs that grow with N, JSON records."""
    out_json = tmp_path / "cc.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "callcost", "--busy", "10,400", "--samples", "2",
                         "--json", str(out_json)], timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout
    assert "time added per second of Python" in result.stdout, result.stdout
    records = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert set(records) == {"native", "busy 10", "busy 400", "auto-noguard", "auto"}
    assert records["native"]["vs_native"] == 1.0
    assert 0 < records["busy 10"]["python_between_s"] < records["busy 400"]["python_between_s"]
    assert all(r["time_s_min"] <= r["time_s_median"] <= r["time_s_max"] for r in records.values())


def test_callcost_bench_rejects_bad_values() -> None:
    """Bad --busy or --bytes values end the run with a usage error on every rank, before any MPI traffic."""
    result = run_mpi(2, ["-m", "dmlmpi.bench", "callcost", "--busy", "10,x"], timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "--bytes/--busy" in result.stdout, result.stdout


def test_ps_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench ps` on 3 ranks: every variant with and without a straggler, targets, JSON."""
    path = tmp_path / "ps.json"
    result = run_mpi(3, ["-m", "dmlmpi.bench", "ps", "--epochs", "1", "--train-args", "--samples 300",
                         "--json", str(path)], timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "2 workers + 1 server(s)" in result.stdout and "sync PS step time / ring DP step time" in result.stdout
    records = json.loads(path.read_text())
    assert [(r["variant"], r["straggler"] != "none") for r in records] == [
        (v, s) for s in (False, True) for v in ("dp", "sync", "async", "ssp", "async-own")]
    for r in records:
        assert r["workers"] == 2 and r["samples_per_s_median"] > 0 and 0 <= r["test_accuracy"] <= 1
        # the PS variants count what they send: 8010 float32 gradients + a 32-byte header per step
        assert r["bytes_sent_per_worker_step"] == (8010 * 4 if r["variant"] == "dp" else 8010 * 4 + 32)


def test_pipeline_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench pipeline` on 3 ranks: every schedule and torch's, bubble vs theory, activation memory, JSON."""
    path = tmp_path / "pipeline.json"
    result = run_mpi(3, ["-m", "dmlmpi.bench", "pipeline", "--width", "32", "--micro-size", "4", "--micro", "3,6",
                         "--steps", "2", "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "bubble" in result.stdout and "1F1B / GPipe stage-0 activation memory" in result.stdout
    records = json.loads(path.read_text())
    torch_rows = ("torch-gpipe", "torch-1f1b", "torch-interleaved", "torch-zbv")
    assert [(r["schedule"], r["M"]) for r in records] == [
        (s, m) for s in ("gpipe", "1f1b", "interleaved", "zb-h1", "1f1b+recompute", *torch_rows) for m in (3, 6)]
    by = {(r["schedule"], r["M"]): r for r in records}
    assert "zb-h1 step time" in result.stdout and "torch-zbv's" in result.stdout
    peers = [r for r in records if r["schedule"] in torch_rows]
    assert all(r["step_time_s"] > 0 and "bubble_measured" not in r for r in peers)
    records = [r for r in records if r["schedule"] not in torch_rows]
    for r in records:
        assert r["P"] == 3 and len(r["peak_activation_bytes"]) == 3 and r["samples_per_s_median"] > 0
    # 1F1B's first stage holds P of the M microbatches' activations, GPipe all M (equal microbatches)
    assert by[("1f1b", 6)]["peak_activation_bytes"][0] * 2 == by[("gpipe", 6)]["peak_activation_bytes"][0]
    assert by[("1f1b+recompute", 6)]["peak_activation_bytes"][0] < by[("1f1b", 6)]["peak_activation_bytes"][0]
    assert by[("gpipe", 3)]["bubble_theory"] == pytest.approx(2 / 5)
    assert by[("zb-h1", 3)]["bubble_theory"] == pytest.approx(2 / 11)
    for r in records:  # waiting on a neighbour is part of the busiest stage's idle time, which is part of the step
        assert 0 <= r["waiting_busiest"] <= r["bubble_measured"] < 1 and r["idle_mean"] < 1
        # the replay runs the same actions with free messages: never a longer step, so never more idle
        # (up to the ranks leaving the starting barrier a few microseconds apart)
        assert 0 <= r["bubble_replay"] <= r["bubble_measured"] + 0.02


def test_fl_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench fl --no-flower` on 2 ranks: per-round seconds for every (K, C), JSON."""
    path = tmp_path / "fl.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "fl", "--no-flower", "--clients", "20,40", "--fractions", "0.5,1.0",
                         "--rounds", "3", "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Seconds per federated round" in result.stdout
    records = json.loads(path.read_text())
    assert [(r["clients"], r["fraction"]) for r in records] == [(20, 0.5), (20, 1.0), (40, 0.5), (40, 1.0)]
    for r in records:
        assert len(r["dmlmpi_round_s"]) == 3 and r["dmlmpi_min"] <= r["dmlmpi_median"] <= r["dmlmpi_max"]
        assert 0 < r["dmlmpi_accuracy"] <= 1


def test_fedavg_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench fedavg` on 2 ranks: rounds to a (low) target for FedSGD and FedAvg, JSON."""
    path = tmp_path / "fedavg.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "fedavg", "--clients", "20", "--fraction", "0.2", "--target", "0.15",
                         "--max-rounds", "4", "--data", "shards", "--fedsgd-lr", "0.5", "--fedavg-lr", "0.1",
                         "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "Rounds to 15% test accuracy" in result.stdout
    records = json.loads(path.read_text())
    assert [(r["method"], r["lr"]) for r in records] == [("fedsgd", 0.5), ("fedavg", 0.1)]
    for r in records:
        assert r["rounds_run"] <= 4 and (r["rounds"] is None or r["best_accuracy"] >= 0.15)


def test_alltoall_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench alltoall` on 3 ranks: every row at every size delivers the right blocks, JSON records."""
    path = tmp_path / "a2a.json"
    result = run_mpi(3, ["-m", "dmlmpi.bench", "alltoall", "--sizes", "12K,96K", "--samples", "2",
                         "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "# alltoall, float32, 3 ranks" in result.stdout
    records = json.loads(path.read_text())
    rows = ["dmlmpi-auto", "dmlmpi-mpi", "dmlmpi-pairwise", "dmlmpi-auto-new", "native", "gloo"]
    assert [(r["algorithm"], r["bytes"]) for r in records] == [(a, b) for b in (12288, 98304) for a in rows]
    for r in records:
        assert r["wrong"] == 0 and r["time_s_min"] <= r["time_s_median"] <= r["time_s_max"]
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * 2 / 3)


def test_moe_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench moe` on 2 ranks: the four variants, expert parallelism keeping half the experts."""
    path = tmp_path / "moe.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "moe", "--d", "16", "--experts", "4", "--tokens", "32", "--samples", "2",
                         "--sample-seconds", "0.02", "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "# mixture of 4 experts (d 16, hidden 64), 32 tokens per rank per step, 2 ranks" in result.stdout
    records = {r["variant"]: r for r in json.loads(path.read_text())}
    assert list(records) == ["local", "dmlmpi-ep", "dmlmpi-dp", "ddp"]
    expert = 16 * 64 + 64 + 64 * 16 + 16
    assert records["local"]["params_per_rank"] - records["dmlmpi-ep"]["params_per_rank"] == 2 * expert
    assert all(r["tokens_per_s_min"] <= r["tokens_per_s_median"] <= r["tokens_per_s_max"] for r in records.values())


def test_fairness_bench_smoke(tmp_path) -> None:
    """`python -m dmlmpi.bench fairness` on 2 ranks: FedAvg and q-FedAvg rows over two seeds, a table, JSON."""
    path = tmp_path / "fairness.json"
    result = run_mpi(2, ["-m", "dmlmpi.bench", "fairness", "--clients", "20", "--fraction", "0.2", "--rounds", "3",
                         "--local-epochs", "1", "--q", "1", "--qffl-lr", "0,15", "--seeds", "2",
                         "--last", "2", "--eval-every", "1",
                         "--json", str(path)], timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "After 3 rounds, 20 clients (shards)" in result.stdout and "median (min-max) over 2 seed(s)" in result.stdout
    assert "last 2 rounds' evaluations" in result.stdout
    records = json.loads(path.read_text())
    assert [(r["strategy"], r["step"], r["seed"]) for r in records] == [
        ("fedavg", None, 0), ("fedavg", None, 1), ("qfedavg", 0.15, 0), ("qfedavg", 0.15, 1),
        ("qfedavg", 15.0, 0), ("qfedavg", 15.0, 1)]
    for r in records:
        assert r["evaluations"] == 2  # rounds 2 and 3
        assert 0 <= r["client_accuracy_worst10"] <= r["client_accuracy_mean"] <= r["client_accuracy_best10"] <= 1
    # the seeds differ (split, model, sampling); so do FedAvg and q-FedAvg on the same seed
    assert records[0]["test_accuracy"] != records[1]["test_accuracy"] or \
        records[0]["client_accuracy_std"] != records[1]["client_accuracy_std"]
    assert records[0]["client_accuracy_std"] != records[2]["client_accuracy_std"]
