"""What one training step means in each mode, behind one small interface that train.py drives.

A Trainer owns the model wrapper of its mode and answers: run a step on this rank's share, the loss
to log, evaluate, checkpoint and resume. Data parallel: every rank is a worker. Parameter server:
the last --servers ranks serve (Trainer.serve) while the others run the loop.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import checkpoint
from dmlmpi import comm as dcomm
from dmlmpi.comm.context import existing_comms
from dmlmpi.data import Dataset, rank_share
from dmlmpi.grid import ProcessGrid
from dmlmpi.parallel import (DataParallel, FullyShardedDataParallel, ParameterServer, Pipeline, ShardedDataParallel,
                             SyncBatchNorm, ZeroRedundancyOptimizer, clip_grad_norm)
from dmlmpi.parallel.amp import DynamicLossScaler, autocast
from dmlmpi.parallel.experts import (ExpertNames, ExpertParallelMoE, expert_groups, local_state_dict, spread,
                                     sum_expert_grads, whole_state_dict)
from dmlmpi.parallel.named_state import by_name, layer_names, load_by_name
from dmlmpi.telemetry import Timeline


def optimizer_spec(args: argparse.Namespace) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
    """The chosen optimizer's class and settings."""
    if args.optimizer == "adamw":
        return torch.optim.AdamW, dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "adam":
        return torch.optim.Adam, dict(lr=args.lr, weight_decay=args.weight_decay)
    momentum = args.momentum if args.optimizer == "momentum" else 0.0
    return torch.optim.SGD, dict(lr=args.lr, momentum=momentum, weight_decay=args.weight_decay)


def make_optimizer(args: argparse.Namespace) -> Callable[[Any], torch.optim.Optimizer]:
    """A factory of the chosen optimizer (servers build theirs over their shard)."""
    def build(params: Any) -> torch.optim.Optimizer:
        cls, settings = optimizer_spec(args)
        return cls(params, **settings)
    return build


def make_schedule(args: argparse.Namespace, total_steps: int) -> Callable[[torch.optim.Optimizer], Any]:
    """A factory of the learning-rate schedule over the whole run (total_steps global steps)."""
    def build(opt: torch.optim.Optimizer) -> Any:
        if args.schedule == "onecycle":
            # plain SGD has no momentum for the cycle to vary (it would turn it into momentum SGD)
            return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=max(1, total_steps),
                                                       cycle_momentum=args.optimizer != "sgd")
        if args.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return build


def evaluate(model: nn.Module, data: Dataset, device: torch.device, comm: MPI.Comm) -> tuple[float, float]:
    """(accuracy, mean loss) on the test set; each rank of comm scores a share, one all-reduce adds them up."""
    mine = rank_share(np.arange(len(data.y_test)), comm.Get_rank(), comm.Get_size())
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(data.x_test[mine]).to(device))
        labels = torch.from_numpy(data.y_test[mine]).to(device)
        local = np.array([(logits.argmax(1) == labels).sum().item(),
                          nn.functional.cross_entropy(logits, labels, reduction="sum").item()])
    model.train()
    # sum of correct predictions and of losses over the ranks
    correct, loss_sum = dcomm.allreduce(local, comm=comm)
    return correct / len(data.y_test), loss_sum / len(data.y_test)


def global_mean(contributions: list[float], comm: MPI.Comm) -> float:
    """Mean over steps of the loss whose per-rank shares are `contributions`: one small all-reduce of their sum."""
    return float(dcomm.allreduce(np.array([sum(contributions)]), comm=comm)[0]) / len(contributions)


def batch_loss(model: nn.Module, data: Dataset, idx: np.ndarray, scale: float, device: torch.device,
               tl: Timeline) -> torch.Tensor:
    """Forward on the samples `idx`: their summed cross-entropy times `scale`."""
    x = torch.from_numpy(data.x_train[idx]).to(device)
    y = torch.from_numpy(data.y_train[idx]).to(device)
    with tl.span("forward"):
        return nn.functional.cross_entropy(model(x), y, reduction="sum") * scale


