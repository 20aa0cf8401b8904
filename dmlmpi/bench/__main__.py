"""Dispatch `python -m dmlmpi.bench KIND [options]` to the benchmark module of that kind."""
from __future__ import annotations

import importlib
import sys

from dmlmpi.entry import run_main

KINDS = {"allreduce": "dmlmpi.bench.allreduce", "dp": "dmlmpi.bench.dp", "ps": "dmlmpi.bench.ps",
         "pipeline": "dmlmpi.bench.pipeline", "fl": "dmlmpi.bench.fl", "fedavg": "dmlmpi.bench.fedavg",
         "callcost": "dmlmpi.bench.callcost", "broadcast": "dmlmpi.bench.broadcast",
         "checkpoint": "dmlmpi.bench.checkpoint", "fairness": "dmlmpi.bench.fairness",
         "alltoall": "dmlmpi.bench.alltoall", "moe": "dmlmpi.bench.moe"}


def main() -> int:
    """Run the benchmark named by the first argument."""
    if len(sys.argv) < 2 or sys.argv[1] not in KINDS:
        print(f"usage: python -m dmlmpi.bench {{{','.join(KINDS)}}} [options]   (--help after the kind)")
        return 2 if len(sys.argv) >= 2 and sys.argv[1] not in ("-h", "--help") else 0
    module = importlib.import_module(KINDS[sys.argv[1]])
    return module.main(sys.argv[2:])


if __name__ == "__main__":
    run_main(main)
