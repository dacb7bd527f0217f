"""Hamming neighbours among many perceptual hashes, checked against comparing every pair."""

import numpy as np
import pytest

from altclip_cli.inputs.perceptual import DEFAULT_MAX_DISTANCE, to_int64
from altclip_cli.search import hashgroups
from altclip_cli.search.hashgroups import near_pairs, plan_blocks


def _brute_force(hashes, max_distance, usable=None):
    h = [int(v) for v in hashes]
    ok = [True] * len(h) if usable is None else list(usable)
    return {
        (i, j, (h[i] ^ h[j]).bit_count())
        for i in range(len(h)) for j in range(i + 1, len(h))
        if ok[i] and ok[j] and (h[i] ^ h[j]).bit_count() <= max_distance
    }


def _as_set(pairs):
    return set(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.distance.tolist()))


def _planted(rng, n, plants, max_flip):
    """n random hashes, then `plants` copies of random ones with 0..max_flip bits flipped."""
    base = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    picks = rng.integers(0, n, plants)
    copies = []
    for p in picks:
        flips = rng.choice(64, rng.integers(0, max_flip + 1), replace=False)
        copies.append(int(base[p]) ^ sum(1 << int(b) for b in flips))
    out = np.concatenate([base, np.array(copies, dtype=np.uint64)])
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("max_distance", [0, 3, 8, DEFAULT_MAX_DISTANCE, 12])
@pytest.mark.parametrize("blocks", [None, "d+1", 3, 4, 16])
def test_same_pairs_as_brute_force(max_distance, blocks):
    rng = np.random.default_rng(max_distance)
    hashes = _planted(rng, 700, 150, max_distance + 2)
    # Clusters: several copies of one hash, and exact duplicates, to exercise shared buckets.
    hashes[:6] = hashes[6]
    m = max(3, max_distance + 1) if blocks == "d+1" else blocks
    got = near_pairs(hashes, max_distance, blocks=m)
    expected = _brute_force(hashes, max_distance)
    assert len(expected) > 50  # the planted pairs are there to be found
    assert _as_set(got) == expected
    assert len(got.first) == len(expected)  # no pair twice
    assert (got.first < got.second).all()


def test_low_distance_pairs_beyond_the_plants_are_found_in_clustered_hashes():
    # Hashes that differ only in their low 20 bits: most of them share three of four blocks.
    rng = np.random.default_rng(11)
    hashes = (np.uint64(0xDEADBEEF) << np.uint64(32)) | rng.integers(0, 2**20, 400).astype(np.uint64)
    got = near_pairs(hashes, 6)
    assert _as_set(got) == _brute_force(hashes, 6)


def test_pairs_expanded_in_small_chunks_are_the_same(monkeypatch):
    # Many photos sharing a bucket are expanded a chunk at a time; the chunk edges lose nothing.
    rng = np.random.default_rng(4)
    hashes = _planted(rng, 200, 200, 6)
    hashes[:30] = hashes[30]
    expected = _brute_force(hashes, 6)
    monkeypatch.setattr(hashgroups, "_CHUNK", 7)
    assert _as_set(near_pairs(hashes, 6)) == expected


def test_int64_input_and_unusable_hashes():
    rng = np.random.default_rng(2)
    hashes = _planted(rng, 300, 100, 8)
    usable = rng.random(len(hashes)) > 0.2
    signed = np.array([to_int64(int(v)) for v in hashes], dtype=np.int64)
    got = near_pairs(signed, 8, usable=usable)
    assert _as_set(got) == _brute_force(hashes, 8, usable)


def test_small_and_bad_inputs():
    assert len(near_pairs(np.zeros(0, dtype=np.uint64)).first) == 0
    assert len(near_pairs(np.array([5], dtype=np.uint64)).first) == 0
    with pytest.raises(ValueError, match="uint64"):
        near_pairs(np.array([1.5, 2.5]))
    with pytest.raises(ValueError, match="blocks"):
        near_pairs(np.zeros(3, dtype=np.uint64), blocks=2)  # 32-bit buckets: too wide a table
    with pytest.raises(ValueError, match="usable"):
        near_pairs(np.zeros(3, dtype=np.uint64), usable=[True, False])
    with pytest.raises(ValueError, match="max_distance"):
        near_pairs(np.zeros(3, dtype=np.uint64), 65)


def test_block_plan_prefers_exact_buckets_for_small_sets_and_wider_blocks_for_large():
    assert plan_blocks(10, 10) >= plan_blocks(100_000, 10)
    assert 1 <= plan_blocks(100_000, 10) <= 11
