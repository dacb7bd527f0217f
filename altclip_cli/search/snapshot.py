"""Consistent read-only views of an index (IndexStore.snapshot), and the cache a long-lived
reader (`altclip serve`) keeps of its connection and recent folders' rows.

A snapshot is a WAL read transaction, and the vectors only up to `vectors_committed` as of that
transaction, in the vector file of the generation that transaction names; any number of
readers take them while one writer writes.

Cheap to import: numpy is imported inside the functions that need it.
"""
from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .database import INDEX_DB, SQL_CHUNK, connect_readonly, meta_token
from .errors import StaleVectors, damaged
from .facts import TAKEN_UNKNOWN, has_fact_columns, read_facts_by_id
from ..inputs.perceptual import from_int64
from .vectorfile import map_vectors

if TYPE_CHECKING:
    from .filters import SearchFilter
    from .store import IndexStore


class Snapshot:
    """A consistent view of an index (see IndexStore.snapshot).

    vectors: (committed rows, dim) float32, a read-only np.memmap of vectors.f32 (rows that no
        current file uses are in it too: index it with `rows`).
    rows: int64 (N,), the vector row of each file at or below `under` that has a vector.
    file_ids: int64 (N,), those files' ids (same order as rows).
    count: N.
    paths_of(file_ids): their absolute paths (meant for a few, e.g. the top k).
    With a filter (`where`), the files are those it keeps, and
    total: the files with a vector at or below `under`, kept or not;
    missing: {fact: how many of those lack it} for each fact the filter asks about ("date",
        "place", "camera"): the filter left them out;
    unread: how many of those the index has not read the facts of yet (an index made before
        it read them)."""

    def __init__(self, store: "IndexStore", db: sqlite3.Connection, vectors, rows, file_ids,
                 cache: "SnapshotCache | None" = None, counts: dict | None = None):
        self.store = store
        self._db = db
        self._cache = cache
        self.vectors = vectors
        self.rows = rows
        self.file_ids = file_ids
        counts = counts or {}
        self.total = counts.get("total", len(rows))
        self.missing = {k: v for k, v in counts.items() if k not in ("total", "unread")}
        self.unread = counts.get("unread", 0)

    @property
    def count(self) -> int:
        return len(self.rows)

    def paths_of(self, file_ids) -> list[str]:
        ids = [int(i) for i in file_ids]
        found: dict[int, str] = {}
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), SQL_CHUNK):
            chunk = unique[start:start + SQL_CHUNK]
            cur = self._db.execute(f"SELECT id, path FROM files WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update((int(i), p) for i, p in cur)
        return [self.store.path_of(found[i]) for i in ids]

    def ids_of(self, keys) -> dict[str, int]:
        """{stored path: file id} for those of `keys` (stored paths, store.key_of) the index holds."""
        unique, found = list(dict.fromkeys(keys)), {}
        for start in range(0, len(unique), SQL_CHUNK):
            chunk = unique[start:start + SQL_CHUNK]
            cur = self._db.execute(f"SELECT path, id FROM files WHERE path IN ({','.join('?' * len(chunk))})", chunk)
            found.update((p, int(i)) for p, i in cur)
        return found

    def facts_of(self, file_ids) -> list:
        """facts.PhotoFacts of these files, in order (None for a file whose facts were not read)."""
        found = read_facts_by_id(self._db, file_ids)
        return [found.get(int(i)) for i in file_ids]

    def table(self) -> dict:
        """Columns of what the index holds of each file in the snapshot, in the order of
        `file_ids` (for the duplicate finder): "file_id", "vec_row", "size", "mtime_ns" int64;
        "content_key" object (str or None); "phash" uint64 with "has_phash" and "phash_low" bool;
        "width", "height" int64 (-1: unknown); "taken_local" int64 (TAKEN_UNKNOWN: unknown)."""
        import numpy as np

        n = self.count
        out = {"file_id": np.asarray(self.file_ids, np.int64), "vec_row": np.asarray(self.rows, np.int64),
               "size": np.zeros(n, np.int64), "mtime_ns": np.zeros(n, np.int64),
               "content_key": np.full(n, None, object), "phash": np.zeros(n, np.uint64),
               "has_phash": np.zeros(n, bool), "phash_low": np.zeros(n, bool), "width": np.full(n, -1, np.int64),
               "height": np.full(n, -1, np.int64), "taken_local": np.full(n, TAKEN_UNKNOWN, np.int64)}
        position = {int(i): k for k, i in enumerate(out["file_id"])}
        with_facts = has_fact_columns(self._db)
        columns = "id, size, mtime_ns, content_key" + (", phash, phash_low, width, height, taken_local"
                                                       if with_facts else "")
        ids = list(position)
        for start in range(0, len(ids), SQL_CHUNK):
            chunk = ids[start:start + SQL_CHUNK]
            cur = self._db.execute(f"SELECT {columns} FROM files WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            for row in cur:
                k = position[int(row[0])]
                out["size"][k], out["mtime_ns"][k] = row[1] or 0, row[2] or 0
                out["content_key"][k] = row[3]
                if not with_facts:
                    continue
                phash, low, width, height, taken = row[4:]
                if phash is not None:
                    out["phash"][k] = from_int64(phash)
                    out["has_phash"][k] = True
                    out["phash_low"][k] = bool(low)
                out["width"][k] = -1 if width is None else width
                out["height"][k] = -1 if height is None else height
                out["taken_local"][k] = TAKEN_UNKNOWN if taken is None else taken
        return out

    def close(self) -> None:
        if self._db is not None:
            if self._cache is not None:
                self._cache.end()  # ends the read transaction; the connection stays the cache's
            else:
                self._db.close()  # ends the read transaction
            self._db = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def take_snapshot(store: "IndexStore", under, cache: "SnapshotCache | None" = None,
                  where: "SearchFilter | None" = None) -> Snapshot:
    """A Snapshot of the files with a vector at or below `under` (None: all) in `store`'s index
    that `where` keeps (None: all), begun again when a compaction replaced the vector file after
    its transaction began."""
    if where is not None and not where.active:
        where = None
    for attempt in range(5):
        try:
            return _snapshot(store, under, cache, where)
        except StaleVectors:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _snapshot(store: "IndexStore", under, cache: "SnapshotCache | None", where: "SearchFilter | None") -> Snapshot:
    folder = store.folder
    db = cache.begin(folder) if cache is not None else connect_readonly(folder)
    try:
        if cache is None:
            db.execute("BEGIN")
        meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('vectors_committed', 'vectors_token')"))
        committed = int(meta["vectors_committed"])
        clause, params = store.under_clause(under)
        if where is not None and cache is not None and has_fact_columns(db):
            pairs, counts = where.select(_fact_columns(db, clause, params, cache))
        else:
            kept = cache.rows(db, (clause, *params)) if cache is not None and where is None else None
            if kept is None:
                kept = _select(db, clause, params) if where is None else _select_where(db, clause, params, where)
                if cache is not None and where is None:
                    cache.keep((clause, *params), kept)
            pairs, counts = kept
        if pairs.shape[1] and int(pairs[1].max()) >= committed:
            raise damaged(folder, "a file row points past the committed vectors")
        vectors = map_vectors(folder, committed, store.dim, meta_token(meta))
    except BaseException as exc:
        cache.end() if cache is not None else db.close()
        if isinstance(exc, sqlite3.DatabaseError):
            raise damaged(folder, f"{INDEX_DB}: {exc}") from None
        raise
    return Snapshot(store, db, vectors, pairs[1], pairs[0], cache=cache, counts=counts)


def _select(db: sqlite3.Connection, clause: str, params: list):
    """((2, N) int64: file ids, vector rows; None) of the files with a vector where `clause`."""
    import numpy as np

    cur = db.execute(f"SELECT id, vec_row FROM files WHERE vec_row IS NOT NULL AND {clause}", params)
    flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64)
    return np.ascontiguousarray(flat.reshape(-1, 2).T), None  # (2, N): ids, vector rows


def _select_where(db: sqlite3.Connection, clause: str, params: list, where: "SearchFilter"):
    """(pairs as _select's, counts: {"total", "unread", and per fact the filter asks about, the
    files without it}) of the files with a vector where `clause` that `where` keeps: its SQL
    first (a date range, a camera, a bounding box), then its exact test on what that kept."""
    import numpy as np

    if not has_fact_columns(db):  # an index older than the facts (upgraded by its next writer): none known
        total = db.execute(f"SELECT COUNT(*) FROM files WHERE vec_row IS NOT NULL AND {clause}", params).fetchone()[0]
        return np.zeros((2, 0), np.int64), {"total": total, "unread": total, **{n: total for n in where.needs}}
    sql, sql_params = where.sql()
    extra = where.exact_columns
    cur = db.execute(f"SELECT id, vec_row{''.join(', ' + c for c in extra)} FROM files "
                     f"WHERE vec_row IS NOT NULL AND {clause} AND {sql}", [*params, *sql_params])
    if not extra:
        flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64)
        pairs = np.ascontiguousarray(flat.reshape(-1, 2).T)
    else:  # ids and rows are exact in float64 (below 2**53)
        table = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.float64).reshape(-1, 2 + len(extra))
        keep = where.exact(*table[:, 2:].T)
        pairs = np.ascontiguousarray(table[keep, :2].T.astype(np.int64))
    missing = where.missing_sql()
    sums = "".join(f", SUM({expr})" for _name, expr in missing)
    row = db.execute(f"SELECT COUNT(*), SUM(facts IS NULL){sums} FROM files WHERE vec_row IS NOT NULL AND {clause}",
                     params).fetchone()
    counts = {"total": row[0], "unread": row[1] or 0, **{name: n or 0 for (name, _e), n in zip(missing, row[2:])}}
    return pairs, counts


