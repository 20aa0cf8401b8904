"""Public collectives: allreduce, reduce_scatter, allgather, broadcast for numpy, torch and CuPy.

Each call: check that all ranks agree (guard), flatten the input for MPI (buffers), run the chosen
algorithm on dmlmpi's private communicator, and hand back an object of the input's kind and device.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
from mpi4py import MPI

from . import guard as _guard
from . import exchange, hierarchical, ring, shm
from .buffers import Flat, dtype_of, to_flat, to_result, write_back
from .context import Context, context
from .dtypes import DType, lookup
from .ops import MPI_OPS, check_op, divide_in_place, torch_view
from .select import choose_algorithm

ALGORITHMS = ("auto", "ring", "mpi", "hierarchical", "shm")
_KNOWN = frozenset(ALGORITHMS)

def auto_algorithm(ctx: Context, nbytes: int, widened: bool = False, shared: bool = False,
                   host: bool = False) -> str:
    """What `auto` runs for nbytes on ctx's communicator (crossovers fixed with ctx).

    widened: a 16-bit float reduction; shared: the buffer lies in a shared window (from shared_empty);
    host: a host buffer, which may go through the node's exchange area. Besides the algorithms
    a user can name, the answer may be "exchange": shm through that area (exchange.py).
    """
    if ctx.size == 1:
        return "mpi"
    if shared and nbytes >= ctx.shm_min_bytes:
        return "shm"
    if host and ctx.exchange is not None and 0 < nbytes <= ctx.exchange.capacity:
        return "exchange"
    threshold = ctx.ring_min_bytes_16bit if widened else ctx.ring_min_bytes
    return "mpi" if nbytes < threshold else "ring"


def _comm(comm: MPI.Comm | None) -> MPI.Comm:
    """The user's communicator, COMM_WORLD by default."""
    return MPI.COMM_WORLD if comm is None else comm


