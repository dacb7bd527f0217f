"""The index of one model's image embeddings: a folder holding `index.sqlite3` and `vectors.f32`.

By default the folder is `altclip_home()/indexes/<weights id>/` (paths.default_index_folder); a
different model (weights or width) is a different index, and opening an index with another
model's identity is refused, naming both.

index.sqlite3 (stdlib sqlite3, WAL):
  meta(key TEXT PRIMARY KEY, value TEXT): schema_version, model, weights, dim, dtype, created,
      altclip, paths ("absolute", or "relative" to the index folder), vectors_committed (rows of
      vectors.f32 that are committed), and once the first vector is written the settings that
      made it: precision, exact_decode, device_type.
  files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INT, mtime_ns INT,
      content_key TEXT, vec_row INT NULL, error TEXT NULL): one row per image file; vec_row is
      its row in vectors.f32 (NULL when it failed, with the reason in `error`). Duplicates and
      renamed files share a row, so vec_row is not the file id.

vectors.f32: a 64-byte header (magic b"ALTCLIPV", format version, dim, dtype code as
little-endian uint32, a 16-byte token, zero padding, crc32 of the bytes before it), then rows of
`dim` little-endian float32, L2-normalised image embeddings. Append-only between compactions;
readers memory-map it. The token (meta `vectors_token`, all zeros before the first compaction)
names the file's generation: a reader uses the file whose token the database names.

Compaction (`compact`: vectors no file uses any more, after deletions and changes, are dropped):
the live rows are written to vectors.f32.new with a new token and fsynced, then one transaction
renumbers the files' rows and commits the new token, then vectors.f32.new replaces vectors.f32.
Killed before the commit, the next writer deletes vectors.f32.new; killed after it, the next
writer finishes the rename, and readers meanwhile read vectors.f32.new (its token is the one
committed). A reader whose transaction began before the commit keeps the old file it mapped.

Crash safety: a writer appends vectors and fsyncs them, THEN commits the file rows and the new
`vectors_committed` in one SQLite transaction (`append_vectors`, then `commit`). On opening for
writing, vectors.f32 is cut back to `vectors_committed` rows: what a killed run appended but never
committed is dropped. So a kill -9 at any instant leaves an index the next run opens and
continues, and no file row ever points at a vector that was not written.

Concurrency: one writer at a time, by `DIR/.write.lock` (filelock; `DIR/.writer` names its pid);
any number of readers, each `snapshot()` a consistent view (a WAL read transaction, and the
vectors only up to `vectors_committed` as of that transaction).

Reading (what `altclip search` uses)::

    store = IndexStore.open(folder, identity=index_identity(model))    # read-only
    with store.snapshot(under=os.getcwd()) as snap:                    # committed files under cwd
        scores = snap.vectors[snap.rows] @ query                        # snap.rows: int64 (N,)
        best = ...                                                      # positions into snap.rows
        paths = snap.paths_of(snap.file_ids[best])                      # absolute paths

Writing is `altclip_cli.search.update.update_index(get_model, store, roots, ...)` on a store
opened with `write=True, create=True`.

Cheap to import: numpy is imported inside the functions that need it.
"""
from __future__ import annotations

import datetime
import itertools
import json
import os
import sqlite3
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterable

from ..errors import AltclipError
from ..durable import fsync_dir

