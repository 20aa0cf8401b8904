"""`mpirun -n N python -m dmlmpi.train`: data-parallel training; by default a CNN on MNIST-1D.

Wiring only: options (dmlmpi.config) -> data (dmlmpi.data) -> model in DataParallel
(dmlmpi.parallel) -> loop -> run directory (dmlmpi.telemetry, dmlmpi.checkpoint). Every rank holds
the whole model and a share of each global batch; gradients are averaged during backward; the run
equals single-process training with the same global batch.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import checkpoint, config
from dmlmpi import comm as dcomm
from dmlmpi.data import Dataset, DistributedSampler, load_dataset, rank_share
from dmlmpi.entry import run_main
from dmlmpi.models import build
from dmlmpi.parallel import DataParallel
from dmlmpi.telemetry import ProgressBar, RunLog, Timeline

RUN_FILES = ("metrics.jsonl", "summary.json", "trace.json", checkpoint.LATEST)


def pick_device(choice: str, world: MPI.Comm) -> torch.device:
    """CPU, or GPU local_rank % gpus_per_node; the local rank comes from a shared-memory split."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible to this rank")
    # ranks on the same node share memory: their rank in that communicator is the local rank
    node = world.Split_type(MPI.COMM_TYPE_SHARED, key=world.Get_rank())
    local_rank = node.Get_rank()
    node.Free()
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def fresh_run_dir(out: str, world: MPI.Comm) -> None:
    """A new (not resumed) run starts clean: rank 0 removes an earlier run's files from `out`."""
    if world.Get_rank() == 0 and os.path.isdir(out):
        for name in os.listdir(out):
            if name in RUN_FILES or checkpoint._NAME.match(name):
                os.remove(os.path.join(out, name))
    world.Barrier()  # nobody writes into `out` before it is clean


def make_schedule(opt: torch.optim.Optimizer, args: argparse.Namespace, total_steps: int) -> Any:
    """The learning-rate schedule over the whole run."""
    if args.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, total_steps))
    if args.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def evaluate(model: nn.Module, data: Dataset, device: torch.device, world: MPI.Comm) -> tuple[float, float]:
    """(accuracy, mean loss) on the test set; each rank scores a share, one all-reduce adds them up."""
    mine = rank_share(np.arange(len(data.y_test)), world.Get_rank(), world.Get_size())
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x_test[mine]).to(device))
        labels = torch.from_numpy(data.y_test[mine]).to(device)
        local = np.array([(logits.argmax(1) == labels).sum().item(),
                          nn.functional.cross_entropy(logits, labels, reduction="sum").item()])
    model.train()
    # sum of correct predictions and of losses over the ranks
    correct, loss_sum = dcomm.allreduce(local, comm=world)
    return correct / len(data.y_test), loss_sum / len(data.y_test)


def train_step(model: DataParallel, opt: torch.optim.Optimizer, data: Dataset, idx: np.ndarray, batch: int,
               device: torch.device, tl: Timeline) -> float:
    """One synchronous step; returns this rank's share of the global batch's mean loss."""
    x = torch.from_numpy(data.x_train[idx]).to(device)
    y = torch.from_numpy(data.y_train[idx]).to(device)
    opt.zero_grad(set_to_none=False)  # .grad are views into DataParallel's buckets: zero them in place
    with tl.span("forward"):
        share = nn.functional.cross_entropy(model(x), y, reduction="sum") / batch
    with tl.span("backward"):
        # DataParallel averages over ranks; scaled by the world size the average is the global mean
        (share * model.comm.Get_size()).backward()
    with tl.span("optimizer"):
        opt.step()
    return share.item()


def save(args: argparse.Namespace, step: int, model: DataParallel, opt: Any, sched: Any,
         sampler: DistributedSampler, world: MPI.Comm, extra: dict[str, Any]) -> None:
    """A complete, atomic checkpoint of everything a resumed run needs."""
    checkpoint.save(args.out, step, dict(model=model.module.state_dict(), optimizer=opt.state_dict(),
                                         schedule=sched.state_dict(), sampler=sampler.state_dict(), **extra), world)


