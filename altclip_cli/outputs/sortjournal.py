"""The journal of a run that moves photos, the one journalled move, and settling what dead runs
left; shared by the sorter (`classify --sort-into --move`, DIR/.altclip-sort/) and the moving of
duplicates aside (`dupes --move-to`, DIR/.altclip-dupes/, where the journal is also the record
that `dupes --restore` reads).

The journal: DIR/FOLDER/RUN.journal (RUN: 16 random hex digits), one JSON object per line,
  {"pid": 1234, "keep": null}                             the first line, always there
  {"tmp": "/abs/some/folder/.altclip-sort-RUN-1"}         a temporary about to be made (see temporary())
  {"id": 0, "source": "/abs/src.jpg", "target": "/abs/DIR/cat/src.jpg",
   "source_id": [dev, ino], "placed_id": [dev, ino], "tmp": "/abs/DIR/cat/.altclip-sort-RUN-1" | null}
  {"done": 0}                                             finished or undone
  {"done": 0, "moved": true, "target": "/abs/..."}        (kept journals) the file is at target now
An entry is written and fsynced before the step that leaves a photo under two names (placed_id:
the file that step puts at target). A kept journal (keep=".moved", say) also writes one before a
plain rename, so that it names every file it moved; that one is written at once (kill -9 cannot
lose it) and fsynced with the next entry once a second has passed, and at the end (a power cut
may lose the record of the last second's renames, never a photo). A journal that is not kept is
cut back to its first line whenever no entry is open, and removed at the end of the run; a kept
one keeps every line and at the end of the run is renamed RUN.moved (RUN + its keep): the record
of what the run moved. It is held under an exclusive flock for the life of the run. A journal
whose lock can be taken belongs to a dead run: the next run finishes or undoes its open entries,
removes its temporaries and then the journal (a kept one becomes its record). A temporary in
DIR/<folder>/ whose run has no journal is a leftover too; one whose journal is locked belongs to a
live run and is left alone.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import time
from pathlib import Path

from ..durable import fsync_dir, write_atomic
from .noreplace import file_id, lstat_or_none, numbered_names, rename_noreplace, same_content, unlink_quietly

TMP_PREFIX = ".altclip-sort-"  # DIR/<label>/.altclip-sort-RUN-N: a copy on its way into place
JOURNAL_FOLDER = ".altclip-sort"  # DIR/.altclip-sort/RUN.journal
_CREATE_TRIES = 1000  # another run may remove the empty journal folder as this one creates it
_NEW_JOURNAL_GRACE_S = 60  # a journal still being created by a live run is younger
_SYNC_EVERY_S = 1.0  # a kept journal's entries for plain renames are fsynced with the next one after this


def flock(fd: int, *, wait: bool = False) -> bool:
    """Take an exclusive lock on fd; False if another process holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


