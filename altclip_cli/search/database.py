"""index.sqlite3, the database of an index (stdlib sqlite3, WAL): its schema, connections, and
the checks of its settings.

  meta(key TEXT PRIMARY KEY, value TEXT): schema_version, model, weights, dim, dtype, created,
      altclip, paths ("absolute", or "relative" to the index folder), vectors_committed (rows of
      vectors.f32 that are committed), vectors_token (the generation of vectors.f32 those rows
      are in), and once the first vector is written the settings that made it: precision,
      exact_decode, device_type.
  files(id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, size INT, mtime_ns INT,
      content_key TEXT, vec_row INT NULL, error TEXT NULL): one row per image file; vec_row is
      its row in vectors.f32 (NULL when it failed, with the reason in `error`). Duplicates and
      renamed files share a row, so vec_row is not the file id. content_key: "sha256:SIZE:HEX",
      the size and sha256 of every byte of the file (update.content_key_of), or NULL (unknown).
      The photo's facts (facts.py, FACT_COLUMNS), NULL where unknown: facts (1 once they were
      read from the file's current content; NULL: not yet, `altclip index` reads them), taken
      (ISO 8601), taken_local (the naive wall-clock time in seconds since 1970-01-01T00:00:00),
      taken_source, lat, lon, camera, width, height (after orientation), phash (the 64-bit
      perceptual hash as a signed integer), phash_low (1: a blank frame whose hash says nothing).

Schema versions: 1 keyed content by a hash of the first 1 MiB and the last 64 KiB only (so two
different images could share a vector); 2 by the whole file; 3 adds the photo facts. A writer
upgrades an index (upgrade).
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

from .errors import IndexStoreError, OtherModelsIndex, damaged, missing, rebuild_hint
from .vectorfile import ZERO_TOKEN

SCHEMA_VERSION = 3  # what index.sqlite3 holds; an index with a higher one is refused, a lower one upgraded
INDEX_DB = "index.sqlite3"
SQL_CHUNK = 500  # values per IN (...) query, under SQLite's parameter limit

# The columns schema 3 added to `files`, with their types (an upgrade adds them).
FACT_COLUMN_TYPES = (("facts", "INT"), ("taken", "TEXT"), ("taken_local", "INT"), ("taken_source", "TEXT"),
                     ("lat", "REAL"), ("lon", "REAL"), ("camera", "TEXT"), ("width", "INT"), ("height", "INT"),
                     ("phash", "INT"), ("phash_low", "INT"))

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    size INT,
    mtime_ns INT,
    content_key TEXT,
    vec_row INT NULL,
    error TEXT NULL,
    facts INT NULL,
    taken TEXT NULL,
    taken_local INT NULL,
    taken_source TEXT NULL,
    lat REAL NULL,
    lon REAL NULL,
    camera TEXT NULL,
    width INT NULL,
    height INT NULL,
    phash INT NULL,
    phash_low INT NULL
);
CREATE INDEX IF NOT EXISTS files_content ON files (content_key);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, durable commits."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


def connect_readonly(folder: Path) -> sqlite3.Connection:
    """A reader's connection to the database in `folder` (damaged when it cannot be read)."""
    try:
        return connect(folder / INDEX_DB)
    except sqlite3.DatabaseError as exc:
        raise damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None


def open_db(folder: Path, *, create: bool) -> tuple[sqlite3.Connection, dict | None]:
    """(connection, meta) of the database in `folder`; meta is None when it holds no index yet
    (only with create: else that is an IndexStoreError, as a missing or unreadable database is)."""
    path = folder / INDEX_DB
    if not path.exists() and not create:
        raise missing(folder)
    try:
        db = connect(path)
    except sqlite3.DatabaseError as exc:
        if path.exists():
            raise damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None
        raise IndexStoreError(f"cannot create {path} ({exc})") from None
    try:
        meta = read_meta(db)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise damaged(folder, f"{INDEX_DB} cannot be read ({exc})") from None
    if meta is None and not create:
        db.close()
        raise missing(folder)
    return db, meta


def read_meta(db: sqlite3.Connection) -> dict | None:
    """meta as a dict, or None when the database has no index in it (yet)."""
    has = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
    if not has:
        return None
    meta = dict(db.execute("SELECT key, value FROM meta"))
    return meta if "schema_version" in meta else None


def write_schema(db: sqlite3.Connection, meta: dict) -> None:
    """The tables and `meta`, in one transaction."""
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


def upgrade(db: sqlite3.Connection, meta: dict) -> dict:
    """An index of an older schema brought to SCHEMA_VERSION, in one transaction (by a writer):
    from 1, its content keys (of a head and a tail only) are dropped, never to be matched, and
    the files that share a vector lose their recorded mtime, so that the next update reads them
    again and gives each a vector of its own unless their whole contents are equal. From 2, the
    fact columns are added, empty (the next update reads them, without the image tower).
    Returns the new meta."""
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        for name, kind in FACT_COLUMN_TYPES:
            if name not in have:
                db.execute(f"ALTER TABLE files ADD COLUMN {name} {kind} NULL")
        if int(meta["schema_version"]) < 2:
            db.execute("UPDATE files SET mtime_ns = NULL WHERE vec_row IN "
                       "(SELECT vec_row FROM files WHERE vec_row IS NOT NULL GROUP BY vec_row HAVING COUNT(*) > 1)")
            db.execute("UPDATE files SET content_key = NULL WHERE content_key IS NOT NULL")
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return {**meta, "schema_version": str(SCHEMA_VERSION)}


def meta_token(meta: dict) -> bytes:
    """The generation of vectors.f32 that `meta` names (ZERO_TOKEN when it names none)."""
    try:
        return bytes.fromhex(meta.get("vectors_token") or "") or ZERO_TOKEN
    except ValueError:
        return ZERO_TOKEN


def check_schema(meta: dict, folder: Path) -> None:
    """IndexStoreError when the settings are unreadable or the schema is newer than this altclip's."""
    try:
        version = int(meta["schema_version"])
        int(meta["dim"]), int(meta.get("vectors_committed", "0"))
    except (KeyError, ValueError):
        raise damaged(folder, f"{INDEX_DB} has unreadable settings") from None
    if version > SCHEMA_VERSION:
        raise IndexStoreError(
            f"the index in {folder} was written by a newer altclip (index schema {version}; "
            f"this altclip reads up to {SCHEMA_VERSION})",
            hint="upgrade altclip (pip install -U altclip), or " + rebuild_hint(folder))


def check_identity(meta: dict, identity: dict, folder: Path) -> None:
    """OtherModelsIndex, naming both, when the index was made by another model (weights or width)
    than `identity` ({"model", "weights", "dim"})."""
    if meta.get("weights") == str(identity["weights"]) and meta.get("dim") == str(int(identity["dim"])):
        return
    theirs = f"{meta.get('model')} (weights {meta.get('weights')}, {meta.get('dim')} dims)"
    ours = f"{identity['model']} (weights {identity['weights']}, {identity['dim']} dims)"
    raise OtherModelsIndex(
        f"the index in {folder} was made with another model: {theirs}; this run uses {ours}",
        hint=f"use that model (-m {meta.get('model')}), another --index folder, or start this index over "
             f"with this model: `altclip index --rebuild --index {folder} PATHS...`")