def _fact_columns(db: sqlite3.Connection, clause: str, params: list, cache: "SnapshotCache"):
    """The FactColumns of the files with a vector where `clause`: from the cache, or read now (the
    cameras' names, then one SELECT of every column) and kept in it."""
    import numpy as np

    from .filters import FactColumns

    key = (clause, *params, "facts")
    columns = cache.rows(db, key)
    if columns is not None:
        return columns
    where = f"FROM files WHERE vec_row IS NOT NULL AND {clause}"
    cameras = [name for (name,) in db.execute(f"SELECT DISTINCT camera {where} AND camera IS NOT NULL", params)]
    code = f"CASE camera {' '.join(f'WHEN ? THEN {k}' for k in range(len(cameras)))} ELSE -1 END" if cameras else "-1"
    # One float64 table (ids, rows and seconds are exact below 2**53); NULL as a value no fact has.
    cur = db.execute(f"SELECT id, vec_row, ifnull(facts, 0), ifnull(taken_local, {_NO_VALUE}), "
                     f"ifnull(lat, {_NO_VALUE}), ifnull(lon, {_NO_VALUE}), {code} {where}", [*cameras, *params])
    table = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.float64).reshape(-1, 7)
    known = table[:, 3:6] != _NO_VALUE  # taken_local, lat, lon
    lat, lon = np.where(known[:, 1], table[:, 4], np.nan), np.where(known[:, 2], table[:, 5], np.nan)
    columns = FactColumns(ids=table[:, 0].astype(np.int64), rows=table[:, 1].astype(np.int64), read=table[:, 2] != 0,
                          taken_local=np.where(known[:, 0], table[:, 3], 0).astype(np.int64),
                          lat=lat, lon=lon, camera=table[:, 6].astype(np.int32), cameras=cameras)
    columns.taken_local[~known[:, 0]] = TAKEN_UNKNOWN
    cache.keep(key, columns)
    return columns


