"""Converting a pickled pytorch_model.bin (the hub's BAAI/AltCLIP ships only that) to safetensors
in altclip's own cache, once: `altclip_home()/converted/<org>--<name>/<commit>/model.safetensors`.
The pickle is read memory-mapped with torch's weights-only unpickler (nn/checkpoint.py), so a
file holding code is refused; the snapshot folder is shared with other tools, so nothing is
written there."""
from __future__ import annotations

import sys
from pathlib import Path

from ..nn.checkpoint import open_lazily, remove_stale_temporaries, save_safetensors


def convert_to_safetensors(sources: list[Path], target: Path, *, progress: bool = False) -> Path:
    """Convert pytorch_model.bin file(s) to one safetensors file, once.

    A file lock around the conversion lets concurrent processes wait for the first one; the
    file is written under a temporary name and moved into place, so a reader never sees half
    a file. Returns `target`.
    """
    if target.is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.is_file():  # another process converted it while we waited
            return target
        remove_stale_temporaries(target)
        if progress and sys.stderr.isatty():
            print(f"Converting {sources[0].name} to safetensors (once): {target}", file=sys.stderr)
        # Memory-mapped and copied a piece at a time, each piece's pages given back after: the
        # pickle never becomes resident whole.
        save_safetensors(open_lazily(sources, normalise=False), target)
    return target
