"""The index of one model's image embeddings: a folder holding `index.sqlite3` and `vectors.f32`.

By default the folder is `altclip_home()/indexes/<weights id>/` (paths.default_index_folder); a
different model (weights or width) is a different index, and opening an index with another
model's identity is refused, naming both.

IndexStore composes the parts, each in its module:
  database.py    index.sqlite3: the files' rows and the settings (meta), connections, checks;
  vectorfile.py  vectors.f32: the header, the generation token, mapping the committed rows;
  compaction.py  rewriting vectors.f32 without unused rows, crash-safe;
  snapshot.py    consistent read-only views, and a long-lived reader's cache;
  writelock.py   one writer at a time;
  errors.py      IndexStoreError and its kinds.

Crash safety: a writer appends vectors and fsyncs them, THEN commits the file rows and the new
`vectors_committed` in one SQLite transaction (`append_vectors`, then `commit`). On opening for
writing, vectors.f32 is cut back to `vectors_committed` rows: what a killed run appended but never
committed is dropped. So a kill -9 at any instant leaves an index the next run opens and
continues, and no file row ever points at a vector that was not written.

Concurrency: one writer at a time (writelock.py); any number of readers, each `snapshot()` a
consistent view (a WAL read transaction, and the vectors only up to `vectors_committed` as of that
transaction).

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
import os
import sqlite3
from pathlib import Path
from typing import Iterable

from ..durable import fsync_dir
from . import compaction
from .database import (INDEX_DB, SCHEMA_VERSION, SQL_CHUNK, check_identity, check_schema, meta_token, open_db,
                       read_meta, upgrade, write_schema)
from .errors import IndexBusy, IndexStoreError, OtherModelsIndex, StaleVectors, damaged, missing
from .filters import SearchFilter
from .facts import FACT_COLUMNS, PhotoFacts, read_facts_by_id
from .snapshot import Snapshot, SnapshotCache, take_snapshot
from .vectorfile import (HEADER_SIZE, ITEMSIZE, ROW_DTYPE, VECTORS, VECTORS_NEW, new_token, open_matching,
                         vectors_header)
from .writelock import acquire_write_lock, release_write_lock

# What callers take from here besides IndexStore (each defined in the module it is imported from).
__all__ = ["HEADER_SIZE", "INDEX_DB", "VECTORS", "IndexBusy", "IndexStore", "IndexStoreError", "OtherModelsIndex",
           "Snapshot", "SnapshotCache"]


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
        Raises IndexStoreError: no index (without create), damaged, newer schema, another model
        (OtherModelsIndex), locked by another writer (IndexBusy).
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
                raise missing(folder)
            lock = acquire_write_lock(folder, wait, writer)
        try:
            if rebuild:
                _remove_index_files(folder)
            for attempt in range(5):
                try:
                    return cls._open_files(folder, identity, write, create, relative_paths, lock)
                except StaleVectors:  # a reader, and the index was rebuilt after it read the settings
                    if write or attempt == 4:
                        raise
            raise AssertionError("unreachable")
        except BaseException:
            if lock is not None:
                release_write_lock(folder, lock)
            raise

    @classmethod
    def _open_files(cls, folder: Path, identity, write, create, relative_paths, lock) -> "IndexStore":
        """The store on a new connection to the database and the vector file it names."""
        db, meta = open_db(folder, create=create)
        try:
            if meta is None:
                meta = _create(db, folder, identity, relative_paths)
            check_schema(meta, folder)
            if identity is not None:
                check_identity(meta, identity, folder)
            if write and int(meta["schema_version"]) < SCHEMA_VERSION:
                meta = upgrade(db, meta)
            store = cls(folder, db, meta, writable=write, lock=lock)
            store._open_vectors()
            return store
        except sqlite3.DatabaseError as exc:
            db.close()
            raise damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None
        except BaseException:
            db.close()
            raise

    def _open_vectors(self) -> None:
        """The vector file the database names (see the module doc). A writer finishes or undoes
        a compaction a killed run left half-way; a reader that finds the file replaced since it
        read the meta reads the meta again."""
        for attempt in range(5):
            try:
                f, name = open_matching(self.folder, self.dim, meta_token(self.meta),
                                         "r+b" if self.writable else "rb")
                break
            except StaleVectors:
                if self.writable or attempt == 4:
                    raise
                self._reread_meta()
        if self.writable:  # finish or undo a compaction a killed run left
            f = compaction.settle(self.folder, f, name)
        try:
            size = os.fstat(f.fileno()).st_size
            need = HEADER_SIZE + self.rows * self.row_bytes
            if size < need:
                raise damaged(self.folder, f"{name} holds {(size - HEADER_SIZE) // self.row_bytes} rows; "
                                            f"{self.rows} are committed")
            if self.writable and size > need:  # appended by a run that was killed before it committed
                f.truncate(need)
                os.fsync(f.fileno())
        except BaseException:
            f.close()
            raise
        self._vf = f

    def _reread_meta(self) -> None:
        meta = read_meta(self._db)
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
            release_write_lock(self.folder, self._lock)
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
        from ..paths import real_root

        key = self.key_of(real_root(under))  # as the index names it: a symlink to a file under its own name
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
        """The sizes of the indexed files that have a vector and a content key (only a file of
        one of these sizes can share its content with one of them)."""
        cur = self._db.execute("SELECT DISTINCT size FROM files WHERE vec_row IS NOT NULL AND content_key IS NOT NULL")
        return {s for (s,) in cur}

    def without_keys(self, sizes: Iterable[int]) -> list[tuple]:
        """(stored path, size, mtime_ns, vec_row) of the indexed files of these sizes that have a
        vector but no content key (indexed by an older altclip, or their key could not be read)."""
        sizes, out = sorted(set(sizes)), []
        for start in range(0, len(sizes), SQL_CHUNK):
            chunk = sizes[start:start + SQL_CHUNK]
            out += self._db.execute(
                "SELECT path, size, mtime_ns, vec_row FROM files WHERE content_key IS NULL AND vec_row IS NOT NULL "
                f"AND size IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        return out

    def find_vectors(self, content_key: str) -> list[tuple[int, int]]:
        """(file id, vec_row) of the indexed files with this content key and a vector, by id."""
        cur = self._db.execute(
            "SELECT id, vec_row FROM files WHERE content_key = ? AND vec_row IS NOT NULL ORDER BY id", (content_key,))
        return [(int(i), int(v)) for i, v in cur]

    def facts_by_id(self, file_ids: Iterable[int]) -> dict[int, PhotoFacts]:
        """{file id: PhotoFacts} of the files among these whose facts were read."""
        return read_facts_by_id(self._db, file_ids)

    def without_facts(self, under: str | os.PathLike | None) -> list[tuple]:
        """(stored path, size, mtime_ns) of the files with a vector at or below `under` whose
        facts were never read (indexed by an older altclip, or through a server)."""
        clause, params = self.under_clause(under)
        return self._db.execute(
            f"SELECT path, size, mtime_ns FROM files WHERE facts IS NULL AND vec_row IS NOT NULL AND {clause}",
            params).fetchall()

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
        if self.writable or meta_token({"vectors_token": row[0] if row else None}) == meta_token(self.meta):
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
                raise damaged(self.folder, f"vector row {row} is past the end of {VECTORS}")
            out[i] = np.frombuffer(data, ROW_DTYPE)
        return out

    def snapshot(self, under: str | os.PathLike | None = None, *, cache: "SnapshotCache | None" = None,
                 where: SearchFilter | None = None) -> "Snapshot":
        """A consistent read-only view of the committed files with a vector at or below `under`
        (all when None), taken in one SQLite read transaction (see Snapshot). Close it (or use it as
        a context manager) when done: it holds that read transaction. cache: a long-lived
        reader's SnapshotCache of this index (its connection, and the rows of recent folders).
        where: a filters.SearchFilter: only the files it keeps (None: all)."""
        return take_snapshot(self, under, cache, where)

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

    def commit(self, *, upserts: Iterable[tuple] = (), deletes: Iterable[int] = (), meta: dict | None = None,
               facts: dict | None = None) -> None:
        """One transaction: insert or update file rows, delete file rows by id, set meta keys and
        `vectors_committed` (every vector appended so far).
        upserts: (path key, size, mtime_ns, content_key, vec_row or None, error or None); an
        upserted row whose size or mtime changed loses its facts (unless `facts` gives them).
        facts: {path key: facts.PhotoFacts} of rows upserted now or already held (None: the file
        could not be decoded; it is marked read, with no facts, so it is not decoded again)."""
        self._need_write()
        upserts, deletes, facts = list(upserts), list(deletes), dict(facts or {})
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
                "content_key = excluded.content_key, vec_row = excluded.vec_row, error = excluded.error, "
                + ", ".join(f"{c} = {_KEPT_IF_SAME_FILE.format(c=c)}" for c in ("facts", *FACT_COLUMNS)),
                upserts)
            db.executemany(
                f"UPDATE files SET facts = 1, {', '.join(f'{c} = ?' for c in FACT_COLUMNS)} WHERE path = ?",
                [(*(f.row() if f is not None else _NO_FACTS), key) for key, f in facts.items()])
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
        since), crash-safe (see compaction.py): (rows before, rows after). only_if_worth: only
        when at least COMPACT_MIN_UNUSED rows and a quarter of the file are unused (so the
        rewrite costs at most a few times what was deleted), else None."""
        self._need_write()
        done = compaction.compact(self.folder, self._db, self._vf, self.dim, self.rows, only_if_worth=only_if_worth)
        if done is None:
            return None
        before, (kept, token) = self.rows, done
        if token is not None:
            self.meta.update(vectors_committed=str(kept), vectors_token=token.hex())
            self.rows = kept
            self._vf.close()
            self._vf = open(self.folder / VECTORS, "r+b")
        return before, kept

    def _need_write(self) -> None:
        if not self.writable or self._db is None:
            raise RuntimeError("the index is not open for writing")


