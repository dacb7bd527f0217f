"""An index's write lock: one writer at a time, by `DIR/.write.lock` (filelock), with
`DIR/.writer` naming the holder's pid and command for another writer's refusal."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import IndexBusy, IndexStoreError

WRITE_LOCK = ".write.lock"
WRITER_INFO = ".writer"  # JSON: pid and command of the lock holder, for the "another writer" message


def acquire_write_lock(folder: Path, wait: float, writer: str | None):
    """The held lock of the index in `folder` (a filelock.FileLock; give it to release_write_lock),
    waiting up to `wait` seconds for another writer. IndexBusy names that writer when it does
    not let go. writer: how this holder is named to the others ("altclip index")."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / WRITE_LOCK), timeout=max(0.0, wait))
    try:
        lock.acquire()
    except Timeout:
        who = "another altclip process"
        try:
            info = json.loads((folder / WRITER_INFO).read_text(encoding="utf-8"))
            who = f"another {info.get('command') or 'altclip process'} (pid {int(info['pid'])})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        hint = "wait for it to finish, or pass --wait 600 to wait up to 10 minutes for it"
        raise IndexBusy(f"{who} is updating {folder}", hint=hint) from None
    except OSError as exc:
        raise IndexStoreError(f"cannot lock the index in {folder} ({exc.strerror or exc})") from None
    try:
        (folder / WRITER_INFO).write_text(json.dumps({"pid": os.getpid(), "command": writer}), encoding="utf-8")
    except OSError:
        pass
    return lock


def release_write_lock(folder: Path, lock) -> None:
    try:
        (folder / WRITER_INFO).unlink(missing_ok=True)
    except OSError:
        pass
    lock.release()
