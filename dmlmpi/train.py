"""`mpirun -n N python -m dmlmpi.train`: distributed training; by default a CNN on MNIST-1D, data parallel.

Wiring only: options (dmlmpi.config) -> data (dmlmpi.data) -> the mode's Trainer (dmlmpi.trainers:
DataParallel or ParameterServer from dmlmpi.parallel) -> loop -> run directory (dmlmpi.telemetry,
dmlmpi.checkpoint). The ranks that train each take a share of every global batch; in ps mode the
last --servers ranks serve the parameters instead of running the loop.
"""
from __future__ import annotations

from dmlmpi.signal_latch import SignalLatch

# `python -m dmlmpi.train`: catch SIGUSR1/SIGTERM before the imports below (MPI and torch take a second
# or two): a signal during start-up then stops the run at its first step, with a checkpoint (exit 99)
STARTUP_SIGNALS = SignalLatch() if __name__ == "__main__" else None

import argparse  # noqa: E402 - after the latch, on purpose
import itertools
import os
import time
import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import checkpoint, config, elastic, preempt
from dmlmpi.data import Dataset, DistributedSampler, load_dataset
from dmlmpi.entry import run_main
from dmlmpi.models import build
from dmlmpi.parallel import pace
from dmlmpi.telemetry import ProgressBar, RunLog, Timeline, atomic_write_json
from dmlmpi.trainers import DPTrainer, PipelineTrainer, PSTrainer, Trainer

RUN_FILES = ("metrics.jsonl", "summary.json", "trace.json", "clients.json", checkpoint.LATEST)


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
            if name in RUN_FILES or checkpoint.owned(name):
                checkpoint.remove(os.path.join(out, name))
    world.Barrier()  # nobody writes into `out` before it is clean


def model_of(args: argparse.Namespace, data: Dataset) -> nn.Sequential:
    """The --model for the data's inputs, drawn from --seed (the same on every rank)."""
    return build(args.model, args.seed, data.x_train.shape[1:], args.dataset, experts=args.moe_experts, k=args.moe_k)


def make_trainer(args: argparse.Namespace, model: nn.Module, data: Dataset, world: MPI.Comm, device: torch.device,
                 tl: Timeline, previous: Trainer | None = None) -> Trainer:
    """The Trainer of --mode, with the learning-rate schedule sized to the whole run.

    `previous`: the trainer this one replaces after an elastic recovery (closed here).
    """
    if previous is not None:
        previous.close()
    train_ranks = config.training_ranks(args, world.Get_size())
    steps_per_epoch = len(DistributedSampler(len(data.y_train), args.batch_size, 0, train_ranks, args.seed, args.tail))
    kind = {"ps": PSTrainer, "pipeline": PipelineTrainer, "hybrid": PipelineTrainer}.get(args.mode, DPTrainer)
    return kind(model, data, args, world, device, args.epochs * steps_per_epoch, tl)


def gather_stats(trainer: Trainer, world: MPI.Comm, rates: list[float], mine: list[float], log: RunLog) -> float:
    """Every rank's figures to rank 0's metrics; returns the training ranks' summed throughput (each sample once)."""
    record = dict(trainer.stats(), rank=world.Get_rank(), role="server" if trainer.is_server else "worker")
    if not trainer.is_server:
        samples, seconds, steps, check_s, adopted = mine
        record.update(steps=int(steps), steps_adopted=int(adopted), samples=int(samples), seconds=seconds,
                      samples_per_s=samples / seconds if seconds else 0.0, epoch_samples_per_s=rates,
                      stop_check_us_per_step=1e6 * check_s / steps if steps else 0.0)
    # gather: one record per rank to rank 0 (end of run only)
    everyone = world.gather(record, root=0)
    if everyone is None:
        return 0.0
    for record in everyone:
        log.log(record)
    workers = [r for r in everyone if r["role"] == "worker"]
    # ranks of one pipeline all see the same samples: count each global batch share once
    shares = trainer.data_size or len(workers)
    return sum(r["samples_per_s"] for r in workers) * shares / max(1, len(workers))


