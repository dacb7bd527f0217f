"""Text to XLM-R token ids (fairseq numbering: <s>=0, <pad>=1, </s>=2), truncated to the model's 512 positions.

The `tokenizers` library runs the model folder's tokenizer.json as is; a folder with only
`sentencepiece.bpe.model` (BAAI/AltCLIP-m9) is converted in memory by `altclip_cli.spm`.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ..errors import ModelError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

log = logging.getLogger("altclip")

TOKENIZER_JSON = "tokenizer.json"
SPM_MODEL = "sentencepiece.bpe.model"
# A token covers at most ~16 characters (sentencepiece's default max piece length), so texts longer than
# this many characters per allowed token are tokenised by prefixes (see `_encode_long`).
_CHARS_PER_TOKEN = 16
# Lone surrogates (undecodable bytes read with errors="surrogateescape") make `tokenizers` reject the whole batch.
_SURROGATE = re.compile("[\ud800-\udfff]")


def tokenizer_file(model_dir: Path) -> Path:
    """`tokenizer.json`, else `sentencepiece.bpe.model`; ModelError naming the folder if neither is there."""
    model_dir = Path(model_dir)
    for name in (TOKENIZER_JSON, SPM_MODEL):
        if (model_dir / name).is_file():
            return model_dir / name
    raise ModelError(
        f"no tokenizer in {model_dir}: neither {TOKENIZER_JSON} nor {SPM_MODEL} is there",
        hint="the folder must hold the model's tokenizer files, as on the Hugging Face hub",
    )


class TextTokenizer:
    """XLM-R tokenizer: `encode` gives `<s> ... </s>` id lists, `batch` right-padded tensors for the text tower."""

    def __init__(self, tokenizer: "Tokenizer", max_length: int = 512):
        # Padding and truncation are ours to do (right padding, a warning on truncation): ignore the file's.
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if max_length < 2:
            raise ValueError(f"max_length must leave room for <s> and </s>, got {max_length}")
        self._tok = tokenizer
        self.max_length = max_length
        pad = tokenizer.token_to_id("<pad>")
        self.pad_id = 1 if pad is None else pad
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, model_dir: Path, max_length: int = 512) -> "TextTokenizer":
        """Load `tokenizer.json` from `model_dir`, or convert its `sentencepiece.bpe.model` if that is all there is."""
        from tokenizers import Tokenizer

        from .spm import convert_spm_model

        path = tokenizer_file(model_dir)
        try:
            tok = Tokenizer.from_file(str(path)) if path.name == TOKENIZER_JSON else convert_spm_model(path)
        except Exception as ex:  # tokenizers raises a bare Exception on a malformed file
            raise ModelError(f"cannot read the tokenizer {path}: {ex}", hint="download the model again") from ex
        return cls(tok, max_length)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, each `<s> ... </s>`, at most `max_length` long (longer ones are cut, with a warning)."""
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        texts = [_SURROGATE.sub("\ufffd", t) for t in texts]
        # Ordinary texts go through the library's batch call; very long ones through bounded prefixes.
        limit = 4 * _CHARS_PER_TOKEN * self.max_length
        short = [t for t in texts if len(t) <= limit]
        done = iter(enc.ids for enc in self._tok.encode_batch(short))
        out = []
        for text in texts:
            ids, exact = (next(done), True) if len(text) <= limit else self._encode_long(text)
            out.append(self._truncate(text, ids, exact))
        return out

    def _encode_long(self, text: str) -> tuple[list[int], bool]:
        """Ids of a very long text, enough of them for truncation, without tokenising all of it.

        Tokenise prefixes of growing length; once a prefix has more than `max_length` ids and doubling it
        changes none of the first `max_length - 1`, those are the full text's (what follows a cut only
        affects tokens near it). Returns (ids, exact): exact is False when only a prefix was tokenised.
        """
        n = _CHARS_PER_TOKEN * self.max_length
        keep = self.max_length - 1
        prev: list[int] | None = None
        while n < len(text):
            ids = self._tok.encode(text[:n]).ids
            if prev is not None and len(prev) > self.max_length and prev[:keep] == ids[:keep]:
                return ids, False
            prev, n = ids, 2 * n
        return self._tok.encode(text).ids, True

    def _truncate(self, text: str, ids: list[int], exact: bool) -> list[int]:
        """Cut to `max_length`, keeping the final `</s>`, and say so (with the true count when it is known)."""
        if len(ids) <= self.max_length:
            return ids
        head = text[:40].replace("\n", " ") + ("…" if len(text) > 40 else "")
        count = f"{len(ids)}" if exact else f"more than {len(ids)}"
        log.warning("text %r has %s tokens; truncated to %d", head, count, self.max_length)
        return ids[: self.max_length - 1] + ids[-1:]

    def batch(self, texts: Sequence[str]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(ids, attention_mask), int64 (B, T) with T the longest text; padded on the right (pooling reads token 0)."""
        return self.pad(self.encode(texts))

    def pad(self, seqs: Sequence[Sequence[int]]) -> tuple["torch.Tensor", "torch.Tensor"]:
        """Token id lists -> (ids, attention_mask), int64 (B, T), padded on the right."""
        import torch

        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.int64)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.int64)  # (B, T), 1 on real tokens
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            mask[row, : len(seq)] = 1
        return ids, mask
