"""Tensor fusion: many small tensors packed into a few flat buckets, one collective per bucket.

Each collective call pays a fixed latency (and a guard check); gradients of a model are hundreds
of small tensors. Packing them into buckets of up to `bucket_bytes` (grouped by kind, device and
dtype, keeping their order) turns hundreds of latency-bound calls into a few bandwidth-bound ones.
A broadcast reduces nothing, so broadcast_fused moves tensors of every dtype (bool masks and
uint8 buffers included) as raw bytes, one bucket per kind and device, as DDP does for a model's
state at start and for its buffers before every forward: host tensors where they lie (one MPI
datatype lists their addresses), device and strided ones packed.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from .buffers import _contiguous, cuda_aware, dtype_of, kind_of, sync_device, to_flat, to_result
from .collectives import (_address, _check_algorithm, _comm, _enter, _numel, allreduce_flat, one_node, shared_array,
                          shared_segment)
from .context import Context, context
from .dtypes import RAW_BYTES, DType
from .guard import CollectiveMismatchError, extremes
from .ops import check_op
from .ring import empty_like

DEFAULT_BUCKET_BYTES = 25 << 20  # PyTorch DDP's default bucket_cap_mb
BYTE_ALIGN = 64  # each member of a byte bucket starts on a cache line (and at a multiple of any itemsize)
MAX_BLOCK = 1 << 30  # bytes per block of a broadcast's datatype (MPI counts are C ints)


def _group_key(x: Any) -> tuple[str, str, str]:
    """Tensors fuse only with others of the same kind, device and dtype."""
    device = str(x.device) if kind_of(x) != "numpy" else "cpu"
    return kind_of(x), device, str(x.dtype)


def plan_buckets(nbytes: Sequence[int], keys: Sequence[Any], bucket_bytes: int) -> list[list[int]]:
    """Indices of tensors per bucket: same key, in order, each bucket at most bucket_bytes (or one tensor)."""
    open_buckets: dict[Any, list[int]] = {}
    filled: dict[Any, int] = {}
    buckets: list[list[int]] = []
    for i, (size, key) in enumerate(zip(nbytes, keys)):
        current = open_buckets.get(key)
        if current is not None and filled[key] + size > bucket_bytes:
            buckets.append(current)  # full: close it
            current = None
        if current is None:
            current, filled[key] = [], 0
            open_buckets[key] = current
        current.append(i)
        filled[key] += size
    buckets.extend(open_buckets.values())
    return sorted(buckets, key=lambda b: b[0])


def pack(tensors: Sequence[Any], out: Any = None) -> Any:
    """Concatenate same-kind tensors into one contiguous 1-D array on their device (into `out` if given)."""
    kind = kind_of(tensors[0])
    if kind == "numpy":
        return np.concatenate([np.ravel(t) for t in tensors], out=out)
    if kind == "cupy":
        import cupy

        return cupy.concatenate([t.ravel() for t in tensors], out=out)
    import torch

    return torch.cat([t.detach().reshape(-1) for t in tensors], out=out)


def _bucket_buffer(ctx: Any, members: Sequence[Any], length: int, dtype: DType, algorithm: str) -> Any:
    """A bucket-sized buffer kept on the communicator's context and reused by later calls.

    Only for in-place calls: their results are copied out, so the next call may overwrite it.
    Host buckets big enough for the "shm" all-reduce, on ranks of one node, are kept in a shared
    window (made collectively, on the first call that needs it), where it sums them in place.
    """
    group = _group_key(members[0])  # (kind, device, dtype)
    key = ("bucket", group, length)
    buf = ctx.buffers.get(key)
    if buf is None:
        shared = (algorithm in ("auto", "shm") and ctx.size > 1 and group[1] == "cpu"
                  and length * dtype.storage.itemsize >= ctx.shm_min_bytes and one_node(ctx))
        if not shared:
            buf = empty_like(length, members[0])
        elif group[0] == "numpy":
            buf = shared_array(ctx, length, dtype)
        else:
            import torch

            buf = torch.from_numpy(shared_array(ctx, length, dtype)).view(members[0].dtype)
        ctx.buffers[key] = buf
    return buf


def allreduce_fused(tensors: Sequence[Any], op: str = "sum", algorithm: str = "auto",
                    comm: MPI.Comm | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    inplace: bool = False, guard: bool | None = None) -> list[Any]:
    """All-reduce every tensor in `tensors` with one collective per bucket; results in input order."""
    check_op(op)
    _check_algorithm(algorithm)
    ctx = context(_comm(comm))
    sizes = [_numel(t) * dtype_of(t).storage.itemsize for t in tensors]
    results: list[Any] = list(tensors)
    for bucket in plan_buckets(sizes, [_group_key(t) for t in tensors], bucket_bytes):
        members = [tensors[i] for i in bucket]
        length = sum(_numel(t) for t in members)
        dtype = dtype_of(members[0])
        # checked before the bucket buffer is made: making a shared one is collective
        _enter(ctx, guard, "allreduce_fused", length, dtype, op, algorithm)
        # in place: pack into a kept buffer (no fresh pages per call); else a fresh one, since the
        # results handed back are views of it
        packed = pack(members, out=_bucket_buffer(ctx, members, length, dtype, algorithm)) if inplace else pack(members)
        flat = to_flat(packed, copy=False, dtype=dtype)
        allreduce_flat(flat.data, dtype, op, algorithm, ctx, shared_segment(ctx, packed) if inplace else None)
        # host and CUDA-aware buffers were reduced in place; staged GPU data comes back from the host
        whole = packed if flat.is_view else to_result(flat, flat.data, (len(flat.data),))
        offset = 0
        for i, t in zip(bucket, members):
            n = _numel(t)
            piece = whole[offset:offset + n].reshape(t.shape)
            offset += n
            if inplace:
                t[...] = piece
                results[i] = t
            else:
                results[i] = piece
    return results


def byte_offsets(nbytes: Sequence[int], align: int = BYTE_ALIGN) -> tuple[list[int], int]:
    """Where each of a byte bucket's members starts, each at a multiple of `align`, and the bucket's length."""
    offsets, end = [], 0
    for n in nbytes:
        start = -(-end // align) * align
        offsets.append(start)
        end = start + n
    return offsets, end


def _nbytes(x: Any) -> int:
    """Bytes of an array of any kind and dtype."""
    return int(x.nbytes) if kind_of(x) != "torch" else x.numel() * x.element_size()


def _empty_bytes(n: int, like: Any) -> Any:
    """n uninitialised bytes on like's device, as an array of like's kind."""
    kind = kind_of(like)
    if kind == "numpy":
        return np.empty(n, dtype=np.uint8)
    if kind == "cupy":
        import cupy

        with like.device:
            return cupy.empty(n, dtype=cupy.uint8)
    import torch

    return torch.empty(n, dtype=torch.uint8, device=like.device)


def _slot(buf: Any, offset: int, x: Any) -> Any:
    """The piece of byte bucket `buf` that holds x, viewed with x's dtype and shape."""
    piece = buf[offset:offset + _nbytes(x)]
    if kind_of(x) == "torch":
        return piece.view(x.dtype).view(x.shape)
    return piece.view(x.dtype).reshape(x.shape)


