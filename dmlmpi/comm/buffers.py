"""Array adapters: numpy, torch (CPU/CUDA) and CuPy arrays seen as flat buffers that MPI can use.

A collective works on a `Flat`: one contiguous 1-D array of the input's elements. It lives in host
memory (numpy), or in device memory (torch/CuPy) when the MPI library is CUDA-aware. GPU inputs
meet a CUDA-unaware MPI through host staging: the producing stream is synchronized, the data copied
to pinned host memory, reduced there, and copied back.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .dtypes import DType, lookup


@dataclass(slots=True)
class Flat:
    """A tensor as one contiguous 1-D buffer, with what is needed to hand back the same kind."""

    data: Any  # numpy array (host) or torch/CuPy array (device); bfloat16 host data as int16 bits
    kind: str  # "numpy", "torch" or "cupy"
    dtype: DType
    shape: tuple[int, ...]
    device: Any  # torch.device / CuPy device id; None for numpy
    on_device: bool  # data is device memory handed to MPI directly
    is_view: bool  # data shares memory with the input: writing it wrote the input


def kind_of(x: Any) -> str:
    """'numpy', 'torch' or 'cupy' for a supported array, else TypeError."""
    if isinstance(x, np.ndarray):
        return "numpy"
    mod = type(x).__module__
    if mod.startswith("torch"):
        return "torch"
    if mod.startswith("cupy"):
        return "cupy"
    raise TypeError(f"dmlmpi.comm: expected a numpy array, torch tensor or CuPy array, got {type(x).__name__}")


_DTYPE_MEMO: dict[Any, DType] = {}  # numpy/torch dtype object -> DType (str(dtype) costs microseconds)


def dtype_of(x: Any) -> DType:
    """The DType of an array of any supported kind."""
    if type(x) is np.ndarray:  # the common case, without kind_of's checks
        found = _DTYPE_MEMO.get(x.dtype)
        if found is not None:
            return found
    kind_of(x)  # TypeError for anything that is not an array
    found = _DTYPE_MEMO.get(x.dtype)
    if found is None:
        found = _DTYPE_MEMO[x.dtype] = lookup(str(x.dtype).replace("torch.", ""))
    return found


@lru_cache(maxsize=1)
def _mpi_reports_cuda() -> bool:
    """Ask the loaded libmpi whether it is CUDA-aware (MPIX_Query_cuda_support, through ctypes)."""
    from mpi4py import MPI  # noqa: F401  (loads libmpi into this process)

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libmpi" in line and ".so" in line}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
            query = lib.MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        query.restype = ctypes.c_int
        return bool(query())
    return False


def cuda_aware() -> bool:
    """Whether device buffers go to MPI directly: DMLMPI_CUDA_AWARE=0/1 overrides the library's answer."""
    override = os.environ.get("DMLMPI_CUDA_AWARE", "").strip().lower()
    if override in ("1", "true", "yes"):
        return True
    if override in ("0", "false", "no"):
        return False
    return _mpi_reports_cuda()


def sync_device(x: Any) -> None:
    """Wait for the stream that produced `x`, so MPI never reads a buffer still being written."""
    if kind_of(x) == "cupy":
        import cupy

        cupy.cuda.get_current_stream().synchronize()
    else:
        import torch

        torch.cuda.current_stream(x.device).synchronize()


def _host_view(x: Any, kind: str, dtype: DType) -> np.ndarray:
    """A numpy array over a host tensor's memory (no copy), bfloat16 as its int16 bits."""
    if kind == "numpy":
        return x
    t = x.detach()
    if dtype.name == "bfloat16":
        import torch

        t = t.view(torch.int16)
    return t.numpy()


