"""The two halves of a search that `altclip search` and `altclip serve` (POST /v1/search) share:
bring the index up to date with the images below a folder, then rank those images against a
query vector; and search_below, the whole search in this process (the query encoded, then both
halves), which `altclip search` and altclip_cli.search.search() run.

    identity = index_identity(model)                       # update.py
    folder = index_folder("auto", model.weights_id)
    summary = update_below(model, identity, folder, root, writer="altclip search")
    ranked = rank_below(identity, folder, root, vector, top=10, where=parse_filter(after="2023"))

`root` is an absolute, real path; ranked.hits are (rank, absolute path, score, facts) tuples,
best first (or by date: filters.SearchFilter.sort), facts the photo's known "taken", "gps" and
"camera" (search.facts.PhotoFacts.record).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..paths import INDEX_FOLDER_HINT, blank_folder, default_index_folder, index_path, indexes_dir, real_root
from .filters import SearchFilter
from .store import INDEX_DB, IndexStore, IndexStoreError, SnapshotCache
from .summary import UpdateSummary
from .update import DEFAULT_INPUT_TIMEOUT, storable, update_index


def index_folder(index: str, weights_id: str) -> Path:
    """The folder `--index DIR|auto` names: the model's own under ALTCLIP_HOME for "auto".
    IndexStoreError for a blank name, which would otherwise be the current folder, named nowhere."""
    if why := blank_folder("--index", index):
        raise IndexStoreError(why, hint=INDEX_FOLDER_HINT)
    return default_index_folder(weights_id) if index == "auto" else Path(os.path.expanduser(index))


def stores_relative(folder: Path, roots) -> bool:
    """An index folder inside a folder it indexes (`roots`: one path or several) stores paths
    relative to itself, so that the folder and its index move together; altclip's own indexes
    (those of `--index auto`, under paths.indexes_dir) store absolute paths. The folder alone
    decides, so a server given the folder of a client's `--index auto` decides as the client would."""
    real = os.path.realpath(folder)
    if _within(real, os.path.realpath(indexes_dir())):
        return False
    folders = [real_root(r) for r in ([roots] if isinstance(roots, (str, os.PathLike)) else roots)]
    return any(os.path.isdir(r) and _within(real, r) for r in folders)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def update_below(indexer, identity: dict, folder: Path, root: str, *, roots: list | None = None,
                 wait: float = 0.0, writer: str = "altclip search", summary: UpdateSummary | None = None,
                 **update_kw) -> UpdateSummary:
    """Open (or create) the index in `folder` and bring it up to date with the images below
    `root` (update.update_index; `indexer` is the model, or a callable returning it, called only
    when some image needs embedding), or only below `roots` (folders at or below root: where a
    watch saw changes). `summary` is filled in place, so an interrupted run's is kept. Raises
    IndexStoreError (another writer, another model, a damaged index). How paths are stored is
    decided by the folder (stores_relative)."""
    summary = summary if summary is not None else UpdateSummary()
    with IndexStore.open(folder, identity=identity, write=True, create=True, wait=wait,
                         relative_paths=stores_relative(folder, root), writer=writer) as store:
        if roots:  # below root as walked: named by the rule, not resolved again
            update_index(indexer, store, [index_path(r, root) for r in roots], summary=summary, as_named=True,
                         **update_kw)
        else:
            update_index(indexer, store, [root], summary=summary, **update_kw)
    return summary


def index_paths(indexer, identity: dict, folder: Path, roots: list, *, rebuild: bool = False,
                compact: bool = False, wait: float = 0.0, writer: str = "altclip index",
                summary: UpdateSummary | None = None, **update_kw) -> tuple[int, int] | None:
    """`altclip index`: open (or create; with `rebuild`, start over) the index in `folder`, bring
    it up to date with the images at or below `roots` (paths, or (name, path) pairs: see
    update.update_index), and compact its vector file when asked or when worth it (only a run
    that removed or changed files can make it so). Returns the compaction's (rows before,
    after), or None. `summary` is filled in place (an interrupted run's is kept)."""
    summary = summary if summary is not None else UpdateSummary()
    paths = [r[1] if isinstance(r, tuple) else r for r in roots]
    with IndexStore.open(folder, identity=identity, write=True, create=True, wait=wait, rebuild=rebuild,
                         relative_paths=stores_relative(folder, paths), writer=writer) as store:
        update_index(indexer, store, roots, summary=summary, **update_kw)
        if compact or summary.removed or summary.updated:
            return store.compact(only_if_worth=not compact)
    return None


