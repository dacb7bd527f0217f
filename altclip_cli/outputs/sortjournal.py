"""The journal of a sorting run, and settling what dead runs left in a sort folder.

The journal: DIR/.altclip-sort/RUN.journal (RUN: 16 random hex digits), one JSON object per line,
  {"pid": 1234}                                           the first line, always there
  {"id": 0, "source": "/abs/src.jpg", "target": "/abs/DIR/cat/src.jpg",
   "source_id": [dev, ino], "placed_id": [dev, ino], "tmp": "/abs/DIR/cat/.altclip-sort-RUN-1" | null}
  {"done": 0}
An entry is written and fsynced before the step that leaves a photo under two names (placed_id:
the file that step puts at target); whenever no entry is open the file is cut back to its first
line. It is held under an exclusive flock for the life of the run. A journal whose lock can be taken belongs
to a dead run: the next run finishes or undoes its open entries, removes its temporaries
(DIR/<label>/.altclip-sort-RUN-N) and then the journal. A temporary whose run has no journal
is a leftover too; one whose journal is locked belongs to a live run and is left alone.
"""
from __future__ import annotations

import errno
import json
import os
import secrets
import time
from pathlib import Path

from ..durable import fsync_dir
from .noreplace import file_id, lstat_or_none, numbered_names, rename_noreplace, same_content, unlink_quietly

TMP_PREFIX = ".altclip-sort-"  # DIR/<label>/.altclip-sort-RUN-N: a copy on its way into place
JOURNAL_FOLDER = ".altclip-sort"  # DIR/.altclip-sort/RUN.journal
_CREATE_TRIES = 1000  # another run may remove the empty journal folder as this one creates it
_NEW_JOURNAL_GRACE_S = 60  # a journal still being created by a live run is younger


def _flock(fd: int, *, wait: bool = False) -> bool:
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
    """This run's journal under DIR/.altclip-sort/ (see the module docstring), locked until close;
    it also names the run's temporaries."""

    def __init__(self, root: Path):
        self.folder = root / JOURNAL_FOLDER
        self.run = secrets.token_hex(8)  # no "-": a temporary's name is TMP_PREFIX RUN - N
        self.path = self.folder / f"{self.run}.journal"
        self.open_ids: set[int] = set()
        self._next = 0
        self._temporaries = 0
        for _ in range(_CREATE_TRIES):
            self.folder.mkdir(parents=True, exist_ok=True)
            new = self.folder / f"{self.run}.new"  # locked before it gets the name others look at
            try:
                self.fd = os.open(new, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                continue
            try:
                _flock(self.fd, wait=True)
                header = (json.dumps({"pid": os.getpid()}) + "\n").encode()
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

    def temporary(self, folder: Path) -> Path:
        """A fresh name for a temporary copy in folder, owned by this run."""
        self._temporaries += 1
        return folder / f"{TMP_PREFIX}{self.run}-{self._temporaries}"

    def begin(self, source: str, target: str, source_id, placed_id, tmp: str | None) -> int:
        """Record, durably, a step about to put placed_id under target; returns its id."""
        entry_id, self._next = self._next, self._next + 1
        self._write({"id": entry_id, "source": source, "target": target, "source_id": source_id,
                     "placed_id": placed_id, "tmp": tmp}, sync=True)
        self.open_ids.add(entry_id)
        return entry_id

    def done(self, entry_id: int) -> None:
        """The entry is finished or undone (not fsynced: a lost one is only checked again). With no
        entry open, the journal is cut back to its first line: it stays small however long the run."""
        self.open_ids.discard(entry_id)
        if self.open_ids:
            self._write({"done": entry_id}, sync=False)
        else:
            os.ftruncate(self.fd, self._header_len)
            os.lseek(self.fd, self._header_len, os.SEEK_SET)

    def _write(self, record: dict, *, sync: bool) -> None:
        # json writes non-UTF-8 names (surrogate escapes) as \udcXX, and reads them back the same
        os.write(self.fd, (json.dumps(record) + "\n").encode("ascii"))
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        """Remove the journal, unless an entry is still open (an interrupted step: the next run
        checks it), then drop the lock."""
        if not self.open_ids:
            _remove_temporaries(self.folder.parent, self.run)
            os.unlink(self.path)
            _remove_if_empty(self.folder)
        os.close(self.fd)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _temporaries(root: Path, run: str | None = None):
    return Path(root).glob(f"*/{TMP_PREFIX}{run + '-' if run else ''}*")


def _run_of(tmp: Path) -> str:
    return tmp.name[len(TMP_PREFIX):].split("-", 1)[0]


def _remove_temporaries(root: Path, run: str) -> None:
    for tmp in _temporaries(root, run):
        try:
            tmp.unlink()
        except OSError:
            pass


def recover(root: Path) -> list[str]:
    """Finish or undo what dead runs left in root: their open journal entries, their temporaries,
    and temporaries without a journal. Live runs' journals and temporaries are left alone.
    Returns one line per entry finished or undone, for the user."""
    root = Path(root)
    folder = root / JOURNAL_FOLDER
    lines: list[str] = []
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.suffix in (".journal", ".new"):
                lines += _recover_journal(root, path)
    for tmp in _temporaries(root):  # a run makes its journal before its temporaries
        if not (folder / f"{_run_of(tmp)}.journal").exists():
            try:
                tmp.unlink()
            except OSError:
                pass
    return lines


def _recover_journal(root: Path, path: Path) -> list[str]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return []  # gone since it was listed
    try:
        if not _flock(fd):
            return []  # a live run
        st = lstat_or_none(path)
        if st is None or file_id(st) != file_id(os.fstat(fd)):
            return []  # recovered and removed by another run since we opened it
        if path.suffix == ".new":  # a run killed while creating its journal (or creating it now)
            if time.time() - st.st_mtime > _NEW_JOURNAL_GRACE_S:
                os.unlink(path)
            return []
        with os.fdopen(os.dup(fd), "rb") as f:
            entries, done = {}, set()
            for raw in f:
                try:
                    record = json.loads(raw.strip(b"\x00"))  # NULs: a cut-back journal's hole
                except ValueError:
                    continue  # a torn last line: its step never began (the entry is fsynced first)
                if "done" in record:
                    done.add(record["done"])
                elif "id" in record:
                    entries[record["id"]] = record
        lines = [line for i, e in entries.items() if i not in done if (line := _settle(root, e))]
        _remove_temporaries(root, path.stem)
        os.unlink(path)
        fsync_dir(path.parent)
        return lines
    finally:
        os.close(fd)


def _settle(root: Path, e: dict) -> str | None:
    """Finish or undo one journal entry of a dead run; a line saying what was done, or None."""
    source, target, tmp = e["source"], e["target"], e.get("tmp")
    s, t = lstat_or_none(source), lstat_or_none(target)
    placed = t is not None and file_id(t) == e["placed_id"]
    if s is not None and file_id(s) == e["source_id"]:  # the source is where it was
        if placed and same_content(source, target):
            os.unlink(source)
            fsync_dir(os.path.dirname(source))
            return f"finished an interrupted move: {source} -> {target}"
        return f"undid an interrupted move: {source} stays"
    if not placed and tmp is not None and lstat_or_none(tmp) is not None and file_id(lstat_or_none(tmp)) == e["placed_id"]:
        # The source went away and the copy never got its name: the copy is all there is.
        for name in numbered_names(Path(target).parent, Path(target).name):
            try:
                rename_noreplace(tmp, name)
                return f"finished an interrupted move: {source} -> {name}"
            except FileExistsError:
                continue
    return None
