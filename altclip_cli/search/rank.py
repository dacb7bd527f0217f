"""Exact top-k ranking over an index's vectors by cosine similarity.

The vectors are an (N, D) float32 array, usually a read-only np.memmap of the index's vector
file, L2-normalised, so a dot product is a cosine. `ExactRanker` scans it in chunks of
`chunk_rows` rows: scores = queries @ chunk.T in float32, the k best of each chunk by
np.argpartition, merged with the best so far. Memory beyond the mapping stays at one chunk's
scores (at most DENSE_SPAN x 65,536 x Q floats) and, for sparse rows, one gathered chunk
(65,536 x D floats: 192 MiB at D = 768), whatever N is.

Equal scores rank by row, lowest first, so the result equals a full stable sort of
(-score, row); NaN scores (a damaged vector) rank last.

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
    """The best rows for each query, best first: `rows` (Q, k') int64 vector rows and `scores`
    (Q, k') float32 cosines, k' = min(k, number of rows searched)."""

    rows: np.ndarray
    scores: np.ndarray


class Ranker(Protocol):
    def top_k(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> Hits:
        """queries: (Q, D) or (D,) unit vectors. rows: the vector rows to search (None: all)."""
        ...


class ExactRanker:
    """Brute force, exact: every searched row is scored (see the module docstring)."""

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
        n_q = len(q)
        best_rows = [np.empty(0, np.int64) for _ in range(n_q)]
        best_scores = [np.empty(0, np.float32) for _ in range(n_q)]
        for ids, block, within in self._blocks(rows):
            scores = q @ block.T  # (Q, n) float32: each query's scores contiguous
            if within is not None:
                scores = scores[:, within]  # (Q, len(ids))
            for j in range(n_q):
                col = scores[j]
                pick = _select(col, k)
                # Earlier chunks hold lower rows and best_* is sorted by (-score, row), so the
                # concatenation's positions order equal scores by row.
                cand_s = np.concatenate([best_scores[j], col[pick]])
                cand_r = np.concatenate([best_rows[j], ids[pick]])
                keep = _select(cand_s, k)
                best_scores[j], best_rows[j] = cand_s[keep], cand_r[keep]
        width = min((len(r) for r in best_rows), default=0)
        return Hits(rows=np.stack([r[:width] for r in best_rows]) if n_q else np.empty((0, 0), np.int64),
                    scores=np.stack([s[:width] for s in best_scores]) if n_q else np.empty((0, 0), np.float32))

    def _blocks(self, rows):
        """(ids, block, within) triples covering the searched rows in increasing row order: ids
        (n,) int64 rows; block (m, D) rows of the array; within None when block holds exactly
        ids, else the positions of ids in block. Consecutive rows, and rows that fill at least
        1/DENSE_SPAN of their span, are a view of the array (no copy: with the pages in memory,
        scoring the rows in between costs less than gathering them); sparser rows are gathered
        (only their pages are read)."""
        n_total = len(self.vectors)
        step = self.chunk_rows
        if rows is None:
            for start in range(0, n_total, step):
                end = min(start + step, n_total)
                yield np.arange(start, end, dtype=np.int64), self.vectors[start:end], None
            return
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if len(rows) and not np.all(rows[1:] > rows[:-1]):
            rows = np.unique(rows)
        if len(rows) and (rows[0] < 0 or rows[-1] >= n_total):
            raise IndexError(f"row {rows[0] if rows[0] < 0 else rows[-1]} is outside the {n_total} vectors")
        for start in range(0, len(rows), step):
            ids = rows[start:start + step]
            first, span = int(ids[0]), int(ids[-1]) - int(ids[0]) + 1
            if span == len(ids):
                yield ids, self.vectors[first:first + span], None
            elif span <= DENSE_SPAN * len(ids):
                yield ids, self.vectors[first:first + span], ids - first
            else:
                yield ids, self.vectors[ids], None


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
