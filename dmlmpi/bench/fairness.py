"""`python -m dmlmpi.bench fairness`: q-FFL's finding on MNIST-1D, q-FedAvg against FedAvg.

Li et al. 2020 ("Fair Resource Allocation in Federated Learning") train with q-FedAvg, which gives
the clients with a higher loss more weight, and report that the global model's accuracy is spread
more evenly over the clients than with FedAvg (lower variance, a better worst 10%) at a similar
average. The same here: 100 clients holding the FedAvg paper's label shards (non-IID), C = 0.1,
E local epochs of B = 10 on the MNIST-1D CNN, plain SGD, a fixed number of rounds; each
configuration over several seeds (data split, initial model, sampling). With non-IID clients the
global model swings from round to round, so each run's figures are the means over the evaluations
of its last --last rounds (every --eval-every rounds); the table gives the median and the min-max
over the seeds of the test accuracy and of the client accuracy spread (`dmlmpi.federated.fairness`:
the model's per-class test accuracy weighted by each client's label mix). FedAvg is the peer
measured in the same run (q = 0 is FedAvg with equal client weights).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from mpi4py import MPI

from dmlmpi.data import Dataset, load_mnist1d
from dmlmpi.federated.simulation import FLConfig, Simulation
from dmlmpi.models import build

from .common import format_table, write_json

METRICS = ["test_accuracy", "client_accuracy_mean", "client_accuracy_std", "client_accuracy_worst10",
           "client_accuracy_best10"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench fairness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=400)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--client-lr", type=float, default=0.15)
    p.add_argument("--data", default="shards", choices=["shards", "dirichlet", "iid"], help="client data split")
    p.add_argument("--q", default="1,3", help="comma-separated q of the q-FedAvg rows (FedAvg always runs)")
    p.add_argument("--qffl-lr", default="0,15",
                   help="comma-separated step sizes 1/L of the q-FedAvg rows (0: the client lr, the paper's L)")
    p.add_argument("--seeds", type=int, default=5, help="seeds per configuration (0, 1, ...)")
    p.add_argument("--last", type=int, default=50, help="average the evaluations of this many final rounds")
    p.add_argument("--eval-every", type=int, default=5, help="evaluate every this many rounds")
    p.add_argument("--json", help="write one record per (configuration, seed) to this path")
    return p.parse_args(argv)


def configurations(args: argparse.Namespace) -> list[dict[str, Any]]:
    """FedAvg, then q-FedAvg for every (q, 1/L) asked."""
    rows = [dict(strategy="fedavg", qffl_q=0.0, qffl_lr=0.0)]
    for lr in (float(x) for x in args.qffl_lr.split(",")):
        for q in (float(x) for x in args.q.split(",")):
            rows.append(dict(strategy="qfedavg", qffl_q=q, qffl_lr=lr))
    return rows


def step_size(conf: dict[str, Any], client_lr: float) -> float | None:
    """q-FedAvg's 1/L as run (its 0 means the client lr); None for FedAvg."""
    if conf["strategy"] != "qfedavg":
        return None
    return conf["qffl_lr"] or client_lr


def run(cfg: FLConfig, data: Dataset, comm: MPI.Comm, last: int) -> dict[str, Any] | None:
    """Train cfg.rounds rounds; the server's scores averaged over the evaluations of the last rounds (else None)."""
    sim = Simulation(build("cnn", cfg.seed, (40,)), data, cfg, comm)
    start = time.perf_counter()
    history = sim.run()
    if not history:
        return None
    evaluated = [r for r in history if r["round"] > cfg.rounds - last and "test_accuracy" in r]
    return dict({m: statistics.fmean(r[m] for r in evaluated) for m in METRICS}, evaluations=len(evaluated),
                seconds=time.perf_counter() - start)


def main(argv: list[str]) -> int:
    """Run every configuration over the seeds; print medians (min-max) of the accuracy and its spread."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)
    data = load_mnist1d(world)
    records = []
    for conf in configurations(args):
        for seed in range(args.seeds):
            cfg = FLConfig(clients=args.clients, fraction=args.fraction, rounds=args.rounds,
                           local_epochs=args.local_epochs, local_batch=10, client_lr=args.client_lr,
                           client_momentum=0.0, client_data=args.data, seed=seed, eval_every=args.eval_every, **conf)
            last = run(cfg, data, world, args.last)
            if last is not None:
                records.append(dict(conf, seed=seed, rounds=args.rounds, ranks=world.Get_size(),
                                    step=step_size(conf, args.client_lr),
                                    seconds=last["seconds"], evaluations=last["evaluations"],
                                    **{m: last[m] for m in METRICS}))
                if world.Get_rank() == 0:
                    r = records[-1]
                    print(f"  {r['strategy']} q={r['qffl_q']:g} 1/L={r['step']} seed {seed}: "
                          f"acc {r['test_accuracy']:.3f}, clients std {r['client_accuracy_std']:.3f}, worst 10% "
                          f"{r['client_accuracy_worst10']:.3f} ({r['seconds']:.0f} s)", flush=True)
    if world.Get_rank() != 0:
        return 0
    rows = []
    for conf in configurations(args):
        mine = [r for r in records if all(r[k] == v for k, v in conf.items())]
        row: dict[str, Any] = dict(strategy=conf["strategy"], q=f"{conf['qffl_q']:g}",
                                   step="-" if mine[0]["step"] is None else f"{mine[0]['step']:g}")
        for m in METRICS:
            values = [r[m] for r in mine]
            row[m] = f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        rows.append(row)
    print(f"\nAfter {args.rounds} rounds, {args.clients} clients ({args.data}), C = {args.fraction}, "
          f"E = {args.local_epochs}, B = 10, client lr {args.client_lr}, MNIST-1D CNN, {world.Get_size()} ranks; "
          f"each run's mean over its last {args.last} rounds' evaluations, median (min-max) over {args.seeds} "
          f"seed(s):")
    print(format_table(rows, [("strategy", "strategy", ""), ("q", "q", ""), ("step", "1/L", ""),
                              ("test_accuracy", "test acc", ""), ("client_accuracy_mean", "clients mean", ""),
                              ("client_accuracy_std", "clients std", ""),
                              ("client_accuracy_worst10", "worst 10%", ""),
                              ("client_accuracy_best10", "best 10%", "")]))
    if args.json:
        write_json(args.json, records)
    return 0