class Trainer:
    """The common interface; `comm` is the communicator of the ranks that run the training loop."""

    comm: MPI.Comm
    is_server = False
    data_rank: int | None = None  # this rank's share of each global batch (default: its rank in comm)
    data_size: int | None = None  # over how many shares a global batch is split (default: comm's size)
    grad_norm: float | None = None  # the whole model's gradient norm at the last step, when clipping
    scaler: DynamicLossScaler | None = None  # --amp fp16: the loss scale, shared by every rank of the model
    clip = 0.0  # --clip-grad-norm (0: off)

    def step_stats(self) -> dict[str, Any]:
        """Figures of the last step for its log record: the gradient norm when clipping, the loss scale with fp16."""
        stats: dict[str, Any] = {}
        if self.grad_norm is not None:
            stats["grad_norm"] = self.grad_norm
        if self.scaler is not None:
            stats.update(loss_scale=self.scaler.scale, skipped_steps=self.scaler.skipped)
        return stats

    def finish_step(self, params: list[nn.Parameter], clip_comm: MPI.Comm | None,
                    norm_params: list[nn.Parameter] | None = None) -> None:
        """After backward: unscale (fp16), clip, and step the optimizer and schedule unless the gradients overflowed.

        `norm_params`: the parameters whose gradients count in the norm (a tied copy counts once, on its owner).
        """
        # fp16: gradients back to their true size; an overflow anywhere skips this step everywhere
        stepped = self.scaler.unscale_(params) if self.scaler is not None else True
        self.grad_norm = None
        if self.clip and stepped:
            with self.tl.span("clip"):
                self.grad_norm = clip_grad_norm(params, self.clip, comm=clip_comm, counted=norm_params)
        if stepped:
            with self.tl.span("optimizer"):
                self.optimizer.step()
            # a skipped step does not advance the schedule either (DeepSpeed's rule): the rates follow the updates
            self.schedule.step()
        if self.scaler is not None:
            self.scaler.update(stepped)

    def describe(self) -> str:
        """Anything the mode prints at start (e.g. the pipeline's partition)."""
        return ""

    def step(self, idx: np.ndarray, batch: int) -> float:
        """One step on this rank's share `idx` of a global batch of `batch`; returns its loss contribution."""
        raise NotImplementedError

    def logged_loss(self, contributions: list[float]) -> float:
        """The training loss to log from the contributions of the steps since the last log."""
        raise NotImplementedError

    def evaluate(self, data: Dataset, final: bool = False) -> tuple[float, float] | None:
        """Test accuracy and loss (None on ranks that do not take part)."""
        raise NotImplementedError

    def save(self, run_dir: str, step: int, state: dict[str, Any]) -> None:
        """Collectively write a checkpoint with `state` plus the mode's own state."""
        raise NotImplementedError

    def load(self, state: dict[str, Any]) -> None:
        """Restore the mode's own state from a checkpoint."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """This rank's figures for the run's metrics."""
        return {}

    def lr(self) -> float:
        """The learning rate of the current step."""
        raise NotImplementedError

    def model_parameters(self) -> list[nn.Parameter]:
        """The whole model's parameters."""
        raise NotImplementedError

    def finish(self) -> None:
        """End of this rank's training loop."""

    def close(self) -> None:
        """Release threads and communicators."""

    # --elastic: what a rank carries across a recovery onto the trainer that replaces this one
    shared_state = True  # True: every survivor takes the furthest survivor's carry(); False: each keeps its own

    def comms(self) -> list[MPI.Comm]:
        """Communicators besides the world that a recovery must revoke (the world's own dmlmpi ones are found)."""
        return []

    def carry(self) -> dict[str, Any]:
        """This rank's state to hand to the next trainer."""
        raise NotImplementedError(f"{type(self).__name__} cannot recover from a dead rank")

    def restore(self, state: dict[str, Any]) -> None:
        """Take over what carry() returned."""
        raise NotImplementedError(f"{type(self).__name__} cannot recover from a dead rank")