class Journal:
    """This run's journal under DIR/FOLDER/ (see the module docstring), locked until close; it also
    names the run's temporaries and moves files (move)."""

    def __init__(self, root: Path, *, folder: str = JOURNAL_FOLDER, tmp_prefix: str = TMP_PREFIX,
                 keep: str | None = None):
        self.folder = Path(root) / folder
        self.tmp_prefix, self.keep = tmp_prefix, keep
        self.run = secrets.token_hex(8)  # no "-": a temporary's name is TMP_PREFIX RUN - N
        self.path = self.folder / f"{self.run}.journal"
        self.open_ids: set[int] = set()
        self._next = 0
        self._temporaries: list[str] = []  # the recorded ones
        self._count = 0
        self._synced = time.monotonic()
        for _ in range(_CREATE_TRIES):
            self.folder.mkdir(parents=True, exist_ok=True)
            new = self.folder / f"{self.run}.new"  # locked before it gets the name others look at
            try:
                self.fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue
            try:
                flock(self.fd, wait=True)
                header = (json.dumps({"pid": os.getpid(), "keep": keep}) + "\n").encode()
                self._header_len = os.write(self.fd, header)
                os.rename(new, self.path)
            except FileNotFoundError:
                os.close(self.fd)
                continue
            except BaseException:
                os.close(self.fd)
                unlink_quietly(new)
                raise
            fsync_dir(self.folder)
            return
        raise OSError(errno.ENOENT, "the journal folder keeps disappearing", str(self.folder))

    def temporary(self, folder: Path, *, record: bool = False) -> Path:
        """A fresh name for a temporary copy in folder, owned by this run. record: written in the
        journal first, so that a later run finds it anywhere (unrecorded ones are looked for only
        in DIR/<folder>/)."""
        self._count += 1
        tmp = Path(folder) / f"{self.tmp_prefix}{self.run}-{self._count}"
        if record:
            self._temporaries.append(_abs(tmp))
            self._write({"tmp": _abs(tmp)}, sync=False)  # a later entry's fsync covers it
        return tmp

    def begin(self, source: str, target: str, source_id, placed_id, tmp: str | None, *, sync: bool = True) -> int:
        """Record, durably (unless not sync: see the module docstring), a step about to put
        placed_id under target; returns its id."""
        entry_id, self._next = self._next, self._next + 1
        self._write({"id": entry_id, "source": source, "target": target, "source_id": source_id,
                     "placed_id": placed_id, "tmp": tmp}, sync=sync or time.monotonic() - self._synced > _SYNC_EVERY_S)
        self.open_ids.add(entry_id)
        return entry_id

    def done(self, entry_id: int, moved_to: str | None = None) -> None:
        """The entry is finished (moved_to: where the file is now) or undone (not fsynced: a lost
        one is only checked again). A journal that is not kept is cut back to its first line once
        no entry is open: it stays small however long the run."""
        self.open_ids.discard(entry_id)
        if self.keep or self.open_ids:
            self._write(_done_line(entry_id, moved_to), sync=False)
        else:
            os.ftruncate(self.fd, self._header_len)
            os.lseek(self.fd, self._header_len, os.SEEK_SET)

    def _write(self, record: dict, *, sync: bool) -> None:
        # json writes non-UTF-8 names (surrogate escapes) as \udcXX, and reads them back the same
        os.write(self.fd, (json.dumps(record) + "\n").encode("ascii"))
        if sync:
            self.sync()

    def sync(self) -> None:
        """Put what is written so far on the disk."""
        os.fsync(self.fd)
        self._synced = time.monotonic()

    def close(self) -> None:
        """Remove the journal (a kept one that moved files becomes the run's record), unless an
        entry is still open (an interrupted step: the next run checks it), then drop the lock."""
        if not self.open_ids:
            _remove_temporaries(self.folder.parent, self.run, self.tmp_prefix, self._temporaries)
            if self.keep and self._next:
                os.fsync(self.fd)
                os.rename(self.path, self.path.with_suffix(self.keep))
                fsync_dir(self.folder)
            else:
                os.unlink(self.path)
                _remove_if_empty(self.folder)
        os.close(self.fd)

    # --- the journalled move ----------------------------------------------------------------------

    def copy_to_temporary(self, source: Path, folder: Path, *, record: bool = False) -> Path:
        """A complete, fsynced copy of source (bytes, mode, times) under a temporary name in folder."""
        tmp = self.temporary(folder, record=record)
        try:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                shutil.copystat(source, tmp)
                os.fsync(dst.fileno())
        except BaseException:
            unlink_quietly(tmp)
            raise
        return tmp

    def move(self, source: Path, target: Path) -> None:
        """Move the file source (not a symbolic link) to target, whose folder exists, never
        replacing a file there: FileExistsError when target is taken, other OSErrors when it
        cannot be moved; the source then stays. Within a filesystem a rename with
        RENAME_NOREPLACE (one step) or a hard link and an unlink (journalled first); across
        filesystems a copy, fsynced, put under its name, then the source unlinked (journalled
        before the copy takes its name)."""
        source, target = Path(source), Path(target)
        st = os.lstat(source)
        entry: list[int] = []  # the journal entry, made only if the file will have two names (or kept)
        linked: list[bool] = []

        def journal_it():
            linked.append(True)
            if entry:
                self.sync()  # written for a plain rename, and now the file gets two names
            else:
                entry.append(self.begin(_abs(source), _abs(target), file_id(st), file_id(st), None))

        if self.keep:
            entry.append(self.begin(_abs(source), _abs(target), file_id(st), file_id(st), None, sync=False))
        try:
            rename_noreplace(source, target, before_link=journal_it)
        except OSError as exc:
            if entry:
                self.done(entry[0])  # not moved, or linked and taken back
            if exc.errno != errno.EXDEV:
                raise
            self._move_across(source, target, st)
            return
        if linked:
            fsync_dir(source.parent)
        if entry:
            self.done(entry[0], _abs(target))

    def _move_across(self, source: Path, target: Path, st: os.stat_result) -> None:
        """A move to another filesystem: copy, fsync, take the name, then unlink the source."""
        tmp = self.copy_to_temporary(source, target.parent, record=True)
        try:
            placed = file_id(os.lstat(tmp))
            entry = self.begin(_abs(source), _abs(target), file_id(st), placed, _abs(tmp))
            try:
                rename_noreplace(tmp, target)
            except OSError:
                self.done(entry)
                raise
            fsync_dir(target.parent)
            try:
                _unlink_unchanged(source, st)
            except FileNotFoundError:
                pass  # removed meanwhile (another run moved it): the copy stays, the photo is kept
            except OSError:
                if is_file(target, placed):
                    os.unlink(target)  # the source stays: no second copy left behind
                    fsync_dir(target.parent)
                self.done(entry)
                raise
            fsync_dir(source.parent)
            self.done(entry, _abs(target))
        finally:
            unlink_quietly(tmp)


