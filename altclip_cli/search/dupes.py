"""Duplicate photos among indexed ones, in three tiers, strictest first, each with its reason.

  identical  the same bytes: equal content keys (the size and sha256 of every byte, stored by
             indexing: update.content_key_of).
  near       the same picture saved again (re-encoded, resized, EXIF-rotated, metadata stripped,
             cropped by a few percent): perceptual hashes within `max_distance` bits
             (hashgroups.near_pairs) AND embeddings with a cosine of at least NEAR_MIN_COSINE.
             A blank or near-black picture (phash_low) is never paired by its hash: only a
             byte-identical copy matches it.
  similar    (asked for only) the same scene, a burst or a series: cosine >= `threshold`
             (DEFAULT_SIMILAR_THRESHOLD). Blank pictures are left out of this tier too: any two
             black frames look alike to the model.

How tiers combine: the pairs of each tier are edges, and a group is a connected component of
the edges of its tier and every stricter one. So a near pair joins two groups of identical
copies into one near group, and with --similar a similar pair joins near groups. Within a
group, each photo's tier is the strictest through which it reaches the kept photo: identical
when it has the kept one's bytes, near when a chain of identical and near pairs leads to it,
else similar. The group's tier is the loosest of its photos'. Each photo's cosine and Hamming
distance are measured to the kept photo directly.

The photo to keep (KEEP_RULES): `largest` (the default) the most pixels, then the largest
file, then the oldest capture time, then the shorter file name (a copy's is longer: "IMG_1
(1).jpg"), then the path; `oldest` / `newest` the capture time first (photos without one
last), then as `largest`; `first` the photo below the earliest of the folders given
(`first_roots`), then the shorter name and the path. Every other photo says why it lost: the first
point of the rule where it differs from the kept one.

The engine works on plain numpy columns (`Photos`), one entry per photo, so it runs without an
index; `duplicates_below` feeds it from an index snapshot.

The similar tier compares every pair without an N x N matrix (see `similar_pairs`): 100,000
photos of 768 dimensions group in about half a minute on two CPU cores (bench/dupes.py).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..inputs.perceptual import DEFAULT_MAX_DISTANCE, HASH_BITS
from .facts import TAKEN_UNKNOWN

TIERS = ("identical", "near", "similar")  # strictest first
KEEP_RULES = ("largest", "oldest", "newest", "first")
DEFAULT_KEEP = "largest"

# Cosine two near photos' embeddings must reach besides their hashes. High: the same picture
# saved again (re-encoded, halved, rotated by EXIF, cropped by 3%) shows the model the same
# content, and what this check must reject is two different pictures whose hashes happen to
# agree (fine detail on one layout). A chosen value, not one fitted on a labelled set of photos.
NEAR_MIN_COSINE = 0.95

# Cosine from which `similar` groups two photos: meant to take frames of one burst and shots of
# one scene a moment apart, and to leave apart photos that merely share a subject (two beaches).
# A chosen value, as above; --threshold tunes it.
DEFAULT_SIMILAR_THRESHOLD = 0.92

BLOCK = 4096  # rows per block of the similar tier's matrix products
BOUND_CHOICES = (32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 384)  # widths the bounding pass may take
BASIS_SAMPLE = 16384  # vectors whose principal directions are computed
CHOICE_SAMPLE = 2048  # vectors outside that sample on which the bounding pass's width is chosen
_PAIRS_CHUNK = 1 << 16  # pairs whose cosine is computed at once


@dataclass
class Photos:
    """The photos to group, as columns of one entry each (position i is photo i).

    vectors: (M, D) float32 unit rows (a memory map is fine: only the rows used are read);
    rows: (N,) int64, photo i's row in vectors (default: row i);
    content_key: (N,) object, str or None (unknown: never identical to anything);
    phash: (N,) uint64; has_phash: (N,) bool; phash_low: (N,) bool (blank: never paired by hash);
    width, height: (N,) int64, -1 when unknown; size: (N,) int64 bytes;
    taken_local: (N,) int64 seconds since 1970-01-01 of the naive capture time, TAKEN_UNKNOWN if none;
    paths_of(positions) -> their absolute paths (asked only for the photos in groups);
    taken_of(positions) -> their capture times as shown (ISO 8601 strings or None), for output;
    mtime_ns: (N,) int64 modification times as indexed (optional: a mover checks them).
    """

    vectors: object
    content_key: object
    phash: object
    has_phash: object
    phash_low: object
    width: object
    height: object
    size: object
    taken_local: object
    paths_of: Callable[[object], list]
    rows: object = None
    taken_of: Callable[[object], list] | None = None
    mtime_ns: object = None

    def __post_init__(self):
        import numpy as np

        n = len(self.content_key)
        if self.rows is None:
            self.rows = np.arange(n, dtype=np.int64)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        for name in ("phash", "has_phash", "phash_low", "width", "height", "size", "taken_local", "rows"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} photos")

    @property
    def count(self) -> int:
        return len(self.rows)

    def subset(self, positions) -> "Photos":
        """These photos only (positions: int64 array), renumbered 0..len-1 in that order."""
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        pick = lambda column: None if column is None else column[positions]  # noqa: E731
        outer = lambda method: None if method is None else (lambda p: method(positions[np.asarray(p)]))  # noqa: E731
        return Photos(vectors=self.vectors, rows=self.rows[positions], content_key=pick(self.content_key),
                      phash=pick(self.phash), has_phash=pick(self.has_phash), phash_low=pick(self.phash_low),
                      width=pick(self.width), height=pick(self.height), size=pick(self.size),
                      taken_local=pick(self.taken_local), mtime_ns=pick(self.mtime_ns),
                      paths_of=outer(self.paths_of), taken_of=outer(self.taken_of))

    @classmethod
    def from_lists(cls, paths: Sequence[str], vectors, **columns) -> "Photos":
        """Photos from in-memory lists (tests, small sets): paths and vectors given whole; missing
        columns default to unknown (no content key, no hash, unknown size and time)."""
        import numpy as np

        n = len(paths)
        paths = list(paths)
        defaults = {"content_key": [None] * n, "phash": np.zeros(n, np.uint64), "has_phash": np.zeros(n, bool),
                    "phash_low": np.zeros(n, bool), "width": np.full(n, -1), "height": np.full(n, -1),
                    "size": np.zeros(n, np.int64), "taken_local": np.full(n, TAKEN_UNKNOWN, np.int64)}
        cols = {**defaults, **columns}
        cols["content_key"] = np.array(list(cols["content_key"]), dtype=object)
        cols["phash"] = np.asarray([int(h) for h in cols["phash"]], dtype=np.uint64)
        for name, dtype in (("has_phash", bool), ("phash_low", bool), ("width", np.int64), ("height", np.int64),
                            ("size", np.int64), ("taken_local", np.int64)):
            cols[name] = np.asarray(cols[name], dtype=dtype)
        return cls(vectors=np.asarray(vectors, dtype=np.float32),
                   paths_of=lambda positions: [paths[int(i)] for i in positions], **cols)


@dataclass(frozen=True)
class Member:
    """A photo of a group. tier: "keep" for the photo to keep, else the tier by which it joins
    it; cosine and hamming: to the kept photo (hamming None when either has no hash); why: why
    it lost to the kept photo (None for the kept one)."""

    position: int
    path: str
    tier: str
    cosine: float
    hamming: int | None
    width: int | None
    height: int | None
    bytes: int
    taken: str | None
    why: str | None = None
    mtime_ns: int | None = None  # as indexed: (bytes, mtime_ns) say which file was grouped


@dataclass
class Group:
    """A group of duplicates: its tier (the loosest of its members'), the photo to keep first."""

    number: int
    tier: str
    members: list = field(default_factory=list)

    @property
    def keep(self) -> Member:
        return self.members[0]

    @property
    def others(self) -> list:
        return self.members[1:]

    def record(self) -> dict:
        """{"group", "tier", "keep", "items": [...]}: what the jsonl output holds."""
        from ..inputs.names import display

        return {"group": self.number, "tier": self.tier, "keep": display(self.keep.path),
                "items": [{"path": display(m.path), "tier": m.tier, "cosine": round(m.cosine, 4),
                           "hamming": m.hamming, "width": m.width, "height": m.height, "bytes": m.bytes,
                           "taken": m.taken, "why": m.why} for m in self.members]}


@dataclass
class Found:
    """What find_groups found: the groups (identical first, then near, then similar; each by its
    kept path), and the number of photos compared."""

    groups: list
    compared: int
    seconds: dict = field(default_factory=dict)  # time per step, for the bench
    unhashed: int = 0  # photos compared without a perceptual hash: they can be identical only
    aliases: int = 0  # paths left out as other names (links) of a photo compared

    def counts(self) -> dict:
        """{tier: groups} for each tier."""
        return {t: sum(1 for g in self.groups if g.tier == t) for t in TIERS}

    @property
    def removable(self) -> int:
        return sum(len(g.others) for g in self.groups)


def find_groups(photos: Photos, *, similar: bool = False, threshold: float = DEFAULT_SIMILAR_THRESHOLD,
                max_distance: int = DEFAULT_MAX_DISTANCE, near_cosine: float = NEAR_MIN_COSINE,
                keep: str = DEFAULT_KEEP, first_roots: Sequence[str] = (), block: int = BLOCK) -> Found:
    """The groups of duplicates among `photos` (see the module doc). first_roots: the folders
    given, in order, for keep="first"."""
    import time

    import numpy as np

    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of {', '.join(KEEP_RULES)}, not {keep!r}")
    if not 0 <= max_distance <= HASH_BITS:
        raise ValueError(f"max_distance must be within 0-{HASH_BITS}, not {max_distance}")
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a cosine, within -1 to 1, not {threshold}")
    n = photos.count
    seconds = {}
    started = time.perf_counter()
    identical = components(n, *identical_pairs(photos.content_key))
    seconds["identical"] = time.perf_counter() - started

    started = time.perf_counter()
    usable = np.asarray(photos.has_phash, bool) & ~np.asarray(photos.phash_low, bool)
    i, j, _distance = near_pairs_checked(photos, usable, max_distance, near_cosine)
    near = components(n, i, j, labels=identical)
    seconds["near"] = time.perf_counter() - started

    loosest = near
    if similar:
        started = time.perf_counter()
        eligible = ~np.asarray(photos.phash_low, bool)
        loosest = near.copy()
        for i, j in similar_pairs(photos.vectors, photos.rows, threshold, only=eligible, block=block):
            loosest = components(n, i, j, labels=loosest)
        seconds["similar"] = time.perf_counter() - started

    started = time.perf_counter()
    groups = _groups(photos, identical, near, loosest, keep, first_roots)
    seconds["groups"] = time.perf_counter() - started
    return Found(groups, n, seconds, unhashed=int(n - np.count_nonzero(photos.has_phash)))


# --- pairs -------------------------------------------------------------------------------------------


def identical_pairs(content_key):
    """(i, j) int64 arrays joining each photo to the first photo with the same content key."""
    import numpy as np

    keys = np.asarray(content_key, dtype=object)
    known = np.flatnonzero(np.array([k is not None for k in keys], dtype=bool))
    empty = np.zeros(0, np.int64)
    if known.size < 2:
        return empty, empty
    _unique, first, inverse = np.unique(keys[known].astype(str), return_index=True, return_inverse=True)
    i = known
    j = known[first[inverse.ravel()]]
    keep = i != j
    return i[keep], j[keep]


def near_pairs_checked(photos: Photos, usable, max_distance: int, near_cosine: float):
    """(i, j, hamming) of the photos whose hashes are within max_distance bits (usable ones only)
    and whose embeddings' cosine is at least near_cosine."""
    import numpy as np

    from .hashgroups import near_pairs

    found = near_pairs(np.asarray(photos.phash, dtype=np.uint64), max_distance, usable=usable)
    if found.first.size == 0:
        return found.first, found.second, found.distance
    cos = pair_cosines(photos.vectors, photos.rows, found.first, found.second)
    keep = cos >= near_cosine
    return found.first[keep], found.second[keep], found.distance[keep]


def pair_cosines(vectors, rows, i, j):
    """(P,) float32: the cosine of photo i[k] with photo j[k] (unit vectors: a dot product)."""
    import numpy as np

    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), _PAIRS_CHUNK):
        a = np.asarray(vectors[rows[i[start:start + _PAIRS_CHUNK]]], dtype=np.float32)
        b = np.asarray(vectors[rows[j[start:start + _PAIRS_CHUNK]]], dtype=np.float32)
        out[start:start + len(a)] = np.einsum("pd,pd->p", a, b)
    return out


