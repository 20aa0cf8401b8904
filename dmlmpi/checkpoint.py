"""Atomic checkpoints: a run stopped at any moment resumes from its last complete checkpoint.

Rank 0 writes `ckpt-<step>.pt` through a temporary file in the same directory, fsyncs it and renames
it into place (a rename within one file system is atomic), then points `latest` at it the same way.
A crash mid-write leaves at most a stray temporary file; the previous checkpoint stays intact.

A sharded checkpoint (ZeRO: `save_sharded`) is a directory `ckpt-<step>/`: every rank writes its
own pieces of the parameters and optimizer state to `shard-<rank>.pt` (nobody gathers the whole
model), rank 0 writes the rest to `meta.pt`. All of it is written into `ckpt-<step>.partial/`,
which rank 0 renames to `ckpt-<step>` only once every rank's file is on disk; `latest` then
points at it. A resume reads `meta.pt` on rank 0 and hands every rank a `ShardReader`, from which
each rank reads just the ranges it holds now, at any world size.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Any

import torch
from mpi4py import MPI

LATEST = "latest"
_NAME = re.compile(r"^ckpt-(\d+)(\.pt)?$")  # a file, or a sharded checkpoint's directory
_PARTIAL = re.compile(r"^ckpt-\d+\.partial$")  # a sharded checkpoint whose save did not complete
META = "meta.pt"


def owned(name: str) -> bool:
    """Whether an entry of a run directory belongs to its checkpoints (complete or not)."""
    return bool(_NAME.match(name) or _PARTIAL.match(name))


def remove(path: str) -> None:
    """Remove a checkpoint file or directory."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def shard_name(rank: int) -> str:
    """The file of rank's pieces in a sharded checkpoint."""
    return f"shard-{rank}.pt"


def _fsync_dir(path: str) -> None:
    """Make the entries of a directory (renames into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    _fsync_dir(os.path.dirname(os.path.abspath(path)))  # make the rename itself durable


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
        _prune(run_dir, keep)
    # nobody goes on (or exits) before the checkpoint is complete on disk
    comm.Barrier()
    return path


def _prune(run_dir: str, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints (files or directories)."""
    for old in checkpoints(run_dir)[:-keep]:
        for path in (os.path.join(run_dir, f"ckpt-{old}.pt"), os.path.join(run_dir, f"ckpt-{old}")):
            remove(path)


