"""`classify --sort-into DIR`: put each image into DIR/<label>/ as a symbolic link, a copy or by a
move, never overwriting a file and never losing one.

One `Sorter` per run. Its promises and how they are kept:
- Never overwrite: every name is taken with a primitive that fails on an existing name
  (symlink, rename with RENAME_NOREPLACE, or a hard link and an unlink); a name taken since it was
  chosen makes the image take the next free one (name-1.jpg, ...).
- A second identical run changes nothing: an image already at its place (a link to the same file,
  an equal copy, the same file for a move) is recognised, and files in DIR's folders are never
  taken as new inputs.
- Never lose a photo, even under kill -9: within a filesystem a move is one rename (the photo
  is under exactly one of its names at every instant); where the filesystem cannot rename without
  replacing, it is a hard link and then an unlink; across filesystems it is a copy to a temporary
  name in the target folder, fsynced, put under its name, and only then the source unlinked.
  Before each step that leaves a photo under two names, the run writes (and fsyncs) a journal
  entry: source, target, and the identity (device, inode) of the file that will sit at the
  target. A later run finishes an entry (unlinks its source) only when the source is still the
  journalled file and the target holds the journalled file with the same bytes; otherwise the
  source stays. An equal photo from elsewhere (a `cp -p` copy) is never taken for a half-done
  move: only the same file (the same inode) at the target counts as already moved.

The journal, the journalled move (shared with `dupes --move-to`) and the settling of what dead
runs left: sortjournal.py; the no-replace primitive: noreplace.py.
"""
from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import AltclipError
from ..durable import fsync_dir
from .noreplace import MAX_NAME_BYTES, numbered_names, rename_noreplace, same_content, same_file, same_inode, unlink_quietly
from .sortjournal import JOURNAL_FOLDER, Journal, recover

MODES = ("link", "copy", "move")
UNSURE_FOLDER = "_unsure"
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
_MAX_TRIES = 1000  # names taken by other writers between choosing one and taking it


class SortError(AltclipError):
    """A target folder that cannot be created, written or locked (exit 1)."""


@dataclass
class Placement:
    source: Path
    target: Path  # where the image is (or would be) placed
    action: str  # "link", "copy", "move", "already there", or "already sorted" (a file in DIR/<folder>/)


def folder_name(label: str | None) -> str:
    """A label made safe as one visible folder name (no separators or control characters, not
    . or .., no leading dot, at most 255 bytes); None (unsure) is _unsure, and a label that would
    read as _unsure is not."""
    if label is None:
        return UNSURE_FOLDER
    name = _UNSAFE.sub("_", label).strip().rstrip(".")
    if name.startswith("."):  # hidden folders are skipped by walks, and .altclip-sort is ours
        name = "_" + name[1:]
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


class Sorter:
    """Places images into root/<folder>/ by mode ("link", "copy" or "move"); with dry_run it only
    plans, and its plan names the places a real run would use. Opening a real sorter settles
    what dead runs left (see recover; the lines are in .recovered). Use as a context manager."""

    def __init__(self, root: Path | str, mode: str = "link", *, dry_run: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.root, self.mode, self.dry_run = Path(root), mode, dry_run
        self._real_root = os.path.realpath(self.root)
        self._planned: dict[Path, Path] = {}  # dry run: target -> the source planned there
        self._journal: Journal | None = None
        self.recovered: list[str] = []
        if dry_run:
            return
        try:
            self.recovered = recover(self.root)
        except OSError as exc:
            raise SortError(f"--sort-into {self.root}: cannot settle what an interrupted run left there "
                            f"({exc.strerror or exc}: {exc.filename})",
                            hint=f"fix that, then run again (the journal in {self.root / JOURNAL_FOLDER} "
                                 "is kept until it is settled)") from None
        if mode != "link":  # temporaries need an owner that other runs can see alive
            try:
                self._journal = Journal(self.root)
            except OSError as exc:
                raise SortError(f"--sort-into {self.root}: cannot keep a journal there ({exc.strerror or exc})",
                                hint="give a local folder you can write to") from None

    def __enter__(self) -> "Sorter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def place(self, source: Path | str, folder: str) -> Placement:
        """Put source into root/folder; raises OSError when it cannot (the source is then untouched)."""
        source = Path(source)
        if self._in_a_sorted_folder(source):  # a result of sorting, never a new input
            return Placement(source, source, "already sorted")
        folder_path = self.root / folder
        for _ in range(_MAX_TRIES):
            found = self._existing(source, folder_path)
            if found is not None:
                if self.mode == "move" and not self.dry_run and _entry(source) != _entry(found):
                    unlink_quietly(source)  # another name of the same file (or a link to it) is at the target
                return Placement(source, found, "already there")
            target = self._free_name(folder_path, source.name)
            if self.dry_run:
                self._planned[target] = source
                return Placement(source, target, self.mode)
            folder_path.mkdir(parents=True, exist_ok=True)
            try:
                if self.mode == "link":
                    os.symlink(os.path.abspath(source), target)
                elif self.mode == "copy":
                    self._copy_into_place(source, target)
                else:
                    self._move(source, target)
            except FileExistsError:
                continue  # the name was taken since it was chosen: look again
            return Placement(source, target, self.mode)
        raise OSError(errno.EEXIST, "every free name was taken by another writer", str(folder_path))

    def _in_a_sorted_folder(self, source: Path) -> bool:
        """source lies in a folder below root (DIR/<label>/...); a file directly in root is an
        input like any other (sorting a folder into itself)."""
        parent = _entry(source)[0]
        return parent != self._real_root and os.path.commonpath([parent, self._real_root]) == self._real_root

    def _existing(self, source: Path, folder: Path) -> Path | None:
        """The entry in folder that already is source's placement, or None."""
        for candidate in numbered_names(folder, source.name):
            standin = self._planned.get(candidate)  # dry run: what a real run would have put there
            if standin is None and not os.path.lexists(candidate):
                return None
            if self._is_placement(source, candidate, standin):
                return candidate

    def _is_placement(self, source: Path, candidate: Path, standin: Path | None) -> bool:
        if standin is not None:
            return (same_content if self.mode == "copy" else same_file)(source, standin)
        if self.mode == "copy":
            return not candidate.is_symlink() and candidate.is_file() and same_content(source, candidate)
        if self.mode == "link" or source.is_symlink():
            return candidate.is_symlink() and same_file(candidate, source)
        return same_inode(source, candidate)  # a move: the same file, never an equal copy

    def _free_name(self, folder: Path, name: str) -> Path:
        for candidate in numbered_names(folder, name):
            if candidate not in self._planned and not os.path.lexists(candidate):
                return candidate

    def _copy_into_place(self, source: Path, target: Path) -> None:
        tmp = self._journal.copy_to_temporary(source, target.parent)
        try:
            rename_noreplace(tmp, target)
        finally:
            unlink_quietly(tmp)
        fsync_dir(target.parent)

    def _move(self, source: Path, target: Path) -> None:
        if source.is_symlink():  # the link moves, made absolute so that it still points at the photo
            os.symlink(os.path.realpath(source), target)
            try:
                os.unlink(source)
            except FileNotFoundError:
                pass
            except OSError:
                os.unlink(target)
                raise
            return
        self._journal.move(source, target)


def _entry(path: Path) -> tuple[str, str]:
    """(the real path of path's folder, its name): one folder entry however path is spelled."""
    path = os.path.abspath(path)
    return os.path.realpath(os.path.dirname(path)), os.path.basename(path)
