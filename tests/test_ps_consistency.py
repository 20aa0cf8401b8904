"""The parameter server's consistency rules and sharding, as pure code (no MPI)."""
from __future__ import annotations

import random

import pytest

from dmlmpi.parallel.consistency import Consistency
from dmlmpi.parallel.ps import check_setup, shard_ranges


def test_shards_cover_the_vector_evenly() -> None:
    """Contiguous, in order, covering everything, sizes within one element (so a big tensor is split)."""
    for numel in (0, 1, 5, 1000, 1001):
        for servers in (1, 2, 3, 7):
            ranges = shard_ranges(numel, servers)
            assert len(ranges) == servers and ranges[0][0] == 0 and ranges[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_setup_needs_a_server_and_a_worker() -> None:
    """No servers, or servers on every rank, is refused with a message saying why."""
    check_setup(2, 1)
    with pytest.raises(ValueError, match="leaves no worker"):
        check_setup(3, 3)
    with pytest.raises(ValueError, match="at least one server"):
        check_setup(3, 0)


def test_sync_applies_one_update_per_round_when_all_pushed() -> None:
    """A round waits for every worker; its update averages them in worker order; pulls wait for it."""
    book = Consistency("sync", [0, 1, 2])
    assert book.push(2) == [] and book.answerable() == []
    assert book.push(0) == [] and book.answerable() == []
    assert book.push(1) == [[(0, 0), (1, 0), (2, 0)]]
    assert book.answerable() == [0, 1, 2] and book.version == 1


def test_async_applies_each_gradient_and_answers_at_once() -> None:
    """Every push is its own update and its pull is answered immediately."""
    book = Consistency("async", [0, 1])
    assert book.push(1) == [[(1, 0)]] and book.answerable() == [1]
    assert book.push(1) == [[(1, 1)]] and book.push(0) == [[(0, 0)]]
    assert book.answerable() == [0, 1] and book.version == 3


def test_ssp_zero_is_sync() -> None:
    """Same updates and same answers, push for push, in a random arrival order."""
    rng = random.Random(0)
    a, b = Consistency("sync", [0, 1, 2]), Consistency("ssp", [0, 1, 2], staleness=0)
    pending = [w for w in range(3) for _ in range(5)]
    rng.shuffle(pending)
    for w in pending:
        assert a.push(w) == b.push(w)
        assert a.answerable() == b.answerable()


@pytest.mark.parametrize("staleness", [0, 1, 2, 5])
def test_ssp_bounds_the_lead_over_the_slowest(staleness: int) -> None:
    """Simulated workers of different speeds: none ever starts a step more than s rounds ahead."""
    rng = random.Random(staleness)
    workers = [0, 1, 2, 3]
    book = Consistency("ssp", workers, staleness=staleness)
    free = set(workers)  # workers holding parameters, able to compute and push
    started = {w: 0 for w in workers}  # steps each worker has started
    max_lead = 0
    for _ in range(400):
        if not free:
            break
        w = min(free) if rng.random() < 0.7 else rng.choice(sorted(free))  # worker 0 is the fast one
        free.discard(w)
        book.push(w)
        free |= set(book.answerable())
        for v in free:
            started[v] = book.clocks[v]  # a free worker is about to start step clocks[v]
        slowest = min(book.clocks.values())
        max_lead = max(max_lead, max(started[v] - slowest for v in free) if free else 0)
    assert max_lead <= staleness
    assert free, "deadlock: nobody can go on"
    if staleness > 0:
        assert max_lead == staleness  # the fast worker does use its slack


def test_finished_workers_do_not_hold_rounds_back() -> None:
    """When a worker stops, later rounds complete with the others."""
    book = Consistency("ssp", [0, 1], staleness=1)
    book.push(0)
    book.push(1)  # round 0 applied
    assert book.version == 1
    book.push(0)  # round 1 waits for worker 1 ...
    assert book.finish(1) == [[(0, 1)]]  # ... until it says it is done
    assert not book.all_finished()
    book.finish(0)
    assert book.all_finished() and book.quiescent()


def test_bad_mode_and_staleness() -> None:
    """Unknown modes and negative staleness are refused."""
    with pytest.raises(ValueError, match="consistency mode"):
        Consistency("bsp", [0])
    with pytest.raises(ValueError, match="staleness"):
        Consistency("ssp", [0], staleness=-1)


# -- own pace: what the first server tells each worker --------------------------------------------

from dmlmpi.parallel.pace import CHECKPOINT, DONE, GO, PREEMPTED, Pace  # noqa: E402


def drive(book: Pace, order: list[int], block: bool = True) -> dict[int, list[int]]:
    """Workers push in `order` (each push is one applied gradient) until every one was told to stop; codes per worker.

    A worker told CHECKPOINT waits (in the collective write) until every running worker has been told
    (`block=False`: it keeps pushing, as if its gradients were still in flight).
    """
    codes: dict[int, list[int]] = {w: [] for w in book.workers}
    saving: set[int] = set()
    for w in order:
        if w in book.finished or w in saving:
            continue
        book.applied(book.version + 1)
        codes[w].append(book.code(w))
        if codes[w][-1] == CHECKPOINT and block:
            saving.add(w)
        if saving and not book.owed:
            saving.clear()  # everyone is in: the checkpoint is written, all go on
    return codes


def test_own_pace_goes_until_the_budget_then_stops_everyone() -> None:
    """GO until the budget is applied, then DONE to each worker once; a fast worker does more of it."""
    book = Pace([0, 1, 2], budget=30)
    order = [w for _ in range(40) for w in (0, 0, 1, 2, 2)]  # workers 0 and 2 push twice as often as 1
    codes = drive(book, order)
    assert all(c[-1] == DONE and set(c[:-1]) <= {GO} for c in codes.values())
    assert sum(len(c) for c in codes.values()) <= 30 + 2  # at most one more push per other worker
    assert len(codes[0]) > len(codes[1]) and len(codes[2]) > len(codes[1])


def test_every_worker_joins_each_checkpoint_before_anyone_stops() -> None:
    """A checkpoint every 10 gradients: each worker hears of each one exactly once, in the same sequence."""
    rng = random.Random(3)
    for trial in range(20):
        book = Pace([0, 1, 2], budget=45, checkpoint_every=10)
        order = [rng.choice([0, 0, 0, 1, 2, 2]) for _ in range(400)]
        codes = drive(book, order)
        sequences = {w: [c for c in cs if c != GO] for w, cs in codes.items()}
        # 4 checkpoints (10, 20, 30, 40 < 45), then the stop: the same for everyone
        assert all(s == [CHECKPOINT] * 4 + [DONE] for s in sequences.values()), (trial, sequences)
        # pushes that keep coming while a checkpoint is announced delay the next one, never split the sequence
        loose = drive(Pace([0, 1, 2], budget=45, checkpoint_every=3), order, block=False)
        sequences = [[c for c in cs if c != GO] for cs in loose.values()]
        assert sequences[0][-1] == DONE and all(s == sequences[0] for s in sequences), (trial, sequences)


def test_a_stop_request_stops_everyone_after_the_checkpoint_they_owe() -> None:
    """A signal (stop_requested): no new checkpoints; owed ones first, then PREEMPTED for every worker."""
    book = Pace([0, 1], budget=100, checkpoint_every=5)
    for _ in range(5):
        book.applied(book.version + 1)
    assert book.code(0) == CHECKPOINT  # worker 1 still owes it
    book.stop_requested = True
    book.applied(book.version + 1)
    assert book.code(0) == GO  # worker 1 has not heard of the checkpoint yet: no stop for anyone
    assert book.code(1) == CHECKPOINT
    for _ in range(10):  # past the next checkpoint version: none is called after a stop request
        book.applied(book.version + 1)
    assert [book.code(0), book.code(1)] == [PREEMPTED, PREEMPTED]


def test_own_pace_resumed_with_its_budget_spent_stops_at_once() -> None:
    """A resumed run whose servers already applied the budget: the first answer is DONE; bad budgets refused."""
    book = Pace([0, 1], budget=10, checkpoint_every=4, version=12)
    assert book.code(0) == DONE and book.code(1) == DONE
    with pytest.raises(ValueError, match="budget"):
        Pace([0], budget=0)
