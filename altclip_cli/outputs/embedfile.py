"""Writing `altclip embed`'s array and sidecar so that they appear whole or not at all.

Rows go to `out.npy.part` and `out.jsonl.part` as they are computed. The .part array starts with a
fixed-size .npy header, so finishing is: write the real header (now that the row count is known),
fsync, and `os.replace` both files onto their real names with SIGINT/SIGTERM held off. Every
`checkpoint_every` inputs (and when interrupted) the parts are fsynced and `out.npy.checkpoint.json`
records how far they are consistent; `--resume` truncates the parts to that point and carries on.
A run killed outright leaves only the .part and checkpoint files, never a torn out.npy.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import AltclipError

HEADER_SIZE = 128  # bytes before the first row; a multiple of 64, as numpy likes
CHECKPOINT_VERSION = 1


def sidecar_path(npy: Path) -> Path:
    """out.npy -> out.jsonl; a name without .npy gets .jsonl added."""
    return npy.with_suffix(".jsonl") if npy.suffix == ".npy" else npy.with_name(npy.name + ".jsonl")


def npy_header(descr: str, shape: tuple[int, int]) -> bytes:
    """A .npy version 1.0 header padded to exactly HEADER_SIZE bytes."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    room = HEADER_SIZE - 10 - 1  # magic (6) + version (2) + length (2); newline at the end
    if len(text) > room:
        raise ValueError(f"shape {shape} too large for the header")
    body = (text + " " * (room - len(text)) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def read_npy_shape(header: bytes) -> tuple[int, int]:
    d = ast.literal_eval(header[10:HEADER_SIZE].decode("latin1"))
    return tuple(d["shape"])


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends (main thread only; elsewhere a no-op)."""
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file in one step: temporary file beside it, fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            _fsync(f)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@dataclass(frozen=True)
class _State:
    """How far the .part files are consistent: inputs done, array rows, sidecar bytes, and a
    hash of the names of the inputs done (so a resumed run checks it has the same inputs)."""

    inputs: int = 0
    rows: int = 0
    sidecar_bytes: int = 0
    digest: str = hashlib.sha256().hexdigest()


def inputs_digest(names) -> str:
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


class EmbeddingOutput:
    """out.npy + out.jsonl, written through .part files and a checkpoint (see the module doc).

    `settings` (model, kind, dtype, normalize) must match for a resume. Use: `resume_point()`,
    `check_inputs(names)`, `open(dim)`, `add(records, rows)` per batch, then `commit()`; on an
    interrupt `save_checkpoint()` (the .part files stay for --resume), on a failure `discard()`.
    """

    def __init__(self, path: str | os.PathLike, *, settings: dict, checkpoint_every: int = 1000):
        self.path = Path(path)
        self.sidecar = sidecar_path(self.path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.sidecar_part = self.sidecar.with_name(self.sidecar.name + ".part")
        self.checkpoint_file = self.path.with_name(self.path.name + ".checkpoint.json")
        self.settings = dict(settings)
        self.descr = {"float32": "<f4", "float16": "<f2"}[self.settings["dtype"]]
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.dim: int | None = None
        self._state = _State()
        self._hash = hashlib.sha256()
        self._saved: _State | None = None
        self._npy = self._jsonl = None

    # --- before the run ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        """Fail before any work if the output cannot be written where asked."""
        folder = self.path.parent
        if not folder.is_dir():
            raise AltclipError(f"cannot write {self.path}: the folder {folder} does not exist",
                               hint=f"create it first (mkdir -p {folder})")
        if self.path.is_dir():
            raise AltclipError(f"cannot write {self.path}: it is a folder", hint="name a file, e.g. -o out.npy")
        if not os.access(folder, os.W_OK):
            raise AltclipError(f"cannot write {self.path}: no permission to write in {folder}")

    def has_partial(self) -> bool:
        return self.checkpoint_file.exists() or self.part.exists()

    def resume_point(self) -> int:
        """The checkpoint's input count, after checking it was made with the same settings."""
        try:
            saved = json.loads(self.checkpoint_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AltclipError(f"nothing to resume: {self.checkpoint_file} does not exist",
                               hint="run without --resume to start from the beginning") from None
        except (OSError, ValueError) as exc:
            raise AltclipError(f"cannot read {self.checkpoint_file} ({exc})",
                               hint="delete the .part and .checkpoint.json files and run without --resume") from None
        if saved.get("version") != CHECKPOINT_VERSION or saved.get("settings") != self.settings:
            old = saved.get("settings")
            raise AltclipError(f"cannot resume: the interrupted run used other settings ({old}, now {self.settings})",
                               hint="use the same options as the interrupted run, or run without --resume")
        self.dim = int(saved["dim"])
        self._saved = _State(int(saved["inputs"]), int(saved["rows"]), int(saved["sidecar_bytes"]), saved["digest"])
        return self._saved.inputs

    def check_inputs(self, names) -> None:
        """After resume_point(): the first inputs must be those the interrupted run did."""
        names = list(names)
        if len(names) < self._saved.inputs or inputs_digest(names[: self._saved.inputs]) != self._saved.digest:
            raise AltclipError("cannot resume: the inputs are not those of the interrupted run "
                               f"(its first {self._saved.inputs} inputs differ)",
                               hint="give the same inputs in the same order, or run without --resume")
        for name in names[: self._saved.inputs]:
            self._hash.update(name.encode("utf-8", "surrogateescape") + b"\0")

    # --- the run -----------------------------------------------------------------------------------

    def open(self, dim: int) -> None:
        """Create the .part files (or reopen them at the checkpoint when resuming)."""
        if self._saved is not None:
            if dim != self.dim:
                raise AltclipError(f"cannot resume: the interrupted run had {self.dim}-wide rows, this model gives {dim}")
            s = self._saved
            need = HEADER_SIZE + s.rows * dim * self.itemsize
            try:
                npy_size, jsonl_size = self.part.stat().st_size, self.sidecar_part.stat().st_size
            except OSError as exc:
                raise AltclipError(f"cannot resume: {exc}", hint="run without --resume to start again") from None
            if npy_size < need or jsonl_size < s.sidecar_bytes:
                raise AltclipError("cannot resume: the .part files are shorter than their checkpoint says",
                                   hint="run without --resume to start again")
            self._npy = open(self.part, "r+b")
            self._npy.truncate(need)
            self._npy.seek(need)
            self._jsonl = open(self.sidecar_part, "r+b")
            self._jsonl.truncate(s.sidecar_bytes)
            self._jsonl.seek(s.sidecar_bytes)
            self._state = s
        else:
            self.dim = dim
            self._npy = open(self.part, "wb")
            self._npy.write(npy_header(self.descr, (0, dim)))
            self._jsonl = open(self.sidecar_part, "wb")
            self._state = _State()
            self.checkpoint_file.unlink(missing_ok=True)

    @property
    def is_open(self) -> bool:
        return self._npy is not None

    def close(self) -> None:
        """Close the .part files, keeping them (and the checkpoint) for --resume."""
        self._close()

    def failed_in_checkpoint(self) -> int:
        """How many inputs failed in the checkpointed part of the sidecar (for a resumed run's count)."""
        s = self._saved
        if s is None:
            return 0
        try:
            with open(self.sidecar_part, "rb") as f:
                head = f.read(s.sidecar_bytes)
        except OSError:
            return 0
        return sum(1 for line in head.splitlines() if line.startswith(b'{"row": null'))

    @property
    def itemsize(self) -> int:
        return int(self.descr[-1])

    @property
    def inputs_done(self) -> int:
        return self._state.inputs

    @property
    def rows(self) -> int:
        return self._state.rows

    def add(self, items, array) -> None:
        """One batch: `items` is a list of (name, sidecar record without "row") in input order,
        records with an "error" have no row; `array` holds the other inputs' rows in order."""
        import numpy as np

        state = self._state
        data = np.ascontiguousarray(array, dtype=self.descr) if array is not None else None
        h = self._hash.copy()
        lines = []
        row = state.rows
        for name, record in items:
            h.update(name.encode("utf-8", "surrogateescape") + b"\0")
            if "error" in record:
                lines.append(_line({"row": None, **record}))
            else:
                lines.append(_line({"row": row, **record}))
                row += 1
        if data is not None and len(data):
            if data.shape != (row - state.rows, self.dim):
                raise ValueError(f"rows {data.shape} do not match the batch ({row - state.rows}, {self.dim})")
            self._npy.write(data.tobytes())
        blob = "".join(lines).encode("utf-8", "surrogateescape")
        self._jsonl.write(blob)
        # One assignment: an interrupt sees either the old consistent state or the new one.
        self._hash, self._state = h, _State(state.inputs + len(items), row, state.sidecar_bytes + len(blob), h.hexdigest())
        if self._state.inputs // self.checkpoint_every > state.inputs // self.checkpoint_every:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        """fsync the parts, then record how far they are consistent (atomically)."""
        if self._npy is None:
            return
        with signals_held():
            state = self._state
            _fsync(self._npy)
            _fsync(self._jsonl)
            record = {"version": CHECKPOINT_VERSION, "settings": self.settings, "dim": self.dim,
                      "inputs": state.inputs, "rows": state.rows, "sidecar_bytes": state.sidecar_bytes,
                      "digest": state.digest}
            write_atomic(self.checkpoint_file, json.dumps(record).encode("utf-8"))

    def commit(self) -> None:
        """The real header, fsync, and both files onto their names with signals held."""
        if self._npy is None:
            raise RuntimeError("commit() before open()")
        with signals_held():
            state = self._state
            self._npy.truncate(HEADER_SIZE + state.rows * self.dim * self.itemsize)
            self._npy.seek(0)
            self._npy.write(npy_header(self.descr, (state.rows, self.dim)))
            self._jsonl.truncate(state.sidecar_bytes)
            _fsync(self._npy)
            _fsync(self._jsonl)
            self._close()
            os.replace(self.sidecar_part, self.sidecar)
            os.replace(self.part, self.path)
            self.checkpoint_file.unlink(missing_ok=True)
            _fsync_dir(self.path.parent)

    def discard(self) -> None:
        """Remove the .part files and checkpoint (a failed run that cannot be resumed usefully)."""
        self._close()
        for p in (self.part, self.sidecar_part, self.checkpoint_file):
            p.unlink(missing_ok=True)

    def _close(self) -> None:
        for f in (self._npy, self._jsonl):
            if f is not None:
                f.close()
        self._npy = self._jsonl = None


def _line(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False) + "\n"
