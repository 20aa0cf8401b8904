"""DataParallel against single-process training on the same global batch, at any world size."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.data import rank_share
from dmlmpi.parallel import DataParallel

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()


def make_model(seed: int = 0) -> nn.Sequential:
    """A small CNN+MLP with several parameter tensors of different sizes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 8, 5, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 18, 32), nn.ReLU(), nn.Linear(32, 10))


def data(n: int = 64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random global data on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g)


def local_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, global_batch: int) -> torch.Tensor:
    """This rank's share of the global mean loss, scaled by the world size (DataParallel averages)."""
    return nn.functional.cross_entropy(model(x), y, reduction="sum") * SIZE / global_batch


def train_reference(steps: int, batch: int, lr: float = 0.05) -> list[torch.Tensor]:
    """Single-process training on the whole global batch."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x, y = data()
    for s in range(steps):
        idx = torch.arange(s * batch, (s + 1) * batch) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["auto", "ring", "mpi", "shm"])
@pytest.mark.parametrize("bucket_mb", [0.001, 25.0])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_matches_single_process(algorithm: str, bucket_mb: float, set_to_none: bool) -> None:
    """N ranks with global batch B equal one process with batch B, parameters after 5 steps."""
    steps, batch = 5, 13  # 13 does not divide evenly over 2, 3, 4 or 8 ranks
    expect = train_reference(steps, batch)
    torch.manual_seed(100 + RANK)  # different init on each rank: the broadcast must fix it
    model = DataParallel(make_model(seed=RANK), bucket_mb=bucket_mb, algorithm=algorithm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data()
    for s in range(steps):
        idx = rank_share((torch.arange(s * batch, (s + 1) * batch) % len(x)).numpy(), RANK, SIZE)
        opt.zero_grad(set_to_none=set_to_none)  # False: backward accumulates into the buckets
        local_loss(model, x[idx], y[idx], batch).backward()
        opt.step()
    for got, want in zip(model.parameters(), expect):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-6)
    assert model._shared == (SIZE > 1)  # CPU ranks of one node: buckets in shared memory
    grads = [p.grad.clone() for p in model.parameters()]
    model.close()  # gives the shared buckets back: .grad must survive it
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_no_sync_accumulates_then_averages() -> None:
    """Two micro-batches under no_sync + one synced equal the gradient of the whole batch."""
    x, y = data(24)
    ref = make_model()
    nn.functional.cross_entropy(ref(x), y).backward()
    model = DataParallel(make_model(), bucket_mb=0.001)
    parts = np.array_split(np.arange(24), 3)
    for k, part in enumerate(parts):
        mine = rank_share(part, RANK, SIZE)
        ctx = model.no_sync() if k < 2 else torch.enable_grad()
        with ctx:
            loss = nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / 24
            loss.backward()
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-6)
    model.close()


class TwoHeads(nn.Module):
    """A model whose second head is used only on some ranks."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = self.body(x)
        return self.a(h) + (self.b(h) if use_b else 0)


def test_unused_parameters_do_not_hang() -> None:
    """Only even ranks use head b: the step completes and b's gradient is the average (zeros elsewhere)."""
    model = DataParallel(TwoHeads(), bucket_mb=0.0001)
    x = torch.ones(2, 4)
    for _ in range(2):  # twice: buckets must reset between passes
        model.zero_grad()
        model(x, use_b=RANK % 2 == 0).sum().backward()
    users = [r for r in range(SIZE) if r % 2 == 0]
    ref = TwoHeads()
    ref(x, use_b=True).sum().backward()
    torch.testing.assert_close(model.module.b.weight.grad, ref.b.weight.grad * len(users) / SIZE)
    torch.testing.assert_close(model.module.a.weight.grad, ref.a.weight.grad)
    model.close()


@pytest.mark.parametrize("compression", ["fp16", "bf16"])
def test_compression_close_to_full_precision(compression: str) -> None:
    """16-bit gradients on the wire: close to the float32 average, parameters stay float32."""
    x, y = data(16)
    mine = rank_share(np.arange(16), RANK, SIZE)
    full = DataParallel(make_model(), bucket_mb=0.001)
    half = DataParallel(make_model(), bucket_mb=0.001, compression=compression)
    for m in (full, half):
        local_loss(m, x[mine], y[mine], 16).backward()
    tol = 2e-2 if compression == "bf16" else 2e-3
    for a, b in zip(full.parameters(), half.parameters()):
        assert b.grad.dtype == torch.float32
        torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol)
    full.close(), half.close()


