"""Clipping by the whole model's gradient norm: pipeline stages and data-parallel replicas against one process."""
from __future__ import annotations

import math

import pytest
import torch
from mpi4py import MPI
from torch import nn

from dmlmpi.parallel import DataParallel, Pipeline, clip_grad_norm

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
P = min(SIZE, 4)


def make_model() -> nn.Sequential:
    """Five Linear layers: every stage of up to 4 holds parameters."""
    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(10, 10), nn.Tanh())], nn.Linear(10, 3))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """One batch, the same on every rank."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 10, generator=g) * 3, torch.randint(0, 3, (16,), generator=g)


def reference(max_norm: float, norm_type: float) -> tuple[float, nn.Sequential]:
    """torch's clip_grad_norm_ in one process: the norm, and the model holding the clipped gradients."""
    model = make_model()
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    norm = nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    return float(norm), model


def sub_world() -> MPI.Comm | None:
    """The first P ranks."""
    sub = WORLD.Split(0 if RANK < P else MPI.UNDEFINED, RANK)
    return None if sub == MPI.COMM_NULL else sub


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf], ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("max_norm", [0.02, 1e6], ids=["clips", "leaves"])
def test_pipeline_clip_equals_one_process(max_norm: float, norm_type: float) -> None:
    """Each stage clips its own gradients by the norm over all stages: torch's result on the whole model."""
    comm = sub_world()
    if comm is None:
        return
    ref_norm, ref = reference(max_norm, norm_type)
    pp = Pipeline(make_model(), comm, microbatches=2, schedule="1f1b")
    x, y = data()
    pp.train_step(x, y, nn.functional.cross_entropy)
    norm = clip_grad_norm(pp.parameters(), max_norm, comm=comm, norm_type=norm_type)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    if max_norm < 1:
        assert ref_norm > 5 * max_norm  # the case really clips
    pairs = [(p, q) for indices, part in zip(pp.layer_indices, pp.parts) for index, layer in zip(indices, part)
             for p, q in zip(layer.parameters(), ref[index].parameters())]
    assert pairs, "every stage holds parameters"
    for p, q in pairs:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    pp.close()
    comm.Free()


def test_data_parallel_clip_is_local() -> None:
    """Replicas hold the same averaged gradients: each clips alone and all equal one process."""
    ref_norm, ref = reference(0.05, 2.0)
    model = DataParallel(make_model(), WORLD)
    x, y = data()
    mine = torch.tensor_split(torch.arange(len(y)), SIZE)[RANK]
    (nn.functional.cross_entropy(model(x[mine]), y[mine], reduction="sum") * SIZE / len(y)).backward()
    norm = clip_grad_norm(model.parameters(), 0.05)
    assert norm == pytest.approx(ref_norm, rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    model.close()


def test_a_non_finite_gradient_on_one_stage_stops_every_stage() -> None:
    """error_if_nonfinite: an inf on one rank's gradient raises on every rank (the norm is all-reduced)."""
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    if RANK == SIZE - 1:
        p.grad[1] = math.inf
    with pytest.raises(RuntimeError, match="norm is inf"):
        clip_grad_norm([p], 1.0, comm=WORLD, error_if_nonfinite=True)
    # and without the flag every rank gets the same inf norm
    p.grad = torch.ones(3)
    if RANK == SIZE - 1:
        p.grad[1] = math.inf
    assert clip_grad_norm([p], 1.0, comm=WORLD) == math.inf


def test_bad_settings_are_refused() -> None:
    """A max_norm or norm_type that is not positive."""
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    with pytest.raises(ValueError, match="max_norm must be positive"):
        clip_grad_norm([p], 0.0)
    with pytest.raises(ValueError, match="norm_type must be positive"):
        clip_grad_norm([p], 1.0, norm_type=-1)
