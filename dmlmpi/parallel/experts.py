"""Expert parallelism: a mixture-of-experts layer whose experts are spread over the ranks (DeepSpeed-MoE style).

Each of the n ranks of the layer's communicator holds E/n of the E experts (expert e lives on
rank e // (E/n)) and a copy of the gate. A forward on a rank's tokens:

1. the gate scores every token and picks its top-k experts with their weights (k = 1: Switch
   Transformer; k = 2: GShard); one row per (token, choice), sorted by expert, so each destination
   rank's rows are one block;
2. dispatch: one all-to-all sends every row to the rank of its expert (uneven blocks; with a
   capacity factor the rows past an expert's capacity are dropped first: kept_rows), a second one
   its expert's number;
3. each local expert runs on the tokens it received, from every rank at once;
4. combine: the all-to-all back returns each result to the rank its token came from, in the
   order sent; unsorted, weighted and added up over a token's k choices, it is the layer's output.

The all-to-alls are differentiable (`all_to_all`): the backward of one sends the gradients back
along the same blocks, reversed. An expert's parameters get the gradient of every rank's tokens
it served; the gate's gradient on each rank covers its own tokens only, so a data-parallel gate
averages (or sums) it over the ranks like any replicated parameter. With expert-parallel groups
smaller than the world (expert_groups), each expert has a replica per group, whose gradients add
up (sum_expert_grads).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm as dcomm
from dmlmpi.comm.fusion import allreduce_fused


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


def route(logits: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing: each token's k experts (T, k), their weights (T, k) and the gate's probabilities (T, E).

    k = 1 (Switch Transformer): the expert's softmax probability; k = 2 (GShard): the two
    probabilities divided by their sum.
    """
    probs = torch.softmax(logits, dim=-1)
    weight, expert = probs.topk(k, dim=-1)
    if k > 1:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    return expert, weight, probs


def balance_loss(probs: torch.Tensor, first: torch.Tensor, num_experts: int,
                 comm: MPI.Comm | None = None) -> torch.Tensor:
    """Switch Transformer's load-balancing loss E * sum_e f_e P_e (1 when balanced, up to E when not).

    f_e: the share of the tokens whose first choice is expert e; P_e: the gate's mean probability
    for e. Only P_e carries a gradient; it pushes probability away from the crowded experts.
    With comm, the tokens are every rank's and the result is this rank's share of the loss: summed
    over the ranks it is the loss of all their tokens (so n ranks train what one process trains).
    """
    counts = torch.cat([torch.bincount(first, minlength=num_experts).double(),
                        torch.tensor([float(len(first))], dtype=torch.float64, device=first.device)])
    if comm is not None and comm.Get_size() > 1:
        # every rank's first choices and token count (the probabilities stay here: their sum is this rank's share)
        counts = dcomm.allreduce(counts, comm=comm)
    total = float(counts[-1])
    if total == 0:
        return probs.sum() * 0.0  # no tokens anywhere: nothing to balance (and a gradient of zeros)
    share = (counts[:-1] / total).to(probs.dtype)
    return num_experts * torch.sum(share * probs.sum(dim=0)) / total


def kept_rows(choices: torch.Tensor, num_experts: int, capacity_factor: float | None) -> torch.Tensor:
    """Which (token, choice) rows an expert takes (token-major indices, ascending) when each takes at most
    ceil(capacity_factor * k * T / E) of a rank's rows; None: all of them.

    Priority as in GShard: every token's first choice before any second choice, then token order;
    the rows past an expert's capacity are dropped (their results count as zero).
    """
    tokens, k = choices.shape
    every = torch.arange(tokens * k, device=choices.device)
    if capacity_factor is None:
        return every
    capacity = math.ceil(capacity_factor * k * tokens / num_experts)
    by_priority = choices.t().reshape(-1)  # row i: choice i // T of token i % T
    # each row's place among the rows for the same expert, in priority order
    seen = torch.nn.functional.one_hot(by_priority, num_experts).cumsum(dim=0)
    place = seen.gather(1, by_priority.unsqueeze(1)).squeeze(1) - 1 if len(by_priority) else by_priority
    token_major = (every % tokens) * k + every // tokens if tokens else every
    return torch.sort(token_major[place < capacity]).values


def experts_of(rank: int, num_experts: int, size: int) -> range:
    """The experts rank `rank` holds: a contiguous E/n of them."""
    if num_experts % size:
        raise ValueError(f"{num_experts} experts do not split evenly over {size} ranks")
    per = num_experts // size
    return range(rank * per, (rank + 1) * per)