SCHEMA_VERSION = 1  # what index.sqlite3 holds; an index with a higher one is refused
VECTORS_FORMAT = 1  # the layout of vectors.f32
INDEX_DB = "index.sqlite3"
VECTORS = "vectors.f32"
VECTORS_NEW = VECTORS + ".new"  # a compaction's new file, until it replaces VECTORS
WRITE_LOCK = ".write.lock"
WRITER_INFO = ".writer"  # JSON: pid and command of the lock holder, for the "another writer" message
MAGIC = b"ALTCLIPV"
HEADER_SIZE = 64
TOKEN_AT, TOKEN_SIZE = 20, 16  # the file's generation, in the header after magic, version, dim, dtype
ZERO_TOKEN = bytes(TOKEN_SIZE)  # before the first compaction (and in files of older altclips)
COMPACT_MIN_UNUSED = 4096  # compact(only_if_worth=True): at least this many unused rows, and a quarter of the file
DTYPE_CODES = {"float32": 1}
ROW_DTYPE = "<f4"
ITEMSIZE = 4
SQL_CHUNK = 500  # values per IN (...) query, under SQLite's parameter limit
COPY_ROWS = 4096  # vector rows a compaction copies at a time

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    size INT,
    mtime_ns INT,
    content_key TEXT,
    vec_row INT NULL,
    error TEXT NULL
);
CREATE INDEX IF NOT EXISTS files_content ON files (content_key);
"""


class IndexStoreError(AltclipError):
    """An index cannot be used: missing, damaged, written by a newer altclip, made with another
    model, or being updated by another process. The message names the folder; the hint says how
    to go on (often: rebuild it)."""


class IndexBusy(IndexStoreError):
    """Another writer holds the index's write lock (and did not let go within `wait` seconds)."""


def rebuild_hint(folder: Path) -> str:
    return (f"rebuild it with `altclip index --rebuild --index {folder} PATHS...` (same PATHS as before), "
            f"or delete the folder {folder}")


def _damaged(folder: Path, what: str) -> IndexStoreError:
    return IndexStoreError(f"the index in {folder} is damaged: {what}", hint=rebuild_hint(folder))


