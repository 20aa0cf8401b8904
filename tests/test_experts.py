"""Expert parallelism against the same mixture of experts in one process, at any world size."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi import comm
from dmlmpi.parallel.experts import ExpertParallelMoE, all_to_all, experts_of, moe_reference

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
D_IN, D_OUT = 6, 5


def build(num_experts: int) -> tuple[nn.Linear, list[nn.Module]]:
    """The gate and every expert, the same on every rank (seeded)."""
    torch.manual_seed(0)
    gate = nn.Linear(D_IN, num_experts)
    experts = [nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D_OUT)) for _ in range(num_experts)]
    return gate, experts


def rank_tokens(rank: int, shape_lead: tuple[int, ...]) -> torch.Tensor:
    """Rank `rank`'s tokens (seeded by rank, so every rank can rebuild them)."""
    g = torch.Generator().manual_seed(10 + rank)
    return torch.randn(*shape_lead, D_IN, generator=g)


@pytest.mark.parametrize("capacity", [None, 0.6], ids=["dropless", "capacity0.6"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("per_rank", [1, 2])
@pytest.mark.parametrize("lead", [(0,), (7,), (3, 4)], ids=["no-tokens", "tokens", "batch-seq"])
def test_forward_and_gradients_equal_one_process(per_rank: int, lead: tuple[int, ...], k: int,
                                                 capacity: float | None) -> None:
    E = per_rank * SIZE
    k = min(k, E)  # (one expert in all: top-1 only)
    gate, experts = build(E)
    ref_gate, ref_experts = copy.deepcopy(gate), copy.deepcopy(experts)
    mine = experts_of(RANK, E, SIZE)
    moe = ExpertParallelMoE(gate, [experts[e] for e in mine], E, WORLD, k=k, capacity_factor=capacity)
    # ranks hold different numbers of tokens (rank r: lead with its first dimension + r)
    leads = [(lead[0] + (r if lead[0] else 0),) + lead[1:] for r in range(SIZE)]
    x = rank_tokens(RANK, leads[RANK]).requires_grad_()
    y = moe(x)
    assert y.shape == leads[RANK] + (D_OUT,)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(99 + RANK))
    (y * weights).sum().backward()
    # the reference: every rank's tokens through all experts in one process, the same loss summed
    xs = [rank_tokens(r, leads[r]).requires_grad_() for r in range(SIZE)]
    ref_loss = 0
    for r, xr in enumerate(xs):
        yr = moe_reference(xr, ref_gate, ref_experts, k, capacity)  # (a capacity counts each rank's tokens)
        if r == RANK:
            torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-6)
        ref_loss = ref_loss + (yr * torch.randn(yr.shape, generator=torch.Generator().manual_seed(99 + r))).sum()
    ref_loss.backward()
    torch.testing.assert_close(x.grad, xs[RANK].grad, rtol=1e-5, atol=1e-6)
    for local, e in zip(moe.experts, mine):  # an expert's gradient covers every rank's tokens it served
        for p, q in zip(local.parameters(), ref_experts[e].parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    # the gate's gradient on each rank covers its own tokens: summed over the ranks, the whole batch's
    for p, q in zip(gate.parameters(), ref_gate.parameters()):
        torch.testing.assert_close(comm.allreduce(p.grad.clone(), comm=WORLD), q.grad, rtol=1e-5, atol=1e-6)
    served, dropped = WORLD.allreduce(sum(moe.last_counts)), WORLD.allreduce(moe.last_dropped)
    assert served + dropped == k * sum(int(np.prod(lead_r)) for lead_r in leads)
    if capacity is None:
        assert dropped == 0


def test_kept_rows_follow_gshard_priority() -> None:
    from dmlmpi.parallel.experts import kept_rows

    # top-1, 6 tokens, 2 experts, capacity ceil(1.0 * 6 / 2) = 3: expert 0's fourth token is dropped
    assert kept_rows(torch.tensor([[0], [0], [1], [0], [0], [1]]), 2, 1.0).tolist() == [0, 1, 2, 3, 5]
    # top-2, capacity ceil(0.5 * 2 * 4 / 2) = 2: first choices first (t0, t1 to expert 0; t2's is
    # dropped; t3 to expert 1), then second choices (t0's to expert 1 fits; the rest do not)
    assert kept_rows(torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]]), 2, 0.5).tolist() == [0, 1, 2, 6]
    assert kept_rows(torch.tensor([[1, 0]]), 2, None).tolist() == [0, 1]
    assert kept_rows(torch.zeros(0, 2, dtype=torch.long), 2, 1.0).tolist() == []


