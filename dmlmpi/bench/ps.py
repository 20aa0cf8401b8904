"""`python -m dmlmpi.bench ps`: ring all-reduce DP vs parameter server sync / async / SSP, with a straggler.

Run under `mpirun -n K` with K = workers + servers (default one server). Every variant trains the
default task (the training job's defaults: MNIST-1D CNN, AdamW, one-cycle schedule) through
`dmlmpi.train` on the same W = K - S worker ranks and the same data: `dp` is data parallel with the
ring all-reduce on the W workers alone (the server ranks wait), `sync`, `async` and `ssp` (s=2)
are `--mode ps`, and `async-own` is async with `--ps-pace own` (each worker at its own speed
until the servers have applied the run's budget of gradients, so a fast worker does more of them). Each runs once as it is and once with worker 1 (worker 0 when W = 1) slowed to half
speed: it sleeps, before each step, the median step time measured for `dp` without a straggler.
The runs write no checkpoints (in async and ssp modes a checkpoint makes every worker wait for the
slowest, which would measure the checkpoint policy rather than the consistency model).

Reported per variant: samples/s of all workers together (each worker's own samples/s summed; median,
min and max over the epochs), the step time (median over workers and epochs of a worker's seconds
per step), bytes
each worker sends per step (counted by the parameter server; for the ring 2(W-1)/W of the gradient
bytes plus nothing else, computed), the run's wall-clock seconds (a worker's own samples/s leaves
out what it waits outside its steps; the wall clock does not), and the test accuracy at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Any

from mpi4py import MPI

from dmlmpi import train

from .common import format_table, write_json

VARIANTS = ("dp", "sync", "async", "ssp", "async-own")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench ps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", type=int, default=1, help="server ranks (the last ones)")
    p.add_argument("--epochs", type=int, default=30, help="epochs of each run (30: the default task's)")
    p.add_argument("--staleness", type=int, default=2, help="the ssp variant's bound")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--no-straggler", action="store_true", help="skip the runs with a slowed worker")
    p.add_argument("--train-args", default="", help="more options for every run, e.g. '--samples 2000'")
    p.add_argument("--out", help="keep the run directories here (default: a temporary folder)")
    p.add_argument("--json", help="write one record per (variant, straggler) to this path")
    args = p.parse_args(argv)
    for v in args.variants.split(","):
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {','.join(VARIANTS)}")
    return args


def run(variant: str, straggler: tuple[int, float] | None, args: argparse.Namespace, root: str,
        world: MPI.Comm, dp_comm: MPI.Comm) -> dict[str, Any] | None:
    """Train one variant; rank 0 returns its record (from the run directory), others None."""
    name = variant + ("-straggler" if straggler else "")
    out = os.path.join(root, name)
    # no checkpoints during the run: in async and ssp modes a checkpoint is a barrier of all workers
    argv = ["--out", out, "--epochs", str(args.epochs), "--no-trace", "--checkpoint-every", str(1 << 30),
            *args.train_args.split()]
    if straggler:
        argv += ["--straggler", f"{straggler[0]}:{straggler[1]}"]
    if variant == "dp":
        argv += ["--algorithm", "ring"]
        if dp_comm != MPI.COMM_NULL:  # the workers only; server ranks wait at the barrier below
            train.main(argv, dp_comm)
    else:
        mode, _, pace = variant.partition("-")
        argv += ["--mode", "ps", "--servers", str(args.servers), "--ps-mode", mode,
                 "--staleness", str(args.staleness), "--ps-pace", pace or "even"]
        train.main(argv, world)
    world.Barrier()
    if world.Get_rank() != 0:
        return None
    return summarize(variant, straggler, out)


def summarize(variant: str, straggler: tuple[int, float] | None, out: str) -> dict[str, Any]:
    """One record from a finished run directory."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    workers = [r for r in records if r.get("role") == "worker"]
    epochs = min(len(w["epoch_samples_per_s"]) for w in workers)
    per_epoch = [sum(w["epoch_samples_per_s"][e] for w in workers) for e in range(epochs)]
    with open(os.path.join(out, "config.json")) as f:
        share = json.load(f)["batch_size"] / len(workers)  # samples a worker takes per step
    # one worker's seconds per step, from its throughput in each epoch (medians ignore warm-up epochs)
    step_time = statistics.median(share / w["epoch_samples_per_s"][e] for w in workers for e in range(epochs))
    params = summary.get("parameters", 0)
    if variant == "dp":  # the ring sends 2(W-1)/W of the gradient per step (reduce-scatter + all-gather)
        n = len(workers)
        sent = 2 * (n - 1) / n * params * 4
    else:
        sent = statistics.median(w["bytes_sent_per_step"] for w in workers)
    stale = [s for r in records if r.get("role") == "server" for s in r.get("staleness", [])]
    return dict(variant=variant, straggler=f"{straggler[0]}:{straggler[1]:.4f}" if straggler else "none",
                workers=len(workers), samples_per_s_median=statistics.median(per_epoch),
                samples_per_s_min=min(per_epoch), samples_per_s_max=max(per_epoch), step_time_s=step_time,
                bytes_sent_per_worker_step=sent, test_accuracy=summary["test_accuracy"],
                mean_staleness=statistics.mean(stale) if stale else 0.0, wall_s=summary["wall_s"])


