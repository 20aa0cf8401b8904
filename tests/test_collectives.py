"""dmlmpi.comm collectives against MPI's own Allreduce, at whatever world size mpiexec gives."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mpi4py import MPI

from dmlmpi import comm
from dmlmpi.comm import shm
from dmlmpi.comm.ring import chunk_bounds
from dmlmpi.comm import guard as guard_module
from dmlmpi.comm.context import context
from dmlmpi.comm.fusion import FusedBroadcast, allreduce_fused, broadcast_fused, byte_offsets

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
RANK, SIZE = WORLD.Get_rank(), WORLD.Get_size()
ALGOS = ["ring", "mpi", "hierarchical", "shm", "auto"]
OPS = ["sum", "avg", "min", "max", "prod"]
NP_DTYPES = ["float16", "float32", "float64", "int32", "int64"]
LENGTHS = [0, 1, max(1, SIZE - 1), 7, 1001]
MPI_OP = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}


def rank_data(length: int, dtype: str, rank: int, exact: bool) -> np.ndarray:
    """This rank's input: small integers (exact in every dtype) or random floats."""
    rng = np.random.default_rng(1000 + rank)
    if exact or not dtype.startswith("float"):
        # values in 1..3 keep products of up to 8 ranks exact even in float16
        return rng.integers(1, 4, size=length).astype(dtype)
    return rng.standard_normal(length).astype(dtype)


def reference(x: np.ndarray, op: str) -> np.ndarray:
    """MPI's own Allreduce of x (float16 reduced in float64 and rounded)."""
    wide = x.astype(np.float64) if x.dtype == np.float16 else x.copy()
    WORLD.Allreduce(MPI.IN_PLACE, wide, op=MPI_OP[op])
    if op == "avg":
        wide = wide / SIZE if x.dtype.kind == "f" else wide // SIZE
    return wide.astype(x.dtype)


def same_bits_everywhere(y: np.ndarray) -> bool:
    """True when every rank holds exactly the same bytes."""
    return len(set(WORLD.allgather(np.ascontiguousarray(y).tobytes()))) == 1


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", NP_DTYPES)
def test_allreduce_numpy_exact(algorithm: str, op: str, dtype: str) -> None:
    """Small-integer data: every algorithm equals MPI_Allreduce exactly, for every length."""
    for length in LENGTHS:
        x = rank_data(length, dtype, RANK, exact=True)
        before = x.copy()
        y = comm.allreduce(x, op=op, algorithm=algorithm)
        assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
        np.testing.assert_array_equal(y, reference(before, op), err_msg=f"length {length}")
        np.testing.assert_array_equal(x, before)  # out of place leaves the input alone
        assert same_bits_everywhere(y)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", ["sum", "avg", "prod"])
def test_allreduce_random_floats(algorithm: str, dtype: str, op: str) -> None:
    """Random floats: equal to MPI within float tolerance, and identical bits on all ranks."""
    x = rank_data(10_000, dtype, RANK, exact=False)
    y = comm.allreduce(x, op=op, algorithm=algorithm)
    rtol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(y, reference(x, op), rtol=rtol, atol=rtol)
    assert same_bits_everywhere(y)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64", "int32", "int64"])
@pytest.mark.parametrize("op", OPS)
def test_allreduce_torch(algorithm: str, dtype: str, op: str) -> None:
    """torch tensors (bfloat16 too): same kind, dtype, shape back; equal to MPI on the same values."""
    tdtype = getattr(torch, dtype)
    base = torch.from_numpy(rank_data(3 * 7, "float32", RANK, exact=True)).reshape(3, 7)
    x = base.to(tdtype)
    y = comm.allreduce(x, op=op, algorithm=algorithm)
    assert isinstance(y, torch.Tensor) and y.dtype == tdtype and y.shape == x.shape and y.device == x.device
    ref = torch.from_numpy(reference(base.numpy().astype(np.float64), op))
    if op == "avg" and not tdtype.is_floating_point:
        ref = torch.from_numpy(reference(base.numpy().astype(np.int64), op)).to(torch.float64)
    tol = {"bfloat16": 1e-2, "float16": 1e-3}.get(dtype, 1e-6)
    torch.testing.assert_close(y.to(torch.float64), ref.to(torch.float64), rtol=tol, atol=tol)
    assert same_bits_everywhere(y.view(torch.int16).numpy() if dtype == "bfloat16" else y.numpy())


@pytest.mark.parametrize("algorithm", ALGOS)
def test_allreduce_in_place_and_non_contiguous(algorithm: str) -> None:
    """inplace=True writes into the input, also through non-contiguous views (numpy and torch)."""
    a = np.arange(40, dtype=np.float64).reshape(5, 8) + RANK
    view = a[:, ::3]  # non-contiguous
    expect = reference(np.ascontiguousarray(view), "sum")
    out = comm.allreduce(view, algorithm=algorithm, inplace=True)
    assert out is view
    np.testing.assert_array_equal(a[:, ::3], expect)
    np.testing.assert_array_equal(a[:, 1], np.arange(40.0).reshape(5, 8)[:, 1] + RANK)  # untouched column
    t = torch.arange(40, dtype=torch.float32).reshape(5, 8).t() + RANK  # transposed
    expect_t = reference(t.contiguous().numpy(), "max")
    comm.allreduce(t, op="max", algorithm=algorithm, inplace=True)
    np.testing.assert_array_equal(t.contiguous().numpy(), expect_t)
    c = np.arange(10, dtype=np.int32) * (RANK + 1)  # contiguous: reduced in place without copies
    comm.allreduce(c, algorithm=algorithm, inplace=True)
    np.testing.assert_array_equal(c, np.arange(10) * SIZE * (SIZE + 1) // 2)


@pytest.mark.parametrize("length", [5, 1 << 19])
def test_in_place_and_general_paths_agree(length: int) -> None:
    """Ranks that make one call by different routes (in-place numpy, out-of-place torch) agree on it."""
    for _ in range(3):  # the in-place route keeps what it worked out about a kind of call: use it again
        x = rank_data(length, "float32", RANK, exact=True)
        expected = reference(x, "sum")
        if RANK % 2 == 0:
            got = comm.allreduce(x, inplace=True)
        else:
            got = comm.allreduce(torch.from_numpy(x.copy())).numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64, torch.int32, torch.int64,
                                   torch.bfloat16])
