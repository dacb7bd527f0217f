"""Resumable downloads of large files into the Hugging Face cache.

huggingface_hub 2.x downloads every file into a uniquely named temporary file that it deletes
when the download fails or is interrupted (`file_download._download_to_tmp_and_move`), so a
3.5 GB pytorch_model.bin cut off at 90% starts again from zero on the next run. Here a weight
file goes to `blobs/<etag>.incomplete` (the name huggingface_hub 0.x used; `hf cache` lists it
as an incomplete download), which the next run extends with `Range: bytes=<have>-`. The
finished file is checked (size, and sha256 where the etag is one, as LFS etags are) and renamed
to `blobs/<etag>`: snapshot_download then finds the blob and only links it into the snapshot,
so the cache keeps the layout that transformers and huggingface_hub expect.

Requests go through huggingface_hub's own HEAD (`get_hf_file_metadata`) and GET (`http_get`,
which also resumes a dropped connection a few times within one run), so the endpoint, proxies,
token and user agent are those of its own downloads. The lock is huggingface_hub's lock file for
the blob, so its downloads of the same file wait for ours. Imported only when downloading.
"""
from __future__ import annotations

import hashlib
import inspect
import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from ..errors import DownloadError

log = logging.getLogger("altclip")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch_blob(repo_id: str, filename: str, commit: str, storage: Path, lock_dir: Path, *,
               tqdm_class=None, progress: bool = False) -> Path | None:
    """Make sure `storage/blobs/<etag>` holds `filename` as of `commit`, resuming a partial
    download. Returns the blob, or None when the Hub gives no etag or size (snapshot_download
    then fetches the file its own way). huggingface_hub's errors propagate."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(repo_id, filename, revision=commit)
    meta = get_hf_file_metadata(url)
    if not meta.etag or meta.size is None:
        return None
    blob = storage / "blobs" / meta.etag
    if blob.is_file():
        return blob
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock_dir.mkdir(parents=True, exist_ok=True)
    with _locked(lock_dir / f"{meta.etag}.lock", filename, progress):
        if not blob.is_file():  # another process may have finished it while we waited
            _download(url, blob, meta.size, filename, tqdm_class)
    return blob


def _download(url: str, blob: Path, size: int, filename: str, tqdm_class) -> None:
    """Append to the partial file until it has `size` bytes, check it, move it to `blob`.
    Resumed bytes that fail the check are discarded and the file is fetched once more whole."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial = blob.with_name(blob.name + ".incomplete")
    extra = {"tqdm_class": tqdm_class} if "tqdm_class" in inspect.signature(http_get).parameters else {}
    while True:
        have = _usable_bytes(partial, size, filename)
        # Unbuffered: every chunk that arrived is on disk, even if the process is killed.
        with open(partial, "ab", buffering=0) as f:
            http_get(url, f, resume_size=have, headers=build_hf_headers(), expected_size=size,
                     displayed_filename=filename, **extra)
            os.fsync(f.fileno())
        problem = _check(partial, size, blob.name)
        if problem is None:
            os.replace(partial, blob)
            return
        partial.unlink(missing_ok=True)
        if have == 0:
            raise DownloadError(f"the downloaded {filename} is corrupt ({problem})",
                                hint="run the download again; if it keeps failing, check HF_ENDPOINT and any proxy")
        log.warning("%s: the download resumed from an earlier run is corrupt (%s); fetching it again whole",
                    filename, problem)


def _usable_bytes(partial: Path, size: int, filename: str) -> int:
    """The size of a partial download that can be extended; a longer one cannot be right."""
    try:
        have = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if have > size:
        log.warning("%s: discarding a partial download larger than the file (%d > %d bytes)", filename, have, size)
        partial.unlink()
        return 0
    return have


def _check(path: Path, size: int, etag: str) -> str | None:
    """None if the file has the expected size and, for an LFS etag, its sha256; else why not."""
    actual = path.stat().st_size
    if actual != size:
        return f"{actual} bytes instead of {size}"
    if _SHA256.fullmatch(etag):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(8 << 20):
                digest.update(block)
        if digest.hexdigest() != etag:
            return "sha256 mismatch"
    return None


@contextmanager
def _locked(path: Path, filename: str, progress: bool):
    """huggingface_hub's lock file for a blob; says so on stderr when another process holds it.
    Where the file system has no flock, go on unlocked, as huggingface_hub's lock is best-effort
    too (a partial written by two processes fails the sha256 check and is fetched again)."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        if progress:
            print(f"Waiting for another process downloading {filename}", file=sys.stderr)
        lock.acquire()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        lock.release()
