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

One run at a time per DIR (a lock on the folder): a move waits for the run before it, a restore
refuses to start while another runs; so two runs never copy one photo twice.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..errors import AltclipError
from .noreplace import file_id, lstat_or_none, numbered_names, same_inode, unlink_quietly
from .sortjournal import Journal, flock, is_file, read_journal, records, recover, write_record

MOVED_FOLDER = ".altclip-dupes"  # DIR/.altclip-dupes/: the journals and records of moves into DIR
MOVED, RESTORED = ".moved", ".restored"  # DIR/.altclip-dupes/RUN.moved: what a run moved into DIR;
# RUN.restored: what a restore put back (kept until that restore's work is recorded in the .moved ones)
TMP_PREFIX = ".altclip-dupes-"  # a copy on its way into place across filesystems: hidden, and ours
_MAX_TRIES = 1000  # names taken (or folders removed) by other writers between choosing and taking


class MoveAsideError(AltclipError):
    """DIR cannot take the photos (not a folder, not writable, the very folder they are in) or
    cannot keep its journal, or (for a restore) another run holds it (exit 1); nothing was moved."""


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
    missing: list[tuple[str, str]] = field(default_factory=list)  # (where it was put in DIR, original path):
    # no longer there (moved or removed in DIR since), so not restored; its record is dropped
    recovered: list[str] = field(default_factory=list)


Item = tuple  # (source, relative path) or (source, relative path, (size, mtime_ns) when it was listed)


def move_aside(items: Iterable[Item], dest: str | os.PathLike, msgs=None) -> MoveSummary:
    """Move each source to dest/<relative path>, creating folders, never replacing a file there.

    items: (source path (a relative one is taken from the current folder), its path relative to
    the root it was found under), optionally
    with a third element (size, mtime_ns) as it was listed (the index's): a source that no
    longer matches it has changed since and is skipped. Skipped with a message too: a source that
    is gone (unless an earlier run moved it: `already`), is not a regular file, lies inside dest,
    or whose relative path is absolute or climbs out (".."). Raises MoveAsideError before moving
    anything when dest is not a folder that can be written, or is the folder a source was found
    in (its target would be the source itself). msgs: optional Messages (note/warn) for the
    lines about skipped photos and settled interrupted runs; everything is in the summary too."""
    dest = Path(os.path.abspath(os.fsdecode(os.fspath(dest))))
    plan = [_plan(item, dest) for item in items]
    for source, target, _listed, why in plan:
        if why is None and os.path.realpath(target) == os.path.realpath(source):
            raise MoveAsideError(f"--move-to {dest}: it is the folder the photos are in ({source} would be "
                                 "moved onto itself)", hint="give a folder outside the ones searched for duplicates")
    _make_folder(dest)
    lock = _lock(dest, "--move-to", msgs)
    try:
        return _move_all(plan, dest, msgs)
    finally:
        os.close(lock)


def _move_all(plan: list, dest: Path, msgs) -> MoveSummary:
    summary = MoveSummary()
    summary.recovered = _recover(dest, msgs)
    moved_before = _moved_by_records(dest)
    try:
        journal = Journal(dest, folder=MOVED_FOLDER, tmp_prefix=TMP_PREFIX, keep=MOVED)
    except OSError as exc:
        raise MoveAsideError(f"--move-to {dest}: cannot keep a journal there ({exc.strerror or exc})",
                             hint="give a local folder you can write to") from None
    real_dest = os.path.realpath(dest)
    try:
        for source, target, listed, why in plan:
            if why is None:
                why, where = _move_one(journal, source, target, listed, real_dest, moved_before)
                if why is None:
                    summary.moved.append((source, where))
                    moved_before.setdefault(source, []).append(where)
                    continue
                if where is not None:
                    summary.already.append((source, where))
                    continue
            summary.skipped.append((source, why))
            _say(msgs, "warn", f"{source}: {why}")
    finally:
        journal.close()
    return summary