class ExpertParallelMoE(nn.Module):
    """A top-k mixture-of-experts layer with this rank's share of the experts; forward is collective over comm.

    After each forward, `aux_loss` holds this rank's share of the load-balancing loss of all ranks'
    tokens (balance_loss; the shares add up to the whole batch's). Added to the training loss times
    a small coefficient such as 0.01, scaled like the rank's share of the main loss, it keeps the
    experts evenly used.
    """

    def __init__(self, gate: nn.Linear, local_experts: Sequence[nn.Module], num_experts: int,
                 comm: MPI.Comm | None = None, k: int = 1, capacity_factor: float | None = None) -> None:
        """gate: d -> num_experts scores (the same on every rank); local_experts: this rank's, in expert order.

        capacity_factor: each expert takes at most ceil(factor * k * T / E) of a rank's T tokens' rows
        (kept_rows: DeepSpeed's and Switch's dropping); None: every row, nothing dropped.
        """
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"top-k routing needs 1 <= k <= {num_experts} experts, got k={k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive (or None: no limit), got {capacity_factor}")
        self.capacity_factor = capacity_factor
        # the ranks whose tokens the balancing loss covers (DeepSpeed's ep_size < n: set it to all of them)
        self.balance_comm: MPI.Comm | None = None
        self.last_dropped = 0  # this rank's (token, choice) rows past their expert's capacity in the last forward
        self.comm = MPI.COMM_WORLD if comm is None else comm
        n, r = self.comm.Get_size(), self.comm.Get_rank()
        if gate.out_features != num_experts:
            raise ValueError(f"the gate scores {gate.out_features} experts, but num_experts is {num_experts}")
        mine = experts_of(r, num_experts, n)
        if len(local_experts) != len(mine):
            raise ValueError(f"rank {r} of {n} holds experts {mine.start}..{mine.stop - 1} ({len(mine)}), "
                             f"but {len(local_experts)} local experts were given")
        self.gate, self.experts = gate, nn.ModuleList(local_experts)
        self.num_experts, self.first, self.per_rank, self.k = num_experts, mine.start, len(mine), k
        self.last_counts: list[int] = []  # tokens each local expert served in the last forward (all ranks')
        self.aux_loss: torch.Tensor | None = None  # the last forward's balance_loss (this rank's share)

    def keep_only(self, comm: MPI.Comm) -> list[nn.Parameter]:
        """Keep this rank's share of the experts and route over comm (the layer was built with all of them,
        alone); returns the parameters of the experts kept."""
        if self.comm.Get_size() != 1 or self.per_rank != self.num_experts:
            raise ValueError("keep_only: the layer must hold every expert, on one rank")
        mine = experts_of(comm.Get_rank(), self.num_experts, comm.Get_size())
        self.experts = nn.ModuleList(self.experts[e] for e in mine)
        self.comm, self.first, self.per_rank = comm, mine.start, len(mine)
        return list(self.experts.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route x's tokens (rows) to their experts wherever they live and bring the results back."""
        n = self.comm.Get_size()
        tokens = x.reshape(-1, x.shape[-1])
        # 1. gate: each token's k experts and weights; one row per (token, choice), sorted by expert,
        # so by destination rank
        choices, weight, probs = route(self.gate(tokens), self.k)
        # (one small all-reduce: every rank's first choices, for the balancing loss)
        self.aux_loss = balance_loss(probs, choices[:, 0], self.num_experts, self.balance_comm or self.comm)
        # (with a capacity, only the rows their experts still take)
        kept = kept_rows(choices, self.num_experts, self.capacity_factor)
        self.last_dropped = choices.numel() - len(kept)
        expert = choices.reshape(-1)[kept]
        rows = (tokens.repeat_interleave(self.k, dim=0) if self.k > 1 else tokens)[kept]
        order = torch.argsort(expert, stable=True)
        sorted_expert = expert[order]
        splits = torch.bincount(sorted_expert // self.per_rank, minlength=n).tolist()
        # 2. dispatch: the tokens to their experts' ranks, and which expert each is for
        arrived, received = all_to_all(rows[order], splits, self.comm)
        which, _ = dcomm.alltoall(sorted_expert, splits=splits, comm=self.comm)
        # 3. each local expert on its tokens from every rank (grouped by expert, then put back in arrival order)
        local = which - self.first
        by_expert = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.per_rank).tolist()
        outputs = [e(chunk) for e, chunk in zip(self.experts, torch.split(arrived[by_expert], counts))]
        # (every local expert runs, on an empty chunk too: the rows sent back have its output's width)
        done = torch.cat(outputs)[torch.argsort(by_expert)]
        self.last_counts = counts
        # 4. combine: every result back to its token's rank, in the order it was sent; a token's k
        # results, weighted, add up
        back, _ = all_to_all(done, received, self.comm)
        results = back[torch.argsort(order)]
        if self.last_dropped:  # a dropped row's result is zero
            results = results.new_zeros(choices.numel(), results.shape[-1]).index_copy(0, kept, results)
        out = (results * weight.reshape(-1, 1)).reshape(len(tokens), self.k, back.shape[-1]).sum(1)
        return out.reshape(x.shape[:-1] + out.shape[-1:])


def moe_reference(x: torch.Tensor, gate: nn.Linear, experts: Sequence[nn.Module], k: int = 1,
                  capacity_factor: float | None = None) -> torch.Tensor:
    """The same layer in one process with every expert: each token's weighted results of its k experts, added.

    Every expert runs, on no token too, as in the layer (its gradient is then zero rather than None,
    which an optimizer with momentum tells apart).
    """
    tokens = x.reshape(-1, x.shape[-1])
    choices, weight, _ = route(gate(tokens), k)
    taken = torch.zeros(choices.numel(), dtype=torch.bool, device=choices.device)
    taken[kept_rows(choices, len(experts), capacity_factor)] = True  # the rows within their experts' capacity
    width = experts[0](tokens[:0]).shape[-1]
    out = tokens.new_zeros(len(tokens), width)
    for e, module in enumerate(experts):
        picked = (choices == e) & taken.reshape(choices.shape)  # (T, k): where token t chose e, and e took it
        rows = torch.nonzero(picked.any(dim=1)).flatten()
        w = (weight * picked).sum(dim=1)[rows]  # e's weight for those tokens
        out = out.index_add(0, rows, module(tokens[rows]) * w.unsqueeze(-1))
    return out.reshape(x.shape[:-1] + out.shape[-1:])


def expert_groups(comm: MPI.Comm, ep_size: int) -> tuple[MPI.Comm, MPI.Comm]:
    """DeepSpeed's ep_size: the expert-parallel group of ep_size consecutive ranks this rank routes tokens in,
    and its replica group (the ranks, one per expert-parallel group, that hold the same experts) (collective)."""
    n, r = comm.Get_size(), comm.Get_rank()
    if ep_size < 1 or n % ep_size:
        raise ValueError(f"ep_size {ep_size} does not split a {n}-rank communicator into equal groups")
    return comm.Split(r // ep_size, r), comm.Split(r % ep_size, r)


def sum_expert_grads(params: Sequence[nn.Parameter], replicas: MPI.Comm) -> None:
    """Add up the experts' gradients over their replicas (collective over `replicas`).

    Each replica served the tokens of its own expert-parallel group; with DataParallel's 1/n scaling
    (local_params), the sum is the gradient of the mean loss over every rank.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if replicas.Get_size() > 1 and grads:
        # all-reduce (sum): one replica's gradient per expert from every expert-parallel group
        allreduce_fused(grads, op="sum", comm=replicas, inplace=True)


def spread(model: nn.Module, comm: MPI.Comm) -> list[nn.Parameter]:
    """Every ExpertParallelMoE of `model` (built whole, on one rank) keeps this rank's experts of comm; their parameters."""
    return [p for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.keep_only(comm)]


class ExpertNames:
    """Model keys as this rank's spread model says them (local expert numbers) and as the whole model does."""

    def __init__(self, model: nn.Module) -> None:
        """Find where each expert-parallel layer's experts are, and which of them this rank holds."""
        # "4.experts." -> (first expert here, experts here), for every expert-parallel layer
        self.layers = {(f"{name}." if name else "") + "experts.": (m.first, m.per_rank)
                       for name, m in model.named_modules() if isinstance(m, ExpertParallelMoE)}

    def _split(self, key: str) -> tuple[str, int, str, int, int] | None:
        """An expert's key as (layer prefix, expert number, rest, first expert here, experts here); None otherwise."""
        for prefix, (first, count) in self.layers.items():
            if key.startswith(prefix):
                index, rest = key[len(prefix):].split(".", 1)
                return prefix, int(index), rest, first, count
        return None

    def whole(self, key: str) -> str:
        """The whole model's key for this rank's key ('4.experts.0.w' on rank 1 of 2, 2 experts each: '4.experts.2.w')."""
        found = self._split(key)
        if found is None:
            return key
        prefix, index, rest, first, _ = found
        return f"{prefix}{first + index}.{rest}"

    def here(self, key: str) -> str | None:
        """This rank's key for a key of the whole model; None for an expert held elsewhere."""
        found = self._split(key)
        if found is None:
            return key
        prefix, index, rest, first, count = found
        return f"{prefix}{index - first}.{rest}" if 0 <= index - first < count else None

    def parameter_keys(self, model: nn.Module) -> list[list[str]]:
        """Each parameter's whole-model key, in model.parameters() order (named_state's `names`)."""
        return [[self.whole(name)] for name, _ in model.named_parameters()]

    def is_expert(self, key: str) -> bool:
        """Whether the key belongs to an expert (held by one rank only)."""
        return self._split(key) is not None


def whole_state_dict(model: nn.Module, comm: MPI.Comm) -> dict[str, Any] | None:
    """The whole model's state (every expert, under its own number) on rank 0 of comm, None elsewhere (collective)."""
    names = ExpertNames(model)
    mine = {names.whole(k): v.detach().clone() for k, v in model.state_dict().items()}
    # each rank's experts to rank 0 (what is not an expert is the same everywhere: rank 0's)
    parts = comm.gather({k: v for k, v in mine.items() if names.is_expert(k)}, root=0)
    if parts is None:
        return None
    for part in parts:
        mine.update(part)
    return mine


def local_state_dict(whole: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The entries of a whole model's state that this rank's spread model holds, under its own keys."""
    names = ExpertNames(model)
    return {here: v for k, v in whole.items() if (here := names.here(k)) is not None}
