"""Entry points that end the whole MPI job when any rank fails.

An exception on one rank would otherwise leave the others blocked forever in their next collective.
`run_main` catches it, says which rank raised what, and calls MPI_Abort, which makes the launcher
kill every rank and exit non-zero (the behaviour of `python -m mpi4py`, with a clearer message).
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, NoReturn

ABORT_EXIT_CODE = 1


def _rank_and_size() -> tuple[int, int]:
    """This process's world rank and size, without initialising MPI if it is not yet up."""
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()
    for rank_var, size_var in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ.get(size_var, "1"))
    return 0, 1


def abort_job(message: str, code: int = ABORT_EXIT_CODE) -> NoReturn:
    """Print `message` (prefixed with this rank) to stderr and abort every rank of the job."""
    rank, size = _rank_and_size()
    sys.stderr.write(f"dmlmpi: rank {rank} of {size}: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    from mpi4py import MPI

    if size > 1 and MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Abort(code)  # the launcher now kills the other ranks
    os._exit(code)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run `main()`, exit with its status; any exception on any rank aborts the whole job."""
    try:
        status = main()
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if status != 0:
            # e.g. argparse rejected an option: same on every rank, but abort so no rank waits
            abort_job(f"exited with status {status}", status)
    except BaseException as exc:  # noqa: BLE001 - anything at all must end the job
        detail = "".join(traceback.format_exception(exc))
        abort_job(f"raised {type(exc).__name__}: {exc}\n{detail}")
    sys.exit(status or 0)
