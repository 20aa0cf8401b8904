"""Dataset loaders (MNIST IDX, CIFAR-10 binary, cached MNIST-1D), load_dataset, and DistributedSampler."""
from __future__ import annotations

import gzip
import os
import struct
from typing import Any

import numpy as np
import pytest
from mpi4py import MPI

from dmlmpi import data as dm
from dmlmpi.data import (DistributedSampler, epoch_batches, global_batches, load_cifar10, load_dataset,
                         load_mnist1d, load_mnist_idx)

WORLD = MPI.COMM_WORLD
# single-process tests of rank 0's own work use COMM_SELF, so they also hold inside a multi-rank run
SELF = MPI.COMM_SELF


# --- writers of small fake datasets ------------------------------------------------------------

def write_idx(path: str, magic: int, array: np.ndarray) -> str:
    """An IDX file of a uint8 array (gzipped if path ends in .gz)."""
    blob = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(blob)
    return path


def write_mnist(folder: str, n_train: int = 20, n_test: int = 10, seed: int = 0) -> dict[str, np.ndarray]:
    """The four MNIST files (training images and test labels gzipped, the others plain); returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  y_train=rng.integers(0, 10, n_train, dtype=np.uint8),
                  x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                  y_test=rng.integers(0, 10, n_test, dtype=np.uint8))
    arrays["x_train"][0, 0, :2] = (0, 255)  # the extremes, to check the scaling ends
    os.makedirs(folder, exist_ok=True)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte.gz"), dm.IDX_IMAGES, arrays["x_train"])
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte"), dm.IDX_LABELS, arrays["y_train"])
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte"), dm.IDX_IMAGES, arrays["x_test"])
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte.gz"), dm.IDX_LABELS, arrays["y_test"])
    return arrays


def write_cifar_batch(path: str, images: np.ndarray, labels: np.ndarray) -> None:
    """A CIFAR-10 binary batch: per record one label byte, then the 3x32x32 pixels channel-major."""
    records = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1).astype(np.uint8)
    records.tofile(path)


def write_cifar(folder: str, sizes: tuple[int, ...] = (7, 7), n_test: int = 5) -> dict[str, np.ndarray]:
    """Training batches data_batch_1.. of the given sizes and a test batch; returns the arrays."""
    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    xs, ys = [], []
    for i, n in enumerate(sizes, start=1):
        xs.append(rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
        ys.append(rng.integers(0, 10, n, dtype=np.uint8))
        write_cifar_batch(os.path.join(folder, f"data_batch_{i}.bin"), xs[-1], ys[-1])
    x_test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    y_test = rng.integers(0, 10, n_test, dtype=np.uint8)
    write_cifar_batch(os.path.join(folder, "test_batch.bin"), x_test, y_test)
    return dict(x_train=np.concatenate(xs), y_train=np.concatenate(ys), x_test=x_test, y_test=y_test)


def assert_matches(d: dm.Dataset, arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
    """Loaded data equals the written bytes: pixels / 255 as float32 in `shape`, labels as int64."""
    for split in ("train", "test"):
        x, y, raw = getattr(d, f"x_{split}"), getattr(d, f"y_{split}"), arrays[f"x_{split}"]
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.shape == (len(raw), *shape)
        assert np.array_equal(x, raw.reshape(x.shape).astype(np.float32) / np.float32(255))
        assert np.array_equal(y, arrays[f"y_{split}"].astype(np.int64))
        assert 0.0 <= x.min() and x.max() <= 1.0


# --- MNIST ------------------------------------------------------------------------------------

def test_load_mnist_idx_round_trip(tmp_path) -> None:
    arrays = write_mnist(str(tmp_path))
    d = load_mnist_idx(str(tmp_path))
    assert_matches(d, arrays, (784,))
    assert d.x_train[0, 0] == 0.0 and d.x_train[0, 1] == 1.0


def test_mnist_plain_file_preferred_over_gz(tmp_path) -> None:
    arrays = write_mnist(str(tmp_path))
    # a stale .gz next to a plain file: the plain one is read
    write_idx(str(tmp_path / "t10k-images-idx3-ubyte.gz"), dm.IDX_IMAGES, arrays["x_test"][:3])
    assert len(load_mnist_idx(str(tmp_path)).x_test) == 10


def test_mnist_bad_magic(tmp_path) -> None:
    arrays = write_mnist(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), dm.IDX_IMAGES, arrays["y_train"].reshape(20, 1, 1))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte: bad magic number 0x00000803, expected 0x00000801"):
        load_mnist_idx(str(tmp_path))


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_truncated(tmp_path, gz: bool) -> None:
    write_mnist(str(tmp_path))
    name = "train-images-idx3-ubyte.gz" if gz else "t10k-images-idx3-ubyte"  # as write_mnist stores them
    blob = dm._read_bytes(str(tmp_path / name))[:-100]  # the IDX data itself is cut short
    with (gzip.open if gz else open)(str(tmp_path / name), "wb") as f:
        f.write(blob)
    with pytest.raises(ValueError, match=rf"{name}: truncated: {len(blob)} bytes"):
        load_mnist_idx(str(tmp_path))


def test_mnist_truncated_header_and_gzip_stream(tmp_path) -> None:
    write_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: truncated: 3 bytes, shorter than"):
        load_mnist_idx(str(tmp_path))
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-30])  # the gzip stream itself is cut off
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz: not a readable gzip file"):
        load_mnist_idx(str(tmp_path))


def test_mnist_count_mismatch(tmp_path) -> None:
    arrays = write_mnist(str(tmp_path))
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), dm.IDX_LABELS, arrays["y_train"][:19])
    with pytest.raises(ValueError, match=r"count mismatch: .*train-images-idx3-ubyte.gz holds 20 images, "
                                         r".*train-labels-idx1-ubyte 19 labels"):
        load_mnist_idx(str(tmp_path))


def test_mnist_missing_file_and_dir(tmp_path) -> None:
    write_mnist(str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found; .*train-images-idx3-ubyte"):
        load_mnist_idx(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; .*t10k-images-idx3-ubyte"):
        load_mnist_idx(str(tmp_path / "nowhere"))


# --- CIFAR-10 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-bin"])
def test_load_cifar10_round_trip(tmp_path, subdir: str) -> None:
    arrays = write_cifar(str(tmp_path / subdir))
    d = load_cifar10(str(tmp_path))
    assert_matches(d, arrays, (3, 32, 32))
    assert len(d.x_train) == 14 and len(d.x_test) == 5


def test_cifar_channel_major(tmp_path) -> None:
    images = np.zeros((1, 3, 32, 32), np.uint8)
    images[0, 2, 0, 1] = 255  # blue channel, row 0, column 1: record byte 1 + 2*1024 + 1
    write_cifar_batch(str(tmp_path / "data_batch_3.bin"), images, np.array([7], np.uint8))
    write_cifar_batch(str(tmp_path / "test_batch.bin"), images, np.array([2], np.uint8))
    assert (tmp_path / "data_batch_3.bin").read_bytes()[1 + 2 * 1024 + 1] == 255
    d = load_cifar10(str(tmp_path))  # any subset of the training batches will do
    assert d.x_train[0, 2, 0, 1] == 1.0 and d.x_train.sum() == 1.0 and d.y_train.tolist() == [7]


def test_cifar_bad_length(tmp_path) -> None:
    write_cifar(str(tmp_path))
    with open(tmp_path / "data_batch_2.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"data_batch_2.bin: 21512 bytes is not a whole.*3073-byte records"):
        load_cifar10(str(tmp_path))


def test_cifar_missing_files_and_dir(tmp_path) -> None:
    write_cifar(str(tmp_path))
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"test_batch.bin not found; expected data_batch_1.bin"):
        load_cifar10(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no CIFAR-10 training batch in .*empty; expected"):
        load_cifar10(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist; .*test_batch.bin"):
        load_cifar10(str(tmp_path / "nowhere"))


# --- load_dataset and errors on rank 0 ----------------------------------------------------------

def test_load_dataset_dispatch(tmp_path) -> None:
    arrays = write_mnist(str(tmp_path / "mnist"))
    write_cifar(str(tmp_path / "cifar"))
    assert_matches(load_dataset("mnist", SELF, str(tmp_path / "mnist"), 0, 0), arrays, (784,))
    assert load_dataset("cifar10", SELF, str(tmp_path / "cifar"), 0, 0).x_test.shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match=r"--data-dir"):
        load_dataset("cifar10", SELF, None, 0, 0)
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of: mnist1d, mnist, cifar10"):
        load_dataset("imagenet", SELF, str(tmp_path), 0, 0)


class FakeComm:
    """One rank of a 2-rank world whose bcast hands rank 0's object to rank 1 through `box`."""

    def __init__(self, rank: int, box: list[Any]) -> None:
        self.rank, self.box = rank, box

    def Get_rank(self) -> int:
        return self.rank

    def Get_size(self) -> int:
        return 2

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.rank == root:
            self.box.append(obj)
        return self.box[-1]


