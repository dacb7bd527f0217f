"""Writing `altclip embed`'s array and sidecar so that they belong together, and resuming.

Rows go to `out.npy.part` and `out.jsonl.part` as they are computed. The .part array starts with a
fixed-size .npy header, so finishing is: write the real header (now that the row count is known),
fsync, and commit the pair through a journal (manifest.py), with Ctrl-C and SIGTERM deferred
until the commit is over (signals.py). Every `checkpoint_every` inputs (and when interrupted) the
parts are fsynced and `out.npy.checkpoint.json` records how far they are consistent and with which
settings; `--resume` checks the settings and inputs, truncates the parts to that point and carries
on. A run killed outright leaves the earlier pair untouched beside the .part and checkpoint files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AltclipError
from .manifest import FORMAT, file_record, finish_commit, journal_path, manifest_path, read_json, sidecar_path
from .signals import signals_deferred
from ..durable import fsync_dir, write_atomic

HEADER_SIZE = 128  # bytes before the first row; a multiple of 64, as numpy likes
CHECKPOINT_VERSION = 2  # 2: settings include the weights, the device type and the decoding


def npy_header(descr: str, shape: tuple[int, int]) -> bytes:
    """A .npy version 1.0 header padded to exactly HEADER_SIZE bytes."""
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': ({shape[0]}, {shape[1]}), }}"
    room = HEADER_SIZE - 10 - 1  # magic (6) + version (2) + length (2); newline at the end
    if len(text) > room:
        raise ValueError(f"shape {shape} too large for the header")
    body = (text + " " * (room - len(text)) + "\n").encode("latin1")
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def _fsync(f) -> None:
    f.flush()
    os.fsync(f.fileno())




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


def check_writable(path: str | os.PathLike) -> None:
    """Fail before any work if the output cannot be written where asked."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise AltclipError(f"cannot write {path}: the folder {folder} does not exist",
                           hint=f"create it first (mkdir -p {folder})")
    if path.is_dir():
        raise AltclipError(f"cannot write {path}: it is a folder", hint="name a file, e.g. -o out.npy")
    if not os.access(folder, os.W_OK):
        raise AltclipError(f"cannot write {path}: no permission to write in {folder}")


def finish_interrupted_commit(path: str | os.PathLike) -> bool:
    """Complete the commit of a run killed while it replaced the files (see manifest.py);
    True when there was one. Its checkpoint and parts are spent."""
    path = Path(path)
    if not finish_commit(path):
        return False
    path.with_name(path.name + ".checkpoint.json").unlink(missing_ok=True)
    return True


# How each setting is chosen on the command line, for the hint of a refused resume.
SETTING_OPTIONS = {
    "kind": "--text / --image", "weights": "-m/--model (the same model files)", "precision": "--precision",
    "device_type": "--device", "normalize": "--no-normalize", "dtype": "--dtype", "exact_decode": "--exact-decode",
}


def settings_difference(old: dict, new: dict) -> AltclipError | None:
    """The error for the first setting that differs between an earlier run and this one."""
    for key in sorted(old.keys() | new.keys(), key=lambda k: (k not in SETTING_OPTIONS, k)):
        if key == "model" or old.get(key) == new.get(key):  # the model's name: its weights decide
            continue
        option = SETTING_OPTIONS.get(key, key)
        return AltclipError(
            f"cannot resume: the earlier run used {key} {old.get(key)!r}, this one {new.get(key)!r}",
            hint=f"give the earlier run's {option} to continue it, or run without --resume to start again")
    return None