def vectors_header(dim: int, token: bytes = ZERO_TOKEN) -> bytes:
    """The 64-byte header of vectors.f32 for rows of `dim` float32, of generation `token`."""
    body = (struct.pack("<8sIII", MAGIC, VECTORS_FORMAT, dim, DTYPE_CODES["float32"]) + token).ljust(
        HEADER_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


class StaleVectors(IndexStoreError):
    """No vector file has the token the database names: a compaction replaced the file after
    this reader's transaction began (begin again), or the index is damaged."""


def _open_matching(folder: Path, dim: int, token: bytes, mode: str = "rb"):
    """(open file positioned after its header, its name): vectors.f32 when its header carries
    `token`, else vectors.f32.new when it does (a compaction committed, not yet renamed).
    StaleVectors when neither does; damaged when vectors.f32 is missing or its header is bad."""
    try:
        f = open(folder / VECTORS, mode)
    except FileNotFoundError:
        raise _damaged(folder, f"{VECTORS} is missing") from None
    except OSError as exc:
        raise IndexStoreError(f"cannot open {folder / VECTORS} ({exc.strerror or exc})") from None
    try:
        header = f.read(HEADER_SIZE)
        _check_header(header, dim, folder)
    except BaseException:
        f.close()
        raise
    if header[TOKEN_AT:TOKEN_AT + TOKEN_SIZE] == token:
        return f, VECTORS
    f.close()
    try:
        f = open(folder / VECTORS_NEW, mode)
    except OSError:
        raise StaleVectors(f"the index in {folder} is damaged: {VECTORS} is not the file its database names",
                           hint=rebuild_hint(folder)) from None
    header = f.read(HEADER_SIZE)
    if (len(header) == HEADER_SIZE and header[TOKEN_AT:TOKEN_AT + TOKEN_SIZE] == token
            and header[-4:] == struct.pack("<I", zlib.crc32(header[:-4]))):
        return f, VECTORS_NEW
    f.close()
    raise StaleVectors(f"the index in {folder} is damaged: {VECTORS} is not the file its database names",
                       hint=rebuild_hint(folder))


def _write_rows(path: Path, source, rows, dim: int, token: bytes) -> None:
    """A new vector file at `path`: the header of generation `token`, then `rows` (int64,
    increasing) of the open vector file `source`, in that order; fsynced."""
    row_bytes = dim * ITEMSIZE
    with open(path, "wb") as out:
        out.write(vectors_header(dim, token))
        fd = source.fileno()
        for start in range(0, len(rows), COPY_ROWS):  # runs of consecutive rows are read at once
            chunk = [int(r) for r in rows[start:start + COPY_ROWS]]
            first = prev = chunk[0]
            for r in chunk[1:] + [None]:
                if r is not None and r == prev + 1:
                    prev = r
                    continue
                out.write(os.pread(fd, (prev - first + 1) * row_bytes, HEADER_SIZE + first * row_bytes))
                first = prev = r
        out.flush()
        os.fsync(out.fileno())


def _commit_renumbering(db: sqlite3.Connection, used, token: bytes) -> None:
    """One transaction: every file's vector row becomes its place among `used`, and the new
    file's token and row count are committed."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TEMP TABLE IF NOT EXISTS renumber (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
        db.execute("DELETE FROM renumber")
        db.executemany("INSERT INTO renumber (old, new) VALUES (?, ?)", zip(used.tolist(), range(len(used))))
        db.execute("UPDATE files SET vec_row = (SELECT new FROM renumber WHERE renumber.old = files.vec_row) "
                   "WHERE vec_row IS NOT NULL")
        db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       [("vectors_committed", str(len(used))), ("vectors_token", token.hex())])
        db.execute("DELETE FROM renumber")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _put_in_place(folder: Path) -> None:
    os.replace(folder / VECTORS_NEW, folder / VECTORS)
    fsync_dir(folder)


def _meta_token(meta: dict) -> bytes:
    try:
        return bytes.fromhex(meta.get("vectors_token") or "") or ZERO_TOKEN
    except ValueError:
        return ZERO_TOKEN


def _check_header(data: bytes, dim: int, folder: Path) -> None:
    if len(data) < HEADER_SIZE:
        raise _damaged(folder, f"{VECTORS} is shorter than its {HEADER_SIZE}-byte header")
    magic, version, file_dim, code = struct.unpack_from("<8sIII", data)
    (crc,) = struct.unpack_from("<I", data, HEADER_SIZE - 4)
    if magic != MAGIC or crc != zlib.crc32(data[:HEADER_SIZE - 4]):
        raise _damaged(folder, f"{VECTORS} does not start with a valid header")
    if version > VECTORS_FORMAT:
        raise IndexStoreError(f"{folder / VECTORS} was written by a newer altclip (vectors format {version}; "
                              f"this altclip reads up to {VECTORS_FORMAT})",
                              hint="upgrade altclip (pip install -U altclip), or " + rebuild_hint(folder))
    if file_dim != dim or code != DTYPE_CODES["float32"]:
        raise _damaged(folder, f"{VECTORS} holds {file_dim}-wide rows of type {code}; "
                               f"the database says {dim}-wide float32")




def _connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, durable commits."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class IndexStore:
    """One index folder (see the module doc). Open it with `IndexStore.open`; close it (or use it
    as a context manager) to release the write lock.

    Attributes: `folder` (absolute), `meta` (dict of str, as read when opened; a writer keeps it
    current), `dim`, `writable`, `relative` (paths stored relative to the folder)."""

    def __init__(self, folder: Path, db: sqlite3.Connection, meta: dict, *, writable: bool, lock=None):
        self.folder = folder
        self._db = db
        self.meta = meta
        self.dim = int(meta["dim"])
        self.writable = writable
        self.relative = meta.get("paths") == "relative"
        self._lock = lock
        self._vf = None  # vectors.f32: "r+b" for a writer, "rb" for a reader (opened on first need)
        self.rows = int(meta.get("vectors_committed", "0"))  # vectors written (committed, for a reader)
        self.row_bytes = self.dim * ITEMSIZE

    # --- opening ------------------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | os.PathLike, *, identity: dict | None = None, write: bool = False,
             create: bool = False, wait: float = 0.0, rebuild: bool = False,
             relative_paths: bool = False, writer: str | None = None) -> "IndexStore":
        """Open the index in `folder`.

        identity: {"model": str, "weights": str, "dim": int} (see update.index_identity); when
        given, an index made by another model (weights or dim) is an IndexStoreError naming both.
        write: take the write lock (waiting up to `wait` seconds for another writer; 0: fail at
        once, naming its pid) and cut vectors.f32 back to its committed rows. create: make the
        index if there is none (needs write and identity); relative_paths: a new index stores
        paths relative to its folder (so the folder can move with the images it indexes).
        rebuild: (with write) delete the index first, damaged or not, and start an empty one.
        writer: how another writer's refusal names this one while it holds the lock ("altclip index").
        Raises IndexStoreError: no index (without create), damaged, newer schema, another model,
        locked by another writer.
        """
        folder = Path(os.path.realpath(os.path.expanduser(os.fspath(folder))))
        if create and (not write or identity is None):
            raise ValueError("create=True needs write=True and an identity")
        if (rebuild or relative_paths) and not write:
            raise ValueError("rebuild and relative_paths need write=True")
        lock = None
        if write:
            if create:
                try:
                    folder.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise IndexStoreError(f"cannot create the index folder {folder} ({exc.strerror or exc})") from None
            elif not folder.is_dir():
                raise _missing(folder)
            lock = _acquire_write_lock(folder, wait, writer)
        try:
            if rebuild:
                _remove_index_files(folder)
            db, meta = _open_db(folder, create=create, identity=identity, relative_paths=relative_paths)
            try:
                if identity is not None:
                    _check_identity(meta, identity, folder)
                store = cls(folder, db, meta, writable=write, lock=lock)
                store._open_vectors()
            except BaseException:
                db.close()
                raise
            return store
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def _open_vectors(self) -> None:
        """The vector file the database names (see the module doc). A writer finishes or undoes
        a compaction a killed run left half-way; a reader that finds the file replaced since it
        read the meta reads the meta again."""
        for attempt in range(5):
            try:
                f, name = _open_matching(self.folder, self.dim, _meta_token(self.meta),
                                         "r+b" if self.writable else "rb")
                break
            except StaleVectors:
                if self.writable or attempt == 4:
                    raise
                self._reread_meta()
        if self.writable:
            if name == VECTORS_NEW:  # the compaction was committed: put its file in place
                f.close()
                os.replace(self.folder / VECTORS_NEW, self.folder / VECTORS)
                fsync_dir(self.folder)
                f = open(self.folder / VECTORS, "r+b")
                f.seek(HEADER_SIZE)
            elif (self.folder / VECTORS_NEW).exists():  # a compaction killed before its commit
                (self.folder / VECTORS_NEW).unlink()
        try:
            size = os.fstat(f.fileno()).st_size
            need = HEADER_SIZE + self.rows * self.row_bytes
            if size < need:
                raise _damaged(self.folder, f"{name} holds {(size - HEADER_SIZE) // self.row_bytes} rows; "
                                            f"{self.rows} are committed")
            if self.writable and size > need:  # appended by a run that was killed before it committed
                f.truncate(need)
                os.fsync(f.fileno())
        except BaseException:
            f.close()
            raise
        self._vf = f

    def _reread_meta(self) -> None:
        meta = _read_meta(self._db)
        if meta is not None:
            self.meta = meta
            self.rows = int(meta.get("vectors_committed", "0"))

    def close(self) -> None:
        """Close the files and release the write lock."""
        if self._vf is not None:
            self._vf.close()
            self._vf = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            try:
                (self.folder / WRITER_INFO).unlink(missing_ok=True)
            except OSError:
                pass
            self._lock.release()
            self._lock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # --- paths ----------------------------------------------------------------------------------------

    def key_of(self, path: str | os.PathLike) -> str:
        """The stored form of an absolute path: itself, or relative to the folder ('/' separated)."""
        path = os.path.abspath(os.fspath(path))
        if self.relative:
            path = os.path.relpath(path, self.folder)
        return path.replace(os.sep, "/") if os.sep != "/" else path

    def path_of(self, key: str) -> str:
        """The absolute path of a stored path."""
        if self.relative:
            return os.path.normpath(os.path.join(self.folder, key))
        return key

    def under_clause(self, under: str | os.PathLike | None) -> tuple[str, list]:
        """SQL (for `WHERE`) and parameters selecting the files at or below `under` (None: all),
        as ranges on the UNIQUE path index."""
        if under is None:
            return "1", []
        key = self.key_of(os.path.realpath(os.fspath(under)))
        if key == "/":
            return "1", []
        parts = key.split("/")
        if all(p in ("..", ".") for p in parts):  # a folder at or above the index folder (relative paths)
            ups = sum(1 for p in parts if p == "..")
            prefix = "../" * (ups + 1)  # paths that go further up are not below `under`
            return "(path < ? OR path >= ?)", [prefix, prefix[:-1] + "0"]
        return "(path = ? OR (path >= ? AND path < ?))", [key, key + "/", key + "0"]  # '0' follows '/'

    # --- reading --------------------------------------------------------------------------------------

    def rows_under(self, under: str | os.PathLike | None) -> dict[str, tuple]:
        """Every indexed file at or below `under`, by stored path, in one SELECT: plain tuples
        (path, id, size, mtime_ns, vec_row or None, 1 if an error is recorded else 0), the
        cheapest Python objects for a million rows."""
        clause, params = self.under_clause(under)
        cur = self._db.execute(
            f"SELECT path, id, size, mtime_ns, vec_row, error IS NOT NULL FROM files WHERE {clause}", params)
        return {row[0]: row for row in cur}

    def count(self) -> tuple[int, int]:
        """(files with a vector, files with an error) in the whole index."""
        ok, failed = self._db.execute(
            "SELECT COUNT(vec_row), COUNT(error) FROM files").fetchone()
        return int(ok), int(failed)

    def sizes_with_vectors(self) -> set[int]:
        """The sizes of the indexed files that have a vector (content keys start with the size,
        so only a file of one of these sizes can share a vector with an indexed one)."""
        return {s for (s,) in self._db.execute("SELECT DISTINCT size FROM files WHERE vec_row IS NOT NULL")}

    def find_vectors(self, content_key: str) -> list[tuple[int, int]]:
        """(file id, vec_row) of the indexed files with this content key and a vector, by id."""
        cur = self._db.execute(
            "SELECT id, vec_row FROM files WHERE content_key = ? AND vec_row IS NOT NULL ORDER BY id", (content_key,))
        return [(int(i), int(v)) for i, v in cur]

    def lookup(self, paths: Iterable[str | os.PathLike]) -> dict:
        """{path as given: (size, mtime_ns, vec_row or None, error or None)} for the paths the index
        holds (others are left out). Paths are taken as named (altclip_cli.paths.index_names gives
        the names a file may be held under)."""
        keys: dict[str, list] = {}
        for p in paths:
            try:
                keys.setdefault(self.key_of(p), []).append(p)
            except ValueError:  # relpath across drives (Windows)
                continue
        out = {}
        items = [k for k in keys if _encodable(k)]
        own = not self._db.in_transaction
        if own:  # the rows and the vector file they number, as of one moment
            self._db.execute("BEGIN")
        try:
            self._follow_compaction()
            for start in range(0, len(items), SQL_CHUNK):
                chunk = items[start:start + SQL_CHUNK]
                marks = ",".join("?" * len(chunk))
                cur = self._db.execute(
                    f"SELECT path, size, mtime_ns, vec_row, error FROM files WHERE path IN ({marks})", chunk)
                for key, size, mtime_ns, vec_row, error in cur:
                    for p in keys[key]:
                        out[p] = (size, mtime_ns, vec_row, error)
        finally:
            if own:
                self._db.execute("COMMIT")
        return out

    def _follow_compaction(self) -> None:
        """A reader whose vector file a compaction (by another process) replaced opens the new
        one, so that the rows it reads next (in the same transaction) number that file's."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'vectors_token'").fetchone()
        if self.writable or _meta_token({"vectors_token": row[0] if row else None}) == _meta_token(self.meta):
            return
        self._reread_meta()
        if self._vf is not None:
            self._vf.close()
            self._vf = None
        self._open_vectors()

    def vector(self, vec_row: int):
        """Row `vec_row` of vectors.f32: a (dim,) float32 array."""
        return self.vectors_at([vec_row])[0]

    def vectors_at(self, vec_rows):
        """Rows of vectors.f32, in the order given: an (N, dim) float32 array."""
        import numpy as np

        out = np.empty((len(vec_rows), self.dim), np.float32)
        fd = self._vf.fileno()
        for i, row in enumerate(vec_rows):
            data = os.pread(fd, self.row_bytes, HEADER_SIZE + int(row) * self.row_bytes)
            if len(data) != self.row_bytes or row < 0:
                raise _damaged(self.folder, f"vector row {row} is past the end of {VECTORS}")
            out[i] = np.frombuffer(data, ROW_DTYPE)
        return out

    def snapshot(self, under: str | os.PathLike | None = None, *, cache: "SnapshotCache | None" = None) -> "Snapshot":
        """A consistent read-only view of the committed files with a vector at or below `under`
        (all when None), taken in one SQLite read transaction (see Snapshot). Close it (or use it as
        a context manager) when done: it holds that read transaction. cache: a long-lived
        reader's SnapshotCache of this index (its connection, and the rows of recent folders)."""
        for attempt in range(5):
            try:
                return self._snapshot(under, cache)
            except StaleVectors:  # replaced by a compaction after this transaction began
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _snapshot(self, under, cache) -> "Snapshot":
        import numpy as np

        db = cache.begin(self.folder) if cache is not None else _connect_readonly(self.folder)
        try:
            if cache is None:
                db.execute("BEGIN")
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('vectors_committed', 'vectors_token')"))
            committed = int(meta["vectors_committed"])
            clause, params = self.under_clause(under)
            pairs = cache.rows(db, (clause, *params)) if cache is not None else None
            if pairs is None:
                cur = db.execute(f"SELECT id, vec_row FROM files WHERE vec_row IS NOT NULL AND {clause}", params)
                flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64)
                pairs = np.ascontiguousarray(flat.reshape(-1, 2).T)  # (2, N): ids, vector rows
                if cache is not None:
                    cache.keep((clause, *params), pairs)
            if pairs.shape[1] and int(pairs[1].max()) >= committed:
                raise _damaged(self.folder, "a file row points past the committed vectors")
            vectors = _map_vectors(self.folder, committed, self.dim, _meta_token(meta))
        except BaseException as exc:
            cache.end() if cache is not None else db.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise _damaged(self.folder, f"{INDEX_DB}: {exc}") from None
            raise
        return Snapshot(self, db, vectors, pairs[1], pairs[0], cache=cache)

    # --- writing --------------------------------------------------------------------------------------

    def append_vectors(self, array) -> int:
        """Append rows (N, dim) to vectors.f32 and fsync them; return the first new row's number.
        They belong to the index only once `commit` has run."""
        import numpy as np

        self._need_write()
        data = np.ascontiguousarray(array, dtype=ROW_DTYPE)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {data.shape} for a {self.dim}-wide index")
        first = self.rows
        self._vf.seek(HEADER_SIZE + first * self.row_bytes)
        self._vf.write(data.tobytes())
        self._vf.flush()
        os.fsync(self._vf.fileno())
        self.rows = first + len(data)
        return first

    def commit(self, *, upserts: Iterable[tuple] = (), deletes: Iterable[int] = (), meta: dict | None = None) -> None:
        """One transaction: insert or update file rows, delete file rows by id, set meta keys and
        `vectors_committed` (every vector appended so far).
        upserts: (path key, size, mtime_ns, content_key, vec_row or None, error or None)."""
        self._need_write()
        upserts, deletes = list(upserts), list(deletes)
        for row in upserts:
            if row[4] is not None and not 0 <= row[4] < self.rows:
                raise ValueError(f"vector row {row[4]} is not written (rows: {self.rows})")
        values = {**(meta or {}), "vectors_committed": self.rows}
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            for start in range(0, len(deletes), SQL_CHUNK):
                chunk = deletes[start:start + SQL_CHUNK]
                db.execute(f"DELETE FROM files WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            db.executemany(
                "INSERT INTO files (path, size, mtime_ns, content_key, vec_row, error) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "content_key = excluded.content_key, vec_row = excluded.vec_row, error = excluded.error",
                upserts)
            db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                           [(k, str(v)) for k, v in values.items()])
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.meta.update({k: str(v) for k, v in values.items()})

    def compact(self, *, only_if_worth: bool = False) -> tuple[int, int] | None:
        """Rewrite the vector file without the rows no file uses any more (deleted or changed
        since), crash-safe (see the module doc): (rows before, rows after). only_if_worth: only
        when at least COMPACT_MIN_UNUSED rows and a quarter of the file are unused (so the
        rewrite costs at most a few times what was deleted), else None."""
        import numpy as np

        self._need_write()
        cur = self._db.execute("SELECT DISTINCT vec_row FROM files WHERE vec_row IS NOT NULL ORDER BY vec_row")
        used = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64)
        before = self.rows
        unused = before - len(used)
        if only_if_worth and not (unused >= COMPACT_MIN_UNUSED and 4 * unused >= before):
            return None
        if unused == 0:
            return before, before
        token = os.urandom(TOKEN_SIZE)
        _write_rows(self.folder / VECTORS_NEW, self._vf, used, self.dim, token)
        _commit_renumbering(self._db, used, token)
        self.meta.update(vectors_committed=str(len(used)), vectors_token=token.hex())
        self.rows = len(used)
        _put_in_place(self.folder)
        self._vf.close()
        self._vf = open(self.folder / VECTORS, "r+b")
        return before, len(used)

    def _need_write(self) -> None:
        if not self.writable or self._db is None:
            raise RuntimeError("the index is not open for writing")


