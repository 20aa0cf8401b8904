"""The element types dmlmpi collectives accept, and how each travels through MPI."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One supported element type: its name, a code for the guard, and its host storage."""

    name: str
    code: int
    storage: np.dtype  # host representation; bfloat16 travels as its raw 16 bits (int16)
    mpi_native: bool  # MPI reduces it itself (MPI has no 16-bit float types)
    floating: bool


DTYPES = {
    d.name: d
    for d in (
        DType("float16", 1, np.dtype(np.float16), False, True),
        DType("bfloat16", 2, np.dtype(np.int16), False, True),
        DType("float32", 3, np.dtype(np.float32), True, True),
        DType("float64", 4, np.dtype(np.float64), True, True),
        DType("int32", 5, np.dtype(np.int32), True, False),
        DType("int64", 6, np.dtype(np.int64), True, False),
    )
}
BY_CODE = {d.code: d for d in DTYPES.values()}
# tensors of any dtype moved (not reduced) as their raw bytes: fused broadcasts (fusion.broadcast_fused)
RAW_BYTES = DType("bytes", 7, np.dtype(np.uint8), True, False)


def lookup(name: str) -> DType:
    """The DType called `name`, or a TypeError listing the supported ones."""
    try:
        return DTYPES[name]
    except KeyError:
        raise TypeError(f"dmlmpi.comm: unsupported dtype {name!r}; supported: {', '.join(DTYPES)}") from None
