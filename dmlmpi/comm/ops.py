"""Reduction operators: names, MPI equivalents, and element-wise kernels for numpy, torch and CuPy."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from mpi4py import MPI

from .dtypes import DType

OPS = ("sum", "avg", "min", "max", "prod")
OP_CODES = {name: i + 1 for i, name in enumerate(OPS)}
# avg is a sum followed by a division by the number of ranks
MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "min": MPI.MIN, "max": MPI.MAX, "prod": MPI.PROD}


def check_op(op: str) -> str:
    """Return `op` if it is a supported reduction, else raise ValueError."""
    if op not in OP_CODES:
        raise ValueError(f"dmlmpi.comm: unsupported op {op!r}; supported: {', '.join(OPS)}")
    return op


def torch_view(a: Any, dtype: DType) -> Any:
    """A torch tensor over numpy or torch storage, reinterpreting bfloat16 bits where needed."""
    import torch

    t = torch.from_numpy(a) if isinstance(a, np.ndarray) else a
    return t.view(torch.bfloat16) if dtype.name == "bfloat16" else t


# 16-bit floats in host memory are reduced by torch: numpy has no bfloat16, and its float16
# arithmetic is scalar (converting element by element) where torch's is vectorised; both compute in
# float32 and round back, so the bits are the same
_TORCH_HOST = frozenset({"float16", "bfloat16"})


def reduce_into(dst: Any, src: Any, op: str, dtype: DType) -> None:
    """dst = dst (op) src, element-wise and in place."""
    if isinstance(dst, np.ndarray) and dtype.name not in _TORCH_HOST:
        fn = {"sum": np.add, "avg": np.add, "min": np.minimum, "max": np.maximum, "prod": np.multiply}[op]
        fn(dst, src, out=dst)
        return
    if type(dst).__module__.startswith("cupy"):
        import cupy

        fn = {"sum": cupy.add, "avg": cupy.add, "min": cupy.minimum, "max": cupy.maximum, "prod": cupy.multiply}[op]
        fn(dst, src, out=dst)
        return
    # torch: CPU/CUDA tensors, and numpy storage of 16-bit floats
    import torch

    d, s = torch_view(dst, dtype), torch_view(src, dtype)
    fn2: Callable[..., Any] = {"sum": torch.add, "avg": torch.add, "min": torch.minimum,
                               "max": torch.maximum, "prod": torch.mul}[op]
    fn2(d, s, out=d)


def divide_in_place(a: Any, n: int, dtype: DType) -> None:
    """a /= n for the avg op: true division for floats, floor division for integers."""
    if n == 1:
        return
    if isinstance(a, np.ndarray) and dtype.name not in _TORCH_HOST:
        if dtype.floating:
            np.divide(a, a.dtype.type(n), out=a)
        else:
            np.floor_divide(a, n, out=a)
        return
    if type(a).__module__.startswith("cupy"):
        if dtype.floating:
            a /= n
        else:
            a //= n
        return
    t = torch_view(a, dtype)
    if dtype.floating:
        t.div_(n)
    else:
        t.floor_divide_(n)