class Snapshot:
    """A consistent view of an index (see IndexStore.snapshot).

    vectors: (committed rows, dim) float32, a read-only np.memmap of vectors.f32 (rows that no
        current file uses are in it too: index it with `rows`).
    rows: int64 (N,), the vector row of each file at or below `under` that has a vector.
    file_ids: int64 (N,), those files' ids (same order as rows).
    count: N.
    paths_of(file_ids): their absolute paths (meant for a few, e.g. the top k)."""

    def __init__(self, store: IndexStore, db: sqlite3.Connection, vectors, rows, file_ids,
                 cache: "SnapshotCache | None" = None):
        self.store = store
        self._db = db
        self._cache = cache
        self.vectors = vectors
        self.rows = rows
        self.file_ids = file_ids

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


class SnapshotCache:
    """For a long-lived reader of one index (`altclip serve`): one read connection, and the file
    rows its snapshots read below the last few folders, reused while no one has written the
    index since (SQLite's PRAGMA data_version on that connection: any other connection's
    commit, in any process, changes it). A repeated search then skips the SELECT of every row
    below its folder. One snapshot at a time holds it (a lock); close it when done."""

    MAX_FOLDERS = 4  # each holds two int64 per file below its folder (16 MB for a million)

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
                self._db = _connect_readonly(folder)
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

    def keep(self, key: tuple, pairs) -> None:
        self._rows.pop(key, None)
        self._rows[key] = pairs
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