def similar_pairs(vectors, rows, threshold: float, *, only=None, block: int = BLOCK):
    """Every pair of photos whose cosine is at least `threshold`, as (i, j) int64 arrays yielded
    a slice of a block at a time (no more than 1024 x `block` pairs at once, so memory stays a few
    blocks whatever the number of photos). only: (N,) bool, the photos that may pair.

    Two passes, exact together. The vectors are turned into the basis of their own principal
    directions (a rotation: dot products do not change), and every pair first gets a cheap upper
    bound on its cosine from its first k coordinates, a @ b <= a' @ b' + |r_a| |r_b| (a' the
    first coordinates, r the rest: Cauchy-Schwarz on the rest), computed as one matrix product
    of (N, k + 1) rows [a', |r_a|] (k chosen on a sample: bounding_dims). Only the block rows and
    columns where some bound reaches the threshold are then compared in full, in float32. Where
    the vectors concentrate in a few directions, as a model's embeddings do, the bound is tight;
    where they do not, a wider k is chosen, or none (every pair in full). The full product always
    decides. The upper triangle of blocks only: each pair is computed once.

    Every pair is yielded, not a top-k per row: a top-k would cut some components apart (two
    tight clusters linked only by pairs that are no row's best); the caller joins the pairs of
    each slice into components at once (components), so they are never all held."""
    import numpy as np

    positions = np.arange(len(rows), dtype=np.int64)
    if only is not None:
        positions = positions[np.asarray(only, bool)]
    n = len(positions)
    if n < 2:
        return
    take = np.asarray(rows)[positions]
    coarse, slack = _bounding_rows(vectors, take, threshold, block)
    limit = np.float32(threshold - slack)
    side = min(block, n)
    flat = np.empty(side * side, dtype=np.float32)  # reused: no fresh pages per tile
    lower = np.tril(np.full((side, side), -np.inf, dtype=np.float32))  # added to a diagonal tile
    for a in range(0, n, block):
        ca = coarse[a:a + block]
        for b in range(a, n, block):
            cb = coarse[b:b + block]
            # (block, block) upper bounds, into a contiguous buffer (a strided one is not BLAS's)
            bound = np.matmul(ca, cb.T, out=flat[:len(ca) * len(cb)].reshape(len(ca), len(cb)))
            if a == b:
                bound += lower[:len(ca), :len(cb)]  # each pair once, no photo with itself
            ri = np.flatnonzero(bound.max(axis=1) >= limit)  # one pass; most tiles stop here
            if ri.size == 0:
                continue
            hit = bound[ri] >= limit  # (r, block)
            ci = np.flatnonzero(hit.any(axis=0))
            hit = hit[:, ci]
            xa = np.asarray(vectors[take[a + ri]], dtype=np.float32)  # (r, D)
            xb = np.asarray(vectors[take[b + ci]], dtype=np.float32)  # (c, D)
            for s in range(0, len(ri), 1024):  # a slice of the rows at a time: at most 1024 x block pairs
                ok = (xa[s:s + 1024] @ xb.T >= threshold) & hit[s:s + 1024]
                pi, pj = np.nonzero(ok)
                if pi.size:
                    yield positions[a + ri[s + pi]], positions[b + ci[pj]]


