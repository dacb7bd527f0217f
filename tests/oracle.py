"""The test oracle: transformers' AltCLIP, its XLM-R tokenizer and its PIL CLIP image processor.

`require(module)` is the one way a test module imports an oracle library (transformers, sentencepiece,
...): where it is missing, the test is skipped on a developer's machine but FAILS in CI (the environment
variable CI is set and not "0"/"false"), so that a CI image without the `test` extra cannot turn every
parity test into a silent skip.

`Reference(folder)` loads a model folder (Hugging Face layout, e.g. the tiny model of tests/tiny.py) into
the oracle, at fp32 on the CPU, and computes what altclip's outputs must be equal to.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

# The reference processor sets no truncation by itself; we truncate to the model's 512 tokens.
MAX_TOKENS = 512


def in_ci() -> bool:
    """True where the environment variable CI is set to something other than empty, 0, false, no or off."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


def require(module: str):
    """Import an oracle library; skip the test (or the module, at import time) where it is missing,
    but fail in CI. Only ImportError is handled: a broken install raises as it is."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = (f"the oracle tests need {module}, which cannot be imported ({exc}); "
               f"install the test extra: pip install -e '.[test]'")
        if in_ci():
            pytest.fail(f"CI={os.environ.get('CI')!r}: a missing oracle is a failure, not a skip: {why}",
                        pytrace=False)
        pytest.skip(why, allow_module_level=True)


def _features(x):
    """transformers 5.x returns an output object from get_*_features, 4.x a tensor."""
    return x if hasattr(x, "shape") else x.pooler_output


class Reference:
    """The oracle for one model folder: AltCLIPModel (fp32, CPU), XLMRobertaTokenizerFast and
    CLIPImageProcessorPil, all from that folder."""

    def __init__(self, folder):
        transformers = require("transformers")
        import torch

        self.torch = torch
        folder = Path(folder)
        self.model = transformers.AltCLIPModel.from_pretrained(str(folder)).float().eval()
        self.tokenizer = transformers.XLMRobertaTokenizerFast.from_pretrained(str(folder))
        self.processor = transformers.CLIPImageProcessorPil.from_pretrained(str(folder))

    def text_inputs(self, texts: list[str]):
        """Right-padded ids and mask; texts past MAX_TOKENS are cut to it (the final </s> kept)."""
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt")

    def pixels(self, images):
        """images: PIL images or paths (opened with PIL as they are: no EXIF rotation)."""
        from PIL import Image

        opened = [Image.open(i) if isinstance(i, (str, Path)) else i for i in images]
        return self.processor(opened, return_tensors="pt")["pixel_values"]

    def text_embeddings(self, texts: list[str], normalize: bool = True) -> np.ndarray:
        enc = self.text_inputs(texts)
        with self.torch.no_grad():
            out = _features(self.model.get_text_features(input_ids=enc["input_ids"],
                                                         attention_mask=enc["attention_mask"]))
        return self._finish(out, normalize)

    def image_embeddings(self, images, normalize: bool = True) -> np.ndarray:
        with self.torch.no_grad():
            out = _features(self.model.get_image_features(pixel_values=self.pixels(images)))
        return self._finish(out, normalize)

    def classify(self, images, labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(probs, logits), each (images, labels): logits_per_image and its softmax over the labels."""
        enc = self.text_inputs(labels)
        with self.torch.no_grad():
            out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             pixel_values=self.pixels(images))
        logits = out.logits_per_image
        return logits.softmax(-1).numpy(), logits.numpy()

    def _finish(self, out, normalize: bool) -> np.ndarray:
        if normalize:
            out = out / out.norm(dim=-1, keepdim=True)
        return out.float().numpy()
