"""`classify --sort-into DIR`: put each image into DIR/<label>/ as a symbolic link, a copy or by a
move, never overwriting a file and never losing one.

One `Sorter` per run. Its promises and how they are kept:
- Never overwrite: every name is taken with a primitive that fails on an existing name
  (symlink, rename with RENAME_NOREPLACE, or a hard link and an unlink); a name taken since it was
  chosen makes the image take the next free one (name-1.jpg, ...).
- A second identical run changes nothing: an image already at its place (a link to the same file,
  an equal copy, the same file for a move) is recognised, and files already inside DIR are never
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

The journal: DIR/.altclip-sort/RUN.journal, one JSON object per line,
  {"id": 0, "source": "/abs/src.jpg", "target": "/abs/DIR/cat/src.jpg",
   "source_id": [dev, ino], "placed_id": [dev, ino], "tmp": "/abs/DIR/cat/.altclip-sort-RUN-0" | null}
  {"done": 0}
held under an exclusive flock for the life of the run. A journal whose lock can be taken belongs
to a dead run: the next run finishes or undoes its open entries, removes its temporaries
(DIR/<label>/.altclip-sort-RUN-N) and then the journal. A temporary whose run has no journal
is a leftover too; one whose journal is locked belongs to a live run and is left alone.
"""
from __future__ import annotations

import ctypes
import errno
import filecmp
import json
import os
import re
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import AltclipError
from ..durable import fsync_dir

MODES = ("link", "copy", "move")
UNSURE_FOLDER = "_unsure"
TMP_PREFIX = ".altclip-sort-"  # DIR/<label>/.altclip-sort-RUN-N: a copy on its way into place
JOURNAL_FOLDER = ".altclip-sort"  # DIR/.altclip-sort/RUN.journal
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')
MAX_NAME_BYTES = 255
_MAX_TRIES = 1000  # names taken by other writers between choosing one and taking it
_NEW_JOURNAL_GRACE_S = 60  # a journal still being created by a live run is younger


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


# --- taking a name without replacing what is there -----------------------------------------------

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
    if not _same_inode(src, dst):
        return  # src was removed (another run moved it) or replaced meanwhile: dst holds the file
    try:
        os.unlink(src)
    except FileNotFoundError:
        pass
    except OSError:
        if _same_inode(src, dst):  # only while src still holds the file is dst a second name
            os.unlink(dst)
        raise


def _file_id(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino]