def test_error_on_rank_0_is_raised_on_every_rank(tmp_path) -> None:
    box: list[Any] = []
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as on_root:
        load_dataset("mnist", FakeComm(0, box), missing, 0, 0)
    assert len(box) == 1  # rank 0 still broadcast: the others are not left waiting
    with pytest.raises(FileNotFoundError) as on_peer:
        load_dataset("mnist", FakeComm(1, box), missing, 0, 0)
    assert str(on_peer.value) == str(on_root.value)


def test_unpicklable_error_becomes_runtime_error() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:  # unpickling calls Odd(*args): one argument short
            super().__init__(f"{a}/{b}")

    def fail() -> None:
        raise Odd(1, 2)

    box: list[Any] = []
    with pytest.raises(Odd):
        dm._from_root(FakeComm(0, box), fail)
    with pytest.raises(RuntimeError, match=r"on rank 0: Odd: 1/2"):
        dm._from_root(FakeComm(1, box), fail)


@pytest.mark.mpi
def test_load_dataset_on_every_rank(tmp_path) -> None:
    """Several ranks: rank 0 reads and every rank gets the same data, or the same error."""
    folder = WORLD.bcast(str(tmp_path / "mnist") if WORLD.Get_rank() == 0 else None, root=0)
    if WORLD.Get_rank() == 0:
        write_mnist(folder, n_train=6, n_test=4)
    WORLD.Barrier()
    d = load_dataset("mnist", WORLD, folder, 0, 0)
    assert_matches(d, write_mnist(str(tmp_path / "mine"), n_train=6, n_test=4), (784,))
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_dataset("cifar10", WORLD, folder + "-nowhere", 0, 0)


