"""Fetching a model repo from the Hugging Face Hub into the shared cache, and turning every
failure of huggingface_hub and its HTTP client into one DownloadError with a hint. Weight files
are fetched first and resumably (blobs.py); snapshot_download then only links them and fetches
the small files. huggingface_hub is imported inside functions."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

from ..errors import AltclipError, DownloadError, ModelError
from ..nn.checkpoint import first_line
from .hfcache import TOKENIZER_FILES, endpoint, hub_cache, offline, storage_folder
from .registry import KNOWN_MODELS

# What we fetch from a repo: never README, flax/tf/onnx weights, or both weight formats.
SUPPORT_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json",
                 "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")


def fetch_repo(repo_id: str, revision: str | None, progress: bool) -> Path:
    """List the repo's files, then fetch the ones we need into the HF cache (files already
    cached are not fetched again). Weight files are fetched first, resumably (fetch.py);
    snapshot_download then only links them and fetches the small files. Returns the snapshot
    folder."""
    from huggingface_hub import HfApi, snapshot_download

    from .blobs import fetch_blob

    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or ()]
        patterns = _allow_patterns(repo_id, files)
        commit = info.sha or revision or "main"
        storage = storage_folder(repo_id)
        for name in _weights_to_fetch(files, patterns):
            if not (storage / "snapshots" / commit / name).exists():
                fetch_blob(repo_id, name, commit, storage, hub_cache() / ".locks" / storage.name,
                           tqdm_class=_tqdm_class(progress), progress=progress and sys.stderr.isatty())
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   tqdm_class=_tqdm_class(progress))
    except AltclipError:
        raise
    except Exception as exc:  # huggingface_hub's and the HTTP client's: none may leak to the CLI
        raise download_error(exc, repo_id, revision) from exc
    return Path(folder)


def _allow_patterns(repo_id: str, files: Iterable[str]) -> list[str]:
    names = set(files)
    if "config.json" not in names:
        raise ModelError(f"{repo_id} has no config.json: it is not a transformers model repo")
    if names & {"model.safetensors", "model.safetensors.index.json"}:
        weights = SAFETENSORS_FILES
    elif names & {"pytorch_model.bin", "pytorch_model.bin.index.json"}:
        weights = PICKLE_FILES
    else:
        raise ModelError(f"{repo_id} has neither model.safetensors nor pytorch_model.bin")
    if not names & set(TOKENIZER_FILES):
        raise ModelError(f"{repo_id} has no tokenizer ({' or '.join(TOKENIZER_FILES)})")
    return [*SUPPORT_FILES, *weights]


def _weights_to_fetch(files: Iterable[str], patterns: list[str]) -> list[str]:
    """The weight files (not their small JSON indexes) that the allow patterns select."""
    from fnmatch import fnmatch

    weights = [p for p in patterns if p in SAFETENSORS_FILES + PICKLE_FILES and not p.endswith(".json")]
    return [f for f in files if any(fnmatch(f, p) for p in weights)]


def _tqdm_class(progress: bool):
    """huggingface_hub's bar class, or one that never draws."""
    from huggingface_hub.utils import tqdm

    if progress and sys.stderr.isatty():
        return tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def not_cached_error(repo_id: str, revision: str | None, *, folder_exists: bool) -> DownloadError:
    what = f"{repo_id} (revision {revision})" if revision else repo_id
    state = "is only partly in the cache" if folder_exists else "is not in the cache"
    why = " and offline mode is on (HF_HUB_OFFLINE)" if offline() else ""
    rev = f" --revision {revision}" if revision else ""
    return DownloadError(f"{what} {state} ({hub_cache()}){why}", hint=f"run: altclip download {repo_id}{rev}")


def download_error(exc: BaseException, repo_id: str, revision: str | None) -> DownloadError:
    """Turn huggingface_hub's and the HTTP client's exceptions into one DownloadError.

    Matched by class name through the cause chain, so it holds across huggingface_hub
    versions (requests before 1.0, httpx after) without importing their exception types.
    """
    top = {c.__name__ for c in type(exc).__mro__}
    chain = set(top)
    cause = exc.__cause__ or exc.__context__
    while cause is not None and len(chain) < 200:
        chain |= {c.__name__ for c in type(cause).__mro__}
        cause = cause.__cause__ or cause.__context__
    hub_endpoint = endpoint()
    if "GatedRepoError" in top:
        return DownloadError(f"{repo_id} is gated: its terms must be accepted on the Hub first",
                             hint=f"accept them at {hub_endpoint}/{repo_id}, then log in (hf auth login) or set HF_TOKEN")
    if "RepositoryNotFoundError" in top:
        known = ", ".join(KNOWN_MODELS)
        return DownloadError(f"{repo_id} was not found on the Hugging Face Hub ({hub_endpoint}), nor is it a local folder",
                             hint=f"check the id (known models: {known}); a private repo needs HF_TOKEN")
    if "RevisionNotFoundError" in top:
        return DownloadError(f"{repo_id} has no revision {revision!r}",
                             hint="give a branch, tag or commit hash that exists (default: main)")
    if {"EntryNotFoundError", "RemoteEntryNotFoundError"} & top:
        return DownloadError(f"a file of {repo_id} disappeared from the Hub during the download",
                             hint=f"run again: altclip download {repo_id}")
    if "OfflineModeIsEnabled" in chain:
        return not_cached_error(repo_id, revision, folder_exists=storage_folder(repo_id).is_dir())
    network = ("ConnectError", "ConnectionError", "TimeoutException", "Timeout", "ProxyError",
               "NetworkError", "TransportError", "RemoteProtocolError", "TooManyRedirects")
    if any(name in chain for name in network):
        return DownloadError(
            f"could not reach the Hugging Face Hub ({hub_endpoint}) to fetch {repo_id}",
            hint="check the connection (or HF_ENDPOINT); a model already in the cache works with HF_HUB_OFFLINE=1")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        return DownloadError(f"the Hub answered HTTP {status} while fetching {repo_id}",
                             hint="try again later; if it persists, check HF_ENDPOINT and HF_TOKEN")
    return DownloadError(f"downloading {repo_id} failed: {first_line(exc)}",
                         hint=f"run again (finished files are kept): altclip download {repo_id}")
