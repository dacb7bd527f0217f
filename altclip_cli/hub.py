"""Find a model's files: a local folder, the Hugging Face cache, or a download from the Hub.

A model is either a local folder in the Hugging Face layout (config.json, tokenizer files,
weights) or a hub id such as "BAAI/AltCLIP". Hub models live in the shared Hugging Face cache
(HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT are honoured by huggingface_hub), so a
model that transformers already downloaded is not fetched again. Weight files are fetched
resumably (fetch.py): a download that is interrupted goes on from where it stopped next time.

The hub's BAAI/AltCLIP only ships a pickled pytorch_model.bin. It is read once with torch's
weights-only unpickler (a file holding code is refused) and rewritten as safetensors in
altclip's own cache, `altclip_home()/converted/<org>--<name>/<commit>/model.safetensors`:
the snapshot folder is shared with other tools, so nothing is written there.

torch, safetensors and huggingface_hub are imported inside functions: the CLI imports this
module to build its --help.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .checkpoint import first_line, read_pickle, save_safetensors, weight_files
from .errors import AltclipError, CheckpointError, DownloadError, ModelError
from .paths import converted_dir


@dataclass(frozen=True)
class KnownModel:
    """A released AltCLIP checkpoint: what `altclip models` lists."""

    id: str
    languages: tuple[str, ...]
    download_gb: float  # approximate size of the files we fetch
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {m.id: m for m in (
    KnownModel("BAAI/AltCLIP", ("en", "zh"), 3.5,
               "English and Chinese; ViT-L/14 image tower, XLM-R large text tower"),
    KnownModel("BAAI/AltCLIP-m9", ("en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it"), 3.5,
               "9 languages; same towers as AltCLIP"),
    KnownModel("BAAI/AltCLIP-m18",
               ("en", "zh", "ja", "th", "ko", "hi", "uk", "ar", "tr", "vi", "pl", "nl", "pt", "it",
                "es", "de", "fr", "ru"), 4.5,
               "18 languages; larger image tower (sizes from its config), 1024-d embeddings"),
)}
DEFAULT_MODEL = "BAAI/AltCLIP"

# What we fetch from a repo: never README, flax/tf/onnx weights, or both weight formats.
SUPPORT_FILES = ("config.json", "preprocessor_config.json", "tokenizer.json",
                 "sentencepiece.bpe.model", "tokenizer_config.json", "special_tokens_map.json")
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
TOKENIZER_FILES = ("tokenizer.json", "sentencepiece.bpe.model")  # one of them is enough

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


# ---------------------------------------------------------------------------------------------
# Public API


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
    folder = _cached_snapshot(repo_id, revision)
    if folder is None:
        if not download or _offline():
            raise _not_cached(repo_id, revision, folder_exists=_storage_folder(repo_id).is_dir())
        folder = _fetch(repo_id, revision, progress)
    return _finish(repo_id, folder, progress)


def download_model(model: str, *, revision: str | None = None, progress: bool = True) -> ResolvedModel:
    """`altclip download`: ask the Hub for the current revision even when a copy is cached,
    fetch what is missing (files already in the cache are not fetched again) and convert."""
    local = _local_folder(model)
    if local is not None:
        return _resolve_local(local)
    repo_id = _check_repo_id(model)
    if _offline():
        raise DownloadError(f"cannot download {repo_id}: offline mode is on (HF_HUB_OFFLINE)",
                            hint="unset HF_HUB_OFFLINE to download")
    return _finish(repo_id, _fetch(repo_id, revision, progress), progress)


def cached_models(*, include_unknown: bool = True) -> list[CachedModel]:
    """The KNOWN_MODELS in the Hugging Face cache, then (with include_unknown) any other cached
    repo whose config.json says model_type "altclip". No network."""
    cache = _hub_cache()
    ids = [i for i in KNOWN_MODELS if _storage_folder(i).is_dir()]
    if include_unknown and cache.is_dir():
        for entry in sorted(cache.glob("models--*")):
            repo_id = entry.name[len("models--"):].replace("--", "/")
            if repo_id not in KNOWN_MODELS and _is_altclip_repo(entry):
                ids.append(repo_id)
    found = []
    for repo_id in ids:
        storage = _storage_folder(repo_id)
        folder = _main_snapshot(storage)
        if folder is None:
            continue
        found.append(CachedModel(
            repo_id=repo_id, known=KNOWN_MODELS.get(repo_id), folder=folder, commit=folder.name,
            complete=_is_complete(folder), size_bytes=_tree_size(storage / "blobs"),
            converted_bytes=_tree_size(converted_dir() / _flat_id(repo_id))))
    return found


def convert_to_safetensors(sources: list[Path], target: Path, *, progress: bool = False) -> Path:
    """Convert pytorch_model.bin file(s) to one safetensors file, once.

    A file lock around the conversion lets concurrent processes wait for the first one; the
    file is written under a temporary name and moved into place, so a reader never sees half
    a file. Returns `target`.
    """
    if target.is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():  # another process converted it while we waited
            return target
        if progress and sys.stderr.isatty():
            print(f"Converting {sources[0].name} to safetensors (once): {target}", file=sys.stderr)
        tensors: dict = {}
        for source in sources:
            part = read_pickle(source)
            if tensors.keys() & part.keys():
                raise CheckpointError(f"{source} repeats tensors of another shard")
            tensors.update(part)
        save_safetensors(tensors, target)
    return target


# ---------------------------------------------------------------------------------------------
# Local folders


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
    weights = weight_files(folder)
    if weights is None:
        raise CheckpointError(f"{folder} holds no weights",
                              hint="expected model.safetensors (or its index and shards) or pytorch_model.bin")
    missing = [w.name for w in weights if not w.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
    return ResolvedModel(folder=folder, weights=weights, repo_id=None, commit=None)


def _is_complete(folder: Path) -> bool:
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


# ---------------------------------------------------------------------------------------------
# The Hugging Face cache (its layout: models--org--name/{refs,snapshots,blobs})


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or env


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _storage_folder(repo_id: str) -> Path:
    return _hub_cache() / f"models--{_flat_id(repo_id)}"


def _flat_id(repo_id: str) -> str:
    return repo_id.replace("/", "--")


def _cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot for a revision (a branch or tag through refs/, or a commit hash),
    if it holds everything we need; no network."""
    storage = _storage_folder(repo_id)
    rev = revision or "main"
    commit = rev if _COMMIT.fullmatch(rev) else _read_ref(storage, rev)
    if commit is None:
        return None
    folder = storage / "snapshots" / commit
    return folder if _is_complete(folder) else None


def _read_ref(storage: Path, revision: str) -> str | None:
    try:
        commit = (storage / "refs" / revision).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return commit if _COMMIT.fullmatch(commit) else None


def _main_snapshot(storage: Path) -> Path | None:
    commit = _read_ref(storage, "main")
    if commit and (storage / "snapshots" / commit).is_dir():
        return storage / "snapshots" / commit
    snapshots = [p for p in (storage / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def _is_altclip_repo(storage: Path) -> bool:
    folder = _main_snapshot(storage)
    if folder is None:
        return False
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "altclip"


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------
# Downloading


def _check_repo_id(model: str) -> str:
    if _REPO_ID.fullmatch(model) and not Path(model).expanduser().exists():
        return model
    raise ModelError(
        f"{model!r} is neither a model folder nor a Hugging Face model id",
        hint="give a folder holding config.json and weights, or an id like BAAI/AltCLIP (see: altclip models)")


def _fetch(repo_id: str, revision: str | None, progress: bool) -> Path:
    """List the repo's files, then fetch the ones we need into the HF cache (files already
    cached are not fetched again). Weight files are fetched first, resumably (fetch.py);
    snapshot_download then only links them and fetches the small files. Returns the snapshot
    folder."""
    from huggingface_hub import HfApi, snapshot_download

    from .fetch import fetch_blob

    try:
        info = HfApi().model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or ()]
        patterns = _allow_patterns(repo_id, files)
        commit = info.sha or revision or "main"
        storage = _storage_folder(repo_id)
        for name in _weights_to_fetch(files, patterns):
            if not (storage / "snapshots" / commit / name).exists():
                fetch_blob(repo_id, name, commit, storage, _hub_cache() / ".locks" / storage.name,
                           tqdm_class=_tqdm_class(progress), progress=progress and sys.stderr.isatty())
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                   tqdm_class=_tqdm_class(progress))
    except AltclipError:
        raise
    except Exception as exc:  # huggingface_hub's and the HTTP client's: none may leak to the CLI
        raise _download_error(exc, repo_id, revision) from exc
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


