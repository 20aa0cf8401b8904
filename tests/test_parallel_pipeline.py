"""Pipeline and hybrid grids against single-process training on the whole batch, at any world size."""
from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.grid import ProcessGrid
from dmlmpi.parallel import Pipeline, clip_grad_norm

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
BATCH = 23  # does not divide evenly into microbatches
P = min(SIZE, 4)  # pipeline length tested here (8 ranks: a 2 x 4 grid below)


def make_model() -> nn.Sequential:
    """17 layers, enough for 4 ranks x 2 chunks; Tanh keeps every gradient non-zero."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(12, 12), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(12, 5))


def data(steps: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random batches, the same on every rank."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(steps * BATCH, 12, generator=g), torch.randint(0, 5, (steps * BATCH,), generator=g)


def reference_grads() -> tuple[float, list[torch.Tensor]]:
    """Loss and every parameter's gradient of single-process training on the whole batch."""
    model = make_model()
    x, y = data()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def my_grads(pp: Pipeline, reference: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pipeline gradient, reference gradient) for each parameter this rank holds, by global layer index."""
    ref_by_layer, i = {}, 0
    for index, layer in enumerate(make_model()):
        n = len(list(layer.parameters()))
        ref_by_layer[index] = reference[i:i + n]
        i += n
    pairs = []
    for indices, part in zip(pp.layer_indices, pp.parts):
        for index, layer in zip(indices, part):
            pairs += [(p.grad, r) for p, r in zip(layer.parameters(), ref_by_layer[index])]
    return pairs


def layer_pairs(pp: Pipeline, model: nn.Sequential) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """(pipeline parameter, the same parameter of a whole `model`) for each parameter this rank holds."""
    return [(p, q) for indices, part in zip(pp.layer_indices, pp.parts) for index, layer in zip(indices, part)
            for p, q in zip(layer.parameters(), model[index].parameters())]


def sub_world() -> MPI.Comm | None:
    """The first P ranks (all of a world of up to 4)."""
    sub = WORLD.Split(0 if RANK < P else MPI.UNDEFINED, RANK)
    return None if sub == MPI.COMM_NULL else sub


CASES = [(s, m) for s in ("gpipe", "1f1b", "interleaved", "zb-h1") for m in (1, P, 2 * P + 1)]


@pytest.mark.parametrize("schedule,M", CASES, ids=[f"{s}-M{m}" for s, m in CASES])
@pytest.mark.parametrize("checkpoint", [False, True], ids=["plain", "recompute"])
def test_gradients_equal_single_process(schedule: str, M: int, checkpoint: bool) -> None:
    """Loss and every parameter's gradient equal the whole batch's in one process (rtol 1e-5, atol 4e-5)."""
    comm = sub_world()
    chunks = 2 if schedule == "interleaved" else 1
    if schedule == "interleaved" and M % P:
        if comm is not None:
            with pytest.raises(ValueError, match="multiple of the pipeline ranks"):
                Pipeline(make_model(), comm, microbatches=M, schedule=schedule, chunks=chunks)
        return
    if comm is None:
        return
    loss, reference = reference_grads()
    pp = Pipeline(make_model(), comm, microbatches=M, schedule=schedule, chunks=chunks, checkpoint=checkpoint)
    x, y = data()
    got = pp.train_step(x, y, nn.functional.cross_entropy)
    assert got == pytest.approx(loss, rel=1e-5, abs=4e-5)
    pairs = my_grads(pp, reference)
    assert pairs, "every rank holds some parameters"
    for mine, ref in pairs:
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=4e-5)
    pp.close()
    comm.Free()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved", "zb-h1"])
def test_parameters_after_optimizer_steps_equal_single_process(schedule: str) -> None:
    """Three Adam steps through the pipeline end where three single-process steps end."""
    comm = sub_world()
    if comm is None:
        return
    steps, M = 3, 2 * P
    x, y = data(steps)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for s in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[s * BATCH:(s + 1) * BATCH]), y[s * BATCH:(s + 1) * BATCH]).backward()
        opt.step()
    pp = Pipeline(make_model(), comm, microbatches=M, schedule=schedule, chunks=2 if schedule == "interleaved" else 1)
    popt = torch.optim.Adam(pp.parameters(), lr=0.01)
    for s in range(steps):
        popt.zero_grad()
        pp.train_step(x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH], nn.functional.cross_entropy)
        popt.step()
    for p, q in layer_pairs(pp, model):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=4e-5)
    pp.close()
    comm.Free()


def test_batches_of_changing_size_equal_single_process() -> None:
    """Microbatch shapes that change between steps (headers are sent only then) still match one process."""
    comm = sub_world()
    if comm is None:
        return
    x, y = data(3)
    sizes = [BATCH, 17, BATCH]
    model = make_model()
    pp = Pipeline(make_model(), comm, microbatches=P + 1, schedule="1f1b")
    start = 0
    for n in sizes:
        xb, yb = x[start:start + n], y[start:start + n]
        start += n
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        pp.zero_grad()
        assert pp.train_step(xb, yb, nn.functional.cross_entropy) == pytest.approx(loss.item(), rel=1e-5, abs=4e-5)
        for p, q in layer_pairs(pp, model):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=4e-5)
    # inference reuses the forward tags with other shapes (3 microbatches of 7-8 rows)
    out = pp.forward_only(x[:BATCH] if comm.Get_rank() == 0 else None, BATCH)
    if comm.Get_rank() == comm.Get_size() - 1:
        torch.testing.assert_close(out, model(x[:BATCH]).detach(), rtol=1e-5, atol=4e-5)
    pp.close()
    comm.Free()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_stages_of_views_only_equal_single_process(schedule: str) -> None:
    """Stages of views only: their output is their input's memory, their input's gradient the received one's."""
    comm = sub_world()
    if comm is None:
        return

    def model() -> nn.Sequential:
        torch.manual_seed(0)
        layers: list[nn.Module] = []
        for stage in range(P):  # odd stages: reshape there and back (views); even ones: Linear + Tanh
            layers += [nn.Unflatten(1, (3, 4)), nn.Flatten()] if stage % 2 else [nn.Linear(12, 12), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(12, 5))

    cuts = [2 * k for k in range(1, P)]  # two layers a stage
    x, y = data(3)
    ref = model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    pp = Pipeline(model(), comm, microbatches=P + 1, schedule=schedule, partition_by=cuts)
    params = list(pp.parameters())  # none on a stage of views
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for s in range(3):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(xb), yb)
        loss.backward()
        ref_opt.step()
        pp.zero_grad()
        assert pp.train_step(xb, yb, nn.functional.cross_entropy) == pytest.approx(loss.item(), rel=1e-5, abs=4e-5)
        if opt is not None:
            opt.step()
    for p, q in layer_pairs(pp, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=4e-5)
    pp.close()
    comm.Free()


def test_forward_only_matches_the_model() -> None:
    """Inference through the stages gives the model's output on the last stage's rank."""
    comm = sub_world()
    if comm is None:
        return
    pp = Pipeline(make_model(), comm, microbatches=3, schedule="1f1b")
    x, _ = data()
    out = pp.forward_only(x if comm.Get_rank() == 0 else None, len(x))
    if comm.Get_rank() == comm.Get_size() - 1:
        torch.testing.assert_close(out, make_model()(x).detach(), rtol=1e-5, atol=4e-5)
    else:
        assert out is None
    pp.close()
    comm.Free()


def test_zero_bubble_sends_input_gradients_before_weight_gradients() -> None:
    """zb-h1: every B's message leaves before its W runs, W's happen, and the activations held stay within min(P, M) microbatches' worth."""
    comm = sub_world()
    if comm is None:
        return
    M = 2 * P
    pp = Pipeline(make_model(), comm, microbatches=M, schedule="zb-h1")
    x, y = data()
    pp.train_step(x, y, nn.functional.cross_entropy)
    ops = [(a.op, a.micro) for a in pp.actions]
    assert sorted(op for op, _ in ops) == ["B"] * M + ["F"] * M + ["W"] * M
    assert set(pp.last_action_s) == {(op, m, 0) for op, m in ops}  # each ran, W's included
    rank = comm.Get_rank()
    # rank r runs r W's late: after its first B the next action is an F on every rank but 0
    first_b = ops.index(("B", 0))
    assert ops[first_b + 1] == (("W", 0) if rank == 0 else ("F", P - rank)) or first_b + 1 == len(ops)
    pp.close()
    comm.Free()


