"""Entry point for test_telemetry: RunLog + Timeline on every rank of a real MPI job.

`python telemetry_case.py OUT_DIR`: a few spans per rank (compute, a real all-reduce as comm, an
instant), metrics from rank 0, then OUT_DIR/trace.json. An unwritable OUT_DIR must stop every rank.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from dmlmpi.entry import run_main
from dmlmpi.telemetry import RunLog, Timeline


def main() -> int:
    """Record, log and write; any rank's exception aborts the job (run_main)."""
    world = MPI.COMM_WORLD
    log = RunLog(sys.argv[1], world, verbose=True)  # collective: raises on every rank if unwritable
    log.write_config({"world_size": world.Get_size()})
    tl = Timeline(world)
    for step in range(3):
        with tl.span(f"step {step}", cat="step"):
            with tl.span("forward", cat="compute", args={"step": step}):
                time.sleep(0.002 * (world.Get_rank() + 1))
            with tl.span("allreduce bucket 0", cat="comm", args={"bytes": 32}):
                # every rank contributes one value; a real collective inside a comm span
                total = world.allreduce(np.float64(step))
        log.log({"step": step + 1, "loss": 1.0 / (step + 1)})
    tl.instant("done")
    log.info(f"sum {total}")
    tl.write(log.path("trace.json"))
    log.write_summary({"steps": 3})
    log.close()
    return 0


if __name__ == "__main__":
    run_main(main)
