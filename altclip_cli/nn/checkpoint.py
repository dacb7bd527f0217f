"""Reading checkpoints: safetensors (single or sharded) and pickle `.bin` through
`torch.load(weights_only=True)` only, key normalisation from a table, and a strict load
whose error names the missing and unexpected keys, grouped by layer."""
from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ..durable import fsync_dir
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
    return _load_pickle(path)[0]


def _load_pickle(path: Path) -> tuple[dict, bool]:
    """read_pickle's dict, and whether its tensors are memory-mapped from the file."""
    import pickle
    import warnings

    import torch

    mapped = True
    try:
        try:
            with warnings.catch_warnings():  # torch's note on pickle protocols means nothing to a user
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            mapped = False
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
    return state, mapped


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
    def read(path: Path):
        return _iter_safetensors(path) if path.suffix == ".safetensors" else read_pickle(path).items()

    return {name: convert(name, tensor) for name, tensor in _normalised(paths, read)}


def _normalised(paths: list[Path], read: Callable[[Path], Iterable[tuple[str, object]]]) -> Iterator[tuple[str, object]]:
    """(model name, value) for every item `read(path)` gives, dropped keys left out."""
    seen = set()
    for path in paths:
        for key, value in read(path):
            name = normalise_key(key)
            if name is None:
                continue
            if name in seen:
                raise CheckpointError(f"{path} has the tensor {name} twice (under two spellings)")
            seen.add(name)
            yield name, value


# --- reading lazily: a tensor at a time, a piece at a time ----------------------------------------

CHUNK_BYTES = 16 << 20  # the most of one tensor that a lazy read holds in memory at once


@dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor not read yet: its shape and dtype, and `chunks()`, flat pieces in
    order (at most CHUNK_BYTES of the file each, mapped from it when asked for) whose values,
    cast to `dtype`, are the tensor's. The writer casts each piece straight into its file, so
    writing a model through these holds one piece, never the model."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterator[torch.Tensor]]

    def cast(self, dtype: torch.dtype) -> LazyTensor:
        """The same tensor in `dtype`, cast a piece at a time when written: the cast is
        elementwise, so the pieces are bit for bit those of the whole tensor cast at once."""
        return LazyTensor(self.shape, dtype, self.chunks)


def open_lazily(paths: list[Path], *, normalise: bool = True) -> dict[str, LazyTensor]:
    """Every tensor of a checkpoint, none read yet (keys normalised as read_state_dict does,
    unless `normalise` is False): safetensors through their header and a map of the file, a
    zip-format pickle through torch's memory map. Each piece's pages are given back once it is
    used, so the checkpoint never becomes resident whole."""
    def read(path: Path):
        return (_lazy_safetensors(path) if path.suffix == ".safetensors" else _lazy_pickle(path)).items()

    if normalise:
        return dict(_normalised(paths, read))
    state: dict = {}
    for path in paths:
        part = dict(read(path))
        if state.keys() & part.keys():
            raise CheckpointError(f"{path} repeats tensors of another shard")
        state.update(part)
    return state


def read_safetensors_header(path: Path) -> dict[str, tuple[str, list[int], int, int]]:
    """{key: (dtype code, shape, first byte, end byte)} of a safetensors file, the byte offsets
    absolute in the file and checked against its size and the shapes."""
    import torch

    itemsize = {code: dtype.itemsize for dtype, code in _safetensors_dtypes(torch).items()}

    def broken(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: {why}",
                               hint="the file may be truncated: delete it and download the model again")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise broken("no header")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 << 20):
                raise broken("the header's length is past the end of the file")
            header = json.loads(f.read(length))
    except OSError as e:
        raise broken(first_line(e)) from None
    except ValueError:
        raise broken("the header is not JSON") from None
    if not isinstance(header, dict):
        raise broken("the header is not a JSON object")
    start, out = 8 + length, {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], [int(n) for n in info["shape"]], info["data_offsets"]
            expected = math.prod(shape) * itemsize[code]
        except (KeyError, TypeError, ValueError):
            raise broken(f"the header's entry for {key} is malformed") from None
        if end - begin != expected or begin < 0 or start + end > size:
            raise broken(f"the data of {key} does not fit its shape or the file")
        out[key] = (code, shape, start + begin, start + end)
    return out


def _lazy_safetensors(path: Path) -> dict[str, LazyTensor]:
    import torch

    dtypes = {code: dtype for dtype, code in _safetensors_dtypes(torch).items()}
    return {key: LazyTensor(tuple(shape), dtypes[code],
                            functools.partial(_file_chunks, path, begin, end, dtypes[code]))
            for key, (code, shape, begin, end) in read_safetensors_header(path).items()}


