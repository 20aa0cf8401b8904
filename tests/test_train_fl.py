"""`python -m dmlmpi.train --mode fl` end to end: world-size independence, resume, privacy, errors, plots."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from trainrun import ROOT, records, run_train

pytestmark = pytest.mark.launches_mpi  # these tests start mpiexec themselves

SMALL = ["--mode", "fl", "--samples", "1000", "--clients", "20", "--fraction", "0.25", "--rounds", "6",
         "--local-epochs", "2"]


def train(nprocs: int, out, *extra: str, timeout: float = 300):
    """Run the small federated task on nprocs ranks into `out`."""
    return run_train(nprocs, out, [*SMALL, *extra], timeout)


def rounds_of(out) -> list[dict]:
    """The per-round records of a run."""
    return [r for r in records(out) if "round" in r]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The small task on 2 ranks: the reference of the other tests."""
    out = tmp_path_factory.mktemp("fl2")
    result = train(2, out)
    assert result.returncode == 0, result.stdout
    return out, result


def test_same_seed_same_curve_on_2_and_8_ranks(two_ranks, tmp_path) -> None:
    """The sampled clients, their training and the accuracy curve do not depend on the world size."""
    result = train(8, tmp_path)
    assert result.returncode == 0, result.stdout
    a, b = rounds_of(two_ranks[0]), rounds_of(tmp_path)
    assert [r["round"] for r in a] == [r["round"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["participants"] == y["participants"] == 5
        assert x["test_accuracy"] == y["test_accuracy"], x["round"]
        assert x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-5), x["round"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5), x["round"]
    assert a[-1]["test_accuracy"] > max(0.2, a[0]["test_accuracy"])  # it learns (10 classes: chance is 0.1)


def test_run_directory_and_plots(two_ranks, tmp_path) -> None:
    """Per-round records, client statistics, a summary, and rounds.png."""
    out, result = two_ranks
    recs = rounds_of(out)
    for r in recs:
        assert r["bytes_down"] == 5 * 8010 * 4 and r["bytes_up"] == r["participants"] * 8010 * 4
        assert {"sampled", "dropped", "late", "skipped", "seconds", "train_loss"} <= r.keys()
    clients = json.load(open(out / "clients.json"))
    assert len(clients) == 20 and sum(c["size"] for c in clients) == 800
    summary = json.load(open(out / "summary.json"))
    assert summary["mode"] == "fl" and summary["rounds"] == 6 and summary["test_accuracy"] == recs[-1]["test_accuracy"]
    assert "federated simulation on 2 ranks" in result.stdout
    # how evenly the final model serves the clients, in the summary as in every evaluated round
    assert summary["client_accuracy_mean"] == recs[-1]["client_accuracy_mean"]
    assert 0 <= summary["client_accuracy_worst10"] <= summary["client_accuracy_mean"] <= \
        summary["client_accuracy_best10"] <= 1 and summary["client_accuracy_std"] >= 0
    done = subprocess.run([sys.executable, "-m", "dmlmpi.plot", str(out), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in ("rounds.png", "accuracy.png", "loss.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_where_it_stopped(tmp_path) -> None:
    """Stopped after 3 rounds and resumed, a SCAFFOLD run (client state!) ends as an uninterrupted one."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    extra = ["--strategy", "scaffold", "--client-momentum", "0", "--client-data", "dirichlet", "--alpha", "0.5"]
    assert train(2, straight, *extra).returncode == 0
    first = train(2, split, *extra, "--max-steps", "3")
    assert first.returncode == 0, first.stdout
    assert [r["round"] for r in rounds_of(split)] == [1, 2, 3]
    second = train(2, split, *extra, "--resume")
    assert second.returncode == 0, second.stdout
    assert "resumed from" in second.stdout
    a, b = rounds_of(straight), rounds_of(split)
    assert [r["round"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["test_accuracy"] == y["test_accuracy"] and x["test_loss"] == pytest.approx(y["test_loss"], rel=1e-6)


def test_secure_aggregation_with_dropouts_and_privacy(tmp_path) -> None:
    """SecAgg with clients dropping after key exchange, plus DP-FedAvg: rounds complete, epsilon grows."""
    result = train(3, tmp_path, "--secagg", "--dropout", "0.3", "--dp-clip", "1.0", "--dp-noise", "0.5",
                   "--rounds", "4", "--secagg-clip", "1.0")
    assert result.returncode == 0, result.stdout
    recs = rounds_of(tmp_path)
    assert len(recs) == 4 and sum(r["dropped"] for r in recs) > 0
    assert all(r["secagg_bytes"] > 0 and "epsilon" in r for r in recs)
    eps = [r["epsilon"] for r in recs]
    assert eps == sorted(eps) and eps[-1] > 0
    for before, r in zip([0.0] + eps, recs):
        # too few survivors to unmask (threshold 3 of 5): the round is skipped and spends no privacy
        assert r["skipped"] == (r["participants"] < 3)
        if r["skipped"]:
            assert "threshold is 3" in r["skip_reason"] and r["epsilon"] == before


@pytest.mark.parametrize("extra, message", [
    (["--ranks-per-client", "3"], "--ranks-per-client 3 must divide the 2 ranks"),  # checked with the options
    (["--clients", "900"], "--clients 900 is more than the 800 training samples"),  # checked once data is loaded
    (["--strategy", "qfedavg", "--secagg"], "weighs each client by its loss and update norm"),
])
def test_bad_federated_config_fails_on_every_rank(extra, message, tmp_path) -> None:
    """A setup that cannot work gets a clear error from every rank and a non-zero exit, before training."""
    result = train(2, tmp_path, *extra, timeout=120)
    assert not result.timed_out and result.returncode != 0
    assert message in result.stdout, result.stdout[-3000:]