def main(argv: list[str]) -> int:
    """Every variant with and without a straggler: table, targets, JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    size, rank = world.Get_size(), world.Get_rank()
    if not 1 <= args.servers < size:
        raise ValueError(f"bench ps: --servers {args.servers} on {size} ranks leaves no worker; launch more ranks")
    workers = size - args.servers
    # the data-parallel runs use the worker ranks only
    dp_comm = world.Split(0 if rank < workers else MPI.UNDEFINED, rank)
    root = args.out or (tempfile.mkdtemp(prefix="dmlmpi-bench-ps-") if rank == 0 else None)
    root = world.bcast(root, root=0)
    variants = args.variants.split(",")
    records: list[dict[str, Any] | None] = []
    for variant in variants:
        records.append(run(variant, None, args, root, world, dp_comm))
    # the straggler sleeps one normal step: half speed (dp's step time when measured, else the first variant's)
    base = next((r for r in records if r and r["variant"] == "dp"), records[0])
    delay = world.bcast(base["step_time_s"] if base else None, root=0)
    if not args.no_straggler:
        slow = 1 if workers > 1 else 0
        for variant in variants:
            records.append(run(variant, (slow, delay), args, root, world, dp_comm))
    if rank == 0:
        report([r for r in records if r], args, workers)
    return 0


def report(records: list[dict[str, Any]], args: argparse.Namespace, workers: int) -> None:
    """Print the table and the targets; write JSON."""
    rows = [dict(r, rate=f"{r['samples_per_s_median']:.0f}",
                 spread=f"{r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f}",
                 step=f"{r['step_time_s'] * 1e3:.2f}", sent=f"{r['bytes_sent_per_worker_step'] / 1024:.1f}",
                 acc=f"{r['test_accuracy']:.3f}", stale=f"{r['mean_staleness']:.2f}", wall=f"{r['wall_s']:.1f}")
            for r in records]
    print(f"# dmlmpi parameter-server benchmark: {workers} workers + {args.servers} server(s), "
          f"{args.epochs} epochs of the default task; ssp staleness {args.staleness}")
    print(format_table(rows, [("variant", "variant", ""), ("straggler", "straggler", ""), ("rate", "samples/s", ""),
                              ("spread", "min-max", ""), ("step", "step(ms)", ""), ("sent", "KiB sent/step", ""),
                              ("stale", "staleness", ""), ("wall", "wall(s)", ""), ("acc", "test acc", "")]))
    by = {(r["variant"], r["straggler"] != "none"): r for r in records}
    print("\n# targets (medians of this run)")
    if ("dp", False) in by and ("sync", False) in by:
        ratio = by[("sync", False)]["step_time_s"] / by[("dp", False)]["step_time_s"]
        print(f"sync PS step time / ring DP step time = {ratio:.2f}x (<=1.5x: {'PASS' if ratio <= 1.5 else 'MISS'})")
    for v in ("async", "ssp", "async-own"):
        if (v, True) in by and ("sync", True) in by:
            ratio = by[(v, True)]["samples_per_s_median"] / by[("sync", True)]["samples_per_s_median"]
            wall = by[("sync", True)]["wall_s"] / by[(v, True)]["wall_s"]
            print(f"straggler: {v} / sync samples/s = {ratio:.2f}x (>=1.5x: {'PASS' if ratio >= 1.5 else 'MISS'}); "
                  f"by the runs' wall clock (sync's / {v}'s) {wall:.2f}x")
        if (v, False) in by and ("sync", False) in by:
            gap = by[("sync", False)]["test_accuracy"] - by[(v, False)]["test_accuracy"]
            print(f"accuracy: {v} is {100 * gap:.1f} points below sync (<=2: {'PASS' if gap <= 0.02 else 'MISS'})")
    if args.json:
        write_json(args.json, records)
