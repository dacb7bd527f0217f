"""What altclip keeps under `altclip_home()`, for `altclip cache`: weight-cache entries
(weights.py), checkpoints converted from pickle (hub/convert.py), the label cache (labels.py)
and the search indexes of `--index auto` (search/store.py), each with its size and last use, and
their removal. Indexes are not caches (rebuilding one embeds every image again): they are
listed, and removed only when asked for by name (kind "indexes"). An entry whose lock another
process holds (it is being written) is never removed. The Hugging Face cache is not altclip's:
it is shared with other tools, and `hf cache` manages it.

No click here, and nothing heavy: listing reads folders, meta.json files and one SQL count."""
from __future__ import annotations

import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import LAST_USED, converted_dir, indexes_dir
from . import labels as label_cache
from . import weights as weight_cache

KINDS = ("weights", "converted", "labels")  # what `clear` removes unless told otherwise
ALL_KINDS = KINDS + ("indexes",)
UNKNOWN_SOURCES = "unknown (older format)"
CONVERTED_FILE = "model.safetensors"
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")


@dataclass
class Entry:
    """One thing altclip keeps: what `altclip cache` shows as a row and `clear` removes whole."""

    kind: str            # one of KINDS
    name: str            # the source file(s), "org/name@commit", or "label embeddings"
    path: Path           # what removal deletes (a folder, or the label database)
    size: int            # bytes on disk
    last_used: float     # seconds since the epoch
    lock: Path | None    # the lock its writers hold; None: the label database (SQLite locks it)
    sources: list[str] | None = None  # weights: the files it was made from (None: older format)
    precisions: list[str] = field(default_factory=list)  # weights: the compute dtypes stored
    model: str | None = None          # converted: the hub id
    commit: str | None = None         # converted: the commit
    rows: int | None = None           # labels: cached embeddings; indexes: images with a vector (None: unreadable)

    def record(self) -> dict:
        """The entry as JSON-able data (what `altclip cache --json` prints)."""
        out = {"kind": self.kind, "name": self.name, "path": str(self.path), "bytes": self.size,
               "last_used": iso_time(self.last_used)}
        if self.kind == "weights":
            out.update(sources=self.sources, precisions=self.precisions)
        elif self.kind == "converted":
            out.update(model=self.model, commit=self.commit)
        elif self.kind == "indexes":
            out.update(model=self.model, images=self.rows)
        else:
            out.update(rows=self.rows)
        return out


@dataclass
class ClearResult:
    removed: list[Entry] = field(default_factory=list)   # removed (or, in a dry run, to be removed)
    in_use: list[Entry] = field(default_factory=list)    # skipped: another process holds the lock
    failed: list[tuple[Entry, str]] = field(default_factory=list)  # removal failed (permissions, ...)
    freed: int = 0                                       # bytes given back (or that would be)


def parse_duration(text: str) -> float:
    """Seconds in "90m", "12h", "30d", "2w", "1d12h" or "45s"; ValueError for anything else."""
    compact = str(text).strip().lower()
    parts = _DURATION.findall(compact)
    if not parts or _DURATION.sub("", compact).strip():
        raise ValueError(f"{text!r} is not a duration")
    return sum(float(n) * _UNITS[unit] for n, unit in parts)


def iso_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def entries(kinds=ALL_KINDS) -> list[Entry]:
    """What altclip keeps of the given kinds, weights first, each kind newest first."""
    found = []
    if "weights" in kinds:
        found += sorted(_weight_entries(), key=lambda e: -e.last_used)
    if "converted" in kinds:
        found += sorted(_converted_entries(), key=lambda e: -e.last_used)
    if "labels" in kinds:
        found += _label_entries()
    if "indexes" in kinds:
        found += sorted(_index_entries(), key=lambda e: -e.last_used)
    return found


def _weight_entries() -> list[Entry]:
    root = weight_cache.weights_root()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        meta = weight_cache.read_meta(folder) or {}
        sources = meta.get("sources") if isinstance(meta.get("sources"), list) else None
        marker = folder / LAST_USED
        out.append(Entry(
            kind="weights", name=", ".join(sources) if sources else UNKNOWN_SOURCES, path=folder,
            size=_tree_size(folder), last_used=_mtime(marker) or _newest_mtime(folder),
            lock=folder / weight_cache.LOCK, sources=sources,
            precisions=sorted(p.name[len("model-"):-len(".safetensors")]
                              for p in folder.glob("model-*.safetensors"))))
    return out


