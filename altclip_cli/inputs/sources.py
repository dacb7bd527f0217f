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

# What a directory walk picks up (case-insensitive). Files named on the command line are always tried.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".tga .ico .jp2 .j2k .jpx .qoi .avif .heic .heif".split()
)
_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Source:
    """One image input. `name` is how the output names it (the path as given or as listed);
    `path` or `url` says where to read it; `error` is set when there is nothing to read."""

    name: str
    path: str | None = None
    url: str | None = None
    error: str | None = None

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
                  warn: Callable[[str], None] = lambda msg: None) -> Iterator[Source]:
    """Each IMAGES argument -> Sources, in order. `stdin` is a binary stream for `-`."""
    seen_dirs: set[tuple[int, int]] = set()
    for arg in args:
        if arg == "-":
            if stdin is None:
                raise ValueError("'-' given but no stdin stream")
            for line in read_path_list(stdin):
                # Lines are literal paths (no glob expansion: file names may contain [ or *).
                yield from _expand_one(line, recursive, seen_dirs, warn, globbing=False)
        else:
            yield from _expand_one(arg, recursive, seen_dirs, warn, globbing=True)


def _expand_one(arg: str, recursive: bool, seen_dirs, warn, *, globbing: bool) -> Iterator[Source]:
    if arg.lower().startswith(URL_PREFIXES):
        yield Source(arg, url=arg)
        return
    path = os.path.expanduser(arg)
    if os.path.isdir(path):
        yield from _expand_dir(arg, path, recursive, seen_dirs, warn)
        return
    if globbing and not os.path.lexists(path) and _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(path, recursive=recursive))
        if not matches:
            yield Source(arg, error="no files match this pattern")
        for match in matches:
            if os.path.isdir(match):
                yield from _expand_dir(match, match, recursive, seen_dirs, warn)
            else:
                yield Source(match, path=match)
        return
    # A file, or something that will fail to open (missing, broken link, ...): open_image says why.
    yield Source(arg, path=path)


def _expand_dir(name: str, path: str, recursive: bool, seen_dirs, warn) -> Iterator[Source]:
    """The images in a folder (sorted by name, files before subfolders); a warning naming the
    folder when it has none (a folder is not an input that failed: there is no record for it)."""
    count = 0
    skipped_subdirs = 0
    for src in _walk(name, path, recursive, seen_dirs, warn):
        if isinstance(src, int):
            skipped_subdirs += src
            continue
        if src.error is None:
            count += 1
        yield src
    if count == 0:
        why = "no images in this folder"
        if skipped_subdirs:
            why += f" (it has {skipped_subdirs} subfolder{'s' if skipped_subdirs > 1 else ''}: use -r to look inside)"
        warn(f"{display(name)}: {why}")


def _walk(name: str, path: str, recursive: bool, seen_dirs, warn):
    """Yields Sources and, without `recursive`, an int: how many subfolders were not entered."""
    try:
        st = os.stat(path)
        seen_dirs.add((st.st_dev, st.st_ino))
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except PermissionError:
        yield Source(name, error="permission denied (cannot list this folder)")
        return
    except OSError as exc:
        yield Source(name, error=f"cannot list this folder ({exc.strerror or exc})")
        return
    subdirs = []
    for entry in entries:
        if entry.name.startswith("."):  # hidden files, and macOS's ._IMG.jpg resource forks
            continue
        try:
            is_dir = entry.is_dir()  # follows symlinks; False for a broken one
        except OSError:
            is_dir = False
        if is_dir:
            subdirs.append(entry)
        elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            yield Source(os.path.join(name, entry.name), path=entry.path)
    if not recursive:
        if subdirs:
            yield len(subdirs)
        return
    for entry in subdirs:
        sub_name = os.path.join(name, entry.name)
        try:
            st = entry.stat()
        except OSError:
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen_dirs:
            warn(f"{display(sub_name)}: folder already visited (a symlink loop?), skipped")
            continue
        yield from _walk(sub_name, entry.path, recursive, seen_dirs, warn)


def open_source(src: Source, *, max_pixels: int | None | bool = False,
                url_timeout: float = DEFAULT_URL_TIMEOUT, url_max_bytes: int = DEFAULT_URL_MAX_BYTES,
                draft_min_side: int | None = None, on_bytes: Callable[[bytes], None] | None = None):
    """Decode one Source to a PIL image, or raise InputError naming it.
    `max_pixels`: False keeps altclip_cli.images' default cap, None lifts it.
    `draft_min_side`, `on_bytes` (a local file's bytes, read once): see altclip_cli.images.open_image."""
    from .images import open_image

    kw = {"draft_min_side": draft_min_side}
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