def _bounding_rows(vectors, take, threshold: float, block: int):
    """((N, k + 1) float32 rows [a', |r_a|] for the bound of similar_pairs, and the float32
    rounding slack to allow on it), k chosen by bounding_dims."""
    import numpy as np

    n = len(take)
    if n <= block:  # one block: the bound would cost more than it saves; the rows themselves, r = 0
        out = np.zeros((n, vectors.shape[1] + 1), dtype=np.float32)
        out[:, :-1] = np.asarray(vectors[take], dtype=np.float32)
        return out, 1e-3
    # The principal directions of (a sample of) the vectors themselves: the uncentred second moment,
    # so the mean direction, which every embedding shares, comes first.
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    sample = take[np.sort(order[:BASIS_SAMPLE])]
    x = np.asarray(vectors[sample], dtype=np.float32)
    _values, vecs = np.linalg.eigh((x.T @ x).astype(np.float64))  # any orthonormal basis is exact; this one is tight
    basis = np.ascontiguousarray(vecs[:, ::-1], dtype=np.float32)  # (D, D), strongest first
    # The width is chosen on vectors the basis was not made from (where there are such): the
    # directions fit their own sample better than the rest, and the bound would look tighter.
    held_out = order[BASIS_SAMPLE:BASIS_SAMPLE + CHOICE_SAMPLE] if n > BASIS_SAMPLE else order[:CHOICE_SAMPLE]
    k = bounding_dims(np.asarray(vectors[take[np.sort(held_out)]], dtype=np.float32) @ basis, threshold, block)
    basis = basis[:, :k]
    out = np.empty((n, k + 1), dtype=np.float32)
    for s in range(0, n, block):
        x = np.asarray(vectors[take[s:s + block]], dtype=np.float32)  # (b, D)
        out[s:s + block, :k] = x @ basis  # (b, k)
        out[s:s + block, k] = _rest(x, out[s:s + block, :k])
    # float32 products of unit rows are off by a few 1e-7 per dimension at most; the basis is
    # orthonormal to about 1e-6: 1e-3 is far above both, and costs only a few more full products.
    return out, 1e-3


