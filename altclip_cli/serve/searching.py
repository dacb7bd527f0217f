"""POST /v1/search and POST /v1/index: `altclip search` and `altclip index` done by the server
with its warm model.

The request names a folder and an index on this machine (so it is taken over the Unix socket
only). The server decodes the query's images first (an unreadable one fails the request before
any indexing), then encodes the query while it brings the index up to date below the folder
(search.run.update_below: new and changed images go through the model thread like any other
request's), and ranks (search.run.rank_below). The answer carries the records of
`altclip search -f json` plus what the command prints on stderr: the update's counts and its
messages (each image that failed, folders that could not be read).

Updates of one index run one at a time in this server (a second request waits for the first,
then finds little to do). Another process updating the same index makes the request wait up to
`wait` seconds, then fail with 409 as the command does; that wait holds no worker thread and not
the index's turn (it tries again every second or less), so a request with a shorter wait is
answered at once meanwhile, and a stopping server answers it 503 instead of waiting on.

A warm server also remembers the trees it has walked (search/fresh.py): a later search below
the same folder skips the walk when nothing changed there since, or walks only the folders where
something did. /v1/index always walks its paths whole, as `altclip index` does.

What the server keeps per index (IndexLocks) is bounded: the MAX_INDEXES indexes used last
(each holds a SQLite read connection and its watched trees), MAX_WATCHED_TREES watched trees in
all (one inotify instance each), and nothing unused for IDLE_S; what goes is closed, and the next
search there opens it again and walks.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..errors import AltclipError, InputError
from ..inputs.names import display
from ..quiet import NoProgress
from ..outputs.records import search_record
from ..search.filters import FilterError, parse_filter
from ..search.fresh import TRUST_CLEAN_S, FreshTrees, update_watched
from ..search.query import QueryError, combine
from ..search.run import index_folder, index_paths, rank_below
from ..search.store import IndexBusy, IndexStoreError, SnapshotCache
from ..search.summary import UpdateSummary
from ..search.update import index_identity
from .batcher import QueueFull
from .jobs import ImageInput, image_failure, image_inputs, model_job, submit
from .requests import ApiError, IndexRequest, SearchRequest, bad_request


class BatchedModel:
    """The server's AltCLIP as update_index uses it, with its forward passes on the model thread
    (batcher.Batcher): an index update shares the model with the other requests, one pass at a
    time, instead of running a second pass beside them."""

    def __init__(self, model, batcher, decoder):
        self._model, self._batcher, self._decoder = model, batcher, decoder

    def __getattr__(self, name):  # model_id, weights_id, precision, device, draft_min_side, ...
        return getattr(self._model, name)

    def stream_images(self, sources, *, open_fn, batch_size=None, input_timeout=None, **_ignored):
        from ..inputs.pipeline import stream_embeddings

        return stream_embeddings(sources, open_fn, self._model.preprocessor, self._encode,
                                 batch_size=self._batcher.image_batch, workers=self._decoder.workers,
                                 input_timeout=input_timeout)

    def _encode(self, pixels: np.ndarray) -> np.ndarray:
        self._decoder.check_stuck()  # an update over a hung mount stops (keeping what it committed)
        return _wait(lambda: self._batcher.submit_images(pixels, True))


def _wait(submit) -> np.ndarray:
    """The result of a batcher job, its queue's refusals waited out (an index update is not a
    client that can be told to come back later)."""
    while True:
        try:
            future: Future = submit()
        except QueueFull as exc:
            time.sleep(min(max(exc.retry_after, 0.05), 1.0))
            continue
        return future.result()


class RecordedMessages:
    """update_index's messages, kept for the answer (the client prints them as its own), and its
    progress, kept in `progress_entry` (what /v1/health shows under "indexing")."""

    quiet = True

    def __init__(self, progress_entry: dict | None = None):
        self.lines: list[dict] = []
        self.progress_entry = {"done": 0, "total": None, **(progress_entry or {})}

    def warn(self, message):
        self.lines.append({"level": "warning", "message": message})

    def error(self, message, hint=None):
        self.lines.append({"level": "error", "message": message, **({"hint": hint} if hint else {})})

    def note(self, message):
        self.lines.append({"level": "note", "message": message})

    def progress(self, description, total=None, **kw):
        return _Progress(self.progress_entry, total)


class _Progress(NoProgress):
    """update_index's progress bar, as numbers: {"done": n, "total": t} in the entry."""

    def __init__(self, entry: dict, total):
        self.entry = entry
        entry.update(done=0, total=total)

    def advance(self, n: int = 1) -> None:
        self.entry["done"] = self.entry.get("done", 0) + n