def _check_algorithm(algorithm: str) -> str:
    """Return `algorithm` if known, else ValueError."""
    if algorithm not in _KNOWN:
        raise ValueError(f"dmlmpi.comm: unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    return algorithm


def _signature(ctx: Context, guard: bool | None, collective: str, length: int, dtype: DType,
               op: str | None, algorithm: str, root: int = 0, shared: bool = False) -> tuple[int, ...] | None:
    """Count this call; its guard signature if the guard is on, else None."""
    ctx.calls += 1
    if ctx.guard if guard is None else guard:
        return _guard.signature(collective, length, dtype.code, op, algorithm, root, ctx.calls, shared)
    return None


def _enter(ctx: Context, guard: bool | None, collective: str, length: int, dtype: DType,
           op: str | None, algorithm: str, root: int = 0, shared: bool = False) -> None:
    """Count this call and, if the guard is on, check that every rank made the same one."""
    sig = _signature(ctx, guard, collective, length, dtype, op, algorithm, root, shared)
    if sig is not None:
        _guard.check(ctx, sig)


def _exchange_allreduce(data: np.ndarray, ctx: Context, op: str, dtype: DType, sig: tuple[int, ...] | None) -> None:
    """All-reduce a 1-D host array through ctx's exchange area, its guard check (sig) in the same barrier."""
    if not exchange.allreduce(ctx.exchange, data, op, dtype, None if sig is None else _guard.signature_hash(sig)):
        _guard.mismatch(ctx, sig)  # type: ignore[arg-type]  # every rank found it, before reading a row


def _through_exchange(ctx: Context, algorithm: str, nbytes: int, shared: bool) -> bool:
    """Whether a contiguous host all-reduce of nbytes (shared: in a shared window) goes through the exchange area.

    For "auto" this is auto_algorithm(..., host=True) == "exchange", written out because it runs on
    every small call (tests hold the two together).
    """
    ex = ctx.exchange
    if ex is None or not 0 < nbytes <= ex.capacity:
        return False
    if algorithm == "auto":
        return not shared or nbytes < ctx.shm_min_bytes
    # an explicit "shm" on a private buffer: the area when it fits, else the staging window
    return algorithm == "shm" and not shared


def _begin(x: Any, comm: MPI.Comm | None, guard: bool | None, collective: str, op: str | None,
           algorithm: str, root: int = 0, find_shared: bool = False,
           check: bool = True) -> tuple[Context, DType, shm.Segment | None, tuple[int, ...] | None]:
    """Validate the arguments, find the communicator's context, and pass the guard.

    find_shared: also look up the shared window x lies in (returned; the guard checks all ranks agree).
    check=False: return the guard signature (None when the guard is off) for the caller to check.
    """
    if op is not None:
        check_op(op)
    _check_algorithm(algorithm)
    dtype = dtype_of(x)
    ctx = context(_comm(comm))
    if not 0 <= root < ctx.size:
        raise ValueError(f"dmlmpi.comm.{collective}: root {root} is not a rank of a {ctx.size}-rank communicator")
    seg = shared_segment(ctx, x) if find_shared and ctx.segments else None
    sig = _signature(ctx, guard, collective, _numel(x), dtype, op, algorithm, root, shared=seg is not None)
    if check and sig is not None:
        _guard.check(ctx, sig)
        sig = None
    return ctx, dtype, seg, sig


def _numel(x: Any) -> int:
    """Number of elements of any supported array."""
    return x.size if isinstance(x, np.ndarray) else int(math.prod(x.shape))


def _upcast(data: Any, dtype: DType) -> Any:
    """float16/bfloat16 data as float32 (exact), for MPI libraries that cannot reduce 16-bit floats."""
    if isinstance(data, np.ndarray):
        # host storage, converted by torch in one vectorised pass: numpy's float16 conversion took
        # 7x as long here (4M elements)
        return torch_view(data, dtype).float().numpy()
    if hasattr(data, "float"):  # torch device tensor (bfloat16 held as int16 bits)
        return torch_view(data, dtype).float()
    return data.astype("float32")  # CuPy float16


def _downcast_into(dst: Any, wide: Any, dtype: DType) -> None:
    """Round float32 `wide` to dst's 16-bit type (nearest even) and store it in dst."""
    import torch

    if isinstance(dst, np.ndarray):
        # torch rounds to nearest even like numpy's astype, which took 90x as long for float16 here
        torch_view(dst, dtype).copy_(torch.from_numpy(wide))
    elif hasattr(dst, "copy_"):
        dst.copy_(wide.to(torch.bfloat16).view(torch.int16) if dtype.name == "bfloat16" else wide.half())
    else:
        dst[...] = wide.astype(dst.dtype)


def _native_allreduce(data: Any, comm: MPI.Comm, op: str, dtype: DType) -> None:
    """MPI_Allreduce in place; 16-bit floats are reduced as float32 and rounded back."""
    if dtype.mpi_native:
        comm.Allreduce(MPI.IN_PLACE, data, op=MPI_OPS[op])
        return
    wide = _upcast(data, dtype)
    comm.Allreduce(MPI.IN_PLACE, wide, op=MPI_OPS[op])
    _downcast_into(data, wide, dtype)


def _hierarchy(ctx: Context) -> tuple[MPI.Comm, MPI.Comm]:
    """The (local, leaders) split of ctx's communicator, made once; DMLMPI_RANKS_PER_NODE fakes nodes."""
    per_node = int(os.environ.get("DMLMPI_RANKS_PER_NODE", "0"))
    if per_node not in ctx.nodes:
        ctx.nodes[per_node] = hierarchical.split_nodes(ctx.comm, per_node)
    return ctx.nodes[per_node]


def _node(ctx: Context) -> MPI.Comm:
    """ctx's ranks as one shared-memory communicator (split with the context); ValueError if they span nodes."""
    if ctx.node.Get_size() != ctx.size:
        # the same answer on every rank: either one node holds all of them or none does
        raise ValueError(f"dmlmpi.comm: shared memory needs all {ctx.size} ranks on one node; rank {ctx.rank} "
                         f"shares its node with {ctx.node.Get_size()} of them (use ring, mpi or hierarchical)")
    return ctx.node


def on_one_node(comm: MPI.Comm | None = None) -> bool:
    """Whether all ranks of comm share one node's memory (collective when dmlmpi first meets comm)."""
    return one_node(context(_comm(comm)))


def one_node(ctx: Context) -> bool:
    """on_one_node for a Context."""
    try:
        _node(ctx)
    except ValueError:
        return False
    return True


def _address(x: Any) -> int | None:
    """Where a host array's data starts (None for device arrays)."""
    if isinstance(x, np.ndarray):
        return x.__array_interface__["data"][0]
    if hasattr(x, "data_ptr") and x.device.type == "cpu":
        return x.data_ptr()
    return None


def _numpy_owned(x: np.ndarray) -> bool:
    """Whether numpy itself allocated x's memory (x or the array it views owns it): never a shared window."""
    while x.base is not None:
        if type(x.base) is not np.ndarray:
            return False  # memory from elsewhere (an MPI window, torch, a buffer): maybe shared
        x = x.base
    return True


def shared_segment(ctx: Context, x: Any) -> shm.Segment | None:
    """The shared window x lies at the start of (from shared_empty), if any.

    None costs one dict test while no window exists, and a look at x.base for arrays whose memory
    numpy allocated. Finding an array's address costs 0.9 us (on shared cores, several times that
    in the call's time), so numpy arrays found in a window are remembered, by identity, until a
    window is freed: a buffer reduced step after step is looked up once.
    """
    if not ctx.segments:
        return None
    if type(x) is np.ndarray:
        known = ctx.window_arrays.get(id(x))
        if known is not None and known[0] is x:  # the same object (holding it keeps its id from reuse)
            return known[1] if x.flags.c_contiguous else None
        if _numpy_owned(x):
            return None
    seg = ctx.segments.get(_address(x))
    if seg is None:
        return None
    nbytes = _numel(x) * dtype_of(x).storage.itemsize
    contiguous = x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous()
    if not contiguous or nbytes > seg.capacity:
        return None
    if type(x) is np.ndarray:
        if len(ctx.window_arrays) >= 256:  # many arrays over windows: start over rather than grow
            ctx.window_arrays.clear()
        ctx.window_arrays[id(x)] = (x, seg)  # a numpy array's memory and size cannot change under it
    return seg


def shared_empty(shape: int | tuple[int, ...], dtype: str = "float32", comm: MPI.Comm | None = None) -> np.ndarray:
    """An uninitialised host array in node-shared memory (collective); allreduce reduces it where it lies.

    All ranks of comm must share one node and ask for the same shape. bfloat16 comes back as its
    int16 storage (view it with torch.from_numpy(a).view(torch.bfloat16)). Free it with
    free_shared, on every rank. A zero-size array needs no shared memory and gets none.
    """
    return shared_array(context(_comm(comm)), shape, lookup(dtype))


def shared_array(ctx: Context, shape: int | tuple[int, ...], d: DType) -> np.ndarray:
    """shared_empty for a Context: the window is registered there, so allreduce on ctx finds it."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    count = int(math.prod(shape))
    node = _node(ctx)
    # every rank must ask for the same size: one small all-reduce, as the guard's
    most, least = _guard.extremes(ctx.comm, count)
    if most != least:
        raise ValueError(f"dmlmpi.comm.shared_empty: rank {ctx.rank} asked for {count} elements, but ranks ask for "
                         f"between {least} and {most}: all ranks must ask for the same shape")
    if count == 0:
        return np.empty(shape, dtype=d.storage)
    seg = shm.allocate(node, count * d.storage.itemsize)
    ctx.segments[seg.address] = seg
    return seg.view(ctx.rank, d.storage, count).reshape(shape)


def free_shared(a: Any, comm: MPI.Comm | None = None) -> None:
    """Release an array made by shared_empty (collective); a must not be used afterwards."""
    if _numel(a) == 0:
        return  # shared_empty made no window for it
    ctx = context(_comm(comm))
    seg = ctx.segments.pop(_address(a), None)
    ctx.window_arrays.clear()  # some of them lie in this window
    if seg is None:
        raise ValueError(f"dmlmpi.comm.free_shared: rank {ctx.rank}: this array was not made by shared_empty on this communicator")
    seg.free()


def _staging(ctx: Context, nbytes: int) -> shm.Segment:
    """The window that "shm" stages other buffers through, grown (collectively) to hold nbytes."""
    if ctx.staging is None or ctx.staging.capacity < nbytes:
        # every rank reduces the same length (the guard checks it), so all grow on the same call
        old = 0 if ctx.staging is None else ctx.staging.capacity
        if ctx.staging is not None:
            ctx.staging.free()
        ctx.staging = shm.allocate(_node(ctx), max(nbytes, 2 * old))
    return ctx.staging


def _shm_allreduce(data: Any, dtype: DType, op: str, ctx: Context, seg: shm.Segment | None) -> None:
    """The "shm" algorithm: in the buffer's own window, or staged through ctx's."""
    if seg is not None:
        shm.allreduce_inplace(data, seg, op, dtype, in_window=True)
    elif isinstance(data, np.ndarray) and _through_exchange(ctx, "shm", data.nbytes, False):
        _exchange_allreduce(data, ctx, op, dtype, None)
    elif isinstance(data, np.ndarray):
        shm.allreduce_inplace(data, _staging(ctx, data.nbytes), op, dtype, in_window=False)
    else:
        # device memory (handed over as is for a CUDA-aware MPI): the window is host memory
        host = data.get() if type(data).__module__.startswith("cupy") else data.cpu().numpy()
        shm.allreduce_inplace(host, _staging(ctx, host.nbytes), op, dtype, in_window=False)
        if hasattr(data, "copy_"):
            import torch

            data.copy_(torch.from_numpy(host))
        else:
            data.set(host)


def allreduce_flat(data: Any, dtype: DType, op: str, algorithm: str, ctx: Context,
                   seg: shm.Segment | None = None) -> None:
    """Run one all-reduce algorithm in place on a 1-D buffer (no guard, no conversion).

    seg: the shared window `data` lies in, if any (then auto may reduce it there).
    """
    comm = ctx.comm
    if algorithm == "auto" and ctx.size > 1:
        algorithm = auto_algorithm(ctx, len(data) * dtype.storage.itemsize, not dtype.mpi_native, seg is not None,
                                   host=isinstance(data, np.ndarray))
    if algorithm == "exchange":
        _exchange_allreduce(data, ctx, op, dtype, None)
        return  # avg was divided there
    if algorithm == "shm" and ctx.size > 1 and len(data) > 0:
        _shm_allreduce(data, dtype, op, ctx, seg)
        return  # avg was divided there, once per element
    if ctx.size > 1 and len(data) > 0:
        if algorithm == "mpi":
            _native_allreduce(data, comm, op, dtype)
        elif algorithm == "ring":
            ring.allreduce_inplace(data, comm, op, dtype, scratch=ctx.scratch,
                                   segment=ctx.ring_segment_bytes // dtype.storage.itemsize)
        else:
            local, leaders = _hierarchy(ctx)
            hierarchical.allreduce_inplace(data, local, leaders, op, dtype)
    if op == "avg":
        divide_in_place(data, ctx.size, dtype)


@dataclass(slots=True)
class HostCall:
    """One kind of in-place host all-reduce on a context, worked out on its first call and kept.

    Every small call of a training loop repeats one of a few kinds; looking the kind up is one
    dictionary probe, where working it out costs ~0.6 us of Python, and on ranks that share cores
    each microsecond of a rank's Python adds several to the call (see README, callcost).
    """

    dtype: DType
    plans: tuple[exchange.Plan, exchange.Plan] | None  # its exchange plans (per parity); None: not through the area
    fields: tuple[int, ...] | None  # the guard's signature with call number 0 (None: guard off)
    kind_hash: int  # guard.kind_hash(fields): XOR the call number gives guard.signature_hash

    def signature(self, call: int) -> tuple[int, ...]:
        """The guard's signature of this kind's call number `call`."""
        assert self.fields is not None
        return self.fields[:_guard.CALL] + (call,) + self.fields[_guard.CALL + 1:]


def _host_call(ctx: Context, x: np.ndarray, op: str, algorithm: str, shared: bool, guard_on: bool) -> HostCall:
    """Work out the HostCall of an in-place all-reduce of x on ctx (argument errors raise here) and keep it."""
    check_op(op)
    _check_algorithm(algorithm)
    dtype = dtype_of(x)
    fields = _guard.signature("allreduce", x.size, dtype.code, op, algorithm, 0, 0, shared) if guard_on else None
    plans = ctx.exchange.plans(x.nbytes, dtype, op) if _through_exchange(ctx, algorithm, x.nbytes, shared) else None
    kind = HostCall(dtype, plans, fields, _guard.kind_hash(fields) if fields is not None else 0)
    if len(ctx.host_calls) > 256:  # many distinct sizes: start over rather than grow without end
        ctx.host_calls.clear()
    ctx.host_calls[(x.size, x.dtype, op, algorithm, shared, guard_on)] = kind
    return kind


def _torch_host_view(x: Any) -> np.ndarray | None:
    """A numpy view of a contiguous CPU torch tensor (the in-place fast path's input); None for anything else.

    bfloat16, which numpy lacks, and tensors numpy cannot view (conjugated ones) take the general path.
    """
    torch = sys.modules.get("torch")  # imported by whoever made x; collectives never import it for this
    if torch is None or not isinstance(x, torch.Tensor) or not x.is_cpu or x.dtype is torch.bfloat16:
        return None
    if not x.is_contiguous():
        return None
    try:
        return x.detach().numpy() if x.requires_grad else x.numpy()  # detach costs 0.3 us: only when needed
    except RuntimeError:
        return None


def allreduce(x: Any, op: str = "sum", algorithm: str = "auto", comm: MPI.Comm | None = None,
              inplace: bool = False, guard: bool | None = None) -> Any:
    """Reduce `x` element-wise over all ranks; every rank gets the result (same kind and device as x)."""
    host = (x if type(x) is np.ndarray and x.flags.c_contiguous else _torch_host_view(x)) if inplace else None
    if host is not None:
        # A contiguous host array reduced in place (a numpy array, or a numpy view of a CPU tensor)
        # is its own flat buffer, and what depends only on the kind of call is kept (HostCall).
        # Written out here: a small all-reduce is all latency, and on ranks that share cores each
        # 0.1 us of a rank's Python adds ~0.7 us at 4 ranks.
        ctx = context(MPI.COMM_WORLD if comm is None else comm)
        if not ctx.segments:
            seg = None
        elif host is x:
            seg = shared_segment(ctx, x)
        else:  # a tensor's address is cheap to ask, and its view is contiguous
            seg = ctx.segments.get(x.data_ptr())
            seg = seg if seg is not None and host.nbytes <= seg.capacity else None
        guard_on = ctx.guard if guard is None else guard
        kind = (ctx.host_calls.get((host.size, host.dtype, op, algorithm, seg is not None, guard_on))
                or _host_call(ctx, host, op, algorithm, seg is not None, guard_on))
        ctx.calls += 1  # as _signature() counts every call
        flat = host if host.ndim == 1 else host.reshape(-1)
        if kind.plans is not None:
            # the guard's check rides along in the exchange's barrier (_exchange_allreduce, inlined)
            if not exchange.allreduce(ctx.exchange, flat, op, kind.dtype,
                                      None if kind.fields is None else kind.kind_hash ^ ctx.calls, kind.plans):
                _guard.mismatch(ctx, kind.signature(ctx.calls))
            return x
        if kind.fields is not None:
            _guard.check(ctx, kind.signature(ctx.calls))
        allreduce_flat(flat, kind.dtype, op, algorithm, ctx, seg)
        return x
    # a buffer in a shared window is reduced where it lies (out of place works on a private copy)
    ctx, dtype, seg, sig = _begin(x, comm, guard, "allreduce", op, algorithm, find_shared=inplace, check=False)
    flat = to_flat(x, copy=not inplace, dtype=dtype)
    data = flat.data
    if isinstance(data, np.ndarray) and _through_exchange(ctx, algorithm, data.nbytes, seg is not None):
        _exchange_allreduce(data, ctx, op, dtype, sig)  # the guard's check rides along
    else:
        if sig is not None:
            _guard.check(ctx, sig)
        allreduce_flat(data, dtype, op, algorithm, ctx, seg)
    return write_back(flat, x) if inplace else to_result(flat, data, flat.shape)


def _row_bounds(shape: tuple[int, ...], n: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Row bounds and element bounds of each rank's share when dimension 0 is split over n ranks."""
    rows = ring.chunk_bounds(shape[0], n)
    row = int(math.prod(shape[1:]))
    return rows, [(a * row, b * row) for a, b in rows]


def reduce_scatter(x: Any, op: str = "sum", algorithm: str = "auto", comm: MPI.Comm | None = None,
                   guard: bool | None = None) -> Any:
    """Reduce `x` over all ranks and give rank r its rows of dimension 0 (split by ring.chunk_bounds)."""
    ctx, dtype, _, _ = _begin(x, comm, guard, "reduce_scatter", op, algorithm)
    n, r = ctx.size, ctx.rank
    shape = tuple(x.shape) or (1,)
    rows, bounds = _row_bounds(shape, n)
    flat = to_flat(x, copy=True)
    start, stop = bounds[r]
    chosen = auto_algorithm(ctx, len(flat.data) * dtype.storage.itemsize, not dtype.mpi_native) if algorithm == "auto" else algorithm
    if n > 1 and chosen == "ring":
        ring.reduce_scatter_inplace(flat.data, ctx.comm, op, dtype, bounds, scratch=ctx.scratch,
                                    segment=ctx.ring_segment_bytes // dtype.storage.itemsize)
        mine = flat.data[start:stop]
    elif n > 1:
        # native (hierarchical has no reduce-scatter of its own): MPI_Reduce_scatter with counts
        mine = _native_reduce_scatter(flat, ctx.comm, op, dtype, bounds)
    else:
        mine = flat.data
    if op == "avg":
        divide_in_place(mine, n, dtype)
    return to_result(flat, mine, (rows[r][1] - rows[r][0],) + shape[1:])


def reduce_scatter_inplace(x: Any, op: str = "sum", algorithm: str = "auto", comm: MPI.Comm | None = None,
                           guard: bool | None = None) -> Any:
    """x holds n equal blocks along its flat length: afterwards block r of rank r's x holds their reduction; returns it.

    The reduce-scatter of ZeRO stage 2's gradient buckets: no copy of the input, and a view of x
    as the result (the other blocks of x are left with partial sums).
    """
    ctx, dtype, _, _ = _begin(x, comm, guard, "reduce_scatter", op, algorithm)
    n, r = ctx.size, ctx.rank
    length = _numel(x)
    if length % n:
        raise ValueError(f"dmlmpi.comm.reduce_scatter_inplace: {length} elements do not make {n} equal blocks")
    flat = to_flat(x, copy=False)
    m = length // n
    bounds = [(i * m, (i + 1) * m) for i in range(n)]
    chosen = auto_algorithm(ctx, length * dtype.storage.itemsize, not dtype.mpi_native) if algorithm == "auto" else algorithm
    if n > 1 and (chosen == "ring" or not dtype.mpi_native):
        # ring: n-1 neighbour steps, each adding one arriving block into ours (16-bit floats added by torch)
        ring.reduce_scatter_inplace(flat.data, ctx.comm, op, dtype, bounds, scratch=ctx.scratch,
                                    segment=ctx.ring_segment_bytes // dtype.storage.itemsize)
    elif n > 1:
        # native: MPI_Reduce_scatter_block into a block-sized buffer, then into block r's place
        out = flat.data[:m].copy() if hasattr(flat.data, "copy") else flat.data[:m].clone()
        ctx.comm.Reduce_scatter_block(flat.data, out, op=MPI_OPS[op])
        flat.data[r * m:(r + 1) * m] = out
    if op == "avg":
        divide_in_place(flat.data[r * m:(r + 1) * m], n, dtype)
    write_back(flat, x)
    return x.reshape(-1)[r * m:(r + 1) * m]


def _native_reduce_scatter(flat: Flat, comm: MPI.Comm, op: str, dtype: DType,
                           bounds: list[tuple[int, int]]) -> Any:
    """MPI_Reduce_scatter with per-rank counts; 16-bit floats go through float32."""
    counts = [b - a for a, b in bounds]
    start, stop = bounds[comm.Get_rank()]
    data = flat.data if dtype.mpi_native else _upcast(flat.data, dtype)
    out = data[start:stop].copy() if hasattr(data, "copy") else data[start:stop].clone()
    comm.Reduce_scatter(data, out, recvcounts=counts, op=MPI_OPS[op])
    if dtype.mpi_native:
        return out
    narrow = flat.data[start:stop]
    _downcast_into(narrow, out, dtype)
    return narrow


def _gather_blocks(data: Any, ctx: Context, dtype: DType, algorithm: str) -> None:
    """`data` holds n equal blocks, this rank's in its place: every rank's block into every rank's data."""
    n = ctx.size
    if n == 1:
        return
    m = len(data) // n
    chosen = auto_algorithm(ctx, len(data) * dtype.storage.itemsize) if algorithm == "auto" else algorithm
    if chosen == "ring":
        # ring: each block passes around the ranks into its place (n-1 steps)
        ring.allgather_inplace(data, ctx.comm, [(i * m, (i + 1) * m) for i in range(n)])
    else:
        # native: MPI_Allgather with this rank's block already in place
        ctx.comm.Allgather(MPI.IN_PLACE, data)


def allgather(x: Any, algorithm: str = "auto", comm: MPI.Comm | None = None, guard: bool | None = None) -> Any:
    """Concatenate every rank's `x` (same shape on all ranks) along dimension 0, in rank order."""
    ctx, dtype, _, _ = _begin(x, comm, guard, "allgather", None, algorithm)
    n, r = ctx.size, ctx.rank
    shape = tuple(x.shape) or (1,)
    flat = to_flat(x, copy=False)
    m = len(flat.data)
    out = ring.empty_like(n * m, flat.data)
    out[r * m:(r + 1) * m] = flat.data  # our block in its place; the others come from their ranks
    _gather_blocks(out, ctx, dtype, algorithm)
    return to_result(flat, out, (n * shape[0],) + shape[1:])


def allgather_inplace(x: Any, algorithm: str = "auto", comm: MPI.Comm | None = None, guard: bool | None = None) -> Any:
    """x holds n equal blocks along its flat length: rank r's block r goes to every rank, written into x itself.

    The all-gather of ZeRO's parameter shards: no output buffer, no copy back.
    """
    ctx, dtype, _, _ = _begin(x, comm, guard, "allgather", None, algorithm)
    length = _numel(x)
    if length % ctx.size:
        raise ValueError(f"dmlmpi.comm.allgather_inplace: {length} elements do not make {ctx.size} equal blocks")
    flat = to_flat(x, copy=False)
    _gather_blocks(flat.data, ctx, dtype, algorithm)
    return write_back(flat, x)


def broadcast(x: Any, root: int = 0, comm: MPI.Comm | None = None, inplace: bool = False,
              guard: bool | None = None) -> Any:
    """Every rank gets root's `x` (same kind and device); with inplace=True, written into x."""
    ctx, _, _, _ = _begin(x, comm, guard, "broadcast", None, "mpi", root)
    flat = to_flat(x, copy=not inplace)
    if ctx.size > 1 and len(flat.data) > 0:
        ctx.comm.Bcast(flat.data, root=root)
    return write_back(flat, x) if inplace else to_result(flat, flat.data, flat.shape)