def bounding_dims(rotated, threshold: float, block: int = BLOCK) -> int:
    """The number of leading coordinates k for the bounding pass with the least expected work
    per pair, on a sample of the rotated vectors ((S, D), strongest direction first): the bound's
    own product costs k + 1 multiplications, and a block row and column that some bound lets
    through costs D more. The fraction f of the sample's pairs a k lets through estimates how
    many rows and columns of a block get the full product: about (block * f) of each, at most
    all; so the work is (k + 1) + D * min(1, block * f)**2."""
    import numpy as np

    dim = rotated.shape[1]
    pairs = np.triu(np.ones((len(rotated), len(rotated)), bool), 1)
    best, best_work = dim, float(dim)  # no bounding pass: every pair in full
    for k in BOUND_CHOICES:
        if k >= dim:
            break
        head = rotated[:, :k]
        bound = head @ head.T + np.outer(*(2 * [_rest(rotated, head)]))
        f = float((bound >= threshold - 1e-3)[pairs].mean()) if pairs.any() else 0.0
        work = (k + 1) + dim * min(1.0, block * f) ** 2
        if work < best_work:
            best, best_work = k, work
    return best


def _rest(x, head):
    """|r| per row: the norm of what the leading coordinates `head` leave of the rows of x."""
    import numpy as np

    rest = np.einsum("bd,bd->b", x, x, dtype=np.float64) - np.einsum("bk,bk->b", head, head, dtype=np.float64)
    return np.sqrt(np.maximum(rest, 0.0)).astype(np.float32)


