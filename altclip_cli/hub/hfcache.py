"""The Hugging Face cache as huggingface_hub lays it out, read without any network request:
`models--org--name/{refs,snapshots,blobs}` under HF_HUB_CACHE (HF_HOME/hub by default). The
cache is shared with transformers and other tools; altclip only reads it here, and writes to it
through huggingface_hub (download.py) and the resumable blob fetch (blobs.py)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..nn.checkpoint import weight_files
from ..errors import CheckpointError
from ..paths import converted_dir
from .registry import KNOWN_MODELS, KnownModel

TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")  # one of them is enough
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass
class CachedModel:
    """A model found in the Hugging Face cache (for `altclip models` / `altclip info`)."""

    repo_id: str
    known: KnownModel | None  # None: an AltCLIP checkpoint we have no entry for (a fine-tune)
    folder: Path              # the snapshot of `main` (else the newest snapshot)
    commit: str
    complete: bool            # config, tokenizer and weights all present
    size_bytes: int           # the repo's blobs in the HF cache
    converted_bytes: int      # altclip's safetensors conversion of it, if any


def cached_models(*, include_unknown: bool = True) -> list[CachedModel]:
    """The KNOWN_MODELS in the Hugging Face cache, then (with include_unknown) any other cached
    repo whose config.json says model_type "altclip". No network."""
    cache = hub_cache()
    ids = [i for i in KNOWN_MODELS if storage_folder(i).is_dir()]
    if include_unknown and cache.is_dir():
        for entry in sorted(cache.glob("models--*")):
            repo_id = entry.name[len("models--"):].replace("--", "/")
            if repo_id not in KNOWN_MODELS and _is_altclip_repo(entry):
                ids.append(repo_id)
    found = []
    for repo_id in ids:
        storage = storage_folder(repo_id)
        folder = main_snapshot(storage)
        if folder is None:
            continue
        found.append(CachedModel(
            repo_id=repo_id, known=KNOWN_MODELS.get(repo_id), folder=folder, commit=folder.name,
            complete=is_complete(folder), size_bytes=tree_size(storage / "blobs"),
            converted_bytes=tree_size(converted_dir() / flat_id(repo_id))))
    return found


def is_complete(folder: Path) -> bool:
    """config.json, a tokenizer file and every weight file are present."""
    if not (folder / "config.json").is_file():
        return False
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return False
    try:
        weights = weight_files(folder)
    except CheckpointError:  # an unreadable index
        return False
    return bool(weights) and all(w.is_file() for w in weights)


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it at import or as the environment says now (a
    process that set it after importing huggingface_hub is offline too)."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def storage_folder(repo_id: str) -> Path:
    return hub_cache() / f"models--{flat_id(repo_id)}"


def flat_id(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot for a revision (a branch or tag through refs/, or a commit hash),
    if it holds everything we need; no network."""
    storage = storage_folder(repo_id)
    rev = revision or "main"
    commit = rev if _COMMIT.fullmatch(rev) else _read_ref(storage, rev)
    if commit is None:
        return None
    folder = storage / "snapshots" / commit
    return folder if is_complete(folder) else None


def _read_ref(storage: Path, revision: str) -> str | None:
    try:
        commit = (storage / "refs" / revision).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def main_snapshot(storage: Path) -> Path | None:
    commit = _read_ref(storage, "main")
    if commit and (storage / "snapshots" / commit).is_dir():
        return storage / "snapshots" / commit
    snapshots = [p for p in (storage / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def _is_altclip_repo(storage: Path) -> bool:
    folder = main_snapshot(storage)
    if folder is None:
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "altclip"


def tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
