"""A dataset of embeddings in a folder: what `altclip embed ... -o DIR/` writes, any number of
processes (shard tasks, Ray actors) fill together, `altclip merge` joins and `read_dataset` reads.

    DIR/manifest.json          settings, dimension, inputs (count and sha256), part size, each
                               part's inputs sha256; written once, identical for every writer
    DIR/part-00000.npy         (rows, D): the part's inputs [0, P) that did not fail
    DIR/part-00000.jsonl       one line per input of the part, rows numbered within the part
    DIR/part-00000.manifest.json  the pair's manifest (`altclip check DIR/part-00000.npy`)
    DIR/part-00000.done        written last: the part is complete; without it, it is absent

A part is written by EmbeddingOutput (the same .part files, fixed header and journal commit as
`-o out.npy`) in the writer's own staging folder `DIR/.staging-HOST-PID/`, so two writers of one
part never share a file; the committed files are then renamed into DIR and the .done marker is
written atomically after them. A part is redone whole when it has no .done marker.

The manifest is created race-free (a complete temporary file hard-linked to its name, which
fails if another writer got there first); a writer that finds one compares it with its own.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import AltclipError
from ..durable import fsync_dir, write_atomic
from .embedfile import EmbeddingOutput, inputs_digest, settings_difference
from .manifest import file_record, read_json

FORMAT = "altclip-dataset/1"
MANIFEST = "manifest.json"
# 100 x 1,024: every power-of-two batch up to 4,096 divides it (the batch rule, check_part_size).
DEFAULT_PART_SIZE = 102_400
_OURS = ("part-", MANIFEST, ".manifest.json.tmp-", ".staging-")


def is_dataset_path(output: str) -> bool:
    """-o names a dataset when it ends with a slash or is an existing folder."""
    return output.endswith(("/", os.sep)) or os.path.isdir(output)


def part_name(part: int) -> str:
    return f"part-{part:05d}"


def part_range(manifest: dict, part: int) -> tuple[int, int]:
    """[start, stop) of the inputs in `part`."""
    size = manifest["part_size"]
    return part * size, min((part + 1) * size, manifest["inputs"])


def shard_parts(parts: int, shard: tuple[int, int] | None) -> list[int]:
    """The parts of shard (I, N): those whose number is I mod N (all with no shard)."""
    if shard is None:
        return list(range(parts))
    index, count = shard
    return [p for p in range(parts) if p % count == index]


def check_part_size(part_size: int, span: int, kind: str) -> None:
    """A part must start where a single run's batch starts (rows.image_batches, text_batches):
    the batch's shape changes the last bits of a row, so a part that began mid-batch would not
    be bit for bit the rows of `-o all.npy`."""
    if part_size % span:
        up = (part_size // span + 1) * span
        raise AltclipError(
            f"--part-size {part_size} is not a multiple of the batch ({span} {kind}s): the parts would be "
            "batched unlike one run over all inputs, and their rows would differ from it in the last bits",
            hint=f"use --part-size {up} (or a -b/--batch-size that divides {part_size})")


def check_folder(folder: str | os.PathLike) -> Path:
    """Before any work: DIR can be created or written, and holds nothing but a dataset."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise AltclipError(f"cannot write a dataset in {folder}: it is a file", hint="name a folder, e.g. -o vectors/")
    parent = folder.resolve().parent
    if not folder.exists() and not parent.is_dir():
        raise AltclipError(f"cannot write {folder}: the folder {parent} does not exist",
                           hint=f"create it first (mkdir -p {parent})")
    if not os.access(folder if folder.exists() else parent, os.W_OK):
        raise AltclipError(f"cannot write a dataset in {folder}: no permission to write there")
    if folder.is_dir() and not (folder / MANIFEST).exists():
        foreign = sorted(n for n in os.listdir(folder) if not n.startswith(_OURS))
        if foreign:
            raise AltclipError(f"{folder} is not empty and holds no altclip dataset (it has {foreign[0]!r})",
                               hint="name an empty or new folder for the dataset")
    return folder


