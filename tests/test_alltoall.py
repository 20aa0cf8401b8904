"""dmlmpi.comm.alltoall against mpi4py's own (pickle-based) alltoall of the same blocks, at any world size."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dmlmpi import comm
from dmlmpi.comm.personalized import check_splits, displacements, pairwise_steps

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
ALGOS = ["mpi", "pairwise", "auto"]


@pytest.fixture(scope="module", params=["area", "messages"])
def on(request: pytest.FixtureRequest) -> MPI.Comm:
    """A communicator whose ranks meet in the node's exchange area (WORLD), or one without it (counts by MPI)."""
    if request.param == "area":
        yield WORLD
        return
    saved = os.environ.get("DMLMPI_EXCHANGE_BYTES")
    os.environ["DMLMPI_EXCHANGE_BYTES"] = "0"  # read when dmlmpi first meets a communicator
    plain = WORLD.Dup()
    comm.allreduce(np.zeros(1), comm=plain)  # dmlmpi meets it now, without an area
    if saved is None:
        del os.environ["DMLMPI_EXCHANGE_BYTES"]
    else:
        os.environ["DMLMPI_EXCHANGE_BYTES"] = saved
    from dmlmpi.comm.context import context
    assert context(plain).exchange is None
    yield plain
    plain.Free()


def blocks_of(x: np.ndarray, splits: list[int]) -> list[np.ndarray]:
    """x's rows cut into consecutive blocks of the given sizes."""
    at = np.cumsum([0] + splits)
    return [x[at[i]:at[i + 1]] for i in range(len(splits))]


def expected(x: np.ndarray, splits: list[int]) -> tuple[np.ndarray, list[int]]:
    """What alltoall must return, from MPI's pickled alltoall of the blocks."""
    got = WORLD.alltoall(blocks_of(np.ascontiguousarray(x), splits))
    return np.concatenate(got, axis=0), [len(b) for b in got]


def uneven_splits(rows_per_rank: int) -> list[int]:
    """This rank's seeded random split of about rows_per_rank rows per peer (zeros included)."""
    g = np.random.default_rng(100 + RANK)
    return [int(v) for v in g.integers(0, 2 * rows_per_rank + 1, size=SIZE)]


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64"])
def test_equal_blocks_numpy(algorithm: str, dtype: str, on: MPI.Comm) -> None:
    x = (np.arange(SIZE * 3 * 4).reshape(SIZE * 3, 4) + 1000 * RANK).astype(dtype)
    out = comm.alltoall(x, algorithm=algorithm, comm=on)
    want, _ = expected(x, [3] * SIZE)
    assert isinstance(out, np.ndarray) and out.dtype == x.dtype and out.shape == want.shape
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_uneven_splits_return_the_received_sizes(algorithm: str, rows: int, on: MPI.Comm) -> None:
    splits = uneven_splits(rows)
    g = np.random.default_rng(RANK)
    x = g.normal(size=(sum(splits), 2, 3))  # rows of several dimensions
    out, received = comm.alltoall(x, splits=splits, algorithm=algorithm, comm=on)
    want, want_sizes = expected(x, splits)
    assert received == want_sizes and out.shape == (sum(want_sizes), 2, 3)
    np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64])
def test_torch_tensors_keep_their_kind_and_dtype(algorithm: str, dtype: torch.dtype, on: MPI.Comm) -> None:
    splits = uneven_splits(2)
    x = (torch.arange(sum(splits) * 3).reshape(-1, 3) + 100 * RANK).to(dtype)
    out, received = comm.alltoall(x, splits=splits, algorithm=algorithm, comm=on)
    want, want_sizes = expected(x.float().numpy(), splits)
    assert isinstance(out, torch.Tensor) and out.dtype == dtype and received == want_sizes
    np.testing.assert_array_equal(out.float().numpy(), want)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_into_a_given_output(algorithm: str) -> None:
    splits = uneven_splits(2)
    x = torch.arange(sum(splits) * 2, dtype=torch.float32).reshape(-1, 2) + 100 * RANK
    want, want_sizes = expected(x.numpy(), splits)
    out = torch.full((len(want), 2), -1.0)
    got, received = comm.alltoall(x, splits=splits, algorithm=algorithm, out=out)
    assert got is out and received == want_sizes
    np.testing.assert_array_equal(out.numpy(), want)
    strided = torch.full((2, len(want)), -1.0).T  # a non-contiguous out is written through
    comm.alltoall(x, splits=splits, algorithm=algorithm, out=strided)
    np.testing.assert_array_equal(strided.numpy(), want)


