"""Options of `python -m dmlmpi.train`: defaults, YAML files, command line, and checks before training.

Precedence: built-in defaults < `--config FILE.yaml` < command-line options. A YAML file uses the
option names (`batch_size: 128` or `batch-size: 128`). Every value, from either source, goes through
the same argparse conversion and choices, so a bad value gets the same clear error from both.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

import yaml

from dmlmpi.comm import ALGORITHMS
from dmlmpi.comm.adasum import is_power_of_two
from dmlmpi.data import DATASETS, TAILS
from dmlmpi.models import WITH_BATCHNORM

MODES = ["dp", "ps", "pipeline", "hybrid", "fl"]


def build_parser() -> argparse.ArgumentParser:
    """The command line of the training job, each option with a working default."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.train",
                                description="Distributed training on MPI. Run it under mpirun: "
                                            "mpirun -n 8 python -m dmlmpi.train [options]",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of options (command-line options override it)")
    p.add_argument("--mode", default="dp", choices=MODES,
                   help="parallelism: dp = data parallel (all-reduce); ps = parameter server; pipeline = "
                        "layer stages on all ranks; hybrid = --dp x --pp grid of pipelines; fl = federated "
                        "learning simulated on rank groups")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="mnist1d", choices=list(DATASETS),
                   help="mnist1d is generated offline; mnist/cifar10 read files from --data-dir")
    g.add_argument("--data-dir", help="directory with MNIST IDX files or CIFAR-10 binary batches")
    g.add_argument("--samples", type=int, default=5000, help="MNIST-1D samples to generate (80%% train, 20%% test)")
    g.add_argument("--data-seed", type=int, default=42, help="seed of the generated MNIST-1D data")
    g.add_argument("--model", default="auto", choices=["auto", "cnn", "cnn-bn", "mlp", "moe", "linear", "convnet"],
                   help="auto: cnn for mnist1d, convnet for mnist and cifar10; cnn-bn: cnn with a BatchNorm after "
                        "each convolution; moe: an MLP with a mixture-of-experts layer (--mode dp spreads the experts "
                        "over the ranks: expert parallelism)")
    g.add_argument("--moe-experts", type=int, default=8, help="moe: experts in the mixture (a multiple of the ranks "
                                                                   "in --mode dp)")
    g.add_argument("--moe-k", type=int, default=1, help="moe: experts per token (1: Switch, 2: GShard)")
    g.add_argument("--moe-ep-size", type=int, default=0,
                   help="moe, --mode dp: ranks per expert-parallel group (DeepSpeed's ep_size; the experts are "
                        "replicated over the groups); 0: all the ranks")
    g.add_argument("--moe-aux", type=float, default=0.01,
                   help="moe: weight of the load-balancing loss added to the training loss (0: none)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    g.add_argument("--batch-size", type=int, default=64, help="global batch size, split over the ranks")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd", "momentum"],
                   help="optimizer (in ps mode the servers run it on their shards)")
    g.add_argument("--lr", type=float, default=0.02, help="peak learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="momentum of --optimizer momentum")
    g.add_argument("--weight-decay", type=float, default=0.01, help="weight decay")
    g.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine", "constant"],
                   help="learning-rate schedule over the whole run")
    g.add_argument("--tail", default="drop", choices=list(TAILS),
                   help="an epoch's last incomplete global batch: drop it, keep it smaller, or pad it")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and of the sample order")
    g.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="dp, pipeline and hybrid modes: scale the gradients so that the whole model's gradient "
                        "norm (over every pipeline stage) is at most this (0: off)")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="dp, pipeline and hybrid modes: mixed precision, the forward under torch.autocast in "
                        "bfloat16 or float16 (fp16 with a dynamic loss scale that every stage agrees on)")
    g.add_argument("--initial-scale-power", type=int, default=16,
                   help="--amp fp16: the loss scale starts at 2**N (halved at each overflow, doubled after "
                        "2000 clean steps)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="dp mode: cut each rank's share of a global batch into N micro-steps whose gradients "
                        "add up locally; one all-reduce per global batch (less activation memory, same result)")
    g = p.add_argument_group("communication")
    g.add_argument("--algorithm", default="auto", choices=list(ALGORITHMS), help="gradient all-reduce algorithm")
    g.add_argument("--bucket-mb", type=float, default=25.0, help="gradient bucket size in MiB")
    g.add_argument("--reduction", default="mean", choices=["mean", "adasum"],
                   help="dp mode: how the ranks' gradients combine: their mean, or Adasum (Horovod's op=Adasum: "
                        "orthogonal gradients add, parallel ones average; needs a power-of-two rank count)")
    g.add_argument("--sync-bn", action="store_true",
                   help="dp mode: BatchNorm layers normalize over the global batch, all ranks' samples "
                        "(dmlmpi SyncBatchNorm), not each rank's share; needs a model with BatchNorm (cnn-bn)")
    g.add_argument("--zero", type=zero_stage, nargs="?", const=1, default=0, metavar="STAGE",
                   help="ZeRO: split over the data-parallel ranks the optimizer state (--zero or --zero 1: stage 1, "
                        "dp and hybrid modes; each rank keeps and updates 1/n of it, then the parameters are "
                        "all-gathered), also the gradients (--zero 2: stage 2, dp mode; each bucket of "
                        "gradients is reduce-scattered to the ranks that update it, no rank keeps all of them), "
                        "and also the parameters (--zero 3: stage 3, dp mode; each layer is all-gathered while "
                        "it runs forward or backward; --bucket-mb does not apply: a layer is a bucket)")
    g.add_argument("--zero3-unit-params", type=int, default=0, metavar="N",
                   help="with --zero 3: 0 gathers each layer with parameters on its own; N > 0 makes a unit of each "
                        "submodule holding at least N trainable elements not in a unit below it, and the root of "
                        "the rest (torch FSDP's size-based wrapping): fewer, larger gathers")
    g.add_argument("--compression", default="none", choices=["none", "fp16", "bf16", "powersgd"],
                   help="dp mode: send gradients as 16-bit floats, or gradient matrices as low-rank factors with "
                        "error feedback (PowerSGD)")
    g.add_argument("--powersgd-rank", type=int, default=2, help="rank of PowerSGD's factors")
    g.add_argument("--powersgd-warmup", type=int, default=0,
                   help="steps whose gradients go whole before PowerSGD starts")
    g.add_argument("--straggler", type=straggler, metavar="RANK:SECONDS",
                   help="slow one training rank down: it sleeps SECONDS before each step")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: GPU local_rank %% gpus_per_node when CUDA is available, else CPU")
    g.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank (ranks share the cores)")
    g = p.add_argument_group("parameter server (--mode ps)")
    g.add_argument("--servers", type=int, default=1, help="server ranks (the last ones); the others are workers")
    g.add_argument("--ps-mode", default="sync", choices=["sync", "async", "ssp"],
                   help="consistency: sync (BSP), async (ASP), ssp (bounded staleness, see --staleness)")
    g.add_argument("--staleness", type=int, default=2,
                   help="ssp: how many steps a worker may run ahead of the slowest (0 = sync)")
    g.add_argument("--ps-pace", default="even", choices=["even", "own"],
                   help="async: even = every worker takes an equal share of each epoch and all stop together; "
                        "own = each goes through its share at its own speed until the servers have applied "
                        "epochs x steps-per-epoch x workers gradients, so a fast worker does more of them")
    g = p.add_argument_group("pipeline (--mode pipeline, --mode hybrid)")
    g.add_argument("--dp", type=int, default=2, help="hybrid: data-parallel replicas of the pipeline")
    g.add_argument("--pp", type=int, default=4, help="hybrid: pipeline ranks (pipeline mode: all ranks)")
    g.add_argument("--microbatches", type=int, default=8, help="microbatches per global batch share")
    g.add_argument("--pipeline-schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved", "zb-h1"],
                   help="order of the microbatches' forwards and backwards on each stage (zb-h1: zero-bubble, "
                        "the backward split into input and weight gradients)")
    g.add_argument("--chunks", type=int, default=2, help="interleaved: model chunks (virtual stages) per rank")
    g.add_argument("--partition", default="parameters",
                   help="how layers are cut into stages: uniform, parameters, time, or cut points like 3,6,9")
    g.add_argument("--recompute", action="store_true",
                   help="activation checkpointing: keep only stage inputs, recompute in backward")
    g = p.add_argument_group("federated learning (--mode fl; --epochs, --batch-size, --lr, --optimizer do not apply)")
    g.add_argument("--clients", type=int, default=100, help="simulated clients, each with its own share of the data")
    g.add_argument("--fraction", type=float, default=0.1, help="fraction of the clients sampled each round")
    g.add_argument("--rounds", type=int, default=150, help="federated rounds")
    g.add_argument("--local-epochs", type=int, default=5, help="passes of a client over its data per round")
    g.add_argument("--local-batch", type=int, default=10, help="client minibatch size; 0 = whole client dataset")
    g.add_argument("--client-lr", type=float, default=0.1, help="clients' SGD learning rate")
    g.add_argument("--client-momentum", type=float, default=0.9, help="clients' SGD momentum (0: plain SGD)")
    g.add_argument("--client-data", default="iid", choices=["iid", "dirichlet", "shards"],
                   help="how the training set is split over clients: iid, Dirichlet(--alpha) label skew, or the "
                        "FedAvg paper's label shards (--shards-per-client per client)")
    g.add_argument("--alpha", type=float, default=0.5, help="dirichlet: concentration (small = more skew)")
    g.add_argument("--shards-per-client", type=int, default=2, help="shards: label-sorted shards per client")
    g.add_argument("--strategy", default="fedavg",
                   choices=["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "scaffold",
                            "median", "trimmed_mean", "krum", "bulyan", "qfedavg"], help="server aggregation strategy")
    g.add_argument("--server-lr", type=float, help="server learning rate (fedavgm, scaffold; eta of fedadam/"
                                                  "fedyogi/fedadagrad); default: the strategy's own")
    g.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm: server momentum")
    g.add_argument("--mu", type=float, default=0.01, help="fedprox: proximal coefficient")
    g.add_argument("--trim", type=float, default=0.1, help="trimmed_mean: fraction cut at each end")
    g.add_argument("--krum-f", type=int, default=0, help="krum, bulyan: Byzantine clients tolerated")
    g.add_argument("--qffl-q", type=float, default=0.2,
                   help="qfedavg: fairness exponent q (0: FedAvg with equal client weights; larger: more weight "
                        "to the clients with the highest loss)")
    g.add_argument("--qffl-lr", type=float, default=0.0,
                   help="qfedavg: step size 1/L of the server's update (0: --client-lr, the paper's choice)")
    g.add_argument("--dropout", type=float, default=0.0, help="probability that a sampled client fails in a round")
    g.add_argument("--deadline", type=float, default=0.0,
                   help="simulated seconds the server waits for a round; slower clients are left out (0: none)")
    g.add_argument("--step-time", type=float, default=0.01, help="simulated seconds of a local step (median client)")
    g.add_argument("--speed-sigma", type=float, default=0.5, help="log-normal spread of the clients' speeds")
    g.add_argument("--min-clients", type=int, default=1, help="fewer answers than this and the round is skipped")
    g.add_argument("--ranks-per-client", type=int, default=1,
                   help="ranks per client group; > 1: each client trains data-parallel over its group (cross-silo)")
    g.add_argument("--edges", type=int, default=0,
                   help="edge aggregators between the client groups and the server (0: groups report directly)")
    g.add_argument("--secagg", action="store_true", help="secure aggregation (pairwise masks, Shamir dropout recovery)")
    g.add_argument("--secagg-clip", type=float, default=1.0,
                   help="secagg: fixed-point range [-clip, clip] of each update coordinate (values outside are clipped)")
    g.add_argument("--secagg-neighbours", type=int, default=0,
                   help="secagg: 0 = every client pairs with every other; k = SecAgg+ k-regular graph")
    g.add_argument("--secagg-threshold", type=float, default=0.5,
                   help="secagg: Shamir threshold as a fraction of a client's neighbours")
    g.add_argument("--dp-clip", type=float, default=0.0, help="DP-FedAvg: L2 clip of each client update (0: off)")
    g.add_argument("--dp-noise", type=float, default=0.0, help="DP-FedAvg: noise multiplier z")
    g.add_argument("--dp-delta", type=float, default=1e-5, help="DP-FedAvg: delta of the reported (epsilon, delta)")
    g.add_argument("--dp-adaptive", action="store_true",
                   help="DP-FedAvg with adaptive clipping (Andrew et al. 2021): --dp-clip is the first clip, then it "
                        "follows --dp-target-quantile of the update norms, estimated from a noisy count")
    g.add_argument("--dp-target-quantile", type=float, default=0.5,
                   help="adaptive clipping: the fraction of client updates the clip should leave unclipped")
    g.add_argument("--dp-clip-lr", type=float, default=0.2, help="adaptive clipping: eta of C <- C exp(-eta (b - target))")
    g.add_argument("--dp-count-noise", type=float, default=None,
                   help="adaptive clipping: std of the noise on the unclipped count (default: clients per round / 20 "
                        "when --dp-noise is set)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate the global model every N rounds")
    g = p.add_argument_group("fault tolerance")
    g.add_argument("--elastic", action="store_true",
                   help="survive dead ranks (Open MPI ULFM; launch with mpirun --with-ft ulfm). dp: the survivors "
                        "shrink the communicator, re-shard the data and go on from the last completed step; fl: the "
                        "dead rank's clients count as dropped and the survivors redo the round; ps (async): the servers go on "
                        "with the remaining workers")
    g = p.add_argument_group("run directory")
    g.add_argument("--out", help="run directory: config, metrics, checkpoints, trace, summary (default runs/MODE)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--checkpoint-every", type=int, default=0,
                   help="checkpoint every N steps (fl: rounds); 0: at each epoch end (fl: every round)")
    g.add_argument("--checkpoint-format", choices=("full", "sharded"), default="full",
                   help="full: rank 0 writes the whole model and optimizer state to one file; sharded (--zero 1-3 "
                        "in dp mode): every rank writes its own pieces of them (ckpt-STEP/shard-RANK.pt), nobody "
                        "gathers the whole, and a resume reads only the pieces it needs, at any world size")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) after N steps (fl: rounds) in total; 0: no limit")
    g.add_argument("--log-every", type=int, default=10, help="log the global loss every N steps")
    g.add_argument("--trace", action=argparse.BooleanOptionalAction, default=True,
                   help="record a Chrome-trace timeline (trace.json)")
    g.add_argument("--verbose", action="store_true", help="let every rank print, not only rank 0")
    return p


