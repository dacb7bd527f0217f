"""Turning the command line's IMAGES arguments into image sources, and opening one source.

`expand_images` yields one `Source` per image in input order: files as given, the images in a
directory (`recursive` walks it), globs the shell did not expand, http(s) URLs, and `-` for a
newline-separated list of paths on stdin. An argument that yields nothing useful (a missing file, a
glob with no match, a folder with no images) gives a `Source` carrying an `error`, so the caller
reports it in its place and goes on. `open_source` decodes one `Source` (fetching URLs with a
timeout and a size cap) and raises `InputError` naming it: the runtime's `stream_images` calls it
in its decoding threads.

Cheap to import: no numpy, PIL or torch at module level.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from ..errors import InputError
from .names import display
from .urls import DEFAULT_URL_MAX_BYTES, DEFAULT_URL_TIMEOUT, URL_PREFIXES, fetch_url
from .walk import DEFAULT_EXCLUDES, walk_tree
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """One image input. `name` is how the output names it (the path as given or as listed);
    `path` or `url` says where to read it; `error` is set when there is nothing to read. `root`:
    the folder (as given) whose walk found `path` below it (paths.index_path names it by both)."""

    name: str
    path: str | None = None
    url: str | None = None
    error: str | None = None
    root: str | None = None

    def __str__(self) -> str:  # how an error message names it
        return display(self.name)


def read_path_list(stream) -> list[str]:
    """Newline-separated paths from a binary stream (stdin): CRLF handled, blank lines skipped,
    names that are not UTF-8 kept as the filesystem bytes they are."""
    out = []
    for raw in stream:
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if line.strip():
            out.append(os.fsdecode(line))
    return out


def expand_images(args: Iterable[str], *, recursive: bool = False, stdin=None,
                  warn: Callable[[str], None] = lambda msg: None, include_hidden: bool = False,
                  exclude_dirs=DEFAULT_EXCLUDES, skip_dirs=()) -> Iterator[Source]:
    """Each IMAGES argument -> Sources, in order. `stdin` is a binary stream for `-`. A folder is
    walked by walk.walk_tree (its images; its tree with `recursive`) with `include_hidden`,
    `exclude_dirs` and `skip_dirs` (folders not to enter: a --sort-into folder, an index)."""
    walk = {"recursive": recursive, "include_hidden": include_hidden, "exclude_dirs": exclude_dirs,
            "skip_dirs": skip_dirs, "seen": set(), "warn": warn}
    for arg in args:
        if arg == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin stream")
            for line in read_path_list(stdin):
                # Lines are literal paths (no glob expansion: file names may contain [ or *).
                yield from _expand_one(line, walk, globbing=False)
        else:
            yield from _expand_one(arg, walk, globbing=True)


def _expand_one(arg: str, walk: dict, *, globbing: bool) -> Iterator[Source]:
    if arg.lower().startswith(URL_PREFIXES):
        yield Source(arg, url=arg)
        return
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        yield from _expand_dir(arg, path, walk)
        return
    if globbing and not os.path.lexists(path) and _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(path, recursive=walk["recursive"]))
        if not matches:
            yield Source(arg, error="no files match this pattern")
        for match in matches:
            if os.path.isdir(match):
                yield from _expand_dir(match, match, walk)
            else:
                yield Source(match, path=match)
        return
    # A file, or something that will fail to open (missing, broken link, ...): open_image says why.
    yield Source(arg, path=path)


def _expand_dir(name: str, path: str, walk: dict) -> Iterator[Source]:
    """The images in a folder (walk.walk_tree's order and rules), each named by `name` joined with
    its path below the folder; a warning naming the folder when it has none (a folder is not an
    input that failed: there is no record for it)."""
    warn = walk["warn"]
    count = 0
    not_entered = 0
    options = {k: v for k, v in walk.items() if k != "warn"}
    for kind, rel, info in walk_tree(path, **options):
        shown = os.path.join(name, rel) if rel else name
        if kind in ("file", "irregular"):  # irregular: a broken symlink, the opener says why it cannot be read
            count += 1
            yield Source(shown, path=os.path.join(path, rel), root=path)
        elif kind == "unlisted":
            why = ("permission denied (cannot list this folder)" if isinstance(info, PermissionError)
                   else f"cannot list this folder ({info.strerror or info})")
            yield Source(shown, error=why)
            if not rel:
                return
        elif kind == "loop":
            warn(f"{display(shown)}: folder already visited (a symlink loop?), skipped")
        elif kind == "not entered":
            not_entered = info
    if count == 0:
        why = "no images in this folder"
        if not_entered:
            why += f" (it has {not_entered} subfolder{'s' if not_entered > 1 else ''}: use -r to look inside)"
        warn(f"{display(name)}: {why}")


def open_source(src: Source, *, max_pixels: int | None | bool = False,
                url_timeout: float = DEFAULT_URL_TIMEOUT, url_max_bytes: int = DEFAULT_URL_MAX_BYTES,
                draft_min_side: int | None = None, on_bytes: Callable[[bytes], None] | None = None,
                on_header: Callable | None = None):
    """Decode one Source to a PIL image, or raise InputError naming it.
    `max_pixels`: False keeps altclip_cli.images' default cap, None lifts it.
    `draft_min_side`, `on_bytes` (a local file's bytes, read once), `on_header`: see
    altclip_cli.inputs.images.open_image."""
    from .images import open_image

    kw = {"draft_min_side": draft_min_side, "on_header": on_header}
    if max_pixels is not False:
        kw["max_pixels"] = max_pixels
    if src.error is not None:
        raise InputError(f"{display(src.name)}: {src.error}")
    if src.url is not None:
        data = fetch_url(src.url, timeout=url_timeout, max_bytes=url_max_bytes)
        return open_image(data, name=src.name, **kw)
    return open_image(src.path, name=display(src.name), on_bytes=on_bytes, **kw)


def reason(exc: InputError, name: str) -> str:
    """An InputError's message without the input's name in front (the record names it already)."""
    msg = exc.message
    for prefix in (display(name) + ": ", name + ": "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg
