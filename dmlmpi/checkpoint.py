"""Atomic checkpoints: a run stopped at any moment resumes from its last complete checkpoint.

Rank 0 writes `ckpt-<step>.pt` through a temporary file in the same directory, fsyncs it and renames
it into place (a rename within one file system is atomic), then points `latest` at it the same way.
A crash mid-write leaves at most a stray temporary file; the previous checkpoint stays intact.
"""
from __future__ import annotations

import os
import re
from typing import Any

import torch
from mpi4py import MPI

LATEST = "latest"
_NAME = re.compile(r"^ckpt-(\d+)\.pt$")


def _write_atomic(path: str, write: Any) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, and rename it to `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    # make the rename itself durable
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch, numpy, Python)."""
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(run_dir: str, step: int, state: dict[str, Any], comm: MPI.Comm, keep: int = 2) -> str | None:
    """Collectively save `state` (identical on all ranks) plus every rank's RNG state; rank 0 writes."""
    # gather each rank's RNG states so that a resumed run draws the same numbers on every rank
    rngs = comm.gather(rng_state(), root=0)
    path = None
    if comm.Get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, f"ckpt-{step}.pt")
        _write_atomic(path, lambda f: torch.save(dict(state, step=step, rng=rngs, world_size=comm.Get_size()), f))
        _write_atomic(os.path.join(run_dir, LATEST), lambda f: f.write(os.path.basename(path).encode()))
        for old in sorted(checkpoints(run_dir))[:-keep]:
            os.remove(os.path.join(run_dir, f"ckpt-{old}.pt"))
    # nobody goes on (or exits) before the checkpoint is complete on disk
    comm.Barrier()
    return path


def checkpoints(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in run_dir, ascending."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(run_dir) if (m := _NAME.match(name)))


def latest_path(run_dir: str) -> str | None:
    """The checkpoint `latest` points to (else the highest step present), or None."""
    pointer = os.path.join(run_dir, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            candidate = os.path.join(run_dir, f.read().strip())
        if os.path.exists(candidate):
            return candidate
    steps = checkpoints(run_dir)
    return os.path.join(run_dir, f"ckpt-{steps[-1]}.pt") if steps else None


def load(path: str, comm: MPI.Comm) -> dict[str, Any]:
    """Read a checkpoint on rank 0 and broadcast it; restore this rank's RNG state when sizes match."""
    state, error = None, None
    if comm.Get_rank() == 0:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a dmlmpi checkpoint")
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}"
    # every rank learns whether rank 0 could read it, so a bad file fails everywhere at once
    error = comm.bcast(error, root=0)
    if error is not None:
        raise RuntimeError(error)
    state = comm.bcast(state, root=0)
    if state.get("world_size") == comm.Get_size():
        set_rng_state(state["rng"][comm.Get_rank()])
    return state