# --- connected components ---------------------------------------------------------------------------------


def components(n: int, i, j, *, labels=None):
    """(n,) int64: the label of each node's connected component under the edges (i[k], j[k]),
    the smallest node of the component, starting from `labels` (an earlier result: the edges add
    to its components). Hook-and-compress, vectorised: each round points the root of every
    edge's larger label at the smaller one, then follows pointers to the roots."""
    import numpy as np

    labels = np.arange(n, dtype=np.int64) if labels is None else labels.copy()
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    while i.size:
        li, lj = labels[i], labels[j]
        apart = li != lj
        if not apart.any():
            break
        i, j, li, lj = i[apart], j[apart], li[apart], lj[apart]
        low, high = np.minimum(li, lj), np.maximum(li, lj)
        np.minimum.at(labels, high, low)  # a root now points at a smaller root: no cycle
        while True:
            up = labels[labels]
            if np.array_equal(up, labels):
                break
            labels = up
    return labels


# --- groups and the photo to keep ----------------------------------------------------------------------------


def _groups(photos: Photos, identical, near, loosest, keep: str, first_roots) -> list:
    import numpy as np

    _roots, inverse, counts = np.unique(loosest, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    in_group = np.flatnonzero(counts[inverse] > 1)
    if in_group.size == 0:
        return []
    order = in_group[np.argsort(inverse[in_group], kind="stable")]  # members, group by group
    bounds = np.flatnonzero(np.diff(inverse[order])) + 1
    paths = photos.paths_of(order)
    path_at = dict(zip(order.tolist(), paths))
    taken = photos.taken_of(order) if photos.taken_of is not None else [None] * len(order)
    taken_at = dict(zip(order.tolist(), taken))
    roots = [os.path.join(os.path.realpath(r), "") for r in first_roots]
    pixels = np.where((photos.width >= 0) & (photos.height >= 0), photos.width * photos.height, -1)

    def rank(p: int) -> tuple:
        """The keep rule's sort key of photo p (smallest is kept)."""
        t = int(photos.taken_local[p])
        known = t != TAKEN_UNKNOWN
        size_key = (-int(pixels[p]), -int(photos.size[p]))
        name_key = _name_key(path_at[p])
        if keep == "largest":
            return (*size_key, (0, t) if known else (1, 0), *name_key)
        if keep == "oldest":
            return ((0, t) if known else (1, 0), *size_key, *name_key)
        if keep == "newest":
            return ((0, -t) if known else (1, 0), *size_key, *name_key)
        return (_root_index(path_at[p], roots), *name_key)

    groups = []
    for members in np.split(order, bounds):
        members = sorted(members.tolist(), key=rank)
        kept = members[0]
        cos = pair_cosines(photos.vectors, photos.rows, np.full(len(members), kept), np.array(members))
        built = []
        for p, c in zip(members, cos):
            if p == kept:
                tier = "keep"
            elif identical[p] == identical[kept]:
                tier = "identical"
            elif near[p] == near[kept]:
                tier = "near"
            else:
                tier = "similar"
            built.append(Member(
                position=p, path=path_at[p], tier=tier, cosine=float(min(1.0, c)),
                hamming=_hamming(photos, p, kept), width=_known(photos.width[p]), height=_known(photos.height[p]),
                bytes=int(photos.size[p]), taken=taken_at[p],
                mtime_ns=None if photos.mtime_ns is None else int(photos.mtime_ns[p]),
                why=None if p == kept else _why(photos, pixels, p, kept, keep, path_at, roots)))
        loosest_tier = max((TIERS.index(m.tier) for m in built[1:]), default=0)
        groups.append(Group(0, TIERS[loosest_tier], built))
    groups.sort(key=lambda g: (TIERS.index(g.tier), g.keep.path))
    for number, group in enumerate(groups, 1):
        group.number = number
    return groups


def _name_key(path: str) -> tuple:
    """The last point of every keep rule: the shorter file name ("IMG_1.jpg" before its "IMG_1
    (1).jpg" or "Copy of IMG_1.jpg"), then the path."""
    return (len(os.path.basename(path)), path)


def _root_index(path: str, roots: list) -> int:
    for k, root in enumerate(roots):
        if path.startswith(root) or path == root[:-1]:
            return k
    return len(roots)


def _known(value) -> int | None:
    return int(value) if int(value) >= 0 else None


def _hamming(photos: Photos, a: int, b: int) -> int | None:
    if not (photos.has_phash[a] and photos.has_phash[b]):
        return None
    return (int(photos.phash[a]) ^ int(photos.phash[b])).bit_count()


def _why(photos: Photos, pixels, p: int, kept: int, keep: str, path_at: dict, roots: list) -> str:
    """Why photo p lost to the kept one: the first point of the keep rule where they differ."""
    checks = {"pixels": lambda: _why_pixels(photos, pixels, p, kept),
              "bytes": lambda: _why_bytes(photos, p, kept),
              "older": lambda: _why_time(photos, p, kept, older=True),
              "newer": lambda: _why_time(photos, p, kept, older=False)}
    steps = {"largest": ("pixels", "bytes", "older"), "oldest": ("older", "pixels", "bytes"),
             "newest": ("newer", "pixels", "bytes"), "first": ()}[keep]
    if keep == "first":
        a, b = _root_index(path_at[p], roots), _root_index(path_at[kept], roots)
        if a != b and roots:
            return "found under a path given after the kept one's"
    for step in steps:
        reason = checks[step]()
        if reason:
            return reason
    if len(os.path.basename(path_at[p])) != len(os.path.basename(path_at[kept])):
        return "a longer file name, as a copy's"
    return "its path sorts after the kept one's"


def _why_pixels(photos, pixels, p, kept) -> str | None:
    if pixels[p] == pixels[kept]:
        return None
    if pixels[p] < 0:
        return "its size in pixels is unknown"
    return (f"fewer pixels ({photos.width[p]}x{photos.height[p]} < "
            f"{photos.width[kept]}x{photos.height[kept]})")


def _why_bytes(photos, p, kept) -> str | None:
    if photos.size[p] == photos.size[kept]:
        return None
    return f"smaller file ({int(photos.size[p]):,} < {int(photos.size[kept]):,} bytes)"


def _why_time(photos, p, kept, *, older: bool) -> str | None:
    t, k = int(photos.taken_local[p]), int(photos.taken_local[kept])
    if t == k:
        return None
    if t == TAKEN_UNKNOWN:
        return "no capture time"
    return f"taken {'later' if older else 'earlier'} ({_clock(t)} {'>' if older else '<'} {_clock(k)})"


def _clock(seconds: int) -> str:
    """A taken_local value as the wall-clock time it stands for."""
    return (datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)).isoformat(sep=" ")


