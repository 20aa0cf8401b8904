"""Datasets (MNIST-1D, MNIST, CIFAR-10) and the deterministic split of each global batch over ranks."""
from __future__ import annotations

import contextlib
import gzip
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
from mpi4py import MPI

from dmlmpi.comm.ring import chunk_bounds

T = TypeVar("T")


@dataclass
class Dataset:
    """Train and test arrays in host memory."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


# ---------------------------------------------------------------------------------------------
# Rank 0 reads, every rank gets the result (or the error)
# ---------------------------------------------------------------------------------------------

def _portable(exc: BaseException) -> BaseException:
    """exc itself if it survives a pickle round trip (what bcast does to it), else a RuntimeError saying what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # e.g. a custom exception whose __init__ needs more than its args
        return RuntimeError(f"on rank 0: {type(exc).__name__}: {exc}")


def _from_root(comm: MPI.Comm, produce: Callable[[], T]) -> T:
    """produce() on rank 0, broadcast to every rank; an exception there is raised on every rank."""
    if comm.Get_size() == 1:
        return produce()  # nothing to send: skip bcast's pickle round trip of the whole dataset
    result, error = None, None
    if comm.Get_rank() == 0:
        try:
            result = produce()
        except Exception as exc:  # caught so that the bcast below still happens: no rank is left waiting
            error = exc
    sent_error, result = comm.bcast((None if error is None else _portable(error), result), root=0)
    if error is not None:
        raise error  # rank 0 keeps its own exception, traceback included
    if sent_error is not None:
        raise sent_error
    return result


# ---------------------------------------------------------------------------------------------
# MNIST-1D, generated and cached
# ---------------------------------------------------------------------------------------------

def make_mnist1d(seed: int = 42, num_samples: int = 5000) -> Dataset:
    """MNIST-1D generated offline by the mnist1d package (80% train, 20% test)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    d = make_dataset(args)
    return Dataset(d["x"].astype(np.float32), d["y"].astype(np.int64),
                   d["x_test"].astype(np.float32), d["y_test"].astype(np.int64))


def default_cache_dir() -> str:
    """Where generated datasets are cached: $DMLMPI_CACHE, else ~/.cache/dmlmpi."""
    return os.path.expanduser(os.environ.get("DMLMPI_CACHE") or os.path.join("~", ".cache", "dmlmpi"))


def mnist1d_cache_path(cache_dir: str, seed: int, num_samples: int) -> str:
    """The cache file of one MNIST-1D generation."""
    return os.path.join(cache_dir, f"mnist1d-seed{seed}-n{num_samples}.npz")


def _read_cached(path: str) -> Dataset | None:
    """The Dataset saved at path, or None if there is none or it cannot be read."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path) as f:
            return Dataset(*(f[field.name] for field in fields(Dataset)))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"dmlmpi: ignoring unreadable cache file {path} ({exc}); regenerating it", RuntimeWarning)
        return None


def _write_cached(path: str, data: Dataset) -> None:
    """Save data at path atomically; if that is impossible, warn and go on without a cache."""
    directory, tmp = os.path.dirname(path), None
    try:
        os.makedirs(directory, exist_ok=True)
        # a unique temp file in the same directory, then one rename: a reader (or a second job
        # writing the same file) never sees half a file, and the rename cannot cross filesystems
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
        os.fchmod(fd, 0o644)  # mkstemp makes it 0600; a cache is worth sharing
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **vars(data))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"dmlmpi: not caching MNIST-1D in {directory} ({exc})", RuntimeWarning)
        if tmp is not None:
            with contextlib.suppress(OSError):  # already gone, or the directory broke under us
                os.remove(tmp)


def cached_mnist1d(seed: int, num_samples: int, cache_dir: str | None = None) -> Dataset:
    """MNIST-1D from the cache file if there is one, else generated and written to the cache."""
    path = mnist1d_cache_path(cache_dir or default_cache_dir(), seed, num_samples)
    data = _read_cached(path)
    if data is None:
        data = make_mnist1d(seed, num_samples)
        _write_cached(path, data)
    return data