@pytest.mark.parametrize("bucket_mb", [0.001, 25.0])
def test_adasum_matches_the_tree_of_the_ranks_gradients(bucket_mb: float) -> None:
    """reduction="adasum": each .grad is the one-process Adasum tree of the ranks' own mean gradients, per parameter
    (whatever the buckets); with two steps of SGD the parameters follow; on other rank counts a clear error."""
    from dmlmpi.comm.adasum import is_power_of_two, reference

    if not is_power_of_two(SIZE):
        with pytest.raises(ValueError, match="power-of-two number of ranks"):
            DataParallel(make_model(), WORLD, reduction="adasum")
        return
    x, y = data()
    shares = [rank_share(np.arange(len(x)), r, SIZE) for r in range(SIZE)]
    ref = make_model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model = DataParallel(make_model(), WORLD, bucket_mb=bucket_mb, reduction="adasum")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        # every rank's own mean gradient, computed here for all of them, combined by the tree
        per_rank = []
        for share in shares:
            ref.zero_grad()
            nn.functional.cross_entropy(ref(x[share]), y[share]).backward()
            per_rank.append([p.grad.double().numpy().ravel().copy() for p in ref.parameters()])
        want = [reference([g[i] for g in per_rank], [len(per_rank[0][i])]) for i in range(len(per_rank[0]))]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[shares[RANK]]), y[shares[RANK]]).backward()
        for p, w in zip(model.parameters(), want):
            np.testing.assert_allclose(p.grad.double().numpy().ravel(), w, rtol=1e-4, atol=1e-6)
        opt.step()
        with torch.no_grad():
            for p, w in zip(ref.parameters(), want):
                p -= 0.1 * torch.from_numpy(w).reshape(p.shape).float()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="join: not supported with reduction='adasum'"):
        with model.join():
            pass
    model.close()


def test_bad_settings_are_refused() -> None:
    """Clear errors for bad options, before any communication."""
    with pytest.raises(ValueError, match="compression"):
        DataParallel(make_model(), compression="int8")
    with pytest.raises(ValueError, match="algorithm"):
        DataParallel(make_model(), algorithm="tree")
    with pytest.raises(ValueError, match="bucket_mb"):
        DataParallel(make_model(), bucket_mb=0)
    with pytest.raises(ValueError, match="reduction must be mean or adasum"):
        DataParallel(make_model(), reduction="median")
    with pytest.raises(ValueError, match="does not work with compression='fp16'"):
        DataParallel(make_model(), reduction="adasum", compression="fp16")


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_different_models_are_refused_on_every_rank() -> None:
    """A rank with another model gets the same clear error everywhere, at construction, not a hang."""
    width = 32 if RANK != SIZE - 1 else 33
    net = nn.Sequential(nn.Linear(40, width), nn.ReLU(), nn.Linear(width, 10))
    with pytest.raises(ValueError, match=f"the model differs across ranks: rank\\(s\\) \\[{SIZE - 1}\\]"):
        DataParallel(net)


class WithState(nn.Module):
    """BatchNorm (float and int64 buffers), a bool mask buffer and a uint8 buffer, as real models carry."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(40, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16),
                                 nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
        self.register_buffer("mask", torch.arange(10) % (2 + RANK) != 0)  # differs by rank until synced
        self.register_buffer("codes", torch.full((3,), RANK, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).masked_fill(~self.mask, 0.0)


def test_buffers_of_any_dtype_follow_rank_0() -> None:
    """Bool and uint8 buffers are no obstacle; after construction and after each forward every buffer is rank 0's."""
    from dmlmpi.comm.context import context

    torch.manual_seed(RANK)  # a different model on every rank until the broadcast
    model = DataParallel(WithState())
    rank0 = WORLD.bcast({k: v.clone() for k, v in model.module.state_dict().items()}, root=0)
    for k, v in model.module.state_dict().items():
        assert torch.equal(v, rank0[k]), k
    assert model.module.mask.tolist() == [i % 2 != 0 for i in range(10)]
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctx = context(WORLD)
    for step in range(3):
        with torch.no_grad():
            model.module.codes.fill_(RANK + step)  # a rank-local change, undone by the next forward
        before = ctx.calls
        out = model(x[RANK::SIZE])
        assert ctx.calls - before == 1  # 7 buffers, one broadcast (was one guarded broadcast each)
        assert model.module.codes.tolist() == [step] * 3
        opt.zero_grad()
        nn.functional.cross_entropy(out, y[RANK::SIZE]).backward()
        opt.step()
    # training forwards updated each rank's BatchNorm statistics from its own batch; the next forward
    # starts from rank 0's (as with DDP's broadcast_buffers), which eval mode then leaves as they are
    stats = WORLD.bcast(model.module.net[1].running_mean.clone(), root=0)
    model.eval()
    model(x[RANK::SIZE])
    model.close()
    assert torch.equal(model.module.net[1].running_mean, stats)


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_different_buffers_are_refused_on_every_rank() -> None:
    """Buffers are moved as bytes, so their shapes are checked: same byte count, other shape, clear error."""
    net = nn.Linear(4, 4)
    net.register_buffer("table", torch.zeros((2, 6) if RANK == SIZE - 1 else (3, 4)))
    with pytest.raises(ValueError, match=r"first difference, parameters and buffers entry 2: rank 0 \('table', \(3, 4\)"):
        DataParallel(net)


def uneven_counts(kind: str) -> list[int]:
    """Batches per rank: a staircase (rank r has 2 + r), or rank 0 with none and the others 3."""
    return [2 + r for r in range(SIZE)] if kind == "staircase" else [0] + [3] * (SIZE - 1)


