"""Where altclip keeps its own files; every location has an environment override.

The Hugging Face cache (HF_HOME, HF_HUB_CACHE) belongs to huggingface_hub and is shared
with other tools; altclip only reads it through that library. What altclip writes itself
(checkpoints converted to safetensors) lives under `altclip_home()`.
"""
from __future__ import annotations

import os
from pathlib import Path


def altclip_home() -> Path:
    """$ALTCLIP_HOME, else $XDG_CACHE_HOME/altclip, else ~/.cache/altclip (read on every call)."""
    home = os.environ.get("ALTCLIP_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "altclip"


LAST_USED = ".last-used"  # a cache entry's marker: its mtime is the entry's last use


def mark_used(path: Path) -> None:
    """Record the last use of the cache entry holding the file `path` (what `altclip cache`
    shows and `--older-than` goes by): the LAST_USED marker beside it."""
    try:
        (path.parent / LAST_USED).touch()
    except OSError:
        pass


def converted_dir() -> Path:
    """Safetensors files converted from pytorch_model.bin: converted/<org>--<name>/<commit>/."""
    return altclip_home() / "converted"


def indexes_dir() -> Path:
    """The search indexes of `--index auto`, one folder per model (search/store.py)."""
    return altclip_home() / "indexes"


def default_index_folder(weights_id: str) -> Path:
    """Where `--index auto` keeps a model's search index: indexes/<weights id>/."""
    return indexes_dir() / weights_id