def test_torch_in_place_takes_the_host_path(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A contiguous CPU tensor reduced in place goes as a numpy view (bfloat16, which numpy lacks, as before)."""
    from dmlmpi.comm import collectives

    general: list[int] = []
    real = collectives.to_flat
    monkeypatch.setattr(collectives, "to_flat", lambda *a, **k: general.append(1) or real(*a, **k))
    for shape in [(0,), (7,), (3, 5), (), (40_000,)]:
        base = torch.arange(int(np.prod(shape))).reshape(shape) % 3
        x = (base + RANK).to(dtype)
        assert comm.allreduce(x, inplace=True) is x
        assert torch.equal(x, (base * SIZE + SIZE * (SIZE - 1) // 2).to(dtype)), shape
    leaf = torch.nn.Parameter(torch.ones(4, dtype=dtype)) if dtype.is_floating_point else torch.ones(4, dtype=dtype)
    comm.allreduce(leaf, op="max", inplace=True)  # a parameter that requires grad: written through a detached view
    assert torch.equal(leaf.detach(), torch.ones(4, dtype=dtype))
    assert bool(general) == (dtype == torch.bfloat16)


def test_torch_and_numpy_in_place_agree() -> None:
    """Even ranks reduce a tensor in place, odd ranks a numpy array: one kind of call, one answer."""
    for _ in range(3):
        x = rank_data(100, "float32", RANK, exact=True)
        expected = reference(x, "sum")
        if RANK % 2 == 0:
            got = comm.allreduce(torch.from_numpy(x), inplace=True).numpy()
        else:
            got = comm.allreduce(x, inplace=True)
        np.testing.assert_array_equal(got, expected)


def test_torch_view_of_a_window_reduced_where_it_lies(shm_calls: list[bool]) -> None:
    """A CPU tensor over a shared_empty window is found by its address and summed in the window."""
    n = 1 << 16  # 256 KiB: above auto's shared-memory crossover at every world size
    a = comm.shared_empty(n, "float32")
    t = torch.from_numpy(a)
    t.fill_(RANK + 1)
    assert comm.allreduce(t, inplace=True) is t
    assert torch.equal(t, torch.full((n,), SIZE * (SIZE + 1) / 2))
    comm.free_shared(a)
    assert shm_calls == ([True] if SIZE > 1 else [])


@pytest.mark.parametrize("segment_bytes", ["12", "4096"])
def test_ring_in_pieces(segment_bytes: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ring's reduce-scatter steps cut into pieces (sizes that do not divide the chunks): MPI's answer."""
    monkeypatch.setenv("DMLMPI_RING_SEGMENT_BYTES", segment_bytes)  # read when dmlmpi first meets a communicator
    fresh = WORLD.Dup()
    for dtype in ("float16", "float32", "float64", "int64"):
        for length in LENGTHS + [10_001]:
            x = rank_data(length, dtype, RANK, exact=True)
            for op in ("sum", "max", "avg"):
                y = comm.allreduce(x, op=op, algorithm="ring", comm=fresh)
                np.testing.assert_array_equal(y, reference(x, op), err_msg=f"{dtype} {length} {op}")
                assert same_bits_everywhere(y)
            part = comm.reduce_scatter(x, algorithm="ring", comm=fresh)
            start, stop = chunk_bounds(length, SIZE)[RANK]
            np.testing.assert_array_equal(part, reference(x, "sum")[start:stop])
    t = (torch.arange(3001) % 5 + RANK).to(torch.bfloat16)
    expect = ((torch.arange(3001) % 5) * SIZE + SIZE * (SIZE - 1) // 2).to(torch.bfloat16)
    assert torch.equal(comm.allreduce(t, algorithm="ring", comm=fresh), expect)
    fresh.Free()


def test_hierarchical_over_simulated_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes of 2 ranks (the last one short on odd worlds): same answer as MPI, identical bits."""
    monkeypatch.setenv("DMLMPI_RANKS_PER_NODE", "2")
    for length in LENGTHS:
        x = rank_data(length, "int64", RANK, exact=True)
        y = comm.allreduce(x, algorithm="hierarchical", comm=WORLD)
        np.testing.assert_array_equal(y, reference(x, "sum"))
    z = rank_data(5000, "float32", RANK, exact=False)
    yz = comm.allreduce(z, algorithm="hierarchical")
    np.testing.assert_allclose(yz, reference(z, "sum"), rtol=1e-5, atol=1e-5)
    assert same_bits_everywhere(yz)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_auto_sends_large_16bit_reductions_through_the_ring(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """16-bit floats above their (lower) crossover go through the ring, 16 bits on the wire; float32 stays native."""
    from dmlmpi.comm import ring
    from dmlmpi.comm.context import context
    from dmlmpi.comm.select import RING_MIN_BYTES_16BIT, ring_threshold

    rings = []
    real = ring.allreduce_inplace
    monkeypatch.setattr(ring, "allreduce_inplace", lambda *a, **k: (rings.append(1), real(*a, **k))[1])
    # at the 16-bit crossover, or past the largest message that goes through the exchange area
    ex = context(MPI.COMM_WORLD).exchange
    elements = max(ring_threshold(SIZE, RING_MIN_BYTES_16BIT) // 2, (ex.capacity // 2 + 1) if ex else 0, 1)
    data = rank_data(elements, "float32", RANK, exact=True)
    x = torch.from_numpy(data).to(dtype)  # (float32 shares data: the all-reduce below is out of place)
    y = comm.allreduce(x, op="sum")
    expected = reference(data, "sum")
    np.testing.assert_array_equal(y.float().numpy(), expected)  # small integers: exact in 16 bits too
    assert same_bits_everywhere(y.view(torch.int16).numpy() if dtype != torch.float32 else y.numpy())
    widened = dtype != torch.float32
    assert bool(rings) == (widened and SIZE > 1), (dtype, len(rings))
    assert comm.choose_algorithm(elements * 2, SIZE, widened=widened) == ("ring" if widened and SIZE > 1 else "mpi")


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
@pytest.mark.parametrize("rows", [0, 1, 5, 2 * SIZE + 1])
def test_reduce_scatter(algorithm: str, rows: int) -> None:
    """Rank r gets its rows (earlier ranks one more on uneven splits) of the full reduction."""
    x = rank_data(rows * 3, "int64", RANK, exact=True).reshape(rows, 3)
    full = reference(x, "sum")
    mine = comm.reduce_scatter(x, algorithm=algorithm)
    base, extra = divmod(rows, SIZE)
    start = RANK * base + min(RANK, extra)
    stop = start + base + (1 if RANK < extra else 0)
    np.testing.assert_array_equal(mine, full[start:stop])
    t = comm.reduce_scatter(torch.from_numpy(x.astype(np.float32)), op="avg", algorithm=algorithm)
    assert isinstance(t, torch.Tensor)
    np.testing.assert_allclose(t.numpy(), full[start:stop] / SIZE, rtol=1e-6)


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
def test_allgather(algorithm: str) -> None:
    """Blocks of every rank, concatenated along dimension 0 in rank order."""
    x = np.full((2, 3), RANK, dtype=np.int32)
    y = comm.allgather(x, algorithm=algorithm)
    np.testing.assert_array_equal(y, np.repeat(np.arange(SIZE), 2)[:, None] * np.ones((1, 3), np.int32))
    t = comm.allgather(torch.tensor([float(RANK)], dtype=torch.bfloat16), algorithm=algorithm)
    assert t.dtype == torch.bfloat16 and t.tolist() == [float(r) for r in range(SIZE)]
    assert comm.allgather(np.zeros(0), algorithm=algorithm).shape == (0,)


@pytest.mark.parametrize("algorithm", ["ring", "mpi", "auto"])
def test_allgather_inplace(algorithm: str) -> None:
    """Block r of every rank's buffer goes to all ranks, written in place; other blocks' old values are overwritten."""
    x = np.full(3 * SIZE, -1.0)
    x[3 * RANK:3 * RANK + 3] = RANK + np.arange(3) / 10
    assert comm.allgather_inplace(x, algorithm=algorithm) is x
    np.testing.assert_array_equal(x, (np.repeat(np.arange(SIZE), 3) + np.tile(np.arange(3) / 10, SIZE)))
    t = torch.full((SIZE, 2), -1.0, dtype=torch.bfloat16)
    t[RANK] = float(RANK)
    assert comm.allgather_inplace(t, algorithm=algorithm) is t
    assert t[:, 0].tolist() == [float(r) for r in range(SIZE)] and t[:, 1].tolist() == t[:, 0].tolist()
    if SIZE > 1:
        with pytest.raises(ValueError, match="do not make"):
            comm.allgather_inplace(np.zeros(SIZE + 1), algorithm=algorithm)


def test_broadcast() -> None:
    """Root's values everywhere, out of place and in place, from every root."""
    for root in range(SIZE):
        x = np.arange(6, dtype=np.float64).reshape(2, 3) * (RANK + 1)
        y = comm.broadcast(x, root=root)
        np.testing.assert_array_equal(y, np.arange(6.0).reshape(2, 3) * (root + 1))
        t = torch.full((4,), float(RANK), dtype=torch.float16)
        assert comm.broadcast(t, root=root, inplace=True) is t
        assert t.tolist() == [float(root)] * 4
    with pytest.raises(ValueError, match="root"):
        comm.broadcast(np.zeros(1), root=SIZE)


@pytest.mark.parametrize("bucket_bytes", [1, 256, 25 << 20])
def test_fused_allreduce(bucket_bytes: int) -> None:
    """Many tensors of mixed shapes and dtypes: fused results equal one all-reduce each."""
    rng = np.random.default_rng(7 + RANK)
    tensors = [torch.from_numpy(rng.integers(0, 5, size=s).astype(np.float32)) for s in [(3, 4), (7,), (1,), (2, 2, 2)]]
    tensors += [torch.arange(5, dtype=torch.int64) * RANK, torch.ones(3, dtype=torch.bfloat16) * RANK]
    tensors += [torch.from_numpy(rng.standard_normal(1000).astype(np.float32))]
    expect = [comm.allreduce(t, op="avg") for t in tensors]
    got = allreduce_fused(tensors, op="avg", bucket_bytes=bucket_bytes)
    for g, e, t in zip(got, expect, tensors):
        assert g.dtype == t.dtype and g.shape == t.shape
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)
    copies = [t.clone() for t in tensors]
    allreduce_fused(tensors, op="avg", bucket_bytes=bucket_bytes, inplace=True)
    for g, t in zip(got, tensors):
        torch.testing.assert_close(t, g, rtol=1e-6, atol=1e-6)
    # a second in-place call reuses the kept bucket buffers: still right, nothing stale
    for c in copies:
        c.mul_(2)
    expect2 = allreduce_fused(copies, op="avg", bucket_bytes=bucket_bytes)
    allreduce_fused(copies, op="avg", bucket_bytes=bucket_bytes, inplace=True)
    for e, c in zip(expect2, copies):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def state_tensors(rank: int) -> list:
    """Tensors of many dtypes and layouts whose values depend on `rank` (torch and numpy, strided, empty, 0-d)."""
    g = torch.Generator().manual_seed(50 + rank)
    grid = torch.randn(6, 5, generator=g)
    return [torch.randn(3, 4, generator=g), torch.randint(0, 2, (7,), generator=g).bool(),
            torch.randint(0, 255, (5,), generator=g).to(torch.uint8), torch.full((), rank, dtype=torch.int64),
            torch.randn(4, generator=g).to(torch.bfloat16), torch.randn(3, generator=g, dtype=torch.complex64),
            grid.t()[1:4],  # a strided view: unpacked into its own elements only
            torch.zeros(0, 3), torch.randint(-9, 9, (2, 2), generator=g).to(torch.int8),
            np.arange(6, dtype=np.int16).reshape(2, 3) * (rank + 1), np.full(3, rank % 2 == 0)]


@pytest.mark.parametrize("bucket_bytes", [1, 64, 25 << 20])
@pytest.mark.parametrize("root", [0, SIZE - 1])
def test_fused_broadcast(bucket_bytes: int, root: int) -> None:
    """Every rank ends with root's tensors, bit for bit, whatever the dtype, layout or bucket size."""
    mine, expect = state_tensors(RANK), state_tensors(root)
    before = [t.clone() if isinstance(t, torch.Tensor) else t.copy() for t in mine]
    broadcast_fused(mine, root=root, bucket_bytes=bucket_bytes)
    for got, want, old in zip(mine, expect, before):
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
        if isinstance(got, torch.Tensor):
            assert torch.equal(got, want), (got, want, old)
        else:
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="root"):
        broadcast_fused(mine, root=SIZE)


