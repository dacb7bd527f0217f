"""Embedding rows for `altclip embed`: one (name, record, embedding) per input, in input order,
in batches, for any runtime.embedder.Embedder (in-process or a server's). `record` is the sidecar
line without "row": {"text": ...} or {"image": ...}, plus "error" for an input that failed (its
embedding is None). Importing it is cheap (no torch)."""
from __future__ import annotations

from typing import Callable, Iterator

from ..inputs.sources import display, open_source, reason

TEXT_CHUNK = 256  # texts per batch handed out (the model batches them further by length)


def text_batches(model, texts: list[str], *, batch_size: int | None = None,
                 normalize: bool = True) -> Iterator[list[tuple]]:
    size = batch_size or TEXT_CHUNK
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        emb = model.encode_texts(chunk, batch_size=batch_size, normalize=normalize)
        yield [(t, {"text": t}, emb[i]) for i, t in enumerate(chunk)]


def image_batches(model, sources: list, *, batch_size: int | None = None, normalize: bool = True,
                  open_kw: dict | None = None, input_timeout: float | None = None,
                  on_error: Callable[[str, str], None] = lambda name, why: None,
                  workers: int | None = None) -> Iterator[list[tuple]]:
    """Batch k is sources [k*size, (k+1)*size), and the model batches exactly so (the runtime's
    `boundary`), whatever fails among them: a run that starts at any multiple of `size` (a
    resumed run, a dataset part) batches its images as one run from the start does, and its rows
    come out bit for bit the same (the batch's shape changes the last bits of a row on the CPU).
    on_error(name, why) is called for each failed input; workers: decoding threads [default:
    inputs.threads' plan for the device]."""
    if not sources:
        return
    size = batch_size or model.default_batch_size("image")
    open_kw = {**(open_kw or {}), "draft_min_side": model.draft_min_side}
    results = model.stream_images(sources, open_fn=lambda s: open_source(s, **open_kw), batch_size=size,
                                  normalize=normalize, input_timeout=input_timeout, boundary=size,
                                  workers=workers)
    yield from rows_in_spans(results, size, on_error)


def rows_in_spans(results, size: int, on_error: Callable[[str, str], None]) -> Iterator[list[tuple]]:
    """ImageResults (in input order) -> lists of (name, record, embedding or None), one list per
    span of `size` inputs; on_error(name, why) for each input that failed."""
    out = []
    for r in results:
        name = display(r.source.name)
        if r.embedding is None:
            why = reason(r.error, r.source.name)
            on_error(name, why)
            out.append((r.source.name, {"image": name, "error": why}, None))
        else:
            out.append((r.source.name, {"image": name}, r.embedding))
        if (r.index + 1) % size == 0:
            yield out
            out = []
    if out:
        yield out
