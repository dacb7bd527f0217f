"""Reading checkpoints: safetensors (single or sharded) and pickle `.bin` through
`torch.load(weights_only=True)` only, key normalisation from a table, and a strict load
whose error names the missing and unexpected keys, grouped by layer."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch

from .errors import CheckpointError

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


def find_weights(folder: Path) -> list[Path]:
    """The weight files of a model folder, in the first format found in WEIGHT_FILES."""
    folder = Path(folder)
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"cannot read the shard index {path}: {e}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{path.name} lists shards that are not in {folder}: {', '.join(missing)}")
        return [folder / s for s in shards]
    raise CheckpointError(f"no weights in {folder}",
                          hint="expected one of: " + ", ".join(WEIGHT_FILES))


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {path}: {e}",
                              hint="the file may be truncated: delete it and download the model again") from None


def _iter_pickle(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    import pickle

    try:
        # weights_only: never run code from a checkpoint; mmap: no full copy in memory
        # (legacy non-zip files cannot be mapped and are read whole).
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds objects other than tensors and was refused "
                              f"(it is only ever read with weights_only=True): {str(e).splitlines()[0]}",
                              hint="convert it to safetensors with a tool you trust") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}",
                              hint="the file may be truncated: delete it and download the model again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    yield from state.items()


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
        reader = _iter_safetensors if path.suffix == ".safetensors" else _iter_pickle
        for key, tensor in reader(path):
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