def test_a_capacity_drops_rows_on_every_layout() -> None:
    gate, experts = build(2 * SIZE)
    with torch.no_grad():
        gate.bias[0] = 50.0  # every token's first choice is expert 0: all but its capacity are dropped
    moe = ExpertParallelMoE(gate, experts[2 * RANK:2 * RANK + 2], 2 * SIZE, WORLD, capacity_factor=1.0)
    y = moe(rank_tokens(RANK, (8,)))
    capacity = -(-8 // (2 * SIZE))
    assert moe.last_dropped == 8 - capacity
    assert int((y.abs().sum(dim=1) == 0).sum()) == 8 - capacity  # the dropped tokens' outputs are zero
    with pytest.raises(ValueError, match="capacity_factor must be positive"):
        ExpertParallelMoE(gate, experts[2 * RANK:2 * RANK + 2], 2 * SIZE, WORLD, capacity_factor=0)


def test_all_to_all_backward_sends_gradients_back() -> None:
    splits = [(RANK + i) % 3 for i in range(SIZE)]
    x = (torch.arange(sum(splits), dtype=torch.float64) + 100 * RANK).reshape(-1, 1).requires_grad_()
    out, received = all_to_all(x, splits, WORLD)
    assert received == [(j + RANK) % 3 for j in range(SIZE)]
    # a gradient that names the rank it is on and where each row came from: 100 (here + 1) + source
    grad = torch.cat([torch.full((c, 1), 100.0 * (RANK + 1) + j, dtype=torch.float64) for j, c in enumerate(received)])
    out.backward(grad)
    # each of our rows went to rank i and came back from there: 100 (i + 1) + us
    want = torch.cat([torch.full((c, 1), 100.0 * (i + 1) + RANK, dtype=torch.float64) for i, c in enumerate(splits)])
    torch.testing.assert_close(x.grad, want)


def test_balance_loss() -> None:
    from dmlmpi.parallel.experts import balance_loss, route

    # a gate that scores every expert the same: P_e = 1/E, so E * sum_e f_e / E = 1 whatever the choices
    logits = torch.zeros(10, 4, requires_grad=True)
    choices, weight, probs = route(logits, 2)
    torch.testing.assert_close(weight, torch.full((10, 2), 0.5))  # top-2 weights add up to 1
    torch.testing.assert_close(balance_loss(probs, choices[:, 0], 4), torch.tensor(1.0))
    # random scores: the formula, and a gradient into the gate
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=g, requires_grad=True)
    choices, _, probs = route(logits)
    share = torch.bincount(choices[:, 0], minlength=4).float() / 64
    loss = balance_loss(probs, choices[:, 0], 4)
    torch.testing.assert_close(loss, 4 * (share * probs.mean(0)).sum())
    loss.backward()
    assert logits.grad.abs().sum() > 0  # it trains the gate
    assert balance_loss(probs[:0], choices[:0, 0], 4).item() == 0.0


