"""--elastic: training that goes on when a rank dies, on Open MPI's ULFM (User-Level Failure Mitigation).

Under `mpirun --with-ft ulfm` a dead process does not end the job: an MPI call that involves it
returns MPI_ERR_PROC_FAILED (mpi4py raises MPI.Exception; communicators return errors, the mpi4py
default). What the survivors then do, here:

1. **Revoke** every communicator the training uses (the training one and the private duplicates
   dmlmpi.comm made of it). A survivor blocked on another *live* rank would otherwise wait forever
   for a peer that has gone off to recover; a revoked communicator makes every pending and future
   call on it fail with MPI_ERR_REVOKED, so all survivors reach recovery.
2. **Shrink** it to the survivors (MPI_Comm_shrink, collective among them).
3. **Agree** on a consistent state: each survivor says how many steps it completed. They differ by
   at most one (a rank may have received the whole average of step k just before the death, while
   another was still waiting for its piece); a completed step is a correct one (its average holds
   every rank's gradient), so the survivor furthest along is the source of truth and broadcasts.
   No per-step snapshot is needed: MPI calls only happen before a step's optimizer update, so a
   rank that failed mid-step still holds the state of its last completed step.

The caller then rebuilds its trainer on the new communicator, re-shards the data over the survivors
and goes on. The pure parts (error classification, choosing the source) are testable without MPI.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from mpi4py import MPI

from dmlmpi.comm.context import existing_comms
from dmlmpi.entry import EveryRankExits

# the error classes that mean "a process died" (directly, or via a revoked communicator)
FAILURE_CLASSES = frozenset({MPI.ERR_PROC_FAILED, MPI.ERR_PROC_FAILED_PENDING, MPI.ERR_REVOKED})


class CannotContinue(EveryRankExits):
    """The survivors agree the run cannot go on (a rank that held unique state died)."""


class ElasticUnavailable(RuntimeError):
    """--elastic was asked for, but this MPI run cannot survive a failure."""


def check_available(environ: dict[str, str] | None = None) -> None:
    """Raise ElasticUnavailable unless this is Open MPI with fault tolerance enabled for the job."""
    env = os.environ if environ is None else environ
    library = MPI.Get_library_version()
    if "Open MPI" not in library:
        raise ElasticUnavailable(f"--elastic needs Open MPI 5 with ULFM; this MPI is {library.splitlines()[0]}")
    if env.get("OMPI_MCA_mpi_ft_enable", "").lower() not in ("1", "true", "yes", "on"):
        raise ElasticUnavailable("--elastic needs fault tolerance enabled at launch: "
                                 "mpirun --with-ft ulfm -n N python -m dmlmpi.train --elastic ... "
                                 "(without it a dead rank ends or hangs the job)")


def is_failure(exc: BaseException | None, comm: MPI.Comm | None = None, patience: float = 10.0) -> bool:
    """Whether `exc` (or an exception it was raised from or during) is an MPI process-failure error.

    With `comm`, another MPI error counts too if, within `patience` seconds, this rank learns of a
    failed process in `comm` or finds it revoked by a survivor: Open MPI 5's barrier under ULFM reports
    a peer that dies mid-schedule as MPI_ERR_OTHER on some ranks (measured: rank 0 of 4, every time),
    and that rank may hear of the death only through the revocation.
    """
    seen: set[int] = set()
    mpi_error = False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MPI.Exception):
            if exc.Get_error_class() in FAILURE_CLASSES:
                return True
            mpi_error = True
        exc = exc.__cause__ or exc.__context__
    return mpi_error and comm is not None and _hears_of_failure(comm, patience)


def _hears_of_failure(comm: MPI.Comm, patience: float) -> bool:
    """Whether, within `patience` seconds, `comm` has a known failed process or is revoked."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if knows_failed(comm) or comm.Is_revoked():
                return True
            # a probe drives MPI's progress engine, which delivers failure news and revocations
            comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
        except MPI.Exception as exc:
            return exc.Get_error_class() in FAILURE_CLASSES
        except NotImplementedError:  # not a ULFM build: no failure can be told apart
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)  # yield the core to the ranks that are still running


def knows_failed(comm: MPI.Comm) -> bool:
    """Whether this rank knows of a failed process in `comm` (local; works on a revoked communicator)."""
    try:
        group = comm.Get_failed()
    except (MPI.Exception, NotImplementedError):  # not a ULFM build, or fault tolerance not enabled
        return False
    try:
        return group.Get_size() > 0
    finally:
        group.Free()


def furthest(progress: list[int]) -> int:
    """Index of the survivor that completed the most steps (the lowest such index on ties)."""
    if not progress:
        raise ValueError("no survivors")
    best = max(progress)
    return progress.index(best)


@dataclass
class Recovery:
    """What one recovery found: the survivors' communicator and who is gone."""

    comm: MPI.Comm  # the survivors, ranked in their old order
    dead: list[int]  # world ranks lost in this failure
    source: int  # rank in `comm` whose state everyone takes
    progress: int  # steps (or rounds) completed by the source
    seconds: float = 0.0  # from the first revoke to the agreed source
    members: list[int] = field(default_factory=list)  # world ranks of comm, by rank in comm


def world_ranks(comm: MPI.Comm) -> list[int]:
    """The COMM_WORLD rank of each rank of `comm` (a local lookup: works on a revoked communicator)."""
    group, world_group = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return list(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world_group))
    finally:
        group.Free()
        world_group.Free()


def revoke(comm: MPI.Comm, extra: list[MPI.Comm] | None = None) -> None:
    """Revoke `comm`, the communicators dmlmpi.comm made from it, and `extra` (already revoked is fine)."""
    for c in [comm, *existing_comms(comm), *(extra or [])]:
        if c == MPI.COMM_NULL:
            continue
        try:
            c.Revoke()
        except MPI.Exception:
            pass  # revoked by another survivor first: that is the point


def recover(comm: MPI.Comm, progress: int, extra: list[MPI.Comm] | None = None) -> Recovery:
    """Collective among the survivors of `comm`: revoke, shrink, and find the survivor furthest along."""
    t0 = time.perf_counter()
    before = world_ranks(comm)
    revoke(comm, extra)
    while True:
        survivors = comm.Shrink()  # collective over the live ranks of comm, in their old order
        try:
            # allgather: every survivor's world rank and completed steps
            table = survivors.allgather((MPI.COMM_WORLD.Get_rank(), progress))
            break
        except MPI.Exception as exc:  # another rank died during recovery: shrink again
            if not is_failure(exc, survivors):
                raise
            revoke(survivors)
            comm = survivors
    members = [w for w, _ in table]
    source = furthest([p for _, p in table])
    return Recovery(survivors, sorted(set(before) - set(members)), source, table[source][1],
                    time.perf_counter() - t0, members)