_update_ids = itertools.count()  # keys of ServeState.indexing


MAX_INDEXES = 8  # indexes whose state is kept while unused (a SQLite read connection each)
MAX_WATCHED_TREES = 16  # watched trees kept in all (one inotify instance each; Linux allows 128 per user)
IDLE_S = TRUST_CLEAN_S  # an index unused this long is closed (its watches are no longer trusted by then)
LOCK_POLL_S = 1.0  # how often a request waiting for another process's write lock tries again (at most)


@dataclass(eq=False)
class IndexState:
    """What this server keeps per index: the turn its updates take (one at a time), the trees
    it watches (used during a turn), its reader's SnapshotCache, and its users (requests that
    hold it: IndexLocks closes it only when there are none)."""

    turn: asyncio.Lock = field(default_factory=asyncio.Lock)
    writing: threading.Lock = field(default_factory=threading.Lock)  # held by the update's thread, even
    # if its request was cancelled meanwhile (FreshTrees is not for two threads at once)
    trees: FreshTrees = field(default_factory=FreshTrees)
    snapshots: SnapshotCache = field(default_factory=SnapshotCache)
    users: int = 0
    used_at: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        self.trees.close()
        self.snapshots.close()


class IndexLocks:
    """The IndexState of each index folder this server uses, bounded (see the module doc): when
    a request is done with an index, the states beyond `max_indexes` (least recently used
    first), those idle for `idle_s`, and watched trees beyond `max_trees` (the oldest of idle
    indexes first) are closed. A state in use is never closed: while requests use more indexes
    at once than the bound, that many stay open."""

    def __init__(self, max_indexes: int = MAX_INDEXES, max_trees: int = MAX_WATCHED_TREES,
                 idle_s: float = IDLE_S):
        self.max_indexes, self.max_trees, self.idle_s = max_indexes, max_trees, idle_s
        self._guard = threading.Lock()
        self._states: OrderedDict[str, IndexState] = OrderedDict()  # least recently used first
        self._sweeper: threading.Thread | None = None  # closes idle states of a server nobody asks
        self._closed = threading.Event()

    @contextmanager
    def use(self, folder):
        """The IndexState of `folder`, held (not closed) until the block ends."""
        key = os.path.realpath(folder)
        with self._guard:
            if self._sweeper is None and self.idle_s > 0:
                self._sweeper = threading.Thread(target=self._sweep, name="altclip-index-sweeper", daemon=True)
                self._sweeper.start()
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = IndexState()
            self._states.move_to_end(key)
            state.users += 1
        try:
            yield state
        finally:
            with self._guard:
                state.users -= 1
                state.used_at = time.monotonic()
                self._trim()

    def sizes(self) -> dict:
        """{"indexes": states kept, "watched_trees": their watched trees}."""
        with self._guard:
            return {"indexes": len(self._states), "watched_trees": sum(len(s.trees) for s in self._states.values())}

    def _trim(self) -> None:
        now = time.monotonic()
        idle = [(k, s) for k, s in self._states.items() if s.users == 0]  # least recently used first
        for key, state in idle:
            if len(self._states) > self.max_indexes or now - state.used_at > self.idle_s:
                del self._states[key]
                state.close()
        trees = sum(len(s.trees) for s in self._states.values())
        for state in (s for s in self._states.values() if s.users == 0):
            trees -= state.trees.drop_stale()
            while trees > self.max_trees and len(state.trees):
                state.trees.drop_oldest()
                trees -= 1

    def _sweep(self) -> None:
        while not self._closed.wait(self.idle_s / 2):
            with self._guard:
                self._trim()

    def close(self) -> None:
        """Close every state not in use (the server is stopping)."""
        self._closed.set()
        with self._guard:
            for key, state in [(k, s) for k, s in self._states.items() if s.users == 0]:
                del self._states[key]
                state.close()