def _finish(repo_id: str, folder: Path, progress: bool) -> ResolvedModel:
    """Check the snapshot and convert pickle-only weights to safetensors."""
    weights = weight_files(folder)
    if not _is_complete(folder) or not weights:
        raise DownloadError(f"the cached copy of {repo_id} in {folder} is incomplete",
                            hint=f"run: altclip download {repo_id}")
    commit = folder.name
    if weights[0].suffix == ".bin":
        target = converted_dir() / _flat_id(repo_id) / commit / "model.safetensors"
        weights = [convert_to_safetensors(weights, target, progress=progress)]
    return ResolvedModel(folder=folder, weights=weights, repo_id=repo_id, commit=commit)


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


def _not_cached(repo_id: str, revision: str | None, *, folder_exists: bool) -> DownloadError:
    what = f"{repo_id} (revision {revision})" if revision else repo_id
    state = "is only partly in the cache" if folder_exists else "is not in the cache"
    why = " and offline mode is on (HF_HUB_OFFLINE)" if _offline() else ""
    rev = f" --revision {revision}" if revision else ""
    return DownloadError(f"{what} {state} ({_hub_cache()}){why}", hint=f"run: altclip download {repo_id}{rev}")


def _download_error(exc: BaseException, repo_id: str, revision: str | None) -> DownloadError:
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
    endpoint = _endpoint()
    if "GatedRepoError" in top:
        return DownloadError(f"{repo_id} is gated: its terms must be accepted on the Hub first",
                             hint=f"accept them at {endpoint}/{repo_id}, then log in (hf auth login) or set HF_TOKEN")
    if "RepositoryNotFoundError" in top:
        known = ", ".join(KNOWN_MODELS)
        return DownloadError(f"{repo_id} was not found on the Hugging Face Hub ({endpoint}), nor is it a local folder",
                             hint=f"check the id (known models: {known}); a private repo needs HF_TOKEN")
    if "RevisionNotFoundError" in top:
        return DownloadError(f"{repo_id} has no revision {revision!r}",
                             hint="give a branch, tag or commit hash that exists (default: main)")
    if {"EntryNotFoundError", "RemoteEntryNotFoundError"} & top:
        return DownloadError(f"a file of {repo_id} disappeared from the Hub during the download",
                             hint=f"run again: altclip download {repo_id}")
    if "OfflineModeIsEnabled" in chain:
        return _not_cached(repo_id, revision, folder_exists=_storage_folder(repo_id).is_dir())
    network = ("ConnectError", "ConnectionError", "TimeoutException", "Timeout", "ProxyError",
               "NetworkError", "TransportError", "RemoteProtocolError", "TooManyRedirects")
    if any(name in chain for name in network):
        return DownloadError(
            f"could not reach the Hugging Face Hub ({endpoint}) to fetch {repo_id}",
            hint="check the connection (or HF_ENDPOINT); a model already in the cache works with HF_HUB_OFFLINE=1")
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if status is not None:
        return DownloadError(f"the Hub answered HTTP {status} while fetching {repo_id}",
                             hint="try again later; if it persists, check HF_ENDPOINT and HF_TOKEN")
    return DownloadError(f"downloading {repo_id} failed: {first_line(exc)}",
                         hint=f"run again (finished files are kept): altclip download {repo_id}")
