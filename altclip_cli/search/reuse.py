"""classify/embed --index: the vectors of the images an index holds unchanged, taken from it
instead of the image tower, and the images the run embeds that it does not hold added to it.

    store = open_for_reuse("auto", model, warn=msgs.warn)          # None: not usable (warned)
    hits = indexed_rows(store, sources) if store else {}           # {position: vector row}
    additions = IndexAdditions.for_run("auto", model, store, warn=msgs.warn)
    rest = [s for i, s in enumerate(sources) if i not in hits]
    results = additions.taking(rest, model.stream_images(rest))   # adds each new vector (may be None)
    results = merged_results(sources, hits, store, results)        # all of them, in input order

Additions are what `altclip index` would store for those files (the same model, precision and
decoding: open_for_reuse checked them), committed every COMMIT_EVERY images and at the end, each
time under the index's write lock taken for the commit alone. When another run holds it longer
than ADD_WAIT_S, the run goes on without adding (a warning says so; `altclip index` adds them).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..paths import index_names
from .run import index_folder
from .store import INDEX_DB, IndexBusy, IndexStore, IndexStoreError, OtherModelsIndex
from .update import COMMIT_EVERY, check_model, content_key, index_identity

ADD_WAIT_S = 2.0


def open_for_reuse(spec: str, model, *, warn: Callable[[str], None]) -> IndexStore | None:
    """The index named by --index (a folder, or "auto": the model's default one), read-only, when
    its vectors are what this run would compute: the same weights and width, precision and
    decoding (else a warning says why not, and None: the run goes on without it, and adds
    nothing to it). None, with a warning, when there is no index there."""
    folder = index_folder(spec, model.weights_id)
    if not (folder / INDEX_DB).exists():
        warn(f"--index: there is no index in {folder} yet; every image goes through the model, and the "
             "images are added to a new one")
        return None
    try:
        store = IndexStore.open(folder, identity=index_identity(model))
    except OtherModelsIndex as exc:
        warn(f"--index: {exc.message}: not using it")
        return None
    for key, ours in (("precision", model.precision), ("exact_decode", "1" if model.exact_decode else "0")):
        theirs = store.meta.get(key)
        if theirs is not None and theirs != ours:
            what = (f"at {theirs} precision, this run at {ours}" if key == "precision" else
                    f"{'with' if theirs == '1' else 'without'} --exact-decode, this run is not")
            warn(f"--index: the vectors in {folder} were computed {what}: not using them")
            store.close()
            return None
    return store


def indexed_rows(store: IndexStore, sources) -> dict[int, int]:
    """{position in sources: vector row} for the local files (Sources with a path) that the index
    holds, under any of their names (paths.index_names), with a vector and the same size and
    mtime_ns as now."""
    return {i: record[2] for i, (_name, record) in indexed_files(store, sources).items()}


def indexed_files(store: IndexStore, sources) -> dict[int, tuple[str, tuple]]:
    """{position in sources: (the name the index holds it under, store.lookup's record)} for the
    files of indexed_rows."""
    local = [(i, s.path, index_names(s.path, getattr(s, "root", None))) for i, s in enumerate(sources)
             if getattr(s, "path", None) and not getattr(s, "error", None)]
    found = store.lookup([name for *_x, names in local for name in names])
    hits = {}
    for i, path, names in local:
        name = next((n for n in names if n in found and found[n][2] is not None), None)
        if name is None:
            continue
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_size, st.st_mtime_ns) == found[name][:2]:
            hits[i] = (name, found[name])
    return hits


def filtered_positions(store: IndexStore, sources, where) -> tuple[list[int], dict]:
    """(the positions in sources that `where` (a filters.SearchFilter) keeps, counts) by what the
    index holds of each file as it is now (indexed_files), in the same SQL as a search's
    snapshot. counts: {"total": sources, "kept", "not_indexed": sources it does not hold as they
    are now (URLs, new or changed files), "missing": {fact: held files without it}, "unread":
    held files whose facts it has not read}; all but the kept are left out."""
    held = indexed_files(store, sources)
    with store.snapshot(where=where) as snap:
        ids = snap.ids_of([store.key_of(name) for name, _record in held.values()])
        kept_ids = set(snap.file_ids.tolist())
        file_of = {i: ids[store.key_of(name)] for i, (name, _record) in held.items()}
        kept = [i for i in sorted(held) if file_of[i] in kept_ids]
        left = [i for i in sorted(held) if file_of[i] not in kept_ids]
        facts = snap.facts_of([file_of[i] for i in left])
    missing = {name: 0 for name in where.needs}
    for f in facts:
        for name in where.lacks(f):
            missing[name] += 1
    return kept, {"total": len(sources), "kept": len(kept), "not_indexed": len(sources) - len(held),
                  "missing": missing, "unread": sum(f is None for f in facts)}


def merged_results(sources, hits: dict[int, int], store: IndexStore, results):
    """ImageResults in input order: the index's vector at the positions in `hits`, and in between
    the model's `results` for the other sources (in their order)."""
    from ..inputs.pipeline import ImageResult

    results = iter(results)
    for i, source in enumerate(sources):
        if i in hits:
            yield ImageResult(i, source, store.vector(hits[i]))
        else:
            r = next(results)
            yield ImageResult(i, r.source, r.embedding, r.error)


def merged_batches(sources, hits: dict[int, int], store: IndexStore, batches, size: int):
    """image_batches' (name, record, embedding) lists in input order, taking the index's vector at
    the positions in `hits` and the model's `batches` (of the other sources) in between. Closes
    `store` when done."""
    from ..inputs.sources import display

    def items():
        model_items = (item for batch in batches for item in batch)
        for i, source in enumerate(sources):
            if i in hits:
                yield (source.name, {"image": display(source.name)}, store.vector(hits[i]))
            else:
                yield next(model_items)

    out = []
    try:
        for item in items():
            out.append(item)
            if len(out) >= size:
                yield out
                out = []
        if out:
            yield out
    finally:
        store.close()


class IndexAdditions:
    """The images a run embeds that its --index index does not hold as they are now, added to it
    (see the module doc). `taking` wraps the model's results; `add` takes one more."""

    def __init__(self, folder: Path, model, warn: Callable[[str], None]):
        self.folder, self.model, self.warn = folder, model, warn
        self.pending: list[tuple] = []  # (path, size, mtime_ns, embedding)
        self.off = False
        self._stats: dict[str, tuple[int, int]] = {}
        self._names: dict[str, list] = {}  # path -> the names the index may hold it under (paths.index_names)

    @classmethod
    def for_run(cls, spec: str, model, store: IndexStore | None, *, warn: Callable[[str], None]):
        """The additions of a run whose --index is `spec`, or None when the index is not this run's
        (open_for_reuse found it made at another precision or decoding: store None, index there)."""
        folder = index_folder(spec, model.weights_id)
        if store is None and (folder / INDEX_DB).exists():
            return None
        return cls(folder, model, warn)

    def taking(self, sources, results):
        """results (ImageResults of `sources`, in order) passed on, each local file's vector added.
        The files' size and modification time are read now, before the model reads the files: one
        changed meanwhile is embedded again by the next `altclip index`."""
        self.remember(sources)
        try:
            for r in results:
                if r.embedding is not None:
                    self.add(r.source, r.embedding)
                yield r
        finally:
            self.flush()

    def taking_batches(self, sources, batches):
        """rows.image_batches' lists (one (name, record, embedding) per source of `sources`, in
        order) passed on, each local file's vector added, as `taking` does."""
        self.remember(sources)
        pending_sources = iter(sources)
        try:
            for batch in batches:
                for (_name, _record, embedding), src in zip(batch, pending_sources):
                    if embedding is not None:
                        self.add(src, embedding)
                yield batch
        finally:
            self.flush()

    def remember(self, sources) -> None:
        """The size and modification time of the local regular files among `sources`, now."""
        import stat

        for src in sources:
            path = getattr(src, "path", None)
            if path is None or getattr(src, "error", None) is not None:
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                self._stats[path] = (st.st_size, st.st_mtime_ns)
                self._names[path] = index_names(path, getattr(src, "root", None))

    def add(self, source, embedding) -> None:
        path = getattr(source, "path", None)
        if self.off or path not in self._stats:
            return
        self.pending.append((path, *self._stats[path], embedding))
        if len(self.pending) >= COMMIT_EVERY:
            self.flush()

    def flush(self) -> None:
        """Commit the pending additions (see the module doc)."""
        import numpy as np

        if self.off or not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            with IndexStore.open(self.folder, identity=index_identity(self.model), write=True, create=True,
                                 wait=ADD_WAIT_S, writer="altclip --index") as store:
                settings = check_model(store, self.model)
                first = store.append_vectors(np.stack([np.asarray(e, dtype=np.float32) for *_x, e in batch]))
                held = store.lookup([n for path, *_x in batch for n in self._names[path]])
                upserts = []
                for k, (path, size, mtime_ns, _e) in enumerate(batch):
                    # Under the name the index holds it by (a changed file), else by the rule's.
                    name = next((n for n in self._names[path] if n in held), self._names[path][0])
                    try:
                        key = content_key(path, size)
                    except OSError:
                        key = None
                    upserts.append((store.key_of(name), size, mtime_ns, key, first + k, None))
                store.commit(upserts=upserts, meta=settings)
        except IndexBusy as exc:
            self.off = True
            self.warn(f"--index: {exc.message}; the images new to it are not added this time "
                      "(`altclip index` adds them)")
        except IndexStoreError as exc:
            self.off = True
            self.warn(f"--index: {exc.message}; the images new to it are not added")
