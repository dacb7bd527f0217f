"""Opening a local image file: the one way altclip reads one, whoever reads it (the decoders
here and in a server, the client of a server that cannot see this machine's files, the
gallery's thumbnails, the index's content keys).

    with open_regular(path, name="photos/cat.jpg") as f:   # a binary file object
        ...
    data = read_regular(path, name="photos/cat.jpg", max_bytes=48_000_000, timeout=120.0)

Only regular files are read. Anything else is refused with the standard words, naming the
input: a FIFO (its open waits for a writer that may never come), a device (`/dev/zero` never
ends, and opening some devices does something), a socket, a folder. The path is stat()ed
before it is opened, so none of those is ever opened; the open itself is non-blocking and the
open descriptor is fstat()ed again, so a path swapped for a FIFO in between cannot block
either, and what is read is what was checked. A size cap refuses a file before any byte of it
is read.

A read that never returns (a hung network mount: there even stat() blocks) is bounded by a
deadline: `within` runs the read in a daemon thread and gives up after `timeout` seconds with
`stuck_error`; the decoding pipeline applies the same limit to its workers. Cheap to import:
the standard library only.
"""
from __future__ import annotations

import os
import stat
import threading
from typing import BinaryIO, Callable, TypeVar

from ..errors import InputError

T = TypeVar("T")

DEFAULT_INPUT_TIMEOUT = 120.0  # seconds one input may take to read (and decode, in the pipeline)

# O_NONBLOCK: opening a FIFO does not wait for a writer; O_NOCTTY: a terminal never becomes ours.
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))

INPUT_TIMEOUT_HINT = "raise the input timeout (--input-timeout) if this input is only slow"


def not_regular(name: str, mode: int) -> InputError | None:
    """The InputError for a file of this st_mode that is not a regular one (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return InputError(f"{name}: is a directory, not an image file")
    kind = next((what for test, what in _KINDS if test(mode)), None)
    return InputError(f"{name}: not a regular file" + (f" ({kind})" if kind else ""))


def open_error(name: str, exc: OSError) -> InputError:
    """The InputError for an OSError met while opening or reading `name`."""
    if isinstance(exc, FileNotFoundError):
        return InputError(f"{name}: no such file")
    if isinstance(exc, IsADirectoryError):
        return InputError(f"{name}: is a directory, not an image file")
    if isinstance(exc, PermissionError):
        return InputError(f"{name}: permission denied")
    return InputError(f"{name}: cannot open ({exc.strerror or exc})")


def stuck_error(name: str, timeout: float) -> InputError:
    """The InputError of an input that gave no data within `timeout` seconds."""
    return InputError(f"{name}: no data after {timeout:g} s (a hung network mount?)", hint=INPUT_TIMEOUT_HINT)


def too_large_error(name: str, size: int, max_bytes: int, limit: str = "") -> InputError:
    why = f" ({limit})" if limit else ""
    return InputError(f"{name}: the file is {size:,} bytes, over the limit of {max_bytes:,} bytes{why}")


def check_regular(st: os.stat_result, name: str, *, max_bytes: int | None = None, empty_ok: bool = False,
                  limit: str = "") -> None:
    """Raise the InputError for a stat result that is not a readable image file's: not a
    regular file, empty (unless empty_ok), or over `max_bytes` (`limit` says whose limit)."""
    error = not_regular(name, st.st_mode)
    if error is not None:
        raise error
    if st.st_size == 0 and not empty_ok:
        raise InputError(f"{name}: the file is empty (zero bytes)")
    if max_bytes is not None and st.st_size > max_bytes:
        raise too_large_error(name, st.st_size, max_bytes, limit)


def open_regular(path: str | os.PathLike, *, name: str | None = None, max_bytes: int | None = None,
                 empty_ok: bool = False, limit: str = "") -> BinaryIO:
    """The regular file at `path`, open for reading in binary (a buffered file object that the
    caller closes), or InputError naming it (`name`, else the path) and saying why not. Blocking
    reads from here on (O_NONBLOCK is cleared once the file is known to be regular, where it
    changes nothing anyway); see the module doc for what is refused and how."""
    path = os.fspath(path)
    label = name or os.fsdecode(path)
    try:
        check_regular(os.stat(path), label, max_bytes=max_bytes, empty_ok=empty_ok, limit=limit)
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise open_error(label, exc) from None
    try:
        check_regular(os.fstat(fd), label, max_bytes=max_bytes, empty_ok=empty_ok, limit=limit)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException as exc:
        os.close(fd)
        if isinstance(exc, OSError):
            raise open_error(label, exc) from None
        raise


def read_regular(path: str | os.PathLike, *, name: str | None = None, max_bytes: int | None = None,
                 timeout: float | None = None, limit: str = "") -> bytes:
    """All the bytes of the regular file at `path` (not empty, at most `max_bytes`), read within
    `timeout` seconds (None: no limit), or InputError naming it (`name`, else the path)."""
    label = name or os.fsdecode(os.fspath(path))

    def read() -> bytes:
        with open_regular(path, name=label, max_bytes=max_bytes, limit=limit) as f:
            try:
                # One byte past the cap: a file that grew since fstat is refused, not cut short.
                data = f.read() if max_bytes is None else f.read(max_bytes + 1)
            except OSError as exc:
                raise open_error(label, exc) from None
        if max_bytes is not None and len(data) > max_bytes:
            raise too_large_error(label, len(data), max_bytes, limit)
        if not data:
            raise InputError(f"{label}: the file is empty (zero bytes)")
        return data

    return read() if timeout is None else within(timeout, label, read)


def within(timeout: float, name: str, fn: Callable[[], T]) -> T:
    """fn()'s result (or its exception), or `stuck_error` once it has run `timeout` seconds.
    fn runs in a daemon thread, which cannot be stopped: on a timeout it is left to finish, if
    the read ever returns, and never keeps the interpreter from exiting."""
    done = threading.Event()
    out: list = []

    def run() -> None:
        try:
            out.append((True, fn()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            out.append((False, exc))
        done.set()

    threading.Thread(target=run, name="altclip-read", daemon=True).start()
    if not done.wait(timeout):
        raise stuck_error(name, timeout)
    ok, value = out[0]
    if ok:
        return value
    raise value
