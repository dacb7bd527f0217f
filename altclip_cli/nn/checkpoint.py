"""Reading checkpoints: safetensors (single or sharded) and pickle `.bin` through
`torch.load(weights_only=True)` only, key normalisation from a table, and a strict load
whose error names the missing and unexpected keys, grouped by layer."""
from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from ..errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Preferred first. An index file lists shards of the same format.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

# (pattern, replacement) applied once to every key: our spelling is the hub's, which has
# `encoder.layer.N` in the text tower and `encoder.layers.N` in the image tower; transformers
# 5.x writes `layers` in both (and older tools `layer` in both).
KEY_RENAMES = (
    (re.compile(r"^text_model\.roberta\.encoder\.layers\.(\d+)\."), r"text_model.roberta.encoder.layer.\1."),
    (re.compile(r"^vision_model\.encoder\.layer\.(\d+)\."), r"vision_model.encoder.layers.\1."),
)
# Keys that are not weights of the model: index buffers old checkpoints saved, and the
# RoBERTa pooler AltCLIP does not use.
DROPPED_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids)$|^text_model\.roberta\.pooler\.")


def weight_files(folder: Path) -> list[Path] | None:
    """The weight files of a model folder in the first format of WEIGHT_FILES it has (shards
    from the index, which may be missing on disk), or None when it has none."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
            return [folder / s for s in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path} is not a valid weight index: {first_line(e)}") from None
    return None


def find_weights(folder: Path) -> list[Path]:
    """weight_files, with an error naming what is missing."""
    files = weight_files(folder)
    if files is None:
        raise CheckpointError(f"no weights in {folder}", hint="expected one of: " + ", ".join(WEIGHT_FILES))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{folder}: shards listed in the index are missing: {', '.join(missing)}")
    return files


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}",
                              hint="the file may be truncated: delete it and download the model again") from None


def read_pickle(path: Path) -> dict:
    """Read a pytorch_model.bin with torch's weights-only unpickler (memory-mapped when the file
    is in the zip format): a flat {name: tensor} dict, nothing dropped. A file holding anything
    but tensors and plain containers (a function, a class) raises CheckpointError: unpickling it
    could run code."""
    import pickle
    import warnings

    import torch

    try:
        try:
            with warnings.catch_warnings():  # torch's note on pickle protocols means nothing to a user
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy pre-zip format
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text and "Unsupported global" not in text:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first_line(exc)}") from None
        found = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL posix.system ..."
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path} holds Python objects other than tensors{what}; refused to unpickle it, "
            "since that could run code",
            hint="use a safetensors checkpoint (model.safetensors) from a source you trust") from None
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {first_line(exc)}",
                              hint="the file may be truncated: delete it and download the model again") from None
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} is not a flat state dict of named tensors",
                              hint="expected what torch.save(model.state_dict()) writes")
    return state


def normalise_key(key: str) -> str | None:
    """The model's name for a checkpoint key, or None for keys that are dropped."""
    if DROPPED_KEYS.search(key):
        return None
    for pattern, replacement in KEY_RENAMES:
        key = pattern.sub(replacement, key)
    return key


def read_state_dict(paths: list[Path], convert: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    """Read every tensor, normalise its key and pass it through `convert(key, tensor)` one at
    a time (the runtime casts there), so at most one full-precision tensor is in memory."""
    state = {}
    for path in paths:
        items = _iter_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path).items()
        for key, tensor in items:
            name = normalise_key(key)
            if name is None:
                continue
            if name in state:
                raise CheckpointError(f"{path} has the tensor {name} twice (under two spellings)")
            state[name] = convert(name, tensor)
    return state


def _grouped(keys) -> list[str]:
    """Collapse layer indices: ['a.0.w', 'a.1.w'] -> ['a.{0-1}.w']."""
    groups = defaultdict(list)
    for key in keys:
        m = re.search(r"\.(\d+)\.", key)
        if m:
            groups[key[:m.start()] + ".{}." + key[m.end():]].append(int(m.group(1)))
        else:
            groups[key].append(None)
    out = []
    for pattern, idx in sorted(groups.items()):
        if idx == [None]:
            out.append(pattern)
        else:
            idx = sorted(idx)
            span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else \
                ",".join(map(str, idx))
            out.append(pattern.replace("{}", "{" + span + "}"))
    return out


def check_keys(expected: set[str], state: dict) -> None:
    """Raise CheckpointError naming missing and unexpected keys, grouped by layer."""
    missing, unexpected = expected - state.keys(), state.keys() - expected
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: " + ", ".join(_grouped(missing)))
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: " + ", ".join(_grouped(unexpected)))
    raise CheckpointError("the checkpoint's tensors do not match an AltCLIP model; " + "; ".join(parts),
                          hint="is this an AltCLIP checkpoint, complete and unmodified?")


def write_safetensors(tensors: dict, path: Path) -> None:
    """Write {name: tensor} as safetensors, streaming one tensor at a time.

    safetensors.torch.save_file would first copy every tensor into memory (3.5 GB for AltCLIP)
    and refuses shared or strided tensors; here each name gets its own contiguous bytes, so
    shared storage is simply written twice. Layout: u64 little-endian header size, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
    """
    import torch

    if sys.byteorder != "little":
        raise CheckpointError("converting checkpoints needs a little-endian machine")
    dtypes = _safetensors_dtypes(torch)
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in dtypes:
            raise CheckpointError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for tensor in tensors.values():
            # (N,) bytes view: works for every dtype, bf16 included, without numpy dtypes.
            flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            f.write(memoryview(flat.numpy()))
        f.flush()
        os.fsync(f.fileno())


def save_safetensors(tensors: dict, path: Path) -> None:
    """write_safetensors under a temporary name, read its header back, and move it into place:
    a reader never sees half a file. Callers hold a lock around this and clear what a killed
    writer left (`remove_stale_temporaries`): a temporary file may belong to a live writer."""
    from safetensors import safe_open

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_safetensors(tensors, tmp)
        with safe_open(str(tmp), framework="pt") as f:
            if set(f.keys()) != set(tensors):
                raise CheckpointError(f"writing {path} lost tensors")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(path: Path) -> None:
    """Delete the temporary files of killed writers of `path`; call only while holding the lock
    that every writer of `path` takes (then no temporary file can belong to a live writer)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _safetensors_dtypes(torch) -> dict:
    names = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
             "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
             "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
             "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2"}
    return {getattr(torch, name): code for name, code in names.items() if hasattr(torch, name)}