def main(argv: list[str] | None = None) -> int:
    """Train, evaluate each epoch, checkpoint, and write the run directory."""
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    args = config.parse(argv, size)
    torch.set_num_threads(args.threads)  # ranks share the node's cores: one thread each by default
    device = pick_device(args.device, world)
    if not args.resume:
        fresh_run_dir(args.out, world)
    log = RunLog(args.out, world, verbose=args.verbose)
    log.write_config(config.describe(args) | {"world_size": size, "device": str(device)})
    tl = Timeline(world, enabled=args.trace)
    data = load_dataset(args.dataset, world, args.data_dir, args.data_seed, args.samples)
    model = DataParallel(build(args.model, args.seed, data.x_train.shape[1:], args.dataset).to(device), world,
                         bucket_mb=args.bucket_mb, algorithm=args.algorithm, compression=args.compression, timeline=tl)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = DistributedSampler(len(data.y_train), args.batch_size, rank, size, args.seed, args.tail)
    sched = make_schedule(opt, args, args.epochs * len(sampler))
    step, samples_done, wall_before = 0, 0, 0.0
    if args.resume and (path := checkpoint.latest_path(args.out)) is not None:
        state = checkpoint.load(path, world)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        step, samples_done, wall_before = state["step"], state["samples"], state["wall_s"]
        log.info(f"resumed from {path} at step {step} (epoch {sampler.epoch + 1}, batch {sampler.next_batch})")
    elif args.resume:
        log.info(f"no checkpoint in {args.out}: starting from the beginning")
    log.info(f"dmlmpi.train: {args.mode} on {size} ranks, {device}, {args.dataset} "
             f"({len(data.y_train)} train / {len(data.y_test)} test), {sum(p.numel() for p in model.parameters())} parameters")
    bar = ProgressBar(world, total=len(sampler), epochs=args.epochs)
    start, loss, shares, stopped = time.perf_counter(), float("nan"), [], False

    def elapsed() -> float:
        """Seconds of training so far, across resumes."""
        return wall_before + time.perf_counter() - start
    for epoch in range(sampler.epoch, args.epochs):
        sampler.set_epoch(epoch)
        bar.start_epoch(epoch + 1, len(sampler))
        for idx in sampler:
            with tl.span(f"step {step + 1}", cat="step"):
                shares.append(train_step(model, opt, data, idx, args.batch_size, device, tl))
                sched.step()
            step += 1
            samples_done += args.batch_size
            if step % args.log_every == 0 or sampler.next_batch == len(sampler):
                # global mean loss of the steps since the last log: one small all-reduce
                loss = float(dcomm.allreduce(np.array([sum(shares)]), comm=world)[0]) / len(shares)
                shares = []
                log.log(dict(step=step, epoch=epoch + 1, loss=loss, lr=sched.get_last_lr()[0],
                             samples_per_s=samples_done / elapsed()))
            if sampler.next_batch < len(sampler):  # the epoch's last line comes with its accuracy, below
                bar.update(sampler.next_batch, loss=loss, samples=args.batch_size)
            stopped = args.max_steps > 0 and step >= args.max_steps
            if stopped or (args.checkpoint_every and step % args.checkpoint_every == 0):
                save(args, step, model, opt, sched, sampler, world,
                     dict(samples=samples_done, wall_s=elapsed()))
            if stopped:
                break
        if stopped:
            break
        acc, test_loss = evaluate(model, data, device, world)
        log.log(dict(step=step, epoch=epoch + 1, test_accuracy=acc, test_loss=test_loss))
        bar.update(len(sampler), loss=loss, samples=args.batch_size, accuracy=acc)
        if not args.checkpoint_every:
            save(args, step, model, opt, sched, sampler, world,
                 dict(samples=samples_done, wall_s=elapsed()))
    bar.close()
    wall = elapsed()
    acc, test_loss = evaluate(model, data, device, world)
    summary = dict(mode=args.mode, world_size=size, device=str(device), dataset=args.dataset, steps=step,
                   epochs_done=sampler.epoch, stopped_early=stopped, test_accuracy=acc, test_loss=test_loss,
                   final_loss=loss, samples_per_s=samples_done / wall, wall_s=wall)
    log.write_summary(summary)
    if args.trace:
        tl.write(os.path.join(args.out, "trace.json"))
    log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    log.close()
    model.close()
    return 0


if __name__ == "__main__":
    run_main(main)
