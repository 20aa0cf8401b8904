"""`python -m dmlmpi.bench allreduce`: dmlmpi's all-reduce algorithms vs native MPI_Allreduce vs gloo.

Run under mpirun. Every row is measured in the same run on the same buffers: dmlmpi `auto`, `ring`,
`mpi`, `hierarchical` and `shm` (guard in its default setting; `shm` stages these private buffers
through its shared window), `auto-shared` (auto on a buffer from `comm.shared_empty`, which it
reduces in place from its shared-memory crossover up, as DataParallel's buckets are), `auto` with
the guard off (its cost), raw
`MPI_Allreduce` through mpi4py (native), native again on a buffer of its own (`native-again`: the
spread between two identical rows of one run, the noise any ratio here carries), and
torch.distributed gloo `all_reduce`. At each size the
MPI-based rows take their timed samples in turn, so that a slow spell of the machine falls on all of
them; gloo is timed after them (its threads stay busy after a call). Bandwidths follow
nccl-tests: algbw = bytes / time, busbw = algbw * 2(n-1)/n. Then tensor fusion: 100 tensors of mixed
sizes all-reduced fused vs one call each.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from dmlmpi import comm as dcomm
from dmlmpi.comm.collectives import auto_algorithm
from dmlmpi.comm.context import context
from dmlmpi.comm.fusion import allreduce_fused

from .common import Timing, close_gloo, format_table, human_bytes, init_gloo, parse_bytes, time_collective, time_interleaved, write_json

DEFAULT_SIZES = "4K,16K,64K,256K,1M,4M,16M,64M"
ALGOS = ("auto", "ring", "mpi", "hierarchical", "shm", "auto-shared", "auto-noguard", "native", "native-again", "gloo")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench allreduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="message sizes in bytes, comma-separated (K/M/G suffixes)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "int32", "int64"])
    p.add_argument("--algorithms", default=",".join(ALGOS), help=f"subset of {','.join(ALGOS)}")
    p.add_argument("--samples", type=int, default=18,
                   help="timed samples per row (median, min, max over them); 18 rounds complete the design "
                        "of sample orders for 9 rows")
    p.add_argument("--sample-seconds", type=float, default=0.02, help="target length of one sample")
    p.add_argument("--no-fusion", action="store_true", help="skip the fusion measurement")
    p.add_argument("--json", help="write one record per (algorithm, bytes) to this path")
    p.add_argument("--plot", help="draw busbw against size per algorithm to this PNG")
    p.add_argument("--markdown", action="store_true", help="also print the medians as a Markdown table")
    args = p.parse_args(argv)
    for a in args.algorithms.split(","):
        if a not in ALGOS:
            p.error(f"unknown algorithm {a!r}; choose from {','.join(ALGOS)}")
    return args


def make_buffer(algo: str, count: int, dtype: np.dtype, world: MPI.Comm, fill: float = 0.0) -> np.ndarray:
    """The buffer `algo` is timed on: in a shared window for auto-shared (collective), else private.

    Timed buffers hold zeros: summed in place over and over, anything else overflows (numpy then
    warns on every rank, and infinities are no fairer a workload).
    """
    if algo != "auto-shared":
        return np.full(count, fill, dtype=dtype)
    x = dcomm.shared_empty(count, dtype.name, world)
    x[:] = fill
    return x


def release(algo: str, x: np.ndarray, world: MPI.Comm) -> None:
    """Give back what make_buffer took (collective for shared buffers)."""
    if algo == "auto-shared":
        dcomm.free_shared(x, world)


def make_call(algo: str, x: np.ndarray, world: MPI.Comm, dist: Any) -> Callable[[], Any]:
    """A no-argument function doing one in-place all-reduce (sum) of x with `algo`."""
    if algo in ("native", "native-again"):
        return lambda: world.Allreduce(MPI.IN_PLACE, x, op=MPI.SUM)
    if algo == "gloo":
        import torch

        t = torch.from_numpy(x)  # shares x's memory
        return lambda: dist.all_reduce(t)
    if algo == "auto-noguard":
        return lambda: dcomm.allreduce(x, algorithm="auto", inplace=True, guard=False)
    if algo == "auto-shared":
        return lambda: dcomm.allreduce(x, algorithm="auto", inplace=True, comm=world)
    return lambda: dcomm.allreduce(x, algorithm=algo, inplace=True)


def wrong_elements(algo: str, n: int, dtype: np.dtype, world: MPI.Comm, dist: Any) -> int:
    """Elements that differ from the exact answer after one all-reduce of rank+1 everywhere (max over ranks)."""
    x = make_buffer(algo, n, dtype, world, world.Get_rank() + 1)
    make_call(algo, x, world, dist)()
    size = world.Get_size()
    wrong = int(np.count_nonzero(x != dtype.type(size * (size + 1) // 2)))
    release(algo, x, world)
    return world.allreduce(wrong, op=MPI.MAX)


def chosen(algo: str, nbytes: int, world: MPI.Comm) -> str:
    """What `algo` ran for nbytes on world's ranks (auto's choice made as allreduce makes it)."""
    if algo.startswith("auto"):
        return auto_algorithm(context(world), nbytes, shared=algo == "auto-shared", host=True)
    return algo


def bench_sizes(args: argparse.Namespace, world: MPI.Comm, dist: Any) -> list[dict[str, Any]]:
    """One record per (algorithm, size)."""
    dtype = np.dtype(args.dtype)
    size = world.Get_size()
    sizes = [max(1, parse_bytes(s) // dtype.itemsize) for s in args.sizes.split(",")]
    algos = [a for a in args.algorithms.split(",") if not (a == "gloo" and dist is None)]
    timings: dict[tuple[str, int], Timing] = {}
    for count in sizes:
        # MPI-based rows on their own buffers, their samples taken in turn (see time_interleaved)
        buffers = {a: make_buffer(a, count, dtype, world) for a in algos if a != "gloo"}
        calls = {a: make_call(a, x, world, dist) for a, x in buffers.items()}
        for algo, t in time_interleaved(calls, world, args.samples, args.sample_seconds).items():
            timings[algo, count] = t
        for algo, x in buffers.items():
            release(algo, x, world)
    if "gloo" in algos:
        # gloo last and on its own: its background threads keep a core busy for a while after each
        # call, which inflated whichever row came next (auto at 8 ranks, 4 MiB: 1.03x -> 1.23x of native)
        for count in sizes:
            timings["gloo", count] = time_collective(make_call("gloo", np.ones(count, dtype=dtype), world, dist),
                                                     world, args.samples, args.sample_seconds)
    records = []
    for count in sizes:
        for algo in algos:
            t = timings[algo, count]
            algbw = count * dtype.itemsize / t.median / 1e9
            records.append(dict(algorithm=algo, ranks=size, bytes=count * dtype.itemsize, count=count,
                                dtype=args.dtype, time_s_median=t.median, time_s_min=t.min, time_s_max=t.max,
                                algbw_GBps=algbw, busbw_GBps=algbw * 2 * (size - 1) / size,
                                wrong=wrong_elements(algo, count, dtype, world, dist),
                                chosen=chosen(algo, count * dtype.itemsize, world)))
    return records


def bench_fusion(world: MPI.Comm, args: argparse.Namespace) -> list[dict[str, Any]]:
    """100 float32 tensors of 1K-64K elements: one fused all-reduce vs one call per tensor."""
    rng = np.random.default_rng(0)  # same sizes on every rank
    tensors = [np.ones(int(k), np.float32) for k in rng.integers(1 << 10, (1 << 16) + 1, size=100)]
    total = sum(t.nbytes for t in tensors)

    def each() -> None:
        for t in tensors:
            dcomm.allreduce(t, inplace=True)

    def fused() -> None:
        allreduce_fused(tensors, inplace=True)

    records = []
    timings = time_interleaved({"one-call-each": each, "fused": fused}, world, args.samples, args.sample_seconds)
    for name, t in timings.items():
        records.append(dict(algorithm=f"fusion:{name}", ranks=world.Get_size(), bytes=total, count=len(tensors),
                            dtype="float32", time_s_median=t.median, time_s_min=t.min, time_s_max=t.max,
                            algbw_GBps=total / t.median / 1e9,
                            busbw_GBps=total / t.median / 1e9 * 2 * (world.Get_size() - 1) / world.Get_size(),
                            wrong=0, chosen="auto"))
    return records


def targets(records: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked against this run's medians."""
    by = {(r["algorithm"], r["bytes"]): r for r in records}
    lines = []
    sizes = sorted({r["bytes"] for r in records if not r["algorithm"].startswith("fusion")})
    for b in sizes:
        if ("auto", b) in by and ("native", b) in by:
            a, nat = by[("auto", b)]["time_s_median"], by[("native", b)]["time_s_median"]
            ok = a <= max(1.10 * nat, nat + 5e-6) if b < max(sizes) else a < nat
            lines.append(f"auto vs native at {human_bytes(b):>4}: {a / nat:5.2f}x  "
                         f"({'<=1.10x or +5us' if b < max(sizes) else 'faster'}: {'PASS' if ok else 'MISS'})")
        if ("native-again", b) in by and ("native", b) in by:
            again, nat = by[("native-again", b)]["time_s_median"], by[("native", b)]["time_s_median"]
            lines.append(f"native-again vs native at {human_bytes(b):>4}: {again / nat:5.2f}x  "
                         "(the same call twice: this run's noise)")
        if ("auto-shared", b) in by and ("native", b) in by:
            a, nat = by[("auto-shared", b)]["time_s_median"], by[("native", b)]["time_s_median"]
            lines.append(f"auto on a shared buffer ({by[('auto-shared', b)]['chosen']}) vs native at {human_bytes(b):>4}: {a / nat:5.2f}x")
        if ("gloo", b) in by:
            slowest = max((by[(a, b)]["time_s_median"], a) for a in ("auto", "ring", "mpi", "hierarchical", "shm", "auto-shared")
                          if (a, b) in by)
            g = by[("gloo", b)]["time_s_median"]
            lines.append(f"gloo / slowest dmlmpi ({slowest[1]}) at {human_bytes(b):>4}: {g / slowest[0]:7.1f}x "
                         f"({'PASS' if g > slowest[0] else 'MISS'})")
        if ("auto-noguard", b) in by and ("auto", b) in by:
            cost = by[("auto", b)]["time_s_median"] - by[("auto-noguard", b)]["time_s_median"]
            lines.append(f"guard cost at {human_bytes(b):>4}: {cost * 1e6:+8.1f} us per call")
    fus = [r for r in records if r["algorithm"] == "fusion:fused"]
    one = [r for r in records if r["algorithm"] == "fusion:one-call-each"]
    if fus and one:
        ratio = one[0]["time_s_median"] / fus[0]["time_s_median"]
        lines.append(f"fusion: fused is {ratio:.1f}x faster than one call each (>=5x: {'PASS' if ratio >= 5 else 'MISS'})")
    return lines