_NO_VALUE = -1e300  # what _fact_columns reads for a NULL fact


class SnapshotCache:
    """For a long-lived reader of one index (`altclip serve`): one read connection, and the file
    rows its snapshots read below the last few folders, reused while no one has written the
    index since (SQLite's PRAGMA data_version on that connection: any other connection's
    commit, in any process, changes it). A repeated search then skips the SELECT of every row
    below its folder; a filtered one, once a filter read a folder's dates, places and cameras
    (filters.FactColumns), filters them in numpy whatever its values. One snapshot at a time
    holds it (a lock); close it when done."""

    MAX_FOLDERS = 4  # entries: a folder's rows, two int64 per file (16 MB for a million), or its
    # FactColumns, up to 45 bytes per file (45 MB for a million)

    def __init__(self):
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._file: tuple | None = None  # (st_dev, st_ino) of the database the connection has open
        self._version = None
        self._rows: dict[tuple, object] = {}

    def begin(self, folder: Path) -> sqlite3.Connection:
        """The connection, in a new read transaction (the lock held until end())."""
        self._lock.acquire()
        try:
            st = os.stat(folder / INDEX_DB)
            if self._db is None or self._file != (st.st_dev, st.st_ino):  # new, or the index was rebuilt
                self._drop()
                self._db = connect_readonly(folder)
                self._file = (st.st_dev, st.st_ino)
            self._db.execute("BEGIN")
            return self._db
        except BaseException:
            self._lock.release()
            raise

    def rows(self, db: sqlite3.Connection, key: tuple):
        """The rows kept for `key` if nothing was committed since they were read, else None.
        Call it after the transaction's first read (its data_version is then the snapshot's)."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._rows.clear()
            self._version = version
        return self._rows.get(key)

    def keep(self, key: tuple, kept) -> None:
        self._rows.pop(key, None)
        self._rows[key] = kept
        while len(self._rows) > self.MAX_FOLDERS:
            self._rows.pop(next(iter(self._rows)))

    def end(self) -> None:
        try:
            if self._db is not None and self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop()
        finally:
            self._lock.release()

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self._file, self._version = None, None, None
        self._rows.clear()

    def close(self) -> None:
        with self._lock:
            self._drop()