def _broadcast_bytes(buf: Any, root: int, ctx: Context) -> None:
    """Broadcast a 1-D byte bucket from root, in place: host memory, device memory, or device staged through host."""
    if isinstance(buf, np.ndarray):
        ctx.comm.Bcast(buf, root=root)
    elif kind_of(buf) == "torch" and not buf.is_cuda:
        ctx.comm.Bcast(buf.numpy(), root=root)
    elif cuda_aware():
        sync_device(buf)  # the packing kernels are done before MPI reads the bucket
        ctx.comm.Bcast(buf, root=root)
    elif kind_of(buf) == "torch":
        import torch

        host = buf.cpu().numpy()  # waits for the packing kernels
        ctx.comm.Bcast(host, root=root)
        buf.copy_(torch.from_numpy(host))
    else:
        host = buf.get()  # CuPy: waits for the packing kernels
        ctx.comm.Bcast(host, root=root)
        buf.set(host)


def _host_spans(t: Any) -> tuple[tuple[int, int], ...] | None:
    """(address, bytes) blocks of a contiguous host array, each under 1 GiB (MPI block lengths are ints); None otherwise."""
    address = _address(t)  # None for device memory
    if address is None or not _contiguous(t, kind_of(t)):
        return None
    n = _nbytes(t)
    return tuple((address + k, min(MAX_BLOCK, n - k)) for k in range(0, n, MAX_BLOCK))


