"""The one folder walk: the image files at or below a folder, for `classify`/`embed` (a folder's
images, or with -r its tree), `index`, `search` and the server's watch.

The rules, the same for every command:
  - images are picked by extension (IMAGE_EXTENSIONS, any case); only regular files count (a FIFO
    or a device named x.jpg would block its reader); an image name that is a broken symlink is
    reported ("irregular"), so that a command that names its inputs can say why it is missing;
  - hidden files and folders (names starting with ".", macOS's ._IMG.jpg included) are skipped
    unless `include_hidden`, and so are folders named in `exclude_dirs` anywhere in the tree and
    the folders in `skip_dirs` (an index folder, a --sort-into folder: compared by identity, so
    any spelling of the path, or a symlink to it, is the same folder);
  - symlinks to files and folders are followed; a folder met a second time (a symlink loop, or
    two links to one folder) is not entered again ("loop");
  - with `utf8_only` (the index stores UTF-8 paths), a file or folder whose name is not valid
    UTF-8 is reported ("not utf-8") and left out, a folder with everything below it;
  - no recursion: a stack, so any depth is walked; order is deterministic: in each folder its
    files by name, then its subfolders by name, depth first.

`walk_tree` yields what it meets, in that order, as (kind, rel, info) tuples, `rel` being the path
below the root ("/"-separated, "" for the root itself):
  ("file", rel, (size, mtime_ns))      a regular image file
  ("irregular", rel, why)               an image name that is no regular file to read (why: a phrase)
  ("unlisted", rel, OSError)            a folder that could not be listed (the root: one that cannot be read)
  ("loop", rel, None)                   a folder already visited, not entered
  ("not utf-8", rel, None)              a name that is not UTF-8 (utf8_only), not entered or listed
  ("not entered", "", count)            without `recursive`: how many subfolders -r would enter
`walk_images` collects them into a `Walk`.

Callbacks: before_listing(folder) before each folder is listed (a watch armed then sees every
later change); followed_link(path, stat_result) for each symlink followed to an image file or a
folder that is entered, with what it resolved to (a watch of the link's folder does not see a
change to its target).
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator

# What a walk picks up (case-insensitive). Files named on the command line are always tried.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .apng .gif .bmp .dib .tif .tiff .webp .ppm .pgm .pbm .pnm "
    ".tga .ico .jp2 .j2k .jpx .qoi .avif .heic .heif".split()
)
DEFAULT_EXCLUDES = (".git", "node_modules", "@eaDir", "System Volume Information", "__pycache__")


@dataclass
class Walk:
    """What a walk of one root found (see walk_tree for the kinds).

    files: (rel, size, mtime_ns) per image file.
    unlisted: (rel, OSError) per folder that could not be listed.
    irregular: (rel, why) per image name that is no regular file.
    loops: rel per folder not entered again.
    skipped_names: rel per file or folder left out for a name that is not UTF-8."""

    files: list = field(default_factory=list)
    unlisted: list = field(default_factory=list)
    irregular: list = field(default_factory=list)
    loops: list = field(default_factory=list)
    skipped_names: list = field(default_factory=list)


def walk_images(root: str, **options) -> Walk:
    """walk_tree(root, **options), collected."""
    out = Walk()
    files, add = out.files, {"unlisted": out.unlisted.append, "irregular": out.irregular.append,
                             "loop": lambda item: out.loops.append(item[0]),
                             "not utf-8": lambda item: out.skipped_names.append(item[0])}
    for kind, rel, info in walk_tree(root, **options):
        if kind == "file":
            files.append((rel, *info))
        elif kind in add:
            add[kind]((rel, info))
    return out


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def folder_identities(paths) -> frozenset:
    """{(st_dev, st_ino)} of the folders among `paths` that exist (skip_dirs as walk_tree compares them)."""
    out = set()
    for path in paths:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(st.st_mode):
            out.add((st.st_dev, st.st_ino))
    return frozenset(out)


def walk_tree(root: str, *, recursive: bool = True, include_hidden: bool = False, exclude_dirs=DEFAULT_EXCLUDES,
              skip_dirs=(), utf8_only: bool = False, seen: set | None = None,
              before_listing: Callable[[str], None] | None = None,
              followed_link: Callable[[str, os.stat_result], None] | None = None) -> Iterator[tuple]:
    """What the walk meets at or below `root` (a file or a folder), in order: see the module doc.
    skip_dirs: folders not to enter (paths, compared by identity). seen: (st_dev, st_ino) of the
    folders entered, shared between walks that must not enter a folder twice."""
    if utf8_only and not _utf8(root):
        yield ("not utf-8", "", None)
        return
    try:
        st = os.stat(root)
    except OSError as exc:
        yield ("unlisted", "", exc)
        return
    if followed_link is not None and os.path.islink(root):
        followed_link(root, st)
    if not stat.S_ISDIR(st.st_mode):
        if stat.S_ISREG(st.st_mode):
            yield ("file", "", (st.st_size, st.st_mtime_ns))
        else:
            yield ("irregular", "", _kind_of(st.st_mode))
        return
    excluded = frozenset(exclude_dirs)
    skipped = folder_identities(skip_dirs)
    seen = set() if seen is None else seen
    seen.add((st.st_dev, st.st_ino))
    stack = [("", root)]  # (relative prefix, path), depth first
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
            yield ("unlisted", prefix.rstrip("/"), exc)
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
            if utf8_only and not _utf8(name):
                yield ("not utf-8", prefix + name, None)
                continue
            try:
                fst = entry.stat()  # follows symlinks
            except OSError:  # a broken symlink, or gone since the listing
                if entry.is_symlink():
                    yield ("irregular", prefix + name, "no such file (a broken symbolic link)")
                continue
            if not stat.S_ISREG(fst.st_mode):
                continue
            if followed_link is not None and entry.is_symlink():
                followed_link(entry.path, fst)
            yield ("file", prefix + name, (fst.st_size, fst.st_mtime_ns))
        if not recursive:
            count = 0
            for entry in subdirs:
                try:
                    dst = entry.stat()
                except OSError:
                    continue
                count += (dst.st_dev, dst.st_ino) not in skipped
            if count:
                yield ("not entered", "", count)
            return
        entered = []
        for entry in subdirs:
            rel = prefix + entry.name
            if utf8_only and not _utf8(entry.name):
                yield ("not utf-8", rel, None)
                continue
            try:
                dst = entry.stat()
            except OSError:
                continue
            key = (dst.st_dev, dst.st_ino)
            if key in skipped:
                continue
            if key in seen:
                yield ("loop", rel, None)
                continue
            seen.add(key)
            if followed_link is not None and entry.is_symlink():
                followed_link(entry.path, dst)
            entered.append((rel + "/", entry.path))
        stack.extend(reversed(entered))  # popped in name order
