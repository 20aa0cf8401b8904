"""ProcessGrid: the ranks of a communicator arranged on named axes, one sub-communicator per axis.

    grid = ProcessGrid(comm, dp=2, pp=4)       # 8 ranks; the last axis varies fastest
    grid.comm("pp")                            # the 4 ranks of my pipeline (same dp coordinate)
    grid.comm("dp")                            # the 2 replicas of my stage (same pp coordinate)
    grid.rank("pp"), grid.size("dp"), grid.coords

Rank r has coordinates in row-major order (like Megatron's dp x pp layout, with pp neighbours on
consecutive ranks, so that a pipeline's stages share a node first). Each axis communicator is made
with one Comm.Split: color = the other coordinates, key = the coordinate on the axis.
"""
from __future__ import annotations

import math

from mpi4py import MPI


def coords_of(rank: int, shape: dict[str, int]) -> dict[str, int]:
    """Row-major coordinates of `rank` on a grid of `shape` (last axis fastest)."""
    out = {}
    for name in reversed(list(shape)):
        out[name] = rank % shape[name]
        rank //= shape[name]
    return {name: out[name] for name in shape}


class ProcessGrid:
    """Named axes over the ranks of `comm` (collective to create)."""

    def __init__(self, comm: MPI.Comm | None = None, **axes: int) -> None:
        world = MPI.COMM_WORLD if comm is None else comm
        if not axes:
            raise ValueError("ProcessGrid: give at least one axis, e.g. ProcessGrid(comm, dp=2, pp=4)")
        for name, n in axes.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"ProcessGrid: axis {name} must be a positive integer, got {n!r}")
        need = math.prod(axes.values())
        if need != world.Get_size():
            shape = " x ".join(f"{k}={v}" for k, v in axes.items())
            raise ValueError(f"ProcessGrid: a {shape} grid needs {need} ranks, but the communicator has "
                             f"{world.Get_size()}")
        self.shape = dict(axes)
        self.world = world
        self.coords = coords_of(world.Get_rank(), self.shape)
        self._comms: dict[str, MPI.Comm] = {}
        for name in self.shape:
            others = [self.coords[k] for k in self.shape if k != name]
            color = 0
            for k, c in zip([k for k in self.shape if k != name], others):
                color = color * self.shape[k] + c
            # split: ranks that agree on every other axis form this axis's communicator
            self._comms[name] = world.Split(color, self.coords[name])

    def comm(self, axis: str) -> MPI.Comm:
        """The communicator along `axis`."""
        if axis not in self._comms:
            raise KeyError(f"ProcessGrid has no axis {axis!r} (axes: {', '.join(self.shape)})")
        return self._comms[axis]

    def rank(self, axis: str) -> int:
        """This rank's coordinate on `axis`."""
        return self.coords[axis]

    def size(self, axis: str) -> int:
        """The length of `axis`."""
        return self.shape[axis]

    def free(self) -> None:
        """Free the axis communicators."""
        for c in self._comms.values():
            c.Free()
        self._comms.clear()
