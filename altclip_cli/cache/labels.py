"""Label embeddings, so that a repeated classify with the same labels skips the text tower:
normalised text embeddings in SQLite (`altclip_home()/labels.sqlite`), keyed by everything that
changes them: the weights, the tokenizer and config files, the precision, the altclip version,
the templates and the label."""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path

from ..paths import altclip_home
from .identity import FORMAT, files_identity

log = logging.getLogger("altclip")


def labels_path() -> Path:
    return altclip_home() / "labels.sqlite"


def text_identity(weights_key: str, folder: Path) -> str:
    """The key of what turns a label into an embedding: the weights (their identity), the
    tokenizer and config files, and this altclip's version."""
    from ..version import __version__
    from ..inputs.tokenizer import tokenizer_file

    return files_identity([tokenizer_file(folder), Path(folder) / "config.json"], weights_key, __version__)


class LabelCache:
    """Normalised text embeddings keyed by (text identity, precision, templates, label)."""

    def __init__(self, model_key: str, precision: str, path: Path | None = None):
        self.prefix = [FORMAT, model_key, precision]
        self.path = path or labels_path()
        self._db = None

    def _connect(self):
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30)
            self._db.execute("CREATE TABLE IF NOT EXISTS emb (key TEXT PRIMARY KEY, vec BLOB)")
        return self._db

    def _key(self, label: str, templates) -> str:
        return hashlib.sha256(json.dumps(self.prefix + [list(templates or []), label]).encode()).hexdigest()

    def get(self, labels, templates) -> dict:
        """The cached embeddings among `labels`, by label."""
        try:
            keys = {self._key(label, templates): label for label in labels}
            rows = self._connect().execute(
                f"SELECT key, vec FROM emb WHERE key IN ({','.join('?' * len(keys))})", list(keys)).fetchall()
        except sqlite3.Error as e:
            log.warning("label cache unreadable (%s): computing the labels", e)
            return {}
        import numpy as np

        if rows:
            try:
                self.path.touch()  # last use, for `altclip cache`
            except OSError:
                pass
        return {keys[k]: np.frombuffer(v, dtype=np.float32) for k, v in rows}

    def put(self, embeddings: dict, templates) -> None:
        import numpy as np

        try:
            with self._connect() as db:
                db.executemany("INSERT OR REPLACE INTO emb VALUES (?, ?)",
                               [(self._key(label, templates), np.asarray(v, np.float32).tobytes())
                                for label, v in embeddings.items()])
        except sqlite3.Error as e:
            log.warning("could not store label embeddings in the cache (%s)", e)


def count_rows(path: Path) -> int | None:
    """The number of cached label embeddings in `path`, read-only; None when it is unreadable."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute("SELECT COUNT(*) FROM emb").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return None


def clear(path: Path) -> bool:
    """Delete every row of the label cache in place (the file stays, so a process that has it
    open keeps a valid database; deleting the file under it could pair it with another's
    journal). False, with nothing deleted, when another process is writing to it now; a file
    that is not a database is deleted."""
    db = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        try:
            db.execute("BEGIN IMMEDIATE")  # fails at once while another process writes
            db.execute("DELETE FROM emb")
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                return False
            if "no such table" not in str(e):
                raise
        except sqlite3.DatabaseError:  # not a database: nobody can use it
            db.close()
            path.unlink(missing_ok=True)
            return True
        try:
            db.execute("VACUUM")  # give the space back; a reader may hold it off, the rows are gone anyway
        except sqlite3.OperationalError:
            pass
    finally:
        db.close()
    return True