def _lstat(path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except OSError:
        return None


def _same_inode(a, b) -> bool:
    """a and b (not following symbolic links) are one file."""
    sa, sb = _lstat(a), _lstat(b)
    return sa is not None and sb is not None and _file_id(sa) == _file_id(sb)


def _same_file(a, b) -> bool:
    """a and b, following symbolic links, are one file."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _same_content(a, b) -> bool:
    try:
        return _same_file(a, b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _candidates(folder: Path, name: str):
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


# --- the journal ---------------------------------------------------------------------------------

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
    """This run's journal under DIR/.altclip-sort/ (see the module docstring), locked until close."""

    def __init__(self, root: Path):
        self.folder = root / JOURNAL_FOLDER
        self.run = secrets.token_hex(8)  # no "-": a temporary's name is TMP_PREFIX RUN - N
        self.path = self.folder / f"{self.run}.journal"
        self.open_ids: set[int] = set()
        self._next = 0
        for _ in range(_MAX_TRIES):  # another run may remove the empty folder as we create it
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
                _unlink_quietly(new)
                raise
            fsync_dir(self.folder)
            return
        raise OSError(errno.ENOENT, "the journal folder keeps disappearing", str(self.folder))

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
        st = _lstat(path)
        if st is None or _file_id(st) != _file_id(os.fstat(fd)):
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
    s, t = _lstat(source), _lstat(target)
    placed = t is not None and _file_id(t) == e["placed_id"]
    if s is not None and _file_id(s) == e["source_id"]:  # the source is where it was
        if placed and _same_content(source, target):
            os.unlink(source)
            fsync_dir(os.path.dirname(source))
            return f"finished an interrupted move: {source} -> {target}"
        return f"undid an interrupted move: {source} stays"
    if not placed and tmp is not None and _lstat(tmp) is not None and _file_id(_lstat(tmp)) == e["placed_id"]:
        # The source went away and the copy never got its name: the copy is all there is.
        for name in _candidates(Path(target).parent, Path(target).name):
            try:
                rename_noreplace(tmp, name)
                return f"finished an interrupted move: {source} -> {name}"
            except FileExistsError:
                continue
    return None


# --- the sorter ----------------------------------------------------------------------------------

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
        self._tmp_count = 0
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
                    _unlink_quietly(source)  # another name of the same file (or a link to it) is at the target
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
        for candidate in _candidates(folder, source.name):
            standin = self._planned.get(candidate)  # dry run: what a real run would have put there
            if standin is None and not os.path.lexists(candidate):
                return None
            if self._is_placement(source, candidate, standin):
                return candidate

    def _is_placement(self, source: Path, candidate: Path, standin: Path | None) -> bool:
        if standin is not None:
            return (_same_content if self.mode == "copy" else _same_file)(source, standin)
        if self.mode == "copy":
            return not candidate.is_symlink() and candidate.is_file() and _same_content(source, candidate)
        if self.mode == "link" or source.is_symlink():
            return candidate.is_symlink() and _same_file(candidate, source)
        return _same_inode(source, candidate)  # a move: the same file, never an equal copy

    def _free_name(self, folder: Path, name: str) -> Path:
        for candidate in _candidates(folder, name):
            if candidate not in self._planned and not os.path.lexists(candidate):
                return candidate

    def _temporary(self, folder: Path) -> Path:
        self._tmp_count += 1
        return folder / f"{TMP_PREFIX}{self._journal.run}-{self._tmp_count}"

    def _copy_to_temporary(self, source: Path, folder: Path) -> Path:
        """A complete, fsynced copy of source (bytes, mode, times) under a temporary name in folder."""
        tmp = self._temporary(folder)
        try:
            with open(source, "rb") as src, open(tmp, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                shutil.copystat(source, tmp)
                os.fsync(dst.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    def _copy_into_place(self, source: Path, target: Path) -> None:
        tmp = self._copy_to_temporary(source, target.parent)
        try:
            rename_noreplace(tmp, target)
        finally:
            _unlink_quietly(tmp)
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
        entry: list[int] = []  # the journal entry, made only if the file will have two names

        def journal_it():
            st = os.lstat(source)
            entry.append(self._journal.begin(_abs(source), _abs(target), _file_id(st), _file_id(st), None))

        try:
            rename_noreplace(source, target, before_link=journal_it)
        except OSError as exc:
            if entry:
                self._journal.done(entry[0])  # not linked, or linked and taken back
            if exc.errno != errno.EXDEV:
                raise
            self._move_across(source, target)
            return
        if entry:
            fsync_dir(source.parent)
            self._journal.done(entry[0])

    def _move_across(self, source: Path, target: Path) -> None:
        """A move to another filesystem: copy, fsync, take the name, then unlink the source."""
        st = os.lstat(source)
        tmp = self._copy_to_temporary(source, target.parent)
        try:
            placed = _file_id(os.lstat(tmp))
            entry = self._journal.begin(_abs(source), _abs(target), _file_id(st), placed, _abs(tmp))
            try:
                rename_noreplace(tmp, target)
            except OSError:
                self._journal.done(entry)
                raise
            fsync_dir(target.parent)
            try:
                _unlink_unchanged(source, st)
            except FileNotFoundError:
                pass  # removed meanwhile (another run moved it): the copy stays, the photo is kept
            except OSError:
                if _same_inode_id(target, placed):
                    os.unlink(target)  # the source stays: no second copy left behind
                    fsync_dir(target.parent)
                self._journal.done(entry)
                raise
            fsync_dir(source.parent)
            self._journal.done(entry)
        finally:
            _unlink_quietly(tmp)


def _entry(path: Path) -> tuple[str, str]:
    """(the real path of path's folder, its name): one folder entry however path is spelled."""
    path = os.path.abspath(path)
    return os.path.realpath(os.path.dirname(path)), os.path.basename(path)


def _abs(path: Path) -> str:
    return os.fsdecode(os.path.abspath(path))


def _same_inode_id(path: Path, file_id) -> bool:
    st = _lstat(path)
    return st is not None and _file_id(st) == file_id


def _unlink_unchanged(path: Path, before: os.stat_result) -> None:
    """Unlink path if it is still the file `before` describes, unchanged (size and mtime);
    else OSError (FileNotFoundError when it is gone)."""
    now = os.lstat(path)
    if _file_id(now) != _file_id(before) or (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise OSError(errno.EBUSY, "it changed while it was being copied", os.fspath(path))
    os.unlink(path)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