def _plan(item, dest: Path) -> tuple[str, Path | None, tuple | None, str | None]:
    """(source, target in dest, (size, mtime_ns) as listed or None, why it cannot move or None)."""
    source, rel = os.fsdecode(item[0]), os.fsdecode(item[1])
    listed = tuple(item[2]) if len(item) > 2 and item[2] is not None else None
    if "\x00" in source + rel:
        return source, None, listed, "a path with a NUL character: not moved"
    source = os.path.abspath(source)
    parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if os.path.isabs(rel) or not parts or ".." in parts:
        return source, None, listed, f"its relative path {rel!r} is empty, absolute or climbs out: not moved"
    if parts[0] == MOVED_FOLDER:
        return source, None, listed, f"its relative path {rel!r} would go into {MOVED_FOLDER}/: not moved"
    return source, dest.joinpath(*parts), listed, None


def _make_folder(dest: Path) -> None:
    if os.path.lexists(dest) and not dest.is_dir():
        raise MoveAsideError(f"--move-to {dest}: not a folder", hint="give a folder, or a name for a new one")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoveAsideError(f"--move-to {dest}: cannot create it ({exc.strerror or exc})",
                             hint="give a folder you can write to") from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise MoveAsideError(f"--move-to {dest}: not writable", hint="give a folder you can write to")


def _recover(dest: Path, msgs) -> list[str]:
    """Settle what interrupted moves and restores left in dest; the lines, also said through msgs."""
    try:
        lines = recover(dest, folder=MOVED_FOLDER, tmp_prefix=TMP_PREFIX)
    except OSError as exc:
        raise MoveAsideError(f"{dest}: cannot settle what an interrupted run left there "
                             f"({exc.strerror or exc}: {exc.filename})",
                             hint=f"fix that, then run again (the journal in {dest / MOVED_FOLDER} "
                                  "is kept until it is settled)") from None
    for line in lines:
        _say(msgs, "note", line)
    return lines


def _moved_entries(entries: dict, done: dict):
    """(entry, where its file was put) for each move a record (read_journal's) says was made."""
    for i, e in entries.items():
        d = done.get(i, {})
        if d.get("moved"):
            yield e, d.get("target", e["target"])


def _moved_by_records(dest: Path) -> dict[str, list[str]]:
    """{source: [where the records say it was put, and it still is]}."""
    found: dict[str, list[str]] = {}
    for record in records(dest, MOVED_FOLDER, MOVED):
        _header, entries, done, _tmps = read_journal(record)
        for e, where in _moved_entries(entries, done):
            if is_file(where, e["placed_id"]):
                found.setdefault(e["source"], []).append(where)
    return found


# Why a file is not the photo that was listed (not_as_listed).
GONE = "no longer there"
NOT_REGULAR = "not a regular file"
CHANGED = "changed since it was listed"
GONE_NOT_MOVED = f"{GONE} (moved or removed since it was listed): not moved"


def not_as_listed(st: os.stat_result | None, listed: tuple[int, int] | None) -> str | None:
    """Why a file is not the photo that was listed, or None when it is. st: its lstat (None: there
    is none); listed: its (bytes, mtime_ns) then (None: not compared). GONE, NOT_REGULAR (a
    symlink is not followed) or CHANGED."""
    if st is None:
        return GONE
    if not stat.S_ISREG(st.st_mode):
        return NOT_REGULAR
    if listed is not None and (st.st_size, st.st_mtime_ns) != listed:
        return CHANGED
    return None


def _move_one(journal: Journal, source: str, target: Path, listed, real_dest: str,
              moved_before: dict) -> tuple[str | None, str | None]:
    """Move one photo: (None, where it is now) when moved; ("already moved", where) when an
    earlier run moved it; (why not, None) when it is skipped."""
    why = not_as_listed(st := lstat_or_none(source), listed)
    if why == GONE:
        for where in moved_before.get(source, ()):
            if os.path.lexists(where):
                return "already moved", where
        return GONE_NOT_MOVED, None
    if why is not None:
        return f"{why}: not moved", None
    folder = os.path.realpath(os.path.dirname(source))
    if os.path.commonpath([folder, real_dest]) == real_dest:
        return f"already inside {real_dest}: not moved", None
    for _ in range(_MAX_TRIES):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create {target.parent} ({exc.strerror or exc}): not moved", None
        for name in numbered_names(target.parent, target.name):
            if not os.path.lexists(name):
                break
            if same_inode(source, name):  # another name of this very file is there (a hard link)
                try:
                    _drop_second_name(journal, source, name, st)
                except OSError as exc:
                    return f"cannot remove it, a second name of {name} ({exc.strerror or exc}): not moved", None
                return None, os.fsdecode(name)
        try:
            journal.move(Path(source), name)
        except FileExistsError:
            continue  # the name was taken since it was chosen: look again
        except FileNotFoundError:
            if lstat_or_none(source) is None:
                return GONE_NOT_MOVED, None
            continue  # its folder in dest was removed meanwhile (a restore emptied it): make it again
        except OSError as exc:
            return f"cannot move it to {name} ({exc.strerror or exc}): not moved", None
        return None, os.fsdecode(name)
    return f"every free name in {target.parent} was taken by another writer: not moved", None


