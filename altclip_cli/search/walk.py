"""Finding the image files below a folder for `altclip index`: os.scandir, one stat per file.

Hidden files and folders (names starting with ".") are skipped unless `include_hidden`, and so
are folders named in `exclude_dirs` (anywhere in the tree). Images are picked by extension
(altclip_cli.inputs.sources.IMAGE_EXTENSIONS, any case); only regular files count (a FIFO named
x.jpg would block the decoder), symlinks to files and folders are followed, and a folder met a
second time (a symlink loop) is not entered again. A folder that cannot be listed is reported,
and the index keeps what it knew below it (see update.py).

Order is deterministic: in each folder its files by name, then its subfolders by name.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable

from ..inputs.sources import IMAGE_EXTENSIONS

DEFAULT_EXCLUDES = (".git", "node_modules", "@eaDir", "System Volume Information", "__pycache__")


@dataclass
class Walk:
    """What a walk of one root found.

    files: (path relative to the root, "/"-separated, size, mtime_ns) per image file, "" for a
        root that is itself a file.
    unlisted: folders (relative to the root) that could not be listed.
    skipped_names: files whose names are not valid UTF-8 (the index cannot store them)."""

    files: list = field(default_factory=list)
    unlisted: list = field(default_factory=list)
    skipped_names: list = field(default_factory=list)


def walk_images(root: str, *, include_hidden: bool = False, exclude_dirs=DEFAULT_EXCLUDES,
                skip_dirs: frozenset = frozenset(), warn: Callable[[str], None] = lambda msg: None,
                before_listing: Callable[[str], None] | None = None) -> Walk:
    """The image files at or below `root` (an absolute path); `skip_dirs`: absolute paths of
    folders not to enter (the index's own folder); before_listing(folder) is called before each
    folder is listed (watch.TreeWatch.add)."""
    out = Walk()
    try:
        st = os.stat(root)
    except OSError as exc:
        warn(f"{root}: cannot read it ({exc.strerror or exc}); what the index holds below it is kept")
        out.unlisted.append("")
        return out
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode):
            out.files.append(("", st.st_size, st.st_mtime_ns))
        return out
    excluded = frozenset(exclude_dirs)
    seen = {(st.st_dev, st.st_ino)}
    stack = [("", root)]  # (relative prefix, absolute path), depth first
    files = out.files
    extensions = IMAGE_EXTENSIONS
    splitext = os.path.splitext
    while stack:
        prefix, folder = stack.pop()
        if before_listing is not None:
            before_listing(folder)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            warn(f"{folder}: cannot list this folder ({exc.strerror or exc}); what the index holds below it is kept")
            out.unlisted.append(prefix.rstrip("/"))
            continue
        subdirs = []
        for entry in entries:
            name = entry.name
            if not include_hidden and name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for a broken one
            except OSError:
                continue
            if is_dir:
                if name not in excluded:
                    subdirs.append(entry)
                continue
            if splitext(name)[1].lower() not in extensions:
                continue
            try:
                fst = entry.stat()  # follows symlinks
            except OSError:  # a broken symlink, or gone since the listing
                continue
            if not stat.S_ISREG(fst.st_mode):
                continue
            rel = prefix + name
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                out.skipped_names.append(os.path.join(folder, name))
                continue
            files.append((rel, fst.st_size, fst.st_mtime_ns))
        for entry in reversed(subdirs):  # popped in name order
            path = entry.path
            if path in skip_dirs:
                continue
            try:
                dst = entry.stat()
            except OSError:
                continue
            key = (dst.st_dev, dst.st_ino)
            if key in seen:
                warn(f"{path}: folder already visited (a symlink loop?), skipped")
                continue
            seen.add(key)
            stack.append((prefix + entry.name + "/", path))
    return out