def test_an_output_that_does_not_fit_fails_its_rank_after_the_exchange() -> None:
    x = np.full((2 * SIZE, 3), float(RANK))
    wrong = RANK == 0
    out = np.empty((2 * SIZE + 1 if wrong else 2 * SIZE, 3))
    if wrong:
        with pytest.raises(ValueError, match=rf"out is a numpy float64 array of shape \({2 * SIZE + 1}, 3\), but "
                                             rf"\({2 * SIZE}, 3\) of float64 arrived"):
            comm.alltoall(x, out=out)
    else:
        assert comm.alltoall(x, out=out) is out  # the other ranks got theirs, nobody waits
        np.testing.assert_array_equal(out[:, 0], np.repeat(np.arange(SIZE), 2))
    np.testing.assert_array_equal(comm.alltoall(x)[:, 0], np.repeat(np.arange(SIZE), 2))


def test_non_contiguous_input_is_sent_by_rows() -> None:
    base = np.arange(5 * SIZE * 2, dtype=np.float64).reshape(5, SIZE * 2) + 100 * RANK
    x = base.T  # SIZE*2 rows of 5, not contiguous
    assert not x.flags.c_contiguous
    np.testing.assert_array_equal(comm.alltoall(x), expected(x, [2] * SIZE)[0])


def test_fewer_rows_than_ranks() -> None:
    splits = [1 if i == (RANK + 1) % SIZE else 0 for i in range(SIZE)]  # one row, to the next rank
    out, received = comm.alltoall(np.array([[RANK, RANK]]), splits=splits)
    source = (RANK - 1) % SIZE
    assert received == [1 if i == source else 0 for i in range(SIZE)]
    np.testing.assert_array_equal(out, [[source, source]])


def test_bad_splits_on_one_rank_fail_every_rank(on: MPI.Comm) -> None:
    bad = SIZE - 1
    x = np.zeros((2 * SIZE, 2))
    splits = [2] * SIZE
    if RANK == bad:
        splits[0] += 1  # one row more than x has
    with pytest.raises(ValueError) as info:
        comm.alltoall(x, splits=splits, comm=on)
    text = str(info.value)
    if RANK == bad:
        assert f"add up to {2 * SIZE + 1}, but dimension 0 has {2 * SIZE} rows" in text
    else:
        assert f"rank(s) [{bad}] passed splits that do not fit" in text
    # and the communicator still works afterwards
    np.testing.assert_array_equal(comm.alltoall(np.full((SIZE, 1), RANK), comm=on), np.arange(SIZE).reshape(SIZE, 1))


def test_rows_that_do_not_split_equally_are_refused_everywhere() -> None:
    if SIZE == 1:
        pytest.skip("any number of rows splits into one block")
    rows = SIZE + (1 if RANK == 0 else 0)
    with pytest.raises(ValueError, match="do not split into|passed splits"):
        comm.alltoall(np.zeros((rows, 1)))


@pytest.mark.skipif(SIZE < 2, reason="a mismatch needs two ranks")
@pytest.mark.parametrize("case", ["row width", "dtype", "algorithm"])
def test_guard_names_what_differs(case: str, on: MPI.Comm) -> None:
    width, dtype, algorithm = 3, np.float32, "mpi"
    if RANK == 1:
        width, dtype, algorithm = {"row width": (4, dtype, algorithm), "dtype": (width, np.float64, algorithm),
                                   "algorithm": (width, dtype, "pairwise")}[case]
    with pytest.raises(comm.CollectiveMismatchError) as info:
        comm.alltoall(np.zeros((SIZE, width), dtype), algorithm=algorithm, comm=on)
    text = str(info.value)
    field = {"row width": "length: ", "dtype": "dtype: ", "algorithm": "algorithm: "}[case]
    assert field in text and "alltoall" in text, text


