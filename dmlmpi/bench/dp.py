"""`python -m dmlmpi.bench dp`: dmlmpi DataParallel vs torch DDP (gloo) vs no communication.

Run under `mpirun -n K` (K = 1, 2, 4, ... one launch per world size: ranks idling inside a larger
launch would change how MPI waits, since Open MPI makes waiting ranks yield on an oversubscribed
node). For each model, on the same random data: `local` trains each rank's model alone (no
communication: the floor), `dmlmpi` wraps it in DataParallel, `ddp` in torch
DistributedDataParallel over gloo; with `--sync-bn`, `dmlmpi-syncbn` also wraps the model's
BatchNorm layers in dmlmpi's SyncBatchNorm (torch's refuses CPU tensors, so DDP has no such row); with
`--zero`, `dmlmpi-zero` and `ddp-zero` split the optimizer state over the ranks (dmlmpi's
ZeroRedundancyOptimizer, and torch's over gloo); with `--zero 2` also `dmlmpi-zero2` and `fsdp-zero2`
(ZeRO stage 2: dmlmpi's ShardedDataParallel, and torch FSDP2's fully_shard per layer with
reshard_after_forward=False, over gloo); with `--zero 3` also `dmlmpi-zero3` and `fsdp-zero3` (ZeRO
stage 3: dmlmpi's FullyShardedDataParallel, and fully_shard per layer, resharded after forward);
with `--amp bf16`, `local-bf16`, `dmlmpi-bf16` and `ddp-bf16` run the same three with the forward
under bfloat16 autocast (each against `local-bf16`); with `--reduction adasum`, `dmlmpi-adasum`
combines the gradients by Adasum (power-of-two ranks). Each rank takes a fixed batch per step
(weak scaling). Reported:
samples/s over all K ranks (median, min, max of timed samples, each timed as the slowest rank's)
and how much longer a step is than `local`'s. The three variants of a model take their timed
samples in turn, so the machine's slow and fast spells fall on all of them alike.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.comm.adasum import is_power_of_two
from dmlmpi.models import mlp, mnist1d_cnn
from dmlmpi.parallel import (DataParallel, FullyShardedDataParallel, ShardedDataParallel, SyncBatchNorm,
                             ZeroRedundancyOptimizer)
from dmlmpi.parallel.amp import autocast
from dmlmpi.parallel.fsdp import plan_units
from dmlmpi.parallel.zero import state_bytes

from .common import balanced_orders, calls_per_sample, close_gloo, format_table, init_gloo, timed_sample, write_json

VARIANTS = ("local", "dmlmpi", "ddp")
SYNC_BN = "dmlmpi-syncbn"  # with --sync-bn: DataParallel over the model with SyncBatchNorm layers
ZERO = ("dmlmpi-zero", "ddp-zero")  # with --zero: the optimizer state split over the ranks (ZeRO stage 1)
ZERO2 = ("dmlmpi-zero2", "fsdp-zero2")  # with --zero 2: the gradients split too (ZeRO stage 2)
ZERO3 = ("dmlmpi-zero3", "fsdp-zero3")  # with --zero 3: the parameters split too (ZeRO stage 3)
ADASUM = "dmlmpi-adasum"  # with --reduction adasum: DataParallel(reduction="adasum")
AMP = "-bf16"  # with --amp bf16: the suffix of the variants whose forward runs under bfloat16 autocast
OPTIMIZERS = {"sgd": (torch.optim.SGD, dict(lr=0.01)), "adamw": (torch.optim.AdamW, dict(lr=0.001))}


def bn_cnn(blocks: int = 8, channels: int = 16) -> nn.Sequential:
    """An MNIST-1D CNN with a BatchNorm after each convolution: 3 buffers per block, synced before every forward."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, 40))]
    for b in range(blocks):
        layers += [nn.Conv1d(1 if b == 0 else channels, channels, 3, padding=1), nn.BatchNorm1d(channels), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(channels * 40, 10))


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "cnn": (mnist1d_cnn, (40,)),  # the default job's model (8k parameters)
    "mlp": (lambda: mlp(784, (1024, 1024)), (784,)),  # 784-1024-1024-10: 1.86M parameters
    "bn-cnn": (bn_cnn, (40,)),  # not run by default: 8 BatchNorm layers, 24 buffers, 12k parameters
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench dp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="cnn,mlp", help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--batch", type=int, default=64, help="samples per rank per step")
    p.add_argument("--samples", type=int, default=6,
                   help="timed samples per row (median, min, max); 6 completes the sample order design for 3 rows")
    p.add_argument("--sample-seconds", type=float, default=0.5, help="target length of one timed sample")
    p.add_argument("--algorithm", default="auto", help="dmlmpi all-reduce algorithm")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for dmlmpi and DDP")
    p.add_argument("--compression", default="none", choices=["none", "fp16", "bf16", "powersgd"],
                   help="gradients on the wire in 16 bits (dmlmpi's compression option, DDP's "
                        "fp16_compress_hook / bf16_compress_hook), or as low-rank factors (dmlmpi's powersgd, "
                        "DDP's powerSGD_hook)")
    p.add_argument("--powersgd-rank", type=int, default=1, help="rank of the factors with --compression powersgd")
    p.add_argument("--sync-bn", action="store_true",
                   help=f"add a {SYNC_BN} row: dmlmpi with SyncBatchNorm layers (models with BatchNorm only: bn-cnn)")
    p.add_argument("--optimizer", default="sgd", choices=list(OPTIMIZERS),
                   help="every variant's optimizer (adamw keeps two moments per parameter: what --zero splits)")
    p.add_argument("--zero", type=int, nargs="?", const=1, default=0, choices=[0, 1, 2, 3],
                   help=f"add {' and '.join(ZERO)} rows: dmlmpi's and torch's ZeroRedundancyOptimizer; --zero 2 "
                        f"also {' and '.join(ZERO2)}: dmlmpi's ShardedDataParallel and torch's FSDP2; --zero 3 "
                        f"also {' and '.join(ZERO3)}: dmlmpi's FullyShardedDataParallel and FSDP2 resharded after forward")
    p.add_argument("--zero3-unit-params", type=int, default=0, metavar="N",
                   help="the ZeRO-3 rows' units: 0 one per layer with parameters; N > 0 by size, as the training "
                        "job's --zero3-unit-params (the same units for dmlmpi's and torch's)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help=f"bf16: add local{AMP}, dmlmpi{AMP}, ddp{AMP} rows, the forward under bfloat16 autocast "
                        "(fp16 is left out: this CPU has no fp16 convolution kernels)")
    p.add_argument("--reduction", default="mean", choices=["mean", "adasum"],
                   help=f"adasum: add a {ADASUM} row, DataParallel(reduction='adasum') (power-of-two ranks)")
    p.add_argument("--json", help="write one record per (model, ranks, variant) to this path")
    args = p.parse_args(argv)
    if args.zero3_unit_params < 0 or (args.zero3_unit_params and args.zero != 3):
        p.error(f"--zero3-unit-params {args.zero3_unit_params}: a number of elements, 0 or more, with --zero 3")
    if args.zero >= 2 and args.compression != "none":
        p.error(f"--zero {args.zero}: ZeRO-2 and 3 send full-precision gradients; not with --compression {args.compression}")
    for m in args.models.split(","):
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {','.join(MODELS)}")
        if args.sync_bn and not has_batchnorm(MODELS[m][0]()):
            p.error(f"--sync-bn: model {m!r} has no BatchNorm layer; use --models bn-cnn")
    return args


