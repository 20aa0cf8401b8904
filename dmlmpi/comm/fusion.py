"""Tensor fusion: many small tensors packed into a few flat buckets, one collective per bucket.

Each collective call pays a fixed latency (and a guard check); gradients of a model are hundreds
of small tensors. Packing them into buckets of up to `bucket_bytes` (grouped by kind, device and
dtype, keeping their order) turns hundreds of latency-bound calls into a few bandwidth-bound ones.
A broadcast reduces nothing, so broadcast_fused packs tensors of every dtype (bool masks and
uint8 buffers included) into one bucket of raw bytes per kind and device, as DDP does for a model's
state at start and for its buffers before every forward.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from mpi4py import MPI

from .buffers import cuda_aware, dtype_of, kind_of, sync_device, to_flat, to_result
from .collectives import _check_algorithm, _comm, _enter, _numel, allreduce_flat, one_node, shared_array, shared_segment
from .context import Context, context
from .dtypes import RAW_BYTES, DType
from .ops import check_op
from .ring import empty_like

DEFAULT_BUCKET_BYTES = 25 << 20  # PyTorch DDP's default bucket_cap_mb
BYTE_ALIGN = 64  # each member of a byte bucket starts on a cache line (and at a multiple of any itemsize)


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


def _device_key(x: Any) -> tuple[str, str]:
    """Byte buckets group by kind and device only: any dtype travels as bytes."""
    return kind_of(x), str(x.device) if kind_of(x) != "numpy" else "cpu"


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


def broadcast_fused(tensors: Sequence[Any], root: int = 0, comm: MPI.Comm | None = None,
                    bucket_bytes: int = DEFAULT_BUCKET_BYTES, guard: bool | None = None) -> None:
    """Overwrite every tensor in `tensors` with root's, in place, one broadcast per bucket; any dtype, any layout."""
    ctx = context(_comm(comm))
    if not 0 <= root < ctx.size:
        raise ValueError(f"dmlmpi.comm.broadcast_fused: root {root} is not a rank of a {ctx.size}-rank communicator")
    sizes = [_nbytes(t) for t in tensors]  # TypeError here for anything that is not an array
    for bucket in plan_buckets(sizes, [_device_key(t) for t in tensors], bucket_bytes):
        members = [tensors[i] for i in bucket]
        offsets, length = byte_offsets([sizes[i] for i in bucket])
        # every rank must move the same number of bytes (DataParallel also checks the shapes once)
        _enter(ctx, guard, "broadcast_fused", length, RAW_BYTES, None, "mpi", root)
        if ctx.size == 1 or length == 0:
            continue
        # torch tensors are written through detached views: autograd has no part in moving state
        plain = [t.detach() if kind_of(t) == "torch" else t for t in members]
        buf = _empty_bytes(length, members[0])
        if ctx.rank == root:
            for t, offset in zip(plain, offsets):
                _slot(buf, offset, t)[...] = t  # pack root's values (strided ones too)
        # one broadcast of the whole bucket from root
        _broadcast_bytes(buf, root, ctx)
        if ctx.rank != root:
            for t, offset in zip(plain, offsets):
                t[...] = _slot(buf, offset, t)  # unpack into the caller's tensors, whatever their strides
