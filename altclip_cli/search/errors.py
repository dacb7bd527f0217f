"""The errors of an index (store.py and the modules it is made of): what the CLI and the server
turn into `error: ...` / `hint: ...`. Each names the index folder; the hint says how to go on."""
from __future__ import annotations

from pathlib import Path

from ..errors import AltclipError


class IndexStoreError(AltclipError):
    """An index cannot be used: missing, damaged, written by a newer altclip, made with another
    model, or being updated by another process. The message names the folder; the hint says how
    to go on (often: rebuild it)."""


class IndexBusy(IndexStoreError):
    """Another writer holds the index's write lock (and did not let go within `wait` seconds)."""


class OtherModelsIndex(IndexStoreError):
    """The index was made with another model (weights or width) than the one asked for."""


class StaleVectors(IndexStoreError):
    """No vector file has the token the database names: a compaction replaced the file after
    this reader's transaction began (begin again), or the index is damaged."""


def rebuild_hint(folder: Path) -> str:
    return (f"rebuild it with `altclip index --rebuild --index {folder} PATHS...` (same PATHS as before), "
            f"or delete the folder {folder}")


def damaged(folder: Path, what: str) -> IndexStoreError:
    return IndexStoreError(f"the index in {folder} is damaged: {what}", hint=rebuild_hint(folder))


def missing(folder: Path) -> IndexStoreError:
    return IndexStoreError(f"there is no index in {folder}",
                           hint="build one with `altclip index PATHS...` (add --index DIR for this folder)")