# --- from the index ------------------------------------------------------------------------------------------


def named_roots(paths) -> list[str]:
    """The paths as the index names them (paths.real_root), in the order given, without repeats."""
    from ..paths import real_root

    return list(dict.fromkeys(real_root(os.path.expanduser(os.fspath(p))) for p in paths))


def distinct_roots(paths) -> list[str]:
    """named_roots without those inside another one given (their photos are below that one
    already): the roots to walk and read, each photo found under exactly one."""
    real = named_roots(paths)
    inside = lambda path, folder: path.startswith(os.path.join(folder, ""))  # noqa: E731
    return [r for r in real if not any(inside(r, other) for other in real if other != r)]


def duplicates_below(indexer, identity: dict, folder, paths: Sequence[str], *, update: bool = True,
                     wait: float = 0.0, summary=None, similar: bool = False,
                     threshold: float = DEFAULT_SIMILAR_THRESHOLD, max_distance: int = DEFAULT_MAX_DISTANCE,
                     keep: str = DEFAULT_KEEP, **update_kw) -> Found:
    """`altclip dupes` in this process: bring the index in `folder` up to date with each of
    `paths` (run.update_below, as `altclip search` does; unless `update` is False), then group
    the indexed photos at or below them (find_groups). paths: folders or files, in the order
    given (keep="first" follows it; one inside another given counts for its photos' order).
    indexer: the model, or a callable returning it (called only when some image needs it).
    summary: a search.summary.UpdateSummary filled in place. update_kw: update.update_index's
    (the walk's include_hidden and exclude_dirs, msgs, open_kw, ...).
    Raises IndexStoreError (no index, another model's, another writer without `wait`)."""
    from .database import INDEX_DB
    from .run import update_below
    from .store import IndexStore, IndexStoreError
    from .update import storable

    roots = [r for r in distinct_roots(paths) if storable(r)]  # the index holds UTF-8 paths only
    if update:
        files = 0  # each update counts the files below its root: the summary says them all
        for root in roots:
            update_below(indexer, identity, folder, root, wait=wait, writer="altclip dupes", summary=summary,
                         **update_kw)
            files += summary.files if summary is not None else 0
        if summary is not None:
            summary.files = files
    if not (folder / INDEX_DB).exists():
        if update:  # nothing below the paths could be indexed (no folder name the index can hold)
            return Found([], 0)
        raise IndexStoreError(f"there is no index in {folder}",
                              hint="leave out --no-index to build it now, or run `altclip index DIR` first")
    with IndexStore.open(folder, identity=identity) as store:
        snaps = [store.snapshot(under=root) for root in roots]
        try:
            photos, aliases = without_aliases(photos_of(snaps))
            found = find_groups(photos, similar=similar, threshold=threshold, max_distance=max_distance, keep=keep,
                                first_roots=named_roots(paths))
            found.aliases = aliases
            return found
        finally:
            for snap in snaps:
                snap.close()


