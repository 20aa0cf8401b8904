"""`python -m dmlmpi.bench pipeline`: schedules x microbatches -> throughput, bubble, activation memory.

Run under `mpirun -n P`: one pipeline of P ranks over a model of balanced stages (an MLP of equal
Linear+ReLU blocks, `--layers-per-stage` per stage). For each schedule and each M, timed train
steps of one batch of `--micro-size * M` rows (weak scaling in M). Per step every rank measures its
compute time (forwards and backwards) and the time it was blocked waiting for a neighbour's message;
fractions are of the common step, from a common start to the moment the last rank is done. The
bubble reported is the busiest stage's idle fraction, 1 - compute / step (the others also wait on it
when stages run at unequal speeds: the "mean idle" column); "waiting" is the part of that idle spent
blocked in a receive (for a neighbour's message, and copying it in) or done early (the rest is
Python and sends). "replay" is the
same step replayed by the schedule checker with each action's measured compute time and free,
instant messages: the bubble the machine's compute times alone allow, so bubble - replay is what
the executor adds and replay - theory what uneven action times add. Next to them, the theory for
balanced stages: (P-1)/(M+P-1) for GPipe and 1F1B, (P-1)/(V*M+P-1) for interleaved with V chunks,
(P-1)/(3M+P-1) for zb-h1 (input-gradient B, weight-gradient W, each as long as a forward). Peak activation
memory per stage is what autograd saved (and the pipeline kept) for backward at most at once;
`1f1b+recompute` is 1F1B with activation checkpointing (stage inputs kept, stages run again in
backward): its memory saving and its cost in step time. The `torch-*` rows are the peer,
torch.distributed.pipelining over gloo on the same model and data (`torch_pipeline.py`); they have
step times only, and each dmlmpi schedule's step time is compared with its torch counterpart's.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.parallel import Pipeline
from dmlmpi.parallel.schedules import build, check

from .common import close_gloo, format_table, init_gloo, write_json
from .torch_pipeline import TORCH_SCHEDULES, run_torch


def parse_args(argv: list[str], P: int) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedules", default="gpipe,1f1b,interleaved,zb-h1,1f1b+recompute," + ",".join(TORCH_SCHEDULES),
                   help="comma-separated schedules; NAME+recompute adds activation checkpointing; torch-gpipe, "
                        "torch-1f1b, torch-interleaved, torch-zbv are torch.distributed.pipelining's")
    p.add_argument("--micro", default=",".join(str(m * P) for m in (1, 2, 4, 8)), help="comma-separated M values")
    p.add_argument("--micro-size", type=int, default=64, help="rows per microbatch")
    # wide layers: a stage's compute per microbatch grows with width^2, its messages with width, so
    # the bubble is measured with message handling small next to the compute (as on real models)
    p.add_argument("--width", type=int, default=2048, help="width of every Linear layer")
    # 8 blocks: 4.3 GFLOP of forward per 512 KiB message (8,200 FLOP per byte; a transformer layer of
    # width h does about 12h per byte of activation, and a stage holds several), so the bubble
    # measured is the schedule's, not the cost of moving messages
    p.add_argument("--layers-per-stage", type=int, default=8, help="Linear+ReLU blocks per stage")
    p.add_argument("--chunks", type=int, default=2, help="chunks per rank for the interleaved schedule")
    p.add_argument("--steps", type=int, default=7, help="timed steps per row (median, min, max)")
    p.add_argument("--json", help="write one record per (schedule, M) to this path")
    return p.parse_args(argv)


def make_model(P: int, V: int, args: argparse.Namespace) -> nn.Sequential:
    """P*V equal stages of `layers-per-stage` Linear+ReLU blocks (balanced by construction)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(P * V * args.layers_per_stage):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    return nn.Sequential(*layers)


def theory(schedule: str, P: int, M: int, V: int) -> float:
    """Bubble fraction of balanced stages (zb-h1: F, B and W of equal length; M >= P)."""
    if schedule == "zb-h1":
        return (P - 1) / (3 * M + P - 1)
    return (P - 1) / ((V if schedule == "interleaved" else 1) * M + P - 1)