# --- MNIST-1D cache -------------------------------------------------------------------------------

def fake_mnist1d(seed: int = 42, num_samples: int = 5000) -> dm.Dataset:
    """A stand-in generator: quick, and different for each (seed, num_samples)."""
    rng = np.random.default_rng([seed, num_samples])
    n = num_samples * 4 // 5
    return dm.Dataset(rng.normal(size=(n, 40)).astype(np.float32), rng.integers(0, 10, n),
                      rng.normal(size=(num_samples - n, 40)).astype(np.float32), rng.integers(0, 10, num_samples - n))


def assert_same(a: dm.Dataset, b: dm.Dataset) -> None:
    """Identical arrays, dtypes included."""
    for name in ("x_train", "y_train", "x_test", "y_test"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and np.array_equal(x, y)


def test_mnist1d_cache_is_written_then_read(tmp_path, monkeypatch) -> None:
    first = load_mnist1d(SELF, seed=3, num_samples=500, cache_dir=str(tmp_path))  # the real generator
    assert first.x_train.shape == (400, 40) and first.x_train.dtype == np.float32 and first.y_test.dtype == np.int64
    assert os.listdir(tmp_path) == ["mnist1d-seed3-n500.npz"]  # and no temp file left behind

    def no_generation(*args: Any) -> dm.Dataset:
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(dm, "make_mnist1d", no_generation)
    assert_same(load_mnist1d(SELF, seed=3, num_samples=500, cache_dir=str(tmp_path)), first)


def test_mnist1d_cache_default_dir_from_env(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dm, "make_mnist1d", fake_mnist1d)
    monkeypatch.setenv("DMLMPI_CACHE", str(tmp_path / "cache"))
    d = load_dataset("mnist1d", SELF, None, 5, 100)
    assert os.path.isfile(tmp_path / "cache" / "mnist1d-seed5-n100.npz")
    assert_same(d, fake_mnist1d(5, 100))
    monkeypatch.delenv("DMLMPI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.default_cache_dir() == str(tmp_path / "home" / ".cache" / "dmlmpi")


def test_mnist1d_unwritable_cache_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dm, "make_mnist1d", fake_mnist1d)
    (tmp_path / "file").write_text("not a directory")  # unwritable even for root, unlike chmod
    with pytest.warns(RuntimeWarning, match=r"not caching MNIST-1D in .*file"):
        d = load_mnist1d(SELF, 1, 100, cache_dir=str(tmp_path / "file" / "cache"))
    assert_same(d, fake_mnist1d(1, 100))


def test_mnist1d_corrupt_cache_is_regenerated(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dm, "make_mnist1d", fake_mnist1d)
    path = tmp_path / "mnist1d-seed2-n100.npz"
    path.write_bytes(b"PK\x03\x04 half a zip file")
    with pytest.warns(RuntimeWarning, match=r"ignoring unreadable cache file"):
        d = load_mnist1d(SELF, 2, 100, cache_dir=str(tmp_path))
    assert_same(d, fake_mnist1d(2, 100))
    assert_same(dm._read_cached(str(path)), d)  # and rewritten whole


# --- DistributedSampler -----------------------------------------------------------------------------

SIZES = [(103, 10), (100, 10), (7, 4), (5, 8), (0, 4)]


def epoch_global_batches(n: int, batch: int, world: int, tail: str, seed: int = 7, epoch: int = 0) -> list[np.ndarray]:
    """One epoch's global batches, rebuilt by concatenating every rank's shares in rank order."""
    per_rank = []
    for rank in range(world):
        s = DistributedSampler(n, batch, rank, world, seed, tail)
        s.set_epoch(epoch)
        per_rank.append(list(s))
        assert len(per_rank[-1]) == len(s)
    for shares in zip(*per_rank):
        sizes = [len(x) for x in shares]
        assert sizes == sorted(sizes, reverse=True) and sizes[0] - sizes[-1] <= 1  # earlier ranks one more
    return [np.concatenate(shares) for shares in zip(*per_rank)]


@pytest.mark.parametrize("n, batch", SIZES)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_tails(n: int, batch: int, world: int) -> None:
    if batch < world:
        pytest.skip("global batch smaller than the world is rejected")
    keep = epoch_global_batches(n, batch, world, "keep")
    flat = np.concatenate(keep) if keep else np.array([], int)
    assert sorted(flat.tolist()) == list(range(n))  # every sample exactly once
    assert len(keep) == -(-n // batch)

    pad = epoch_global_batches(n, batch, world, "pad")
    assert len(pad) == len(keep) and all(len(b) == batch for b in pad)  # every batch full
    assert set(np.concatenate(pad).tolist() if pad else []) == set(range(n))  # every sample at least once

    drop = epoch_global_batches(n, batch, world, "drop")
    flat = np.concatenate(drop).tolist() if drop else []
    assert len(drop) == n // batch and all(len(b) == batch for b in drop)
    assert len(set(flat)) == len(flat)  # every sample at most once


@pytest.mark.parametrize("tail", dm.TAILS)
def test_sampler_same_order_on_any_world_size(tail: str) -> None:
    single = epoch_global_batches(103, 12, 1, tail, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(single, epoch_batches(103, 12, 2, 7, tail)))
    for world in (2, 3, 4):
        batches = epoch_global_batches(103, 12, world, tail, epoch=2)
        assert len(batches) == len(single) and all(np.array_equal(a, b) for a, b in zip(batches, single))


def test_sampler_drop_matches_train_batches() -> None:
    """tail="drop" is what dmlmpi.train takes today: global_batches + rank_share."""
    s = DistributedSampler(103, 10, 1, 3, seed=4)
    s.set_epoch(5)
    expected = [dm.rank_share(b, 1, 3) for b in global_batches(103, 10, 5, 4)]
    assert all(np.array_equal(a, b) for a, b in zip(list(s), expected)) and len(expected) == 10


def test_sampler_pad_wraps_to_start_of_same_order() -> None:
    order = dm.epoch_order(23, 0, 7)
    last = epoch_global_batches(23, 10, 2, "pad")[-1]
    assert last.tolist() == order[20:].tolist() + order[:7].tolist()
    tiny = epoch_global_batches(3, 8, 2, "pad")  # fewer samples than a batch: the order cycles
    assert tiny[0].tolist() == np.resize(dm.epoch_order(3, 0, 7), 8).tolist()


def test_sampler_epochs_differ_and_advance() -> None:
    s = DistributedSampler(50, 10, 0, 1, seed=1, tail="keep")
    e0, e1 = np.concatenate(list(s)), np.concatenate(list(s))  # a finished epoch moves on to the next
    assert not np.array_equal(e0, e1) and s.epoch == 2
    s.set_epoch(1)
    assert np.array_equal(np.concatenate(list(s)), e1)
    assert not np.array_equal(e0, np.concatenate(list(DistributedSampler(50, 10, 0, 1, seed=2, tail="keep"))))


@pytest.mark.parametrize("tail", dm.TAILS)
def test_sampler_resume_mid_epoch(tail: str) -> None:
    full = epoch_global_batches(103, 10, 1, tail, epoch=3)
    s = DistributedSampler(103, 10, 0, 1, seed=7, tail=tail)
    s.set_epoch(3)
    it = iter(s)
    for _ in range(4):
        next(it)  # four steps taken, then the job stops
    state = s.state_dict()
    assert state["epoch"] == 3 and state["next_batch"] == 4
    for world in (1, 3):  # resume at the same or another world size
        resumed = [DistributedSampler(103, 10, r, world, seed=7, tail=tail) for r in range(world)]
        rest = []
        for r in resumed:
            r.load_state_dict(state)
            r.set_epoch(3)  # the training loop's own call: stays in place
            rest.append(list(r))
        got = [np.concatenate(shares) for shares in zip(*rest)]
        assert len(got) == len(full) - 4 and all(np.array_equal(a, b) for a, b in zip(got, full[4:]))
        assert resumed[0].state_dict()["epoch"] == 4 and resumed[0].next_batch == 0


def test_sampler_state_checks() -> None:
    s = DistributedSampler(103, 10, 0, 2, seed=7)
    s.load_state_dict({"epoch": 2, "next_batch": 10})  # only the position is required
    assert list(s) == [] and s.epoch == 3
    with pytest.raises(ValueError, match=r"global_batch=20, this sampler 10"):
        s.load_state_dict(DistributedSampler(103, 20, 0, 2, seed=7).state_dict())
    with pytest.raises(ValueError, match=r"out of range: epoch 0, next_batch 11 of 10"):
        s.load_state_dict({"epoch": 0, "next_batch": 11})
    s.load_state_dict({"epoch": 1, "next_batch": 5})
    s.set_epoch(0)  # another epoch: back to its start
    assert s.state_dict()["next_batch"] == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch=2, world=3, rank=0), r"global_batch 2 is smaller than world 3"),
    (dict(rank=4, world=4), r"rank 4 is not in range\(0, 4\)"),
    (dict(rank=-1), r"rank -1 is not in range"),
    (dict(world=0, rank=0), r"world must be >= 1"),
    (dict(tail="wrap"), r"tail must be one of drop, keep, pad, got 'wrap'"),
    (dict(num_samples=-1), r"num_samples must be >= 0"),
    (dict(seed=-3), r"seed must be >= 0"),
])
def test_sampler_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args = dict(num_samples=10, global_batch=4, rank=0, world=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        DistributedSampler(**args)
    with pytest.raises(ValueError, match=r"epoch must be >= 0"):
        DistributedSampler(10, 4, 0, 2, 0).set_epoch(-1)
