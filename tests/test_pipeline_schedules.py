"""Pipeline schedules and partitions as pure code: the checker over a grid of (P, M, V)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dmlmpi.grid import coords_of
from dmlmpi.parallel.partition import balanced_cuts, describe, partition, shared_parameters
from dmlmpi.parallel.schedules import Action, build, check, promised_activations


@pytest.mark.parametrize("name", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_every_schedule_is_valid_over_a_grid(name: str) -> None:
    """Dependencies, matched messages, no deadlock, activations within the promise, for P<=8, M<=17."""
    ran = 0
    for P in (1, 2, 3, 4, 8):
        for M in (1, 2, 3, P, 2 * P, 2 * P + 1, 4 * P, 17):
            for V in ((2, 3) if name == "interleaved" else (1,)):
                if name == "interleaved" and M % P:
                    with pytest.raises(ValueError, match="multiple of the pipeline ranks"):
                        build(name, P, M, V)
                    continue
                promise = [promised_activations(name, P, M, V, r) for r in range(P)]
                report = check(build(name, P, M, V), P, M, V, promise)
                assert all(h <= p for h, p in zip(report.max_held, promise))
                ran += 1
    assert ran > 20


def test_bubble_and_memory_match_the_theory() -> None:
    """Balanced stages: GPipe and 1F1B idle (P-1)/(M+P-1) of the time; 1F1B holds P - rank, GPipe M."""
    P, M = 4, 16
    for name in ("gpipe", "1f1b"):
        report = check(build(name, P, M), P, M)
        assert report.bubble() == pytest.approx((P - 1) / (M + P - 1))
    assert check(build("gpipe", P, M), P, M).max_held == [M] * P
    assert check(build("1f1b", P, M), P, M).max_held == [4, 3, 2, 1]
    # interleaving cuts the bubble further
    assert check(build("interleaved", P, M, 2), P, M, 2).bubble() < (P - 1) / (M + P - 1)


@pytest.mark.parametrize("P,M", [(2, 2), (2, 8), (3, 7), (4, 4), (4, 16), (8, 8), (8, 17)])
def test_zero_bubble_reaches_its_theory(P: int, M: int) -> None:
    """zb-h1 with F, B, W of equal cost: makespan 3M + P - 1, bubble (P-1)/(3M+P-1), every rank holding min(P, M)."""
    report = check(build("zb-h1", P, M), P, M)
    assert report.makespan == pytest.approx(3 * M + P - 1)
    assert report.busiest_idle() == pytest.approx((P - 1) / (3 * M + P - 1))
    assert report.max_held == [min(P, M)] * P
    # against 1F1B (backward = B + W): a third of its bubble at large M
    one = check(build("1f1b", P, M), P, M)
    assert report.makespan < one.makespan or P == 1


def test_zero_bubble_with_fewer_microbatches_than_stages() -> None:
    """M < P runs and holds M, though the bubble is more than the M >= P formula."""
    for M in (1, 2, 3):
        report = check(build("zb-h1", 4, M), 4, M)
        assert report.max_held == [M] * 4
    with pytest.raises(ValueError, match="one chunk per rank"):
        build("zb-h1", 2, 4, 2)


def test_the_checker_catches_a_broken_weight_pass() -> None:
    """A W before its B, a W that sends, a missing W are reported."""
    P, M = 2, 2
    ok = build("zb-h1", P, M)
    r1 = list(ok[1])
    w = next(i for i, a in enumerate(r1) if a.op == "W")
    b = next(i for i, a in enumerate(r1) if a.op == "B" and a.micro == r1[w].micro)
    r1[w], r1[b] = r1[b], r1[w]
    with pytest.raises(ValueError, match="W0 before B0"):
        check([ok[0], r1], P, M)
    sending = [[Action(a.op, a.micro, a.chunk, a.stage, None, 1 if a.op == "W" else a.send_to) for a in ok[0]], ok[1]]
    with pytest.raises(ValueError, match="cannot receive or send"):
        check(sending, P, M)
    with pytest.raises(ValueError, match="exactly once"):
        check([[a for a in ok[0] if a.op != "W" or a.micro], ok[1]], P, M)


def test_replay_with_measured_action_times() -> None:
    """check(cost=...) replays given durations: equal ones give the theory, a slow action stretches the step."""
    P, M = 2, 8
    def base(r: int, a) -> float:
        return 1.0 if a.op == "F" else 2.0

    for name in ("gpipe", "1f1b"):
        schedules = build(name, P, M)
        even = check(schedules, P, M, cost=base)
        assert even.busiest_idle() == pytest.approx((P - 1) / (M + P - 1))
        assert even.makespan == pytest.approx(3.0 * (M + P - 1))
        # the last stage's final backward takes 1 longer: rank 0 waits for it, the step grows by 1
        last = schedules[1][-1]
        slow = check(schedules, P, M, cost=lambda r, a: base(r, a) + (1.0 if (r, a) == (1, last) else 0.0))
        assert slow.makespan == pytest.approx(3.0 * (M + P - 1) + 1) and slow.busy[1] == pytest.approx(3.0 * M + 1)
        assert slow.busiest_idle() == pytest.approx(1 - (3.0 * M + 1) / (3.0 * (M + P - 1) + 1))


def test_the_checker_catches_broken_schedules() -> None:
    """A deadlock, a backward before its forward, a broken promise, a wrong partner are reported."""
    P, M = 2, 2
    ok = build("1f1b", P, M)
    swapped = [list(ok[0]), list(reversed(ok[1]))]  # rank 1 starts with a backward
    with pytest.raises(ValueError, match=r"B\d before F\d"):
        check(swapped, P, M)
    # rank 0 waits for microbatch 0's gradient before sending microbatch 1's activation, while rank 1
    # wants microbatch 1's activation before it computes microbatch 0: each waits for the other
    r0, r1 = {str(a): a for a in ok[0]}, {str(a): a for a in ok[1]}
    dead = [[r0["F0"], r0["B0"], r0["F1"], r0["B1"]], [r1["F1"], r1["F0"], r1["B0"], r1["B1"]]]
    with pytest.raises(ValueError, match="deadlock"):
        check(dead, P, M)
    with pytest.raises(ValueError, match="more than the promised"):
        check(build("gpipe", P, 4), P, 4, promise=[2, 2])
    wrong = [[Action(a.op, a.micro, a.chunk, a.stage, a.recv_from, 0 if a.send_to is not None else None)
              for a in ok[0]], ok[1]]
    with pytest.raises(ValueError, match="sends to rank"):
        check(wrong, P, M)


def test_one_microbatch_and_fewer_microbatches_than_stages() -> None:
    """M = 1 and M < P run (a long bubble, but valid) for gpipe and 1f1b."""
    for name in ("gpipe", "1f1b"):
        report = check(build(name, 4, 1), 4, 1)
        assert report.max_held == [1, 1, 1, 1]
        check(build(name, 4, 3), 4, 3)


def test_balanced_cuts() -> None:
    """Contiguous parts minimising the largest; every part non-empty; too many parts refused."""
    assert balanced_cuts([1, 1, 1, 1], 2) == [(0, 2), (2, 4)]
    assert balanced_cuts([8, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [(0, 1), (1, 9)]
    assert balanced_cuts([0, 5, 0, 5, 0], 2) in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])
    with pytest.raises(ValueError, match="at least one layer"):
        balanced_cuts([1, 2], 3)


def test_partition_methods() -> None:
    """uniform by count, parameters by parameter count, time by measurement, explicit cut points."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 4))
    assert partition(model, 5, "uniform")[0] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    bounds, costs = partition(model, 2, "parameters")
    assert costs == [500, 0, 10100, 0, 404] and bounds in ([(0, 2), (2, 5)], [(0, 3), (3, 5)])
    bounds, costs = partition(model, 2, "time", sample=torch.randn(8, 4))
    assert len(bounds) == 2 and all(c >= 0 for c in costs)
    assert partition(model, 3, [1, 3])[0] == [(0, 1), (1, 3), (3, 5)]
    with pytest.raises(ValueError, match="increasing cut points"):
        partition(model, 3, [3, 1])
    with pytest.raises(ValueError, match="sample input"):
        partition(model, 2, "time")
    text = describe(model, [(0, 2), (2, 5)], costs, "time")
    assert "stage 0: layers 0-1 [0:Linear, 1:ReLU]  params 500" in text and "stage 1" in text


def test_shared_parameters_are_found_by_identity() -> None:
    """A parameter used in two stages is reported with both; one used twice within a stage is not."""
    torch.manual_seed(0)
    first = nn.Linear(3, 3)
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(3, 3), nn.Sequential(first), nn.Linear(3, 3))
    model[4].weight = model[2].weight  # tied inside the last stage of the split below
    index = {id(p): i for i, p in enumerate(model.parameters())}
    shared = shared_parameters(model, [(0, 2), (2, 4), (4, 5)])
    assert shared == [(index[id(first.weight)], (0, 1)), (index[id(first.bias)], (0, 1)),
                      (index[id(model[2].weight)], (1, 2))]
    assert shared_parameters(model, [(0, 5)]) == []


def test_grid_coordinates() -> None:
    """Row-major coordinates, last axis fastest."""
    assert [coords_of(r, {"dp": 2, "pp": 4}) for r in (0, 3, 4, 7)] == [
        {"dp": 0, "pp": 0}, {"dp": 0, "pp": 3}, {"dp": 1, "pp": 0}, {"dp": 1, "pp": 3}]