def make_manifest(*, settings: dict, dim: int, names: list[str], part_size: int, extra: dict) -> dict:
    """The dataset's manifest for these settings and inputs (identical in every writer)."""
    parts = -(-len(names) // part_size)
    return {"format": FORMAT, **extra, "settings": dict(settings), "dim": dim, "dtype": settings["dtype"],
            "inputs": len(names), "inputs_sha256": inputs_digest(names), "part_size": part_size, "parts": parts,
            "part_inputs_sha256": [inputs_digest(names[p * part_size:(p + 1) * part_size]) for p in range(parts)]}


def read_manifest(folder: Path) -> dict | None:
    """DIR/manifest.json, None when absent. A writer racing to create it is waited for."""
    path = Path(folder) / MANIFEST
    for _ in range(50):
        try:
            data = read_json(path)
        except AltclipError:  # a non-linking file system: created, not yet written
            time.sleep(0.1)
            continue
        if data is None:
            return None
        if data.get("format") != FORMAT:
            raise AltclipError(f"{path} is not an altclip dataset manifest (format {data.get('format')!r})")
        return data
    raise AltclipError(f"cannot read {path}: it stays unreadable", hint="delete it if no other task writes it")


def ensure_manifest(folder: Path, manifest: dict, *, resume: bool) -> dict:
    """Create DIR and its manifest, or check the one there (another task's, an earlier run's)
    against ours: any difference is an AltclipError naming it."""
    folder = Path(folder)
    folder.mkdir(exist_ok=True)
    path = folder / MANIFEST
    if not path.exists():
        tmp = folder / f".manifest.json.tmp-{socket.gethostname()}-{os.getpid()}"
        write_atomic(tmp, json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
        try:
            os.link(tmp, path)  # atomic, complete, and fails if a racing writer linked first
            fsync_dir(folder)
            return manifest
        except FileExistsError:
            pass
        except OSError:  # no hard links here: exclusive create, readers wait while it is empty
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(tmp.read_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                return manifest
        finally:
            tmp.unlink(missing_ok=True)
    existing = read_manifest(folder)
    compare_manifests(folder, existing, manifest, resume=resume)
    return existing


def compare_manifests(folder: Path, old: dict, new: dict, *, resume: bool) -> None:
    """An AltclipError for the first difference that matters (the model's name and the altclip
    version may differ: the weights' identity and the settings decide)."""
    where = Path(folder) / MANIFEST
    difference = settings_difference(old.get("settings", {}), new["settings"])
    if difference is not None:
        if resume:
            raise difference
        raise AltclipError(f"{where} was written for other settings: "
                           + difference.message.removeprefix("cannot resume: "),
                           hint=difference.hint.replace(", or run without --resume to start again", "")
                           + ", or write the dataset to another folder")
    if (old.get("inputs"), old.get("inputs_sha256")) != (new["inputs"], new["inputs_sha256"]):
        raise AltclipError(f"{where} is for other inputs ({old.get('inputs')} inputs; this run has {new['inputs']}"
                           + (", the same number but other names or another order" if old.get("inputs") == new["inputs"]
                              else "") + ")",
                           hint="give the same inputs in the same order in every task, or use another folder")
    for key, option in (("part_size", "--part-size"), ("dim", "-m/--model")):
        if old.get(key) != new[key]:
            raise AltclipError(f"{where} has {key} {old.get(key)!r}, this run {new[key]!r}",
                               hint=f"give the same {option} in every task, or use another folder")


# --- parts ---------------------------------------------------------------------------------------------

def done_path(folder: Path, part: int) -> Path:
    return Path(folder) / f"{part_name(part)}.done"


def part_done(folder: Path, manifest: dict, part: int) -> dict | None:
    """The part's .done record when the part is complete for this manifest (its files there,
    of the recorded sizes), else None. Cheap: no hashing."""
    folder = Path(folder)
    try:
        done = json.loads(done_path(folder, part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(done, dict) or done.get("inputs_sha256") != manifest["part_inputs_sha256"][part]:
        return None
    for key in ("npy", "jsonl"):
        try:
            if os.path.getsize(folder / done[key]["name"]) != done[key]["bytes"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return done


def missing_parts(folder: Path, manifest: dict, parts: Iterable[int] | None = None) -> list[int]:
    parts = range(manifest["parts"]) if parts is None else parts
    return [p for p in parts if part_done(folder, manifest, p) is None]


def name_parts(parts: list[int], limit: int = 8) -> str:
    names = ", ".join(part_name(p) for p in parts[:limit])
    return names + (f" and {len(parts) - limit} more" if len(parts) > limit else "")


def staging_folder(folder: Path) -> Path:
    return Path(folder) / f".staging-{socket.gethostname()}-{os.getpid()}"


def remove_stale_staging(folder: Path) -> None:
    """Staging folders that processes of this machine left when killed (their pid is gone)."""
    prefix = f".staging-{socket.gethostname()}-"
    for entry in Path(folder).glob(prefix + "*"):
        pid = entry.name[len(prefix):]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


@dataclass
class PartResult:
    part: int
    inputs: int
    rows: int
    failed: int
    failures: list  # [(name, why)] of the inputs that failed


def settings_for(run, model, dtype) -> dict:
    """Everything that changes the numbers (as embed -o compares it on --resume)."""
    return {"kind": run.kind, "model": run.model_name, "weights": model.weights_id,
            "precision": model.precision, "device_type": model.device.type, "dtype": dtype,
            "normalize": run.normalize, "exact_decode": run.exact_decode if run.kind == "image" else None}


class Summary:
    """What this run's parts hold, those done earlier included (for the exit status)."""

    def __init__(self, manifest: dict, ours: list[int]):
        self.manifest, self.ours = manifest, ours
        self.parts_done = self.inputs = self.rows = self.failed = 0
        self.written = 0  # parts written by this run

    def add_done(self, folder, parts) -> None:
        for part in parts:
            done = part_done(folder, self.manifest, part)
            self.parts_done += 1
            self.inputs += done["inputs"]
            self.rows += done["rows"]
            self.failed += done["failed"]

    def add(self, result) -> None:
        self.parts_done += 1
        self.written += 1
        self.inputs += result.inputs
        self.rows += result.rows
        self.failed += result.failed


def write_part(folder: Path, manifest: dict, part: int, batches: Iterator[list[tuple]], *,
               extra: dict | None = None) -> PartResult:
    """Embed one part: `batches` yields (name, record, embedding or None) lists for exactly the
    part's inputs (runtime.rows). The part is committed in this process's staging folder, moved
    into DIR, and marked done; a failure or an interrupt leaves it absent (its .done removed
    only when the new files replace complete old ones)."""
    import numpy as np

    folder = Path(folder)
    name = part_name(part)
    staging = staging_folder(folder)
    staging.mkdir(exist_ok=True)
    start, stop = part_range(manifest, part)
    out = EmbeddingOutput(staging / f"{name}.npy", settings=manifest["settings"],
                          checkpoint_every=stop - start + 1)  # a part is redone whole: no checkpoints
    out.discard()
    failures = []
    try:
        out.open(manifest["dim"])
        for batch in batches:
            rows = [emb for _n, _r, emb in batch if emb is not None]
            failures += [(r["image"] if "image" in r else r["text"], r["error"]) for _n, r, e in batch if e is None]
            out.add([(n, r) for n, r, _e in batch], np.stack(rows) if rows else None)
        if out.inputs_done != stop - start or out.inputs_sha256 != manifest["part_inputs_sha256"][part]:
            raise AltclipError(f"{name}: embedded {out.inputs_done} inputs, not its {stop - start}")
        out.commit(failed=len(failures), extra={**(extra or {}), "dataset_part": part, "first_input": start})
    except BaseException:
        out.discard()
        raise
    npy, sidecar, part_manifest = out.path, out.sidecar, out.manifest
    done = {"part": part, "first_input": start, "inputs": out.inputs_done, "rows": out.rows,
            "failed": len(failures), "inputs_sha256": manifest["part_inputs_sha256"][part],
            "npy": file_record(npy), "jsonl": file_record(sidecar), "writer": staging.name[len(".staging-"):]}
    done_path(folder, part).unlink(missing_ok=True)  # replacing a complete part: absent meanwhile
    for path in (sidecar, npy, part_manifest):
        os.replace(path, folder / path.name)
    fsync_dir(folder)
    write_atomic(done_path(folder, part), json.dumps(done, ensure_ascii=False).encode("utf-8"))
    fsync_dir(folder)
    try:
        staging.rmdir()  # empty now; the next part makes it again
    except OSError:
        pass
    return PartResult(part, out.inputs_done, out.rows, len(failures), failures)


def clear_staging(folder: Path) -> None:
    shutil.rmtree(staging_folder(folder), ignore_errors=True)


# --- merge and read ------------------------------------------------------------------------------------

def open_complete(folder: str | os.PathLike, *, verb: str) -> dict:
    """The manifest of a dataset whose parts are all complete; else an AltclipError naming
    what is missing."""
    folder = Path(folder)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None:
        raise AltclipError(f"cannot {verb} {folder}: it is not an altclip dataset (no {MANIFEST})",
                           hint="make one with altclip embed ... -o DIR/")
    missing = missing_parts(folder, manifest)
    if missing:
        raise AltclipError(f"cannot {verb} {folder}: {len(missing)} of {manifest['parts']} parts are missing "
                           f"({name_parts(missing)})",
                           hint="run the embed command (or the shard tasks that own them) again with --resume")
    return manifest


def _sidecar_lines(path: Path) -> Iterator[dict]:
    with open(path, "rb") as f:
        for line in f:
            yield json.loads(line.decode("utf-8", "surrogateescape"))


def merge(folder: str | os.PathLike, output: str | os.PathLike, *,
          advance: Callable[[int], None] = lambda n: None, chunk: int = 8192) -> EmbeddingOutput:
    """Join a complete dataset into one `output` .npy + .jsonl + manifest, committed as
    `altclip embed -o` commits its files: row for row and bit for bit what one run over all the
    inputs writes. Each part's files are checked against its .done record (sizes and sha256)."""
    import numpy as np

    folder = Path(folder)
    manifest = open_complete(folder, verb="merge")
    out = EmbeddingOutput(output, settings=manifest["settings"], checkpoint_every=manifest["inputs"] + 1)
    out.finish_interrupted_commit()
    failed = 0
    try:
        out.open(manifest["dim"])
        for part in range(manifest["parts"]):
            done = part_done(folder, manifest, part)
            npy_path, jsonl_path = folder / done["npy"]["name"], folder / done["jsonl"]["name"]
            for path, key in ((npy_path, "npy"), (jsonl_path, "jsonl")):
                if file_record(path)["sha256"] != done[key]["sha256"]:
                    raise AltclipError(f"{path} is not the file its part's .done record describes (sha256 "
                                       "differs): it was changed after altclip wrote it",
                                       hint=f"delete {done_path(folder, part).name} and redo the part with --resume")
            array = np.load(npy_path, mmap_mode="r")
            row = 0
            items: list = []
            for record in _sidecar_lines(jsonl_path):
                record.pop("row", None)
                items.append((record.get("image", record.get("text")), record))
                if len(items) == chunk:
                    row = _add(out, items, array, row)
                    advance(len(items))
                    items = []
            row = _add(out, items, array, row)
            advance(len(items))
            failed += done["failed"]
            if row != len(array):
                raise AltclipError(f"{jsonl_path} numbers {row} rows, {npy_path} has {len(array)}")
            del array
        out.commit(failed=failed, inputs_sha256=manifest["inputs_sha256"],
                   extra={k: manifest[k] for k in ("model", "altclip") if k in manifest})
    except BaseException:
        out.discard()
        raise
    return out


def _add(out: EmbeddingOutput, items: list, array, row: int) -> int:
    good = sum(1 for _n, r in items if "error" not in r)
    if items:
        out.add(items, array[row:row + good] if good else None)
    return row + good


class ConcatView:
    """The parts' memory-mapped arrays seen as one (rows, D) array, without copying: len(),
    .shape, .dtype, view[i] and view[a:b] (a copy of those rows), np.asarray(view) (all of
    them, in memory); `.parts` are the memmaps themselves."""

    def __init__(self, parts: list, dim: int, dtype):
        import numpy as np

        self.parts = parts
        self.dtype = np.dtype(dtype)
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self._starts[-1]), dim)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        import numpy as np

        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            pieces = []
            for i, part in enumerate(self.parts):
                lo, hi = self._starts[i], self._starts[i + 1]
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    pieces.append(part[a - lo:b - lo])
            return np.concatenate(pieces) if pieces else np.zeros((0, self.shape[1]), self.dtype)
        index = int(key)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"row {key} out of range for {len(self)} rows")
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return np.asarray(self.parts[part][index - self._starts[part]])

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole.astype(dtype) if dtype is not None else whole


class DatasetReader:
    """A dataset's `.manifest`, `.vectors` (a ConcatView over the parts' memmaps) and `.records`
    (the sidecar lines of all parts in input order, "row" numbered as in `altclip merge`'s
    output: row i is vectors[i]; None for an input that failed)."""

    def __init__(self, folder: Path, manifest: dict):
        import numpy as np

        self.folder = Path(folder)
        self.manifest = manifest
        self._done = [part_done(folder, manifest, p) for p in range(manifest["parts"])]
        parts = [np.load(self.folder / d["npy"]["name"], mmap_mode="r") for d in self._done]
        self.vectors = ConcatView(parts, manifest["dim"], {"float32": "<f4", "float16": "<f2"}[manifest["dtype"]])

    @property
    def records(self) -> Iterator[dict]:
        """A new iterator over all records (each access starts from the first)."""
        def lines():
            row = 0
            for done in self._done:
                for record in _sidecar_lines(self.folder / done["jsonl"]["name"]):
                    if record.get("row") is not None:
                        record["row"] = row
                        row += 1
                    yield record

        return lines()

    def __len__(self) -> int:
        return self.manifest["inputs"]


def read_dataset(folder: str | os.PathLike) -> DatasetReader:
    """Open a complete dataset written by `altclip embed ... -o DIR/` for reading, memory-mapped
    (see DatasetReader); an AltclipError names the parts that are missing."""
    manifest = open_complete(folder, verb="read")
    return DatasetReader(Path(folder), manifest)

