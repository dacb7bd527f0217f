"""Identities of files that caches are keyed by: they change whenever a file's content may
have changed, and are cheap enough to compute on every start (no full read of a 3.5 GB file)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..env import flag

FORMAT = 2  # bump when what the caches store changes meaning; older entries are then rebuilt
SAMPLES = 16  # blocks of the file hashed at evenly spaced offsets
SAMPLE_BYTES = 64 * 1024


def enabled() -> bool:
    """False when the ALTCLIP_NO_CACHE flag is on."""
    return not flag("ALTCLIP_NO_CACHE")


def _sampled_sha256(path: Path, size: int) -> str:
    """sha256 of the first and last 64 KiB and of 16 evenly spaced 64 KiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        offsets = {0, max(0, size - SAMPLE_BYTES)}
        offsets |= {size * i // SAMPLES for i in range(SAMPLES)}
        for offset in sorted(offsets):
            f.seek(offset)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def file_fingerprint(path: Path) -> list:
    """[real path, size, mtime_ns, ctime_ns, inode, sampled sha256]. `cp -p` keeps size and mtime
    but not the inode or ctime (which no user call can set back), and a fine-tune of the same
    shapes differs in the sampled bytes."""
    real = Path(path).resolve()
    st = real.stat()
    return [str(real), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, _sampled_sha256(real, st.st_size)]


def files_identity(paths, *extra) -> str:
    """One key for a set of files (and any extra JSON-able values), 32 hex digits: changes
    whenever a file may have changed (for caches of what was computed from them)."""
    parts = [file_fingerprint(Path(p)) for p in paths]
    return hashlib.sha256(json.dumps([FORMAT, parts, *extra]).encode()).hexdigest()[:32]


def content_identity(paths) -> str:
    """A key for the content of a set of files alone (sizes and sampled sha256), 32 hex digits:
    the same for a copy, a re-download or a re-conversion of the same weights, so that what is
    keyed by it (an embedding index, a resumable run) survives them."""
    parts = []
    for p in paths:
        real = Path(p).resolve()
        size = real.stat().st_size
        parts.append([size, _sampled_sha256(real, size)])
    return hashlib.sha256(json.dumps(["content", parts]).encode()).hexdigest()[:32]