def _done_line(entry_id: int, moved_to: str | None) -> dict:
    return {"done": entry_id} if moved_to is None else {"done": entry_id, "moved": True, "target": moved_to}


def _abs(path: Path) -> str:
    return os.fsdecode(os.path.abspath(path))


def is_file(path: Path | str, wanted: list[int]) -> bool:
    """path is the file whose file_id is wanted."""
    st = lstat_or_none(path)
    return st is not None and file_id(st) == wanted


def _unlink_unchanged(path: Path, before: os.stat_result) -> None:
    """Unlink path if it is still the file `before` describes, unchanged (size and mtime);
    else OSError (FileNotFoundError when it is gone)."""
    now = os.lstat(path)
    if file_id(now) != file_id(before) or (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise OSError(errno.EBUSY, "it changed while it was being copied", os.fspath(path))
    os.unlink(path)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _temporaries(root: Path, prefix: str, run: str | None = None):
    return Path(root).glob(f"*/{prefix}{run + '-' if run else ''}*")


def _run_of(tmp: Path, prefix: str) -> str:
    return tmp.name[len(prefix):].split("-", 1)[0]


def _remove_temporaries(root: Path, run: str, prefix: str, recorded=()) -> None:
    """The run's temporaries in root/<folder>/ and those it recorded (only names of this run's)."""
    for tmp in [*_temporaries(root, prefix, run), *map(Path, recorded)]:
        if tmp.name.startswith(f"{prefix}{run}-"):
            try:
                tmp.unlink()
            except OSError:
                pass


def read_journal(path: Path | str) -> tuple[dict, dict[int, dict], dict[int, dict], list[str]]:
    """(header, {id: entry}, {id: its done line}, recorded temporaries) of a journal or record."""
    header, entries, done, temporaries = {}, {}, {}, []
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.strip(b"\x00"))  # NULs: a cut-back journal's hole
            except ValueError:
                continue  # a torn last line: its step never began (the entry is fsynced first)
            if "done" in record:
                done[record["done"]] = record
            elif "id" in record:
                entries[record["id"]] = record
            elif "tmp" in record:
                temporaries.append(record["tmp"])
            elif "pid" in record:
                header = record
    return header, entries, done, temporaries


