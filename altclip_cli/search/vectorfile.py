"""vectors.f32, the file of an index's vectors: its header, opening the file of the generation
the database names, and mapping its committed rows.

Layout: a 64-byte header (magic b"ALTCLIPV", format version, dim, dtype code as little-endian
uint32, a 16-byte token, zero padding, crc32 of the bytes before it), then rows of `dim`
little-endian float32, L2-normalised image embeddings. Append-only between compactions; readers
memory-map it. The token (the database's meta `vectors_token`, random for each new file) names
the file's generation: a reader uses the file whose token the database names (vectors.f32, or
vectors.f32.new between a compaction's commit and its rename: see compaction.py), so it never
takes a newer file, a compaction's or a rebuild's, for the one its transaction read about.

Cheap to import: numpy is imported inside the functions that need it.
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from .errors import IndexStoreError, StaleVectors, damaged, rebuild_hint

VECTORS_FORMAT = 1  # the layout of vectors.f32
VECTORS = "vectors.f32"
VECTORS_NEW = VECTORS + ".new"  # a compaction's new file, until it replaces VECTORS
MAGIC = b"ALTCLIPV"
HEADER_SIZE = 64
TOKEN_AT, TOKEN_SIZE = 20, 16  # the file's generation, in the header after magic, version, dim, dtype
ZERO_TOKEN = bytes(TOKEN_SIZE)  # in files that older altclips created, until their first compaction
DTYPE_CODES = {"float32": 1}
ROW_DTYPE = "<f4"
ITEMSIZE = 4


def new_token() -> bytes:
    """A fresh random generation token: one per file created or rewritten, so that no two
    generations of an index's vector file (a compaction's, a rebuild's) carry the same."""
    return os.urandom(TOKEN_SIZE)


def vectors_header(dim: int, token: bytes) -> bytes:
    """The 64-byte header of vectors.f32 for rows of `dim` float32, of generation `token`."""
    body = (struct.pack("<8sIII", MAGIC, VECTORS_FORMAT, dim, DTYPE_CODES["float32"]) + token).ljust(
        HEADER_SIZE - 4, b"\0")
    return body + struct.pack("<I", zlib.crc32(body))


def check_header(data: bytes, dim: int, folder: Path) -> None:
    """IndexStoreError unless `data` starts with a valid header for `dim`-wide float32 rows."""
    if len(data) < HEADER_SIZE:
        raise damaged(folder, f"{VECTORS} is shorter than its {HEADER_SIZE}-byte header")
    magic, version, file_dim, code = struct.unpack_from("<8sIII", data)
    (crc,) = struct.unpack_from("<I", data, HEADER_SIZE - 4)
    if magic != MAGIC or crc != zlib.crc32(data[:HEADER_SIZE - 4]):
        raise damaged(folder, f"{VECTORS} does not start with a valid header")
    if version > VECTORS_FORMAT:
        raise IndexStoreError(f"{folder / VECTORS} was written by a newer altclip (vectors format {version}; "
                              f"this altclip reads up to {VECTORS_FORMAT})",
                              hint="upgrade altclip (pip install -U altclip), or " + rebuild_hint(folder))
    if file_dim != dim or code != DTYPE_CODES["float32"]:
        raise damaged(folder, f"{VECTORS} holds {file_dim}-wide rows of type {code}; "
                              f"the database says {dim}-wide float32")


def open_matching(folder: Path, dim: int, token: bytes, mode: str = "rb"):
    """(open file positioned after its header, its name): vectors.f32 when its header carries
    `token`, else vectors.f32.new when it does (a compaction committed, not yet renamed).
    StaleVectors when neither does; damaged when vectors.f32 is missing or its header is bad."""
    try:
        f = open(folder / VECTORS, mode)
    except FileNotFoundError:
        raise damaged(folder, f"{VECTORS} is missing") from None
    except OSError as exc:
        raise IndexStoreError(f"cannot open {folder / VECTORS} ({exc.strerror or exc})") from None
    try:
        header = f.read(HEADER_SIZE)
        check_header(header, dim, folder)
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


def map_vectors(folder: Path, rows: int, dim: int, token: bytes):
    """The first `rows` rows of the vector file of generation `token` as a read-only memmap
    (header and length checked). The mapping stays valid when a compaction replaces the file."""
    import numpy as np

    f, name = open_matching(folder, dim, token)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < HEADER_SIZE + rows * dim * ITEMSIZE:
            held = (size - HEADER_SIZE) // (dim * ITEMSIZE)
            raise damaged(folder, f"{name} holds {held} rows; {rows} are committed")
        if rows == 0:
            return np.zeros((0, dim), np.float32)
        return np.memmap(f, dtype=ROW_DTYPE, mode="r", offset=HEADER_SIZE, shape=(rows, dim))
