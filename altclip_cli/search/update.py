"""Bringing an index up to date with folders (`altclip index`, and `altclip search` before it
ranks). classify/embed --index are reuse.py's.

How to call it::

    from altclip_cli.paths import default_index_folder
    from altclip_cli.search.store import IndexStore
    from altclip_cli.search.update import index_identity, model_identity, update_index

    identity = model_identity("BAAI/AltCLIP")        # no torch: resolves the files, reads config.json
    # (or index_identity(model) for a model already loaded)
    with IndexStore.open(default_index_folder(identity["weights"]), identity=identity,
                         write=True, create=True) as store:
        summary = update_index(get_model, store, [Path("photos")], msgs=messages())

`get_model` is a zero-argument callable returning the loaded AltCLIP (altclip_cli.runtime.altclip):
it is called only when some file needs the image tower, so bringing an unchanged tree up to date
never loads the model. A loaded AltCLIP may be passed instead of the callable.

What a run does: walk the roots (inputs/walk.py), compare each image's size and mtime_ns with the
index (one SELECT per root), and then
  - drop the files under the roots that are gone (not under a folder that could not be listed);
  - for new and changed files whose size matches an indexed file's (or another new file's),
    compare content keys (the size and the sha256 of every byte: content_key_of): a renamed or
    duplicated file takes the vector of the file with the same content, without the model
    (a changed file never takes its own old vector);
  - embed the rest (the same decoding pipeline and error records as `altclip embed`), committing
    every `commit_every` images and when interrupted (KeyboardInterrupt: Ctrl-C, or SIGTERM where
    the caller turns it into one), then re-raising it;
  - record the images that fail, with their error: they are tried again only once their size or
    mtime changes (or with retry_failed=True).
An unchanged tree costs a walk and a SELECT, and writes nothing: an unchanged file is never read.
Each new or changed file is hashed once: the ones of a size some other file has are hashed before
any embedding (to find their match), the others from the very bytes the decoder reads.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..quiet import Silent
from .facts import FactsReader, PhotoFacts, read_facts
from .store import IndexStore, IndexStoreError, OtherModelsIndex
from .summary import UpdateSummary
from ..inputs.walk import DEFAULT_EXCLUDES, walk_images
from ..paths import real_root

KEY_PREFIX = "sha256:"  # content keys hash whole files (index schema 2: see database.py)
HASH_BLOCK = 1 << 20  # bytes hashed at a time when a file is read for its key alone
COMMIT_EVERY = 256  # images embedded between two commits
HASH_CHUNK = 64  # files hashed by one thread-pool task ...
HASH_CHUNK_BYTES = 64 << 20  # ... and the most bytes it reads (a larger file alone), well within the input timeout
DEFAULT_INPUT_TIMEOUT = 120.0  # as altclip_cli.inputs.pipeline (not imported: it imports numpy)


def index_identity(model) -> dict:
    """{"model", "weights", "dim"} of a loaded AltCLIP: what IndexStore.open checks."""
    return {"model": model.model_id, "weights": model.weights_id, "dim": int(model.embed_dim)}


def model_identity(model: str, *, revision: str | None = None, progress: bool = True) -> dict:
    """index_identity without loading the model (no torch): the model's files are resolved
    (downloaded if missing, as `load` would), their fingerprint taken and config.json read."""
    import json

    from ..cache.identity import content_identity
    from ..errors import ConfigError
    from ..hub.resolve import resolve_model

    resolved = resolve_model(str(model), revision=revision, progress=progress)
    path = Path(resolved.folder) / "config.json"
    try:  # projection_dim as nn.config reads it (whose full parse needs torch for the activations)
        dim = int(json.loads(path.read_text(encoding="utf-8")).get("projection_dim", 768))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return {"model": str(model), "weights": content_identity(resolved.weights), "dim": dim}


def content_key_of(data: bytes) -> str:
    """The content key of a file holding `data`: "sha256:SIZE:HEX", its size and the sha256 of
    every byte. Two files share a vector only when their keys are equal (a renamed or copied file)."""
    return f"{KEY_PREFIX}{len(data)}:{hashlib.sha256(data).hexdigest()}"


def content_key(path: str, size: int) -> str:
    """content_key_of the file at `path`, read in blocks through the one opener (regular files
    only). OSError when it cannot be read (inputs.files says why), or no longer holds `size` bytes
    (it changed since it was listed)."""
    from ..errors import InputError
    from ..inputs.files import open_regular

    try:
        f = open_regular(path, empty_ok=True)
    except InputError as exc:
        raise OSError(exc.message) from None
    digest, read = hashlib.sha256(), 0
    with f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            read += len(block)
    if read != size:
        raise OSError(f"{path} changed while it was read")
    return f"{KEY_PREFIX}{read}:{digest.hexdigest()}"


@dataclass(eq=False)
class _Item:
    """A new or changed file."""

    key: str  # stored path
    path: str  # absolute path
    name: str  # as messages name it: the root as given + the path below it
    size: int
    mtime_ns: int
    old_id: int | None  # its row, when the file was indexed before
    content_key: str | None = None
    followers: list = field(default_factory=list)  # new files with the same content, embedded with it

    def row(self, vec_row, error):
        return (self.key, self.size, self.mtime_ns, self.content_key, vec_row, error)


def update_index(get_model, store: IndexStore, roots: list, *, include_hidden: bool = False,
                 exclude_dirs=DEFAULT_EXCLUDES, open_kw: dict | None = None, batch_size: int | None = None,
                 input_timeout: float | None = DEFAULT_INPUT_TIMEOUT, msgs=None, retry_failed: bool = False,
                 commit_every: int = COMMIT_EVERY, summary: UpdateSummary | None = None,
                 before_listing: Callable[[str], None] | None = None,
                 followed_link: Callable[[str, os.stat_result], None] | None = None,
                 as_named: bool = False) -> UpdateSummary:
    """Bring `store` (opened with write=True) up to date with the image files at or below `roots`
    (folders or files; or (name, path) pairs, the name used in messages). See the module doc. get_model: a zero-argument callable returning the
    loaded AltCLIP (called only if some image needs embedding), or the model itself. open_kw: the
    keyword arguments of altclip_cli.inputs.sources.open_source (max_pixels, ...). msgs: the CLI's
    Messages (errors per failed image, warnings, a progress bar on a terminal); None: silent.
    summary: filled in place as the run goes (what an interrupted run committed is in it).
    Raises IndexStoreError when the loaded model does not match the index (weights, width,
    precision, decoding); KeyboardInterrupt after committing what was done.
    before_listing(folder), followed_link(path, stat): the walk's callbacks (see inputs.walk).
    as_named: the roots are already named as the index names them (paths.index_path: folders
    below a walked root, through its symlinks), so they are not resolved again."""
    started = time.monotonic()
    summary = summary if summary is not None else UpdateSummary()
    msgs = msgs or Silent()
    get = get_model if callable(get_model) else (lambda: get_model)

    seen, work, removed = _compare(store, _unique_roots(roots, as_named), include_hidden, exclude_dirs,
                                   retry_failed, summary, msgs, before_listing, followed_link)
    summary.files = len(seen)
    unique = _unique_roots(roots, as_named)
    if work or removed:
        to_embed, upserts, deletes, facts = _reuse_by_content(store, work, removed, summary, input_timeout)
        if upserts or deletes:
            store.commit(upserts=upserts, deletes=deletes, facts=facts)
        if to_embed:
            _embed(get, store, to_embed, open_kw or {}, batch_size, input_timeout, msgs, commit_every, summary)
    read_missing_facts(store, [real for _given, real in unique], open_kw=open_kw, input_timeout=input_timeout,
                       msgs=msgs, commit_every=commit_every, summary=summary)
    summary.seconds = time.monotonic() - started
    return summary


def _unique_roots(roots, as_named: bool = False) -> list[tuple[str, str]]:
    """(as given, the path the index names it by: paths.real_root unless `as_named`) per root,
    without roots that lie inside another one. A root is a path, or a (name for messages, path)
    pair (a server names files as its client gave them)."""
    real = []
    for root in roots:
        given, where = root if isinstance(root, tuple) else (os.fspath(root), os.fspath(root))
        path = os.path.abspath(where) if as_named else real_root(where)
        if all(path != r for _, r in real):
            real.append((given, path))
    return [(g, r) for g, r in real if not any(_inside(r, other) for _, other in real if other != r)]


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


def _compare(store, roots, include_hidden, exclude_dirs, retry_failed, summary, msgs, before_listing=None,
             followed_link=None):
    """Walk the roots ((as given, as named) pairs) and compare with the index: (keys seen, new or
    changed _Items, {key: file id} of indexed files that are gone)."""
    seen: set[str] = set()
    work: list[_Item] = []
    known: dict = {}
    kept_prefixes: list[str] = []  # below folders that could not be listed: nothing is removed
    skip = (str(store.folder),)
    join = os.path.join
    for given, real in roots:
        walk = walk_images(real, include_hidden=include_hidden, exclude_dirs=exclude_dirs, skip_dirs=skip,
                           utf8_only=True, before_listing=before_listing, followed_link=followed_link)
        for rel, exc in walk.unlisted:
            where = join(real, rel) if rel else real
            what = "cannot list this folder" if rel or os.path.isdir(real) else "cannot read it"
            msgs.warn(f"{_printable(where)}: {what} ({exc.strerror or exc}); what the index holds below it is kept")
        for rel in walk.loops:
            msgs.warn(f"{_printable(join(real, rel))}: folder already visited (a symlink loop?), skipped")
        for rel in walk.skipped_names:
            where = join(real, rel) if rel else real
            summary.skipped_names.append(_printable(where))
            msgs.warn(not_utf8_warning(where))
        if "" in walk.skipped_names:  # the root itself: nothing below it can be held
            continue
        root_key = store.key_of(real)
        base = "" if root_key == "." else (root_key if root_key.endswith("/") else root_key + "/")
        kept_prefixes += [(base + rel if rel else root_key) for rel, _exc in walk.unlisted]
        rows = store.rows_under(real)
        known.update(rows)
        for rel, size, mtime_ns in walk.files:
            key = base + rel if rel else root_key
            if key in seen:
                continue
            seen.add(key)
            row = rows.get(key)  # (path, id, size, mtime_ns, vec_row, failed)
            if row is not None and row[2] == size and row[3] == mtime_ns and not (retry_failed and row[5]):
                summary.unchanged += 1
                summary.still_failing += row[5]
                continue
            work.append(_Item(key, join(real, rel) if rel else real, join(given, rel) if rel else given, size,
                              mtime_ns, row[1] if row is not None else None))
    removed = {key: row[1] for key, row in known.items()
               if key not in seen and not any(key == p or key.startswith(p + "/") for p in kept_prefixes)}
    return seen, work, removed


def storable(path: str) -> bool:
    """Whether the index can hold `path` (it stores UTF-8 text; a name the file system holds as
    other bytes is skipped, with not_utf8_warning)."""
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def not_utf8_warning(path: str) -> str:
    """The warning that names a file or folder the index cannot hold, readably."""
    what, below = ("folder", "the images below it") if os.path.isdir(path) else ("file", "it")
    return (f"{_printable(path)}: the {what} name is not valid UTF-8 (the index stores UTF-8 paths), so the "
            f"index cannot hold {below}; skipped")


def _printable(name: str) -> str:
    from ..inputs.names import display

    return display(name)


def _reuse_by_content(store, work, removed, summary, input_timeout=DEFAULT_INPUT_TIMEOUT):
    """Content keys for the files that might share content with an indexed file or with each
    other (same size), and the vectors they can reuse. Returns (items to embed, upserts of the
    reused ones, ids of the removed rows, {key: PhotoFacts} of the reused ones whose match has them)."""
    _key_indexed(store, {it.size for it in work})
    sizes = store.sizes_with_vectors()
    same_size = Counter(item.size for item in work)
    candidates = [it for it in work if it.size in sizes or same_size[it.size] > 1]
    _hash_all(candidates, input_timeout)
    removed_ids = set(removed.values())
    renamed_from: set[int] = set()
    upserts, to_embed, facts = [], [], {}
    leaders: dict[str, _Item] = {}
    for it in work:
        if it.content_key is None:
            to_embed.append(it)
            continue
        matches = [m for m in store.find_vectors(it.content_key) if m[0] != it.old_id]
        if matches:
            rename = next((m for m in matches if m[0] in removed_ids and m[0] not in renamed_from), None)
            file_id, vec_row = rename or matches[0]
            upserts.append(it.row(vec_row, None))
            known = store.facts_by_id([file_id]).get(file_id)  # the same bytes: the same photo's facts
            if known is not None:
                facts[it.key] = known.with_file_time(it.mtime_ns)
            summary.reused += 1
            if it.old_id is not None:
                summary.updated += 1
            elif rename is not None:
                renamed_from.add(file_id)
                summary.renamed += 1
            else:
                summary.added += 1
            continue
        leader = leaders.get(it.content_key)
        if leader is not None:
            leader.followers.append(it)
            continue
        leaders[it.content_key] = it
        to_embed.append(it)
    summary.removed += len(removed) - len(renamed_from)
    return to_embed, upserts, sorted(removed_ids), facts


def _key_indexed(store, sizes) -> None:
    """Content keys, read and committed now, for the indexed files of these sizes that have a
    vector but no key and are unchanged since they were indexed: so a new copy of one of them
    takes its vector (the keys of an older index are dropped when it is upgraded, see
    database.upgrade, and come back this way, as files of their size turn up)."""
    items = []
    for key, size, mtime_ns, vec_row in store.without_keys(sizes):
        path = store.path_of(key)
        try:
            st = os.stat(path)
        except OSError:  # gone: the walk removes it
            continue
        if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):  # else changed: the walk reads it anyway
            items.append((_Item(key, path, path, size, mtime_ns, None), vec_row))
    _hash_all([it for it, _row in items])
    keyed = [it.row(vec_row, None) for it, vec_row in items if it.content_key is not None]
    if keyed:
        store.commit(upserts=keyed)


def _hash_all(items, timeout: float | None = DEFAULT_INPUT_TIMEOUT) -> None:
    """Content keys, read in a few daemon threads (hashlib and file reads release the GIL), a
    run of files per task (a task per file would cost more than hashing a small one): at most
    HASH_CHUNK files and HASH_CHUNK_BYTES. A file that cannot be read keeps None and is embedded,
    which reports why; so do the files of a run not hashed within `timeout` seconds (None: no
    limit), a hung network mount, whose thread is given up."""
    if not items:
        return
    from concurrent.futures import TimeoutError as FutureTimeout

    from ..inputs.pipeline import DaemonPool

    runs, size = [[]], 0
    for item in items:
        if runs[-1] and (len(runs[-1]) == HASH_CHUNK or size + item.size > HASH_CHUNK_BYTES):
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += item.size
    pool = DaemonPool(min(4, len(runs)))
    try:
        tasks = [(run, pool.submit(_hash_run, run)) for run in runs]
        for run, task in tasks:
            try:
                keys = pool.result(task, timeout)
            except FutureTimeout:
                pool.abandon(task)
                keys = [None] * len(run)
            for item, key in zip(run, keys):
                item.content_key = key
    finally:
        pool.close()


def _hash_run(items) -> list:
    """The content key of each item, None for one that cannot be read."""
    keys = []
    for item in items:
        try:
            keys.append(content_key(item.path, item.size))
        except OSError:
            keys.append(None)
    return keys


def check_model(store, model) -> dict:
    """The loaded model against the index: the same weights and width, and the precision and
    decoding of the vectors already in it. Returns the settings to record with the next commit."""
    if model.weights_id != store.meta.get("weights") or int(model.embed_dim) != store.dim:
        raise OtherModelsIndex(
            f"the index in {store.folder} was made with {store.meta.get('model')} (weights {store.meta.get('weights')}, "
            f"{store.dim} dims); the model loaded is {model.model_id} (weights {model.weights_id}, {model.embed_dim} dims)",
            hint="give the index's model with -m, or --rebuild to start it over with this model")
    settings = {"precision": model.precision, "exact_decode": "1" if model.exact_decode else "0",
                "device_type": model.device.type}
    have = store.meta.get("precision")
    if have is not None and have != settings["precision"]:
        raise IndexStoreError(
            f"the index in {store.folder} holds vectors computed at {have} precision; this run computes at "
            f"{settings['precision']}",
            hint=f"pass --precision {have} to add to it, or --rebuild to embed everything again at {settings['precision']}")
    have = store.meta.get("exact_decode")
    if have is not None and have != settings["exact_decode"]:
        was = "with" if have == "1" else "without"
        raise IndexStoreError(
            f"the index in {store.folder} was built {was} --exact-decode, this run is not",
            hint=f"run {was} --exact-decode to add to it, or --rebuild to embed everything again")
    return settings


def _embed(get, store, items, open_kw, batch_size, input_timeout, msgs, commit_every, summary) -> None:
    import numpy as np

    from ..inputs.sources import Source, display, open_source, reason
    from ..outputs.signals import signals_deferred

    model = get()
    settings = check_model(store, model)
    kw = {**open_kw, "draft_min_side": model.draft_min_side}
    keys: dict[str, str] = {}  # path -> content key, of the bytes the decoder read
    facts: dict[str, PhotoFacts] = {}  # path -> the photo's facts, read as it was decoded
    unhashed = {it.path for it in items if it.content_key is None}
    mtimes = {it.path: it.mtime_ns for it in items}

    def open_fn(source):  # in a decoding thread
        reader = FactsReader(mtimes.get(source.path))
        on_bytes = None
        if source.path in unhashed:
            def on_bytes(data: bytes) -> None:  # before the bytes are decoded
                keys[source.path] = content_key_of(data)

        image = open_source(source, on_bytes=on_bytes, on_header=reader.header, **kw)
        facts[source.path] = reader.done(image)
        return image

    sources = [Source(it.name, path=it.path) for it in items]
    results = model.stream_images(sources, open_fn=open_fn, batch_size=batch_size, input_timeout=input_timeout)
    pending: list = []  # (item, embedding or None, error or None)

    def flush():
        with signals_deferred():  # Ctrl-C and SIGTERM wait for the commit and the counts
            if not pending:
                return
            batch = pending[:]
            pending.clear()  # whatever happens below, this batch is not written twice
            vectors = [emb for _it, emb, _why in batch if emb is not None]
            row = store.append_vectors(np.stack(vectors)) if vectors else None
            upserts, read = [], {}
            for it, emb, why in batch:
                if it.content_key is None:
                    it.content_key = keys.get(it.path)
                vec_row = None
                if emb is not None:
                    vec_row, row = row, row + 1
                known = facts.pop(it.path, None) if emb is not None else None
                for f in [it, *it.followers]:
                    upserts.append(f.row(vec_row, why))
                    if known is not None:
                        read[f.key] = known.with_file_time(f.mtime_ns)
            store.commit(upserts=upserts, meta=settings, facts=read)
            for it, emb, _why in batch:
                group = [it, *it.followers]
                if emb is None:
                    summary.failed += len(group)
                    continue
                summary.updated += sum(1 for f in group if f.old_id is not None)
                summary.added += sum(1 for f in group if f.old_id is None)
                summary.reused += len(it.followers)
            summary.embedded += len(vectors)

    total = sum(1 + len(it.followers) for it in items)
    try:
        with msgs.progress("indexing", total=total) as bar:
            for it, r in zip(items, results):
                if r.embedding is None:
                    why = reason(r.error, r.source.name)
                    msgs.error(f"{display(r.source.name)}: {why}")
                    for f in it.followers:
                        msgs.error(f"{display(f.name)}: {why}")
                    pending.append((it, None, why))
                else:
                    pending.append((it, r.embedding, None))
                bar.advance(1 + len(it.followers))
                if len(pending) >= commit_every:
                    flush()
            flush()
    except KeyboardInterrupt:
        flush()
        summary.interrupted = True
        raise
    except Exception:  # the model or the server stopping: what was embedded before is kept
        flush()
        raise
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def read_missing_facts(store, roots: list[str], *, open_kw: dict | None = None,
                       input_timeout: float | None = DEFAULT_INPUT_TIMEOUT, msgs=None,
                       commit_every: int = COMMIT_EVERY, summary: UpdateSummary | None = None) -> int:
    """Read the facts (facts.py) of the files with a vector at or below `roots` (as the index
    names them) that have none yet: an index made before facts were kept, or files embedded
    through a server. Decoding only, in a few threads: the image tower is not used. Files that
    changed since they were indexed are left to the next update. Committed every `commit_every`
    files and when interrupted (KeyboardInterrupt is re-raised after that commit). Returns how
    many were read (also added to summary.facts_read)."""
    from concurrent.futures import TimeoutError as FutureTimeout

    from ..inputs.pipeline import DaemonPool
    from ..inputs.threads import plan_threads
    from ..outputs.signals import signals_deferred

    msgs = msgs or Silent()
    todo = []
    for root in roots:
        if not storable(root):  # the index holds nothing below it (the walk warned)
            continue
        for key, size, mtime_ns in store.without_facts(root):
            path = store.path_of(key)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                todo.append((key, path, mtime_ns))
    if not todo:
        return 0
    max_pixels = (open_kw or {}).get("max_pixels", False)
    pool = DaemonPool(plan_threads("cpu").decode_workers)
    pending: dict = {}
    done = 0

    def flush():
        nonlocal done
        with signals_deferred():
            if pending:
                batch = dict(pending)
                pending.clear()
                store.commit(facts=batch)
                done += len(batch)
                if summary is not None:
                    summary.facts_read += len(batch)

    ahead = 4 * plan_threads("cpu").decode_workers  # files read ahead of the one waited for
    in_flight: deque = deque()

    def settle_oldest(bar):
        (key, _path, _mtime), task = in_flight.popleft()
        try:
            pending[key] = pool.result(task, input_timeout)
        except FutureTimeout:  # a hung read (a network mount): tried again by the next update
            pool.abandon(task)
        except Exception:  # noqa: BLE001 - a decoder bug on one file: marked read, without facts
            pending[key] = None
        bar.advance(1)
        if len(pending) >= commit_every:
            flush()

    try:
        with msgs.progress("reading dates, places and cameras", total=len(todo)) as bar:
            for key, path, mtime_ns in todo:
                in_flight.append(((key, path, mtime_ns), pool.submit(read_facts, path, mtime_ns, max_pixels)))
                if len(in_flight) >= ahead:
                    settle_oldest(bar)
            while in_flight:
                settle_oldest(bar)
        flush()
    except BaseException:
        flush()
        raise
    finally:
        for _item, task in in_flight:
            task.future.cancel()
        pool.close()
    return done