ELASTIC_MODES = ("dp", "fl", "ps")  # the modes that can go on without a dead rank


def straggler(text: str) -> tuple[int, float]:
    """RANK:SECONDS -> (rank, seconds)."""
    try:
        rank, seconds = text.split(":")
        parsed = int(rank), float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected RANK:SECONDS, e.g. 1:0.01, got {text!r}") from None
    if parsed[0] < 0 or parsed[1] < 0:
        raise argparse.ArgumentTypeError(f"rank and seconds must not be negative, got {text!r}")
    return parsed


def training_ranks(args: argparse.Namespace, world_size: int) -> int:
    """Over how many ranks each global batch is split (workers in ps mode, replicas of the pipeline)."""
    if args.mode == "ps":
        return world_size - args.servers
    if args.mode == "pipeline":
        return 1
    if args.mode == "hybrid":
        return args.dp
    if args.mode == "fl":
        return 1  # a global batch is not split in fl mode (clients train on their own data)
    return world_size


def pipeline_ranks(args: argparse.Namespace, world_size: int) -> int:
    """Length of each pipeline: all ranks in pipeline mode, --pp in hybrid mode."""
    return world_size if args.mode == "pipeline" else args.pp


def zero_stage(text: str) -> int:
    """--zero's value: a ZeRO stage 0 to 3 (YAML's true and false mean 1 and 0)."""
    value = {"true": "1", "false": "0"}.get(text.strip().lower(), text)
    if value not in ("0", "1", "2", "3"):
        raise argparse.ArgumentTypeError(f"a ZeRO stage is 0, 1, 2 or 3, got {text!r}")
    return int(value)


