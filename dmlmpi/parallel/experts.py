"""Expert parallelism: a mixture-of-experts layer whose experts are spread over the ranks (DeepSpeed-MoE style).

Each of the n ranks holds E/n of the E experts (expert e lives on rank e // (E/n)) and a copy of
the gate. A forward on a rank's tokens:

1. the gate scores every token and picks its top-1 expert with weight p (Switch Transformer);
   tokens are sorted by expert, so each destination rank's tokens are one block;
2. dispatch: one all-to-all sends every token to the rank of its expert (uneven blocks: no
   capacity limit, no token dropped), a second one its expert's number;
3. each local expert runs on the tokens it received, from every rank at once;
4. combine: the all-to-all back returns each result to the rank its token came from, in the
   order sent; unsorted and scaled by p, it is the layer's output.

The all-to-alls are differentiable (`all_to_all`): the backward of one sends the gradients back
along the same blocks, reversed. An expert's parameters get the gradient of every rank's tokens
it served; the gate's gradient on each rank covers its own tokens only, so a data-parallel gate
averages (or sums) it over the ranks like any replicated parameter.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm


class _AllToAll(torch.autograd.Function):
    """alltoall as an autograd op: the backward is the all-to-all of the gradients along the reversed blocks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, splits: list[int], comm: MPI.Comm, box: list) -> torch.Tensor:
        """Send block i of x's rows to rank i; box receives the rows that came from each rank."""
        # all-to-all: our tokens out to their ranks, theirs in
        out, received = dcomm.alltoall(x.detach().contiguous(), splits=splits, comm=comm)
        ctx.received, ctx.comm = received, comm
        box.append(received)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        """The gradients go back to the rank each row came from."""
        # all-to-all of the gradients: the blocks we received go back to their senders
        back, _ = dcomm.alltoall(grad.contiguous(), splits=ctx.received, comm=ctx.comm)
        return back, None, None, None


def all_to_all(x: torch.Tensor, splits: Sequence[int], comm: MPI.Comm) -> tuple[torch.Tensor, list[int]]:
    """Differentiable alltoall of x's rows (block i to rank i); also the rows received from each rank."""
    box: list = []
    out = _AllToAll.apply(x, list(splits), comm, box)
    return out, box[0]


def route(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 routing: each token's expert and the softmax weight the gate gave it."""
    weight, expert = torch.softmax(logits, dim=-1).max(dim=-1)
    return expert, weight


def experts_of(rank: int, num_experts: int, size: int) -> range:
    """The experts rank `rank` holds: a contiguous E/n of them."""
    if num_experts % size:
        raise ValueError(f"{num_experts} experts do not split evenly over {size} ranks")
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


class ExpertParallelMoE(nn.Module):
    """A top-1 mixture-of-experts layer with this rank's share of the experts; forward is collective over comm."""

    def __init__(self, gate: nn.Linear, local_experts: Sequence[nn.Module], num_experts: int,
                 comm: MPI.Comm | None = None) -> None:
        """gate: d -> num_experts scores (the same on every rank); local_experts: this rank's, in expert order."""
        super().__init__()
        self.comm = MPI.COMM_WORLD if comm is None else comm
        n, r = self.comm.Get_size(), self.comm.Get_rank()
        if gate.out_features != num_experts:
            raise ValueError(f"the gate scores {gate.out_features} experts, but num_experts is {num_experts}")
        mine = experts_of(r, num_experts, n)
        if len(local_experts) != len(mine):
            raise ValueError(f"rank {r} of {n} holds experts {mine.start}..{mine.stop - 1} ({len(mine)}), "
                             f"but {len(local_experts)} local experts were given")
        self.gate, self.experts = gate, nn.ModuleList(local_experts)
        self.num_experts, self.first, self.per_rank = num_experts, mine.start, len(mine)
        self.last_counts: list[int] = []  # tokens each local expert served in the last forward (all ranks')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route x's tokens (rows) to their experts wherever they live and bring the results back."""
        n = self.comm.Get_size()
        tokens = x.reshape(-1, x.shape[-1])
        # 1. gate: each token's expert and weight; tokens sorted by expert, so by destination rank
        expert, weight = route(self.gate(tokens))
        order = torch.argsort(expert, stable=True)
        sorted_expert = expert[order]
        splits = torch.bincount(sorted_expert // self.per_rank, minlength=n).tolist()
        # 2. dispatch: the tokens to their experts' ranks, and which expert each is for
        arrived, received = all_to_all(tokens[order], splits, self.comm)
        which, _ = dcomm.alltoall(sorted_expert, splits=splits, comm=self.comm)
        # 3. each local expert on its tokens from every rank (grouped by expert, then put back in arrival order)
        local = which - self.first
        by_expert = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.per_rank).tolist()
        outputs = [e(chunk) for e, chunk in zip(self.experts, torch.split(arrived[by_expert], counts))]
        # (every local expert runs, on an empty chunk too: the rows sent back have its output's width)
        done = torch.cat(outputs)[torch.argsort(by_expert)]
        self.last_counts = counts
        # 4. combine: every result back to its token's rank, in the order it was sent
        back, _ = all_to_all(done, received, self.comm)
        out = back[torch.argsort(order)] * weight.unsqueeze(-1)
        return out.reshape(x.shape[:-1] + out.shape[-1:])


def moe_reference(x: torch.Tensor, gate: nn.Linear, experts: Sequence[nn.Module]) -> torch.Tensor:
    """The same layer in one process with every expert: each token times its weight through its expert.

    Every expert runs, on no token too, as in the layer (its gradient is then zero rather than None,
    which an optimizer with momentum tells apart).
    """
    tokens = x.reshape(-1, x.shape[-1])
    expert, weight = route(gate(tokens))
    width = experts[0](tokens[:0]).shape[-1]
    out = tokens.new_zeros(len(tokens), width)
    for e, module in enumerate(experts):
        rows = torch.nonzero(expert == e).flatten()
        out = out.index_put((rows,), module(tokens[rows]))
    out = out * weight.unsqueeze(-1)
    return out.reshape(x.shape[:-1] + out.shape[-1:])
