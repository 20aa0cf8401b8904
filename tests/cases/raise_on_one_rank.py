"""Entry point for test_entry: one rank raises while the others wait in a collective."""
import sys

import numpy as np
from mpi4py import MPI

from dmlmpi import comm
from dmlmpi.entry import run_main


def main() -> int:
    """Rank given on the command line raises; the rest block in an all-reduce that can never finish."""
    bad = int(sys.argv[1])
    if MPI.COMM_WORLD.Get_rank() == bad:
        raise RuntimeError("deliberate failure for the test")
    comm.allreduce(np.ones(4))
    return 0


if __name__ == "__main__":
    run_main(main)
