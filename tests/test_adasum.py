"""Adasum: the pure combination rule, and the distributed halving/doubling against a one-process tree."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dmlmpi.comm import CollectiveMismatchError, adasum_allreduce
from dmlmpi.comm.adasum import is_power_of_two, pieces, reference

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
SIZES = [5, 0, 17, 3, 1, 300]  # tensors of a bucket, an empty one among them


def test_the_rule_sums_orthogonal_averages_equal_and_ignores_zero() -> None:
    """Orthogonal gradients add up, equal ones average, a zero gradient changes nothing; per tensor."""
    a, b = np.array([1.0, 0.0, 2.0, 2.0]), np.array([0.0, 3.0, 2.0, 2.0])
    sizes = [2, 2]  # first tensor: orthogonal halves; second: equal halves
    assert np.allclose(reference([a, b], sizes), [1.0, 3.0, 2.0, 2.0])
    assert np.allclose(reference([a, np.zeros(4)], sizes), a)
    # opposite gradients cancel to zero (a.b = -|a|^2: each coefficient 1.5, 1.5a - 1.5a)
    assert np.allclose(reference([a, -a], [4]), 0.0)
    # four vectors: ((v0 + v1) + (v2 + v3)) pairwise
    v = [np.random.default_rng(i).normal(size=6) for i in range(4)]
    left, right = reference(v[:2], [6]), reference(v[2:], [6])
    assert np.allclose(reference(v, [6]), reference([left, right], [6]))
    with pytest.raises(ValueError, match="power of two"):
        reference(v[:3], [6])


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_pieces_tile_the_vector(n: int) -> None:
    """The ranks' final pieces are disjoint and cover the vector, for lengths shorter and longer than n."""
    for length in (0, 1, 3, n, 2 * n + 1, 1000):
        bounds = pieces(n, length)
        covered = sorted(bounds)
        assert covered[0][0] == 0 and covered[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))
    assert [is_power_of_two(k) for k in (0, 1, 2, 3, 4, 6, 8)] == [False, True, True, False, True, False, True]


def vectors(dtype: np.dtype, length: int) -> list[np.ndarray]:
    """Every rank's vector (each rank can make all of them), not orthogonal, not equal."""
    common = np.random.default_rng(99).normal(size=length)
    return [(common + np.random.default_rng(r).normal(size=length)).astype(dtype) for r in range(SIZE)]


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["numpy64", "numpy32", "torch32", "torch-bf16", "inplace"])
def test_distributed_adasum_equals_the_tree(kind: str) -> None:
    """Every rank ends with the one-process tree's result, the same bits on every rank; x is left alone unless in place."""
    if not is_power_of_two(SIZE):
        with pytest.raises(ValueError, match="power-of-two number of ranks, got"):
            adasum_allreduce(np.ones(4), comm=WORLD)
        return
    length = sum(SIZES)
    dtype = np.float32 if kind in ("numpy32", "torch32", "torch-bf16") else np.float64
    vs = vectors(dtype, length)
    want = reference(vs, SIZES)
    mine = vs[RANK].copy()
    if kind.startswith("torch"):
        x = torch.from_numpy(mine).to(torch.bfloat16 if kind == "torch-bf16" else torch.float32)
        before = x.clone()
        got = adasum_allreduce(x, SIZES, comm=WORLD)
        assert torch.equal(x, before) and got.dtype == x.dtype and isinstance(got, torch.Tensor)
        got = got.double().numpy()
    else:
        got = adasum_allreduce(mine, SIZES, comm=WORLD, inplace=kind == "inplace")
        assert (got is mine) == (kind == "inplace")
    tol = {"numpy64": 1e-12, "inplace": 1e-12, "numpy32": 1e-6, "torch32": 1e-6, "torch-bf16": 1e-2}[kind]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    digests = WORLD.allgather(hashlib.sha256(np.ascontiguousarray(got).tobytes()).hexdigest())
    assert len(set(digests)) == 1


@pytest.mark.mpi
def test_short_vectors_and_bad_input() -> None:
    """Lengths 0, 1 and below the rank count work; integers, wrong sizes and mismatched lengths are refused on every rank."""
    if not is_power_of_two(SIZE):
        return
    for length in (0, 1, max(1, SIZE - 1)):
        vs = vectors(np.float64, length)
        np.testing.assert_allclose(adasum_allreduce(vs[RANK], comm=WORLD), reference(vs, [length]), rtol=1e-12)
    with pytest.raises(TypeError, match="floating-point"):
        adasum_allreduce(np.ones(4, dtype=np.int32), comm=WORLD)
    with pytest.raises(ValueError, match="add up to 5, not the 4"):
        adasum_allreduce(np.ones(4), [2, 3], comm=WORLD)
    if SIZE > 1:
        with pytest.raises(CollectiveMismatchError):
            adasum_allreduce(np.ones(4 + (RANK == SIZE - 1)), comm=WORLD)