class DPTrainer(Trainer):
    """Data parallel: the whole model on every rank, gradients averaged during backward."""

    def __init__(self, model: nn.Module, data: Dataset, args: argparse.Namespace, world: MPI.Comm,
                 device: torch.device, total_steps: int, tl: Timeline) -> None:
        self.comm, self.data, self.device, self.tl = world, data, device, tl
        if args.sync_bn:  # BatchNorm statistics over every rank's samples, on this trainer's communicator
            model = SyncBatchNorm.convert_sync_batchnorm(model, comm=world)
        # --model moe: each rank keeps its share of the experts (expert parallelism); DataParallel leaves
        # them out, and checkpoints gather them, with optimizer state by parameter name
        self.mixtures = [m for m in model.modules() if isinstance(m, ExpertParallelMoE)]
        self.n_params = sum(p.numel() for p in model.parameters())  # the whole model's, before the experts spread
        for m in self.mixtures:  # the balancing loss over every rank's tokens, whatever the groups
            m.balance_comm = world
        # --moe-ep-size: experts spread over groups of that many ranks, replicated over the groups
        ep_size = (args.moe_ep_size or world.Get_size()) if self.mixtures else 1
        if ep_size == world.Get_size():
            self.ep, self.replicas = world, None
        elif ep_size == 1:  # (or no mixture) every rank holds every expert: DataParallel averages them
            self.ep, self.replicas = MPI.COMM_SELF, None
        else:
            self.ep, self.replicas = expert_groups(world, ep_size)
        experts = spread(model, self.ep) if ep_size > 1 else []
        self.experts = experts
        # the gradient norm: each expert once (on its first replica), the rest (the same everywhere) on rank 0
        mine = {id(p) for p in experts}
        dense = [p for p in model.parameters() if id(p) not in mine] if world.Get_rank() == 0 else []
        first_replica = self.replicas is None or self.replicas.Get_rank() == 0
        self.norm_params = (experts if first_replica else []) + dense if experts else None
        self.moe_aux = args.moe_aux
        self.sharded = args.zero >= 2  # each rank holds the averaged gradient of its shard only
        self.sharded_checkpoints = args.checkpoint_format == "sharded"  # each rank saves its own pieces
        self.zero3 = args.zero == 3
        if args.zero == 2:  # gradients reduce-scattered to the rank that updates them (ZeRO stage 2)
            cls, settings = optimizer_spec(args)
            self.model = ShardedDataParallel(model, cls, world, bucket_mb=args.bucket_mb, algorithm=args.algorithm,
                                             timeline=tl, **settings)
            self.optimizer = self.model.optimizer
        elif args.zero == 3:  # parameters split too, each layer gathered while it runs (ZeRO stage 3)
            cls, settings = optimizer_spec(args)
            self.model = FullyShardedDataParallel(model, cls, world, algorithm=args.algorithm, timeline=tl,
                                                  min_unit_params=args.zero3_unit_params, **settings)
            self.optimizer = self.model.optimizer
            self.n_params = self.model.parameter_count()  # (the sharded parameters are empty between steps)
        else:
            self.model = DataParallel(model, world, bucket_mb=args.bucket_mb, algorithm=args.algorithm,
                                      compression=args.compression, timeline=tl, powersgd_rank=args.powersgd_rank,
                                      powersgd_warmup=args.powersgd_warmup, reduction=args.reduction,
                                      # an elastic recovery closes this on a communicator that lost a rank:
                                      # shared buckets would need a collective free there
                                      shared_buckets=not args.elastic, local_params=experts)
        if args.zero == 1:  # each rank keeps and updates 1/n of the optimizer state (ZeRO stage 1)
            cls, settings = optimizer_spec(args)
            self.optimizer = ZeroRedundancyOptimizer(self.model.parameters(), cls, comm=world, **settings)
        elif not args.zero:
            self.optimizer = make_optimizer(args)(self.model.parameters())
        self.schedule = make_schedule(args, total_steps)(self.optimizer)
        self.clip, self.grad_accum, self.amp = args.clip_grad_norm, args.grad_accum, args.amp
        # fp16 with ZeRO-2 or 3, or with experts spread: each rank unscales gradients the others do not hold,
        # so an overflow is all-reduced over the ranks
        self.scaler = (DynamicLossScaler(2.0 ** args.initial_scale_power,
                                         comm=world if self.sharded or self.norm_params else None)
                       if args.amp == "fp16" else None)

    def step(self, idx: np.ndarray, batch: int) -> float:
        """Forward, backward (averaging over ranks), optimizer step; returns this rank's share of the mean loss."""
        self.optimizer.zero_grad(set_to_none=False)  # .grad are views into DataParallel's buckets: zero in place
        # --grad-accum: the share in micro-steps; the summed losses make the same gradient as one step
        parts = [p for p in np.array_split(idx, self.grad_accum) if len(p)] or [idx]
        total = 0.0
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # every micro-step but the last adds its gradient locally; the last one's backward all-reduces
            # (ZeRO-3 has no no_sync: every backward reduce-scatters, and the shard gradients add up)
            with contextlib.nullcontext() if last or self.zero3 else self.model.no_sync():
                with autocast(self.amp, self.device):
                    share = batch_loss(self.model, self.data, part, 1.0 / batch, self.device, self.tl)
                with self.tl.span("backward"):
                    # DataParallel averages over ranks; scaled by the world size the average is the global mean
                    scaled = share * (self.comm.Get_size() * loss_scale)
                    if self.mixtures:  # --model moe: this rank's share of the balancing loss, scaled like `share`
                        weight = self.moe_aux * self.comm.Get_size() * loss_scale / len(parts)
                        scaled = scaled + sum(m.aux_loss for m in self.mixtures) * weight
                    scaled.backward()
            total += share.item()
        if self.replicas is not None and self.experts:
            # each expert's replicas served their own groups' tokens: their gradients add up
            sum_expert_grads(self.experts, self.replicas)
        if self.sharded:  # each rank holds the averaged gradient of its shard: norms add up over the ranks
            self.finish_step(self.optimizer.shard_parameters(), clip_comm=self.comm)
        elif self.norm_params is not None:  # experts spread: their norms add up over the ranks, the rest counts once
            self.finish_step(list(self.model.parameters()), clip_comm=self.comm, norm_params=self.norm_params)
        else:  # every rank holds the same averaged gradients: local norms and overflows are the whole model's
            self.finish_step(list(self.model.parameters()), clip_comm=None)
        return total

    def lr(self) -> float:
        """The schedule's current learning rate."""
        return self.schedule.get_last_lr()[0]

    def model_parameters(self) -> list[nn.Parameter]:
        """The wrapped module's parameters."""
        return list(self.model.module.parameters())

    def logged_loss(self, contributions: list[float]) -> float:
        """Global mean loss of the steps: one small all-reduce of the shares."""
        return global_mean(contributions, self.comm)

    def evaluate(self, data: Dataset, final: bool = False) -> tuple[float, float]:
        """Every rank scores a share of the test set."""
        return evaluate(self.model, data, self.device, self.comm)

    def state(self) -> dict[str, Any]:
        """Model, optimizer and schedule state (what a checkpoint or an elastic recovery carries)."""
        if self.mixtures:  # every rank's experts gathered on rank 0 (collective), the optimizer's state by name
            module = self.model.module
            mine = by_name(self.optimizer, list(module.parameters()), ExpertNames(module).parameter_keys(module))
            # (the first expert-parallel group holds every expert: its rank 0 is the world's)
            return dict(model=whole_state_dict(module, self.ep),
                        optimizer_by_name=self.comm.gather(mine, root=0), schedule=self.schedule.state_dict(),
                        comm_state=self.model.comm_state(),
                        loss_scaler=None if self.scaler is None else self.scaler.state_dict())
        # ZeRO-3: the whole model gathered (collective); the parameters hold no data between steps
        model = self.model.full_state_dict() if self.zero3 else self.model.module.state_dict()
        return dict(model=model, optimizer=self.optimizer.state_dict(),
                    schedule=self.schedule.state_dict(),
                    # gradient compression's state (PowerSGD): DataParallel's only, ZeRO-2 and 3 have none
                    comm_state={} if self.sharded else self.model.comm_state(),
                    loss_scaler=None if self.scaler is None else self.scaler.state_dict())

    def save(self, run_dir: str, step: int, state: dict[str, Any]) -> None:
        """Rank 0 writes model, optimizer and schedule with `state` (sharded: each rank its pieces, rank 0 the rest)."""
        if not self.sharded_checkpoints:
            checkpoint.save(run_dir, step, dict(state, **self.state()), self.comm)
            return
        names, shapes = self._trainable()
        # what is whole on every rank (buffers, frozen parameters) goes with rank 0's part
        rest = {k: v.detach().clone() for k, v in self.model.module.state_dict().items() if k not in set(names)}
        whole = dict(state, rest=rest, names=names, shapes=shapes, schedule=self.schedule.state_dict(),
                     loss_scaler=None if self.scaler is None else self.scaler.state_dict())
        checkpoint.save_sharded(run_dir, step, whole, self.optimizer.shard_state(), self.comm)

    def _trainable(self) -> tuple[list[str], list[tuple[int, ...]]]:
        """Names and shapes of the trainable parameters in the optimizer's order (its flat vectors')."""
        names = {id(p): n for n, p in self.model.module.named_parameters()}
        shapes = {id(p): tuple(p.shape) for p in self.model.module.parameters()}
        if self.zero3:  # (the parameters are empty between steps: the units know their shapes)
            shapes.update((id(p), tuple(v.shape)) for u in self.model.units for p, v in zip(u.params, u.views))
        params = [p for p in self.model.module.parameters() if p.requires_grad]
        return [names[id(p)] for p in params], [shapes[id(p)] for p in params]

    def _load_shards(self, state: dict[str, Any]) -> None:
        """Model and optimizer from a sharded checkpoint: the whole parts, then this rank's pieces only."""
        reader = state["shards"]
        if not hasattr(self.optimizer, "load_shard_state"):
            raise ValueError(f"checkpoint {reader.path} is sharded (saved with --zero and --checkpoint-format "
                             "sharded): resume it with --zero 1, 2 or 3")
        names, shapes = self._trainable()
        if (state["names"], [tuple(s) for s in state["shapes"]]) != (names, shapes):
            raise ValueError(f"checkpoint {reader.path}: its trainable parameters "
                             f"{list(zip(state['names'], state['shapes']))} are not this model's "
                             f"{list(zip(names, shapes))}")
        missing, unexpected = self.model.module.load_state_dict(state["rest"], strict=False)
        if unexpected or set(missing) != set(names):
            raise ValueError(f"checkpoint {reader.path}: buffers and frozen parameters differ from this model's "
                             f"(missing {sorted(set(missing) - set(names))}, unexpected {unexpected})")
        self.optimizer.load_shard_state(reader.read, state["shard_keys"], state["shard_scalars"],
                                        state["param_groups"])

    def load(self, state: dict[str, Any]) -> None:
        """Model, optimizer and schedule from a checkpoint (full or sharded, whichever it is)."""
        if "shards" in state:
            self._load_shards(state)
        elif self.mixtures:  # the whole model's state: this rank takes its experts and their optimizer state
            if "optimizer_by_name" not in state:
                raise ValueError("this checkpoint holds no mixture of experts: resume it with the model it was "
                                 "saved with")
            module = self.model.module
            module.load_state_dict(local_state_dict(state["model"], module))
            load_by_name(self.optimizer, list(module.parameters()), ExpertNames(module).parameter_keys(module),
                         state["optimizer_by_name"])
        else:
            if self.zero3:
                self.model.load_full_state_dict(state["model"])  # into the shards (collective)
            else:
                self.model.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("loss_scaler") is not None:
            self.scaler.load_state_dict(state["loss_scaler"])
        restored = self.sharded or "shards" in state or self.model.load_comm_state(state.get("comm_state", {}))
        if not restored and self.comm.Get_rank() == 0:
            print("dmlmpi: PowerSGD's per-rank errors were saved at another world size: they start from zero",
                  flush=True)

    def close(self) -> None:
        """Stop DataParallel's communication thread (and free --moe-ep-size's groups)."""
        self.model.close()
        if self.replicas is not None:
            self.ep.Free()
            self.replicas.Free()

    def carry(self) -> dict[str, Any]:
        """Model, optimizer and schedule (the same on every rank after a completed step)."""
        return self.state()

    def restore(self, state: dict[str, Any]) -> None:
        """Model, optimizer and schedule from carry()."""
        self.load(state)


