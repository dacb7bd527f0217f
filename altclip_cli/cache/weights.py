"""Weights stored in the compute dtype, so that a cold start memory-maps 1.7 GB of bf16 instead of
casting 3.5 GB of fp32: `altclip_home()/weights/<identity>/model-<precision>.safetensors`, with
`meta.json` saying which files it was made from.

An entry is written under a lock (concurrent first starts wait for one writer), through a
temporary file that only the lock holder may clear, and moved into place whole. Writing an entry
removes the entries made from earlier versions of the same files (a fine-tune saved ten times
keeps one copy) unless another process holds their lock, and `altclip cache` lists and clears
the rest."""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from ..paths import altclip_home, mark_used
from .identity import FORMAT, files_identity

log = logging.getLogger("altclip")
META = "meta.json"
LOCK = ".lock"


def weights_root() -> Path:
    return altclip_home() / "weights"


def weights_identity(paths: list[Path]) -> str:
    """The key of a model's weight files (see identity.file_fingerprint)."""
    return files_identity(paths)


def compute_weights_path(identity: str, precision: str) -> Path:
    return weights_root() / identity / f"model-{precision}.safetensors"


def save_compute_weights(state: dict, path: Path, sources: list[Path]) -> bool:
    """Write the cast state dict ({name: tensor or checkpoint.LazyTensor}, lazy ones cast a piece
    at a time on the way to the file) under the entry's lock, then drop older entries of the same
    source files. meta.json goes in first, so a weights file without one was written by an older
    altclip. True when the entry is there (written now or by another process while this one
    waited); a failure (disk full, read-only) only warns and gives False."""
    from filelock import FileLock

    from ..nn.checkpoint import remove_stale_temporaries, save_safetensors

    sources_real = [str(Path(s).resolve()) for s in sources]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.parent / LOCK)):
            if path.is_file():  # another process wrote it while we waited
                return True
            remove_stale_temporaries(path)  # we hold the lock: any found now are a killed writer's
            _write_meta(path.parent, {"format": FORMAT, "sources": sources_real, "created": time.time()})
            save_safetensors(state, path)
            mark_used(path)
        _drop_superseded(path.parent, sources_real)
    except OSError as e:
        log.warning("could not cache the weights in the compute dtype (%s); the next start casts them again", e)
        return path.is_file()
    return True


def _write_meta(entry: Path, meta: dict) -> None:
    """meta.json through a temporary file: a reader sees the old one or the new one, whole."""
    tmp = entry / f".{META}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(tmp, entry / META)
    finally:
        tmp.unlink(missing_ok=True)


def _drop_superseded(entry: Path, sources: list[str]) -> None:
    """Remove other entries made from the same file paths: they hold an older version of them.
    One that another process holds the lock of (it is writing it) is left for later."""
    for other in weights_root().iterdir():
        if other == entry or not other.is_dir():
            continue
        meta = read_meta(other)
        if meta and meta.get("sources") == sources:
            log.info("removing the cached weights of an earlier version of %s", sources[0])
            try:
                remove_unless_locked(other, other / LOCK)
            except OSError as e:
                log.warning("could not remove the superseded weight cache %s (%s)", other, e)


def remove_unless_locked(folder: Path, lock: Path) -> bool:
    """Remove `folder` while holding `lock` (the lock its writers take), so that no writer is cut
    off half-way; False, with nothing removed, when another process holds the lock now."""
    from filelock import FileLock, Timeout

    if not folder.exists():
        return True
    try:
        with FileLock(str(lock), timeout=0):
            shutil.rmtree(folder)
    except Timeout:
        return False
    return True


def read_meta(entry: Path) -> dict | None:
    try:
        meta = json.loads((entry / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def discard(path: Path) -> None:
    """Remove a damaged entry (it is rebuilt on the next start)."""
    try:
        os.unlink(path)
    except OSError:
        pass
