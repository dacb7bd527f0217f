"""Find a model's files: a local folder, the Hugging Face cache, or a download from the Hub.

A model is either a local folder in the Hugging Face layout (config.json, tokenizer files,
weights) or a hub id such as "BAAI/AltCLIP". Hub models live in the shared Hugging Face cache
(hfcache.py), so a model that transformers already downloaded is not fetched again; one that is
missing is downloaded (download.py), and pickle-only weights are converted once (convert.py).

torch, safetensors and huggingface_hub are imported inside functions: the CLI imports this
package to build its --help.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DownloadError, ModelError
from ..nn.checkpoint import find_weights, weight_files
from ..paths import converted_dir, mark_used
from .convert import convert_to_safetensors
from .download import fetch_repo, not_cached_error
from .hfcache import cached_snapshot, flat_id, is_complete, offline, storage_folder

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class ResolvedModel:
    """Where a model's files are."""

    folder: Path          # the local model folder, or the hub snapshot folder in the HF cache
    weights: list[Path]   # safetensors files to load (for a local folder possibly pytorch_model.bin)
    repo_id: str | None   # None for a local folder
    commit: str | None    # the snapshot's commit hash; None for a local folder

    @property
    def name(self) -> str:
        """The hub id, or the folder for a local model."""
        return self.repo_id or str(self.folder)


def resolve_model(model: str, *, revision: str | None = None, download: bool = True,
                  progress: bool = True) -> ResolvedModel:
    """Resolve a local folder or a hub id to files on disk, downloading and converting if needed.

    A hub model already in the cache is used without any network request. Raises ModelError
    (not a model folder / id), DownloadError (not cached and offline, unknown repo, network),
    CheckpointError (weights unreadable, or a pickle holding code).
    """
    local = _local_folder(model)
    if local is not None:
        return _resolve_local(local)
    repo_id = _check_repo_id(model)
    folder = cached_snapshot(repo_id, revision)
    if folder is None:
        if not download or offline():
            raise not_cached_error(repo_id, revision, folder_exists=storage_folder(repo_id).is_dir())
        folder = fetch_repo(repo_id, revision, progress)
    return _finish(repo_id, folder, progress)


def download_model(model: str, *, revision: str | None = None, progress: bool = True) -> ResolvedModel:
    """`altclip download`: ask the Hub for the current revision even when a copy is cached,
    fetch what is missing (files already in the cache are not fetched again) and convert."""
    local = _local_folder(model)
    if local is not None:
        return _resolve_local(local)
    repo_id = _check_repo_id(model)
    if offline():
        raise DownloadError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
                            hint="unset HF_HUB_OFFLINE to download")
    return _finish(repo_id, fetch_repo(repo_id, revision, progress), progress)


def _local_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    return path if path.is_dir() else None


def _resolve_local(folder: Path) -> ResolvedModel:
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise ModelError(
            f"{folder} has no config.json, so it is not a model folder",
            hint="give a folder in the Hugging Face layout (config.json, tokenizer, weights), "
                 "or a hub id such as BAAI/AltCLIP")
    weights = find_weights(folder)
    return ResolvedModel(folder=folder, weights=weights, repo_id=None, commit=None)


def _check_repo_id(model: str) -> str:
    if _REPO_ID.fullmatch(model) and not Path(model).expanduser().exists():
        return model
    raise ModelError(
        f"{model!r} is neither a model folder nor a Hugging Face model id",
        hint="give a folder holding config.json and weights, or an id like BAAI/AltCLIP (see: altclip models)")


def _finish(repo_id: str, folder: Path, progress: bool) -> ResolvedModel:
    """Check the snapshot and convert pickle-only weights to safetensors."""
    weights = weight_files(folder)
    if not is_complete(folder) or not weights:
        raise DownloadError(f"the cached copy of {repo_id} in {folder} is incomplete",
                            hint=f"run: altclip download {repo_id}")
    commit = folder.name
    if weights[0].suffix == ".bin":
        target = converted_dir() / flat_id(repo_id) / commit / "model.safetensors"
        weights = [convert_to_safetensors(weights, target, progress=progress)]
        mark_used(target)  # for `altclip cache clear --older-than`
    return ResolvedModel(folder=folder, weights=weights, repo_id=repo_id, commit=commit)
