"""A loaded model (`AltCLIP`) and `load`: resolve a model, apply the device and precision policy
(device.py), build the network (build.py), and encode texts and images: the two primitives under
the model-facing layer (embedder.py) that labels, scores and classification share with a
server's model."""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..cache.identity import content_identity
from ..cache.identity import enabled as cache_enabled
from ..cache.labels import LabelCache, text_identity
from ..cache.weights import weights_identity
from ..inputs.pipeline import DEFAULT_INPUT_TIMEOUT, ImageResult, stream_embeddings
from ..nn.model import AltCLIPModel
from .build import build_model
from .device import PRECISIONS, choose_device, choose_precision, default_batch_size, images_per_pass
from .embedder import Embedder
from .heap import reuse_freed_memory
from ..inputs.threads import plan_threads

log = logging.getLogger("altclip")
DRAFT_FACTOR = 2  # see AltCLIP.draft_min_side


@dataclass
class AltCLIP(Embedder):
    """A loaded model with its tokenizer and image preprocessor (see `load`); label embeddings,
    scores and classify come from Embedder."""

    model_id: str
    folder: Path
    model: AltCLIPModel
    preprocessor: object  # altclip_cli.images.ImagePreprocessor
    device: torch.device
    precision: str
    device_reason: str = ""
    precision_reason: str = ""
    label_cache: object | None = None  # altclip_cli.cache.labels.LabelCache
    exact_decode: bool = False
    weights_id: str = ""  # altclip_cli.cache.identity.content_identity of the weight files

    @property
    def draft_min_side(self) -> int | None:
        """The shortest side large JPEGs are decoded at (libjpeg's 1/2-1/8 scales), or None for
        full-size decoding, bit-exact with the reference's preprocessing. Twice the model's input
        side: measured cosine to full decoding >= 0.99997 (docs/models.md, Correctness)."""
        edge = getattr(self.preprocessor, "shortest_edge", None)
        return None if self.exact_decode or not edge else DRAFT_FACTOR * edge

    @functools.cached_property
    def tokenizer(self):
        """The TextTokenizer, loaded on first use: the real tokenizer.json (17 MB) takes over a
        second to load, and a classify whose labels are cached never needs it."""
        from ..inputs.tokenizer import TextTokenizer

        return TextTokenizer.from_dir(self.folder, max_length=self.model.config.text.max_tokens)

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.float().exp())

    def default_batch_size(self, kind: str) -> int:
        """runtime.device's batch size for "image" or "text" on this model's device."""
        return default_batch_size(self.device, kind)

    def _autocast(self):
        dtype = PRECISIONS[self.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    @torch.inference_mode()
    def encode_token_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.model.encode_text(ids.to(self.device), mask.to(self.device))

    @torch.inference_mode()
    def encode_pixel_batch(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, P), through the tower `images_per_pass` images at a time."""
        per_pass = images_per_pass(self.device, self.precision) or len(pixels)
        with self._autocast():
            return torch.cat([self.model.encode_image(part.to(self.device)) for part in pixels.split(per_pass)])

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

    def stream_images(self, sources: Iterable, *, open_fn: Callable | None = None,
                      batch_size: int | None = None, normalize: bool = True,
                      workers: int | None = None, input_timeout: float | None = DEFAULT_INPUT_TIMEOUT,
                      boundary: int | None = None) -> Iterator[ImageResult]:
        """One ImageResult (index, source, embedding or error) per source, in input order, with
        decoding in worker threads ahead of the model. open_fn(source) -> PIL image defaults to
        `open_image` (paths or bytes); an input that fails gives an InputError, never an exception.
        input_timeout: seconds a worker may spend on one input before it fails as stuck (a hung
        network mount) and the run goes on without it; None: no limit.
        boundary: model batches also end at every multiple of it (see stream_embeddings)."""
        from ..inputs.images import open_image

        if open_fn is None:
            def open_fn(source):
                return open_image(source, draft_min_side=self.draft_min_side)

        def encode(pixels: np.ndarray) -> np.ndarray:
            return _finish(self.encode_pixels(torch.from_numpy(pixels)), normalize)

        return stream_embeddings(sources, open_fn, self.preprocessor, encode,
                                 batch_size=batch_size or default_batch_size(self.device, "image"),
                                 workers=workers or plan_threads(self.device.type).decode_workers,
                                 input_timeout=input_timeout, boundary=boundary)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D) on the CPU: encode_pixel_batch, halving the batch on a CUDA out-of-memory error and
        saying so (a warning on the "altclip" logger)."""
        try:
            return self.encode_pixel_batch(pixels).cpu()
        except torch.cuda.OutOfMemoryError:
            if len(pixels) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(pixels) // 2
            log.warning("CUDA out of memory on a batch of %d images: going on with batches of %d",
                        len(pixels), half)
            return torch.cat([self.encode_pixels(pixels[:half]), self.encode_pixels(pixels[half:])])


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
    from ..inputs.images import ImagePreprocessor
    from ..inputs.tokenizer import tokenizer_file

    torch_device, device_reason = choose_device(device)
    precision, precision_reason = choose_precision(torch_device, precision)
    folder, weights = _resolve(model, revision=revision, download=download, progress=progress)
    tokenizer_file(folder)  # a folder without tokenizer files fails now, before the weights load
    threads = plan_threads(torch_device.type)
    if torch_device.type == "cpu":
        if torch.get_num_threads() > threads.torch_threads:
            torch.set_num_threads(threads.torch_threads)  # only ever lowered: a caller's own setting stays
        reuse_freed_memory()  # the tower's temporaries stay in the heap (runtime/heap.py)
    weights_id = content_identity(weights)  # cheap: 18 sampled blocks; indexes and embed's resume use it
    key = weights_identity(weights) if use_cache and cache_enabled() else None
    net = build_model(folder, weights, torch_device, precision, cache_key=key)
    labels = LabelCache(text_identity(key, folder), precision) if key else None
    return AltCLIP(model_id=str(model), folder=folder, model=net,
                   preprocessor=ImagePreprocessor.from_dir(folder), device=torch_device,
                   precision=precision, device_reason=device_reason, precision_reason=precision_reason,
                   label_cache=labels, exact_decode=exact_decode, weights_id=weights_id)


def _resolve(model: str, **kwargs) -> tuple[Path, list[Path]]:
    from ..hub.resolve import resolve_model

    resolved = resolve_model(str(model), **kwargs)  # a local folder, or a hub id through the HF cache
    return resolved.folder, resolved.weights
