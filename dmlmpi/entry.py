"""Entry points that end the whole MPI job when any rank fails.

An exception on one rank would otherwise leave the others blocked forever in their next collective.
`run_main` catches it, says which rank raised what, and calls MPI_Abort, which makes the launcher
kill every rank and exit non-zero (the behaviour of `python -m mpi4py`, with a clearer message).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, Callable, NoReturn

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


class EveryRankExits(RuntimeError):
    """Raised alike on every live rank (e.g. after an elastic recovery finds the job cannot go on).

    Each rank then exits by itself instead of calling MPI_Abort: once a process has died under ULFM,
    Open MPI 5.0's launcher can hang in an abort (seen here), while ranks that exit end the job.
    """


# how long a failing rank waits for the others to fail too before it aborts them (see abort_job)
FAREWELL_S = 2.0


def abort_job(message: str, code: int = ABORT_EXIT_CODE, farewell: Any = None) -> NoReturn:
    """Print `message` (prefixed with this rank) to stderr and abort every rank of the job.

    `farewell`: a communicator of the whole job kept for this. Bad options or a bad file fail on every
    rank at about the same moment; waiting (at most FAREWELL_S) in a barrier on it lets each of them
    say so before the first abort kills the rest. A rank failing alone waits that long, then aborts.
    """
    rank, size = _rank_and_size()
    sys.stderr.write(f"dmlmpi: rank {rank} of {size}: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    from mpi4py import MPI

    if size > 1 and MPI.Is_initialized() and not MPI.Is_finalized():
        if farewell is not None:
            try:
                # a barrier with a deadline: complete when every rank is failing too
                request, deadline = farewell.Ibarrier(), time.monotonic() + FAREWELL_S
                while not request.Test() and time.monotonic() < deadline:
                    time.sleep(0.01)  # yield the core: the other ranks may need it to reach here
            except Exception:  # noqa: BLE001 - e.g. a dead rank (ULFM): abort anyway
                pass
        MPI.COMM_WORLD.Abort(code)  # the launcher now kills the other ranks
    os._exit(code)


def run_main(main: Callable[[], int | None]) -> NoReturn:
    """Run `main()`, exit with its status; any exception on any rank aborts the whole job."""
    from mpi4py import MPI

    # a private channel for abort_job's farewell barrier (collective: every rank calls run_main first)
    farewell = MPI.COMM_WORLD.Dup() if MPI.COMM_WORLD.Get_size() > 1 else None
    try:
        status = main()
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if status != 0:
            # e.g. argparse rejected an option: same on every rank, but abort so no rank waits
            abort_job(f"exited with status {status}", status, farewell)
    except BaseException as exc:  # noqa: BLE001 - anything at all must end the job
        detail = "".join(traceback.format_exception(exc))
        from dmlmpi.elastic import is_failure

        ft = bool(os.environ.get("OMPI_MCA_mpi_ft_enable"))
        if isinstance(exc, EveryRankExits) or (ft and is_failure(exc, MPI.COMM_WORLD)):
            # a process died under ULFM (or every rank knows the job is over): exit without MPI_Abort;
            # a rank blocked on this one gets a process-failure error in turn and exits the same way
            sys.stderr.write(f"dmlmpi: rank {_rank_and_size()[0]}: {exc}\n{detail}")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(ABORT_EXIT_CODE)
        abort_job(f"raised {type(exc).__name__}: {exc}\n{detail}", farewell=farewell)
    if _a_process_died():
        # the survivors of a failure (--elastic) finished: MPI_Finalize's job-wide fence can wait forever
        # on the dead process (seen here in about 1 run in 5 of a 4-rank federated run that lost a rank),
        # while ranks that exit without it end the job normally under ULFM
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    sys.exit(status or 0)


def _a_process_died() -> bool:
    """Whether this is a fault-tolerant (ULFM) run in which some process of the job has died."""
    from mpi4py import MPI

    if not os.environ.get("OMPI_MCA_mpi_ft_enable") or not MPI.Is_initialized() or MPI.Is_finalized():
        return False
    from dmlmpi.elastic import knows_failed

    return knows_failed(MPI.COMM_WORLD)  # the failed processes this one knows of (any communicator)