# --- helpers -----------------------------------------------------------------------------------------


def _missing(folder: Path) -> IndexStoreError:
    return IndexStoreError(f"there is no index in {folder}",
                           hint="build one with `altclip index PATHS...` (add --index DIR for this folder)")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _acquire_write_lock(folder: Path, wait: float, writer: str | None):
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / WRITE_LOCK), timeout=max(0.0, wait))
    try:
        lock.acquire()
    except Timeout:
        who = "another altclip process"
        try:
            info = json.loads((folder / WRITER_INFO).read_text(encoding="utf-8"))
            who = f"another {info.get('command') or 'altclip process'} (pid {int(info['pid'])})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        hint = "wait for it to finish, or pass --wait 600 to wait up to 10 minutes for it"
        raise IndexBusy(f"{who} is updating {folder}", hint=hint) from None
    except OSError as exc:
        raise IndexStoreError(f"cannot lock the index in {folder} ({exc.strerror or exc})") from None
    try:
        (folder / WRITER_INFO).write_text(json.dumps({"pid": os.getpid(), "command": writer}), encoding="utf-8")
    except OSError:
        pass
    return lock


def _remove_index_files(folder: Path) -> None:
    """The database first: without it the folder holds no index, whatever else is left."""
    for name in (INDEX_DB, INDEX_DB + "-wal", INDEX_DB + "-shm", VECTORS, VECTORS_NEW):
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError as exc:
            raise IndexStoreError(f"cannot remove {folder / name} ({exc.strerror or exc})") from None
    fsync_dir(folder)