def _spans_type(ctx: Context, spans: tuple[tuple[int, int], ...]) -> MPI.Datatype:
    """An MPI datatype of the bytes at these absolute addresses, made once per set of spans and kept on ctx."""
    key = ("spans type", spans)
    found = ctx.buffers.get(key)
    if found is None:
        kept = [k for k in ctx.buffers if k[0] == "spans type"]
        if len(kept) >= 64:  # tensors that move around: free the old types rather than grow without end
            for k in kept:
                ctx.buffers.pop(k).Free()
        found = MPI.BYTE.Create_hindexed([n for _, n in spans], [a for a, _ in spans]).Commit()
        ctx.buffers[key] = found
    return found


@dataclass
class ByteBucket:
    """One bucket of a fused broadcast: its members, and how they travel."""

    members: list[Any]  # the caller's tensors
    spans: tuple[tuple[int, int], ...] | None  # contiguous host members: their (address, bytes) blocks
    offsets: list[int]  # otherwise: where each member starts in the packed bucket
    length: int  # bytes the ranks must agree on (the guard's length)


def plan_broadcast(tensors: Sequence[Any], bucket_bytes: int) -> list[ByteBucket]:
    """Buckets of a fused broadcast: by kind and device, in order; host ones broadcast where they lie when they can."""
    sizes = [_nbytes(t) for t in tensors]  # TypeError here for anything that is not an array
    buckets = []
    # by kind and device only (_group_key without the dtype): any dtype travels as bytes
    for idx in plan_buckets(sizes, [_group_key(t)[:2] for t in tensors], bucket_bytes):
        members = [tensors[i] for i in idx]
        found = [_host_spans(t) for t in members]
        if all(f is not None for f in found):
            spans = tuple(span for f in found for span in f)  # type: ignore[union-attr]
            buckets.append(ByteBucket(members, spans, [], sum(n for _, n in spans)))
        else:
            offsets, length = byte_offsets([sizes[i] for i in idx])
            buckets.append(ByteBucket(members, None, offsets, length))
    return buckets


def _broadcast_bucket(ctx: Context, bucket: ByteBucket, root: int, guard: bool | None) -> None:
    """Broadcast one planned bucket from root (collective)."""
    # every rank must move the same bytes the same way (DataParallel also checks the shapes once)
    route = "mpi" if bucket.spans is not None else "none"  # where they lie, or packed
    _enter(ctx, guard, "broadcast_fused", bucket.length, RAW_BYTES, None, route, root)
    if ctx.size == 1 or bucket.length == 0:
        return
    if bucket.spans is not None:
        # one broadcast from root straight into every member's memory
        ctx.comm.Bcast([MPI.BOTTOM, 1, _spans_type(ctx, bucket.spans)], root=root)
        return
    # torch tensors are written through detached views: autograd has no part in moving state
    plain = [t.detach() if kind_of(t) == "torch" else t for t in bucket.members]
    buf = _empty_bytes(bucket.length, plain[0])
    if ctx.rank == root:
        for t, offset in zip(plain, bucket.offsets):
            _slot(buf, offset, t)[...] = t  # pack root's values (strided ones too)
    # one broadcast of the whole bucket from root
    _broadcast_bytes(buf, root, ctx)
    if ctx.rank != root:
        for t, offset in zip(plain, bucket.offsets):
            t[...] = _slot(buf, offset, t)  # unpack into the caller's tensors, whatever their strides