def write_record(path: Path, header: dict, entries: list[dict], done: dict[int, dict]) -> None:
    """Replace a record (a kept journal of a finished run) with these entries and their done
    lines, in one step; a record left without entries is removed."""
    if not entries:
        unlink_quietly(path)
    else:
        lines = [header, *(x for e in entries for x in (e, done[e["id"]]))]
        write_atomic(path, "".join(json.dumps(x) + "\n" for x in lines).encode("ascii"), mode=0o600)
    fsync_dir(Path(path).parent)


def records(root: Path | str, folder: str, suffix: str) -> list[Path]:
    """The records (journals kept as RUN+suffix once their run was over) in root/folder/."""
    found = Path(root) / folder
    return sorted(found.glob(f"*{suffix}")) if found.is_dir() else []


def recover(root: Path, *, folder: str = JOURNAL_FOLDER, tmp_prefix: str = TMP_PREFIX) -> list[str]:
    """Finish or undo what dead runs left in root: their open journal entries, their temporaries,
    and temporaries without a journal. Live runs' journals and temporaries are left alone.
    Returns one line per entry finished or undone, for the user."""
    root = Path(root)
    journals = root / folder
    lines: list[str] = []
    if journals.is_dir():
        for path in sorted(journals.iterdir()):
            if path.suffix in (".journal", ".new"):
                lines += _recover_journal(root, path, tmp_prefix)
    for tmp in _temporaries(root, tmp_prefix):  # a run makes its journal before its temporaries
        if not (journals / f"{_run_of(tmp, tmp_prefix)}.journal").exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return lines


def _recover_journal(root: Path, path: Path, tmp_prefix: str) -> list[str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return []  # gone since it was listed
    try:
        if not flock(fd):
            return []  # a live run
        st = lstat_or_none(path)
        if st is None or file_id(st) != file_id(os.fstat(fd)):
            return []  # recovered and removed by another run since we opened it
        if path.suffix == ".new":  # a run killed while creating its journal (or creating it now)
            if time.time() - st.st_mtime > _NEW_JOURNAL_GRACE_S:
                os.unlink(path)
            return []
        header, entries, done, recorded = read_journal(path)
        lines, settled = [], []
        for i, e in entries.items():
            if i not in done:
                line, moved_to = _settle(e)
                settled.append(_done_line(i, moved_to))
                if line:
                    lines.append(line)
        _remove_temporaries(root, path.stem, tmp_prefix, recorded)
        keep = header.get("keep")
        if isinstance(keep, str) and keep.startswith(".") and entries:  # the record of what the run moved
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, "".join(json.dumps(x) + "\n" for x in settled).encode("ascii"))
            os.fsync(fd)
            os.rename(path, path.with_suffix(keep))
        else:
            os.unlink(path)
        fsync_dir(path.parent)
        return lines
    finally:
        os.close(fd)


def _settle(e: dict) -> tuple[str | None, str | None]:
    """Finish or undo one journal entry of a dead run: (a line saying what was done, or None;
    where the file is now if it was moved, else None)."""
    source, target, tmp = e["source"], e["target"], e.get("tmp")
    s, t = lstat_or_none(source), lstat_or_none(target)
    placed = t is not None and file_id(t) == e["placed_id"]
    if s is not None and file_id(s) == e["source_id"]:  # the source is where it was
        if placed and same_content(source, target):
            os.unlink(source)
            fsync_dir(os.path.dirname(source))
            return f"finished an interrupted move: {source} -> {target}", target
        if not placed:
            return f"an interrupted move had not begun: {source} stays", None
        return f"undid an interrupted move: {source} stays", None
    if placed:
        return None, target  # moved in one step (a rename), or the source unlinked already
    if tmp is not None and is_file(tmp, e["placed_id"]):
        # The source went away and the copy never got its name: the copy is all there is.
        for name in numbered_names(Path(target).parent, Path(target).name):
            try:
                rename_noreplace(tmp, name)
                return f"finished an interrupted move: {source} -> {name}", os.fsdecode(name)
            except FileExistsError:
                continue
    return None, None
