"""XMP sidecars beside photos: which file is a photo's sidecar, and updating the keywords one
hierarchy root owns in it, safely.

Naming: "full" is photo.jpg.xmp (digiKam's and darktable's default; IMG_1.CR2 and IMG_1.JPG keep
apart), "adobe" is photo.xmp (Adobe's XMP spec; Lightroom, Capture One). A sidecar that exists
under either name is the one updated, except that photo.xmp is not taken for photo.jpg while
another file shares its base name (photo.cr2's sidecar, then). The photo itself is only read
from the folder listing, never opened.

A sidecar is written to a temporary file beside it, made durable and renamed over it (one at a
time with `update`, through durable.write_atomic; a run's many with `Batch`, one file-system sync
for a group), so an interruption at any instant leaves the old packet or the new one. A sidecar that does not
parse is never written (xmp.XmpError); one whose keywords would not change is not touched at
all (same bytes, same mtime).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..durable import fsync_dir, write_atomic
from .xmp import NEW_PACKET, Packet, XmpError

NAMINGS = ("full", "adobe")
MAX_SIDECAR_BYTES = 64_000_000  # a sidecar is kilobytes; darktable's long histories stay far below this


@dataclass(frozen=True)
class Outcome:
    """What updating one sidecar did (or would do, in a dry run)."""

    sidecar: Path
    action: str  # "created", "changed", "unchanged", "removed" (the file, emptied of all), "none" (no file, no keywords)

    @property
    def changed(self) -> bool:
        return self.action in ("created", "changed", "removed")


def sidecar_names(photo: Path) -> tuple[Path, Path]:
    """(photo.jpg.xmp, photo.xmp) for photo.jpg."""
    photo = Path(photo)
    return photo.with_name(photo.name + ".xmp"), photo.with_suffix(".xmp") if photo.suffix else photo.with_name(photo.name + ".xmp")


def sidecar_for(photo: Path, naming: str = "full") -> Path:
    """The sidecar of photo: an existing one under either name (the chosen naming's first), else
    the chosen naming's."""
    full, adobe = sidecar_names(photo)
    chosen, other = (full, adobe) if naming == "full" else (adobe, full)
    if os.path.lexists(chosen):
        return chosen
    if os.path.lexists(other) and (other == full or not _shares_base_name(Path(photo))):
        return other
    return chosen


def _shares_base_name(photo: Path) -> bool:
    """Whether another file in the photo's folder has its base name (IMG_1.CR2 beside IMG_1.JPG)."""
    stem = photo.stem
    try:
        names = os.listdir(photo.parent if str(photo.parent) else ".")
    except OSError:
        return False
    return any(n != photo.name and Path(n).stem == stem and not n.lower().endswith(".xmp") for n in names)


def clean_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary sidecars (".photo.jpg.xmp.tmp-PID", durable.write_atomic's) that a
    killed run left in folder: those whose process is gone. Returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        base, sep, pid = name.rpartition(".tmp-")
        if not (sep and name.startswith(".") and base.lower().endswith(".xmp") and pid.isdigit()):
            continue
        if _running(int(pid)):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(Path(folder) / name)
        except OSError:
            pass
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


class Folders:
    """What a run does once per folder of sidecars: remove the temporaries a killed run left there
    (on the first visit), and fsync the folder after its last change (renames are atomic on their
    own; the folder's fsync makes them survive a power cut), when the run moves to another folder
    or closes, instead of once per sidecar."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run
        self.seen: set[str] = set()
        self.unsynced: str | None = None

    def visit(self, folder: str) -> None:
        if folder not in self.seen and not self.dry_run:
            self.seen.add(folder)
            clean_stale_temporaries(Path(folder))

    def changed(self, folder: str) -> None:
        if self.unsynced is not None and self.unsynced != folder:
            fsync_dir(self.unsynced)
        self.unsynced = folder

    def close(self) -> None:
        if self.unsynced is not None:
            fsync_dir(self.unsynced)
            self.unsynced = None


@dataclass
class _Staged:
    """A sidecar whose new packet waits in its temporary file for the batch's sync."""

    target: Path
    tmp: Path | None  # None: the sidecar is to be removed
    seen: tuple | None  # the sidecar's state when it was read (see _state)
    outcome: Outcome
    again: tuple  # (photo, root, keywords): to start again if the sidecar changes meanwhile


class Batch:
    """A run's sidecar updates, made durable a group at a time: each new packet is written to a
    temporary file beside its sidecar at once; at `flush` one sync of the file system makes them
    all durable (instead of an fsync each, the slow part of tagging a library), then each is
    renamed over its sidecar and each folder fsynced. Killed at any instant, every sidecar is the
    old one or the new one; the temporaries left are removed by the next run (Folders).

    `stage` returns the item's key; `flush` returns {key: Outcome or exception}, for every item
    staged since the last flush, once the sidecars are in place. A photo whose sidecar another
    photo of the run already has (photo.xmp for IMG_1.CR2 and IMG_1.JPG) fails with XmpError."""

    def __init__(self, *, naming: str = "full", dry_run: bool = False):
        self.naming, self.dry_run = naming, dry_run
        self.folders = Folders(dry_run)
        self.owners: dict[str, str] = {}  # sidecar -> the photo it was written for
        self.staged: list[tuple[object, _Staged | Exception | Outcome]] = []

    def stage(self, key, photo: Path, root: str, keywords: list[str]) -> None:
        try:
            self.staged.append((key, self._stage(Path(photo), root, keywords)))
        except (XmpError, OSError) as exc:
            self.staged.append((key, exc))

    def _stage(self, photo: Path, root: str, keywords: list[str]):
        path = sidecar_for(photo, self.naming)
        owner = self.owners.setdefault(os.path.realpath(path), str(photo))
        if owner != str(photo):
            raise XmpError(f"{path} is also {owner}'s sidecar, tagged already in this run; {photo} is not tagged",
                           hint="tag with the default --sidecar-name full, which gives each photo its own")
        target = _target(photo, path)
        self.folders.visit(str(target.parent))
        old, mode, seen = _read(target, path)
        outcome, data = _plan(path, old, root, keywords)
        if data is None or self.dry_run:
            return outcome
        tmp = None
        if data:
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as f:
                if mode is not None:
                    os.fchmod(f.fileno(), mode)
                f.write(data)
        return _Staged(target, tmp, seen, outcome, (photo, root, keywords))

    def __len__(self) -> int:
        return len(self.staged)

    def flush(self) -> dict:
        staged, self.staged = self.staged, []
        pending = [item for _key, item in staged if isinstance(item, _Staged)]
        if pending:
            _sync([item.tmp for item in pending if item.tmp is not None])
        done = {}
        for key, item in staged:
            if isinstance(item, _Staged):
                try:
                    item = self._put(item)
                except (XmpError, OSError) as exc:
                    item = exc
            done[key] = item
        return done

    def _put(self, item: _Staged) -> Outcome:
        if _state(item.target) != item.seen:  # changed since it was read (another program): start again
            if item.tmp is not None:
                os.unlink(item.tmp)
            photo, root, keywords = item.again
            return update(photo, root, keywords, naming=self.naming, folders=self.folders)
        if item.tmp is not None:
            os.replace(item.tmp, item.target)
        else:
            os.unlink(item.target)
        self.folders.changed(str(item.target.parent))
        return item.outcome

    def close(self) -> None:
        """Remove what an unflushed batch staged (an interrupted run), and fsync the last folder."""
        for _key, item in self.staged:
            if isinstance(item, _Staged) and item.tmp is not None:
                try:
                    os.unlink(item.tmp)
                except OSError:
                    pass
        self.staged = []
        self.folders.close()


def _target(photo: Path, path: Path) -> Path:
    """The file to write for sidecar path: the path, or where it links to; never the photo."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path  # a linked sidecar is updated where it lies
    if os.path.realpath(target) == os.path.realpath(photo):
        raise XmpError(f"{path} is the photo itself, not a sidecar", hint="rename the photo")
    return target


def _sync(files: list[Path]) -> None:
    """Make the files' data durable: one syncfs of each file system they are on, or (where the
    C library has no syncfs) an fsync each."""
    syncfs = _syncfs()
    folders = {os.path.dirname(f) or "." for f in files}
    devices: dict[int, str] = {}
    for folder in folders:
        devices.setdefault(os.stat(folder).st_dev, folder)
    if syncfs is not None:
        for folder in devices.values():
            fd = os.open(folder, os.O_RDONLY)
            try:
                if syncfs(fd) == 0:
                    continue
            finally:
                os.close(fd)
            syncfs = None
            break
    if syncfs is None:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _syncfs():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None


def update(photo: Path, root: str, keywords: list[str], *, naming: str = "full", dry_run: bool = False,
           folders: Folders | None = None) -> Outcome:
    """Make `keywords` the ones under `root` in photo's sidecar (an empty list removes them, and
    the sidecar too when altclip made it and nothing else is left). folders: the run's, or None to
    fsync the folder at once. Raises XmpError for a sidecar that does not parse, OSError when it
    cannot be read or written."""
    photo = Path(photo)
    path = sidecar_for(photo, naming)
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path  # a linked sidecar is updated where it lies
    if folders is not None:
        folders.visit(str(target.parent))
    if os.path.realpath(target) == os.path.realpath(photo):
        raise XmpError(f"{path} is the photo itself, not a sidecar", hint="rename the photo")
    for _attempt in range(3):
        old, mode, seen = _read(target, path)
        outcome, data = _plan(path, old, root, keywords)
        if data is None or dry_run:
            break
        if _state(target) != seen:  # changed under us (another program, a second run): start again
            continue
        _put(target, data, mode)
        if folders is None:
            fsync_dir(target.parent)
        else:
            folders.changed(str(target.parent))
        break
    else:
        raise XmpError(f"{path} kept changing while altclip read it (another program writing it?); "
                       "it is left as it is", hint="run again when that program is done")
    return outcome


def _read(target: Path, shown: Path) -> tuple[bytes | None, int | None, tuple | None]:
    """(content or None when there is no sidecar, its permission bits, its state: see _state)."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None, None, None
    if not stat.S_ISREG(st.st_mode):
        raise XmpError(f"{shown} is not a regular file; it is left as it is", hint="move it away, then run again")
    if st.st_size > MAX_SIDECAR_BYTES:
        raise XmpError(f"{shown} is larger than {MAX_SIDECAR_BYTES // 1_000_000} MB, too large for a sidecar; "
                       "it is left as it is", hint="check what wrote it")
    with open(target, "rb") as f:
        data = f.read(MAX_SIDECAR_BYTES + 1)
    return data, stat.S_IMODE(st.st_mode), (st.st_ino, st.st_size, st.st_mtime_ns)


def _state(target: Path) -> tuple | None:
    """What tells a file replaced or rewritten since it was read: (inode, size, mtime), None if absent."""
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _plan(path: Path, old: bytes | None, root: str, keywords: list[str]) -> tuple[Outcome, bytes | None]:
    """(the outcome, the new content: None to leave the file as it is, b"" to remove it)."""
    if old is None and not keywords:
        return Outcome(path, "none"), None
    packet = Packet.parse(old if old is not None else NEW_PACKET, name=str(path))
    if not packet.set_owned(root, keywords):
        return Outcome(path, "unchanged" if old is not None else "none"), None
    if old is not None and packet.is_empty_and_ours():
        return Outcome(path, "removed"), b""
    return Outcome(path, "created" if old is None else "changed"), packet.serialise()


def _put(target: Path, data: bytes, mode: int | None) -> None:
    if data:
        write_atomic(target, data, mode)
    else:
        os.unlink(target)
