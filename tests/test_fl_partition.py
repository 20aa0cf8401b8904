"""Seeded federated data partitioners and their statistics (pure numpy, no MPI)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from dmlmpi.federated import partition as P

LABELS = np.repeat(np.arange(10), 100)  # 10 classes x 100 samples


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def dominant_fraction(parts: list[np.ndarray]) -> np.ndarray:
    return np.array([np.bincount(LABELS[p], minlength=10).max() / len(p) for p in parts])


def test_iid_even_exact_and_seeded() -> None:
    parts = P.iid(10, 3, seed=0)
    assert [len(p) for p in parts] == [4, 3, 3]
    assert_exact_cover(parts, 10)
    assert same(parts, P.iid(10, 3, seed=0))
    assert not same(parts, P.iid(10, 3, seed=1))
    assert_exact_cover(P.iid(5, 5, seed=3), 5)


def test_iid_errors() -> None:
    with pytest.raises(ValueError, match="clients must be >= 1"):
        P.iid(10, 0, seed=0)
    with pytest.raises(ValueError, match="11 clients"):
        P.iid(10, 11, seed=0)


@pytest.mark.parametrize("alpha", [0.05, 1.0, 1000.0])
def test_dirichlet_exact_cover_and_seeded(alpha: float) -> None:
    parts = P.dirichlet(LABELS, 10, alpha, seed=7)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 1
    assert_exact_cover(parts, len(LABELS))
    assert same(parts, P.dirichlet(LABELS, 10, alpha, seed=7))
    assert not same(parts, P.dirichlet(LABELS, 10, alpha, seed=8))


def test_dirichlet_small_alpha_skews_large_alpha_uniform() -> None:
    for seed in range(3):
        skewed = dominant_fraction(P.dirichlet(LABELS, 10, 0.05, seed=seed))
        uniform = dominant_fraction(P.dirichlet(LABELS, 10, 1000.0, seed=seed))
        # small alpha: a client's biggest class is on average a large share of its data;
        # large alpha: every class is close to 1/10 of every client
        assert skewed.mean() > 0.45
        assert uniform.max() < 0.15


def test_dirichlet_min_size_and_errors() -> None:
    parts = P.dirichlet(LABELS, 5, 1.0, seed=0, min_size=100)
    assert min(len(p) for p in parts) >= 100
    assert_exact_cover(parts, len(LABELS))
    with pytest.raises(ValueError, match="alpha"):
        P.dirichlet(LABELS, 5, 0.0, seed=0)
    with pytest.raises(ValueError, match="clients must be >= 1"):
        P.dirichlet(LABELS, 0, 1.0, seed=0)
    with pytest.raises(ValueError, match="1001 clients"):
        P.dirichlet(LABELS, 1001, 1.0, seed=0)
    with pytest.raises(ValueError, match="min_size"):
        P.dirichlet(LABELS, 10, 1.0, seed=0, min_size=101)
    # two classes, tiny alpha: each class lands almost whole on one client, so 5 clients never all get 15
    two = np.repeat([0, 1], 50)
    with pytest.raises(ValueError, match="3 tries"):
        P.dirichlet(two, 5, 1e-3, seed=0, min_size=15, max_tries=3)
    with pytest.raises(ValueError, match="integer"):
        P.dirichlet(LABELS.astype(float), 5, 1.0, seed=0)


def test_shards_label_pure_when_shards_do_not_straddle() -> None:
    labels = np.repeat(np.arange(10), 20)  # 10 shards of 20 -> each shard is exactly one label
    shuffled = np.random.default_rng(0).permutation(labels)
    for lab in (labels, shuffled):
        parts = P.shards(lab, 5, shards_per_client=2, seed=1)
        assert [len(p) for p in parts] == [40] * 5
        assert_exact_cover(parts, 200)
        for p in parts:
            assert len(np.unique(lab[p])) <= 2
        assert same(parts, P.shards(lab, 5, shards_per_client=2, seed=1))
    assert not same(P.shards(labels, 5, 2, seed=1), P.shards(labels, 5, 2, seed=2))


def test_shards_uneven_uses_every_sample_and_errors() -> None:
    labels = np.random.default_rng(0).integers(0, 4, size=203)
    parts = P.shards(labels, 4, shards_per_client=3, seed=0)  # 12 shards of 16 or 17
    assert_exact_cover(parts, 203)
    assert all(48 <= len(p) <= 51 for p in parts)
    with pytest.raises(ValueError, match="12 non-empty shards"):
        P.shards(np.arange(10), 4, shards_per_client=3, seed=0)
    with pytest.raises(ValueError, match="shards_per_client"):
        P.shards(labels, 4, shards_per_client=0, seed=0)
    with pytest.raises(ValueError, match="clients must be >= 1"):
        P.shards(labels, 0, seed=0)


def test_stats_counts_and_json() -> None:
    labels = np.array([0, 1, 1, 2, 2, 2])
    st = P.stats(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], num_classes=3)
    assert st == [{"client": 0, "size": 2, "classes": {0: 1, 1: 1}},
                  {"client": 1, "size": 4, "classes": {1: 1, 2: 3}}]
    assert all(type(k) is int and type(v) is int for s in st for k, v in s["classes"].items())
    assert type(st[1]["size"]) is int
    json.dumps(st)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        P.stats(labels, [np.array([0])], num_classes=2)


def test_registry() -> None:
    assert P.PARTITIONERS == {"iid": P.iid, "dirichlet": P.dirichlet, "shards": P.shards}
