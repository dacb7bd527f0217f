"""Which folders an index is known to be up to date with, for a long-lived process (`altclip
serve`): the trees it walked, each with an inotify watch on every folder the walk listed and
the state of every symlink it followed (watch.py), and what changed below them since.

A later update below the same folder, with the same walk options, walks nothing when no event
came since, or only the folders where something changed (`FreshTrees.plan`), as long as nobody
else has written the index (`index_state`) and the whole walk is recent (TRUST_CLEAN_S).
Anything the watch cannot vouch for (another file system type than a local one, the watch
limit, another OS, a queue overflow) makes the next update walk the whole tree.

    trees = FreshTrees()                     # one per index, kept while the process uses it
    walked = update_watched(trees, model, identity, folder, root)   # as run.update_below
    # walked: [root] the first time, then [] while nothing changes, or the folders that changed
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .run import update_below
from .store import INDEX_DB, VECTORS
from ..inputs.walk import DEFAULT_EXCLUDES
from .watch import TreeWatch

TRUST_CLEAN_S = 300.0  # a watched tree with no event is still walked again after this long
MAX_TREES = 16  # watched trees kept (each is one inotify instance)


@dataclass(eq=False)
class WatchedTree:
    root: str
    options: tuple  # (include_hidden, exclude_dirs)
    watch: TreeWatch
    index_state: tuple  # index_state() right after this process's last update below root
    pending: set = field(default_factory=set)  # paths that changed and were not walked again yet
    used_at: float = field(default_factory=time.monotonic)  # when a plan last relied on it

    def walked(self, below: str, index_state: tuple) -> None:
        """The update below `below` is done: its changes are no longer pending."""
        self.pending = {p for p in self.pending if not _within(p, below)}
        self.index_state = index_state


class FreshTrees:
    """The trees this process walked for one index, and what changed in them since."""

    def __init__(self):
        self._trees: list[WatchedTree] = []

    def plan(self, root: str, options: tuple, index_state: tuple) -> tuple[WatchedTree | None, list[str]]:
        """What to walk to bring the index up to date below `root`: (a watched tree covering it,
        the folders below root to walk again, [] when nothing changed there), or (None, [root])
        when there is no tree to trust (none covers root with these walk options, the index was
        written by someone else, the watch lost track, or TRUST_CLEAN_S went by)."""
        for tree in list(self._trees):
            if tree.options != options or not _within(root, tree.root):
                continue
            changes = tree.watch.changes()
            if (changes is None or tree.index_state != index_state
                    or time.monotonic() - tree.watch.armed_at > TRUST_CLEAN_S):
                self._drop(tree)
                continue
            tree.pending |= changes
            tree.used_at = time.monotonic()
            if any(_within(root, p) for p in tree.pending):  # root itself, or a folder on its path
                return tree, [root]
            return tree, _walk_roots({p for p in tree.pending if _within(p, root)}, options)
        return None, [root]

    def keep(self, root: str, options: tuple, watch: TreeWatch, index_state: tuple) -> None:
        if not watch.usable or watch.folders == 0:
            watch.close()
            return
        for tree in [t for t in self._trees if t.root == root and t.options == options]:
            self._drop(tree)
        self._trees.append(WatchedTree(root, options, watch, index_state))
        while len(self._trees) > MAX_TREES:
            self._drop(self._trees[0])

    def __len__(self) -> int:
        return len(self._trees)

    def drop_stale(self) -> int:
        """Close the trees no plan would trust any more (TRUST_CLEAN_S went by); how many."""
        stale = [t for t in self._trees if time.monotonic() - t.watch.armed_at > TRUST_CLEAN_S]
        for tree in stale:
            self._drop(tree)
        return len(stale)

    def drop_oldest(self) -> None:
        """Close the tree a plan relied on least recently (a caller bounding its inotify instances)."""
        if self._trees:
            self._drop(min(self._trees, key=lambda t: t.used_at))

    def close(self) -> None:
        for tree in list(self._trees):
            self._drop(tree)

    def _drop(self, tree: WatchedTree) -> None:
        tree.watch.close()
        self._trees.remove(tree)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _walk_roots(paths: set[str], options: tuple) -> list[str]:
    """The folders to walk for changed paths: a folder that changed (unless the walk leaves it
    out: hidden, or an excluded name), else the folder holding the path; none inside another."""
    include_hidden, exclude_dirs = options
    excluded = set(exclude_dirs if exclude_dirs is not None else DEFAULT_EXCLUDES)
    folders = set()
    for p in paths:
        name = os.path.basename(p)
        skipped = (name.startswith(".") and not include_hidden) or name in excluded
        folders.add(p if os.path.isdir(p) and not skipped else os.path.dirname(p))
    return sorted(f for f in folders if not any(f != other and _within(f, other) for other in folders))


def index_state(folder) -> tuple:
    """(size, mtime_ns) of the index's files: any commit by anyone changes it (SQLite's WAL file
    grows, a checkpoint rewrites the database, new vectors grow their file). An empty WAL file
    counts as none: a reader opening the index creates one."""
    out = []
    for name in (INDEX_DB, INDEX_DB + "-wal", VECTORS):
        try:
            st = os.stat(os.path.join(folder, name))
            out.append((st.st_size, st.st_mtime_ns) if st.st_size else None)
        except OSError:
            out.append(None)
    return tuple(out)


def update_watched(trees: FreshTrees, indexer, identity: dict, folder, root: str, *,
                   include_hidden: bool = False, exclude_dirs=None, **update_kw) -> list[str]:
    """run.update_below for `root`, walking only what `trees` does not know to be unchanged, and
    watching what it walks: the folders walked ([root], some below it, or [] for none). Calls
    on one index must not overlap (the caller holds a lock per index)."""
    options = (include_hidden, exclude_dirs)
    if exclude_dirs is not None:  # else inputs.walk.DEFAULT_EXCLUDES
        update_kw["exclude_dirs"] = exclude_dirs
    tree, roots = trees.plan(root, options, index_state(folder))
    if not roots:
        return []
    watch = tree.watch if tree is not None else TreeWatch()
    try:
        update_below(indexer, identity, folder, root, roots=roots, before_listing=watch.add,
                     followed_link=watch.add_link,
                     include_hidden=include_hidden, **update_kw)
    except BaseException:
        if tree is None:
            watch.close()
        raise
    if tree is None:
        trees.keep(root, options, watch, index_state(folder))
    else:
        tree.walked(root, index_state(folder))
    return roots