@pytest.mark.skipif(SIZE < 2, reason="a mismatch needs two ranks")
def test_guard_catches_another_collective(on: MPI.Comm) -> None:
    with pytest.raises(comm.CollectiveMismatchError, match="collective: "):
        if RANK == 0:
            comm.alltoall(np.zeros((SIZE, 2)), comm=on)
        else:
            comm.allreduce(np.zeros(8), comm=on)
    np.testing.assert_array_equal(comm.alltoall(np.full((SIZE, 1), RANK), comm=on), np.arange(SIZE).reshape(SIZE, 1))


def test_blocks_too_large_for_the_area_on_one_rank_send_everything_by_mpi() -> None:
    # one rank's rows exceed the exchange area's row: every rank sees it in the posted counts and
    # the blocks go by MPI; the next (small) call uses the area again
    rows = 200_000 if RANK == 0 else 3  # 200000 rows of 8 bytes: more than any area row here
    splits = [rows // SIZE + (i < rows % SIZE) for i in range(SIZE)]
    x = np.arange(rows, dtype=np.float64) + 1e6 * RANK
    for _ in range(2):
        out, received = comm.alltoall(x, splits=splits)
        want, want_sizes = expected(x, splits)
        assert received == want_sizes
        np.testing.assert_array_equal(out, want)
        small = comm.alltoall(np.full(SIZE, float(RANK)))
        np.testing.assert_array_equal(small, np.arange(SIZE, dtype=np.float64))


@pytest.mark.skipif(SIZE < 2, reason="one rank has no area")
def test_auto_sends_small_blocks_through_the_area(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlmpi.comm import exchange

    taken = []
    real = exchange.take_blocks
    monkeypatch.setattr(exchange, "take_blocks", lambda *a: (taken.append(1), real(*a))[1])
    x = np.full((SIZE, 4), float(RANK))
    for algorithm, large, through_area in [("auto", False, True), ("mpi", False, False), ("pairwise", False, False),
                                           ("auto", True, False)]:
        taken.clear()
        y = np.repeat(x, 20_000, axis=0) if large else x  # 20000 x 4 x 8 B per rank: above the crossover
        out = comm.alltoall(y, algorithm=algorithm)
        np.testing.assert_array_equal(out, expected(y, [len(y) // SIZE] * SIZE)[0])
        assert bool(taken) == through_area, (algorithm, large)


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="unknown algorithm 'ring'"):
        comm.alltoall(np.zeros((SIZE, 1)), algorithm="ring")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("direct", ["0", "1"])
def test_cuda_tensors_staged_or_direct(direct: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlmpi.comm import buffers

    monkeypatch.setenv("DMLMPI_CUDA_AWARE", direct)
    buffers.cuda_aware.cache_clear()
    if direct == "1" and not buffers._mpi_reports_cuda():
        pytest.skip("this MPI is not CUDA-aware")
    splits = uneven_splits(3)
    x = torch.arange(sum(splits) * 2, device="cuda", dtype=torch.float32).reshape(-1, 2) + 1000 * RANK
    out, received = comm.alltoall(x, splits=splits)
    want, want_sizes = expected(x.cpu().numpy(), splits)
    assert out.is_cuda and received == want_sizes
    np.testing.assert_array_equal(out.cpu().numpy(), want)
    buffers.cuda_aware.cache_clear()


def test_pairwise_steps_meet_every_peer_once() -> None:
    for n in range(1, 9):
        plans = [pairwise_steps(n, r) for r in range(n)]
        for r, steps in enumerate(plans):
            assert sorted(to for to, _ in steps) == [p for p in range(n) if p != r]
            assert sorted(src for _, src in steps) == [p for p in range(n) if p != r]
        for k in range(n - 1):  # at each step, whoever r sends to receives from r
            for r in range(n):
                to = plans[r][k][0]
                assert plans[to][k][1] == r


def test_displacements_and_split_checks() -> None:
    assert displacements([3, 0, 2]) == [0, 3, 3] and displacements([]) == []
    assert check_splits(None, 6, 3) == ([2, 2, 2], None)
    assert check_splits([1, 2], 3, 2) == ([1, 2], None)
    assert "do not split into 4 equal blocks" in check_splits(None, 6, 4)[1]
    assert "2 entries for a 3-rank" in check_splits([1, 2], 3, 3)[1]
    assert "negative" in check_splits([-1, 4], 3, 2)[1]
    assert check_splits([-1, 4], 3, 2)[0] == [-1, -1]