def _converted_entries() -> list[Entry]:
    """converted/<org>--<name>/<commit>/model.safetensors: last use is its `.last-used` marker's
    mtime (the file's own mtime is part of its fingerprint, so it is never touched)."""
    root = converted_dir()
    if not root.is_dir():
        return []
    out = []
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        model_id = model_dir.name.replace("--", "/", 1)
        for commit_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            target = commit_dir / CONVERTED_FILE
            out.append(Entry(
                kind="converted", name=f"{model_id}@{commit_dir.name}", path=commit_dir,
                size=_tree_size(commit_dir),
                last_used=_mtime(commit_dir / LAST_USED) or _mtime(target) or _newest_mtime(commit_dir),
                lock=commit_dir / (CONVERTED_FILE + ".lock"), model=model_id, commit=commit_dir.name))
    return out


def _label_entries() -> list[Entry]:
    path = label_cache.labels_path()
    if not path.is_file():
        return []
    return [Entry(kind="labels", name="label embeddings", path=path, size=_label_files_size(path),
                  last_used=_mtime(path) or 0.0, lock=None, rows=label_cache.count_rows(path))]


def _index_entries() -> list[Entry]:
    """indexes/<weights id>/: the model it was made with and its images, read without writing
    (a read-only SQLite connection); last use is its newest file's mtime (the last update)."""
    root = indexes_dir()
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        model, images = None, None
        db_path = folder / "index.sqlite3"
        try:
            db = sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True)
            try:
                model = (db.execute("SELECT value FROM meta WHERE key = 'model'").fetchone() or [None])[0]
                images = db.execute("SELECT COUNT(*) FROM files WHERE vec_row IS NOT NULL").fetchone()[0]
            finally:
                db.close()
        except (sqlite3.Error, ValueError):
            pass
        out.append(Entry(kind="indexes", name=model or f"unreadable ({folder.name})", path=folder,
                         size=_tree_size(folder), last_used=_newest_mtime(folder), lock=folder / ".write.lock",
                         model=model, rows=images))
    return out


def _label_files_size(path: Path) -> int:
    """The database and any journal SQLite keeps beside it."""
    return sum(_size(path.with_name(path.name + suffix)) for suffix in ("", "-journal", "-wal", "-shm"))


def clear(kinds=KINDS, older_than: float | None = None, *, dry_run: bool = False,
          now: float | None = None) -> ClearResult:
    """Remove the entries of `kinds` last used more than `older_than` seconds ago (None: all of
    them). An entry whose lock another process holds is skipped (in `in_use`); with dry_run
    nothing is removed and `removed` says what would be."""
    now = time.time() if now is None else now
    result = ClearResult()
    for entry in entries(kinds):
        if older_than is not None and now - entry.last_used <= older_than:
            continue
        if entry.kind == "labels" and entry.rows == 0:  # already empty
            continue
        try:
            freed = (None if _lock_held(entry) else entry.size) if dry_run else _remove(entry)
        except (OSError, sqlite3.Error) as e:
            result.failed.append((entry, str(e)))
            continue
        if freed is None:
            result.in_use.append(entry)
        else:
            result.removed.append(entry)
            result.freed += freed
    return result


def _remove(entry: Entry) -> int | None:
    """Remove one entry under its lock: the bytes freed, or None when another process holds it."""
    if entry.kind == "labels":
        if not label_cache.clear(entry.path):
            return None
        return max(0, entry.size - _label_files_size(entry.path))  # the file stays, emptied
    if not weight_cache.remove_unless_locked(entry.path, entry.lock):
        return None
    if entry.kind == "converted":
        try:
            entry.path.parent.rmdir()  # the model's folder, once its last commit is gone
        except OSError:
            pass
    return entry.size


def _lock_held(entry: Entry) -> bool:
    """Whether another process holds the entry's lock now (probed without creating a lock file)."""
    if entry.lock is None or not entry.lock.is_file():
        return False
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(entry.lock), timeout=0):
            return False
    except Timeout:
        return True
    except OSError:
        return False


def hf_cache() -> Path:
    """Where the Hugging Face cache is (listed, never cleared: `hf cache` manages it)."""
    from ..hub.hfcache import hub_cache

    return hub_cache()


def _size(path: Path) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def _tree_size(folder: Path) -> int:
    return sum(_size(Path(root) / name) for root, _dirs, files in os.walk(folder) for name in files)


def _newest_mtime(folder: Path) -> float:
    times = [_mtime(Path(root) / name) for root, _dirs, files in os.walk(folder) for name in files]
    return max([t for t in times if t is not None] or [_mtime(folder) or 0.0])