def pinned_empty(n: int, dtype: DType, kind: str) -> np.ndarray:
    """Page-locked host memory for staging device data (fast, asynchronous-capable copies)."""
    if kind == "cupy":
        import cupyx

        return cupyx.empty_pinned((n,), dtype=dtype.storage)
    import torch

    t = torch.empty(n, dtype=torch.int16 if dtype.name == "bfloat16" else getattr(torch, dtype.name), pin_memory=True)
    return _host_view(t, "torch", dtype)


def _device_to_host(x: Any, kind: str, dtype: DType) -> np.ndarray:
    """Copy a GPU array to a fresh pinned 1-D host buffer, after the producing stream is done."""
    sync_device(x)
    host = pinned_empty(int(x.size if kind == "cupy" else x.numel()), dtype, kind)
    if kind == "cupy":
        import cupy

        cupy.ascontiguousarray(x).reshape(-1).get(out=host)
    else:
        import torch

        src = x.detach().contiguous().reshape(-1)
        if dtype.name == "bfloat16":
            src = src.view(torch.int16)
        torch.from_numpy(host).copy_(src)
    return host


def _contiguous(x: Any, kind: str) -> bool:
    """C-contiguity for numpy, torch or CuPy arrays."""
    return bool(x.is_contiguous()) if kind == "torch" else bool(x.flags.c_contiguous)


def to_flat(x: Any, copy: bool, dtype: DType | None = None, device_direct: bool | None = None) -> Flat:
    """Flatten `x` for MPI; with copy=False the result shares memory with a contiguous `x`."""
    kind = kind_of(x)
    dtype = dtype_of(x) if dtype is None else dtype
    shape = x.shape  # a tuple (torch.Size is one too)
    view = not copy and _contiguous(x, kind)  # else one gathering copy
    if kind == "numpy" or (kind == "torch" and not x.is_cuda):
        host = _host_view(x, kind, dtype)
        if view:
            data = host if host.ndim == 1 else host.reshape(-1)
        else:
            data = np.array(host, copy=True).reshape(-1)
        return Flat(data, kind, dtype, shape, x.device if kind == "torch" else None, False, view)
    device = x.device
    direct = cuda_aware() if device_direct is None else device_direct
    if not direct:
        return Flat(_device_to_host(x, kind, dtype), kind, dtype, shape, device, False, False)
    sync_device(x)
    if kind == "cupy":
        data = x.reshape(-1) if view else x.reshape(-1).copy()
    else:
        data = x.detach().reshape(-1) if view else x.detach().reshape(-1).clone()
        if dtype.name == "bfloat16":
            import torch

            data = data.view(torch.int16)  # MPI and the CUDA array interface know no bfloat16
    return Flat(data, kind, dtype, shape, device, True, view)


def to_result(flat: Flat, data: Any, shape: tuple[int, ...]) -> Any:
    """Wrap 1-D result `data` (host or device) as an object of the input's kind, device and dtype."""
    if flat.kind == "numpy":
        return data.reshape(shape)
    if flat.kind == "cupy":
        import cupy

        with cupy.cuda.Device(flat.device.id if hasattr(flat.device, "id") else flat.device):
            out = data if not isinstance(data, np.ndarray) else cupy.asarray(data)
            return out.reshape(shape)
    import torch

    if isinstance(data, np.ndarray):
        t = torch.from_numpy(data)
        if flat.dtype.name == "bfloat16":
            t = t.view(torch.bfloat16)
        t = t.to(flat.device) if flat.device is not None and flat.device.type != "cpu" else t
    else:
        t = data.view(torch.bfloat16) if flat.dtype.name == "bfloat16" and data.dtype == torch.int16 else data
    return t.reshape(shape)


def write_back(flat: Flat, x: Any) -> Any:
    """Put flat.data's values into `x` in place (a no-op when they share memory); return x."""
    if flat.is_view:
        return x
    if flat.kind == "numpy":
        x[...] = flat.data.reshape(x.shape)
        return x
    src = to_result(flat, flat.data, tuple(x.shape))
    if flat.kind == "cupy":
        x[...] = src
    else:
        x.copy_(src)
    return x