class TiedHead(nn.Module):
    """An output layer that reuses the first layer's weight, transposed (tied input and output embeddings)."""

    def __init__(self, first: nn.Linear) -> None:
        super().__init__()
        self.first = first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the first layer's inputs."""
        return x @ self.first.weight


def tied_model() -> nn.Sequential:
    """Linear(12, 16), 4 x (Tanh, Linear(16, 16)), Tanh, and a head tied to the first layer: 12 logits."""
    torch.manual_seed(0)
    first = nn.Linear(12, 16)
    layers: list[nn.Module] = [first]
    for _ in range(4):
        layers += [nn.Tanh(), nn.Linear(16, 16)]
    return nn.Sequential(*layers, nn.Tanh(), TiedHead(first))


TIED = [("1f1b", 1), ("zb-h1", 1), ("interleaved", 2)]


@pytest.mark.parametrize("schedule,chunks", TIED, ids=[s for s, _ in TIED])
def test_tied_weights_across_stages_equal_single_process(schedule: str, chunks: int) -> None:
    """A weight used by the first and the last stage: its copies get the summed gradient and stay equal through
    3 Adam steps, which end where one process ends; a clipped norm counts it once."""
    comm = sub_world()
    if comm is None:
        return
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3 * BATCH, 12, generator=g), torch.randint(0, 12, (3 * BATCH,), generator=g)
    ref = tied_model()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    pp = Pipeline(tied_model(), comm, microbatches=2 * P, schedule=schedule, chunks=chunks, partition_by="uniform")
    # the first stage's rank and the last stage's share the first layer (the head holds it whole: weight and
    # bias); on one rank there is nothing to share
    assert len(pp.tied) == (2 if P > 1 and comm.Get_rank() in (0, (pp.stages - 1) % P) else 0)
    opt = torch.optim.Adam(pp.parameters(), lr=0.01)
    for s in range(3):
        xb, yb = x[s * BATCH:(s + 1) * BATCH], y[s * BATCH:(s + 1) * BATCH]
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(xb), yb)
        loss.backward()
        ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        opt.zero_grad()
        assert pp.train_step(xb, yb, nn.functional.cross_entropy) == pytest.approx(loss.item(), rel=1e-5)
        norm = clip_grad_norm(pp.parameters(), 0.5, comm=comm, counted=pp.owned_parameters())
        assert norm == pytest.approx(float(ref_norm), rel=1e-5)
        opt.step()
    for p, q in layer_pairs(pp, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=4e-5)
    pp.close()
    comm.Free()


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_bf16_autocast_pipeline_close_to_single_process(schedule: str) -> None:
    """Under bfloat16 autocast the stages pass bf16 activations and gradients (the general buffer path):
    gradients stay float32 and match one process's autocast gradients to bf16 precision."""
    comm = sub_world()
    if comm is None:
        return
    ref = make_model()
    x, y = data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(ref(x), y)
    loss.backward()
    pp = Pipeline(make_model(), comm, microbatches=P, schedule=schedule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pp.train_step(x, y, nn.functional.cross_entropy)
    assert got == pytest.approx(loss.item(), rel=2e-2)
    for p, q in layer_pairs(pp, ref):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3)
    pp.close()
    comm.Free()