def _file_chunks(path: Path, begin: int, end: int, dtype) -> Iterator[torch.Tensor]:
    """Bytes [begin, end) of `path` as flat `dtype` pieces mapped from the file (a private map:
    nothing is written back), each piece's pages given back once the consumer is done with it."""
    import mmap

    import torch

    if begin == end:
        return
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    step = CHUNK_BYTES - CHUNK_BYTES % dtype.itemsize
    for at in range(begin, end, step):
        size = min(step, end - at)
        yield torch.frombuffer(mapped, dtype=dtype, count=size // dtype.itemsize, offset=at)
        give_back(mapped, at, size)


def give_back(mapped, offset: int, size: int) -> None:
    """Drop bytes [offset, offset + size) of a file mapping (an mmap.mmap) from this process's
    memory, with the whole pages around them: a private map's pages are clean and a shared map's
    are kept in the page cache, so the file's content stays; they just stop counting as ours.
    Linux only (elsewhere MADV_DONTNEED may discard data): a no-op there."""
    import mmap

    if not sys.platform.startswith("linux") or size <= 0:
        return
    first = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, first, offset + size - first)


def _lazy_pickle(path: Path) -> dict[str, LazyTensor]:
    state, mapped = _load_pickle(path)
    return {key: LazyTensor(tuple(t.shape), t.dtype, functools.partial(_tensor_chunks, t, mapped))
            for key, t in state.items()}


def _tensor_chunks(tensor: torch.Tensor, mapped: bool) -> Iterator[torch.Tensor]:
    """A tensor as flat pieces; when it is memory-mapped, each piece's pages are given back to
    the kernel once the consumer is done with it, so the file never becomes resident whole."""
    flat = tensor.detach().cpu().reshape(-1)  # a view when contiguous, which a mapped tensor is
    step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
    for at in range(0, flat.numel(), step):
        piece = flat[at:at + step]
        yield piece
        if mapped and tensor.is_contiguous():
            _give_back_pages(piece)


def _give_back_pages(tensor: torch.Tensor) -> None:
    """madvise(MADV_DONTNEED) the whole pages of a tensor memory-mapped from a file: they are
    clean file pages, so this drops them from the process and a later read reads the file again.
    Never call it on ordinary memory (that would zero it). Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    import ctypes
    import mmap

    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


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
    """Write {name: tensor or LazyTensor} as safetensors, streaming one tensor (one piece of a
    LazyTensor) at a time.

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
        size = math.prod(tensor.shape) * tensor.dtype.itemsize
        header[name] = {"dtype": dtypes[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        _reserve(f, 8 + len(raw) + offset)
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        _write_data(f, tensors, header)
        f.flush()
        os.fsync(f.fileno())


def _reserve(f, size: int) -> None:
    """Allocate the file's blocks before writing: a full disk fails now, not gigabytes later, and
    writes into blocks already allocated are faster on ext4 and xfs. Where the file system
    cannot (or the OS has no posix_fallocate), nothing is reserved."""
    import errno

    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


def _write_data(f, tensors: dict, header: dict) -> None:
    """Write each tensor a piece at a time, checking each tensor's byte count against the
    header's. Each piece is cast (or copied) into one of two reused buffers, no fresh memory per
    piece, while a second thread writes the piece before it: casting and the kernel's copy into
    the page cache overlap, and the thread never reads a mapped piece whose pages are given back."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    buffers = [torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)]
    with ThreadPoolExecutor(1, thread_name_prefix="altclip-write") as writer:
        pending = None  # the previous piece's write: at most one in flight
        try:
            for name, tensor in tensors.items():
                begin, end = header[name]["data_offsets"]
                pieces = tensor.chunks() if isinstance(tensor, LazyTensor) else _tensor_chunks(tensor, False)
                written = 0
                for piece in pieces:
                    flat = piece.reshape(-1)
                    size = flat.numel() * tensor.dtype.itemsize
                    if buffers[0].numel() < size:  # the other buffer is free: its write is done
                        buffers[0] = torch.empty(size, dtype=torch.uint8)
                    out = buffers[0][:size].view(tensor.dtype).copy_(flat)
                    buffers.reverse()
                    if pending is not None:
                        pending.result()
                    # (N,) bytes view: works for every dtype, bf16 included, without numpy dtypes.
                    pending = writer.submit(f.write, memoryview(out.view(torch.uint8).numpy()))
                    written += out.numel() * out.element_size()
                    del piece, flat, out  # one piece at a time: the source gives its pages back on the next
                if written != end - begin:
                    raise CheckpointError(f"writing {f.name}: tensor {name} gave {written} bytes, not the size of its shape")
        finally:
            if pending is not None:
                pending.result()


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
        fsync_dir(path.parent)
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