def _read_meta(db: sqlite3.Connection) -> dict | None:
    """meta as a dict, or None when the database has no index in it (yet)."""
    has = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if not has:
        return None
    meta = dict(db.execute("SELECT key, value FROM meta"))
    return meta if "schema_version" in meta else None


def _open_db(folder: Path, *, create: bool, identity: dict | None, relative_paths: bool):
    path = folder / INDEX_DB
    if not path.exists() and not create:
        raise _missing(folder)
    try:
        db = _connect(path)
    except sqlite3.DatabaseError as exc:
        if path.exists():
            raise _damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None
        raise IndexStoreError(f"cannot create {path} ({exc})") from None
    try:
        meta = _read_meta(db)
        if meta is None:
            if not create:
                raise _missing(folder)
            meta = _create(db, folder, identity, relative_paths)
        _check_schema(meta, folder)
        return db, meta
    except sqlite3.DatabaseError as exc:
        db.close()
        raise _damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None
    except BaseException:
        db.close()
        raise


def _create(db: sqlite3.Connection, folder: Path, identity: dict, relative_paths: bool) -> dict:
    """vectors.f32 with its header first, then the schema and meta in one transaction: a run
    killed in between leaves no index, and the next run starts this one again."""
    from ..version import __version__

    dim = int(identity["dim"])
    tmp = folder / f".{VECTORS}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(vectors_header(dim))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / VECTORS)
    fsync_dir(folder)
    meta = {"schema_version": str(SCHEMA_VERSION), "model": str(identity["model"]),
            "weights": str(identity["weights"]), "dim": str(dim), "dtype": "float32",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "altclip": __version__, "paths": "relative" if relative_paths else "absolute",
            "vectors_committed": "0"}
    db.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA.strip().split(";"):
            if statement.strip():
                db.execute(statement)
        db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return meta