def test_fused_broadcast_writes_strided_views_through() -> None:
    """A strided view gets root's values in the memory it views; the elements around it keep this rank's."""
    base = torch.full((4, 4), float(RANK))
    view = base[:, 1]  # a column: stride 4
    view_source = torch.arange(4.0) if RANK == 0 else torch.full((4,), -1.0)
    view.copy_(view_source)
    broadcast_fused([view], root=0)
    assert torch.equal(base[:, 1], torch.arange(4.0))
    assert torch.all(base[:, [0, 2, 3]] == float(RANK))


def test_fused_broadcast_one_collective_per_bucket() -> None:
    """Eleven tensors of one kind and device in one bucket are one guarded collective, not eleven."""
    ctx = context(WORLD)
    tensors = [t for t in state_tensors(RANK) if isinstance(t, torch.Tensor)]
    before = ctx.calls
    broadcast_fused(tensors, root=0)
    assert ctx.calls - before == 1
    before = ctx.calls
    broadcast_fused(tensors, root=0, bucket_bytes=1)  # every tensor alone in its bucket
    assert ctx.calls - before == len(tensors)


def test_fused_broadcast_many_layouts() -> None:
    """More sets of tensors than the kept datatypes (64): old ones are freed, every broadcast still right."""
    for i in range(70):
        t = torch.full((i + 1,), float(RANK + i))
        broadcast_fused([t, torch.zeros(0)], root=0)
        assert torch.equal(t, torch.full((i + 1,), float(i)))
    assert sum(1 for k in context(WORLD).buffers if k[0] == "spans type") <= 64


