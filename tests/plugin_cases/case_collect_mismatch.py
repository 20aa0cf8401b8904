"""A module that collects one more test on rank 1 than elsewhere (for tests/test_testing_plugin.py)."""
from mpi4py import MPI


def test_everywhere():
    pass


if MPI.COMM_WORLD.Get_rank() == 1:

    def test_only_on_rank_1():
        pass
