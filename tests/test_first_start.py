"""The first start below fp32: the checkpoint is cast into the weight cache a piece at a time,
straight from the file, and the model is then loaded from the cache as every later start does.
The cache holds exactly the cast of the whole checkpoint, a kill -9 during the cast leaves nothing
that a later start trusts, and the cast never holds the model in memory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from altclip_cli.cache import weights as weight_cache
from altclip_cli.nn import checkpoint
from altclip_cli.nn.checkpoint import normalise_key
from altclip_cli.runtime import altclip as runtime

ROOT = Path(__file__).resolve().parents[1]
FP32_KEYS = ("LayerNorm.", "layer_norm1.", "layer_norm2.", "pre_LN.", "pre_layrnorm.", "post_layernorm.",
             "logit_scale")


def cache_file(weights: Path, precision: str = "bf16") -> Path:
    return weight_cache.compute_weights_path(weight_cache.weights_identity([weights]), precision)


def as_bin(folder: Path) -> Path:
    """The folder with its weights as a zip-format pytorch_model.bin instead of safetensors."""
    safetensors = folder / "model.safetensors"
    torch.save(load_file(str(safetensors)), folder / "pytorch_model.bin")
    safetensors.unlink()
    return folder / "pytorch_model.bin"


def assert_whole_cast(cache: Path, source_state: dict) -> None:
    """The cache is, tensor by tensor and bit for bit, the whole state dict cast at once: matmul
    weights to bf16, layer norms and the logit scale kept in fp32."""
    cached = load_file(str(cache))
    want = {normalise_key(k): v for k, v in source_state.items() if normalise_key(k) is not None}
    assert cached.keys() == want.keys()
    for name, tensor in cached.items():
        dtype = torch.float32 if any(part in name for part in FP32_KEYS) else torch.bfloat16
        assert tensor.dtype == dtype, name
        expected = want[name].to(dtype)
        assert tensor.shape == expected.shape, name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("source", ["safetensors", "bin"])
def test_the_streamed_cast_is_the_whole_state_dict_cast_bit_for_bit(tiny_model_dir, monkeypatch, source):
    weights = tiny_model_dir / "model.safetensors"
    state = load_file(str(weights))
    if source == "bin":
        weights = as_bin(tiny_model_dir)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)  # every large tensor in several pieces
    runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert_whole_cast(cache_file(weights), state)


def test_a_first_start_matches_the_reference(tiny_model_dir, monkeypatch):
    from oracle import Reference
    from PIL import Image

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8)) for _ in range(2)]
    texts = ["a photo of a cat", "一张狗的照片"]
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 1000)
    first = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")
    assert cache_file(tiny_model_dir / "model.safetensors").is_file()
    ref = Reference(tiny_model_dir)
    for ours, theirs in ((first.encode_texts(texts), ref.text_embeddings(texts)),
                         (first.encode_images(images), ref.image_embeddings(images))):
        cosine = (ours * theirs).sum(axis=1)  # both L2-normalised; bf16 against fp32
        assert cosine.min() > 0.99, cosine
    again = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16")  # a later start
    np.testing.assert_array_equal(again.encode_texts(texts), first.encode_texts(texts))


KILLED_WRITER = """
import os, signal, sys
from altclip_cli.nn import checkpoint
from altclip_cli.runtime.altclip import load

real = checkpoint.write_safetensors