def _drop_second_name(journal: Journal, source: str, name: Path, st: os.stat_result) -> None:
    """source and name are one file: unlink source (journalled first, so that restore knows where
    the photo came from); the file stays at name."""
    where = os.fsdecode(os.path.abspath(name))
    entry = journal.begin(source, where, file_id(st), file_id(st), None)
    try:
        os.unlink(source)
    except FileNotFoundError:
        pass  # another run moving it removed it a moment ago: it is at name all the same
    except OSError:
        journal.done(entry)
        raise
    journal.done(entry, where)


def restore(dest: str | os.PathLike, msgs=None) -> RestoreSummary:
    """Put back every photo that move_aside moved into dest and that is still there, never
    replacing a file now at its original path (the photo stays in dest, with a message naming the
    file in the way; run restore again once it is out of the way). Folders that are gone are
    recreated; empty folders left in dest are removed. Raises MoveAsideError when dest
    is not a folder or another restore is running on it."""
    dest = Path(os.path.abspath(os.fsdecode(os.fspath(dest))))
    if not dest.is_dir():
        raise MoveAsideError(f"--restore {dest}: no such folder", hint="give the folder given to --move-to")
    lock = _lock(dest, "--restore")
    summary = RestoreSummary()
    try:
        summary.recovered = _recover(dest, msgs)
        for half_written in (dest / MOVED_FOLDER).glob(f".*{MOVED}.tmp-*"):  # a record's rewrite cut short
            unlink_quietly(half_written)
        found = records(dest, MOVED_FOLDER, MOVED)
        earlier = records(dest, MOVED_FOLDER, RESTORED)  # of restores killed before they were done
        if not found:
            _say(msgs, "note", f"{dest}: nothing to restore (no record of photos moved there)")
        else:
            _restore_records(dest, found, earlier, summary, msgs)
        for record in earlier:  # the .moved records say it all now
            unlink_quietly(record)
    finally:
        os.close(lock)
    _remove_empty_folders(dest)  # the journal folder too, when no record is left
    return summary


def _restore_records(dest: Path, found: list[Path], earlier: list[Path], summary: RestoreSummary, msgs) -> None:
    """Restore what the records found say was moved, then rewrite each to what stays in dest.
    earlier: the records of restores killed before they were done."""
    put_back = _put_back_by(earlier)
    try:
        journal = Journal(dest, folder=MOVED_FOLDER, tmp_prefix=TMP_PREFIX, keep=RESTORED)
    except OSError as exc:
        raise MoveAsideError(f"--restore {dest}: cannot keep a journal there ({exc.strerror or exc})",
                             hint="make it writable, then run again") from None
    try:
        for record in found:
            header, entries, done, _tmps = read_journal(record)
            left = []  # the entries whose photo stays in dest: the record keeps them
            for e, where in _moved_entries(entries, done):
                where = _in_dest_now(dest, where, e["placed_id"])
                if _restore_one(journal, e, where, put_back, summary, msgs) == "kept":
                    left.append(e)
            write_record(record, header, left, done)
    finally:
        journal.close()
    unlink_quietly(journal.path.with_suffix(RESTORED))  # the .moved records say it all now


