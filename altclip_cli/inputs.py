"""Turning the command line's IMAGES arguments and text files into inputs.

`expand_images` yields one `Source` per image in input order: files as given, the images in a
directory (`recursive` walks it), globs the shell did not expand, http(s) URLs, and `-` for a
newline-separated list of paths on stdin. An argument that yields nothing useful (a missing file, a
glob with no match, a folder with no images) gives a `Source` carrying an `error`, so the caller
reports it in its place and goes on. `open_source` decodes one `Source` (fetching URLs with a
timeout and a size cap) and raises `InputError` naming it: the runtime's `stream_images` calls it
in its decoding threads. `read_text_lines` reads `--text`.

Cheap to import: no numpy, PIL or torch at module level.
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from .errors import InputError

# What a directory walk picks up (case-insensitive). Files named on the command line are always tried.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".tga .ico .jp2 .j2k .jpx .qoi .avif .heic .heif".split()
)
URL_PREFIXES = ("http://", "https://")
DEFAULT_URL_TIMEOUT = 30.0  # seconds, for the whole download of one URL
DEFAULT_URL_MAX_BYTES = 64 * 1024 * 1024
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


def display(name: str) -> str:
    """A name safe to print and to put in JSON: undecodable filename bytes become U+FFFD."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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


# --- opening -------------------------------------------------------------------------------------


def fetch_url(url: str, *, timeout: float = DEFAULT_URL_TIMEOUT,
              max_bytes: int = DEFAULT_URL_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, or InputError naming it: `timeout` bounds the whole download,
    `max_bytes` its size; redirect loops, HTTP errors and network failures are refused too."""
    import socket
    import urllib.error
    import urllib.request

    from . import __version__

    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"User-Agent": f"altclip/{__version__}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise InputError(f"{url}: the download is {int(length):,} bytes, over the cap of "
                                 f"{max_bytes:,} bytes")
            chunks, size = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise InputError(f"{url}: timed out after {timeout:g} s")
                chunk = response.read(64 * 1024)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise InputError(f"{url}: the download is over the cap of {max_bytes:,} bytes")
                chunks.append(chunk)
    except InputError:
        raise
    except urllib.error.HTTPError as exc:
        if exc.code in (301, 302, 303, 307, 308):
            raise InputError(f"{url}: too many redirects (a redirect loop?)") from None
        raise InputError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise InputError(f"{url}: timed out after {timeout:g} s") from None
        raise InputError(f"{url}: cannot download ({reason})") from None
    except (socket.timeout, TimeoutError):
        raise InputError(f"{url}: timed out after {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # connection reset, bad URL, http.client errors
        raise InputError(f"{url}: cannot download ({exc})") from None
    return b"".join(chunks)


def open_source(src: Source, *, max_pixels: int | None | bool = False,
                url_timeout: float = DEFAULT_URL_TIMEOUT, url_max_bytes: int = DEFAULT_URL_MAX_BYTES,
                draft_min_side: int | None = None):
    """Decode one Source to a PIL image, or raise InputError naming it.
    `max_pixels`: False keeps altclip_cli.images' default cap, None lifts it.
    `draft_min_side`: see altclip_cli.images.open_image."""
    from .images import open_image

    kw = {"draft_min_side": draft_min_side}
    if max_pixels is not False:
        kw["max_pixels"] = max_pixels
    if src.error is not None:
        raise InputError(f"{display(src.name)}: {src.error}")
    if src.url is not None:
        data = fetch_url(src.url, timeout=url_timeout, max_bytes=url_max_bytes)
        return open_image(data, name=src.name, **kw)
    return open_image(src.path, name=display(src.name), **kw)


def reason(exc: InputError, name: str) -> str:
    """An InputError's message without the input's name in front (the record names it already)."""
    msg = exc.message
    for prefix in (display(name) + ": ", name + ": "):
        if msg.startswith(prefix):
            return msg[len(prefix):]
    return msg


# --- text ----------------------------------------------------------------------------------------


def split_lines(data: bytes, name: str) -> list[str]:
    """Lines of a UTF-8 text file: row i is line i, empty lines included, CRLF or LF endings, a
    final newline ends the last line rather than starting an empty one, a UTF-8 BOM is dropped.
    Bytes that are not UTF-8 raise InputError naming the line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if not data:
        return []
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    lines = []
    for number, raw in enumerate(raw_lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{name} line {number}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                hint="convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8",
            ) from None
    return lines


def read_text_file(path: str, stdin=None) -> tuple[list[str], str]:
    """(lines, display name) of a text file, `-` for the binary `stdin`."""
    if path == "-":
        return split_lines(stdin.read(), "<stdin>"), "<stdin>"
    try:
        with open(os.path.expanduser(path), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise InputError(f"{display(path)}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{display(path)}: is a directory, not a text file") from None
    except PermissionError:
        raise InputError(f"{display(path)}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{display(path)}: cannot read ({exc.strerror or exc})") from None
    return split_lines(data, display(path)), display(path)
