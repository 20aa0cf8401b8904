"""Seeded client data partitioners (IID, Dirichlet label skew, FedAvg label shards) and their statistics.

Every partitioner returns one sorted int64 index array per client; no index appears twice.
Dirichlet skew follows Hsu et al. 2019; shards follow McMahan et al. 2017 (pathological non-IID).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np


def _check_clients(clients: int, num_samples: int) -> None:
    """Reject fewer than one client or more clients than samples."""
    if clients < 1:
        raise ValueError(f"clients must be >= 1, got {clients}")
    if clients > num_samples:
        raise ValueError(f"cannot split {num_samples} samples over {clients} clients")


def _labels(labels: np.ndarray) -> np.ndarray:
    """Validate a 1-D integer label array."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    return labels


def iid(num_samples: int, clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle all indices and split them into client parts whose sizes differ by at most one."""
    _check_clients(clients, num_samples)
    perm = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, clients)]


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int, min_size: int = 1,
              max_tries: int = 100) -> list[np.ndarray]:
    """Label skew: split each class over clients with proportions ~ Dir(alpha), resampling until all have min_size."""
    labels = _labels(labels)
    _check_clients(clients, len(labels))
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size < 0 or min_size * clients > len(labels):
        raise ValueError(f"min_size={min_size} per client is impossible with {len(labels)} samples "
                         f"and {clients} clients")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            props = rng.dirichlet(np.full(clients, alpha))
            # Cut points from the cumulative proportions; the last chunk takes the rounding remainder.
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ValueError(f"dirichlet(alpha={alpha}) gave some client fewer than {min_size} samples "
                     f"in {max_tries} tries; raise alpha or lower min_size/clients")


def shards(labels: np.ndarray, clients: int, shards_per_client: int = 2, seed: int = 0) -> list[np.ndarray]:
    """FedAvg pathological non-IID: sort by label, cut into clients*shards_per_client shards, deal them randomly."""
    labels = _labels(labels)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    _check_clients(clients, len(labels))
    num_shards = clients * shards_per_client
    if num_shards > len(labels):
        raise ValueError(f"cannot cut {len(labels)} samples into {num_shards} non-empty shards")
    # Shard sizes differ by at most one when len(labels) is not a multiple of num_shards (no sample dropped).
    pieces = np.array_split(np.argsort(labels, kind="stable"), num_shards)
    deal = np.random.default_rng(seed).permutation(num_shards).reshape(clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in deal]


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients, classes) matrix: how many samples of each class each client holds."""
    labels = _labels(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    rows = [np.bincount(labels[np.asarray(part, dtype=np.int64)], minlength=num_classes) for part in parts]
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=np.int64)


def stats(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> list[dict[str, Any]]:
    """Per-client size and label counts as JSON-friendly ints (classes with zero samples are omitted)."""
    return [{"client": i, "size": int(len(part)), "classes": {int(c): int(n) for c, n in enumerate(counts) if n > 0}}
            for i, (part, counts) in enumerate(zip(parts, class_counts(labels, parts, num_classes)))]


PARTITIONERS: dict[str, Callable[..., list[np.ndarray]]] = {"iid": iid, "dirichlet": dirichlet, "shards": shards}
