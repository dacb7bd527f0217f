"""Compaction of an index's vector file: the vectors no file uses any more (after deletions and
changes) are dropped.

The live rows are written to vectors.f32.new with a new token and fsynced, then one transaction
renumbers the files' rows and commits the new token, then vectors.f32.new replaces vectors.f32.
Killed before the commit, the next writer deletes vectors.f32.new; killed after it, the next
writer finishes the rename (`settle`), and readers meanwhile read vectors.f32.new (its token is
the one committed). A reader whose transaction began before the commit keeps the old file it
mapped.

Cheap to import: numpy is imported inside the functions that need it.
"""
from __future__ import annotations

import itertools
import os
import sqlite3
from pathlib import Path

from ..durable import fsync_dir
from .vectorfile import HEADER_SIZE, ITEMSIZE, VECTORS, VECTORS_NEW, new_token, vectors_header

COMPACT_MIN_UNUSED = 4096  # compact(only_if_worth=True): at least this many unused rows, and a quarter of the file
COPY_ROWS = 4096  # vector rows a compaction copies at a time


def compact(folder: Path, db: sqlite3.Connection, source, dim: int, rows: int, *,
            only_if_worth: bool = False) -> tuple[int, bytes | None] | None:
    """Rewrite the vector file of the index in `folder` (`source`: the writer's open file of
    `rows` committed rows; `db`: its connection, holding the write lock) without the rows no
    file uses: (rows kept, the new file's token; None when every row is used and nothing was
    rewritten). only_if_worth: only when at least COMPACT_MIN_UNUSED rows and a quarter of the
    file are unused (so the rewrite costs at most a few times what was deleted), else None.
    The caller reopens vectors.f32 after a rewrite."""
    import numpy as np

    cur = db.execute("SELECT DISTINCT vec_row FROM files WHERE vec_row IS NOT NULL ORDER BY vec_row")
    used = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64)
    unused = rows - len(used)
    if only_if_worth and not (unused >= COMPACT_MIN_UNUSED and 4 * unused >= rows):
        return None
    if unused == 0:
        return rows, None
    token = new_token()
    write_rows(folder / VECTORS_NEW, source, used, dim, token)
    commit_renumbering(db, used, token)
    put_in_place(folder)
    return len(used), token


def write_rows(path: Path, source, rows, dim: int, token: bytes) -> None:
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


def commit_renumbering(db: sqlite3.Connection, used, token: bytes) -> None:
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


def put_in_place(folder: Path) -> None:
    """vectors.f32.new becomes vectors.f32."""
    os.replace(folder / VECTORS_NEW, folder / VECTORS)
    fsync_dir(folder)


def settle(folder: Path, f, name: str):
    """For a writer that opened `f`, the vector file the database names (`name`): finish the
    compaction a killed run committed (put vectors.f32.new in place and reopen it, positioned
    after the header), or undo one killed before its commit (delete vectors.f32.new). Returns
    the open vectors.f32."""
    if name == VECTORS_NEW:
        f.close()
        put_in_place(folder)
        f = open(folder / VECTORS, "r+b")
        f.seek(HEADER_SIZE)
    elif (folder / VECTORS_NEW).exists():
        (folder / VECTORS_NEW).unlink()
    return f