# An upserted row keeps its facts only while it is the same file (size and mtime): a changed
# file's facts are read again.
_KEPT_IF_SAME_FILE = "CASE WHEN files.size IS excluded.size AND files.mtime_ns IS excluded.mtime_ns THEN files.{c} END"
_NO_FACTS = (None,) * (len(FACT_COLUMNS) - 1) + (0,)  # a file read whose pixels could not be decoded


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _remove_index_files(folder: Path) -> None:
    """The database first: without it the folder holds no index, whatever else is left."""
    for name in (INDEX_DB, INDEX_DB + "-wal", INDEX_DB + "-shm", VECTORS, VECTORS_NEW):
        try:
            (folder / name).unlink(missing_ok=True)
        except OSError as exc:
            raise IndexStoreError(f"cannot remove {folder / name} ({exc.strerror or exc})") from None
    fsync_dir(folder)


def _create(db: sqlite3.Connection, folder: Path, identity: dict, relative_paths: bool) -> dict:
    """vectors.f32 with its header first, then the schema and meta in one transaction: a run
    killed in between leaves no index, and the next run starts this one again."""
    from ..version import __version__

    dim = int(identity["dim"])
    token = new_token()  # this index's own: a reader of the index it replaces never takes its file for theirs
    tmp = folder / f".{VECTORS}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(vectors_header(dim, token))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / VECTORS)
    fsync_dir(folder)
    meta = {"schema_version": str(SCHEMA_VERSION), "model": str(identity["model"]),
            "weights": str(identity["weights"]), "dim": str(dim), "dtype": "float32",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "altclip": __version__, "paths": "relative" if relative_paths else "absolute",
            "vectors_committed": "0", "vectors_token": token.hex()}
    write_schema(db, meta)
    return meta
