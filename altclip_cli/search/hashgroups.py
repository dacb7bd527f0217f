"""All pairs of 64-bit perceptual hashes within a Hamming distance, without comparing every pair.

Multi-index hashing (Norouzi, Punjani and Fleet, "Fast Search in Hamming Space with Multi-Index
Hashing", CVPR 2012). The 64 bits are cut into m blocks. If two hashes differ in at most d bits,
the differences spread over the m blocks, so in at least one block they differ in at most
r = d // m bits (pigeonhole). For each block, the hashes are bucketed by that block's value; each
hash then looks in the buckets of every value within r bits of its own, and each candidate pair
found there is checked on all 64 bits with a popcount. With m = d + 1 blocks, r = 0 and buckets
are matched exactly; larger blocks with a small r look up more buckets but find far fewer false
candidates, so m is chosen by the expected work for the number of hashes:

    work(m) = m * lookups(b, r) * n * (1 + n / 2**b)     (b = 64 / m bits a block)

which assumes evenly spread hashes; a library with many similar photos finds more candidates,
but every candidate costs a few vectorised operations, never a Python loop.

Size, measured once (not a test): 100,000 random hashes plus 5,000 near copies of some of them
(numpy 2.4, one core of a 2-core x86 server CPU): at distance 10 the plan is 4 blocks of 16 bits
(r = 2, 137 buckets looked up per hash and block), about 2.4 s; at distance 8, 3 blocks of 21-22
bits, about 2 s; the exact-bucket scheme (d + 1 = 11 blocks) takes about 31 s at distance 10,
and comparing every pair means 5 * 10**9 popcounts. Memory stays at a few arrays of N, plus at
most about 4 million candidate pairs at a time, plus the pairs found.
"""

from __future__ import annotations

from itertools import combinations
from math import comb
from typing import NamedTuple

from ..inputs.perceptual import DEFAULT_MAX_DISTANCE, HASH_BITS

# Buckets are counted in dense tables of 2**b entries: blocks wider than this are not considered.
_MAX_BLOCK_BITS = 24

# Candidate pairs expanded at once (bounds memory when many photos share a bucket).
_CHUNK = 1 << 22


class HashPairs(NamedTuple):
    """Pairs of positions in the input, first < second, sorted; distance in bits."""

    first: "np.ndarray"  # (P,) int64
    second: "np.ndarray"  # (P,) int64
    distance: "np.ndarray"  # (P,) int64


