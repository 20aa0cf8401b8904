"""`python -m dmlmpi.bench alltoall`: dmlmpi's all-to-all against native MPI_Alltoall and gloo, same run.

Run under mpirun. Each rank sends SIZE bytes of float32 in total, an equal block to every rank
(itself included), as nccl-tests' alltoall_perf does. Rows: `dmlmpi.comm.alltoall` with each
algorithm (`mpi`: MPI_Alltoallv, `pairwise`: n-1 MPI_Sendrecv steps, `auto`: on one node, the
exchange area when the blocks fit, else MPI_Alltoallv), each with the guard in its default setting
and writing into the same output every call (`out=`), like the peers; `dmlmpi-auto-new`, `auto`
returning new memory each call (what `alltoall(x)` does); `native`, one raw MPI_Alltoall through
mpi4py on numpy buffers; then torch.distributed gloo's `all_to_all_single` into a kept output,
timed on its own after the others. The MPI rows are
timed in turn (`time_interleaved`), each figure the slowest rank's seconds per call. algbw =
SIZE / time; busbw = algbw x (n-1)/n (the share of the bytes that leaves the rank).
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI

from dmlmpi import comm as dcomm
from dmlmpi.comm.personalized import ALGORITHMS

from .common import (close_gloo, format_table, human_bytes, init_gloo, parse_bytes, time_collective,
                     time_interleaved, write_json)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench alltoall", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="4K,64K,1M,16M,64M", help="bytes each rank sends in total (comma-separated)")
    p.add_argument("--samples", type=int, default=9, help="timed samples per row and size (median, min, max)")
    p.add_argument("--no-gloo", action="store_true", help="leave out the torch.distributed gloo row")
    p.add_argument("--json", help="write one record per (row, size) to this path")
    return p.parse_args(argv)


def rank_values(count: int, rank: int) -> np.ndarray:
    """What a rank sends: values that say which rank and which element they are."""
    return (np.arange(count) % 4096 + 8192 * rank).astype(np.float32)


def expected(count: int, rank: int, n: int) -> np.ndarray:
    """What a rank must receive: block `rank` of every rank's values, in rank order."""
    m = count // n
    return np.concatenate([rank_values(count, j)[rank * m:(rank + 1) * m] for j in range(n)])


def mpi_rows(count: int, world: MPI.Comm) -> dict[str, tuple[Callable[[], Any], Callable[[], np.ndarray]]]:
    """Per MPI-based row: one call, and what the last call received."""
    x = rank_values(count, world.Get_rank())
    out: dict[str, np.ndarray] = {}
    rows: dict[str, tuple[Callable[[], Any], Callable[[], np.ndarray]]] = {}
    for algorithm in ALGORITHMS:
        out[algorithm] = np.empty_like(x)

        def call(algorithm: str = algorithm) -> None:
            dcomm.alltoall(x, algorithm=algorithm, comm=world, out=out[algorithm])
        rows[f"dmlmpi-{algorithm}"] = (call, lambda algorithm=algorithm: out[algorithm])

    def new() -> None:
        out["new"] = dcomm.alltoall(x, comm=world)
    rows["dmlmpi-auto-new"] = (new, lambda: out["new"])
    native = np.empty_like(x)
    rows["native"] = (lambda: world.Alltoall(x, native), lambda: native)
    return rows


def main(argv: list[str]) -> int:
    """Measure every row at every size, print the table, write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    n, rank = world.Get_size(), world.Get_rank()
    torch.set_num_threads(1)  # ranks share the cores
    dist = init_gloo(world) if n > 1 and not args.no_gloo else None
    records = []
    for size in (parse_bytes(s) for s in args.sizes.split(",")):
        count = max(n, size // 4 // n * n)  # float32 elements, a whole block per rank
        rows = mpi_rows(count, world)
        timings = time_interleaved({name: call for name, (call, _) in rows.items()}, world, samples=args.samples)
        if dist is not None:
            # gloo on its own, after the others: its threads stay busy for a while after each call
            src, dst = torch.from_numpy(rank_values(count, rank)), torch.empty(count)
            rows["gloo"] = (lambda: dist.all_to_all_single(dst, src), lambda: dst.numpy())
            timings["gloo"] = time_collective(rows["gloo"][0], world, args.samples)
        want = expected(count, rank, n)
        nbytes = count * 4
        for name, t in timings.items():
            call, result = rows[name]
            call()
            wrong = world.allreduce(int(np.sum(result() != want)), op=MPI.MAX)
            algbw = nbytes / t.median / 1e9
            records.append(dict(algorithm=name, ranks=n, bytes=nbytes, dtype="float32", time_s_median=t.median,
                                time_s_min=t.min, time_s_max=t.max, algbw_GBps=algbw, busbw_GBps=algbw * (n - 1) / n,
                                vs_native=t.median / timings["native"].median, wrong=wrong))
    if rank == 0:
        print(f"# alltoall, float32, {n} ranks, {args.samples} samples per row, slowest rank per call")
        table = [dict(r, size=human_bytes(r["bytes"]), time=f"{r['time_s_median'] * 1e6:.1f}",
                      spread=f"{r['time_s_min'] * 1e6:.1f}-{r['time_s_max'] * 1e6:.1f}",
                      ratio=f"{r['vs_native']:.2f}") for r in records]
        print(format_table(table, [("size", "size", ""), ("algorithm", "row", ""), ("time", "time(us)", ""),
                                   ("spread", "min-max(us)", ""), ("algbw_GBps", "algbw(GB/s)", ".3f"),
                                   ("busbw_GBps", "busbw(GB/s)", ".3f"), ("ratio", "x native", ""),
                                   ("wrong", "#wrong", "")]))
        if args.json:
            write_json(args.json, records)
    if dist is not None:
        close_gloo(dist)
    return 0 if all(r["wrong"] == 0 for r in records) else 1