def killed_half_way(tensors, path):
    # The real writer, killed -9 when it asks for the pieces of the middle tensor.
    def kill():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        yield
    items = dict(tensors)
    name = list(items)[len(items) // 2]
    items[name] = checkpoint.LazyTensor(items[name].shape, items[name].dtype, kill)
    real(items, path)

checkpoint.CHUNK_BYTES = 1000
checkpoint.write_safetensors = killed_half_way
load(sys.argv[1], device="cpu", precision="bf16")
"""


def test_a_kill_during_the_cast_leaves_nothing_trusted_and_the_next_start_casts_again(tiny_model_dir):
    weights = tiny_model_dir / "model.safetensors"
    target = cache_file(weights)
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tiny_model_dir)],
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, timeout=300)
    assert child.returncode == -9, child.stderr.decode()
    assert not target.exists()
    [half] = target.parent.glob(f".{target.name}.*.tmp")  # the killed writer's, never read
    assert half.stat().st_size > 0
    texts = ["a photo of a cat"]
    want = runtime.load(str(tiny_model_dir), device="cpu", precision="fp32").encode_texts(texts)
    got = runtime.load(str(tiny_model_dir), device="cpu", precision="bf16").encode_texts(texts)
    assert (want * got).sum() > 0.99
    assert not half.exists()  # cleared by the next writer, under the lock
    assert_whole_cast(target, load_file(str(weights)))


# --- memory: the cast holds a piece, not the model ------------------------------------------------

# Peak RSS from /proc (VmHWM): ru_maxrss would carry over the parent's peak across fork and exec.
MEASURE_START = """
import json, sys, torch
from pathlib import Path
from altclip_cli.cache import weights as weight_cache
from altclip_cli.nn import checkpoint
from altclip_cli.runtime.build import build_model

checkpoint.CHUNK_BYTES = 8 << 20
folder = Path(sys.argv[1])
weights = checkpoint.find_weights(folder)
build_model(folder, weights, torch.device("cpu"), "bf16", cache_key=weight_cache.weights_identity(weights))
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_mb": peak_kb / 1024}))
"""


def start_peak_mb(folder: Path) -> float:
    """Peak RSS of a fresh process that builds the bf16 model of `folder` with the weight cache."""
    child = subprocess.run([sys.executable, "-c", MEASURE_START, str(folder)], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert child.returncode == 0, child.stderr.decode()
    return json.loads(child.stdout.decode().splitlines()[-1])["peak_mb"]


def write_large_model(folder: Path, vocab: int) -> int:
    """A tiny model with a `vocab`-row word embedding (most of the bytes); returns the checkpoint's size."""
    from tiny import tiny_config

    from altclip_cli.nn.config import config_to_dict
    from altclip_cli.nn.model import AltCLIPModel

    cfg = tiny_config(vocab_size=vocab)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AltCLIPModel(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: 0.1 * torch.randn(s, generator=gen) + (1.0 if any(p in k for p in FP32_KEYS) else 0.0)
             for k, s in shapes.items()}
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    checkpoint.write_safetensors(state, folder / "model.safetensors")
    return (folder / "model.safetensors").stat().st_size


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
@pytest.mark.parametrize("source", ["safetensors", "bin"])
def test_the_first_start_needs_little_more_memory_than_a_later_one(tmp_path, source):
    """A later start holds the bf16 model (memory-mapped from the cache); the first start may add
    a piece of the checkpoint, never the checkpoint (fp32, twice the model) nor a second model."""
    folder = tmp_path / "large"
    size_mb = write_large_model(folder, vocab=3_000_000) / 2**20  # about 370 MB of fp32
    if source == "bin":
        as_bin(folder)
    first = start_peak_mb(folder)
    assert cache_file(checkpoint.find_weights(folder)[0]).is_file()
    later = start_peak_mb(folder)
    assert first - later < 0.25 * size_mb, (first, later, size_mb)
    shutil.rmtree(folder)


MEASURE_CONVERT = """
import json, sys
import torch  # imported before the baseline: its own memory is not the conversion's
from pathlib import Path
from altclip_cli.hub.convert import convert_to_safetensors
from altclip_cli.nn import checkpoint

def peak_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024

checkpoint.CHUNK_BYTES = 8 << 20
before = peak_mb()
convert_to_safetensors([Path(sys.argv[1])], Path(sys.argv[2]))
print(json.dumps({"growth_mb": peak_mb() - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak RSS from /proc")
def test_converting_a_pickle_holds_a_piece_not_the_checkpoint(tmp_path):
    folder = tmp_path / "large"
    size_mb = write_large_model(folder, vocab=3_000_000) / 2**20
    source, target = as_bin(folder), tmp_path / "converted" / "model.safetensors"
    child = subprocess.run([sys.executable, "-c", MEASURE_CONVERT, str(source), str(target)], capture_output=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert child.returncode == 0, child.stderr.decode()
    growth = json.loads(child.stdout.decode().splitlines()[-1])["growth_mb"]
    assert growth < 0.25 * size_mb, (growth, size_mb)
    want = torch.load(source, weights_only=True)
    got = load_file(str(target))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
