"""What every benchmark shares: timing over ranks, medians with min and max, tables and JSON."""
from __future__ import annotations

import gc
import os
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from mpi4py import MPI

from dmlmpi.telemetry import atomic_write_json


@dataclass
class Timing:
    """Seconds per call over several samples: the median and the extremes."""

    median: float
    min: float
    max: float
    samples: int


def calls_per_sample(fn: Callable[[], Any], comm: MPI.Comm, target_s: float = 0.02, cap: int = 2000) -> int:
    """How many back-to-back calls make one sample last about target_s (agreed by all ranks)."""
    fn()  # warm up: first-touch pages, connections, caches
    comm.Barrier()
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    # all ranks must loop the same number of times: take the slowest rank's estimate
    one = comm.allreduce(one, op=MPI.MAX)
    return max(1, min(cap, int(target_s / max(one, 1e-7))))


def shared_calls_per_sample(fns: Iterable[Callable[[], Any]], comm: MPI.Comm, target_s: float = 0.02) -> int:
    """One number of calls per sample for several variants: the median of their calls_per_sample.

    What a sample pays once (the ranks leave its last call at different times, and it is timed as
    its slowest rank) is then spread over as many calls in every variant. Each variant's own count
    came from one timed call, and the first variant's call ran slow: at 8 ranks and 1 MiB it got 5
    calls a sample to native MPI's 16, which put it 15-25% above the same code path in another row.
    """
    return int(statistics.median([calls_per_sample(fn, comm, target_s) for fn in fns]))


def time_collective(fn: Callable[[], Any], comm: MPI.Comm, samples: int = 7, target_s: float = 0.02) -> Timing:
    """Time `fn` (a collective every rank calls) as the slowest rank's seconds per call, per sample."""
    k = calls_per_sample(fn, comm, target_s)
    per_call = [timed_sample(fn, k, comm) for _ in range(samples)]
    return Timing(statistics.median(per_call), min(per_call), max(per_call), samples)


def time_interleaved(fns: dict[str, Callable[[], Any]], comm: MPI.Comm, samples: int = 7,
                     target_s: float = 0.02) -> dict[str, Timing]:
    """Time several collectives by taking their samples in turn, in the orders of balanced_orders.

    A slow spell of a shared machine then falls on every variant alike, and what one variant leaves
    behind (see balanced_orders) on every other, so ratios between them hold better than when each
    variant's samples are taken in one block. Every variant makes the same number of calls per
    sample (see shared_calls_per_sample).
    """
    k = shared_calls_per_sample(fns.values(), comm, target_s)
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for order in balanced_orders(list(fns), samples):
        for name in order:
            per_call[name].append(timed_sample(fns[name], k, comm))
    return {name: Timing(statistics.median(t), min(t), max(t), samples) for name, t in per_call.items()}


def balanced_orders(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round of samples, cycling through a Williams design.

    Over each full cycle (k rounds for k names, 2k if k is odd) every name comes first equally
    often and follows every other name equally often. A sample can pay for what the one before it
    left behind (in 2-rank runs at 16 MiB whichever variant came first in every round measured
    8-13% high); rotating the order alone kept first place fair, but each variant then always
    followed the same one.
    """
    k = len(names)
    if k == 0:
        return []
    # the first sequence 0, 1, k-1, 2, k-2, ...; the others add 1, 2, ... to it (mod k)
    first, low, high = [0], 1, k - 1
    while len(first) < k:
        first.append(low)
        low += 1
        if len(first) < k:
            first.append(high)
            high -= 1
    design = [[(i + shift) % k for i in first] for shift in range(k)]
    if k % 2:
        design += [seq[::-1] for seq in design]  # with an odd k the reversed sequences complete the balance
    return [[names[i] for i in design[r % len(design)]] for r in range(rounds)]


def timed_sample(fn: Callable[[], Any], k: int, comm: MPI.Comm) -> float:
    """One sample: the slowest rank's seconds per call over k back-to-back calls, all ranks starting together."""
    comm.Barrier()  # start each sample together
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    elapsed = (time.perf_counter() - t0) / k
    return comm.allreduce(elapsed, op=MPI.MAX)  # a collective ends when its last rank does


def human_bytes(n: int) -> str:
    """4096 -> '4K', 67108864 -> '64M'."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def parse_bytes(text: str) -> int:
    """'4K' -> 4096, '64M' -> 67108864, '100' -> 100."""
    text = text.strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table: columns are (key, header, format spec)."""
    cells = [[h for _, h, _ in columns]] + [[format(r[k], f) if f else str(r[k]) for k, _, f in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: str, records: Sequence[dict[str, Any]]) -> None:
    """Write benchmark records as a JSON list (atomically: temp file + rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, list(records))


def init_gloo(world: MPI.Comm) -> Any:
    """Start a torch.distributed gloo group over the same ranks (rank 0 picks a free TCP port)."""
    import torch.distributed as dist

    port = 0
    if world.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    port = world.bcast(port, root=0)  # every rank connects to rank 0's port
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=world.Get_rank(), world_size=world.Get_size())
    return dist



def close_gloo(dist: Any) -> None:
    """End the gloo group while the interpreter is whole, so no gloo thread calls into Python during exit."""
    # After DDP has run, a gloo worker thread can still be finishing work that needs the GIL when the
    # interpreter shuts down, and the process aborts (SIGABRT; 5 of 12 runs of a two-rank script here
    # that makes one DDP step and destroys the group). Measured with that script: a garbage collection
    # after destroying the group ended it (0 of 20), a gloo barrier before it alone did not (2 of 30;
    # it waits for the work queued before it, on every rank); collect, barrier, destroy, collect: 0 of 40.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