def has_batchnorm(model: nn.Module) -> bool:
    """Whether any layer of `model` is a BatchNorm."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap(variant: str, model: nn.Module, sub: MPI.Comm, group: Any, args: argparse.Namespace) -> nn.Module:
    """The model as trained by one variant."""
    wire = wire_format(variant, args.compression)
    if variant in ("dmlmpi", "dmlmpi-zero"):
        # powersgd: the first step whole, like DDP's hook with start_powerSGD_iter=2 (its least with error feedback)
        return DataParallel(model, comm=sub, algorithm=args.algorithm, bucket_mb=args.bucket_mb, compression=wire,
                            powersgd_rank=args.powersgd_rank, powersgd_warmup=1)
    if variant == "dmlmpi-zero2":  # its optimizer comes with it (make_optimizer takes it)
        cls, settings = OPTIMIZERS[args.optimizer]
        return ShardedDataParallel(model, cls, comm=sub, algorithm=args.algorithm, bucket_mb=args.bucket_mb,
                                   **settings)
    if variant == "dmlmpi-zero3":  # its optimizer comes with it too
        cls, settings = OPTIMIZERS[args.optimizer]
        return FullyShardedDataParallel(model, cls, comm=sub, algorithm=args.algorithm,
                                        min_unit_params=args.zero3_unit_params, **settings)
    if variant == "fsdp-zero2":
        return torch_fsdp(model, sub, reshard=False)
    if variant == "fsdp-zero3":  # the same units as dmlmpi-zero3
        return torch_fsdp(model, sub, reshard=True, min_unit_params=args.zero3_unit_params)
    if variant == ADASUM:
        return DataParallel(model, comm=sub, algorithm=args.algorithm, bucket_mb=args.bucket_mb, reduction="adasum")
    if variant == SYNC_BN:
        return DataParallel(SyncBatchNorm.convert_sync_batchnorm(model, comm=sub), comm=sub,
                            algorithm=args.algorithm, bucket_mb=args.bucket_mb, compression=wire)
    if variant in ("ddp", "ddp-zero"):
        ddp = nn.parallel.DistributedDataParallel(model, process_group=group, bucket_cap_mb=args.bucket_mb)
        if wire == "fp16":  # DDP's own 16-bit wire format, for a like-for-like row
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            ddp.register_comm_hook(group, default_hooks.fp16_compress_hook)
        if wire == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

            state = powerSGD_hook.PowerSGDState(process_group=group, matrix_approximation_rank=args.powersgd_rank,
                                                start_powerSGD_iter=2)
            ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        return ddp
    return model


def torch_fsdp(model: nn.Module, sub: MPI.Comm, reshard: bool, min_unit_params: int = 0) -> nn.Module:
    """torch FSDP2 over dmlmpi's ZeRO-3 units (by default each layer with parameters) and the root: ZeRO stage 3
    when resharded after forward, else 2."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (sub.Get_size(),))
    # inner units first: fully_shard takes the parameters no unit below it has taken
    for layer, _ in reversed(plan_units(model, min_unit_params)):
        if layer is not model:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)  # one all-gather and reduce-scatter each
    return fully_shard(model, mesh=mesh, reshard_after_forward=reshard)