async def _in_turn(state, kept: IndexState, wait: float, update):
    """update() in a worker thread during the index's turn, its write lock taken without waiting
    (it raises IndexBusy when another process holds it). While another process does, the turn
    is given back and update tried again until `wait` seconds went by (see the module doc)."""
    deadline = time.monotonic() + wait
    pause = 0.05
    while True:
        async with kept.turn:
            try:
                return await run_in_threadpool(_holding, kept.writing, update)
            except IndexBusy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            except asyncio.CancelledError:
                if not _stopping(state):
                    raise
                raise ApiError(503, "the server was stopped at once (Ctrl-C twice) during this update: it stops "
                                    "at its next batch of images, keeping what it committed", type="server_error",
                               code="stopping", hint="run it again to finish") from None
        if _stopping(state):
            raise ApiError(503, "the server is stopping: it no longer waits for another process's update of "
                                "the index", type="server_error", code="stopping",
                           hint="run the command again once a server is up, or without one (--server off)")
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, LOCK_POLL_S)


def _holding(lock: threading.Lock, fn):
    with lock:
        return fn()


def _stopping(state) -> bool:
    return bool(getattr(state.server, "should_exit", False))


async def run_search(state, req: SearchRequest, locks: IndexLocks) -> dict:
    """The answer to one SearchRequest (see the module doc); ApiError for what cannot be done."""
    model = state.model
    where = _filter(req)
    root = _folder(req.dir)
    identity = index_identity(model)
    folder = _index(req, model)

    images = [p.image for p in req.query if p.image is not None]
    items: list[ImageInput] = image_inputs(images, state)
    decoded = await state.decoder.decode(items)
    if (failure := image_failure(decoded, items)) is not None:
        raise ApiError(422, f"query image {failure.message}", param="query", code="bad_image")

    async def vector():
        texts = [p.text for p in req.query if p.text is not None]
        rows = {}
        if texts:
            ids = await run_in_threadpool(model.tokenizer.encode, texts)
            rows["text"] = iter(await model_job(submit(state.batcher.submit_texts, ids, True)))
        if decoded:
            rows["image"] = iter(await model_job(submit(state.batcher.submit_images, np.stack(decoded), True)))
        parts = [next(rows["text" if p.text is not None else "image"]) for p in req.query]
        return combine(parts, [p.weight for p in req.query])

    summary, messages = UpdateSummary(), RecordedMessages({"dir": root, "index": str(folder)})
    walked: list[str] = []  # the folders walked (root, or those below it where something changed)

    def update(kept):
        nonlocal walked
        walked = update_watched(kept.trees, _indexer(state), identity, folder, root, summary=summary,
                                **_walk_kw(state, req, messages))

    with _shown(state, messages), _api_errors(), locks.use(folder) as kept:
        # The query is encoded while the folder is walked: the two overlap on a warm server. Both
        # end before the answer, a failure of either included (the update uses `kept`).
        jobs = [vector()] + ([_in_turn(state, kept, req.wait, lambda: update(kept))] if req.update else [])
        query, *others = await asyncio.gather(*jobs, return_exceptions=True)
        for outcome in (query, *others):
            if isinstance(outcome, BaseException):
                raise outcome
        ranked = await run_in_threadpool(rank_below, identity, folder, root, query, req.top_k, req.min_score,
                                         cache=kept.snapshots, where=where)
    if walked and walked != [root]:
        summary.files = ranked.total if where.active else ranked.searched  # a part was walked: the line
        # names the images below root
    counts = {"total": ranked.total, "missing": ranked.missing, "unread": ranked.unread} if where.active else {}
    return {"model": model.model_id, "dir": display(root), "index": display(str(folder)), "searched": ranked.searched,
            **counts, "results": [search_record(*hit) for hit in ranked.hits],
            "update": dataclasses.asdict(summary) if req.update else None, "walked": walked,
            "messages": messages.lines}


