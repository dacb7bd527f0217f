"""A search query: parts given as `[W:]TEXT` or `[W:]IMAGE`, and the one vector they make.

`altclip search "2:golden retriever" -a ./pool.jpg -s fruit` has three parts. A part is an
image when it contains a `/`, starts with `~` or is an http(s) URL, and text otherwise; an
optional weight `W:` in front (`2:`, `0.5:`, `.5:`, `2.:`, rclip's syntax) scales it, and
`--subtract` parts count negatively. The query vector is the weighted sum of the parts' L2-normalised
embeddings, normalised again, so that its dot product with an indexed (normalised) vector is a
cosine similarity in [-1, 1].

Parsing is pure (no numpy); `combine` needs numpy; `open_images` and `encode_parts` a loaded model's
machinery (altclip_cli.inputs, runtime.AltCLIP).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import AltclipError
from ..inputs.urls import URL_PREFIXES

# rclip's weight prefix: digits, optionally with a fractional part, then a colon.
WEIGHT = re.compile(r"^(\d+(\.\d+)?|\.\d+|\d+\.):")


class QueryError(AltclipError):
    """A query that cannot be used. `usage` is True for a bad command line (an empty part, parts
    that cancel out) and False when a named query image cannot be read."""

    def __init__(self, message: str, hint: str | None = None, *, usage: bool = False):
        super().__init__(message, hint)
        self.usage = usage


@dataclass(frozen=True)
class QueryPart:
    """One part of a query: `value` is the text, or the image's path or URL, as given (without
    its weight); `weight` is signed (negative for a subtracted part)."""

    value: str
    weight: float
    is_image: bool
    given: str  # as typed on the command line, weight included
    option: str = ""  # where it came from, for messages: "QUERY", "-a", "-s"

    @property
    def is_url(self) -> bool:
        return self.is_image and self.value.lower().startswith(URL_PREFIXES)


def is_image_query(value: str) -> bool:
    """True for an image: contains a `/`, starts with `~`, or is an http(s) URL."""
    return "/" in value or value.startswith("~") or value.lower().startswith(URL_PREFIXES)


def split_weight(given: str) -> tuple[float, str]:
    """("2:sunset") -> (2.0, "sunset"); no prefix -> (1.0, given). Write "1:2:00 pm" for a text
    that starts with digits and a colon."""
    m = WEIGHT.match(given)
    if m is None:
        return 1.0, given
    return float(m.group(1)), given[m.end():]


def parse_part(given: str, sign: int = 1, option: str = "QUERY") -> QueryPart:
    weight, value = split_weight(given)
    if not value.strip():
        what = f"{option} {given!r}" if option != "QUERY" else f"the query {given!r}"
        why = f"{what} has a weight but nothing after it" if value != given else f"{what} is empty"
        raise QueryError(why, hint='give a text ("a dog on a beach") or an image path (./dog.jpg), '
                                   'optionally with a weight in front ("2:sunset")', usage=True)
    return QueryPart(value=value, weight=sign * weight, is_image=is_image_query(value), given=given,
                     option=option)


def parse_query(query: str, add: Iterable[str] = (), subtract: Iterable[str] = ()) -> list[QueryPart]:
    """QUERY, then every --add, then every --subtract, as QueryParts; QueryError(usage=True) for an empty one."""
    parts = [parse_part(query, 1, "QUERY")]
    parts += [parse_part(q, 1, "-a") for q in add]
    parts += [parse_part(q, -1, "-s") for q in subtract]
    return parts


def describe(parts: Sequence[QueryPart]) -> str:
    """The query as one line for titles: `golden retriever + 2:./pool.jpg - fruit`."""
    out = []
    for i, p in enumerate(parts):
        w = abs(p.weight)
        text = p.value if w == 1.0 else f"{w:g}:{p.value}"
        if i == 0:
            out.append(text if p.weight >= 0 else f"- {text}")
        else:
            out.append(f"{'+' if p.weight >= 0 else '-'} {text}")
    return " ".join(out)


# --- the vector ------------------------------------------------------------------------------------


def combine(vectors, weights: Sequence[float]):
    """sum_i weights[i] * vectors[i] / |vectors[i]|, normalised: a (D,) float32 unit vector.
    QueryError(usage=True) when the parts cancel out (the sum is zero)."""
    import numpy as np

    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise QueryError("a query part has a zero embedding", usage=True)
    total = (np.asarray(weights, dtype=np.float64)[:, None] * (v / norms)).sum(axis=0)
    length = np.linalg.norm(total)
    if not np.isfinite(length) or length < 1e-6:
        raise QueryError("the query's parts cancel out (their weighted sum is zero)",
                         hint="change a weight, or leave out a --subtract part", usage=True)
    return (total / length).astype(np.float32)


def open_images(parts: Sequence[QueryPart], open_kw: dict | None = None,
                input_timeout: float | None = None) -> dict[int, object]:
    """{part index: PIL image} for the image parts, opened as `altclip classify` opens its inputs
    (EXIF orientation, pixel cap, URL deadline and size cap, regular files only, each within
    `input_timeout` seconds, None: no limit). A part that cannot be read raises QueryError (not a
    usage error: exit 1) naming it."""
    from ..errors import InputError
    from ..inputs.files import within
    from ..inputs.sources import Source, open_source

    images = {}
    for i, part in enumerate(parts):
        if not part.is_image:
            continue
        if part.is_url:
            src = Source(part.value, url=part.value)
        else:
            src = Source(part.value, path=os.path.expanduser(part.value))
        try:
            if input_timeout is None:
                images[i] = open_source(src, **(open_kw or {}))
            else:
                images[i] = within(input_timeout, str(src), lambda src=src: open_source(src, **(open_kw or {})))
        except InputError as exc:
            raise QueryError(f"query image {exc.message}",
                             hint="a query that contains a / or starts with ~ is an image (a path or an http(s) "
                                  "URL), anything else is text") from exc
    return images


def encode_parts(model, parts: Sequence[QueryPart], images: dict[int, object], *,
                 batch_size: int | None = None):
    """(P, D) float32: row i is part i's normalised embedding (texts in one batch, images in another)."""
    import numpy as np

    out = np.empty((len(parts), model.embed_dim), np.float32)
    texts = [i for i, p in enumerate(parts) if not p.is_image]
    if texts:
        out[texts] = model.encode_texts([parts[i].value for i in texts], batch_size=batch_size)
    pics = [i for i, p in enumerate(parts) if p.is_image]
    if pics:
        out[pics] = model.encode_images([images[i] for i in pics], batch_size=batch_size)
    return out


def query_vector(model, parts: Sequence[QueryPart], images: dict[int, object] | None = None, *,
                 open_kw: dict | None = None, batch_size: int | None = None):
    """The query's (D,) float32 unit vector with a loaded AltCLIP model (see module docstring)."""
    if images is None:
        images = open_images(parts, open_kw)
    return combine(encode_parts(model, parts, images, batch_size=batch_size), [p.weight for p in parts])
