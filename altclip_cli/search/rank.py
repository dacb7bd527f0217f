"""Exact top-k ranking over an index's vectors by cosine similarity.

The vectors are an (N, D) float32 array, usually a read-only np.memmap of the index's vector
file, L2-normalised, so a dot product is a cosine. `ExactRanker` scans it in chunks of
`chunk_rows` rows: scores = queries @ chunk.T in float32, the k best of each chunk by
np.argpartition, merged with the best so far. Memory beyond the mapping stays at one chunk's
scores (at most DENSE_SPAN x 65,536 x Q floats) and, for sparse rows, one gathered chunk
(65,536 x D floats: 192 MiB at D = 768), whatever N is.

The entries searched are given as vector rows, in any order and with repeats (files with the
same content share a vector). Equal scores rank by vector row, then by entry, so the result
equals a full stable sort by (-score, row, entry); NaN scores (a damaged vector) rank last.

`Ranker` is the boundary an approximate index (HNSW and the like) would implement later: the
command line only calls `top_k`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

DEFAULT_CHUNK_ROWS = 65_536
DENSE_SPAN = 8  # see ExactRanker._blocks


@dataclass(frozen=True)
class Hits:
    """The best entries for each query, best first, each (Q, k') with k' = min(k, entries
    searched): `positions` int64 index the `rows` that top_k was given (the vector rows
    themselves when it was None), `rows` int64 are the vector rows, `scores` float32 cosines."""

    positions: np.ndarray
    rows: np.ndarray
    scores: np.ndarray


class Ranker(Protocol):
    def top_k(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> Hits:
        """queries: (Q, D) or (D,) unit vectors. rows: the vector row of each entry to search, in
        any order, repeats allowed (files with the same content share a vector); None: every row."""
        ...


class ExactRanker:
    """Brute force, exact: every searched row is scored (see the module docstring). Equal scores
    go to the lower vector row, then to the earlier entry of `rows`."""

    def __init__(self, vectors: np.ndarray, chunk_rows: int = DEFAULT_CHUNK_ROWS):
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), not {vectors.shape}")
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        self.vectors = vectors
        self.chunk_rows = chunk_rows

    def top_k(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> Hits:
        if k < 1:
            raise ValueError("k must be at least 1")
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)  # (Q, D)
        if q.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries have {q.shape[1]} dimensions, the vectors {self.vectors.shape[1]}")
        order, srt = self._sorted(rows)
        n_q = len(q)
        best_pos = [np.empty(0, np.int64) for _ in range(n_q)]  # positions in the sorted entries
        best_scores = [np.empty(0, np.float32) for _ in range(n_q)]
        for pos, block, within in self._blocks(srt):
            scores = q @ block.T  # (Q, n) float32: each query's scores contiguous
            if within is not None:
                scores = scores[:, within]  # (Q, len(pos))
            for j in range(n_q):
                col = scores[j]
                pick = _select(col, k)
                # Earlier blocks hold lower positions and best_* is sorted by (-score, position),
                # so in the concatenation equal scores are in position order.
                cand_s = np.concatenate([best_scores[j], col[pick]])
                cand_p = np.concatenate([best_pos[j], pos[pick]])
                keep = _select(cand_s, k)
                best_scores[j], best_pos[j] = cand_s[keep], cand_p[keep]
        width = min((len(p) for p in best_pos), default=0)
        sorted_pos = np.stack([p[:width] for p in best_pos]) if n_q else np.empty((0, 0), np.int64)
        return Hits(positions=sorted_pos if order is None else order[sorted_pos],
                    rows=sorted_pos if srt is None else srt[sorted_pos],
                    scores=np.stack([s[:width] for s in best_scores]) if n_q else np.empty((0, 0), np.float32))

    def _sorted(self, rows):
        """(order, sorted rows): rows in increasing order and the permutation that sorts them
        (None when they already are); (None, None) for every row."""
        if rows is None:
            return None, None
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if len(rows) == 0:
            return None, rows
        if rows.min() < 0 or rows.max() >= len(self.vectors):
            bad = rows.min() if rows.min() < 0 else rows.max()
            raise IndexError(f"row {bad} is outside the {len(self.vectors)} vectors")
        if np.all(rows[1:] >= rows[:-1]):
            return None, rows
        order = np.argsort(rows, kind="stable")
        return order, rows[order]

    def _blocks(self, srt):
        """(positions, block, within) triples covering the sorted rows `srt` (None: every row) in
        order: positions (n,) int64 into srt; block (m, D) rows of the array; within None when
        block holds exactly srt[positions], else the positions of those rows in block.
        Consecutive rows, and rows that fill at least 1/DENSE_SPAN of their span, are a view of
        the array (no copy: with the pages in memory, scoring the rows in between costs less than
        gathering them); sparser rows are gathered (only their pages are read)."""
        step = self.chunk_rows
        if srt is None:
            n_total = len(self.vectors)
            for start in range(0, n_total, step):
                end = min(start + step, n_total)
                yield np.arange(start, end, dtype=np.int64), self.vectors[start:end], None
            return
        for start in range(0, len(srt), step):
            ids = srt[start:start + step]
            pos = np.arange(start, start + len(ids), dtype=np.int64)
            first, span = int(ids[0]), int(ids[-1]) - int(ids[0]) + 1
            if span == len(ids) and np.all(ids[1:] != ids[:-1]):  # sorted and no repeats: consecutive
                yield pos, self.vectors[first:first + span], None
            elif span <= DENSE_SPAN * len(ids):
                yield pos, self.vectors[first:first + span], ids - first
            else:
                yield pos, self.vectors[ids], None


def _select(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best scores, sorted by (-score, position): ties go to the lowest
    positions, NaN last. np.argpartition finds the k-th best score; every score above it and
    the first of those equal to it make the k."""
    s = scores
    if np.isnan(s).any():
        s = np.where(np.isnan(s), -np.inf, s)
    n = len(s)
    if k >= n:
        idx = np.arange(n)
    else:
        threshold = s[np.argpartition(s, n - k)[n - k:]].min()
        above = np.flatnonzero(s > threshold)
        equal = np.flatnonzero(s == threshold)[:k - len(above)]
        idx = np.concatenate([above, equal])
    return idx[np.lexsort((idx, -s[idx]))]


def top_k(vectors: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None, *,
          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Hits:
    """ExactRanker(vectors, chunk_rows).top_k(queries, k, rows)."""
    return ExactRanker(vectors, chunk_rows).top_k(queries, k, rows)
