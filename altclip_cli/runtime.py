"""The model runtime: resolve a model, choose device and precision, load the weights straight
into the compute dtype, and encode texts and images. The model code knows nothing of devices;
this module owns device choice, precision and casting."""
from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import cache
from .checkpoint import check_keys, find_weights, read_state_dict
from .config import check_against_tensors, read_config
from .errors import CheckpointError, DeviceError
from .layers import LayerNorm
from .model import AltCLIPModel
from .pipeline import ImageResult, available_cores, stream_embeddings

log = logging.getLogger("altclip")
DRAFT_FACTOR = 2  # see AltCLIP.draft_min_side
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices natively (x86 avx512_bf16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(request: str = "auto") -> tuple[torch.device, str]:
    """`auto`: cuda, then mps, then cpu. An explicit device that is absent is an error."""
    request = (request or "auto").strip().lower()
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    try:
        device = torch.device(request)
    except RuntimeError:
        raise DeviceError(f"unknown device {request!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but CUDA is not available on this machine",
                              hint="use --device cpu (or auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{request} was asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps was asked for, but Apple MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {request!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device, "asked for"


def choose_precision(device: torch.device, request: str = "auto") -> tuple[str, str]:
    """`auto` is real mixed precision where the hardware has fast low-precision matmuls."""
    request = (request or "auto").strip().lower()
    if request != "auto":
        if request not in PRECISIONS:
            raise DeviceError(f"unknown precision {request!r}", hint="use auto, fp32, fp16 or bf16")
        if device.type == "cuda" and request == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 was asked for, but this GPU does not support it", hint="use fp16")
        return request, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 instead"
    if device.type == "mps":
        return "fp16", "auto: fp16 on Apple MPS"
    if cpu_has_native_bf16():
        return "bf16", "auto: the CPU has native bf16 matrix instructions (avx512_bf16/AMX)"
    return "fp32", "auto: the CPU has no native bf16 matrix instructions"


def build_model(folder: Path, weights: list[Path] | None, device: torch.device, precision: str,
                cache_key: str | None = None) -> AltCLIPModel:
    """Read config and weights (`weights` None: those found in `folder`), check them against
    each other, and return the model in eval mode on `device`: matmul weights in the compute
    dtype, LayerNorms and logit_scale in fp32.

    cache_key (cache.weights_identity of `weights`): below fp32, keep a copy of the weights
    already cast in altclip's cache, so that later starts memory-map it: no cast, half the
    bytes, and pages of a tower that is not used are never read. None: no cache.
    """
    cfg = read_config(folder)
    weights = weights or find_weights(folder)
    with torch.device("meta"), _no_weight_init():
        model = AltCLIPModel(cfg)  # shapes only, no memory: the checkpoint's tensors are assigned
    keep_fp32 = {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, LayerNorm)
                 for p in ("weight", "bias")} | {"logit_scale"}
    dtype = PRECISIONS[precision]

    def convert(name: str, tensor: torch.Tensor) -> torch.Tensor:
        # One tensor at a time, straight to its final dtype and device.
        target = torch.float32 if name in keep_fp32 or not tensor.is_floating_point() else dtype
        return tensor.to(device=device, dtype=target)

    cached = cache.compute_weights_path(cache_key, precision) if cache_key and precision != "fp32" else None
    state = _read_cached(cached, convert) if cached and cached.is_file() else None
    fresh = state is None
    if fresh:
        state = read_state_dict(weights, convert)
    check_against_tensors(cfg, {k: tuple(v.shape) for k, v in state.items()})
    check_keys(set(model.state_dict().keys()), state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"the weights do not fit the model: {e}") from None
    if cached and fresh:
        cache.save_compute_weights(state, cached)
    return model.eval().requires_grad_(False)


@contextmanager
def _no_weight_init():
    """Skip torch.nn.init while the model is built on the meta device: the checkpoint supplies
    every tensor, and initialising meta tensors imports torch._dynamo (0.8 s of a cold start)."""
    names = ("uniform_", "normal_", "kaiming_uniform_", "ones_", "zeros_", "constant_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    for name in names:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _read_cached(path: Path, convert) -> dict | None:
    try:
        return read_state_dict([path], convert)
    except CheckpointError as e:
        cache.log.warning("ignoring the damaged weight cache %s (%s)", path, e.message)
        return None


def default_batch_size(device: torch.device, kind: str) -> int:
    if device.type == "cpu":
        return 16 if kind == "image" else 64
    return 128 if kind == "image" else 256


@dataclass
class AltCLIP:
    """A loaded model with its tokenizer and image preprocessor (see `load`)."""

    model_id: str
    folder: Path
    model: AltCLIPModel
    preprocessor: object  # altclip_cli.images.ImagePreprocessor
    device: torch.device
    precision: str
    device_reason: str = ""
    precision_reason: str = ""
    label_cache: cache.LabelCache | None = None
    exact_decode: bool = False

    @property
    def draft_min_side(self) -> int | None:
        """The shortest side large JPEGs are decoded at (libjpeg's 1/2-1/8 scales), or None for
        full-size decoding, bit-exact with the reference's preprocessing. Twice the model's input
        side: measured cosine to full decoding >= 0.99997 (README, Accuracy)."""
        edge = getattr(self.preprocessor, "shortest_edge", None)
        return None if self.exact_decode or not edge else DRAFT_FACTOR * edge

    @functools.cached_property
    def tokenizer(self):
        """The TextTokenizer, loaded on first use: the real tokenizer.json (17 MB) takes over a
        second to load, and a classify whose labels are cached never needs it."""
        from .tokenizer import TextTokenizer

        return TextTokenizer.from_dir(self.folder, max_length=self.model.config.text.max_tokens)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.float().exp())

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.inference_mode()
    def encode_token_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_text(ids.to(self.device), mask.to(self.device))

    @torch.inference_mode()
    def encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_image(pixels.to(self.device))

    def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                     normalize: bool = True) -> np.ndarray:
        """(N, D) float32, row i for texts[i]."""
        texts = list(texts)
        batch_size = batch_size or default_batch_size(self.device, "text")
        ids = self.tokenizer.encode(texts)
        # Batches of similar length waste less compute on padding; rows are put back in order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.embed_dim)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch_ids, mask = self.tokenizer.pad([ids[i] for i in rows])
            out[rows] = self.encode_token_batch(batch_ids, mask).cpu()
        return _finish(out, normalize)

    def encode_images(self, images: Sequence, *, batch_size: int | None = None,
                      normalize: bool = True) -> np.ndarray:
        """images: PIL images (see altclip_cli.images.open_image). (N, D) float32, row i for images[i]."""
        results = list(self.stream_images(images, open_fn=lambda image: image, batch_size=batch_size,
                                          normalize=normalize))
        for r in results:
            if r.error:
                raise r.error
        return np.stack([r.embedding for r in results]) if results else np.zeros((0, self.embed_dim), np.float32)

    def stream_images(self, sources: Iterable, *, open_fn: Callable | None = None,
                      batch_size: int | None = None, normalize: bool = True,
                      workers: int | None = None) -> Iterator[ImageResult]:
        """One ImageResult (index, source, embedding or error) per source, in input order, with
        decoding in worker threads ahead of the model. open_fn(source) -> PIL image defaults to
        `open_image` (paths or bytes); an input that fails gives an InputError, never an exception."""
        from .images import open_image

        if open_fn is None:
            def open_fn(source):
                return open_image(source, draft_min_side=self.draft_min_side)

        def encode(pixels: np.ndarray) -> np.ndarray:
            return _finish(self._encode_pixels_halving(torch.from_numpy(pixels)), normalize)

        return stream_embeddings(sources, open_fn, self.preprocessor, encode,
                                 batch_size=batch_size or default_batch_size(self.device, "image"),
                                 workers=workers)

    def _encode_pixels_halving(self, pixels: torch.Tensor) -> torch.Tensor:
        """encode_pixel_batch, halving the batch on a CUDA out-of-memory error and saying so."""
        try:
            return self.encode_pixel_batch(pixels).cpu()
        except torch.cuda.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("CUDA out of memory on a batch of %d images: going on with batches of %d",
                              len(pixels), half)
            return torch.cat([self._encode_pixels_halving(pixels[:half]),
                              self._encode_pixels_halving(pixels[half:])])

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None) -> np.ndarray:
        """(L, D) float32, L2-normalised. With templates, CLIP's prompt ensemble: the mean of
        the normalised embeddings of every template filled with the label, normalised again."""
        labels = list(labels)
        templates = list(templates or [])
        found = self.label_cache.get(set(labels), templates) if self.label_cache else {}
        missing = list(dict.fromkeys(label for label in labels if label not in found))
        if missing:
            computed = dict(zip(missing, self._embed_labels(missing, templates)))
            if self.label_cache:
                self.label_cache.put(computed, templates)
            found.update(computed)
        return np.stack([found[label] for label in labels]) if labels else np.zeros((0, self.embed_dim), np.float32)

    def _embed_labels(self, labels: list[str], templates: list[str]) -> np.ndarray:
        if not templates:
            return self.encode_texts(labels)
        filled = [t.replace("{}", label) for label in labels for t in templates]
        emb = torch.from_numpy(self.encode_texts(filled)).view(len(labels), len(templates), -1)
        return F.normalize(emb.mean(dim=1), dim=-1).numpy()

    def classify(self, images: Sequence, labels: Sequence[str], *,
                 templates: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits), each (N_images, N_labels) float32: logits are the scaled cosine
        similarities, probs their softmax over the labels (the reference's logits_per_image)."""
        return self.scores(self.encode_images(images), self.label_embeddings(labels, templates))

    def scores(self, image_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits) from normalised embeddings, in fp32."""
        logits = torch.from_numpy(image_emb) @ torch.from_numpy(label_emb).T * self.logit_scale
        return logits.softmax(dim=-1).numpy(), logits.numpy()


def _finish(emb: torch.Tensor, normalize: bool) -> np.ndarray:
    emb = emb.float()
    return (F.normalize(emb, dim=-1) if normalize else emb).numpy()


def load(model: str = "BAAI/AltCLIP", *, device: str = "auto", precision: str = "auto",
         revision: str | None = None, download: bool = True, progress: bool = True,
         use_cache: bool = True, exact_decode: bool = False) -> AltCLIP:
    """Load an AltCLIP model from a local folder (Hugging Face layout) or a hub id.

    device: "auto" (cuda, then mps, then cpu) or "cpu" / "cuda" / "cuda:N" / "mps"; an
    explicit device that is absent raises DeviceError. precision: "auto" | "fp32" | "fp16" | "bf16".
    use_cache: keep weights cast to the compute dtype and label embeddings in altclip's cache
    (ALTCLIP_NO_CACHE=1 turns it off everywhere).
    exact_decode: decode every JPEG at full size (bit-exact with the reference's preprocessing)
    instead of large ones at a reduced scale (see AltCLIP.draft_min_side).
    Raises ModelError, DownloadError or DeviceError (altclip_cli.errors).
    """
    from .images import ImagePreprocessor
    from .tokenizer import tokenizer_file

    torch_device, device_reason = choose_device(device)
    precision, precision_reason = choose_precision(torch_device, precision)
    folder, weights = _resolve(model, revision=revision, download=download, progress=progress)
    tokenizer_file(folder)  # a folder without tokenizer files fails now, before the weights load
    if torch_device.type == "cpu":
        torch.set_num_threads(available_cores())
    key = cache.weights_identity(weights) if use_cache and cache.enabled() else None
    net = build_model(folder, weights, torch_device, precision, cache_key=key)
    labels = cache.LabelCache(key, precision) if key else None
    return AltCLIP(model_id=str(model), folder=folder, model=net,
                   preprocessor=ImagePreprocessor.from_dir(folder), device=torch_device,
                   precision=precision, device_reason=device_reason, precision_reason=precision_reason,
                   label_cache=labels, exact_decode=exact_decode)


def _resolve(model: str, **kwargs) -> tuple[Path, list[Path]]:
    from .hub import resolve_model

    resolved = resolve_model(str(model), **kwargs)  # a local folder, or a hub id through the HF cache
    return resolved.folder, resolved.weights