def main(argv: list[str] | None = None, comm: MPI.Comm | None = None, signals: SignalLatch | None = None) -> int:
    """Train on the ranks of `comm` (default COMM_WORLD), evaluate each epoch, checkpoint, write the run directory.

    `signals`: a SIGUSR1/SIGTERM latch installed earlier (else one is installed here).
    """
    signals = SignalLatch() if signals is None else signals
    world = MPI.COMM_WORLD if comm is None else comm
    size = world.Get_size()
    args = config.parse(argv, size)
    torch.set_num_threads(args.threads)  # ranks share the node's cores: one thread each by default
    device = pick_device(args.device, world)
    if not args.resume:
        fresh_run_dir(args.out, world)
    log = RunLog(args.out, world, verbose=args.verbose)
    log.write_config(config.describe(args) | {"world_size": size, "device": str(device)})
    tl = Timeline(world, enabled=args.trace)
    data = load_dataset(args.dataset, world, args.data_dir, args.data_seed, args.samples)
    if args.mode == "fl":
        return train_federated(args, world, data, device, log, tl, signals)
    trainer = make_trainer(args, model_of(args, data).to(device),
                           data, world, device, tl)
    team = trainer.comm  # the ranks that run the training loop (all but the servers)
    share_rank = team.Get_rank() if trainer.data_rank is None else trainer.data_rank
    share_size = team.Get_size() if trainer.data_size is None else trainer.data_size
    sampler = DistributedSampler(len(data.y_train), args.batch_size, share_rank, share_size, args.seed, args.tail)
    step, samples_done, wall_before = 0, 0, 0.0
    # ps async at its own pace: each worker its own place in the data; the servers say when to stop
    own = isinstance(trainer, PSTrainer) and trainer.own_pace
    if args.resume and (path := checkpoint.latest_path(args.out)) is not None:
        state = checkpoint.load(path, world)
        trainer.load(state)
        if own and not trainer.is_server:
            if len(state["samplers"]) != team.Get_size():
                raise ValueError(f"--ps-pace own: the checkpoint has {len(state['samplers'])} workers' places in the "
                                 f"data, this run has {team.Get_size()} workers")
            sampler.load_state_dict(state["samplers"][team.Get_rank()])
        else:
            sampler.load_state_dict(state["sampler"])
        step, samples_done, wall_before = state["step"], state["samples"], state["wall_s"]
        log.info(f"resumed from {path} at step {step} (epoch {sampler.epoch + 1}, batch {sampler.next_batch})")
    elif args.resume:
        log.info(f"no checkpoint in {args.out}: starting from the beginning")
    n_params = getattr(trainer, "n_params", None) or sum(p.numel() for p in trainer.model_parameters())
    log.info(f"dmlmpi.train: {describe_mode(args, size)}, {device}, {args.dataset} "
             f"({len(data.y_train)} train / {len(data.y_test)} test), {n_params} parameters")
    if trainer.describe():
        log.info(trainer.describe())
    start, loss, stopped, preempted = time.perf_counter(), float("nan"), False, False
    failures: list[dict] = []  # --elastic: one record per recovered rank failure
    # this rank's samples, training seconds, steps, seconds spent agreeing on a stop, and steps taken over
    # from the furthest survivor at an --elastic recovery instead of made here, in this run; samples/s per epoch
    mine, rates = [0, 0.0, 0, 0.0, 0], []

    def elapsed() -> float:
        """Seconds of training so far, across resumes."""
        return wall_before + time.perf_counter() - start

    def save() -> None:
        """A complete, atomic checkpoint of everything a resumed run needs."""
        extra = {}
        if own:
            # gather: every worker's own place in the data to rank 0 (each resumes from its own)
            extra["samplers"] = team.gather(sampler.state_dict(), root=0)
        trainer.save(args.out, step, dict(sampler=sampler.state_dict(), samples=samples_done, wall_s=elapsed(), **extra))

    def obey(code: int) -> bool:
        """Own pace: act on the first server's answer (dmlmpi.parallel.pace); True when it stops this worker."""
        nonlocal stopped, preempted
        if code == pace.GO:
            return False
        # every worker joins every checkpoint, and the one at its stop, however it is told: a worker
        # that starts late may find the others already in one, or the budget already spent
        save()
        preempted = stopped = code == pace.PREEMPTED
        return code != pace.CHECKPOINT

    # workers (every rank but ps mode's servers): progress bar and the per-step stop agreement
    bar = ProgressBar(team, total=len(sampler), epochs=0 if own else args.epochs, active=not trainer.is_server)
    stop = preempt.StopAgreement(team, latch=signals) if not trainer.is_server else None  # SIGUSR1/SIGTERM: checkpoint, exit 99
    if trainer.is_server:
        preempt.defer_signals()
    # the last step this rank completed, and where the sampler stood then (what --elastic recovers to)
    completed = dict(step=step, samples=samples_done, sampler=sampler.state_dict())

    def train_epochs() -> None:
        """The epochs from where the sampler stands; sets `stopped` / `preempted` when stopping early."""
        nonlocal step, samples_done, loss, stopped, preempted, completed
        shares: list[float] = []
        # own pace: the first server's answer to the first pull may already call a checkpoint or a stop
        halted = own and obey(trainer.ps.pull())
        if halted:
            return
        # own pace: a worker goes through its share again and again, until the servers say stop
        for epoch in itertools.count(sampler.epoch) if own else range(sampler.epoch, args.epochs):
            sampler.set_epoch(epoch)
            bar.start_epoch(epoch + 1, len(sampler))
            epoch_start, epoch_samples = time.perf_counter(), 0
            for idx in sampler:
                t0 = time.perf_counter()
                if own:  # a signal here asks the servers (in the push header) to stop every worker
                    trainer.ps.stop_requested = stop.received is not None
                with tl.span(f"step {step + 1}", cat="step"):
                    if args.straggler is not None and args.straggler[0] == team.Get_rank():
                        with tl.span("straggler sleep", cat="idle"):
                            time.sleep(args.straggler[1])
                    shares.append(trainer.step(idx, args.batch_size))
                mine[0] += len(idx)
                mine[1] += time.perf_counter() - t0
                mine[2] += 1
                epoch_samples += len(idx)
                step += 1
                samples_done += args.batch_size
                completed = dict(step=step, samples=samples_done, sampler=sampler.state_dict())
                if step % args.log_every == 0 or sampler.next_batch == len(sampler):
                    loss = trainer.logged_loss(shares)
                    shares = []
                    log.log(dict(step=step, epoch=epoch + 1, loss=loss, lr=trainer.lr(),
                                 samples_per_s=samples_done / elapsed(),
                                 **trainer.step_stats()))
                if sampler.next_batch < len(sampler):  # the epoch's last line comes with its accuracy, below
                    bar.update(sampler.next_batch, loss=loss, samples=args.batch_size)
                if own:
                    # the first server's answer to this push: go on, checkpoint (every worker is told,
                    # so all join it), or stop, for a signal or the budget
                    halted = obey(trainer.ps.code)
                    if halted:
                        break
                    continue
                preempted = stop.should_stop()  # collective: the same answer on every rank at this step
                stopped = preempted or (args.max_steps > 0 and step >= args.max_steps)
                if stopped or (args.checkpoint_every and step % args.checkpoint_every == 0):
                    save()
                if stopped:
                    break
            rates.append(epoch_samples / (time.perf_counter() - epoch_start))
            if stopped or halted:
                break
            result = trainer.evaluate(data)
            if result is not None:
                log.log(dict(step=step, epoch=epoch + 1, test_accuracy=result[0], test_loss=result[1]))
            bar.update(len(sampler), loss=loss, samples=args.batch_size,
                       accuracy=None if result is None else result[0])
            if not args.checkpoint_every and not own:  # own pace: the servers call the checkpoints
                save()

    while True:
        try:
            if trainer.is_server:
                trainer.serve(args.out)
            else:
                train_epochs()
            break
        except Exception as exc:  # noqa: BLE001 - only a process failure under --elastic is handled
            if not (args.elastic and elastic.is_failure(exc, world)):
                raise
        # --elastic: a rank died; go on with the survivors
        t_fail = time.perf_counter()
        servers = elastic.world_ranks(world)[world.Get_size() - args.servers:] if args.mode == "ps" else []
        rec = elastic.recover(world, completed["step"], extra=trainer.comms() + ([stop.comm] if stop else []))
        if set(servers) & set(rec.dead):
            raise elastic.CannotContinue(f"parameter server rank(s) {sorted(set(servers) & set(rec.dead))} died: their shards "
                               "of the parameters are gone, the run cannot go on (resume from the last checkpoint)")
        source = rec.comm.Get_rank() == rec.source
        # broadcast: the furthest survivor's step and data position to every survivor (every worker must
        # make the same number of steps from here: they meet in the per-step stop agreement)
        state = rec.comm.bcast(completed if source else None, root=rec.source)
        # dp: the furthest survivor's model and optimizer too; ps async: each rank keeps its own
        carry = trainer.carry()
        state["trainer"] = rec.comm.bcast(carry if source else None, root=rec.source) if trainer.shared_state else carry
        world = rec.comm
        trainer = make_trainer(args, model_of(args, data).to(device),
                               data, world, device, tl, previous=trainer)
        trainer.restore(state["trainer"])
        team = trainer.comm
        # re-shard: the same global batches, split over the surviving workers
        sampler = DistributedSampler(len(data.y_train), args.batch_size, team.Get_rank(), team.Get_size(),
                                     args.seed, args.tail)
        sampler.load_state_dict(state["sampler"])
        if not trainer.is_server:  # a worker behind the furthest survivor skips to its step
            mine[4] += state["step"] - completed["step"]
        step, samples_done, completed = state["step"], state["samples"], state
        for part in (stop, log, tl):
            if part is not None:
                part.rebind(team if part is stop else world)
        bar.active = not trainer.is_server and team.Get_rank() == 0
        event = dict(event="rank failure", step=step, dead_ranks=rec.dead, world_size=world.Get_size(),
                     members=rec.members, shrink_s=rec.seconds, recovery_s=time.perf_counter() - t_fail)
        failures.append(event)
        log.log(event)
        log.info(f"--elastic: rank(s) {rec.dead} died; {world.Get_size()} survivor(s) (world ranks {rec.members}) "
                 f"go on from step {step} (recovered in {event['recovery_s']:.3f} s)")
    if stop is not None:
        stop.close()
        mine[3] = stop.seconds
        bar.close()
        if preempted:
            why = stop.received.name if stop.received else "another rank's signal"
            log.info(f"stopped for a signal ({why}) at step {step}: checkpoint written, "
                     f"exiting with status {preempt.PREEMPTED_EXIT} (resume with --resume)")
        trainer.finish()
    # the servers of ps mode learn it from the workers: all ranks exit alike (at own pace a worker
    # told "budget spent" before a signal reached the servers still exits with the others)
    preempted = bool(world.allreduce(int(preempted), op=MPI.MAX))
    wall = elapsed()
    throughput = gather_stats(trainer, world, rates, mine, log)
    if preempted:  # no final evaluation or summary: the run is not over, and the time before the limit is short
        log.close()
        trainer.close()
        return preempt.PREEMPTED_EXIT
    result = None if trainer.is_server else trainer.evaluate(data, final=True)
    if world.Get_rank() == 0:
        acc, test_loss = result
        summary = dict(mode=args.mode, world_size=size, device=str(device), dataset=args.dataset, steps=step,
                       epochs_done=sampler.epoch, stopped_early=stopped, test_accuracy=acc, test_loss=test_loss,
                       final_loss=loss, samples_per_s=throughput, wall_s=wall, parameters=n_params)
        if args.elastic:
            summary.update(elastic=True, failures=failures, world_size_end=world.Get_size())
        if args.mode == "ps":
            summary.update(servers=args.servers, workers=team.Get_size(), ps_mode=args.ps_mode,
                           staleness=args.staleness if args.ps_mode == "ssp" else None)
        log.write_summary(summary)
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if args.trace:
        tl.write(os.path.join(args.out, "trace.json"))
    log.close()
    trainer.close()
    return 0