def aside_items(found: Found, roots: Sequence[str]) -> list[tuple]:
    """What outputs.dupemove.move_aside takes to move every photo not kept: (absolute path, its
    path relative to the root it was found under, (bytes, mtime_ns) as indexed), in group order.
    A root that is a file itself gives the file's own name."""
    items = []
    for group in found.groups:
        for m in group.others:
            root = next((r for r in roots if m.path == r or m.path.startswith(os.path.join(r, ""))), None)
            if root is None:
                continue
            rel = os.path.basename(m.path) if m.path == root else os.path.relpath(m.path, root)
            items.append((m.path, rel, None if m.mtime_ns is None else (m.bytes, m.mtime_ns)))
    return items


def kept_not_as_indexed(found: Found) -> dict[str, str]:
    """{path of a photo not kept: why it must stay} for each group whose photo to keep is not the
    file that was grouped (gone, not a regular file, changed since indexing, as with --no-index or
    a stale index). Moving the others aside would take the last copy out of the folders searched."""
    from ..inputs.names import display
    from ..outputs.dupemove import CHANGED, not_as_listed
    from ..outputs.noreplace import lstat_or_none

    held = {}
    for group in found.groups:
        keep = group.keep
        why = not_as_listed(lstat_or_none(keep.path), None if keep.mtime_ns is None else (keep.bytes, keep.mtime_ns))
        if why:
            verb = "has" if why is CHANGED else "is"
            for m in group.others:
                held[m.path] = f"not moved: the photo kept in its place, {display(keep.path)}, {verb} {why}"
    return held


