"""Which all-reduce algorithm `auto` runs: pure functions of message size and world size.

Crossover points were measured with `python -m dmlmpi.bench allreduce` on the 2-core development
machine (Open MPI 5 wheel): native MPI_Allreduce wins small messages (one C call, latency-optimal
algorithms); the ring wins large ones (Open MPI maps a fresh temporary buffer per call and pays its
page faults; the ring reuses one chunk-sized buffer).
"""
from __future__ import annotations

# smallest message (bytes) for which `auto` takes the ring, by world size; sizes between entries use
# the nearest smaller world size (DMLMPI_RING_MIN_BYTES overrides the table). At 4 ranks, 16 MiB,
# the guard plus native beat the ring in four runs (10819 against 11067 us, 9663 against 10727,
# 10800 against 12023, 11226 against 11696); at 32 MiB the ring took 22479 and 23320 us against
# 29391 and 35648.
RING_MIN_BYTES = {2: 4 << 20, 4: 32 << 20, 8: 32 << 20}
# The same for reductions of 16-bit floats. MPI cannot add them, so the native path widens them to
# float32 (twice the bytes, two conversion passes: 2-5x float32's time), while the ring sends the
# 16 bits and adds them with torch at each step, as NCCL and gloo do. Measured crossover (bf16 and
# fp16 alike within a factor of two): 8-16 KiB at 2 ranks, 64-256 KiB at 4, 256 KiB-1 MiB at 8.
RING_MIN_BYTES_16BIT = {2: 16 << 10, 4: 128 << 10, 8: 512 << 10}
# Smallest buffer living in a dmlmpi shared-memory window (comm.shared_empty, DataParallel's buckets)
# that `auto` reduces in place with the "shm" algorithm (two barriers, no copies in or out);
# smaller ones go through the exchange area below like any host buffer. Measured with `bench
# allreduce --algorithms auto-shared,native`, DMLMPI_SHM_MIN_BYTES=1 (shm) against a huge value (the
# exchange), two runs each, microseconds: at 2 ranks 16 KiB 10 against 8, 32 KiB 10 against 11;
# at 4 ranks 64 KiB 58-62 against 50-51, 128 KiB 64-67 against 68; at 8 ranks 128 KiB 264-277
# against 245-334, 256 KiB 317-320 against 374-382.
SHM_MIN_BYTES = {2: 32 << 10, 4: 128 << 10, 8: 256 << 10}


# Largest private host message that `auto` all-reduces through the communicator's shared exchange
# area (exchange.py: the inputs meet in shared memory, in one barrier that is also the guard's
# check), and up to which every rank reduces the whole message rather than its share of the columns.
# Measured with `bench allreduce --algorithms auto,auto-noguard,mpi,native`, three runs per world
# size, as a share of native MPI_Allreduce's time (the guard on in `auto` and in `mpi`, which is
# the guard plus native): at 2 ranks 256 KiB 0.94-1.03x (mpi 1.05-1.11x); at 4 ranks 256 KiB
# 0.73-1.05x (mpi 1.16-1.23x), 1 MiB 0.99-1.04x (mpi 1.13-1.21x); at 8 ranks 1 MiB 0.95-1.03x (mpi
# 1.15-1.16x), 2 MiB 1.14-1.26x (mpi 1.12-1.18x: the exchange no longer wins). Whole against
# columns (prototype): 16 KiB 22.2 us against 27.7 at 4 ranks, 64 KiB 65.4 against 55.9. Each
# context keeps 2 x (ranks + 1) rows of this size (virtual memory; pages are used as rows are written).
EXCHANGE_BYTES = {2: 256 << 10, 4: 1 << 20, 8: 1 << 20}
EXCHANGE_WHOLE_BYTES = {2: 32 << 10, 4: 32 << 10, 8: 32 << 10}

# Largest share of rows (bytes one rank sends in all) that `auto` all-to-all posts in the exchange
# area for the other ranks to copy out (personalized.py), when every rank's fits in its row; larger
# blocks go by MPI_Alltoallv. `bench alltoall`, microseconds, auto (area) against mpi (Alltoallv),
# both with the guard and the counts through the area: at 2 ranks 8 KiB 12.9 against 14.5, 16 KiB
# 14.0 against 14.1, 32 KiB 15.1 against 14.7, 64 KiB 18.3 against 15.4; at 4 ranks 64 KiB 66.8
# against 81.5; at 8 ranks 64 KiB 239 against 313 (1 MiB does not fit a row at any size).
ALLTOALL_AREA_BYTES = {2: 16 << 10, 4: 1 << 20, 8: 1 << 20}


# The ring's reduce-scatter moves each step's chunk in pieces of this many bytes and adds each piece
# as it arrives, still in cache: at 2 ranks 16 MiB took 1513 us against 2185 in whole chunks (native
# 2135), at 4 ranks 6273 against 7182 (native 7815). With more than two ranks per core each extra
# message waits for its partner to be scheduled (8 ranks on 2 cores, 16 MiB: 27437 us against
# 23397), so there the steps stay whole.
RING_SEGMENT_BYTES = 256 << 10


def ring_segment_bytes(world: int, cores: int) -> int:
    """Piece size in bytes for the ring's reduce-scatter steps; 0 (whole chunks) when more than two ranks share a core."""
    return RING_SEGMENT_BYTES if world <= 2 * cores else 0


def ring_threshold(world: int, table: dict[int, int] | None = None) -> int:
    """Smallest message in bytes that `auto` sends through the ring on `world` ranks."""
    table = RING_MIN_BYTES if table is None else table
    fitting = [w for w in table if w <= world]
    return table[max(fitting)] if fitting else table[min(table)]


def choose_algorithm(nbytes: int, world: int, table: dict[int, int] | None = None,
                     override: int | None = None, widened: bool = False) -> str:
    """The algorithm `auto` runs for a message of `nbytes` on `world` ranks (widened: a 16-bit float reduction)."""
    if world == 1:
        return "mpi"
    if table is None:
        table = RING_MIN_BYTES_16BIT if widened else RING_MIN_BYTES
    threshold = ring_threshold(world, table) if override is None else override
    return "ring" if nbytes >= threshold else "mpi"
