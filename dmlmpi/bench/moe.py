"""`python -m dmlmpi.bench moe`: a mixture-of-experts model, experts spread over the ranks or replicated.

Run under `mpirun -n K`. The model: Linear(d, d), ReLU, a top-1 mixture of E experts (each
Linear(d, m d), ReLU, Linear(m d, d)), ReLU, Linear(d, 10); each rank trains on its own fixed
batch of T tokens (weak scaling), SGD. Variants, the same model and data:

- `local`: every expert on every rank, no communication (the floor);
- `dmlmpi-ep`: expert parallelism, E/K experts per rank (`ExpertParallelMoE`: tokens go to their
  experts' ranks and back by all-to-all), the rest averaged by `DataParallel(local_params=experts)`;
- `dmlmpi-dp`: every expert on every rank, `DataParallel` averaging every gradient, the experts' too;
- `ddp`: the same replicated model under torch DistributedDataParallel over gloo.

The variants take their timed samples in turn (balanced orders, the same steps per sample), each
sample the slowest rank's. Reported: tokens/s over all ranks (median, min, max), the step time
against `local`'s, and the parameters each rank keeps.
"""
from __future__ import annotations

import argparse
import statistics
from typing import Any, Callable

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.parallel import DataParallel, ExpertParallelMoE
from dmlmpi.parallel.experts import experts_of

from .common import balanced_orders, close_gloo, format_table, init_gloo, timed_sample, write_json
from .dp import calibrate

VARIANTS = ("local", "dmlmpi-ep", "dmlmpi-dp", "ddp")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m dmlmpi.bench moe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=128, help="model width")
    p.add_argument("--experts", type=int, default=8, help="experts in all (a multiple of the ranks)")
    p.add_argument("--mult", type=int, default=4, help="an expert's hidden width, in multiples of d")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--samples", type=int, default=7, help="timed samples per variant (median, min, max)")
    p.add_argument("--sample-seconds", type=float, default=0.3, help="about how long one timed sample runs")
    p.add_argument("--json", help="write one record per variant to this path")
    return p.parse_args(argv)


class MoENet(nn.Module):
    """Dense layer, mixture of experts, classifier."""

    def __init__(self, d: int, moe: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp, self.moe, self.out = nn.Linear(d, d), moe, nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.moe(torch.relu(self.inp(x)))))


def build(variant: str, world: MPI.Comm, args: argparse.Namespace) -> tuple[nn.Module, list[nn.Parameter]]:
    """The model as `variant` holds it, and the parameters that are this rank's alone (its experts, with -ep)."""
    torch.manual_seed(0)
    gate = nn.Linear(args.d, args.experts)
    experts = [nn.Sequential(nn.Linear(args.d, args.mult * args.d), nn.ReLU(), nn.Linear(args.mult * args.d, args.d))
               for _ in range(args.experts)]
    if variant == "dmlmpi-ep":
        moe = ExpertParallelMoE(gate, [experts[e] for e in experts_of(world.Get_rank(), args.experts,
                                                                      world.Get_size())], args.experts, world)
        return MoENet(args.d, moe), list(moe.experts.parameters())
    # every expert here: the same layer over this rank alone (its all-to-alls are copies)
    return MoENet(args.d, ExpertParallelMoE(gate, experts, args.experts, MPI.COMM_SELF)), []


def make_step(variant: str, world: MPI.Comm, group: Any, args: argparse.Namespace) -> tuple[nn.Module, Callable[[], None]]:
    """The wrapped model and one training step of it on this rank's fixed batch."""
    model, local = build(variant, world, args)
    if variant in ("dmlmpi-ep", "dmlmpi-dp"):
        model = DataParallel(model, world, local_params=local)
    elif variant == "ddp":
        model = nn.parallel.DistributedDataParallel(model, process_group=group)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1 + world.Get_rank())
    x, y = torch.randn(args.tokens, args.d, generator=g), torch.randint(0, 10, (args.tokens,), generator=g)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, step


def main(argv: list[str]) -> int:
    """Time every variant, print the table, write JSON."""
    args = parse_args(argv)
    world = MPI.COMM_WORLD
    k = world.Get_size()
    if args.experts % k:
        if world.Get_rank() == 0:
            print(f"bench moe: --experts {args.experts} does not split over {k} ranks", flush=True)
        return 2
    torch.set_num_threads(1)  # ranks share the cores
    dist = init_gloo(world)
    built = {v: make_step(v, world, dist.group.WORLD, args) for v in VARIANTS}
    steps = int(statistics.median(calibrate(step, world, args) for _, step in built.values()))
    per_step: dict[str, list[float]] = {v: [] for v in built}
    for order in balanced_orders(list(built), args.samples):
        for v in order:
            per_step[v].append(timed_sample(built[v][1], steps, world))
    records = []
    floor = statistics.median(per_step["local"])
    for v, (model, _) in built.items():
        rates = [k * args.tokens / t for t in per_step[v]]
        kept = sum(p.numel() for p in model.parameters())
        records.append(dict(variant=v, ranks=k, d=args.d, experts=args.experts, tokens_per_rank=args.tokens,
                            tokens_per_s_median=statistics.median(rates), tokens_per_s_min=min(rates),
                            tokens_per_s_max=max(rates), step_time_s_median=statistics.median(per_step[v]),
                            vs_local=statistics.median(per_step[v]) / floor - 1, params_per_rank=kept))
        if isinstance(model, DataParallel):
            model.close()
    if world.Get_rank() == 0:
        print(f"# mixture of {args.experts} experts (d {args.d}, hidden {args.mult * args.d}), {args.tokens} tokens "
              f"per rank per step, {k} ranks, SGD, torch threads 1")
        rows = [dict(r, rate=f"{r['tokens_per_s_median']:.0f}",
                     spread=f"{r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}",
                     step=f"{r['step_time_s_median'] * 1e3:.2f}", over=f"{100 * r['vs_local']:+.1f}%")
                for r in records]
        print(format_table(rows, [("variant", "variant", ""), ("rate", "tokens/s", ""), ("spread", "min-max", ""),
                                  ("step", "step(ms)", ""), ("over", "vs local", ""),
                                  ("params_per_rank", "params per rank", "")]))
        if args.json:
            write_json(args.json, records)
    close_gloo(dist)
    return 0