class EmbeddingOutput:
    """out.npy + out.jsonl, written through .part files and a checkpoint (see the module doc).

    `settings` (everything that changes the numbers: weights, precision, device type, dtype,
    normalisation, decoding) must match for a resume. Use: `finish_interrupted_commit()`,
    `completed()` or `resume_point()` + `check_inputs(names)`, `open(dim)`, `add(records, rows)`
    per batch, then `commit()`; on an interrupt `save_checkpoint()` (the .part files stay for
    --resume), on a failure `discard()`.
    """

    def __init__(self, path: str | os.PathLike, *, settings: dict, checkpoint_every: int = 1000):
        self.path = Path(path)
        self.sidecar = sidecar_path(self.path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.sidecar_part = self.sidecar.with_name(self.sidecar.name + ".part")
        self.checkpoint_file = self.path.with_name(self.path.name + ".checkpoint.json")
        self.manifest = manifest_path(self.path)
        self.journal = journal_path(self.path)
        self.settings = dict(settings)
        self.descr = {"float32": "<f4", "float16": "<f2"}[self.settings["dtype"]]
        self.checkpoint_every = max(1, int(checkpoint_every))
        self.dim: int | None = None
        self._state = _State()
        self._hash = hashlib.sha256()
        self._saved: _State | None = None
        self._npy = self._jsonl = None
        self.committed = False  # True once commit() has replaced the files

    # --- before the run ----------------------------------------------------------------------------

    def check_writable(self) -> None:
        check_writable(self.path)

    def has_partial(self) -> bool:
        return self.checkpoint_file.exists() or self.part.exists()

    def finish_interrupted_commit(self) -> bool:
        return finish_interrupted_commit(self.path)

    def completed(self, names) -> dict | None:
        """With --resume: the manifest when the output is already complete for these inputs and
        settings (nothing left to do), None when there is no complete output to compare with.
        A complete output made with other settings or inputs is an AltclipError naming it."""
        if self.has_partial():
            return None
        manifest = read_json(self.manifest)
        if manifest is None or manifest.get("format") != FORMAT or not (self.path.exists() and self.sidecar.exists()):
            return None
        difference = settings_difference(manifest.get("settings", {}), self.settings)
        if difference:
            raise difference
        names = list(names)
        if manifest.get("inputs") != len(names) or manifest.get("inputs_sha256") != inputs_digest(names):
            raise AltclipError(f"cannot resume: {self.path} is complete, but for other inputs "
                               f"({manifest.get('inputs')} inputs; now {len(names)})",
                               hint="give the same inputs in the same order, or run without --resume to replace it")
        return manifest

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
        if saved.get("version") != CHECKPOINT_VERSION:
            raise AltclipError(f"cannot resume: {self.checkpoint_file} was written by another altclip version",
                               hint="run without --resume to start again")
        difference = settings_difference(saved.get("settings", {}), self.settings)
        if difference:
            raise difference
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

    @property
    def inputs_sha256(self) -> str:
        """The digest of the names of the inputs added so far (inputs_digest)."""
        return self._state.digest

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
        with signals_deferred():
            state = self._state
            _fsync(self._npy)
            _fsync(self._jsonl)
            record = {"version": CHECKPOINT_VERSION, "settings": self.settings, "dim": self.dim,
                      "inputs": state.inputs, "rows": state.rows, "sidecar_bytes": state.sidecar_bytes,
                      "digest": state.digest}
            write_atomic(self.checkpoint_file, json.dumps(record).encode("utf-8"))

    def commit(self, *, failed: int = 0, extra: dict | None = None, inputs_sha256: str | None = None) -> None:
        """The real header, fsync, and the pair committed through the journal (manifest.py),
        with Ctrl-C and SIGTERM deferred until it is done. `failed`: the inputs without a row;
        `extra`: more facts for the manifest (the model's name, the altclip version, ...);
        `inputs_sha256`: the inputs' digest when the names given to add() were not the inputs'
        own (altclip merge knows them from the sidecars, where undecodable bytes are U+FFFD)."""
        if self._npy is None:
            raise RuntimeError("commit() before open()")
        with signals_deferred():
            state = self._state
            self._npy.truncate(HEADER_SIZE + state.rows * self.dim * self.itemsize)
            self._npy.seek(0)
            self._npy.write(npy_header(self.descr, (state.rows, self.dim)))
            self._jsonl.truncate(state.sidecar_bytes)
            _fsync(self._npy)
            _fsync(self._jsonl)
            self._close()
            manifest = {"format": FORMAT, **(extra or {}), "settings": self.settings,
                        "rows": state.rows, "dim": self.dim, "dtype": self.settings["dtype"],
                        "inputs": state.inputs, "failed": failed, "inputs_sha256": inputs_sha256 or state.digest,
                        "npy": {**file_record(self.part), "name": self.path.name},
                        "jsonl": {**file_record(self.sidecar_part), "name": self.sidecar.name}}
            write_atomic(self.journal, json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8"))
            os.replace(self.sidecar_part, self.sidecar)
            os.replace(self.part, self.path)
            os.replace(self.journal, self.manifest)
            self.committed = True
            self.checkpoint_file.unlink(missing_ok=True)
            fsync_dir(self.path.parent)

    def stop(self) -> bool:
        """After a run stopped early: checkpoint what is done (True), or remove the .part files
        this run created with nothing in them. Files of an earlier run that this one never
        opened stay."""
        if not self.is_open:
            return False
        if self.inputs_done:
            self.save_checkpoint()
            self.close()
            return True
        self.discard()
        return False

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
