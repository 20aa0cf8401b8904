"""`python -m dmlmpi.bench callcost`: what a little Python between native all-reduces costs on shared cores.

Every row calls MPI_Allreduce (in place, through mpi4py, on COMM_WORLD) back to back; the rows differ
only in what runs between two calls: nothing (`native`), a pure-Python loop of N additions whose
CPU cost is measured first (`busy N`), or the whole call is dmlmpi's `auto` all-reduce with
the guard off and on. The rows take their timed samples in turn. With a core per rank the time added
is about the Python's own; with ranks sharing cores it is many times that, which bounds how close any
Python wrapper can come to native MPI_Allreduce there.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from dmlmpi import comm as dcomm

from .common import format_table, human_bytes, parse_bytes, time_interleaved, write_json


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench callcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", default="4K", help="message size of every all-reduce (float32)")
    p.add_argument("--busy", default="10,40,160", help="comma-separated loop lengths N for the `busy N` rows")
    p.add_argument("--samples", type=int, default=9, help="timed samples per row (median, min, max)")
    p.add_argument("--json", help="write one record per row to this path")
    args = p.parse_args(argv)
    try:
        args.nbytes = parse_bytes(args.bytes)
        args.loops = [int(n) for n in args.busy.split(",") if n.strip()]
    except ValueError as exc:
        p.error(f"--bytes/--busy: {exc}")
    if args.nbytes < 4 or any(n < 1 for n in args.loops) or args.samples < 1:
        p.error("--bytes must be at least 4, every --busy length and --samples at least 1")
    return args


def busy(n: int) -> int:
    """n additions in the interpreter: Python work of a known, tunable length."""
    total = 0
    for i in range(n):
        total += i
    return total


def busy_cost_s(n: int, repeats: int = 20000) -> float:
    """CPU seconds one busy(n) takes (mean over `repeats`; CPU time, so ranks sharing a core do not inflate it)."""
    t0 = time.thread_time()
    for _ in range(repeats):
        busy(n)
    return (time.thread_time() - t0) / repeats


def variants(x: np.ndarray, world: MPI.Comm, loops: list[int]) -> dict[str, Callable[[], Any]]:
    """One all-reduce call per row, with that row's Python around it; every row on a buffer of its own.

    (On one buffer shared by all rows, native MPI_Allreduce measured 3-4 us slower at 4 ranks and
    4 KiB after the rows that go through dmlmpi's exchange area, which flattered those.)
    """
    def native_on(buf: np.ndarray) -> Callable[[], None]:
        def call() -> None:
            world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return call

    def with_busy(n: int, buf: np.ndarray) -> Callable[[], None]:
        def call() -> None:
            busy(n)
            world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return call

    def auto_on(buf: np.ndarray, guard: bool) -> Callable[[], None]:
        def call() -> None:
            dcomm.allreduce(buf, inplace=True, guard=guard, comm=world)
        return call

    rows: dict[str, Callable[[], Any]] = {"native": native_on(x.copy())}
    rows.update({f"busy {n}": with_busy(n, x.copy()) for n in loops})
    rows["auto-noguard"] = auto_on(x.copy(), False)
    rows["auto"] = auto_on(x.copy(), True)
    return rows


def main(argv: list[str]) -> int:
    """Measure every row in turn, print the table, write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    x = np.zeros(args.nbytes // 4, dtype=np.float32)  # zeros: summed over and over, anything else overflows
    # the loops' own CPU cost, on rank 0 while the others wait in the barrier below
    own = {n: busy_cost_s(n) for n in args.loops} if world.Get_rank() == 0 else {}
    own = world.bcast(own, root=0)
    timings = time_interleaved(variants(x, world, args.loops), world, samples=args.samples)
    base = timings["native"].median
    records = []
    for name, t in timings.items():
        n = int(name.split()[1]) if name.startswith("busy ") else None
        records.append(dict(variant=name, ranks=world.Get_size(), bytes=args.nbytes, dtype="float32",
                            python_between_s=own[n] if n is not None else None,
                            time_s_median=t.median, time_s_min=t.min, time_s_max=t.max,
                            added_s=t.median - base, vs_native=t.median / base))
    if world.Get_rank() == 0:
        print(f"# native MPI_Allreduce with Python between calls: {world.Get_size()} ranks, "
              f"{human_bytes(args.nbytes)} float32, {args.samples} samples in turn, slowest rank per call")
        rows = [dict(r, between="" if r["python_between_s"] is None else f"{r['python_between_s'] * 1e6:.2f}",
                     time=f"{r['time_s_median'] * 1e6:.1f}",
                     spread=f"{r['time_s_min'] * 1e6:.1f}-{r['time_s_max'] * 1e6:.1f}",
                     added=f"{r['added_s'] * 1e6:+.1f}", ratio=f"{r['vs_native']:.2f}")
                for r in records]
        print(format_table(rows, [("variant", "variant", ""), ("between", "python between(us)", ""),
                                  ("time", "time(us)", ""), ("spread", "min-max(us)", ""),
                                  ("added", "vs native(us)", ""), ("ratio", "x native", "")]))
        busy_rows = [r for r in records if r["python_between_s"] is not None]
        if busy_rows:
            factor = statistics.median(r["added_s"] / r["python_between_s"] for r in busy_rows)
            print(f"\n# time added per second of Python between calls (median over the busy rows): {factor:.1f}x")
        if args.json:
            write_json(args.json, records)
    return 0