def run_one(schedule: str, M: int, comm: MPI.Comm, args: argparse.Namespace) -> dict[str, Any] | None:
    """Time one (schedule, M); rank 0 returns the record."""
    P = comm.Get_size()
    name, recompute = schedule.removesuffix("+recompute"), schedule.endswith("+recompute")
    V = args.chunks if name == "interleaved" else 1
    if name == "interleaved" and M % P:
        return None
    model = make_model(P, V, args)
    # 2 Linear+ReLU entries per block: cut after every layers-per-stage blocks
    cuts = [2 * args.layers_per_stage * k for k in range(1, P * V)]
    pipe = Pipeline(model, comm, microbatches=M, schedule=name, partition_by=cuts, chunks=V, checkpoint=recompute)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M * args.micro_size, args.width, generator=g)
    y = torch.randn(M * args.micro_size, args.width, generator=g)
    loss = nn.functional.mse_loss
    pipe.train_step(x, y, loss)  # warm up: allocations, connections
    steps, waits, idles, means, peaks, replays = [], [], [], [], [], []
    pipe_schedules = build(name, P, M, V)
    for _ in range(args.steps):
        comm.Barrier()  # every step starts together
        t0 = time.perf_counter()
        pipe.train_step(x, y, loss)
        # one gather of every rank's (compute, elapsed, blocked) seconds; the rest is derived from it
        gathered = comm.allgather((pipe.last_compute_s, time.perf_counter() - t0, pipe.last_wait_s,
                                   pipe.last_action_s))
        ranks = [g[:3] for g in gathered]
        step = max(elapsed for _, elapsed, _ in ranks)
        # replay: the same schedule with these measured compute times and free, instant messages;
        # its busiest-stage idle is the bubble this machine's compute alone allows (the theory assumes
        # every action of a kind takes the same time; here they vary by a few percent)
        durations = [g[3] for g in gathered]
        replay = check(pipe_schedules, P, M, V, cost=lambda r, a: durations[r][a.op, a.micro, a.chunk])
        replays.append(replay.busiest_idle())
        steps.append(step)
        # fractions of the common step (a common start to the moment the last rank is done): a rank
        # that finishes early (the last stage, before the first stage's final backward) counts the
        # rest of the step too, as the theory does. idle = not computing; waiting = blocked in a
        # receive or done early (idle less Python and sends)
        idle = [1.0 - compute / step for compute, _, _ in ranks]
        # the bubble is the busiest stage's: the others also wait on it when stages run at unequal speeds
        compute, elapsed, blocked = max(ranks)
        idles.append(1.0 - compute / step)
        waits.append((blocked + step - elapsed) / step)
        means.append(sum(idle) / P)
        peaks.append(pipe.last_activation_bytes)
    per_rank_peak = comm.gather(max(peaks), root=0)
    pipe.close()
    if comm.Get_rank() != 0:
        return None
    rates = [len(x) / t for t in steps]
    return dict(schedule=schedule, P=P, M=M, V=V, rows=len(x), samples_per_s_median=statistics.median(rates),
                samples_per_s_min=min(rates), samples_per_s_max=max(rates), step_time_s=statistics.median(steps),
                bubble_measured=statistics.median(idles), waiting_busiest=statistics.median(waits),
                idle_mean=statistics.median(means),
                bubble_replay=statistics.median(replays), bubble_theory=theory(name, P, M, V),
                peak_activation_bytes=per_rank_peak)


