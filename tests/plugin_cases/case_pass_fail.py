"""Cases for tests/test_testing_plugin.py, run under mpiexec by it (not collected on their own)."""
import pytest
from mpi4py import MPI

RANK, SIZE = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def test_passes():
    assert MPI.COMM_WORLD.allreduce(1) == SIZE  # a collective: all ranks are in the same test


def test_fails_on_last_rank():
    assert RANK != SIZE - 1, f"deliberate failure on the last rank ({RANK})"


def test_skipped_everywhere():
    pytest.skip("deliberately skipped on every rank")


def test_skipped_on_rank_0_only():
    if RANK == 0:
        pytest.skip("skipped on rank 0 only")  # passes elsewhere: counts as passed when SIZE > 1


@pytest.fixture
def broken_on_rank_1():
    if RANK == 1:
        raise RuntimeError("deliberate fixture error on rank 1")
    return RANK


def test_fixture_error_on_rank_1(broken_on_rank_1):
    assert broken_on_rank_1 != 1
