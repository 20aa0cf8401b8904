"""`mpirun -n N python -m dmlmpi.train`: data-parallel training of a CNN on MNIST-1D (embedded default).

Every rank holds the whole model; each global batch is split over the ranks; after backward the
gradients are all-reduced (fused into buckets, ring or native by size) so every rank takes the same
optimizer step. The result equals single-process training with the same global batch.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import allreduce_fused
from dmlmpi.data import Dataset, global_batches, load_mnist1d, rank_share
from dmlmpi.entry import run_main
from dmlmpi.models import build


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options, each with a working default."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="cnn", choices=["cnn", "mlp"], help="reference model to train")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (split over ranks)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and sample order")
    p.add_argument("--data-seed", type=int, default=42, help="seed of the generated MNIST-1D data")
    p.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples to generate (80%% train)")
    p.add_argument("--algorithm", default="auto", choices=list(dcomm.ALGORITHMS), help="all-reduce algorithm")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="gradient fusion bucket size in MiB")
    p.add_argument("--out", default="runs/latest", help="run directory (config, metrics, summary)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "samples"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.lr <= 0 or args.bucket_mb <= 0:
        p.error("--lr and --bucket-mb must be positive")
    return args


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean loss) on a dataset held by every rank."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        loss = nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
        acc = (logits.argmax(1).numpy() == y).mean().item()
    model.train()
    return acc, loss


def train_step(model: nn.Module, opt: torch.optim.Optimizer, data: Dataset, batch: np.ndarray,
               world: MPI.Comm, args: argparse.Namespace) -> float:
    """One synchronous step on a global batch; returns this rank's share of the batch's mean loss."""
    mine = rank_share(batch, world.Get_rank(), world.Get_size())
    opt.zero_grad(set_to_none=False)
    logits = model(torch.from_numpy(data.x_train[mine]))
    # sum of per-sample losses / global batch size: summing this over ranks gives the global mean
    loss = nn.functional.cross_entropy(logits, torch.from_numpy(data.y_train[mine]), reduction="sum") / len(batch)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    # gradient all-reduce: sum of the ranks' partial gradients, fused into buckets
    allreduce_fused(grads, op="sum", algorithm=args.algorithm, comm=world,
                    bucket_bytes=int(args.bucket_mb * (1 << 20)), inplace=True)
    opt.step()
    return loss.item()


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate, and write the run directory (rank 0)."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if args.batch_size < size:
        raise ValueError(f"--batch-size {args.batch_size} is smaller than the {size} ranks: some ranks would get no data")
    torch.set_num_threads(1)  # ranks share the cores; one thread each avoids oversubscribing them twice
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        write_json(os.path.join(args.out, "config.json"), vars(args) | {"world_size": size})
    data = load_mnist1d(world, args.data_seed, args.samples)
    model = build(args.model, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "w") if rank == 0 else None
    start, samples, loss = time.perf_counter(), 0, float("nan")
    for epoch in range(args.epochs):
        batches = global_batches(len(data.y_train), args.batch_size, epoch, args.seed)
        share = sum(train_step(model, opt, data, batch, world, args) for batch in batches)
        samples += sum(len(b) for b in batches)
        # mean training loss of the epoch: one small all-reduce of the ranks' shares
        loss = float(dcomm.allreduce(np.array([share]), comm=world)[0]) / len(batches)
        acc, test_loss = evaluate(model, data.x_test, data.y_test)
        if rank == 0:
            rate = samples / (time.perf_counter() - start)
            print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  test acc {acc:.4f}  {rate:8.0f} samples/s", flush=True)
            metrics.write(json.dumps(dict(epoch=epoch + 1, loss=loss, test_loss=test_loss, test_accuracy=acc,
                                          samples_per_s=rate)) + "\n")
            metrics.flush()
    wall = time.perf_counter() - start
    acc, _ = evaluate(model, data.x_test, data.y_test)
    if rank == 0:
        metrics.close()
        summary = dict(mode="dp", world_size=size, test_accuracy=acc, final_loss=loss,
                       samples_per_s=samples / wall, wall_s=wall)
        write_json(os.path.join(args.out, "summary.json"), summary)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_main(main)