def test_aux_loss_shares_add_up_to_the_whole_batch() -> None:
    from dmlmpi.parallel.experts import balance_loss, route

    gate, experts = build(2 * SIZE)
    ref_gate = copy.deepcopy(gate)
    moe = ExpertParallelMoE(gate, experts[2 * RANK:2 * RANK + 2], 2 * SIZE, WORLD)
    moe(rank_tokens(RANK, (5 + RANK,)))  # ranks with different numbers of tokens
    moe.aux_loss.backward()
    total = comm.allreduce(moe.aux_loss.detach().reshape(1).double(), comm=WORLD)
    # one process, every rank's tokens
    xs = torch.cat([rank_tokens(r, (5 + r,)) for r in range(SIZE)])
    choices, _, probs = route(ref_gate(xs))
    whole = balance_loss(probs, choices[:, 0], 2 * SIZE)
    whole.backward()
    torch.testing.assert_close(total, whole.detach().reshape(1).double(), rtol=1e-6, atol=1e-7)
    for p, q in zip(gate.parameters(), ref_gate.parameters()):  # the gradients add up too
        torch.testing.assert_close(comm.allreduce(p.grad.clone(), comm=WORLD), q.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(SIZE % 2 or SIZE < 4, reason="two expert-parallel groups of at least two ranks")
def test_expert_groups_smaller_than_the_world_train_as_one_process() -> None:
    """ep_size = n/2: experts spread over half the ranks, replicated twice; replicas add their gradients."""
    from dmlmpi.parallel import DataParallel
    from dmlmpi.parallel.experts import expert_groups, sum_expert_grads

    ep_size = SIZE // 2
    ep, replicas = expert_groups(WORLD, ep_size)
    E = 2 * ep_size
    gate, experts = build(E)
    ref = Net(moe=None)  # type: ignore[arg-type]
    ref_gate, ref_experts = copy.deepcopy(gate), copy.deepcopy(experts)
    mine = experts_of(ep.Get_rank(), E, ep_size)
    moe = ExpertParallelMoE(gate, [experts[e] for e in mine], E, ep)
    model = DataParallel(Net(moe), WORLD, local_params=moe.experts.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(list(ref.parameters()) + list(ref_gate.parameters())
                              + [p for e in ref_experts for p in e.parameters()], lr=0.5, momentum=0.9)
    try:
        for step in range(3):
            x, y = batch(step, RANK)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            sum_expert_grads(list(moe.experts.parameters()), replicas)
            opt.step()
            xs, ys = zip(*(batch(step, r) for r in range(SIZE)))
            ref_opt.zero_grad()
            logits = ref.out(torch.relu(moe_reference(torch.tanh(ref.inp(torch.cat(xs))), ref_gate, ref_experts)))
            nn.functional.cross_entropy(logits, torch.cat(ys)).backward()
            ref_opt.step()
        for local, e in zip(moe.experts, mine):
            for p, q in zip(local.parameters(), ref_experts[e].parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for p, q in zip(gate.parameters(), ref_gate.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    finally:
        model.close()
        ep.Free()
        replicas.Free()


def test_setup_errors() -> None:
    from dmlmpi.parallel.experts import expert_groups

    if SIZE > 1:
        with pytest.raises(ValueError, match=f"ep_size {SIZE + 1} does not split a {SIZE}-rank communicator"):
            expert_groups(WORLD, SIZE + 1)
    gate, experts = build(2 * SIZE)
    for k in (0, 2 * SIZE + 1):
        with pytest.raises(ValueError, match=f"top-k routing needs 1 <= k <= {2 * SIZE} experts, got k={k}"):
            ExpertParallelMoE(gate, experts[:2], 2 * SIZE, WORLD, k=k)
    if SIZE > 1:  # any number of experts splits over one rank
        gate, experts = build(2 * SIZE + 1)
        with pytest.raises(ValueError, match=f"{2 * SIZE + 1} experts do not split evenly over {SIZE} ranks"):
            ExpertParallelMoE(gate, experts[:2], 2 * SIZE + 1, WORLD)
    gate, experts = build(2 * SIZE)
    with pytest.raises(ValueError, match="but 1 local experts were given"):
        ExpertParallelMoE(gate, experts[:1], 2 * SIZE, WORLD)
    with pytest.raises(ValueError, match="the gate scores"):
        ExpertParallelMoE(gate, experts[:2], 2 * SIZE + 2, WORLD)


class Net(nn.Module):
    """Dense, mixture of experts, dense: the layer inside a model."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp, self.moe, self.out = nn.Linear(4, D_IN), moe, nn.Linear(D_OUT, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.moe(torch.tanh(self.inp(x)))))


def batch(step: int, rank: int, rows: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s samples of one step (seeded)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(rows, 4, generator=g), torch.randint(0, 3, (rows,), generator=g)


def test_training_with_data_parallel_equals_one_process() -> None:
    """DataParallel averages the dense layers and the gate; the experts, local_params, train where they live."""
    from dmlmpi.parallel import DataParallel

    E = 2 * SIZE
    gate, experts = build(E)
    ref = Net(moe=None)  # type: ignore[arg-type]
    ref_gate, ref_experts = copy.deepcopy(gate), copy.deepcopy(experts)
    moe = ExpertParallelMoE(gate, [experts[e] for e in experts_of(RANK, E, SIZE)], E, WORLD)
    model = DataParallel(Net(moe), WORLD, local_params=moe.experts.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ref_opt = torch.optim.SGD(list(ref.parameters()) + list(ref_gate.parameters())
                              + [p for e in ref_experts for p in e.parameters()], lr=0.5, momentum=0.9)
    try:  # close the buckets (collective) even when an assertion fails on one rank only
        for step in range(4):
            x, y = batch(step, RANK)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            # one process: the global batch (every rank's samples) through all experts, the mean loss
            xs, ys = zip(*(batch(step, r) for r in range(SIZE)))
            ref_opt.zero_grad()
            hidden = torch.tanh(ref.inp(torch.cat(xs)))
            logits = ref.out(torch.relu(moe_reference(hidden, ref_gate, ref_experts)))
            nn.functional.cross_entropy(logits, torch.cat(ys)).backward()
            ref_opt.step()
        for p, q in zip(list(model.module.inp.parameters()) + list(model.module.out.parameters()) + list(gate.parameters()),
                        list(ref.inp.parameters()) + list(ref.out.parameters()) + list(ref_gate.parameters())):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for local, e in zip(moe.experts, experts_of(RANK, E, SIZE)):
            for p, q in zip(local.parameters(), ref_experts[e].parameters()):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="not supported with local_params"):
            with model.join():
                pass
    finally:
        model.close()