def markdown(records: list[dict[str, Any]]) -> str:
    """Median microseconds per size and algorithm (min-max below), with auto's ratio to native."""
    algos = [a for a in ALGOS if any(r["algorithm"] == a for r in records)]
    by = {(r["algorithm"], r["bytes"]): r for r in records}
    sizes = sorted({r["bytes"] for r in records if not r["algorithm"].startswith("fusion")})
    lines = ["| size | " + " | ".join(algos) + " | auto / native |", "|---" * (len(algos) + 2) + "|"]
    for b in sizes:
        cells = []
        for a in algos:
            r = by.get((a, b))
            cells.append("" if r is None else f"{r['time_s_median'] * 1e6:.0f} ({r['time_s_min'] * 1e6:.0f}-{r['time_s_max'] * 1e6:.0f})")
        ratio = by[("auto", b)]["time_s_median"] / by[("native", b)]["time_s_median"] if ("auto", b) in by and ("native", b) in by else float("nan")
        lines.append(f"| {human_bytes(b)} | " + " | ".join(cells) + f" | {ratio:.2f} |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: str) -> None:
    """busbw (GB/s) against message size, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for algo in dict.fromkeys(r["algorithm"] for r in records if not r["algorithm"].startswith("fusion")):
        rows = sorted((r for r in records if r["algorithm"] == algo), key=lambda r: r["bytes"])
        ax.plot([r["bytes"] for r in rows], [r["busbw_GBps"] for r in rows], marker="o", label=algo)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title(f"all-reduce, {records[0]['ranks']} ranks, {records[0]['dtype']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """Measure, print the table and the targets, write JSON and PNG if asked."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    dist = init_gloo(world) if "gloo" in args.algorithms.split(",") and world.Get_size() > 1 else None
    records = bench_sizes(args, world, dist)
    if not args.no_fusion:
        records += bench_fusion(world, args)
    if world.Get_rank() == 0:
        rows = [dict(r, size=human_bytes(r["bytes"]), time=f"{r['time_s_median'] * 1e6:.1f}",
                     spread=f"{r['time_s_min'] * 1e6:.1f}-{r['time_s_max'] * 1e6:.1f}") for r in records]
        print(f"# dmlmpi all-reduce benchmark: {world.Get_size()} ranks, {MPI.Get_library_version().splitlines()[0]}")
        print(format_table(rows, [("size", "size", ""), ("count", "count", ""), ("dtype", "type", ""),
                                  ("algorithm", "algorithm", ""), ("chosen", "runs", ""), ("time", "time(us)", ""),
                                  ("spread", "min-max(us)", ""), ("algbw_GBps", "algbw(GB/s)", ".3f"),
                                  ("busbw_GBps", "busbw(GB/s)", ".3f"), ("wrong", "#wrong", "")]))
        print("\n".join(["", "# targets (medians of this run)"] + targets(records)))
        if args.markdown:
            print("\n" + markdown(records))
        if args.json:
            write_json(args.json, records)
        if args.plot:
            plot(records, args.plot)
    if dist is not None:
        close_gloo(dist)
    return 0 if all(r["wrong"] == 0 for r in records) else 1