def load_mnist1d(comm: MPI.Comm, seed: int = 42, num_samples: int = 5000, cache_dir: str | None = None) -> Dataset:
    """MNIST-1D on every rank: rank 0 reads its cache (or generates and caches it) and broadcasts it."""
    return _from_root(comm, lambda: cached_mnist1d(seed, num_samples, cache_dir))  # pickled bcast, ~1 MB at 5000


# ---------------------------------------------------------------------------------------------
# Real data: MNIST (IDX files) and CIFAR-10 (binary version)
# ---------------------------------------------------------------------------------------------

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801  # 0x08: unsigned bytes; last byte: number of dims
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR_SUBDIR = "cifar-10-batches-bin"
CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
CIFAR_TEST = "test_batch.bin"
CIFAR_SHAPE = (3, 32, 32)
CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the pixels channel by channel


def _require_dir(data_dir: str, expected: str) -> None:
    """FileNotFoundError unless data_dir is a directory."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist; expected it to hold {expected}")


def _read_bytes(path: str) -> bytes:
    """The contents of path, gunzipped when it ends in .gz."""
    if not path.endswith(".gz"):
        with open(path, "rb") as f:
            return f.read()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:  # cut-off stream, not gzip at all, corrupt data
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from exc


def parse_idx(path: str, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (optionally .gz), checked against the expected magic number and its size."""
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated: {len(raw)} bytes, shorter than the {header}-byte IDX header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        kind = "images" if magic == IDX_IMAGES else "labels"
        raise ValueError(f"{path}: bad magic number 0x{found:08x}, expected 0x{magic:08x} (IDX {kind})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])  # big-endian sizes
    count = int(np.prod(dims))
    if len(raw) != header + count:
        problem = "truncated" if len(raw) < header + count else "too long"
        raise ValueError(f"{path}: {problem}: {len(raw)} bytes, but its header (dims {dims}) "
                         f"needs {header + count}")
    return np.frombuffer(raw, np.uint8, count, header).reshape(dims)


def _find_mnist_file(data_dir: str, name: str) -> str:
    """The path of an MNIST file, plain or gzipped."""
    for candidate in (name, name + ".gz"):
        path = os.path.join(data_dir, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{os.path.join(data_dir, name)}[.gz] not found; an MNIST directory holds "
                            f"{', '.join(MNIST_FILES)} (each optionally .gz)")


def _read_mnist_split(data_dir: str, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images as (N, rows*cols), uint8 labels) of one split, with matching counts."""
    images_path = _find_mnist_file(data_dir, images_name)
    labels_path = _find_mnist_file(data_dir, labels_name)
    images, labels = parse_idx(images_path, IDX_IMAGES), parse_idx(labels_path, IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"image/label count mismatch: {images_path} holds {len(images)} images, "
                         f"{labels_path} {len(labels)} labels")
    return images.reshape(len(images), -1), labels


def _read_mnist_raw(data_dir: str) -> Dataset:
    """MNIST as read: uint8 pixels and labels."""
    _require_dir(data_dir, f"the MNIST IDX files {', '.join(MNIST_FILES)} (each optionally .gz)")
    x_train, y_train = _read_mnist_split(data_dir, *MNIST_FILES[:2])
    x_test, y_test = _read_mnist_split(data_dir, *MNIST_FILES[2:])
    return Dataset(x_train, y_train, x_test, y_test)


def _cifar_dir(data_dir: str) -> str:
    """data_dir, or its cifar-10-batches-bin/ subfolder (the official archive's layout) when the files are there."""
    names = CIFAR_TRAIN + (CIFAR_TEST,)
    if any(os.path.isfile(os.path.join(data_dir, n)) for n in names):
        return data_dir
    sub = os.path.join(data_dir, CIFAR_SUBDIR)
    return sub if os.path.isdir(sub) else data_dir


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (N, 3, 32, 32), uint8 labels) of one CIFAR-10 binary batch file."""
    size = os.path.getsize(path)
    if size == 0 or size % CIFAR_RECORD:
        raise ValueError(f"{path}: {size} bytes is not a whole, non-zero number of {CIFAR_RECORD}-byte records "
                         f"(1 label byte + 3x32x32 pixels); is it the CIFAR-10 binary version?")
    records = np.fromfile(path, np.uint8).reshape(-1, CIFAR_RECORD)
    return records[:, 1:].reshape(-1, *CIFAR_SHAPE), records[:, 0]


def _read_cifar10_raw(data_dir: str) -> Dataset:
    """CIFAR-10 as read: uint8 pixels and labels, training batches in order."""
    expected = f"{', '.join(CIFAR_TRAIN)} (at least one) and {CIFAR_TEST}, directly or in {CIFAR_SUBDIR}/"
    _require_dir(data_dir, expected)
    where = _cifar_dir(data_dir)
    train = [os.path.join(where, n) for n in CIFAR_TRAIN if os.path.isfile(os.path.join(where, n))]
    test = os.path.join(where, CIFAR_TEST)
    if not train:
        raise FileNotFoundError(f"no CIFAR-10 training batch in {where}; expected {expected}")
    if not os.path.isfile(test):
        raise FileNotFoundError(f"{test} not found; expected {expected}")
    parts = [_read_cifar_batch(p) for p in train]
    x_test, y_test = _read_cifar_batch(test)
    return Dataset(np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]),
                   x_test.copy(), y_test.copy())  # copies: views would keep the whole file's records alive


def _scaled(raw: Dataset) -> Dataset:
    """uint8 pixels as float32 in [0, 1], labels as int64."""
    def unit(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32)
        out /= 255  # in place: one float32 copy of the images, not two
        return out

    return Dataset(unit(raw.x_train), raw.y_train.astype(np.int64), unit(raw.x_test), raw.y_test.astype(np.int64))


def load_mnist_idx(data_dir: str) -> Dataset:
    """MNIST from its four IDX files (optionally .gz): pixels float32 in [0, 1] as (N, 784), labels int64."""
    return _scaled(_read_mnist_raw(data_dir))


def load_cifar10(data_dir: str) -> Dataset:
    """CIFAR-10 from its binary batches: pixels float32 in [0, 1] as (N, 3, 32, 32), labels int64."""
    return _scaled(_read_cifar10_raw(data_dir))


_RAW_READERS: dict[str, Callable[[str], Dataset]] = {"mnist": _read_mnist_raw, "cifar10": _read_cifar10_raw}
DATASETS = ("mnist1d",) + tuple(_RAW_READERS)


def load_dataset(name: str, comm: MPI.Comm, data_dir: str | None, seed: int, num_samples: int) -> Dataset:
    """The named dataset on every rank, read (mnist, cifar10) or generated (mnist1d: seed, num_samples) on rank 0."""
    # argument errors are raised before any communication: every rank has the same arguments
    if name == "mnist1d":
        return load_mnist1d(comm, seed, num_samples)
    if name not in _RAW_READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if not data_dir:
        raise ValueError(f"dataset {name!r} is read from files: --data-dir DIR (the directory holding them) is needed")
    # broadcast the bytes as read and scale on every rank: a quarter of the float32 traffic and memory
    return _scaled(_from_root(comm, lambda: _RAW_READERS[name](data_dir)))


# ---------------------------------------------------------------------------------------------
# Sample order and its split over ranks
# ---------------------------------------------------------------------------------------------

TAILS = ("drop", "keep", "pad")


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """The order of the n training samples in `epoch`: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_batches(n: int, batch: int, epoch: int, seed: int, tail: str = "drop") -> list[np.ndarray]:
    """Each global batch of an epoch: consecutive slices of epoch_order, the short last one dropped, kept or padded.

    "pad" completes the last batch by wrapping around to the start of the same order, so every
    sample is seen at least once and every batch is full.
    """
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
    order = epoch_order(n, epoch, seed)
    full, rest = divmod(n, batch)
    batches = [order[i * batch:(i + 1) * batch] for i in range(full)]
    if rest and tail == "keep":
        batches.append(order[full * batch:])
    elif rest and tail == "pad":
        # mode="wrap" keeps cycling through the order, which also covers n < batch
        batches.append(order.take(np.arange(full * batch, (full + 1) * batch), mode="wrap"))
    return batches


def global_batches(n: int, batch: int, epoch: int, seed: int, drop_last: bool = True) -> list[np.ndarray]:
    """Indices of each global batch of an epoch (every sample at most once; the tail kept unless drop_last)."""
    return epoch_batches(n, batch, epoch, seed, "drop" if drop_last else "keep")


def rank_share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a global batch (earlier ranks take one more on uneven splits)."""
    start, stop = chunk_bounds(len(batch), world)[rank]
    return batch[start:stop]


class DistributedSampler:
    """This rank's share of each global batch, epoch after epoch, resumable mid-epoch.

    The ranks' shares, concatenated in rank order, are the global batches of epoch_batches whatever
    the world size: N-rank training sees exactly the batches of single-process training, and a
    state saved at one world size resumes at another. Iterating to the end of an epoch moves the
    sampler on to the next one, so a loop that never calls set_epoch still gets a new order.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world: int, seed: int,
                 tail: str = "drop") -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in range(0, {world})")
        if global_batch < world:
            raise ValueError(f"global_batch {global_batch} is smaller than world {world}: "
                             "some ranks would get no samples")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
        if tail not in TAILS:
            raise ValueError(f"tail must be one of {', '.join(TAILS)}, got {tail!r}")
        self.num_samples, self.global_batch, self.seed, self.tail = num_samples, global_batch, seed, tail
        self.rank, self.world = rank, world
        self.epoch, self.next_batch = 0, 0

    def __len__(self) -> int:
        """Global batches per epoch (this rank yields one share of each)."""
        full, rest = divmod(self.num_samples, self.global_batch)
        return full + (1 if rest and self.tail != "drop" else 0)

    def set_epoch(self, epoch: int) -> None:
        """Go to the start of `epoch`; a sampler already in that epoch (e.g. just restored) keeps its place."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        # keeping the place is what lets `load_state_dict(s); for e in range(s["epoch"], E): set_epoch(e)` resume
        if epoch != self.epoch:
            self.epoch, self.next_batch = epoch, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        """This rank's indices of each remaining global batch of the current epoch, in order."""
        batches = epoch_batches(self.num_samples, self.global_batch, self.epoch, self.seed, self.tail)
        for i in range(self.next_batch, len(batches)):
            # counted as taken when handed out: a state saved after this batch's step resumes after it
            self.next_batch = i + 1
            yield rank_share(batches[i], self.rank, self.world)
        self.epoch, self.next_batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler stands (epoch, next global batch), and the settings that give it meaning."""
        return dict(epoch=self.epoch, next_batch=self.next_batch, num_samples=self.num_samples,
                    global_batch=self.global_batch, seed=self.seed, tail=self.tail)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict (of any world size); settings in it must match this sampler's."""
        for key in ("num_samples", "global_batch", "seed", "tail"):
            # a position counted in batches of another size or order would silently mean other samples
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r}, this sampler {getattr(self, key)!r}")
        epoch, next_batch = int(state["epoch"]), int(state["next_batch"])
        if epoch < 0 or not 0 <= next_batch <= len(self):
            raise ValueError(f"sampler state out of range: epoch {epoch}, next_batch {next_batch} of {len(self)}")
        self.epoch, self.next_batch = epoch, next_batch
