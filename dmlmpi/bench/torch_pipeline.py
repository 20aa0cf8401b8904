"""The peer of `bench pipeline`: torch.distributed.pipelining's schedules over gloo, on the same model and data.

Rows `torch-gpipe`, `torch-1f1b`, `torch-interleaved` (ScheduleInterleaved1F1B, V chunks per rank
of `layers-per-stage` blocks, the model dmlmpi's interleaved row runs) and `torch-zbv`
(ScheduleZBVZeroBubble: the zero-bubble V schedule, two chunks per rank placed as a V, stage r and
2P-1-r; the model of the single-chunk rows cut into 2P stages of half as many blocks, so that it
does the same work as `zb-h1`). torch runs each schedule's step on its own; the time measured
is the same common step (every rank starts together, ends when the last is done).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
from mpi4py import MPI
from torch import nn

TORCH_SCHEDULES = ("torch-gpipe", "torch-1f1b", "torch-interleaved", "torch-zbv")


def stage_indices(name: str, P: int, rank: int, V: int) -> list[int]:
    """The model stages this rank runs under the named torch schedule."""
    if name in ("torch-gpipe", "torch-1f1b"):
        return [rank]
    if name == "torch-zbv":
        return [rank, 2 * P - 1 - rank]  # V-shaped: down the ranks, then back up
    return [c * P + rank for c in range(V)]  # looped, as dmlmpi's interleaved


def run_torch(name: str, M: int, comm: MPI.Comm, args: argparse.Namespace,
              make_model: Callable[[int, int, argparse.Namespace], nn.Sequential]) -> dict[str, Any] | None:
    """Time one torch schedule at M microbatches; rank 0 returns the record (None where torch refuses it)."""
    from torch.distributed import pipelining as tp

    P, rank = comm.Get_size(), comm.Get_rank()
    if name == "torch-zbv" and args.layers_per_stage % 2:
        return None  # its 2P stages take half a stage's blocks each
    V = 1 if name in ("torch-gpipe", "torch-1f1b") else 2 if name == "torch-zbv" else args.chunks
    model = make_model(P, 1 if name == "torch-zbv" else V, args)
    blocks = 2 * (args.layers_per_stage // 2 if name == "torch-zbv" else args.layers_per_stage)  # entries per stage
    stages = [tp.PipelineStage(model[blocks * i:blocks * (i + 1)], i, P * V, torch.device("cpu"))
              for i in stage_indices(name, P, rank, V)]
    cls = {"torch-gpipe": tp.ScheduleGPipe, "torch-1f1b": tp.Schedule1F1B,
           "torch-interleaved": tp.ScheduleInterleaved1F1B, "torch-zbv": tp.ScheduleZBVZeroBubble}[name]
    try:
        schedule = cls(stages[0] if V == 1 else stages, M, loss_fn=nn.functional.mse_loss)
    except ValueError:
        refused = True  # e.g. too few microbatches for the stages
    else:
        refused = False
    if comm.allreduce(refused, op=MPI.LOR):
        return None
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M * args.micro_size, args.width, generator=g)
    y = torch.randn(M * args.micro_size, args.width, generator=g)
    owned = {s.stage_index for s in stages}
    first, last = 0 in owned, P * V - 1 in owned

    def step() -> None:
        extra = {"target": y, "losses": []} if last else {}
        schedule.step(x, **extra) if first else schedule.step(**extra)

    step()  # warm up: allocations, connections, shape inference
    steps = []
    for _ in range(args.steps):
        comm.Barrier()  # every step starts together
        t0 = time.perf_counter()
        step()
        steps.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if rank != 0:
        return None
    rates = [len(x) / t for t in steps]
    return dict(schedule=name, P=P, M=M, V=V, rows=len(x), samples_per_s_median=statistics.median(rates),
                samples_per_s_min=min(rates), samples_per_s_max=max(rates), step_time_s=statistics.median(steps))
