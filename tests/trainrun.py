"""What the end-to-end training tests share: launching `python -m dmlmpi.train` and reading its run directory."""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

from dmlmpi.testing import run_mpi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(nprocs: int, out: Any, args: Sequence[str], timeout: float) -> Any:
    """Run python -m dmlmpi.train on nprocs ranks with `args` into run directory `out`; the finished process."""
    return run_mpi(nprocs, ["-m", "dmlmpi.train", *args, "--out", str(out)], timeout=timeout, cwd=ROOT)


def records(out: Any) -> list[dict[str, Any]]:
    """Every line of the run's metrics.jsonl."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out: Any) -> dict[int, float]:
    """step -> logged training loss."""
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}
