"""altclip's own caches, under `altclip_home()`: weights stored in the compute dtype (so a cold
start memory-maps them instead of casting 3.5 GB of fp32), and label embeddings (so a repeated
classify with the same labels skips the text tower). Set ALTCLIP_NO_CACHE=1 to use neither."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path

import numpy as np

from .paths import altclip_home

log = logging.getLogger("altclip")
FORMAT = 1  # bump when what is stored changes meaning


def enabled() -> bool:
    return os.environ.get("ALTCLIP_NO_CACHE", "") in ("", "0")


def weights_identity(paths: list[Path]) -> str:
    """A key that changes whenever a weight file is replaced: real path, size, mtime."""
    parts = []
    for p in paths:
        st = Path(p).resolve().stat()
        parts.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps([FORMAT, parts]).encode()).hexdigest()[:32]


def compute_weights_path(identity: str, precision: str) -> Path:
    return altclip_home() / "weights" / identity / f"model-{precision}.safetensors"


def save_compute_weights(state: dict, path: Path) -> None:
    """Write the cast state dict atomically, one tensor at a time (no second copy of the
    weights in memory); a failure (disk full, read-only) only warns."""
    from .checkpoint import save_safetensors

    try:
        save_safetensors(state, path)
    except OSError as e:
        log.warning("could not cache the weights in the compute dtype (%s); the next start casts them again", e)


class LabelCache:
    """Normalised text embeddings keyed by (model weights, precision, templates, label), in SQLite."""

    def __init__(self, model_key: str, precision: str, path: Path | None = None):
        self.prefix = [FORMAT, model_key, precision]
        self.path = path or altclip_home() / "labels.sqlite"
        self._db = None

    def _connect(self):
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
        return self._db

    def _key(self, label: str, templates) -> str:
        return hashlib.sha256(json.dumps(self.prefix + [list(templates or []), label]).encode()).hexdigest()

    def get(self, labels, templates) -> dict[str, np.ndarray]:
        """The cached embeddings among `labels`, by label."""
        try:
            keys = {self._key(label, templates): label for label in labels}
            rows = self._connect().execute(
                f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(keys))})", list(keys)).fetchall()
        except sqlite3.Error as e:
            log.warning("label cache unreadable (%s): computing the labels", e)
            return {}
        return {keys[k]: np.frombuffer(v, dtype=np.float32) for k, v in rows}

    def put(self, embeddings: dict[str, np.ndarray], templates) -> None:
        try:
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                               [(self._key(label, templates), np.asarray(v, np.float32).tobytes())
                                for label, v in embeddings.items()])
        except sqlite3.Error as e:
            log.warning("could not store label embeddings in the cache (%s)", e)