def train_federated(args: argparse.Namespace, world: MPI.Comm, data: Dataset, device: torch.device, log: RunLog,
                    tl: Timeline, signals: SignalLatch) -> int:
    """--mode fl: rounds of the federated simulation, one metrics record per round, checkpoint, summary."""
    from dmlmpi.federated.simulation import FLConfig, Simulation  # federated imports stay out of the other modes
    cfg = FLConfig.from_args(args)
    sim = Simulation(model_of(args, data), data, cfg, world, device, tl)
    wall_before = 0.0
    if args.resume and (path := checkpoint.latest_path(args.out)) is not None:
        state = checkpoint.load(path, world)
        sim.load_state(state)
        wall_before = state["wall_s"]
        log.info(f"resumed from {path} after round {sim.round}")
    elif args.resume:
        log.info(f"no checkpoint in {args.out}: starting from the beginning")
    stats = sim.client_stats()
    if world.Get_rank() == 0:
        atomic_write_json(log.path("clients.json"), stats)
    sizes = np.array([s["size"] for s in stats])
    classes = np.array([len(s["classes"]) for s in stats])
    log.info(f"dmlmpi.train: {describe_mode(args, world.Get_size())}, {device}, {args.dataset} "
             f"({len(data.y_train)} train / {len(data.y_test)} test), {sim.size} parameters; "
             f"{cfg.clients} clients ({cfg.client_data}): {sizes.min()}-{sizes.max()} samples, "
             f"{classes.min()}-{classes.max()} classes each (clients.json)")
    start = time.perf_counter()
    bar = ProgressBar(world, total=cfg.rounds, epochs=0, unit="round", rate="clients")
    bar.start_epoch(1, cfg.rounds)
    last: dict = {}
    done_here, preempted = 0, False
    stop = preempt.StopAgreement(world, latch=signals)  # SIGUSR1/SIGTERM: checkpoint and exit PREEMPTED_EXIT
    failures: list[dict] = []  # --elastic: one record per recovered rank failure
    homes = elastic.world_ranks(world)  # with one rank per client, client c lives on world rank homes[c % n]
    completed = sim.round  # rounds the server has completed (it alone holds the global model)
    while sim.round < cfg.rounds:
        try:
            with tl.span(f"round {sim.round + 1}", cat="step"):
                record = sim.step()
            done_here += 1
            if record is not None:
                completed = sim.round
                log.log(record)
                last.update({k: v for k, v in record.items() if v is not None})
                bar.update(sim.round, loss=record["train_loss"], samples=record["participants"],
                           accuracy=record.get("test_accuracy"))
            preempted = stop.should_stop()  # collective: the same answer on every rank after this round
            done = preempted or (args.max_steps > 0 and sim.round >= args.max_steps)
            if done or sim.round == cfg.rounds or sim.round % max(1, args.checkpoint_every) == 0:
                state = sim.state()
                checkpoint.save(args.out, sim.round, dict(state or {}, wall_s=wall_before + time.perf_counter() - start),
                                world)
            if done:
                break
        except Exception as exc:  # noqa: BLE001 - only a process failure under --elastic is handled
            if not (args.elastic and elastic.is_failure(exc, world)):
                raise
            # --elastic: a client rank died; the survivors redo the round without its clients
            t_fail = time.perf_counter()
            rec = elastic.recover(world, completed if sim.is_server else -1, extra=[*sim.comms(), stop.comm])
            if homes[0] in rec.dead:
                raise elastic.CannotContinue(f"the federated server (world rank {homes[0]}) died: the global model is gone, "
                                   "the run cannot go on (resume from the last checkpoint)") from exc
            lost = {c for c in range(cfg.clients) if homes[c % len(homes)] in rec.dead}
            # broadcast: the server's state after its last completed round, to every survivor
            state = rec.comm.bcast(sim.server_state(completed, {}) if sim.is_server else None, root=rec.source)
            world = rec.comm
            sim = Simulation(model_of(args, data), data, cfg, world,
                             device, tl)
            sim.load_state(state)
            sim.lost |= lost
            for part in (stop, log, tl):
                part.rebind(world)
            bar.active = world.Get_rank() == 0
            event = dict(event="rank failure", round=completed, dead_ranks=rec.dead, world_size=world.Get_size(),
                         members=rec.members, lost_clients=len(sim.lost), shrink_s=rec.seconds,
                         recovery_s=time.perf_counter() - t_fail)
            failures.append(event)
            log.log(event)
            log.info(f"--elastic: rank(s) {rec.dead} died; their {len(lost)} client(s) count as dropped from now on; "
                     f"{world.Get_size()} survivor(s) redo round {completed + 1} (recovered in "
                     f"{event['recovery_s']:.3f} s)")
    stop.close()
    bar.close()
    if preempted:  # no summary: the run is not over
        log.info(f"stopped for a signal after round {sim.round}: checkpoint written, "
                 f"exiting with status {preempt.PREEMPTED_EXIT} (resume with --resume)")
        log.close()
        return preempt.PREEMPTED_EXIT
    wall = wall_before + time.perf_counter() - start
    if world.Get_rank() == 0:
        summary = dict(mode="fl", world_size=len(homes), device=str(device), dataset=args.dataset,
                       rounds=sim.round, stopped_early=sim.round < cfg.rounds, **sim.scores(),
                       final_loss=last.get("train_loss"), wall_s=wall,
                       samples_per_s=None, rounds_per_s=done_here / (time.perf_counter() - start),
                       parameters=sim.size, clients=cfg.clients, fraction=cfg.fraction, strategy=cfg.strategy,
                       client_data=cfg.client_data, secagg=cfg.secagg, epsilon=last.get("epsilon"))
        if args.elastic:
            summary.update(elastic=True, failures=failures, world_size_end=world.Get_size())
        log.write_summary(summary)
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    if args.trace:
        tl.write(os.path.join(args.out, "trace.json"))
    log.close()
    return 0


