"""Knowing that nothing changed below a folder since it was walked, without walking it again
(Linux inotify, through ctypes; elsewhere `TreeWatch.available()` is False and every search walks).

A long-running process (`altclip serve`) arms a `TreeWatch` on each folder just before the walk
lists it (inputs.walk's `before_listing`), so that a change made after a folder was listed,
or to a file after it was stat'ed, is an event on the watch. `changed()` then says whether any
event came since: any creation, deletion, rename, write or attribute change (mtime) below the
tree. Reading files (the decoder, the content hash) is not an event. `changes()` names what
changed (the path of each entry created, deleted, renamed or written, or of a watched folder
itself), so that a caller can walk those places again instead of the whole tree.

A symlink the walk followed (`add_link`, walk's `followed_link`) may point anywhere: a change to
its target is no event in the watched folders, so `changes()` also stats each such link and
names the ones that no longer resolve to the same file (or folder) with the same size, mtime and
ctime. A symlinked folder's own entries are watched through the link like any folder's.

The watch refuses (`usable` False) what it cannot vouch for, and the caller walks instead:
  - a folder on a file system whose changes may come from elsewhere (NFS, SMB, FUSE mounts: other
    machines' writes are never events here); only local file systems are trusted (LOCAL_FS);
  - a folder the kernel would not watch (the per-user watch limit, fs.inotify.max_user_watches);
  - a queue overflow (it is an event: the tree counts as changed).
Changes that inotify never reports (writes through a shared memory map) are covered by a cap on
how long a clean watch is trusted (the caller's).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
import struct
import sys
import time

IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW = 0x4000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
CHANGES = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
           | IN_DELETE_SELF | IN_MOVE_SELF)

# File systems whose every change is made by this machine's kernel (so an event here).
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs", "zfs", "jfs", "reiserfs",
                      "bcachefs", "nilfs2", "vfat", "exfat", "ntfs3", "hfsplus", "overlay", "ramfs"})

_libc = None


def _lib():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.inotify_init1.argtypes = [ctypes.c_int]
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        _libc = lib
    return _libc


def _mount_types() -> dict[int, str]:
    """{st_dev: file system type} of this process's mounts (/proc/self/mountinfo)."""
    out = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 3:
                    continue
                major, _, minor = fields[2].partition(":")
                fstype = line.split(" - ", 1)[1].split()[0]
                out[os.makedev(int(major), int(minor))] = fstype
    except (OSError, ValueError):
        pass
    return out


def _identity(st: os.stat_result) -> tuple:
    """What a symlink resolved to, as far as a change matters: the file or folder (device, inode)
    and, for a file, its size, mtime and ctime (ctime moves on any write, even one whose mtime is
    set back)."""
    if stat.S_ISDIR(st.st_mode):  # the folder's entries are watched by inotify
        return (st.st_dev, st.st_ino)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class TreeWatch:
    """Watches the folders given to `add` (see the module doc). Close it when done."""

    def __init__(self, max_folders: int = 100_000):
        self.fd = -1
        self.usable = self.available()
        self.why_not = None if self.usable else "inotify is not available here"
        self.folders = 0
        self.max_folders = max_folders
        self._paths: dict[int, str] = {}  # watch descriptor -> the folder as added
        self._links: dict[str, tuple] = {}  # symlink followed -> what it resolved to (_identity)
        self.armed_at = time.monotonic()
        self._types = _mount_types() if self.usable else {}
        if self.usable:
            fd = _lib().inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                self._give_up(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
            else:
                self.fd = fd

    @staticmethod
    def available() -> bool:
        return sys.platform.startswith("linux") and os.path.exists("/proc/self/mountinfo")

    def add(self, folder: str) -> None:
        """Watch one folder's entries (call it before listing the folder)."""
        if not self.usable:
            return
        if self.folders >= self.max_folders:
            return self._give_up(f"more than {self.max_folders:,} folders")
        try:
            dev = os.stat(folder).st_dev
        except OSError as exc:
            return self._give_up(f"{folder}: {exc.strerror or exc}")
        fstype = self._types.get(dev)
        if fstype not in LOCAL_FS:
            return self._give_up(f"{folder} is on a {fstype or 'unknown'} file system, whose changes may come "
                                 "from elsewhere")
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(folder), CHANGES)
        if wd < 0:
            err = ctypes.get_errno()
            hint = " (raise fs.inotify.max_user_watches)" if err == errno.ENOSPC else ""
            return self._give_up(f"cannot watch {folder}: {os.strerror(err)}{hint}")
        self._paths[wd] = folder  # the same folder added again: the same descriptor
        self.folders = len(self._paths)

    def add_link(self, path: str, st: os.stat_result) -> None:
        """Watch a symlink the walk followed (`st`: what it resolved to): a change to its target,
        which may lie anywhere, is no event in the link's folder, so changes() stats it again."""
        if self.usable:
            self._links[path] = _identity(st)

    def _changed_links(self) -> set[str]:
        """The followed symlinks that no longer resolve to what they did: retargeted, their target
        replaced, written, touched or gone. Each is reported once (the walk that follows adds it
        again)."""
        out = set()
        for path, was in list(self._links.items()):
            try:
                now = _identity(os.stat(path))
            except OSError:
                now = None
            if now != was:
                out.add(path)
                del self._links[path]
        return out

    def changes(self) -> set[str] | None:
        """The paths that changed since the last call (or since the folders were added): each
        entry created, deleted, renamed, written or touched in a watched folder, or the watched
        folder itself for a change of its own. An empty set: nothing changed. None: unknown (a
        queue overflow, or the watch not usable): the caller must walk the whole tree. The
        events are consumed."""
        if not self.usable:
            return None
        out: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out | self._changed_links()
            except OSError:
                return None
            at = 0
            while at + EVENT.size <= len(data):
                wd, mask, _cookie, length = EVENT.unpack_from(data, at)
                name = data[at + EVENT.size:at + EVENT.size + length].split(b"\0", 1)[0]
                at += EVENT.size + length
                folder = self._paths.get(wd)
                if mask & IN_Q_OVERFLOW or folder is None:
                    return None
                out.add(os.path.join(folder, os.fsdecode(name)) if name else folder)

    def changed(self) -> bool:
        """Whether anything changed below the watched folders (True when unknown). Consumes
        the events, as changes() does."""
        return self.changes() != set()

    def _give_up(self, why: str) -> None:
        self.usable = False
        self.why_not = why
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()