def near_pairs(hashes, max_distance: int = DEFAULT_MAX_DISTANCE, *, usable=None,
               blocks: int | None = None) -> HashPairs:
    """Every pair (i, j), i < j, of `hashes` within `max_distance` bits.

    hashes: (N,) uint64, or int64 holding the same bits (as read back from SQLite).
    usable: optional (N,) bool; hashes marked False (blank frames) are paired with nothing.
    blocks: the number of blocks to cut the bits into (default: the cheapest for N).
    """
    import numpy as np

    h = np.ascontiguousarray(hashes)
    if h.dtype == np.int64:
        h = h.view(np.uint64)
    if h.dtype != np.uint64 or h.ndim != 1:
        raise ValueError(f"hashes must be a 1-D uint64 or int64 array, not {h.dtype} {h.shape}")
    if not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be within 0-{HASH_BITS}, not {max_distance}")
    positions = np.arange(len(h), dtype=np.int64)
    if usable is not None:
        usable = np.asarray(usable, dtype=bool)
        if usable.shape != h.shape:
            raise ValueError(f"usable has {usable.shape} entries for {h.shape} hashes")
        positions = positions[usable]
    h = h[positions]
    n = len(h)
    empty = np.zeros(0, dtype=np.int64)
    if n < 2:
        return HashPairs(empty, empty, empty)
    m = blocks or plan_blocks(n, max_distance)
    if not -(-HASH_BITS // _MAX_BLOCK_BITS) <= m <= HASH_BITS:
        raise ValueError(f"blocks must be within {-(-HASH_BITS // _MAX_BLOCK_BITS)}-{HASH_BITS}, not {m}")
    radius = max_distance // m

    found_i, found_j = [], []
    for shift, width in _block_layout(m):
        keys = ((h >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)  # (n,)
        order = np.argsort(keys, kind="stable")  # positions in h, bucket by bucket
        counts = np.bincount(keys, minlength=1 << width)  # (2**width,)
        starts = np.cumsum(counts) - counts
        for flip in _flips(width, radius):
            probe = keys ^ flip
            # Each unordered pair once: within a bucket, i < j; across two buckets, only from the
            # one with the smaller key (the other would find the same pair with the same flip).
            looking = None if flip == 0 else keys < probe
            for i, j in _bucket_pairs(probe, counts, starts, order, looking):
                if flip == 0:
                    keep = i < j
                    i, j = i[keep], j[keep]
                else:
                    i, j = np.minimum(i, j), np.maximum(i, j)
                close = _popcount(h[i] ^ h[j]) <= max_distance
                found_i.append(i[close])
                found_j.append(j[close])

    i = np.concatenate(found_i) if found_i else empty
    j = np.concatenate(found_j) if found_j else empty
    codes = np.unique(i * n + j)  # a pair close in several blocks is found several times
    i, j = codes // n, codes % n
    distance = _popcount(h[i] ^ h[j])
    return HashPairs(positions[i], positions[j], distance)


def plan_blocks(n: int, max_distance: int) -> int:
    """The number of blocks with the least expected work for n evenly spread hashes."""
    best, best_work = HASH_BITS, float("inf")
    for m in range(1, HASH_BITS + 1):
        width = -(-HASH_BITS // m)  # the widest block
        if width > _MAX_BLOCK_BITS:
            continue
        lookups = sum(comb(width, k) for k in range(max_distance // m + 1))
        work = m * lookups * n * (1 + n / 2**width)
        if work < best_work:
            best, best_work = m, work
    return best


def _block_layout(m: int) -> list[tuple[int, int]]:
    """(shift, width) of m blocks covering the 64 bits, widths differing by at most one."""
    base, extra = divmod(HASH_BITS, m)
    layout, shift = [], 0
    for k in range(m):
        width = base + (1 if k < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _flips(width: int, radius: int):
    """Every value of `width` bits with at most `radius` bits set (0 first)."""
    for k in range(min(radius, width) + 1):
        for bits in combinations(range(width), k):
            yield sum(1 << b for b in bits)


def _bucket_pairs(probe, counts, starts, order, looking=None):
    """(i, j) arrays: each i (where `looking`) with every j in bucket probe[i], in chunks of about
    _CHUNK pairs."""
    import numpy as np

    sizes = counts[probe]  # (n,)
    if looking is not None:
        sizes = np.where(looking, sizes, 0)
    rows = np.flatnonzero(sizes)
    if rows.size == 0:
        return
    reps = sizes[rows]
    ends = np.cumsum(reps)
    begin = 0
    while begin < rows.size:
        # The rows whose pairs fit in one chunk (at least one row, however large its bucket).
        done = ends[begin - 1] if begin else 0
        stop = max(begin + 1, int(np.searchsorted(ends, done + _CHUNK, side="right")))
        r, k = rows[begin:stop], reps[begin:stop]
        total = int(k.sum())
        i = np.repeat(r, k)
        within = np.arange(total) - np.repeat(np.cumsum(k) - k, k)  # 0..size-1 inside each bucket
        j = order[np.repeat(starts[probe[r]], k) + within]
        yield i, j
        begin = stop


def _popcount(x):
    """Bits set in each uint64 of x, as int64."""
    import numpy as np

    if hasattr(np, "bitwise_count"):  # numpy 2.0 and later
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(v).count("1") for v in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(-1, 8)].sum(axis=1)