def uneven_batch(r: int, s: int, part: int = 0) -> slice:
    """Rank r's samples at step s (part 1: its second, accumulated micro-batch)."""
    start = ((r * 16 + s) * 2 + part) * 4
    return slice(start, start + 4)


@pytest.mark.parametrize("kind", ["staircase", "one-empty"])
@pytest.mark.parametrize("divide_by_initial", [True, False])
@pytest.mark.parametrize("accumulate", [False, True])
def test_join_trains_uneven_inputs_like_one_process(kind: str, divide_by_initial: bool, accumulate: bool) -> None:
    """Ranks with different numbers of batches: no hang, and every rank ends with the single-process model.

    The reference takes, at step s, the gradient of the ranks that still have a batch, divided by the
    world size (DDP's default) or by their number; with accumulate, each step adds a micro-batch under
    no_sync() first (the ranks that ran out skip those rounds).
    """
    counts = uneven_counts(kind)
    x, y = data(1024)
    parts = (1, 0) if accumulate else (0,)
    ref = make_model()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for s in range(max(counts)):
        active = [r for r in range(SIZE) if s < counts[r]]
        opt.zero_grad()
        divisor = SIZE if divide_by_initial else len(active)
        loss = sum(nn.functional.cross_entropy(ref(x[uneven_batch(r, s, p)]), y[uneven_batch(r, s, p)])
                   for r in active for p in parts) / divisor
        loss.backward()
        opt.step()

    model = DataParallel(make_model(seed=RANK), bucket_mb=0.0001)  # one bucket per parameter
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with model.join(divide_by_initial_world_size=divide_by_initial):
        for s in range(counts[RANK]):
            if s == 1:  # an evaluation inside the block: no round, nothing for the others to mirror
                model.eval()
                with torch.no_grad():
                    model(x[:4])
                model.train()
            opt.zero_grad()
            for p in parts:
                with model.no_sync() if p == 1 else contextlib.nullcontext():
                    b = uneven_batch(RANK, s, p)
                    nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    # out of join: back to the whole world's average, no counting round
    assert model._join is None and model._scale == 1.0 / SIZE
    model.close()


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_join_can_stop_every_rank_at_the_first_uneven_step() -> None:
    """throw_on_early_termination: when rank 0 runs out, every rank raises at the next step."""
    model = DataParallel(make_model())
    x = torch.randn(4, 40)
    with pytest.raises(RuntimeError, match="1 of .* ranks ran out of inputs"):
        with model.join(throw_on_early_termination=True):
            for _ in range(1 if RANK == 0 else 3):
                model(x).sum().backward()
    model.close()


@pytest.mark.skipif(SIZE < 2, reason="needs two ranks")
def test_join_refuses_ranks_that_disagree_on_no_sync() -> None:
    """Inside join, rank 0 accumulating while the others synchronize is an error on every rank, not a hang."""
    model = DataParallel(make_model())
    with pytest.raises(RuntimeError, match="inside no_sync"):
        with model.join():
            with model.no_sync() if RANK == 0 else contextlib.nullcontext():
                model(torch.randn(4, 40)).sum().backward()
    model.close()


def test_join_refuses_sync_batchnorm() -> None:
    """SyncBatchNorm's collectives cannot be shadowed by a rank without inputs: refused at entry."""
    from dmlmpi.parallel import SyncBatchNorm

    model = DataParallel(nn.Sequential(nn.Linear(4, 3), SyncBatchNorm(3)))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        with model.join():
            pass
    model.close()


@pytest.mark.parametrize("kind", ["staircase", "one-empty"])
def test_join_keeps_a_zero_optimizer_stepping(kind: str) -> None:
    """With ZeroRedundancyOptimizer (a collective step), ranks that ran out keep updating their shard: one process's model."""
    from dmlmpi.parallel import ZeroRedundancyOptimizer

    counts = uneven_counts(kind)
    x, y = data(1024)
    ref = make_model()
    opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    for s in range(max(counts)):
        active = [r for r in range(SIZE) if s < counts[r]]
        opt.zero_grad()
        (sum(nn.functional.cross_entropy(ref(x[uneven_batch(r, s)]), y[uneven_batch(r, s)])
             for r in active) / len(active)).backward()
        opt.step()

    model = DataParallel(make_model(seed=RANK), bucket_mb=0.0001)
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, lr=0.01, weight_decay=0.1)
    with model.join(divide_by_initial_world_size=False, optimizer=opt):
        for s in range(counts[RANK]):
            opt.zero_grad()
            b = uneven_batch(RANK, s)
            nn.functional.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    model.close()


def test_use_after_close_is_a_clear_error() -> None:
    """After close() (shared buckets unmapped) a forward raises, instead of a backward writing into freed memory."""
    model = DataParallel(make_model(), bucket_mb=0.0001)
    x, y = data(8)
    local_loss(model, x, y, 8).backward()
    pending = local_loss(model, x, y, 8)  # a graph made before close(): its backward must not crash either
    model.close()
    model.close()  # twice is harmless
    pending.backward()
    with pytest.raises(RuntimeError, match="used after close"):
        model(x)