def _yaml_tokens(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """A YAML file of options as command-line tokens (so argparse converts and checks them)."""
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except OSError as exc:
        parser.error(f"--config {path}: {exc.strerror}")
    except yaml.YAMLError as exc:
        parser.error(f"--config {path}: not valid YAML: {exc}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a mapping of option: value, got {type(values).__name__}")
    known = {a.dest: a for a in parser._actions if a.option_strings}
    tokens: list[str] = []
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest == "config":
            parser.error(f"--config {path}: unknown option {key!r}")
        action, flag = known[dest], "--" + dest.replace("_", "-")
        if isinstance(action, argparse.BooleanOptionalAction):
            tokens.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction):
            if value:
                tokens.append(flag)
        else:
            tokens += [flag, str(value)]
    return tokens


def parse(argv: Sequence[str] | None, world_size: int) -> argparse.Namespace:
    """Options from defaults, YAML and command line, checked against each other and the world size."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    first = parser.parse_args(argv)
    # the YAML file's options come first, so that the command line's own override them
    args = parser.parse_args(_yaml_tokens(parser, first.config) + argv) if first.config else first
    check(parser, args, world_size)
    if args.out is None:
        args.out = f"runs/{args.mode}"
    return args


def check(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """Reject values that cannot work, before any data is loaded (argparse error: exit status 2)."""
    positive = ["epochs", "batch_size", "samples", "lr", "bucket_mb", "log_every", "threads"]
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ["weight_decay", "checkpoint_every", "max_steps", "seed", "data_seed"]:
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    if args.mode == "ps" and not 1 <= args.servers < world_size:
        parser.error(f"--servers {args.servers} on {world_size} rank(s): ps mode needs at least one server and "
                     f"one worker (1 <= --servers <= {world_size - 1})" if world_size > 1 else
                     f"--mode ps needs at least 2 ranks (servers + workers), got {world_size}")
    if args.mode in ("pipeline", "hybrid"):
        for name in ("dp", "pp", "microbatches", "chunks"):
            if getattr(args, name) < 1:
                parser.error(f"--{name} must be positive, got {getattr(args, name)}")
        if args.mode == "hybrid" and args.dp * args.pp != world_size:
            parser.error(f"--mode hybrid --dp {args.dp} --pp {args.pp} needs {args.dp * args.pp} ranks, "
                         f"but the job has {world_size}")
        pp = pipeline_ranks(args, world_size)
        if args.pipeline_schedule == "interleaved" and args.microbatches % pp:
            parser.error(f"--pipeline-schedule interleaved: --microbatches {args.microbatches} must be a multiple "
                         f"of the {pp} pipeline ranks")
        if args.batch_size < training_ranks(args, world_size) * args.microbatches:
            parser.error(f"--batch-size {args.batch_size} cannot give each of the {training_ranks(args, world_size)} "
                         f"pipeline(s) {args.microbatches} microbatches")
        if args.partition not in ("uniform", "parameters", "time"):
            try:
                args.partition = [int(c) for c in args.partition.split(",")]
            except ValueError:
                parser.error(f"--partition {args.partition!r}: uniform, parameters, time, or cut points like 3,6,9")
    if args.mode == "fl":
        from dmlmpi.federated.simulation import FLConfig  # federated imports stay out of the other modes
        try:
            FLConfig.from_args(args).check(world_size, None)
        except ValueError as exc:
            parser.error(str(exc))
    if args.sync_bn and args.mode != "dp":
        parser.error(f"--sync-bn works with --mode dp, not {args.mode}")
    if args.sync_bn and args.model not in WITH_BATCHNORM:
        parser.error(f"--sync-bn needs a model with BatchNorm layers (--model {', '.join(WITH_BATCHNORM)}); "
                     f"--model {args.model} has none")
    if args.zero and args.mode not in ("dp", "hybrid"):
        parser.error(f"--zero works with --mode dp or hybrid (split along dp), not {args.mode}")
    if args.zero >= 2:
        if args.mode != "dp":
            parser.error(f"--zero {args.zero} works with --mode dp, not {args.mode} (--zero 1 splits a hybrid "
                         "grid's optimizer state along dp)")
        if args.compression != "none" or args.reduction != "mean":
            parser.error(f"--zero {args.zero} reduce-scatters full-precision gradients: not with --compression "
                         f"{args.compression} or --reduction {args.reduction}")
    if args.zero3_unit_params < 0:
        parser.error(f"--zero3-unit-params must not be negative, got {args.zero3_unit_params}")
    if args.zero3_unit_params and args.zero != 3:
        parser.error(f"--zero3-unit-params groups ZeRO-3's units: it needs --zero 3 (got --zero {args.zero})")
    if args.checkpoint_format == "sharded" and (args.mode != "dp" or not args.zero):
        parser.error(f"--checkpoint-format sharded saves ZeRO's shards: it needs --mode dp with --zero 1, 2 or 3 "
                     f"(got --mode {args.mode}, --zero {args.zero})")
    if args.compression == "powersgd":
        if args.mode != "dp":
            parser.error(f"--compression powersgd works with --mode dp, not {args.mode}")
        if args.elastic:
            parser.error("--compression powersgd is not supported with --elastic: a dead rank's error feedback "
                         "would be lost")
        if args.powersgd_rank < 1:
            parser.error(f"--powersgd-rank must be at least 1, got {args.powersgd_rank}")
        if args.powersgd_warmup < 0:
            parser.error(f"--powersgd-warmup must not be negative, got {args.powersgd_warmup}")
    if args.sync_bn and args.elastic:
        parser.error("--sync-bn is not supported with --elastic: recovery from a rank that dies inside "
                     "SyncBatchNorm's collectives has not been tested")
    if args.clip_grad_norm < 0 or args.clip_grad_norm != args.clip_grad_norm:
        parser.error(f"--clip-grad-norm must be a positive norm, or 0 for off; got {args.clip_grad_norm}")
    if args.clip_grad_norm and args.mode not in ("dp", "pipeline", "hybrid"):
        parser.error(f"--clip-grad-norm works with --mode dp, pipeline or hybrid, not {args.mode}"
                     + (" (--dp-clip clips each client's update)" if args.mode == "fl" else ""))
    if args.amp != "none" and args.mode not in ("dp", "pipeline", "hybrid"):
        parser.error(f"--amp works with --mode dp, pipeline or hybrid, not {args.mode}")
    if not 0 <= args.initial_scale_power <= 100:
        parser.error(f"--initial-scale-power must be in 0..100, got {args.initial_scale_power}")
    if args.reduction == "adasum":
        if args.mode != "dp":
            parser.error(f"--reduction adasum works with --mode dp, not {args.mode}")
        if not is_power_of_two(world_size):
            parser.error(f"--reduction adasum needs a power-of-two number of ranks (it combines them in a binary "
                         f"tree), but the job has {world_size}")
        if args.compression != "none":
            parser.error(f"--reduction adasum combines whole gradients: not with --compression {args.compression}")
        if args.elastic:
            parser.error("--reduction adasum does not work with --elastic (a shrunk world is rarely a power of two)")
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be at least 1, got {args.grad_accum}")
    if args.grad_accum > 1 and args.mode != "dp":
        parser.error(f"--grad-accum works with --mode dp, not {args.mode}"
                     + (" (a pipeline accumulates over --microbatches)" if args.mode in ("pipeline", "hybrid") else ""))
    if args.zero and args.elastic:
        parser.error("--zero does not work with --elastic: a dead rank's shard of the optimizer state dies with it")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    if args.staleness < 0:
        parser.error(f"--staleness must not be negative, got {args.staleness}")
    train_ranks = training_ranks(args, world_size)
    if args.batch_size < train_ranks:
        parser.error(f"--batch-size {args.batch_size} is smaller than the {train_ranks} training ranks: "
                     f"every rank needs at least one sample per step (use --batch-size >= {train_ranks})")
    if args.grad_accum > 1 and args.batch_size < train_ranks * args.grad_accum:
        parser.error(f"--grad-accum {args.grad_accum}: --batch-size {args.batch_size} gives each of the {train_ranks} "
                     f"ranks fewer samples than micro-steps (use --batch-size >= {train_ranks * args.grad_accum})")
    if args.straggler is not None and args.straggler[0] >= train_ranks:
        parser.error(f"--straggler {args.straggler[0]}:{args.straggler[1]}: rank {args.straggler[0]} does not "
                     f"train (training ranks are 0..{train_ranks - 1})")
    if args.ps_pace == "own" and (args.mode != "ps" or args.ps_mode != "async"):
        parser.error(f"--ps-pace own needs --mode ps --ps-mode async (got --mode {args.mode}"
                     + (f" --ps-mode {args.ps_mode})" if args.mode == "ps" else ")"))
    if args.ps_pace == "own" and args.elastic:
        parser.error("--ps-pace own does not work with --elastic (workers at their own places in the data stop "
                     "through the servers, not through the survivors' agreement): use --ps-pace even")
    if args.elastic:
        if args.mode not in ELASTIC_MODES:
            parser.error(f"--elastic works with --mode {', '.join(ELASTIC_MODES)}, not {args.mode}")
        if args.mode == "ps" and args.ps_mode != "async":
            parser.error(f"--elastic in ps mode needs --ps-mode async (a {args.ps_mode} step waits for every worker; "
                         "async servers simply go on with the workers that are left)")
        if args.mode == "fl" and (args.ranks_per_client != 1 or args.strategy == "scaffold"):
            parser.error("--elastic in fl mode needs --ranks-per-client 1 (a dead rank is a dead client device) and "
                         "a strategy without client state (SCAFFOLD's control variates would die with the rank)")
        from dmlmpi.elastic import ElasticUnavailable, check_available
        try:
            check_available()
        except ElasticUnavailable as exc:
            parser.error(str(exc))
    if args.model == "moe":
        check_moe(parser, args, world_size)
    if args.dataset != "mnist1d" and not args.data_dir:
        parser.error(f"--dataset {args.dataset} reads files: give --data-dir")
    if args.dataset == "mnist1d" and args.samples < 10:
        parser.error(f"--samples {args.samples} is too few to split into train and test")


def check_moe(parser: argparse.ArgumentParser, args: argparse.Namespace, world_size: int) -> None:
    """--model moe: a mixture that splits over the data-parallel ranks, and what expert parallelism cannot do yet."""
    if args.moe_experts < 1 or not 1 <= args.moe_k <= args.moe_experts:
        parser.error(f"--model moe needs --moe-experts >= 1 and 1 <= --moe-k <= --moe-experts, got "
                     f"--moe-experts {args.moe_experts} --moe-k {args.moe_k}")
    if args.moe_aux < 0:
        parser.error(f"--moe-aux must not be negative, got {args.moe_aux}")
    if args.mode != "dp":
        return  # elsewhere every rank holds the whole mixture (a plain model)
    if args.moe_ep_size < 0 or world_size % (args.moe_ep_size or world_size):
        parser.error(f"--moe-ep-size {args.moe_ep_size} must divide the {world_size} ranks into equal "
                     f"expert-parallel groups (0: one group of all of them)")
    group = args.moe_ep_size or world_size
    if args.moe_experts % group:
        parser.error(f"--model moe in --mode dp spreads the experts over each group of {group} ranks: --moe-experts "
                     f"{args.moe_experts} does not split over {group} ranks (use a multiple of {group})")
    unsupported = [(args.zero, f"--zero {args.zero}"), (args.elastic, "--elastic"),
                   (args.reduction != "mean", f"--reduction {args.reduction}"),
                   (args.compression == "powersgd", "--compression powersgd")]
    for used, option in unsupported:
        if used and world_size > 1:
            parser.error(f"--model moe in --mode dp (expert parallelism) does not work with {option} yet: each rank's "
                         f"experts are its own")


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved options as a plain dict (for config.json)."""
    return {k: v for k, v in vars(args).items()}
