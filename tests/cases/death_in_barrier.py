"""Entry point for test_elastic: world rank 1 dies while the others wait in a barrier; they recover."""
import os
import signal
import time

from mpi4py import MPI

from dmlmpi import elastic


def main() -> None:
    """Survivors print how their barrier failed, whether it counts as a failure, and who recovery found."""
    world = MPI.COMM_WORLD
    world.gather(world.Get_rank(), root=0)  # everyone is up before the death
    if world.Get_rank() == 1:
        time.sleep(0.3)  # the others are inside the barrier's schedule by now
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        world.Barrier()
        print(f"rank {world.Get_rank()}: barrier completed", flush=True)
        return
    except MPI.Exception as exc:
        seen = exc.Get_error_class()
        counted = elastic.is_failure(exc, world)
    rec = elastic.recover(world, progress=world.Get_rank())
    print(f"rank {world.Get_rank()}: class {seen} failure {counted} dead {rec.dead} members {rec.members}", flush=True)
    rec.comm.Barrier()  # the survivors' communicator works
    os._exit(0)  # MPI_Finalize's job-wide fence can wait on the dead process


if __name__ == "__main__":
    main()