def _in_dest_now(dest: Path, where: str, placed) -> str:
    """Where the photo a record says was put at `where` is now: there, or, when dest was renamed
    or moved since (the records name the old folder), the same file (the same inode) at the same
    path below dest as it is now."""
    if is_file(where, placed):
        return where
    parts = Path(where).parts
    for k in range(len(parts) - 1, 0, -1):
        candidate = os.path.join(dest, *parts[k:])
        if is_file(candidate, placed):
            return candidate
    return where


def _put_back_by(found: list[Path]) -> dict[str, list[tuple[str, list]]]:
    """{where a photo was in dest: [(where an earlier restore put it, the file it put there)]}."""
    put_back: dict[str, list[tuple[str, list]]] = {}
    for record in found:
        _header, entries, done = read_journal(record)[:3]
        for e, where in _moved_entries(entries, done):
            put_back.setdefault(e["source"], []).append((where, e["placed_id"]))
    return put_back


def _restore_one(journal: Journal, e: dict, where: str, put_back: dict, summary: RestoreSummary, msgs) -> str:
    """Put one moved photo back: "restored", "kept" (it stays in dest, said why), "missing" (no
    longer in dest, said so) or "done before" (an earlier restore put it back: the same file, or
    the copy it made across filesystems, is at the original path)."""
    source, placed = e["source"], e["placed_id"]
    if not is_file(where, placed):
        if is_file(source, placed) or any(p == source and is_file(source, i) for p, i in put_back.get(where, ())):
            return "done before"
        summary.missing.append((where, source))
        _say(msgs, "warn", f"{where}: no longer there (moved or removed since it was moved there): "
                           f"not restored to {source}")
        return "missing"
    why = None
    if same_inode(source, where):  # a second name of the photo that is back at its place
        try:
            os.unlink(where)
        except OSError as exc:
            why = f"cannot remove it, a second name of {source} ({exc.strerror or exc})"
    elif os.path.lexists(source):
        why = f"{source} is taken by another file now (both are kept)"
    else:
        why = _move_back(journal, where, source)
    if why is None:
        summary.restored.append((where, source))
        return "restored"
    summary.kept.append((where, source, why))
    _say(msgs, "warn", f"{where}: not restored: {why}; it stays in {journal.folder.parent}, "
                       "run --restore again once that is settled")
    return "kept"


def _move_back(journal: Journal, where: str, source: str) -> str | None:
    """Move where back to source (its folder made again if it is gone); None, or why not."""
    for _ in range(_MAX_TRIES):
        try:
            Path(source).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create {os.path.dirname(source)} ({exc.strerror or exc})"
        try:
            journal.move(Path(where), Path(source))
            return None
        except FileExistsError:
            return f"{source} is taken by another file now (both are kept)"
        except FileNotFoundError:
            if lstat_or_none(where) is None:
                return f"{where} went away while it was being restored"
            continue  # its folder was removed meanwhile: make it again
        except OSError as exc:
            return f"cannot move it to {source} ({exc.strerror or exc})"
    return f"{os.path.dirname(source)} keeps disappearing"


def _lock(dest: Path, option: str, msgs=None) -> int:
    """An exclusive lock on dest (the folder itself) for this run: one move or restore at a time
    per folder, so that two runs never copy one photo twice. A move waits for the lock (saying so
    through msgs); a restore raises MoveAsideError instead."""
    try:
        fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise MoveAsideError(f"{option} {dest}: cannot open it ({exc.strerror or exc})") from None
    try:
        if flock(fd):
            return fd
        if option == "--move-to":
            _say(msgs, "note", f"{dest}: another run is moving photos into it or restoring them: waiting for it")
            flock(fd, wait=True)
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    raise MoveAsideError(f"{option} {dest}: another run is moving photos into it or restoring them",
                         hint="wait for it to finish, then run --restore again")


def _remove_empty_folders(dest: Path) -> None:
    """Remove the empty folders below dest (bottom up; the ones the moves made and restoring
    emptied, including those of a restore killed before it could remove them)."""
    for folder, _dirs, _files in os.walk(dest, topdown=False):
        if folder != os.fspath(dest):
            try:
                os.rmdir(folder)
            except OSError:
                pass  # not empty


def _say(msgs, kind: str, line: str) -> None:
    if msgs is not None:
        getattr(msgs, kind)(line)