def test_kept_broadcast_follows_replaced_memory() -> None:
    """A FusedBroadcast repeated after a tensor's memory was replaced (set_) plans again: no stale addresses."""
    a, b = torch.full((4,), float(RANK)), np.full(3, RANK, np.int64)
    again = FusedBroadcast([a, b], root=SIZE - 1)
    again()
    assert a.tolist() == [SIZE - 1.0] * 4 and b.tolist() == [SIZE - 1] * 3
    a.set_(torch.full((6,), float(RANK + 10)))  # new storage, new length
    b[:] = RANK
    again()
    assert a.tolist() == [SIZE + 9.0] * 6 and b.tolist() == [SIZE - 1] * 3


def test_byte_offsets() -> None:
    """Members start on 64-byte boundaries, in order, without overlap; empty members take no room."""
    assert byte_offsets([]) == ([], 0)
    assert byte_offsets([3, 0, 64, 1]) == ([0, 64, 64, 128], 129)
    assert byte_offsets([8, 8], align=8) == ([0, 8], 16)


def test_fused_numpy() -> None:
    """Fusion of numpy arrays returns numpy arrays of the original shapes."""
    arrays = [np.full((2, 3), RANK, np.float64), np.full(4, RANK, np.float64)]
    out = allreduce_fused(arrays, op="sum")
    assert [o.shape for o in out] == [(2, 3), (4,)]
    assert all(np.all(o == SIZE * (SIZE - 1) / 2) for o in out)