def without_aliases(photos: Photos) -> tuple[Photos, int]:
    """(the photos without the paths that name a file already among them, how many were left
    out). A symlink to a photo, or a hard link, is the photo itself: moving it aside would free
    nothing, and moving the photo would leave the link dangling. Only photos that share a content
    key can be one file, so only those are looked at (os.stat, links followed); of the names of
    one file, a path through no symlink is kept, then the first."""
    import numpy as np

    keys = np.asarray(photos.content_key, dtype=object)
    known = np.flatnonzero(np.array([k is not None for k in keys], dtype=bool))
    if known.size < 2:
        return photos, 0
    _unique, inverse, counts = np.unique(keys[known].astype(str), return_inverse=True, return_counts=True)
    shared = known[counts[inverse.ravel()] > 1]
    if shared.size == 0:
        return photos, 0
    named = list(zip(shared.tolist(), photos.paths_of(shared)))
    named.sort(key=lambda pair: os.path.realpath(pair[1]) != pair[1])  # paths without links first (stable)
    seen, aliases = set(), []
    for position, path in named:
        try:
            st = os.stat(path)
        except OSError:  # gone or unreadable: compared as the index holds it
            continue
        if (st.st_dev, st.st_ino) in seen:
            aliases.append(position)
        seen.add((st.st_dev, st.st_ino))
    if not aliases:
        return photos, 0
    keep = np.setdiff1d(np.arange(photos.count), np.asarray(aliases, dtype=np.int64))
    return photos.subset(keep), len(aliases)


def photos_of(snaps) -> Photos:
    """Photos from index snapshots (one per root; a file in several counts once). One snapshot's
    vectors are used where they lie (a memory map, read as needed); several are copied into one
    array."""
    import numpy as np

    tables = [snap.table() for snap in snaps]
    source = np.concatenate([np.full(len(t["file_id"]), k, np.int64) for k, t in enumerate(tables)]) \
        if tables else np.zeros(0, np.int64)
    columns = {name: np.concatenate([t[name] for t in tables]) if tables else np.zeros(0)
               for name in ("file_id", "vec_row", "size", "mtime_ns", "content_key", "phash", "has_phash",
                            "phash_low", "width", "height", "taken_local")}
    _ids, first = np.unique(columns["file_id"], return_index=True)
    first = np.sort(first)  # each file once, in snapshot order
    columns = {name: values[first] for name, values in columns.items()}
    source = source[first]
    if len(snaps) == 1:
        vectors, rows = snaps[0].vectors, columns["vec_row"]
    else:
        dim = snaps[0].vectors.shape[1] if snaps else 0
        vectors = np.empty((len(first), dim), dtype=np.float32)
        for k, snap in enumerate(snaps):
            mine = np.flatnonzero(source == k)
            for s in range(0, len(mine), BLOCK):
                part = mine[s:s + BLOCK]
                vectors[part] = snap.vectors[columns["vec_row"][part]]
        rows = np.arange(len(first), dtype=np.int64)
    file_ids = columns["file_id"]

    def by_snapshot(method):
        def call(positions):
            positions = np.asarray(positions, dtype=np.int64)
            out = [None] * len(positions)
            for k, snap in enumerate(snaps):
                mine = np.flatnonzero(source[positions] == k)
                if mine.size:
                    for at, value in zip(mine, getattr(snap, method)(file_ids[positions[mine]])):
                        out[at] = value
            return out
        return call

    facts_of = by_snapshot("facts_of")
    return Photos(vectors=vectors, rows=rows, content_key=columns["content_key"],
                  phash=columns["phash"].astype(np.uint64), has_phash=columns["has_phash"].astype(bool),
                  phash_low=columns["phash_low"].astype(bool), width=columns["width"], height=columns["height"],
                  size=columns["size"], taken_local=columns["taken_local"], mtime_ns=columns["mtime_ns"],
                  paths_of=by_snapshot("paths_of"),
                  taken_of=lambda positions: [f.taken if f is not None else None for f in facts_of(positions)])
