"""Deadlocking cases for tests/test_testing_plugin.py (select one with -k)."""
import ctypes

from mpi4py import MPI


def _stuck_on(rank):
    comm = MPI.COMM_WORLD
    if comm.Get_rank() == rank:
        comm.Recv(bytearray(1), source=MPI.ANY_SOURCE, tag=999)  # no one ever sends this


def test_rank_1_stuck():
    _stuck_on(1)


def test_rank_0_stuck():
    _stuck_on(0)


def test_rank_1_holds_gil():
    # A C call that keeps the GIL: rank 1's watchdog cannot run, so rank 0's exchange deadline names it.
    if MPI.COMM_WORLD.Get_rank() == 1:
        ctypes.PyDLL(None).sleep(60)
