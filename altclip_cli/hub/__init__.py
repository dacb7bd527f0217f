"""Models and where their files come from: the registry of released checkpoints, the Hugging Face
cache, downloads, and the one-time conversion of pickled weights. Cheap to import: torch,
safetensors and huggingface_hub are imported inside the functions that need them."""
from .hfcache import CachedModel, cached_models
from .registry import DEFAULT_MODEL, KNOWN_MODELS, KnownModel
from .resolve import ResolvedModel, download_model, resolve_model

__all__ = ["CachedModel", "cached_models", "DEFAULT_MODEL", "KNOWN_MODELS", "KnownModel", "ResolvedModel",
           "download_model", "resolve_model"]