def main(argv: list[str]) -> int:
    """Every (schedule, M): table, targets, JSON."""
    world = MPI.COMM_WORLD
    P = world.Get_size()
    args = parse_args(argv, P)
    torch.set_num_threads(1)  # ranks share the cores
    schedules = args.schedules.split(",")
    dist = init_gloo(world) if any(s in TORCH_SCHEDULES for s in schedules) else None
    records = [r for s in schedules for m in map(int, args.micro.split(","))
               if (r := (run_torch(s, m, world, args, make_model) if s in TORCH_SCHEDULES
                         else run_one(s, m, world, args))) is not None]
    if dist is not None:
        close_gloo(dist)
    if world.Get_rank() != 0:
        return 0

    def cell(value: float | None, fmt: str = ".3f") -> str:
        """A measured figure, or - where the row has none (torch's rows: step times only)."""
        return "-" if value is None else format(value, fmt)

    def mib(r: dict[str, Any], pick: Callable[[list[int]], int]) -> str:
        """One of the per-rank activation peaks, in MiB (- for torch's rows)."""
        peaks = r.get("peak_activation_bytes")
        return cell(None if peaks is None else pick(peaks) / 2**20, ".2f")

    rows = [dict(r, rate=f"{r['samples_per_s_median']:.0f}",
                 spread=f"{r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f}",
                 step=f"{r['step_time_s'] * 1e3:.1f}", bm=cell(r.get("bubble_measured")),
                 bwait=cell(r.get("waiting_busiest")), bmean=cell(r.get("idle_mean")),
                 bt=cell(r.get("bubble_theory")), brep=cell(r.get("bubble_replay")),
                 mem0=mib(r, lambda peaks: peaks[0]), memmax=mib(r, max))
            for r in records]
    print(f"# dmlmpi pipeline benchmark: P={P}, {args.micro_size} rows per microbatch, "
          f"{args.layers_per_stage} x Linear({args.width})+ReLU per stage")
    print(format_table(rows, [("schedule", "schedule", ""), ("M", "M", ""), ("V", "V", ""), ("rate", "samples/s", ""),
                              ("spread", "min-max", ""), ("step", "step(ms)", ""), ("bm", "bubble", ""), ("bwait", "waiting", ""),
                              ("bmean", "mean idle", ""),
                              ("brep", "replay", ""), ("bt", "theory", ""), ("mem0", "stage0 act MiB", ""), ("memmax", "max act MiB", "")]))
    print("\n# targets (medians of this run)")
    for r in records:
        if r["M"] >= 4 * P and r["schedule"] in ("gpipe", "1f1b") and P > 1:
            rel = abs(r["bubble_measured"] - r["bubble_theory"]) / r["bubble_theory"]
            print(f"{r['schedule']} M={r['M']}: bubble {r['bubble_measured']:.3f} vs theory {r['bubble_theory']:.3f}, "
                  f"{100 * rel:.0f}% off (<=10%: {'PASS' if rel <= 0.10 else 'MISS'}); replay of the measured "
                  f"compute times {r['bubble_replay']:.3f}: executor adds {r['bubble_measured'] - r['bubble_replay']:+.3f}, "
                  f"uneven action times {r['bubble_replay'] - r['bubble_theory']:+.3f}")
    by = {(r["schedule"], r["M"]): r for r in records}
    for (s, m), r in by.items():
        if s == "1f1b+recompute" and ("1f1b", m) in by:
            saved = 1 - r["peak_activation_bytes"][0] / by[("1f1b", m)]["peak_activation_bytes"][0]
            print(f"M={m}: recompute saves {100 * saved:.0f}% of 1F1B's stage-0 activation memory, "
                  f"step time x{r['step_time_s'] / by[('1f1b', m)]['step_time_s']:.2f}")
        if s == "zb-h1" and ("1f1b", m) in by and P > 1:
            one = by[("1f1b", m)]
            print(f"M={m}: zb-h1 bubble {r['bubble_measured']:.3f} vs 1F1B's {one['bubble_measured']:.3f} "
                  f"(x{r['bubble_measured'] / one['bubble_measured']:.2f}; theory x{r['bubble_theory'] / one['bubble_theory']:.2f}), "
                  f"step time x{r['step_time_s'] / one['step_time_s']:.3f}, stage-0 activations "
                  f"x{r['peak_activation_bytes'][0] / one['peak_activation_bytes'][0]:.2f}")
        peer = {"gpipe": "torch-gpipe", "1f1b": "torch-1f1b", "interleaved": "torch-interleaved",
                "zb-h1": "torch-zbv"}.get(s)
        if (peer, m) in by:
            print(f"M={m}: {s} step time {r['step_time_s'] * 1e3:.1f} ms = x{r['step_time_s'] / by[(peer, m)]['step_time_s']:.3f} "
                  f"{peer}'s ({by[(peer, m)]['step_time_s'] * 1e3:.1f} ms)")
        if s == "1f1b" and ("gpipe", m) in by:
            ratio = r["peak_activation_bytes"][0] / by[("gpipe", m)]["peak_activation_bytes"][0]
            print(f"M={m}: 1F1B / GPipe stage-0 activation memory = {ratio:.3f} (about P/M = {P / m:.3f}: "
                  f"{'PASS' if ratio <= 1.1 * P / m else 'MISS'})")
    if args.json:
        write_json(args.json, records)
    return 0
