"""Where altclip keeps its own files; every location has an environment override.

The Hugging Face cache (HF_HOME, HF_HUB_CACHE) belongs to huggingface_hub and is shared
with other tools; altclip only reads it through that library. What altclip writes itself
(checkpoints converted to safetensors) lives under `altclip_home()`.
"""
from __future__ import annotations

import os
from pathlib import Path


def altclip_home() -> Path:
    """$ALTCLIP_HOME, else $XDG_CACHE_HOME/altclip, else ~/.cache/altclip (read on every call)."""
    home = os.environ.get("ALTCLIP_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "altclip"


LAST_USED = ".last-used"  # a cache entry's marker: its mtime is the entry's last use


def mark_used(path: Path) -> None:
    """Record the last use of the cache entry holding the file `path` (what `altclip cache`
    shows and `--older-than` goes by): the LAST_USED marker beside it."""
    try:
        (path.parent / LAST_USED).touch()
    except OSError:
        pass


def converted_dir() -> Path:
    """Safetensors files converted from pytorch_model.bin: converted/<org>--<name>/<commit>/."""
    return altclip_home() / "converted"


def indexes_dir() -> Path:
    """The search indexes of `--index auto`, one folder per model (search/store.py)."""
    return altclip_home() / "indexes"


def default_index_folder(weights_id: str) -> Path:
    """Where `--index auto` keeps a model's search index: indexes/<weights id>/."""
    return indexes_dir() / weights_id


# --- how the index names an image file -------------------------------------------------------------
# One rule for storing, looking up and reporting: a walk's root (a path named on the command line
# or in a request) is made absolute with its symlinks resolved, a file keeping its own name; below
# the root the path is the one walked (symlinked folders and files are followed, not resolved), so
# that a search below the root finds what the walk found there.


def real_root(path) -> str:
    """A walk's root as the index names it: absolute and real; a file (or a symlink to one, or a
    missing path) in its real folder under its own name."""
    absolute = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(absolute):
        return os.path.realpath(absolute)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def index_path(path, root=None) -> str:
    """The absolute path under which the index holds the image file `path`: found by a walk of the
    folder `root` (as given: `path` is root joined with the path below it), the real root joined
    with that; named on its own (root None), real_root(path)."""
    path = os.fspath(path)
    if root is None:
        return real_root(path)
    root = os.fspath(root)
    below = path[len(os.path.join(root, "")):] if path.startswith(os.path.join(root, "")) else None
    if below is None:  # not below root as spelled: named on its own
        return real_root(path)
    return os.path.join(real_root(root), below)


def index_names(path, root=None) -> list[str]:
    """The absolute paths under which an index may hold the file `path`, the rule's first
    (index_path), then its other names that a walk of another root gives: the path made absolute
    as it is, and its real folder with its own name."""
    names = [index_path(path, root), os.path.abspath(os.path.expanduser(os.fspath(path))), real_root(path)]
    return list(dict.fromkeys(names))


# The hint where a blank --index is refused (by the CLI and by the library, for Python and the server).
INDEX_FOLDER_HINT = "give a folder, or auto (the model's own index under ALTCLIP_HOME)"


def blank_folder(option: str, value) -> str | None:
    """Why `value`, given as `option`, names no folder (it is blank: it would be the current
    folder, named nowhere), or None when it is not blank."""
    if value is not None and not str(value).strip():
        return f"{option} {value!r}: an empty name is no folder"
    return None
