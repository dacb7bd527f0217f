"""`classify --sort-into DIR`: put each image into DIR/<label>/ as a symbolic link, a copy or by a
move, never overwriting a file and never losing one.

Every placement is idempotent: an image already at its place (a link to it, an identical copy, or,
for a move, the same content at the target while the source still exists: a move interrupted
between its copy and its unlink) is recognised, so a second identical run changes nothing and a
re-run finishes a half-done move. A move is os.rename within a filesystem (atomic); across
filesystems the file is copied to a temporary name in the target folder, fsynced, renamed into
place, and only then is the source unlinked.
"""
from __future__ import annotations

import errno
import filecmp
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import AltclipError
from ..durable import fsync_dir

MODES = ("link", "copy", "move")
UNSURE_FOLDER = "_unsure"
TMP_PREFIX = ".altclip-sort-"  # a copy on its way into place (cross-filesystem move, copy)
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
MAX_NAME_BYTES = 255


class SortError(AltclipError):
    """A target folder that cannot be created or written (exit 1)."""


@dataclass
class Placement:
    source: Path
    target: Path  # where the image is (or would be) placed
    action: str  # "link", "copy", "move", or "already there"


def folder_name(label: str | None) -> str:
    """A label made safe as one folder name (no separators or control characters, not . or ..,
    at most 255 bytes); None (unsure) is _unsure, and a label that would read as _unsure is not."""
    if label is None:
        return UNSURE_FOLDER
    name = _UNSAFE.sub("_", label).strip().rstrip(".")
    if name in ("", ".", ".."):
        name = "_"
    if name == UNSURE_FOLDER:
        name = "_unsure_"
    while len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = name[:-1]
    return name


def check_root(root: Path, *, create: bool = True) -> None:
    """Create root (unless not create: a dry run) and check it is a writable folder, or raise SortError."""
    root = Path(root)
    if not create:  # the nearest existing folder must be writable
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise SortError(f"--sort-into {root}: cannot create it ({probe} is not a folder)",
                            hint="give a folder you can write to")
        root = probe if probe != root else root
    else:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SortError(f"--sort-into {root}: cannot create it ({exc.strerror or exc})",
                            hint="give a folder you can write to") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise SortError(f"--sort-into {root}: not writable", hint="give a folder you can write to")


def place(source: Path | str, folder: Path | str, mode: str = "link", *, dry_run: bool = False) -> Placement:
    """Put source into folder (created if needed) by mode; see the module docstring."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    source, folder = Path(source), Path(folder)
    found = _existing(source, folder, mode)
    if found is not None:
        if mode == "move" and not dry_run and _exists(source) and os.path.abspath(source) != os.path.abspath(found):
            os.unlink(source)  # a move cut short after its link or copy: the photo is at the target
        return Placement(source, found, "already there")
    target = _free_name(folder, source.name)
    if dry_run:
        return Placement(source, target, mode)
    folder.mkdir(parents=True, exist_ok=True)
    if mode == "link":
        os.symlink(os.path.abspath(source), target)
    elif mode == "copy":
        _copy_into_place(source, target)
    else:
        _move(source, target)
    return Placement(source, target, mode)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _candidates(folder: Path, name: str):
    """name, then name-1, name-2, ... (the suffix before the extension) while they exist."""
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    i = 0
    while True:
        yield folder / (name if i == 0 else f"{stem}-{i}{dot}{ext}")
        i += 1


def _existing(source: Path, folder: Path, mode: str) -> Path | None:
    """The entry in folder that already is source's placement, or None."""
    if not folder.is_dir():
        return None
    if mode == "move" and _exists(source) and _same_file(source.parent, folder):
        return source  # already in its folder (a re-run over DIR itself)
    for candidate in _candidates(folder, source.name):
        if not _exists(candidate):
            return None
        if mode == "link":
            if candidate.is_symlink() and os.readlink(candidate) == os.path.abspath(source):
                return candidate
        elif mode == "move" and _exists(source) and _half_moved(source, candidate):
            return candidate
        elif mode == "copy" and not candidate.is_symlink() and candidate.is_file() and _exists(source) \
                and _same_content(source, candidate):
            return candidate
    return None


def _half_moved(source: Path, candidate: Path) -> bool:
    """candidate is source's own move cut short: the same file (a hard link made before the
    source's unlink), or a complete copy with the source's content and modification time (a
    copy across filesystems). An equal photo from elsewhere, with its own mtime, is not: it
    gets a name of its own and the source stays."""
    if _same_file(source, candidate):
        return True
    if candidate.is_symlink() or not candidate.is_file():
        return False
    try:
        same_time = os.stat(source).st_mtime_ns == os.stat(candidate).st_mtime_ns
    except OSError:
        return False
    return same_time and _same_content(source, candidate)


def _same_content(a: Path, b: Path) -> bool:
    try:
        return _same_file(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _free_name(folder: Path, name: str) -> Path:
    for candidate in _candidates(folder, name):
        if not _exists(candidate):
            return candidate
    raise AssertionError("unreachable")


def _move(source: Path, target: Path) -> None:
    if _exists(target):  # never overwrite (a name taken since _free_name)
        raise FileExistsError(errno.EEXIST, "exists", str(target))
    try:
        os.rename(source, target)  # atomic within a filesystem: the photo is in exactly one place
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_into_place(source, target)
        os.unlink(source)  # only once the copy is durable at its place


def _copy_into_place(source: Path, target: Path) -> None:
    """Copy to a temporary name in target's folder, fsync, then link or rename into place:
    the target name only ever holds a complete copy, and an existing file is never replaced."""
    folder = target.parent
    tmp = folder / f"{TMP_PREFIX}{os.getpid()}-{target.name}"
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, tmp)
        try:
            os.link(tmp, target)  # fails if target exists: never an overwrite
            os.unlink(tmp)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                raise
            if _exists(target):  # a filesystem without hard links
                raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
            os.rename(tmp, target)
        fsync_dir(folder)
    finally:
        if _exists(tmp):
            os.unlink(tmp)




def clean_temporaries(root: Path) -> int:
    """Remove the temporary copies an interrupted run left in root's label folders (their sources
    are untouched: a source is unlinked only after its copy is in place). Returns how many."""
    removed = 0
    for tmp in Path(root).glob(f"*/{TMP_PREFIX}*"):
        try:
            tmp.unlink()
            removed += 1
        except OSError:
            pass
    return removed
