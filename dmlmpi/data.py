"""Datasets and the deterministic split of each global batch over ranks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from dmlmpi.comm.ring import chunk_bounds


@dataclass
class Dataset:
    """Train and test arrays in host memory."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def make_mnist1d(seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D generated offline by the mnist1d package (80% train, 20% test)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    return Dataset(d["x"].astype(np.float32), d["y"].astype(np.int64),
                   d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


def load_mnist1d(comm: MPI.Comm, seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D on every rank: rank 0 generates it (seconds of CPU) and broadcasts it."""
    data = make_mnist1d(seed, num_samples) if comm.Get_rank() == 0 else None
    return comm.bcast(data, root=0)  # pickled broadcast: ~1 MB, once per run


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of the n training samples in `epoch`: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batches(n: int, batch: int, epoch: int, seed: int, drop_last: bool = True) -> list[np.ndarray]:
    """Indices of each global batch of an epoch (every sample at most once; the tail kept unless drop_last)."""
    order = epoch_order(n, epoch, seed)
    stop = n - n % batch if drop_last else n
    return [order[i:i + batch] for i in range(0, stop, batch)]


def rank_share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (earlier ranks take one more on uneven splits)."""
    start, stop = chunk_bounds(len(batch), world)[rank]
    return batch[start:stop]