async def run_index(state, req: IndexRequest, locks: IndexLocks) -> dict:
    """The answer to one IndexRequest: `altclip index` done here (search.run.index_paths), its
    counts, its compaction and its messages; ApiError for what cannot be done."""
    model = state.model
    roots = []
    for i, item in enumerate(req.paths):
        if not os.path.isabs(item.path):
            raise bad_request(f"paths[{i}] must be absolute (the server's working folder is not yours): "
                              f"{item.path!r}", f"paths[{i}]")
        if not os.path.exists(item.path):
            raise ApiError(422, f"{item.name or item.path}: no such file or folder", param=f"paths[{i}]",
                           code="no_folder")
        roots.append((item.name or item.path, item.path))
    folder = _index(req, model)
    summary, messages = UpdateSummary(), RecordedMessages({"dir": roots[0][1], "index": str(folder)})

    def update():
        return index_paths(_indexer(state), index_identity(model), folder, roots, rebuild=req.rebuild,
                           compact=req.compact, summary=summary, retry_failed=req.retry_failed,
                           **_walk_kw(state, req, messages))

    with _shown(state, messages), _api_errors(), locks.use(folder) as kept:
        compacted = await _in_turn(state, kept, req.wait, update)
    return {"model": model.model_id, "index": str(folder), "update": dataclasses.asdict(summary),
            "compacted": list(compacted) if compacted else None, "messages": messages.lines}


def _filter(req: SearchRequest):
    """The request's search.filters.SearchFilter; 400 naming the field for a bad one."""
    try:
        return parse_filter(after=req.after, before=req.before, near=req.near, within=req.within, camera=req.camera,
                            sort=req.sort)
    except FilterError as exc:
        raise bad_request(exc.message_for(""), exc.field, code="bad_filter") from None


def _index(req, model):
    """The request's index folder; ApiError unless it is "auto" or absolute."""
    if req.index != "auto" and not os.path.isabs(req.index):
        raise bad_request(f"index must be \"auto\" or an absolute folder, not {req.index!r}", "index")
    return index_folder(req.index, model.weights_id)


def _indexer(state) -> BatchedModel:
    return BatchedModel(state.model, state.batcher, state.decoder)


def _walk_kw(state, req, messages) -> dict:
    """The keyword arguments of an index update (search.run) from a request: the walk, the
    server's decoding limits, the messages kept for the answer, and this server named to other
    writers."""
    kw = {"include_hidden": req.include_hidden, "open_kw": {"max_pixels": state.decoder.max_pixels},
          "input_timeout": state.decoder.input_timeout, "msgs": messages, "writer": "altclip serve"}
    if req.exclude_dirs is not None:
        kw["exclude_dirs"] = tuple(d for d in req.exclude_dirs if d)
    return kw


@contextmanager
def _shown(state, messages: RecordedMessages):
    """The request's index update listed in /v1/health ("indexing") while the request runs."""
    key = next(_update_ids)
    state.indexing[key] = messages.progress_entry
    try:
        yield
    finally:
        state.indexing.pop(key, None)


@contextmanager
def _api_errors():
    """The library's errors as the answers they are: a bad query 400 (code "usage" for parts that
    cancel out), another writer 409, a damaged or foreign index and an unusable image 422."""
    try:
        yield
    except QueryError as exc:
        raise ApiError(400, exc.message, param="query", code="usage" if exc.usage else None, hint=exc.hint) from None
    except IndexStoreError as exc:
        status = 409 if isinstance(exc, IndexBusy) else 422
        raise ApiError(status, exc.message, param="index", code="index", hint=exc.hint) from None
    except InputError as exc:
        raise ApiError(422, exc.message, code="bad_image") from None
    except AltclipError as exc:
        raise ApiError(500, exc.message, type="server_error", hint=exc.hint) from None


def _folder(path: str) -> str:
    """The request's dir, absolute and real; ApiError when it is not an existing folder."""
    if not os.path.isabs(path):
        raise bad_request(f"dir must be an absolute folder (the server's working folder is not yours): {path!r}",
                          "dir")
    if not os.path.isdir(path):
        what = "is not a folder" if os.path.exists(path) else "no such folder"
        raise ApiError(422, f"dir {path}: {what}", param="dir", code="no_folder",
                       hint="give --dir an existing folder (default: the current one)")
    return os.path.realpath(path)
