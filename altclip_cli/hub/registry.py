"""The released AltCLIP checkpoints and the default model: what `altclip models` lists and what
shell completion offers. Cheap to import (no third-party modules)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnownModel:
    """A released AltCLIP checkpoint: what `altclip models` lists."""

    id: str
    languages: tuple[str, ...]
    download_gb: float  # approximate size of the files we fetch
    description: str


KNOWN_MODELS: dict[str, KnownModel] = {m.id: m for m in (
    KnownModel("BAAI/AltCLIP", ("en", "zh"), 3.5,
               "English and Chinese; ViT-L/14 image tower, XLM-R large text tower"),
    KnownModel("BAAI/AltCLIP-m9", ("en", "zh", "es", "fr", "ru", "ja", "ko", "ar", "it"), 3.5,
               "9 languages; same towers as AltCLIP"),
    KnownModel("BAAI/AltCLIP-m18",
               ("en", "zh", "ja", "th", "ko", "hi", "uk", "ar", "tr", "vi", "pl", "nl", "pt", "it",
                "es", "de", "fr", "ru"), 4.5,
               "18 languages; larger image tower (sizes from its config), 1024-d embeddings"),
)}
DEFAULT_MODEL = "BAAI/AltCLIP"
