"""Search over one's own images: an index per model (store.py) that `altclip index` keeps up to
date by walking folders (inputs/walk.py, update.py), and the ranking of its vectors against a query.

From Python, `search` is `altclip search`::

    import altclip_cli
    from altclip_cli.search import search

    model = altclip_cli.load()
    for hit in search(model, "a dog on a beach", "~/Pictures", top=5):
        print(hit.rank, hit.score, hit.path)

Cheap to import: the modules here import numpy, PIL and torch inside the functions that need them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class SearchHit:
    rank: int  # 1 for the best
    path: str  # absolute
    score: float  # the cosine between the query and the image, -1 to 1
    taken: str | None = None  # when it was taken, ISO 8601 ("2023-07-14T10:20:30+02:00"), if known
    gps: tuple[float, float] | None = None  # where: (latitude, longitude) in degrees, if known
    camera: str | None = None  # its camera's make and model, if known


def search(model, query: str, folder: str | os.PathLike = ".", *, add: Iterable[str] = (),
           subtract: Iterable[str] = (), top: int = 10, min_score: float | None = None, index: str = "auto",
           update: bool = True, after: str | None = None, before: str | None = None, near: str | None = None,
           within: str | None = None, camera: str | None = None, sort: str = "score") -> list[SearchHit]:
    """The `top` images at or below `folder` that best match `query`, best first, as `altclip
    search` finds them. model: a loaded AltCLIP (altclip_cli.load). query, add, subtract: parts as
    on the command line (a text, or an image path or URL: one with a "/"; "W:" weights). index:
    "auto" (the model's own index under ALTCLIP_HOME) or a folder. update: bring the index up to
    date with the folder first (new and changed images embedded), as `altclip index` does.
    after, before, near, within, camera, sort: the filters and order of the options of the same
    names ("2023-07", "48.85,2.35", "5km", "canon", "date").
    Raises search.query.QueryError (a bad query), search.filters.FilterError (a bad filter),
    IndexStoreError (the index), InputError."""
    from ..errors import InputError
    from .filters import parse_filter
    from .query import parse_query
    from .run import search_below

    where = parse_filter(after=after, before=before, near=near, within=within, camera=camera, sort=sort)
    root = os.path.realpath(os.path.expanduser(os.fspath(folder)))
    if not os.path.isdir(root):
        raise InputError(f"{folder}: not a folder")
    found = search_below(model, parse_query(query, add, subtract), root, index=index, top=top, min_score=min_score,
                         update=update, where=where)
    return [SearchHit(rank, path, score, facts.get("taken"), tuple(facts["gps"]) if "gps" in facts else None,
                      facts.get("camera")) for rank, path, score, facts in found.hits]