def grad_bytes(model: nn.Module) -> int:
    """Bytes of gradient this rank keeps between steps: its shards' (ZeRO-2), its local part of DTensors (FSDP), or all."""
    if isinstance(model, (ShardedDataParallel, FullyShardedDataParallel)):
        return model.gradient_bytes()["shard"]
    total = 0  # (DataParallel's .grad are views of its buckets: counted once)
    for p in model.parameters():
        g = p.grad
        if g is not None:
            g = g.to_local() if hasattr(g, "to_local") else g
            total += g.numel() * g.element_size()
    return total


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank keeps between steps: its shards (ZeRO-3), its local part of DTensors (FSDP2), or all."""
    if isinstance(model, FullyShardedDataParallel):
        return model.parameter_bytes() + sum(p.numel() * p.element_size() for p in model.parameters()
                                             if not p.requires_grad)
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    return sum(p.numel() * p.element_size() for p in local)


def wire_format(variant: str, compression: str) -> str:
    """The gradient wire format a variant uses for --compression (DDP's bf16 hook needs NCCL: none on gloo)."""
    if variant in ("local", ADASUM) or (variant.startswith("ddp") and compression == "bf16"):
        return "none"
    return compression


def calibrate(step: Callable[[], None], sub: MPI.Comm, args: argparse.Namespace) -> int:
    """Warm `step` up and return how many steps make a timed sample of about --sample-seconds."""
    for _ in range(2):
        step()  # warm up (calls_per_sample adds a third): allocations, buckets, connections
    return max(3, calls_per_sample(step, sub, args.sample_seconds))


def make_step(name: str, variant: str, sub: MPI.Comm, group: Any,
              args: argparse.Namespace) -> tuple[nn.Module, Callable[[], None], Any]:
    """The model as `variant` trains it, one training step of it on this rank's fixed batch, and its optimizer."""
    build, shape = MODELS[name]
    torch.manual_seed(0)
    base = variant.removesuffix(AMP)  # the -bf16 rows are their base variant under autocast
    model = wrap(base, build(), sub, group, args)
    opt = make_optimizer(base, model, sub, group, args)
    g = torch.Generator().manual_seed(1 + sub.Get_rank())
    x, y = torch.randn(args.batch, *shape, generator=g), torch.randint(0, 10, (args.batch,), generator=g)
    amp = "bf16" if variant.endswith(AMP) else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(amp, x.device):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model, step, opt


def make_optimizer(variant: str, model: nn.Module, sub: MPI.Comm, group: Any, args: argparse.Namespace) -> Any:
    """--optimizer for the variant: whole on every rank, or split over the ranks by dmlmpi's or torch's ZeRO."""
    cls, settings = OPTIMIZERS[args.optimizer]
    if variant == "dmlmpi-zero":
        return ZeroRedundancyOptimizer(model.parameters(), cls, comm=sub, **settings)
    if variant in ("dmlmpi-zero2", "dmlmpi-zero3"):
        return model.optimizer
    if variant == "ddp-zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

        return TorchZero(model.parameters(), optimizer_class=cls, process_group=group, **settings)
    return cls(model.parameters(), **settings)


def run_model(name: str, k: int, sub: MPI.Comm, group: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train `name` with every variant on the k ranks of `sub`, samples taken in turn; one record per variant.

    The variants alternate sample by sample in balanced orders (each first, and each after each of
    the others, equally often), so a slow spell of this shared machine falls on all of them instead
    of on whichever was running then. Every variant takes the same number of steps per sample (the
    median of their calibrations), so what a sample pays once weighs on each alike.
    """
    extra = (((SYNC_BN,) if args.sync_bn else ()) + (ZERO if args.zero else ()) + (ZERO2 if args.zero >= 2 else ())
             + (ZERO3 if args.zero == 3 else ())
             + (tuple(v + AMP for v in VARIANTS) if args.amp == "bf16" else ())
             + ((ADASUM,) if args.reduction == "adasum" else ()))
    built = {v: make_step(name, v, sub, group, args) for v in VARIANTS + extra}
    steps = int(statistics.median(calibrate(step, sub, args) for _, step, _ in built.values()))
    per_step: dict[str, list[float]] = {v: [] for v in built}
    for order in balanced_orders(list(built), args.samples):
        for v in order:
            per_step[v].append(timed_sample(built[v][1], steps, sub))
    records = []
    for v, (model, _, opt) in built.items():
        kept, params_kept = grad_bytes(model), param_bytes(model)
        if v.startswith("dmlmpi"):
            model.close()
        rates = [k * args.batch / t for t in per_step[v]]
        count = model.parameter_count() if isinstance(model, FullyShardedDataParallel) else sum(
            p.numel() for p in model.parameters())  # (ZeRO-3's parameters are empty between steps)
        records.append(dict(model=name, params=count, variant=v, ranks=k,
                            batch_per_rank=args.batch, samples_per_s_median=statistics.median(rates),
                            samples_per_s_min=min(rates), samples_per_s_max=max(rates),
                            step_time_s_median=statistics.median(per_step[v]),
                            algorithm=args.algorithm if v.startswith("dmlmpi") else "",
                            amp="bf16" if v.endswith(AMP) else "none",
                            compression=wire_format(v, args.compression), optimizer=args.optimizer,
                            # both ZeROs keep their local optimizer as .optim
                            optimizer_state_bytes=state_bytes(getattr(opt, "optim", opt)), grad_bytes=kept,
                            param_bytes=params_kept))
    return records


def main(argv: list[str]) -> int:
    """Measure every (model, ranks, variant), print the table and the targets, write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    torch.set_num_threads(1)  # ranks share the cores
    dist = init_gloo(world)
    k = world.Get_size()
    if args.reduction == "adasum" and not is_power_of_two(k):
        if world.Get_rank() == 0:
            print(f"bench dp: --reduction adasum needs a power-of-two number of ranks, got {k}", flush=True)
        close_gloo(dist)
        return 2
    records = [r for name in args.models.split(",") for r in run_model(name, k, world, dist.group.WORLD, args)]
    if world.Get_rank() == 0:
        # each row against the local row of its own precision
        floor = {(r["model"], r["ranks"], r["amp"]): r["step_time_s_median"] for r in records
                 if r["variant"].removesuffix(AMP) == "local"}
        for r in records:
            r["comm_overhead"] = r["step_time_s_median"] / floor[(r["model"], r["ranks"], r["amp"])] - 1
        rows = [dict(r, rate=f"{r['samples_per_s_median']:.0f}",
                     spread=f"{r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f}",
                     step=f"{r['step_time_s_median'] * 1e3:.2f}", over=f"{100 * r['comm_overhead']:+.1f}%",
                     state=f"{r['optimizer_state_bytes'] / 1024:.0f}", grads=f"{r['grad_bytes'] / 1024:.0f}",
                     kept=f"{r['param_bytes'] / 1024:.0f}")
                for r in records]
        print(f"# dmlmpi data-parallel benchmark: {args.batch} samples per rank per step, torch threads 1, "
              f"gradient compression {args.compression}, optimizer {args.optimizer}")
        print(format_table(rows, [("model", "model", ""), ("params", "params", ""), ("ranks", "ranks", ""),
                                  ("variant", "variant", ""), ("rate", "samples/s", ""), ("spread", "min-max", ""),
                                  ("step", "step(ms)", ""), ("over", "vs local", ""),
                                  ("state", "opt state KiB (rank 0)", ""), ("grads", "grads kept KiB", ""),
                                  ("kept", "params kept KiB", "")]))
        print("\n# targets (medians of this run)")
        by = {(r["model"], r["ranks"], r["variant"]): r for r in records}
        if k in (2, 4) and ("mlp", k, "dmlmpi") in by:
            ratio = by[("mlp", k, "dmlmpi")]["samples_per_s_median"] / by[("mlp", k, "ddp")]["samples_per_s_median"]
            print(f"mlp, {k} ranks: dmlmpi / DDP-gloo samples/s = {ratio:.2f}x (>=1.3x: {'PASS' if ratio >= 1.3 else 'MISS'})")
        for name in args.models.split(","):
            if k == 2:
                over = by[(name, 2, "dmlmpi")]["comm_overhead"]
                print(f"{name}, 2 ranks: communication adds {100 * over:.1f}% to the step (<=15%: {'PASS' if over <= 0.15 else 'MISS'})")
            if args.zero:
                z, t = by[(name, k, "dmlmpi-zero")], by[(name, k, "ddp-zero")]
                plain = by[(name, k, "dmlmpi")]
                print(f"{name}, {k} ranks: dmlmpi-zero / ddp-zero samples/s = "
                      f"{z['samples_per_s_median'] / t['samples_per_s_median']:.2f}x; dmlmpi-zero step vs dmlmpi "
                      f"{100 * (z['step_time_s_median'] / plain['step_time_s_median'] - 1):+.1f}%, optimizer state "
                      f"{z['optimizer_state_bytes'] / max(1, plain['optimizer_state_bytes']):.2f}x of dmlmpi's")
            if args.zero >= 2:
                z2, f2, z1 = by[(name, k, "dmlmpi-zero2")], by[(name, k, "fsdp-zero2")], by[(name, k, "dmlmpi-zero")]
                print(f"{name}, {k} ranks: dmlmpi-zero2 / fsdp-zero2 samples/s = "
                      f"{z2['samples_per_s_median'] / f2['samples_per_s_median']:.2f}x; dmlmpi-zero2 step vs "
                      f"dmlmpi-zero {100 * (z2['step_time_s_median'] / z1['step_time_s_median'] - 1):+.1f}%, "
                      f"gradients kept {z2['grad_bytes'] / max(1, z1['grad_bytes']):.2f}x of dmlmpi-zero's")
            if args.zero == 3:
                z3, f3, z1 = by[(name, k, "dmlmpi-zero3")], by[(name, k, "fsdp-zero3")], by[(name, k, "dmlmpi-zero")]
                print(f"{name}, {k} ranks: dmlmpi-zero3 / fsdp-zero3 samples/s = "
                      f"{z3['samples_per_s_median'] / f3['samples_per_s_median']:.2f}x; dmlmpi-zero3 step vs "
                      f"dmlmpi-zero {100 * (z3['step_time_s_median'] / z1['step_time_s_median'] - 1):+.1f}%, "
                      f"parameters kept {z3['param_bytes'] / max(1, z1['param_bytes']):.2f}x of dmlmpi-zero's")
            if args.amp == "bf16":
                lo, lo16 = by[(name, k, "local")], by[(name, k, "local" + AMP)]
                d16, t16 = by[(name, k, "dmlmpi" + AMP)], by[(name, k, "ddp" + AMP)]
                print(f"{name}, {k} ranks, bf16 autocast: local step x{lo16['step_time_s_median'] / lo['step_time_s_median']:.2f} "
                      f"of float32's; dmlmpi{AMP} / ddp{AMP} samples/s = "
                      f"{d16['samples_per_s_median'] / t16['samples_per_s_median']:.2f}x; communication adds "
                      f"{100 * d16['comm_overhead']:.1f}% (float32: {100 * by[(name, k, 'dmlmpi')]['comm_overhead']:.1f}%)")
            if args.reduction == "adasum":
                extra = by[(name, k, ADASUM)]["step_time_s_median"] / by[(name, k, "dmlmpi")]["step_time_s_median"] - 1
                print(f"{name}, {k} ranks: Adasum adds {100 * extra:+.1f}% to dmlmpi's step "
                      f"(communication {100 * by[(name, k, ADASUM)]['comm_overhead']:+.1f}% over local)")
            if args.sync_bn:
                extra = by[(name, k, SYNC_BN)]["step_time_s_median"] / by[(name, k, "dmlmpi")]["step_time_s_median"] - 1
                print(f"{name}, {k} ranks: SyncBatchNorm adds {100 * extra:+.1f}% to dmlmpi's step")
        if args.json:
            write_json(args.json, records)
    close_gloo(dist)
    return 0
