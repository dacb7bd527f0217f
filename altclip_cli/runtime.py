"""The model runtime: resolve a model, pick device and precision, encode texts and images.

(Interface stub: being implemented in the core issue; signatures are the contract.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def load(model: str = "BAAI/AltCLIP", *, device: str = "auto", precision: str = "auto",
         revision: str | None = None, download: bool = True, progress: bool = True) -> "AltCLIP":
    """Load a model from a local folder (Hugging Face layout) or a hub id.

    device: "auto" (cuda, then mps, then cpu) or "cpu" / "cuda" / "cuda:N" / "mps";
    an explicit device that is absent raises DeviceError.
    precision: "auto" | "fp32" | "fp16" | "bf16".
    Raises ModelError / DownloadError / DeviceError (altclip_cli.errors).
    """
    raise NotImplementedError


class AltCLIP:
    """A loaded model. Attributes: model_id (str), folder (Path), device (torch.device),
    precision ("fp32"|"fp16"|"bf16"), device_reason / precision_reason (str, for `altclip info`),
    embed_dim (int), logit_scale (float, already exp()'d)."""

    def encode_texts(self, texts: Sequence[str], *, batch_size: int | None = None,
                     normalize: bool = True):
        """(N, D) float32 numpy array, row i for texts[i]."""
        raise NotImplementedError

    def encode_images(self, images: Sequence, *, batch_size: int | None = None,
                      normalize: bool = True):
        """images: PIL images (already opened, see altclip_cli.images.open_image).
        (N, D) float32 numpy array, row i for images[i]."""
        raise NotImplementedError

    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None):
        """(L, D) float32, L2-normalised. With templates: each label's text is
        template.format(label) for every template, the normalised embeddings are averaged
        and normalised again (CLIP's prompt ensemble). Without: the label as given."""
        raise NotImplementedError

    def classify(self, images: Sequence, labels: Sequence[str], *,
                 templates: Sequence[str] | None = None):
        """Returns (probs, logits), each (N_images, N_labels) float32 numpy:
        logits = exp(logit_scale) * cos(image, label); probs = softmax over labels."""
        raise NotImplementedError