def _agree(error: str | None, comm: MPI.Comm, what: str) -> None:
    """Raise on every rank if any rank reports an error (collective), naming the ranks."""
    errors = comm.allgather(error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    if failed:
        raise RuntimeError(f"{what} failed on {len(failed)} rank(s): " + "; ".join(failed))


def _from_root(error: str | None, comm: MPI.Comm, what: str) -> None:
    """Raise on every rank if rank 0 reports an error (collective)."""
    error = comm.bcast(error, root=0)
    if error is not None:
        raise RuntimeError(f"{what} failed on rank 0: {error}")


def save_sharded(run_dir: str, step: int, state: dict[str, Any], shard: dict[str, Any], comm: MPI.Comm,
                 keep: int = 2) -> str | None:
    """Collectively save a sharded checkpoint: `state` (the same on all ranks) by rank 0, each rank's `shard` by itself.

    `shard` holds `ranges` ((start, stop) pairs) and tensors over them (ShardOptimizer.shard_state()).
    """
    rank = comm.Get_rank()
    final = os.path.join(run_dir, f"ckpt-{step}")
    partial = final + ".partial"
    error = None
    if rank == 0:
        try:  # a stale partial directory is an earlier save that never completed
            os.makedirs(run_dir, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        except OSError as exc:
            error = f"cannot make {partial}: {exc}"
    # every rank learns whether the directory is there before writing into it
    _from_root(error, comm, f"saving checkpoint {final}")
    error = None
    try:
        _write_atomic(os.path.join(partial, shard_name(rank)), lambda f: torch.save(shard, f))
    except OSError as exc:
        error = f"cannot write {shard_name(rank)}: {exc}"
    # every rank's file is on disk (or some rank says why not) before the checkpoint is made whole
    # gather: every rank's RNG state and ranges to rank 0, for meta.pt
    mine = comm.gather((rng_state(), list(shard["ranges"])), root=0)
    _agree(error, comm, f"saving checkpoint {final}")
    if rank == 0:
        try:
            meta = dict(state, step=step, rng=[m[0] for m in mine], world_size=comm.Get_size(),
                        shard_ranges=[m[1] for m in mine],
                        shard_keys=sorted(shard["state"]), shard_scalars=shard["scalars"],
                        param_groups=shard["param_groups"], total=shard["total"])
            _write_atomic(os.path.join(partial, META), lambda f: torch.save(meta, f))
            if os.path.exists(final):  # the same step saved before (a resumed run): replaced whole
                shutil.rmtree(final)
            os.replace(partial, final)  # atomic: the checkpoint appears complete or not at all
            _fsync_dir(run_dir)
            _write_atomic(os.path.join(run_dir, LATEST), lambda f: f.write(os.path.basename(final).encode()))
            _prune(run_dir, keep)
        except OSError as exc:
            error = f"cannot complete {final}: {exc}"
    # nobody goes on (or exits) before the checkpoint is complete on disk
    _from_root(error, comm, f"saving checkpoint {final}")
    return final if rank == 0 else None


class ShardReader:
    """Reads ranges of a sharded checkpoint's vectors, opening (memory-mapped) only the rank files that hold them."""

    def __init__(self, path: str, ranges: list[list[tuple[int, int]]]) -> None:
        self.path = path
        # every saved piece: (start, stop, the rank whose file holds it, its offset in that file's vectors)
        self._pieces: list[tuple[int, int, int, int]] = []
        for rank, own in enumerate(ranges):
            at = 0
            for start, stop in own:
                self._pieces.append((start, stop, rank, at))
                at += stop - start
        self._pieces.sort()
        self._files: dict[int, dict[str, Any]] = {}

    def _file(self, rank: int) -> dict[str, Any]:
        """Rank's file, memory-mapped: only the pages read are loaded."""
        if rank not in self._files:
            name = os.path.join(self.path, shard_name(rank))
            try:
                self._files[rank] = torch.load(name, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001 - named with the file
                raise RuntimeError(f"cannot read checkpoint shard {name}: {type(exc).__name__}: {exc}") from exc
        return self._files[rank]

    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the saved vector `key` ("param" or a state key such as "exp_avg")."""
        parts, at = [], start
        for lo, hi, rank, offset in self._pieces:
            if hi <= at or lo >= stop:
                continue
            if lo > at:
                break
            end = min(hi, stop)
            data = self._file(rank)
            values = data["param"] if key == "param" else data["state"][key]
            parts.append(values[offset + at - lo:offset + end - lo])
            at = end
            if at == stop:
                break
        if at != stop:
            raise RuntimeError(f"checkpoint {self.path}: elements {at} to {stop} of {key!r} are in no rank's file")
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()


def checkpoints(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in run_dir, ascending (a `.partial` directory is not one)."""
    if not os.path.isdir(run_dir):
        return []
    return sorted({int(m.group(1)) for name in os.listdir(run_dir) if (m := _NAME.match(name))})


def latest_path(run_dir: str) -> str | None:
    """The checkpoint `latest` points to (else the highest step present), or None."""
    pointer = os.path.join(run_dir, LATEST)
    if os.path.exists(pointer):
        with open(pointer) as f:
            candidate = os.path.join(run_dir, f.read().strip())
        if os.path.exists(candidate):
            return candidate
    steps = checkpoints(run_dir)
    if not steps:
        return None
    path = os.path.join(run_dir, f"ckpt-{steps[-1]}")
    return path if os.path.isdir(path) else path + ".pt"


def load(path: str, comm: MPI.Comm) -> dict[str, Any]:
    """Read a checkpoint on rank 0 and broadcast it; restore this rank's RNG state when sizes match.

    Of a sharded checkpoint rank 0 reads `meta.pt`; state["shards"] is then a ShardReader on every rank.
    """
    state, error = None, None
    sharded = os.path.isdir(path)
    if comm.Get_rank() == 0:
        try:
            state = torch.load(os.path.join(path, META) if sharded else path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a dmlmpi checkpoint")
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            error = f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}"
    # every rank learns whether rank 0 could read it, so a bad file fails everywhere at once
    error = comm.bcast(error, root=0)
    if error is not None:
        raise RuntimeError(error)
    state = comm.bcast(state, root=0)
    if sharded:
        state["shards"] = ShardReader(path, state["shard_ranges"])
    if state.get("world_size") == comm.Get_size():
        set_rng_state(state["rng"][comm.Get_rank()])
    return state