def _check_layouts(ctx: Context, tensors: Sequence[Any]) -> None:
    """Raise CollectiveMismatchError on every rank unless all ranks pass tensors of the same shapes and dtypes."""
    layout = [(tuple(t.shape), str(t.dtype).replace("torch.", "")) for t in tensors]
    checksum = zlib.crc32(repr(layout).encode())  # not hash(): str hashes differ between processes
    most, least = extremes(ctx.comm, checksum)  # one small collective
    if most == least:
        return
    # error path only: every rank's layout, so every rank can name the same first difference
    layouts = ctx.comm.allgather(layout)
    r = next(r for r, other in enumerate(layouts) if other != layouts[0])
    ours, theirs = layouts[0], layouts[r]
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    raise CollectiveMismatchError(f"dmlmpi.comm.broadcast_fused on rank {ctx.rank} of {ctx.size}: ranks pass "
                                  f"different tensors -- tensor {i}: rank 0 {_entry(ours, i)}; rank {r} "
                                  f"{_entry(theirs, i)} ({len(ours)} and {len(theirs)} tensors)")


def _entry(layout: list[tuple[tuple[int, ...], str]], i: int) -> str:
    """Tensor i of a layout in words: its shape and dtype, or none."""
    return "none" if i >= len(layout) else f"{layout[i][0]} {layout[i][1]}"


class FusedBroadcast:
    """broadcast_fused of one fixed list of tensors, planned once and run by calling it (every forward, say).

    Planning costs a few microseconds of Python per tensor; a call checks only that the tensors
    still lie where they did (else it plans again), then makes one collective per bucket.
    """

    def __init__(self, tensors: Sequence[Any], root: int = 0, comm: MPI.Comm | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, guard: bool | None = None) -> None:
        self.ctx = context(_comm(comm))
        if not 0 <= root < self.ctx.size:
            raise ValueError(f"dmlmpi.comm.broadcast_fused: root {root} is not a rank of a "
                             f"{self.ctx.size}-rank communicator")
        self.tensors, self.root, self.bucket_bytes, self.guard = list(tensors), root, bucket_bytes, guard
        self.buckets = plan_broadcast(self.tensors, bucket_bytes)
        self._where = self._places()
        if self.ctx.guard if guard is None else guard:
            # bytes are bytes: equal byte counts in other shapes or dtypes would pass each bucket's
            # guard and scramble the values, so the layouts are compared once, here (collective:
            # every rank makes its FusedBroadcast together; a later re-plan is local and skips this)
            _check_layouts(self.ctx, self.tensors)

    def _places(self) -> list[tuple[int, int]]:
        """(address, elements) of the tensors broadcast where they lie: what the plan depends on."""
        # torch's data_ptr and numel alone: asking each tensor its kind and device too cost 3x more
        places = []
        for b in self.buckets:
            if b.spans is not None and kind_of(b.members[0]) == "torch":  # a bucket holds one kind
                places += [(t.data_ptr(), t.numel()) for t in b.members]
            elif b.spans is not None:
                places += [(_address(t), t.size) for t in b.members]
        return places

    def __call__(self) -> None:
        """Every rank's tensors get root's values (collective)."""
        if self._places() != self._where:  # memory replaced (set_, resize_, ...): plan again
            self.buckets = plan_broadcast(self.tensors, self.bucket_bytes)
            self._where = self._places()
        for bucket in self.buckets:
            _broadcast_bucket(self.ctx, bucket, self.root, self.guard)


def broadcast_fused(tensors: Sequence[Any], root: int = 0, comm: MPI.Comm | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, guard: bool | None = None) -> None:
    """Overwrite every tensor in `tensors` with root's, in place, one broadcast per bucket; any dtype, any layout.

    Contiguous host tensors are broadcast where they lie: one MPI datatype lists their addresses
    (MPI_BOTTOM-relative), so nothing is packed (torch's per-call overhead made packing 24 small
    BatchNorm buffers cost more than the 24 broadcasts it replaced). Device and strided tensors
    are packed into a bucket of bytes, broadcast, and unpacked. To repeat one broadcast, keep a
    FusedBroadcast.
    """
    FusedBroadcast(tensors, root, comm, bucket_bytes, guard)()