def describe_mode(args: argparse.Namespace, size: int) -> str:
    """One line on how the ranks are used."""
    if args.mode == "ps":
        extra = f", staleness {args.staleness}" if args.ps_mode == "ssp" else ""
        return (f"parameter server ({args.ps_mode}{extra}) on {size} ranks: "
                f"{size - args.servers} worker(s), {args.servers} server(s)")
    if args.mode in ("pipeline", "hybrid"):
        dp = args.dp if args.mode == "hybrid" else 1
        return (f"{args.mode}: {dp} x {size // dp} grid (dp x pp), {args.pipeline_schedule} schedule, "
                f"{args.microbatches} microbatches" + (", recompute" if args.recompute else ""))
    if args.mode == "fl":
        groups = size // args.ranks_per_client
        edges = f", {args.edges} edge aggregator(s)" if args.edges else ""
        return (f"federated simulation on {size} ranks: {groups} client group(s) of {args.ranks_per_client} "
                f"rank(s){edges}, server on rank 0; {args.strategy}, fraction {args.fraction} of {args.clients} "
                f"clients, {args.rounds} rounds" + (", secure aggregation" if args.secagg else "")
                + (f", DP clip {args.dp_clip}{' (adaptive)' if args.dp_adaptive else ''} noise {args.dp_noise}"
                   if args.dp_clip else ""))
    group = args.moe_ep_size or size
    if args.model == "moe" and args.mode == "dp" and group > 1:
        return (f"data parallel on {size} ranks, expert parallel: {args.moe_experts // group} of the "
                f"{args.moe_experts} experts on each rank, {size // group} group(s) of {group} (top-{args.moe_k})")
    return f"data parallel on {size} ranks"


if __name__ == "__main__":
    run_main(lambda: main(signals=STARTUP_SIGNALS))
