"""The manifest that ties `out.npy` to its sidecar `out.jsonl`, and the check any script can run.

Two files cannot be replaced in one atomic step, so the pair is committed in this order:
  1. `out.npy.commit.json` (the journal) is written: the new manifest, with the size and sha256
     of the new array and sidecar, which are complete under their `.part` names;
  2. `out.jsonl.part` -> `out.jsonl`, then `out.npy.part` -> `out.npy`;
  3. the journal -> `out.manifest.json`.
A process killed at any instant therefore leaves either the old pair with its manifest, the new
pair with its manifest, or a journal. While a journal exists the pair may be mixed (a new
sidecar beside an old array); `check_pair` names that state, and `finish_commit` completes it
from the journal (the next `altclip embed ... -o out.npy`, or `altclip check --repair`).
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from pathlib import Path

from ..errors import AltclipError

FORMAT = "altclip-embeddings/1"


def _with_suffix(npy: Path, suffix: str) -> Path:
    """out.npy -> out<suffix>; a name without .npy gets the suffix added."""
    return npy.with_suffix(suffix) if npy.suffix == ".npy" else npy.with_name(npy.name + suffix)


def sidecar_path(npy: Path) -> Path:
    return _with_suffix(Path(npy), ".jsonl")


def manifest_path(npy: Path) -> Path:
    return _with_suffix(Path(npy), ".manifest.json")


def journal_path(npy: Path) -> Path:
    npy = Path(npy)
    return npy.with_name(npy.name + ".commit.json")


def file_record(path: Path) -> dict:
    """{"name", "bytes", "sha256"} of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return {"name": Path(path).name, "bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def read_json(path: Path) -> dict | None:
    """A JSON object from a file, None when the file is absent; AltclipError when unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise AltclipError(f"cannot read {path} ({exc})") from None
    if not isinstance(data, dict):
        raise AltclipError(f"{path} is not an altclip manifest")
    return data


def _matches(path: Path, record: dict) -> bool:
    try:
        if os.path.getsize(path) != record["bytes"]:
            return False
        return file_record(path)["sha256"] == record["sha256"]
    except (OSError, KeyError, TypeError):
        return False


def finish_commit(npy: Path) -> bool:
    """Complete a commit that was interrupted (a journal exists): every file must be the one the
    journal describes, either already in place or still under its .part name. True when a
    commit was completed, False when there was none; AltclipError when it cannot be."""
    npy = Path(npy)
    journal = journal_path(npy)
    manifest = read_json(journal)
    if manifest is None:
        return False
    for final, key in ((sidecar_path(npy), "jsonl"), (npy, "npy")):
        record = manifest.get(key, {})
        if _matches(final, record):
            continue
        part = final.with_name(final.name + ".part")
        if not _matches(part, record):
            raise AltclipError(
                f"{final} is not the file the interrupted write of {npy.name} was committing, and "
                f"{part.name} is not either: the pair cannot be completed",
                hint=f"delete {journal.name} and run the embed command again without --resume")
        os.replace(part, final)
    os.replace(journal, manifest_path(npy))
    return True


def read_npy_header(path: Path) -> tuple[str, tuple[int, ...], int]:
    """(descr, shape, data offset) of a .npy file (versions 1 to 3)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy file")
        if head[6] == 1:
            length, start = int.from_bytes(head[8:10], "little"), 10
        else:
            length, start = int.from_bytes(head[8:12], "little"), 12
        f.seek(start)
        header = ast.literal_eval(f.read(length).decode("latin1"))
    return header["descr"], tuple(header["shape"]), start + length


def check_pair(npy: Path) -> tuple[list[str], dict | None]:
    """(problems, manifest): every reason the array and its sidecar might not belong together,
    in plain words; no problems means they are the pair altclip committed, unchanged."""
    npy = Path(npy)
    sidecar, journal = sidecar_path(npy), journal_path(npy)
    if journal.exists():
        return [f"the write of {npy.name} was interrupted while its files were being replaced "
                f"({journal.name} exists): {npy.name} and {sidecar.name} may come from different runs"], None
    problems = [f"{p} does not exist" for p in (npy, sidecar) if not p.exists()]
    if problems:
        return problems, None
    manifest = read_json(manifest_path(npy))
    if manifest is None or manifest.get("format") != FORMAT:
        problems.append(f"{manifest_path(npy).name} is missing, so nothing proves that {npy.name} and "
                        f"{sidecar.name} belong together (written by another program or an older altclip?)")
    else:
        for path, key in ((npy, "npy"), (sidecar, "jsonl")):
            if not _matches(path, manifest.get(key, {})):
                problems.append(f"{path.name} is not the file its manifest describes (size or sha256 "
                                "differ): it was changed or replaced after altclip wrote it")
    problems += _structure_problems(npy, sidecar)
    return problems, manifest


def _structure_problems(npy: Path, sidecar: Path) -> list[str]:
    """Row numbering of the sidecar against the array's shape."""
    try:
        _descr, shape, offset = read_npy_header(npy)
    except (OSError, ValueError, SyntaxError, KeyError) as exc:
        return [f"{npy.name} is not a readable .npy file ({exc})"]
    if len(shape) != 2:
        return [f"{npy.name} has shape {shape}, not (rows, dimensions)"]
    expected = 0
    try:
        with open(sidecar, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                row = json.loads(line).get("row")
                if row is None:
                    continue
                if row != expected:
                    return [f"{sidecar.name} line {number} has row {row}, expected {expected}"]
                expected += 1
    except (OSError, ValueError, AttributeError) as exc:
        return [f"{sidecar.name} is not readable jsonl ({exc})"]
    if expected != shape[0]:
        return [f"{sidecar.name} numbers {expected} rows, {npy.name} has {shape[0]}"]
    return []
