"""`python -m dmlmpi.bench broadcast`: a model's buffers from rank 0, as DataParallel does before every forward.

Run under mpirun. The tensors are the buffers of a model (by default `bn-cnn` from `bench dp`: 8
BatchNorm layers, 24 buffers of float32 and int64). Rows, the MPI-based ones timed in turn:
`fused` is dmlmpi's kept `FusedBroadcast` (what DataParallel calls), `fused-once` plans it on every
call (`broadcast_fused`), `one-each` is one guarded `dmlmpi.comm.broadcast` per tensor (what
DataParallel did before), `native-each` one raw MPI_Bcast per tensor through mpi4py; then
`gloo-coalesced`, torch.distributed's `_broadcast_coalesced` over gloo, which is what DDP calls
to sync its buffers. Each time is the slowest rank's per call.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

import torch
from mpi4py import MPI

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import FusedBroadcast, broadcast_fused

from .common import close_gloo, format_table, human_bytes, init_gloo, time_collective, time_interleaved, write_json
from .dp import MODELS

ROWS = ("fused", "fused-once", "one-each", "native-each", "gloo-coalesced")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench broadcast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bn-cnn", choices=[m for m in MODELS if list(MODELS[m][0]().buffers())],
                   help="the model (from bench dp) whose buffers are broadcast")
    p.add_argument("--samples", type=int, default=12, help="timed samples per row (median, min, max)")
    p.add_argument("--json", help="write one record per row to this path")
    return p.parse_args(argv)


def rows(buffers: list[torch.Tensor], world: MPI.Comm) -> dict[str, tuple[Callable[[], Any], list[torch.Tensor]]]:
    """One call per MPI-based row, and the copy of the buffers that row broadcasts."""
    kept, once, each, native = ([b.clone() for b in buffers] for _ in range(4))
    fused = FusedBroadcast(kept, root=0, comm=world)

    def one_each() -> None:
        for t in each:
            dcomm.broadcast(t, root=0, comm=world, inplace=True)

    def native_each() -> None:
        for t in native:
            world.Bcast(t.numpy(), root=0)

    return {"fused": (fused, kept), "fused-once": (lambda: broadcast_fused(once, root=0, comm=world), once),
            "one-each": (one_each, each), "native-each": (native_each, native)}


def wrong_elements(call: Callable[[], Any], tensors: list[torch.Tensor], world: MPI.Comm) -> int:
    """Elements that do not hold rank 0's value after one call, every rank having filled its own (max over ranks)."""
    for t in tensors:
        t.fill_(world.Get_rank() + 1)
    call()
    wrong = sum(int((t != 1).sum()) for t in tensors)
    return world.allreduce(wrong, op=MPI.MAX)


def main(argv: list[str]) -> int:
    """Measure every row, print the table, write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)  # ranks share the cores
    buffers = [b.detach() for b in MODELS[args.model][0]().buffers()]
    nbytes = sum(b.numel() * b.element_size() for b in buffers)
    calls = rows(buffers, world)
    timings = time_interleaved({name: call for name, (call, _) in calls.items()}, world, samples=args.samples)
    dist = init_gloo(world) if world.Get_size() > 1 else None
    if dist is not None:
        # gloo on its own, after the others: its threads stay busy for a while after each call
        group, theirs = dist.group.WORLD, [b.clone() for b in buffers]
        calls["gloo-coalesced"] = (lambda: dist._broadcast_coalesced(group, theirs, 1 << 20, 0), theirs)
        timings["gloo-coalesced"] = time_collective(calls["gloo-coalesced"][0], world, args.samples)
    base = timings["fused"].median
    records = [dict(variant=name, ranks=world.Get_size(), model=args.model, tensors=len(buffers), bytes=nbytes,
                    time_s_median=t.median, time_s_min=t.min, time_s_max=t.max, vs_fused=t.median / base,
                    wrong=wrong_elements(*calls[name], world))
               for name, t in timings.items()]
    if world.Get_rank() == 0:
        print(f"# {len(buffers)} buffers of {args.model} ({human_bytes(nbytes)}B) from rank 0 to "
              f"{world.Get_size()} ranks: {args.samples} samples, slowest rank per call")
        table = [dict(r, time=f"{r['time_s_median'] * 1e6:.1f}",
                      spread=f"{r['time_s_min'] * 1e6:.1f}-{r['time_s_max'] * 1e6:.1f}",
                      ratio=f"{r['vs_fused']:.2f}") for r in records]
        print(format_table(table, [("variant", "variant", ""), ("time", "time(us)", ""),
                                   ("spread", "min-max(us)", ""), ("ratio", "x fused", ""), ("wrong", "#wrong", "")]))
        if args.json:
            write_json(args.json, records)
    if dist is not None:
        close_gloo(dist)
    return 0 if all(r["wrong"] == 0 for r in records) else 1