def test_recompute_holds_fewer_activation_bytes() -> None:
    """Activation checkpointing keeps only stage inputs: less held than storing every activation."""
    comm = sub_world()
    if comm is None:
        return
    held = {}
    for checkpoint in (False, True):
        pp = Pipeline(make_model(), comm, microbatches=4, schedule="gpipe", checkpoint=checkpoint)
        x, y = data()
        pp.train_step(x, y, nn.functional.cross_entropy)
        held[checkpoint] = pp.last_activation_bytes
        pp.close()
    assert 0 < held[True] < held[False]
    comm.Free()


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_hybrid_grid_equals_single_process(schedule: str) -> None:
    """dp x pp: each pipeline takes half the batch; gradients averaged over dp equal the whole batch's."""
    if SIZE % 2 or SIZE < 4:
        pytest.skip("needs an even world of at least 4 ranks")
    grid = ProcessGrid(WORLD, dp=2, pp=SIZE // 2)
    x, y = data()
    half = torch.tensor_split(torch.arange(BATCH), 2)[grid.rank("dp")]
    pp = Pipeline(make_model(), grid.comm("pp"), microbatches=2, schedule=schedule, dp_comm=grid.comm("dp"))
    # each replica's loss is its half's mean: scale so that the dp average is the whole batch's mean
    share = len(half) * 2 / BATCH
    pp.train_step(x[half], y[half], lambda out, tg: nn.functional.cross_entropy(out, tg) * share)
    _, reference = reference_grads()
    for mine, ref in my_grads(pp, reference):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=4e-5)
    pp.close()
    grid.free()


def test_tied_weights_in_a_hybrid_grid_equal_single_process() -> None:
    """dp x pp with two chunks per rank: the tied gradient, averaged over replicas and summed over its holders,
    is the whole batch's (with pp = 1 both uses are chunks of one rank: averaged once, after both)."""
    if SIZE % 2:
        pytest.skip("needs an even world")
    pp_size = SIZE // 2
    grid = ProcessGrid(WORLD, dp=2, pp=pp_size)
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(BATCH, 12, generator=g), torch.randint(0, 12, (BATCH,), generator=g)
    ref = tied_model()
    nn.functional.cross_entropy(ref(x), y).backward()
    half = torch.tensor_split(torch.arange(BATCH), 2)[grid.rank("dp")]
    pp = Pipeline(tied_model(), grid.comm("pp"), microbatches=2 * pp_size, schedule="interleaved", chunks=2,
                  partition_by="uniform", dp_comm=grid.comm("dp"))
    share = len(half) * 2 / BATCH
    pp.train_step(x[half], y[half], lambda out, tg: nn.functional.cross_entropy(out, tg) * share)
    for p, q in layer_pairs(pp, ref):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=4e-5)
    pp.close()
    grid.free()


def test_grid_refuses_a_shape_that_does_not_fit() -> None:
    """A grid whose product is not the world size is refused on every rank."""
    with pytest.raises(ValueError, match=f"needs {SIZE + 1} ranks, but the communicator has {SIZE}"):
        ProcessGrid(WORLD, dp=1, pp=SIZE + 1)


def test_grid_axes() -> None:
    """Axis communicators: sizes, ranks, and members that agree on the other coordinates."""
    if SIZE % 2:
        pytest.skip("needs an even world")
    grid = ProcessGrid(WORLD, dp=2, pp=SIZE // 2)
    assert grid.comm("pp").Get_size() == SIZE // 2 and grid.comm("dp").Get_size() == 2
    assert grid.comm("pp").Get_rank() == grid.rank("pp") == RANK % (SIZE // 2)
    members = grid.comm("pp").allgather(RANK)
    assert members == [grid.rank("dp") * (SIZE // 2) + i for i in range(SIZE // 2)]
    grid.free()