@pytest.mark.skipif(SIZE < 2, reason="a mismatch needs two ranks")
class TestGuard:
    """Ranks that disagree get the same clear error on every rank, never a hang or garbage."""

    def _expect_mismatch(self, fn, *words: str) -> str:
        with pytest.raises(comm.CollectiveMismatchError) as info:
            fn()
        text = str(info.value)
        for w in words:
            assert w in text, text
        return text

    def test_length(self) -> None:
        text = self._expect_mismatch(lambda: comm.allreduce(np.ones(10 + (RANK == SIZE - 1))), "length")
        assert f"rank {SIZE - 1} 11" in text

    def test_dtype(self) -> None:
        dtype = np.float64 if RANK == 0 else np.float32
        text = self._expect_mismatch(lambda: comm.allreduce(np.ones(4, dtype)), "dtype")
        assert "rank 0 float64" in text and "float32" in text

    def test_op(self) -> None:
        self._expect_mismatch(lambda: comm.allreduce(np.ones(4), op="max" if RANK == 1 else "sum"),
                              "op", "rank 1 max")

    def test_collective_order(self) -> None:
        fn = (lambda: comm.broadcast(np.ones(4))) if RANK == 0 else (lambda: comm.allreduce(np.ones(4)))
        self._expect_mismatch(fn, "collective", "rank 0 broadcast")

    def test_fused_lists(self) -> None:
        tensors = [np.ones(3)] * (2 if RANK == 0 else 3)
        self._expect_mismatch(lambda: allreduce_fused(tensors), "length")

    def test_fused_broadcast_layouts(self) -> None:
        # bytes are bytes: other counts, shapes or dtypes are named before any byte moves
        last = SIZE - 1
        tensors = [torch.ones(3, dtype=torch.bool)] * (2 if RANK != last else 3)
        self._expect_mismatch(lambda: broadcast_fused(tensors), "tensor 2: rank 0 none; rank "
                              f"{last} (3,) bool", "(2 and 3 tensors)")
        same_bytes = [torch.zeros((2, 6) if RANK == last else (3, 4))]
        self._expect_mismatch(lambda: broadcast_fused(same_bytes), f"tensor 0: rank 0 (3, 4) float32; rank {last} "
                              "(2, 6) float32")
        same_bytes = [np.zeros(4, np.int32 if RANK == last else np.float32)]
        self._expect_mismatch(lambda: broadcast_fused(same_bytes), f"rank {last} (4,) int32")

    def test_fused_broadcast_sizes_after_a_local_replan(self) -> None:
        # a kept broadcast re-plans alone when its memory moves: each bucket's guard still checks the bytes
        t = torch.ones(3, dtype=torch.bool)
        again = FusedBroadcast([t])
        if RANK == SIZE - 1:
            t.set_(torch.ones(6, dtype=torch.bool))
        text = self._expect_mismatch(again, "length", "broadcast_fused")
        assert f"rank {SIZE - 1} 6" in text and " 3; " in text  # bytes: 3 on the others, 6 on the last rank

    def test_fused_broadcast_routes(self) -> None:
        # a strided tensor is packed, a contiguous one broadcast where it lies: ranks must agree
        t = torch.zeros(4, 2)[:, 0] if RANK == 0 else torch.zeros(4)
        self._expect_mismatch(lambda: broadcast_fused([t]), "algorithm", "rank 0 none")

    @pytest.mark.parametrize("extreme", [-2**63, 2**63 - 1])
    def test_extreme_hashes_over_messages(self, monkeypatch: pytest.MonkeyPatch, extreme: int) -> None:
        # the message path carries (hash, ~hash): it must hold every 64-bit hash, -2**63 included
        monkeypatch.setenv("DMLMPI_EXCHANGE_BYTES", "0")  # read when dmlmpi first meets a communicator
        fresh = WORLD.Dup()
        monkeypatch.setattr(guard_module, "signature_hash", lambda sig: extreme)
        np.testing.assert_array_equal(comm.allreduce(np.ones(3), comm=fresh), np.full(3, SIZE))
        other = 2**63 - 1 if extreme == -2**63 else -2**63
        monkeypatch.setattr(guard_module, "signature_hash", lambda sig: extreme if RANK == 0 else other)
        with pytest.raises(comm.CollectiveMismatchError):
            comm.allreduce(np.ones(3), comm=fresh)
        fresh.Free()

    @pytest.mark.parametrize("field", ["length", "dtype", "op"])
    def test_in_place_numpy(self, field: str) -> None:
        # a contiguous numpy array reduced in place takes its own shorter path: the same checks
        x = np.ones(4 + (field == "length" and RANK == 1), np.float32 if field == "dtype" and RANK == 1 else np.float64)
        op = "max" if field == "op" and RANK == 1 else "sum"
        self._expect_mismatch(lambda: comm.allreduce(x, op=op, inplace=True), field, "rank 1")

    def test_call_number(self) -> None:
        # an empty all-reduce moves nothing but counts; unguarded, only rank 0 makes one
        if RANK == 0:
            comm.allreduce(np.ones(0), inplace=True, guard=False)
        text = self._expect_mismatch(lambda: comm.allreduce(np.ones(4), inplace=True), "call number")
        assert "rank 0" in text
        if RANK != 0:  # the counts agree again for the tests that follow
            comm.allreduce(np.ones(0), inplace=True, guard=False)

    def test_shared_and_private_buffers(self) -> None:
        # a shared window is reduced where it lies, a private buffer is staged: all must agree
        a = comm.shared_empty(4, "float64")
        a[:] = 1.0
        x = a if RANK == 0 else np.ones(4)
        self._expect_mismatch(lambda: comm.allreduce(x, algorithm="shm", inplace=True), "buffer",
                              "rank 0 in a shared window", "private")
        comm.free_shared(a)

    def test_still_usable_after_mismatch(self) -> None:
        with pytest.raises(comm.CollectiveMismatchError):
            comm.allreduce(np.ones(2 + RANK))
        np.testing.assert_array_equal(comm.allreduce(np.ones(3)), np.full(3, SIZE))

    def test_guard_off(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # DMLMPI_GUARD is read when dmlmpi first meets a communicator: use a new one
        monkeypatch.setenv("DMLMPI_GUARD", "0")
        fresh = WORLD.Dup()
        np.testing.assert_array_equal(comm.allreduce(np.ones(3), comm=fresh), np.full(3, SIZE))
        assert comm.allreduce(np.ones(3), comm=fresh, guard=True).sum() == 3 * SIZE
        with pytest.raises(comm.CollectiveMismatchError):  # the call's own setting wins
            comm.allreduce(np.ones(3 + RANK), comm=fresh, guard=True)
        fresh.Free()


def _before_each_call(monkeypatch: pytest.MonkeyPatch, module: object, name: str, before) -> None:  # type: ignore[no-untyped-def]
    """Replace module.name for this test by a function that runs before(arguments by name), then the real one."""
    import inspect

    real = getattr(module, name)
    signature = inspect.signature(real)

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        before(signature.bind(*args, **kwargs).arguments)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def _stall_at_random(monkeypatch: pytest.MonkeyPatch, module: object, name: str, seed: int, share: float) -> None:
    """Make this rank sleep 0.2 ms before a random `share` of its calls of module.name."""
    import time

    stalls = iter(np.random.default_rng(seed + RANK).random(100000) < share)
    _before_each_call(monkeypatch, module, name, lambda _: time.sleep(2e-4) if next(stalls) else None)


@pytest.fixture
def shm_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records in_window of every shm all-reduce run during the test."""
    calls: list[bool] = []
    _before_each_call(monkeypatch, shm, "allreduce_inplace", lambda a: calls.append(a["in_window"]))
    return calls


def test_shared_buffers_found_by_every_route_private_ones_without_an_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from dmlmpi.comm import collectives
    from dmlmpi.comm.context import context

    ctx = context(WORLD)
    a = comm.shared_empty(64, "float32")
    try:
        for route in (a, a.reshape(8, 8), torch.from_numpy(a), torch.from_numpy(a).numpy()):
            assert collectives.shared_segment(ctx, route) is not None
        assert collectives.shared_segment(ctx, a[1:]) is None  # not at the window's start
        asked: list[int] = []
        real = collectives._address
        monkeypatch.setattr(collectives, "_address", lambda x: asked.append(1) or real(x))
        own = np.zeros(64, np.float32)
        for private in (own, own[3:], own.reshape(8, 8)[::2]):
            assert collectives.shared_segment(ctx, private) is None
        assert not asked  # numpy's own memory is never a window: no address looked up
        assert collectives.shared_segment(ctx, a) is not None and not asked  # found before: remembered
        x = np.ones(64, np.float32)
        np.testing.assert_array_equal(comm.allreduce(x, inplace=True), np.full(64, SIZE, np.float32))
        a[:] = RANK + 1
        np.testing.assert_array_equal(comm.allreduce(a, inplace=True), np.full(64, SIZE * (SIZE + 1) / 2))
        assert not asked
    finally:
        comm.free_shared(a)
    assert not ctx.window_arrays  # a freed window's arrays are forgotten


@pytest.mark.parametrize("dtype", NP_DTYPES)
@pytest.mark.parametrize("op", OPS)
def test_shared_window_in_place(dtype: str, op: str, shm_calls: list[bool]) -> None:
    """A shared_empty array is reduced where it lies: MPI's answer exactly, identical bits, no staging."""
    for shape in [(0,), (1,), (max(1, SIZE - 1),), (7,), (1001,), (3, 5)]:
        a = comm.shared_empty(shape, dtype)
        assert a.shape == shape and a.dtype == np.dtype(dtype)
        x = rank_data(int(np.prod(shape)), dtype, RANK, exact=True).reshape(shape)
        a[...] = x
        assert comm.allreduce(a, op=op, algorithm="shm", inplace=True) is a
        np.testing.assert_array_equal(a, reference(x, op), err_msg=f"shape {shape}")
        assert same_bits_everywhere(a)
        comm.free_shared(a)
    # every non-empty call on more than one rank ran in the window itself
    assert shm_calls == ([True] * 5 if SIZE > 1 else [])


def test_shared_window_back_to_back_with_uneven_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls on one shared buffer with no other synchronization, ranks stalled at random while they reduce and write."""
    _stall_at_random(monkeypatch, shm, "reduce_into", seed=200, share=0.2)
    n = 300_000  # a few blocks per rank's chunk
    a = comm.shared_empty(n, "float64")
    wrong = []
    for i in range(30):
        a[:] = np.arange(n, dtype=np.float64) * (RANK + 1) + i  # the next call's input, written at once
        comm.allreduce(a, op="sum", algorithm="shm", inplace=True)
        want = np.arange(n, dtype=np.float64) * (SIZE * (SIZE + 1) // 2) + i * SIZE
        if not np.array_equal(a, want):
            wrong.append(i)
    comm.free_shared(a)
    assert not wrong, f"rank {RANK}: calls {wrong} came back wrong"


def test_shared_window_auto_and_torch(monkeypatch: pytest.MonkeyPatch, shm_calls: list[bool]) -> None:
    """auto reduces shared buffers from DMLMPI_SHM_MIN_BYTES up in the window; torch views of one too."""
    monkeypatch.setenv("DMLMPI_SHM_MIN_BYTES", "4000")  # read when dmlmpi first meets a communicator
    fresh = WORLD.Dup()
    small, big = comm.shared_empty(999, "float32", fresh), comm.shared_empty(1000, "float32", fresh)
    for a in (small, big):
        a[:] = rank_data(len(a), "float32", RANK, exact=False)
        want = reference(a, "avg")
        comm.allreduce(a, op="avg", comm=fresh, inplace=True)
        np.testing.assert_allclose(a, want, rtol=1e-6, atol=1e-6)
    assert shm_calls == ([True] if SIZE > 1 else [])  # 3996 bytes went native, 4000 through the window
    t = torch.from_numpy(comm.shared_empty(5000, "bfloat16", fresh)).view(torch.bfloat16)
    t.copy_(torch.arange(5000) % 7 + RANK)
    y = comm.allreduce(t, comm=fresh)  # out of place: a private copy, the window untouched
    comm.allreduce(t, comm=fresh, inplace=True)
    expect = ((torch.arange(5000) % 7) * SIZE + SIZE * (SIZE - 1) // 2).to(torch.bfloat16)
    assert torch.equal(y, expect) and torch.equal(t, expect)
    assert shm_calls == ([True, True] if SIZE > 1 else [])
    for a in (small, big, t):
        comm.free_shared(a, fresh)
    fresh.Free()


def test_fused_buckets_in_shared_memory(monkeypatch: pytest.MonkeyPatch, shm_calls: list[bool]) -> None:
    """In-place fusion keeps host buckets from DMLMPI_SHM_MIN_BYTES up in shared windows, summed in place."""
    monkeypatch.setenv("DMLMPI_SHM_MIN_BYTES", "4000")
    fresh = WORLD.Dup()
    rng = np.random.default_rng(3 + RANK)
    arrays = [rng.integers(0, 5, size=s).astype(np.float32) for s in [(30, 40), (7,), (100,)]]
    tensors = [torch.arange(2000, dtype=torch.float32) % 9 + RANK, torch.ones(3, 5) * RANK,
               (torch.arange(3000) % 4 + RANK).to(torch.bfloat16)]
    for group in (arrays, tensors):
        for _ in range(2):  # the second call reuses the kept shared bucket
            expect = [comm.allreduce(t, op="avg", comm=fresh) for t in group]
            allreduce_fused(group, op="avg", comm=fresh, inplace=True)
            for t, e in zip(group, expect):
                assert t.dtype == e.dtype and t.shape == e.shape
                np.testing.assert_allclose(np.asarray(t.float() if hasattr(t, "float") else t),
                                           np.asarray(e.float() if hasattr(e, "float") else e), rtol=1e-6)
    # numpy float32 (1307 elements), torch float32 (2015) and bfloat16 (3000): each bucket over
    # 4000 bytes, twice each, all in their windows
    assert shm_calls == ([True] * 6 if SIZE > 1 else [])
    fresh.Free()


@pytest.fixture
def exchange_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the byte count of every all-reduce that went through a communicator's exchange area."""
    from dmlmpi.comm import exchange

    calls: list[int] = []
    _before_each_call(monkeypatch, exchange, "allreduce", lambda a: calls.append(a["data"].nbytes))
    return calls


def _exchange_limits() -> tuple[int, int]:
    """(whole_bytes, capacity) of COMM_WORLD's exchange area (zeros on one rank, which has none)."""
    from dmlmpi.comm.context import context

    ex = context(WORLD).exchange
    return (ex.whole_bytes, ex.capacity) if ex is not None else (0, 0)


@pytest.mark.parametrize("dtype", NP_DTYPES + ["bfloat16"])
@pytest.mark.parametrize("op", OPS)
def test_exchange_whole_and_by_columns(dtype: str, op: str, exchange_calls: list[int]) -> None:
    """Small host all-reduces meet in the shared exchange area, whole or by columns: MPI's answer, identical bits."""
    whole, capacity = _exchange_limits()
    assert SIZE == 1 or 0 < whole < capacity
    item = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
    lengths = [1, max(1, SIZE - 1), 7, 1001, whole // item, whole // item + 1, whole // item + SIZE + 1, capacity // item]
    for length in [n for n in lengths if n > 0]:
        x = rank_data(length, "float32" if dtype == "bfloat16" else dtype, RANK, exact=True)
        want = reference(x, op)
        if dtype == "bfloat16":
            t = torch.from_numpy(x).to(torch.bfloat16)
            y = comm.allreduce(t, op=op)  # out of place, torch
            assert y.dtype == torch.bfloat16  # (avg: the reference rounded to bfloat16 as the division is)
            if op == "prod":  # 3**8 passes 256: rounded at every step here, once by the reference
                torch.testing.assert_close(y.float(), torch.from_numpy(want), rtol=1.6e-2, atol=0)
            else:
                assert torch.equal(y, torch.from_numpy(want).to(torch.bfloat16)), f"length {length}"
            assert same_bits_everywhere(y.view(torch.int16).numpy())
            continue
        # float16 products pass 2048 at 8 ranks (3**8): rounded at every step here, once by the reference
        check = (lambda a, b, err_msg: np.testing.assert_allclose(a, b, rtol=2e-3, err_msg=err_msg)) \
            if (dtype, op) == ("float16", "prod") else np.testing.assert_array_equal
        y = comm.allreduce(x, op=op)  # out of place: x is untouched
        check(y, want, err_msg=f"length {length}")
        assert comm.allreduce(x, op=op, inplace=True) is x  # in place, the numpy fast path
        check(x, want, err_msg=f"length {length} in place")
        assert same_bits_everywhere(x) and same_bits_everywhere(y)
    calls_per_length = 1 if dtype == "bfloat16" else 2
    assert len(exchange_calls) == (calls_per_length * len([n for n in lengths if n > 0]) if SIZE > 1 else 0)


def test_exchange_choice_written_out_matches_auto() -> None:
    """The fast path's own test for the exchange agrees with auto_algorithm at every size around the limits."""
    from dmlmpi.comm.collectives import _through_exchange, auto_algorithm
    from dmlmpi.comm.context import context

    ctx = context(WORLD)
    whole, capacity = _exchange_limits()
    for nbytes in sorted({0, 1, 4096, whole, capacity - 1, capacity, capacity + 1, ctx.shm_min_bytes - 1,
                          ctx.shm_min_bytes, ctx.shm_min_bytes + 1, 64 << 20}):
        for shared in (False, True):
            want = auto_algorithm(ctx, nbytes, shared=shared, host=True) == "exchange"
            assert _through_exchange(ctx, "auto", nbytes, shared) == want, (nbytes, shared)
            assert _through_exchange(ctx, "shm", nbytes, shared) == (SIZE > 1 and not shared and 0 < nbytes <= capacity)
            assert not _through_exchange(ctx, "mpi", nbytes, shared)


def test_exchange_random_floats_by_columns() -> None:
    """Random floats by columns: within float tolerance of MPI's sum, identical bits on every rank."""
    whole, capacity = _exchange_limits()
    for length in (1001, whole // 4 + 5, capacity // 4):
        x = rank_data(max(length, 1), "float32", RANK, exact=False)
        y = comm.allreduce(x, op="avg")
        np.testing.assert_allclose(y, reference(x, "avg"), rtol=1e-5, atol=1e-6)
        assert same_bits_everywhere(y)


def test_exchange_back_to_back_with_uneven_ranks(exchange_calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Many calls with no other synchronization, ranks stalled at random as they read: the two sets of rows never mix."""
    from dmlmpi.comm import exchange

    # each rank stalls before some of its reductions, so the others run ahead into the next call
    _stall_at_random(monkeypatch, exchange, "_reduce_rows", seed=100, share=0.3)
    whole, capacity = _exchange_limits()
    sizes = np.random.default_rng(7).integers(1, max(capacity // 8, 2), size=80)  # same on every rank
    sizes[::3] = max(whole // 8 - 1, 1)
    wrong = []
    for i, n in enumerate(sizes):
        x = np.arange(n, dtype=np.float64) * (RANK + 1) + i  # exact in float64
        op = ("sum", "max", "min")[i % 3]
        comm.allreduce(x, op=op, inplace=True)
        base = np.arange(n, dtype=np.float64)
        every = [base * (r + 1) + i for r in range(SIZE)]
        want = sum(every) if op == "sum" else np.maximum.reduce(every) if op == "max" else np.minimum.reduce(every)
        if not np.array_equal(x, want):
            wrong.append(i)
        if i % 7 == 3:  # a guarded collective without data in between (its check moves on to the other set)
            assert comm.broadcast(np.full(3, float(RANK)), root=SIZE - 1).tolist() == [SIZE - 1.0] * 3
    assert not wrong, f"rank {RANK}: calls {wrong} came back wrong"
    assert len(exchange_calls) == (80 if SIZE > 1 else 0)


def test_exchange_mismatch_across_its_capacity(exchange_calls: list[int]) -> None:
    """One rank's message fits the area and another's does not: both meet in the same check and all raise."""
    _, capacity = _exchange_limits()
    if SIZE == 1:
        pytest.skip("one rank: nothing to disagree with")
    n = capacity // 8 + (RANK == SIZE - 1)
    with pytest.raises(comm.CollectiveMismatchError, match="length"):
        comm.allreduce(np.ones(n), inplace=True)
    # afterwards every rank still posts to the same set of rows
    for k in (3, 5000, 7):
        np.testing.assert_array_equal(comm.allreduce(np.full(k, RANK + 1.0)), np.full(k, SIZE * (SIZE + 1) / 2))


def test_exchange_without_guard_and_switched_off(monkeypatch: pytest.MonkeyPatch, exchange_calls: list[int]) -> None:
    """Guard off: a barrier alone synchronizes the area. DMLMPI_EXCHANGE_BYTES=0: no area, native MPI instead."""
    from dmlmpi.comm.context import context

    monkeypatch.setenv("DMLMPI_GUARD", "0")  # read when dmlmpi first meets a communicator: new ones
    unguarded = WORLD.Dup()
    for k in (5, 3000):
        np.testing.assert_array_equal(comm.allreduce(np.full(k, RANK + 1), comm=unguarded), np.full(k, SIZE * (SIZE + 1) // 2))
    assert len(exchange_calls) == (2 if SIZE > 1 else 0)
    monkeypatch.setenv("DMLMPI_EXCHANGE_BYTES", "0")
    plain = WORLD.Dup()
    assert context(plain).exchange is None
    np.testing.assert_array_equal(comm.allreduce(np.full(5, RANK + 1), comm=plain), np.full(5, SIZE * (SIZE + 1) // 2))
    assert len(exchange_calls) == (2 if SIZE > 1 else 0)
    unguarded.Free()
    plain.Free()


def test_shared_empty_errors() -> None:
    """Different sizes on different ranks, and freeing what shared_empty did not make, are refused."""
    if SIZE > 1:
        with pytest.raises(ValueError, match="all ranks must ask for the same shape"):
            comm.shared_empty(3 + (RANK == 1), "float32")
    with pytest.raises(ValueError, match="not made by shared_empty"):
        comm.free_shared(np.ones(3))
    assert comm.on_one_node() is True  # mpiexec on one machine


def test_bad_arguments() -> None:
    """Unsupported ops, algorithms and dtypes are refused before any communication."""
    with pytest.raises(ValueError, match="unsupported op 'mean'"):
        comm.allreduce(np.ones(2), op="mean")
    with pytest.raises(ValueError, match="unknown algorithm"):
        comm.allreduce(np.ones(2), algorithm="tree")
    with pytest.raises(TypeError, match="unsupported dtype 'uint8'"):
        comm.allreduce(np.ones(2, np.uint8))
    with pytest.raises(TypeError, match="numpy array, torch tensor or CuPy array"):
        comm.allreduce([1.0, 2.0])


def test_context_follows_the_communicator() -> None:
    """Calls that alternate between communicators each get their own state; a freed one is refused."""
    from dmlmpi.comm.context import context

    sub = WORLD.Dup()
    mine, world = context(sub), context(WORLD)
    assert mine is not world and context(sub) is mine and context(WORLD) is world
    assert comm.allreduce(np.ones(2), comm=sub, inplace=True).tolist() == [SIZE, SIZE]
    sub.Free()
    with pytest.raises(MPI.Exception):
        comm.allreduce(np.ones(2), comm=sub, inplace=True)


def test_context_from_two_threads() -> None:
    """Two threads on two communicators each always get their own communicator's state."""
    import sys
    import threading

    from dmlmpi.comm.context import context

    comms = [MPI.COMM_SELF.Dup(), MPI.COMM_SELF.Dup()]
    want = [context(c) for c in comms]
    wrong: list[int] = []

    def use(i: int) -> None:
        for _ in range(20000):
            if context(comms[i]) is not want[i]:
                wrong.append(i)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=use, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong
    for c in comms:
        c.Free()


def test_subcommunicator() -> None:
    """An explicit communicator: even and odd ranks reduce separately."""
    sub = WORLD.Split(RANK % 2, RANK)
    members = [r for r in range(SIZE) if r % 2 == RANK % 2]
    y = comm.allreduce(np.array([RANK], np.int64), comm=sub, algorithm="ring")
    assert y.tolist() == [sum(members)]
    sub.Free()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@requires_cuda
@pytest.mark.parametrize("direct", ["0", "1"])
@pytest.mark.parametrize("algorithm", ALGOS)
def test_torch_cuda(direct: str, algorithm: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors: staged through host memory (0) or handed to a CUDA-aware MPI (1)."""
    if direct == "1" and not comm.cuda_aware():
        pytest.skip("this MPI is not CUDA-aware")
    monkeypatch.setenv("DMLMPI_CUDA_AWARE", direct)
    device = torch.device("cuda", 0)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = (torch.arange(1000, device=device) % 3 + RANK).to(dtype)
        y = comm.allreduce(x * 1, algorithm=algorithm)  # x*1: produced by a kernel just launched
        assert y.device == device and y.dtype == dtype
        expect = ((torch.arange(1000) % 3) * SIZE + SIZE * (SIZE - 1) // 2).to(dtype)
        assert torch.equal(y.cpu(), expect)
        comm.allreduce(x, algorithm=algorithm, inplace=True)
        assert torch.equal(x.cpu(), expect)


@requires_cuda
@pytest.mark.parametrize("direct", ["0", "1"])
def test_fused_broadcast_cuda(direct: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA tensors of any dtype, strided ones too, packed on the device: staged (0) or straight to MPI (1)."""
    if direct == "1" and not comm.cuda_aware():
        pytest.skip("this MPI is not CUDA-aware")
    monkeypatch.setenv("DMLMPI_CUDA_AWARE", direct)
    device = torch.device("cuda", 0)
    mine = [t.to(device) if isinstance(t, torch.Tensor) else t for t in state_tensors(RANK)]
    expect = state_tensors(0)
    broadcast_fused(mine, root=0)
    for got, want in zip(mine, expect):
        if isinstance(got, torch.Tensor):
            assert got.device == device and torch.equal(got.cpu(), want)
        else:
            np.testing.assert_array_equal(got, want)


@requires_cuda
def test_cupy() -> None:
    """CuPy arrays come back as CuPy arrays with MPI's answer."""
    cupy = pytest.importorskip("cupy")
    x = cupy.arange(100, dtype=cupy.float32) + RANK
    y = comm.allreduce(x)
    assert isinstance(y, cupy.ndarray)
    np.testing.assert_array_equal(cupy.asnumpy(y), np.arange(100) * SIZE + SIZE * (SIZE - 1) / 2)


def test_cuda_aware_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """DMLMPI_CUDA_AWARE forces the answer either way; otherwise the library is asked."""
    monkeypatch.setenv("DMLMPI_CUDA_AWARE", "1")
    assert comm.cuda_aware() is True
    monkeypatch.setenv("DMLMPI_CUDA_AWARE", "0")
    assert comm.cuda_aware() is False
    monkeypatch.delenv("DMLMPI_CUDA_AWARE")
    assert isinstance(comm.cuda_aware(), bool)
    if "Open MPI" in MPI.Get_library_version() and os.environ.get("DMLMPI_EXPECT_CUDA_AWARE") is None:
        assert comm.cuda_aware() is False  # the PyPI Open MPI wheel is built without CUDA