class PSTrainer(Trainer):
    """Parameter server: workers compute gradients, the last --servers ranks own and update the parameters."""

    def __init__(self, model: nn.Module, data: Dataset, args: argparse.Namespace, world: MPI.Comm,
                 device: torch.device, total_steps: int, tl: Timeline) -> None:
        self.world, self.data, self.device, self.tl, self.mode = world, data, device, tl, args.ps_mode
        self.own_pace, self.total_steps = args.ps_pace == "own", total_steps
        budget = checkpoint_every = None
        if self.own_pace:
            # the gradients of an even run (each global step is one from every worker), checkpoints
            # every --checkpoint-every global steps or every epoch's worth
            workers = world.Get_size() - args.servers
            steps = min(total_steps, args.max_steps) if args.max_steps else total_steps
            budget = steps * workers
            checkpoint_every = (args.checkpoint_every or total_steps // args.epochs) * workers
        self.ps = ParameterServer(model, world, servers=args.servers, mode=args.ps_mode, staleness=args.staleness,
                                  optimizer=make_optimizer(args), schedule=make_schedule(args, total_steps),
                                  timeline=tl, budget=budget, checkpoint_every=checkpoint_every or 0)
        self.is_server = self.ps.is_server
        self.comm = self.ps.worker_comm
        self.server_stats: dict[str, Any] = {}
        # the servers own the schedule; workers step a replica of it to know (and log) the rate
        self._lr_opt = make_optimizer(args)([nn.Parameter(torch.zeros(1))])  # never has a gradient: step() is a no-op
        self.schedule = make_schedule(args, total_steps)(self._lr_opt)

    def lr(self) -> float:
        """The learning rate of the global step this worker is at."""
        return self.schedule.get_last_lr()[0]

    def model_parameters(self) -> list[nn.Parameter]:
        """The wrapped module's parameters."""
        return list(self.ps.module.parameters())

    def step(self, idx: np.ndarray, batch: int) -> float:
        """Forward, backward, push and pull; returns this worker's share of the global mean loss."""
        workers = self.comm.Get_size()
        # scaled so that the mean of the workers' gradients is the gradient of the global batch's mean
        share = batch_loss(self.ps, self.data, idx, 1.0 / batch, self.device, self.tl)
        with self.tl.span("backward"):
            (share * workers).backward()
        with self.tl.span(f"push/pull ({self.mode})", cat="comm"):
            self.ps.step()
        if self.own_pace:
            # own pace: a worker's steps are not the run's; follow the global step the first server
            # has reached (one per `workers` gradients), as its schedule does
            target = min(self.total_steps, self.ps.seen[0] // workers)
            while self.schedule.last_epoch < target:
                self._lr_opt.step()
                self.schedule.step()
        else:
            self._lr_opt.step()  # (the schedule expects its optimizer to step first)
            self.schedule.step()
        return share.item()

    def logged_loss(self, contributions: list[float]) -> float:
        """sync: the global mean (all-reduce over the workers); async/ssp: this worker's own mean loss."""
        if self.mode == "sync":
            return global_mean(contributions, self.comm)
        # a collective here would make the workers wait for each other: report rank 0's own batches
        return sum(contributions) * self.comm.Get_size() / len(contributions)

    def evaluate(self, data: Dataset, final: bool = False) -> tuple[float, float] | None:
        """sync, or after finish(): the workers score shares; otherwise worker 0 alone on its own copy."""
        if final or self.mode == "sync":
            return evaluate(self.ps, data, self.device, self.comm)
        if self.comm.Get_rank() != 0:
            return None
        return evaluate(self.ps, data, self.device, MPI.COMM_SELF)

    def save(self, run_dir: str, step: int, state: dict[str, Any]) -> None:
        """Workers: bring the servers to a quiet point, then everyone joins the collective write."""
        self.ps.request_checkpoint()
        self._write(run_dir, step, state)

    def _write(self, run_dir: str, step: int, state: dict[str, Any]) -> None:
        """Collective over the whole world: gather the servers' state, rank 0 writes."""
        ps_state = self.ps.state()
        model = None
        if ps_state is not None:  # rank 0: the model's parameters as one state dict, from the servers' shards
            model = {k: v.clone() for k, v in self.ps.module.state_dict().items()}
            flat, offset = ps_state["flat"], 0
            for name, p in self.ps.module.named_parameters():
                if p.requires_grad:
                    model[name] = flat[offset:offset + p.numel()].view_as(p).clone()
                    offset += p.numel()
        checkpoint.save(run_dir, step, dict(state, ps=ps_state, model=model), self.world)

    def load(self, state: dict[str, Any]) -> None:
        """Servers take their shard and optimizer; workers the parameters."""
        self.ps.load_state(state["ps"])

    def serve(self, run_dir: str) -> None:
        """Server ranks: answer the workers until they finish, joining their checkpoints."""
        self.server_stats = self.ps.serve(on_checkpoint=lambda: self._write(run_dir, 0, {}))

    def finish(self) -> None:
        """Workers: stop; all end with the servers' final parameters."""
        self.ps.finish()

    def stats(self) -> dict[str, Any]:
        """Servers: updates and staleness; workers: bytes per step."""
        if self.is_server:
            return self.server_stats
        steps = max(1, self.ps.steps)
        return dict(bytes_sent_per_step=self.ps.bytes_sent / steps, bytes_received_per_step=self.ps.bytes_received / steps)

    def close(self) -> None:
        """Free the parameter server's communicators."""
        self.ps.close()

    shared_state = False  # async: every server keeps its shard, every worker its own place in the data

    def comms(self) -> list[MPI.Comm]:
        """The PS channel and the workers' communicator (with what dmlmpi.comm made of it)."""
        return [self.ps.comm, self.ps.worker_comm, *existing_comms(self.ps.worker_comm)]

    def carry(self) -> dict[str, Any]:
        """Server: its shard, optimizer and counters; worker: its learning-rate replica and traffic counters."""
        if self.is_server:
            return self.ps.server_state()
        return dict(schedule=self.schedule.state_dict(), steps=self.ps.steps, bytes_sent=self.ps.bytes_sent,
                    bytes_received=self.ps.bytes_received)

    def restore(self, state: dict[str, Any]) -> None:
        """Take over carry()'s state; workers pull the servers' parameters at their next step."""
        if self.is_server:
            self.ps.load_server_state(state)
        else:
            self.schedule.load_state_dict(state["schedule"])
            self.ps.steps, self.ps.bytes_sent, self.ps.bytes_received = (state["steps"], state["bytes_sent"],
                                                                       state["bytes_received"])


class PipelineTrainer(Trainer):
    """Pipeline (all ranks one pipeline) or hybrid (a --dp x --pp grid): layer stages, microbatches."""

    def __init__(self, model: nn.Sequential, data: Dataset, args: argparse.Namespace, world: MPI.Comm,
                 device: torch.device, total_steps: int, tl: Timeline) -> None:
        self.world, self.data, self.device, self.tl = world, data, device, tl
        dp = args.dp if args.mode == "hybrid" else 1
        self.grid = ProcessGrid(world, dp=dp, pp=world.Get_size() // dp)
        self.comm = world  # every rank runs the loop
        self.dp_comm, self.pp_comm = self.grid.comm("dp"), self.grid.comm("pp")
        self.data_rank, self.data_size = self.grid.rank("dp"), dp
        self.n_params = sum(p.numel() for p in model.parameters())
        sample = torch.from_numpy(data.x_train[:max(1, args.batch_size // max(1, args.microbatches))]).to(device)
        self.pipe = Pipeline(model, self.pp_comm, microbatches=args.microbatches, schedule=args.pipeline_schedule,
                             partition_by=args.partition, chunks=args.chunks if args.pipeline_schedule == "interleaved" else 1,
                             checkpoint=args.recompute, sample=sample, dp_comm=self.dp_comm, timeline=tl)
        # a stage of parameter-free layers (an activation) gets an optimizer of one unused placeholder
        params = list(self.pipe.parameters()) or [nn.Parameter(torch.zeros(1, device=device))]
        self.optimized = params  # in the optimizer's order (its state is saved by their names)
        if args.zero:  # this stage's optimizer state split over its replicas along dp (ZeRO stage 1)
            cls, settings = optimizer_spec(args)
            self.optimizer = ZeroRedundancyOptimizer(params, cls, comm=self.dp_comm, **settings)
        else:
            self.optimizer = make_optimizer(args)(params)
        self.schedule = make_schedule(args, total_steps)(self.optimizer)
        self.peak_activation_bytes = 0
        self.clip, self.amp = args.clip_grad_norm, args.amp
        # fp16: one loss scale for the whole pipeline, its overflow flag all-reduced over the stages
        self.scaler = DynamicLossScaler(2.0 ** args.initial_scale_power, comm=self.pp_comm) if args.amp == "fp16" else None

    def describe(self) -> str:
        """The partition table (printed at start)."""
        return self.pipe.partition_text

    def step(self, idx: np.ndarray, batch: int) -> float:
        """One global batch share through the pipeline, then the optimizer; returns this replica's loss share."""
        self.optimizer.zero_grad(set_to_none=False)
        x = torch.from_numpy(self.data.x_train[idx])
        y = torch.from_numpy(self.data.y_train[idx])
        # mean over this replica's share, scaled so that the dp average is the global batch's mean
        # (and by the loss scale with fp16: the activations' gradients stay representable)
        loss_scale = self.scaler.scale if self.scaler is not None else 1.0
        scale = len(idx) * self.data_size / batch * loss_scale
        with autocast(self.amp, self.device):
            loss = self.pipe.train_step(x, y, lambda out, tg: nn.functional.cross_entropy(out, tg) * scale) / loss_scale
        self.peak_activation_bytes = max(self.peak_activation_bytes, self.pipe.last_activation_bytes)
        # the stages hold different layers: norms and overflows add up over the pipeline (replicas agree)
        self.finish_step(list(self.pipe.parameters()), clip_comm=self.pp_comm, norm_params=self.pipe.owned_parameters())
        return loss / self.data_size

    def logged_loss(self, contributions: list[float]) -> float:
        """Global mean loss: the replicas' shares added up (every pipeline rank holds its replica's)."""
        return global_mean(contributions, self.dp_comm)

    def evaluate(self, data: Dataset, final: bool = False) -> tuple[float, float]:
        """Each replica runs its share of the test set through the pipeline; the last stage scores it."""
        mine = rank_share(np.arange(len(data.y_test)), self.data_rank, self.data_size)
        first, last = self.pp_comm.Get_rank() == 0, self.pp_comm.Get_rank() == self.pp_comm.Get_size() - 1
        self.pipe.eval()
        logits = self.pipe.forward_only(torch.from_numpy(data.x_test[mine]) if first else None, len(mine))
        self.pipe.train()
        local = np.zeros(2)
        if last:
            labels = torch.from_numpy(data.y_test[mine]).to(logits.device)
            local[:] = [(logits.argmax(1) == labels).sum().item(),
                        nn.functional.cross_entropy(logits, labels, reduction="sum").item()]
        # broadcast: the last stage's score to its pipeline; then add up the replicas
        local = self.pp_comm.bcast(local, root=self.pp_comm.Get_size() - 1)
        correct, loss_sum = dcomm.allreduce(local, comm=self.dp_comm)
        return correct / len(data.y_test), loss_sum / len(data.y_test)

    def _optimized(self) -> tuple[list[nn.Parameter], list[list[str]]]:
        """The optimizer's parameters and each one's model keys (none for a parameter-free stage's placeholder)."""
        return self.optimized, layer_names(self.pipe.parts)

    def save(self, run_dir: str, step: int, state: dict[str, Any]) -> None:
        """Rank 0 gathers every stage's layers and optimizer state (from replica 0) and writes them.

        The optimizer state goes by parameter name, so that another stage cut can load it."""
        mine = None
        params, names = self._optimized()
        optimizer = by_name(self.optimizer, params, names)  # every replica: collective along dp with --zero
        if self.data_rank == 0:
            mine = dict(layers={k: v.detach().cpu() for k, v in self.pipe.parts.state_dict().items()},
                        optimizer=optimizer, pp_rank=self.pp_comm.Get_rank())
        # gather: each stage's state to rank 0
        everyone = self.world.gather(mine, root=0)
        extra: dict[str, Any] = dict(schedule=self.schedule.state_dict(),
                                     loss_scaler=None if self.scaler is None else self.scaler.state_dict())
        if everyone is not None:
            stages = sorted((e for e in everyone if e is not None), key=lambda e: e["pp_rank"])
            extra.update(model={_layer_key(k): v for e in stages for k, v in e["layers"].items()},
                         optimizers=[e["optimizer"] for e in stages], bounds=self.pipe.bounds)
        checkpoint.save(run_dir, step, dict(state, **extra), self.world)

    def load(self, state: dict[str, Any]) -> None:
        """This rank's layers and their optimizer state, whatever stages, replicas and --zero the checkpoint had."""
        if "optimizers" not in state or "model" not in state:
            raise ValueError("this checkpoint holds no pipeline stages (it was not saved by --mode pipeline or hybrid)")
        own = self.pipe.parts.state_dict()
        missing = sorted(_layer_key(k) for k in own if _layer_key(k) not in state["model"])
        if missing:
            raise ValueError(f"the checkpoint's model has no {missing}: not this model")
        self.pipe.parts.load_state_dict({k: state["model"][_layer_key(k)] for k in own})
        params, names = self._optimized()
        load_by_name(self.optimizer, params, names, state["optimizers"])
        if state.get("bounds") != self.pipe.bounds and self.world.Get_rank() == 0:
            print(f"dmlmpi: the checkpoint's stages were {state.get('bounds')}, this run's are {self.pipe.bounds}: "
                  "each layer takes its saved weights and optimizer state", flush=True)
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state.get("loss_scaler") is not None:
            self.scaler.load_state_dict(state["loss_scaler"])

    def lr(self) -> float:
        """The schedule's current learning rate."""
        return self.schedule.get_last_lr()[0]

    def model_parameters(self) -> list[nn.Parameter]:
        """This rank's parameters (the log line reports the whole model's count)."""
        return list(self.pipe.parameters())

    def stats(self) -> dict[str, Any]:
        """This rank's stages and the most activation bytes it held."""
        return dict(pp_rank=self.pp_comm.Get_rank(), dp_rank=self.data_rank, layers=self.pipe.layer_indices,
                    peak_activation_bytes=self.peak_activation_bytes)

    def close(self) -> None:
        """Stop threads, free communicators."""
        self.pipe.close()
        self.grid.free()


def _layer_key(key: str) -> str:
    """'0.3.weight' (chunk 0 of a ModuleList, layer 3 of the model) -> '3.weight', the model's own key."""
    return key.split(".", 1)[1]