@dataclass
class Ranked:
    """What rank_below found: hits (rank, absolute path, score, facts), in the order asked for;
    searched: the images ranked (those the filter kept); and with a filter, as the snapshot
    (Snapshot) counted them: total, the images below the folder; missing, {fact: those left out
    for lack of it}; unread, those whose facts the index has not read yet."""

    hits: list
    searched: int
    total: int = 0
    missing: dict = field(default_factory=dict)
    unread: int = 0


def rank_below(identity: dict, folder: Path, root: str, vector, top: int, min_score: float | None = None, *,
               cache: SnapshotCache | None = None, where: SearchFilter | None = None) -> Ranked:
    """The `top` indexed images at or below `root` by cosine with `vector` ((D,) unit float32),
    those under `min_score` left out, of those that `where` keeps (None: all), in its order.
    IndexStoreError when there is no index in `folder`. cache: a long-lived reader's
    store.SnapshotCache for this index."""
    from .rank import ExactRanker

    if not (folder / INDEX_DB).exists():
        raise IndexStoreError(f"there is no index in {folder}",
                              hint="leave out --no-index to build it now, or run `altclip index DIR` first")
    if not storable(root):  # the index holds UTF-8 paths only: none below this folder
        return Ranked([], 0)
    with IndexStore.open(folder, identity=identity) as store, \
            store.snapshot(under=root, cache=cache, where=where) as snap:
        counts = {"total": snap.total, "missing": snap.missing, "unread": snap.unread}
        if snap.count == 0:
            return Ranked([], 0, **counts)
        hits = ExactRanker(snap.vectors).top_k(vector, top, rows=snap.rows)
        positions, scores = hits.positions[0], hits.scores[0]
        if min_score is not None:
            keep = scores >= min_score
            positions, scores = positions[keep], scores[keep]
        ids = snap.file_ids[positions]
        paths, facts = snap.paths_of(ids), snap.facts_of(ids)
        found = [(i + 1, p, float(s), f.record() if f is not None else {})
                 for i, (p, s, f) in enumerate(zip(paths, scores, facts))]
        if where is not None:
            found = where.order(found, [f.taken_local if f is not None else None for f in facts])
        return Ranked(found, snap.count, **counts)


@dataclass
class Found:
    """What search_below found: hits (rank, absolute path, score, facts), best first (or as the
    filter orders them); the number of images searched; the query's image parts opened ({part
    index: PIL image}); the index update's summary (None without an update); and the ranking's
    counts (Ranked)."""

    hits: list
    searched: int
    images: dict
    summary: UpdateSummary | None
    ranked: Ranked | None = None


def search_below(model, parts, root: str, *, index: str = "auto", top: int = 10, min_score: float | None = None,
                 update: bool = True, indexer=None, query_sources: dict | None = None, open_kw: dict | None = None,
                 batch_size: int | None = None, input_timeout: float | None = DEFAULT_INPUT_TIMEOUT, wait: float = 0.0,
                 summary: UpdateSummary | None = None, writer: str = "altclip search",
                 where: SearchFilter | None = None, **update_kw) -> Found:
    """A search in this process, the steps of `altclip search` and of altclip_cli.search.search():
    open the query's image parts (one that cannot be read fails before any indexing), encode the
    query (query.QueryParts) with `model`, bring the index up to date with the images below
    `root` (an absolute, real folder) unless `update` is False, and rank them.
    index: "auto" or a folder. indexer: what embeds new images (default: model; a callable is
    called only when some image needs it). query_sources: what the model takes for the image
    parts instead of the opened images (a server's model reads them itself). input_timeout:
    seconds one image may take to read and decode. where: a filters.SearchFilter (None: every
    image). update_kw: update.update_index's (the walk's include_hidden and exclude_dirs, msgs, ...).
    Raises query.QueryError, IndexStoreError, InputError."""
    from .query import open_images, query_vector
    from .update import index_identity

    images = open_images(parts, open_kw, input_timeout)  # a query image that cannot be read fails before indexing
    vector = query_vector(model, parts, images if query_sources is None else query_sources, batch_size=batch_size)
    identity = index_identity(model)
    folder = index_folder(index, model.weights_id)
    if update:
        summary = update_below(indexer or model, identity, folder, root, wait=wait, writer=writer,
                               summary=summary, open_kw=open_kw, batch_size=batch_size, input_timeout=input_timeout,
                               **update_kw)
    ranked = rank_below(identity, folder, root, vector, top, min_score, where=where)
    return Found(ranked.hits, ranked.searched, images, summary if update else None, ranked)
