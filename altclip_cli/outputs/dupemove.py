"""`altclip dupes --move-to DIR` and `altclip dupes --restore DIR`: moving photos aside into a
folder, under their paths relative to the folder they were found in, and putting them back; no
photo is ever deleted or replaced, and kill -9 at any instant loses none.

move_aside(items, DIR) moves each source to DIR/<relative path>. Every move goes through the
journal in DIR/.altclip-dupes/ (outputs/sortjournal.py, the one the sorter uses, kept here after
the run as the record of what came from where) and the one move primitive (Journal.move: a
rename that never replaces, a hard link and an unlink, or across filesystems a fsynced copy
under a temporary name, then the no-replace rename, then the source unlinked). A run killed at
any instant leaves each photo at its old place or its new one; the next run (or restore) settles
what it left. A file already at DIR/<relative path> (an earlier move, a `cp -p` copy) is never
replaced: the photo takes the next free name (name-1.jpg, ...); only the same file (the same
inode) counts as already moved.

restore(DIR) puts every photo the records in DIR say were moved back where it came from,
recreating its folder if it is gone. Where a file has taken the original's name since, both are
kept: the photo stays in DIR, its record stays, and a message names the file in the way. A second
restore does nothing; a restore killed half-way is finished by running it again.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

from ..errors import AltclipError

MOVED_FOLDER = ".altclip-dupes"  # DIR/.altclip-dupes/: the journals and records of moves into DIR


class MoveAsideError(AltclipError):
    """DIR cannot take the photos (not a folder, not writable, the very folder they are in) or
    cannot keep its journal (exit 1); nothing was moved."""


@dataclass
class MoveSummary:
    """What move_aside did. Paths as given (str; names that are not UTF-8 carry surrogate escapes)."""

    moved: list[tuple[str, str]] = field(default_factory=list)  # (source, where it is now in DIR)
    already: list[tuple[str, str]] = field(default_factory=list)  # (source, where an earlier run put it)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, why it was not moved)
    recovered: list[str] = field(default_factory=list)  # lines about what interrupted runs left, now settled


@dataclass
class RestoreSummary:
    """What restore did."""

    restored: list[tuple[str, str]] = field(default_factory=list)  # (where it was in DIR, its original path)
    kept: list[tuple[str, str, str]] = field(default_factory=list)  # (in DIR, original path, why it stays)
    recovered: list[str] = field(default_factory=list)


Item = tuple  # (source, relative path) or (source, relative path, (size, mtime_ns) when it was listed)


def move_aside(items: Iterable[Item], dest: str | os.PathLike, msgs=None) -> MoveSummary:
    """Move each source to dest/<relative path>, creating folders, never replacing a file there.

    items: (absolute source path, its path relative to the root it was found under), optionally
    with a third element (size, mtime_ns) as it was listed (the index's): a source that no
    longer matches it has changed since and is skipped. Skipped with a message too: a source that
    is gone (unless an earlier run moved it: `already`), is not a regular file, lies inside dest,
    or whose relative path is absolute or climbs out (".."). Raises MoveAsideError before moving
    anything when dest is not a folder that can be written, or is the folder a source was found
    in (its target would be the source itself). msgs: optional Messages (note/warn) for the
    lines about skipped photos and settled interrupted runs; everything is in the summary too."""
    raise NotImplementedError


def restore(dest: str | os.PathLike, msgs=None) -> RestoreSummary:
    """Put back every photo that move_aside moved into dest and that is still there, never
    replacing a file now at its original path (the photo stays in dest, with a message naming the
    file in the way; run restore again once it is out of the way). Folders that are gone are
    recreated; folders in dest that restore empties are removed. Raises MoveAsideError when dest
    is not a folder or another restore is running on it."""
    raise NotImplementedError