def _check_schema(meta: dict, folder: Path) -> None:
    try:
        version = int(meta["schema_version"])
        int(meta["dim"]), int(meta.get("vectors_committed", "0"))
    except (KeyError, ValueError):
        raise _damaged(folder, f"{INDEX_DB} has unreadable settings") from None
    if version > SCHEMA_VERSION:
        raise IndexStoreError(
            f"the index in {folder} was written by a newer altclip (index schema {version}; "
            f"this altclip reads up to {SCHEMA_VERSION})",
            hint="upgrade altclip (pip install -U altclip), or " + rebuild_hint(folder))


def _check_identity(meta: dict, identity: dict, folder: Path) -> None:
    if meta.get("weights") == str(identity["weights"]) and meta.get("dim") == str(int(identity["dim"])):
        return
    theirs = f"{meta.get('model')} (weights {meta.get('weights')}, {meta.get('dim')} dims)"
    ours = f"{identity['model']} (weights {identity['weights']}, {identity['dim']} dims)"
    raise IndexStoreError(
        f"the index in {folder} was made with another model: {theirs}; this run uses {ours}",
        hint=f"use that model (-m {meta.get('model')}), another --index folder, or --rebuild to start "
             "this index over with this model")


def _connect_readonly(folder: Path) -> sqlite3.Connection:
    try:
        return _connect(folder / INDEX_DB)
    except sqlite3.DatabaseError as exc:
        raise _damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None


def _map_vectors(folder: Path, rows: int, dim: int, token: bytes):
    """The first `rows` rows of the vector file of generation `token` as a read-only memmap
    (header and length checked). The mapping stays valid when a compaction replaces the file."""
    import numpy as np

    f, name = _open_matching(folder, dim, token)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE + rows * dim * ITEMSIZE:
            held = (size - HEADER_SIZE) // (dim * ITEMSIZE)
            raise _damaged(folder, f"{name} holds {held} rows; {rows} are committed")
        if rows == 0:
            return np.zeros((0, dim), np.float32)
        return np.memmap(f, dtype=ROW_DTYPE, mode="r", offset=HEADER_SIZE, shape=(rows, dim))
