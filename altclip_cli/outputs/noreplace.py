"""Putting a file under a name without ever replacing another file, and telling files apart.

`rename_noreplace` is the one primitive the sorter takes names with: a name created by anyone a
moment before is never replaced (FileExistsError instead), where os.rename would replace it.
"""
from __future__ import annotations

import ctypes
import errno
import filecmp
import os
import sys
from pathlib import Path

from ..durable import fsync_dir

MAX_NAME_BYTES = 255


def _load_renameat2():
    """libc's renameat2 (Linux, glibc 2.28+), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}


def rename_noreplace(src: Path | str, dst: Path | str, *, before_link=None) -> None:
    """Rename src to dst, failing with FileExistsError if dst exists (even one created a moment
    ago): renameat2(RENAME_NOREPLACE) where the system and filesystem have it, else a hard link
    and an unlink (before_link() is called first: the file is about to have two names).
    OSError EXDEV: src and dst are on different filesystems."""
    if not _rename_atomic_noreplace(src, dst):
        if before_link is not None:
            before_link()
        _link_then_unlink(src, dst)


def _rename_atomic_noreplace(src: Path | str, dst: Path | str) -> bool:
    """renameat2(RENAME_NOREPLACE): True when renamed (in one step: the file is never under both
    names or neither), False where the system or the filesystem lacks it; else OSError."""
    if _renameat2 is None:
        return False
    src, dst = os.fspath(src), os.fspath(dst)
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), src, None, dst)


def _link_then_unlink(src: Path | str, dst: Path | str) -> None:
    """A hard link (which never replaces a name), then src unlinked. In between, both names are
    the same file; if the unlink fails, dst is unlinked again and the file stays at src."""
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED or exc.errno == errno.EPERM:
            raise OSError(exc.errno, "this filesystem can neither rename without replacing nor hard-link",
                          os.fspath(src), None, os.fspath(dst)) from None
        raise
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
    if not same_inode(src, dst):
        return  # src was removed (another run moved it) or replaced meanwhile: dst holds the file
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass
    except OSError:
        if same_inode(src, dst):  # only while src still holds the file is dst a second name
            os.unlink(dst)
        raise


def file_id(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino]


def lstat_or_none(path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def same_inode(a, b) -> bool:
    """a and b (not following symbolic links) are one file."""
    sa, sb = lstat_or_none(a), lstat_or_none(b)
    return sa is not None and sb is not None and file_id(sa) == file_id(sb)


def same_file(a, b) -> bool:
    """a and b, following symbolic links, are one file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def same_content(a, b) -> bool:
    try:
        return same_file(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def numbered_names(folder: Path, name: str):
    """name, then name-1, name-2, ... (the suffix before the extension; the stem shortened where
    the name would pass 255 bytes)."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    yield folder / name
    i = 1
    while True:
        tail = f"-{i}{dot}{ext}"
        short = stem
        while short and len(os.fsencode(short + tail)) > MAX_NAME_BYTES:
            short = short[:-1]
        yield folder / f"{short}{tail}"
        i += 1


def unlink_quietly(path) -> None:
    """Unlink path if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
