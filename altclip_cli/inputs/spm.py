"""Turn a sentencepiece `sentencepiece.bpe.model` into an XLM-R `tokenizers.Tokenizer`, without sentencepiece.

BAAI/AltCLIP-m9 ships only the sentencepiece model. We read its ModelProto with a small protobuf wire-format
reader (just the fields we need) and build what transformers' `XLMRobertaConverter` builds: a Unigram model
with fairseq ids, the model's Precompiled normaliser plus the converter's whitespace steps, a Metaspace
pre-tokeniser and the `<s> X </s>` template. Field numbers are from sentencepiece's `sentencepiece_model.proto`.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

log = logging.getLogger("altclip")

# SentencePiece.Type values (sentencepiece_model.proto)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM = 1  # TrainerSpec.ModelType

# fairseq's dictionary puts these first, then the spm pieces after spm's own <unk> <s> </s>, then <mask>
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
MASK = "<mask>"


@dataclass
class SpmModel:
    """The parts of a sentencepiece ModelProto the conversion needs (defaults are the proto's)."""

    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type), by spm id
    model_type: int = UNIGRAM
    byte_fallback: bool = False  # read only to warn: the reference converter does not honour it
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


# ---- protobuf wire format: (field number, value) pairs; only varint, 32-bit and length-delimited are used here


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Decode a base-128 varint at buf[i:]; return (value, next index)."""
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for each field of one message: ints for varints, bytes otherwise."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:  # 64-bit
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:  # length-delimited: strings, bytes, sub-messages
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        elif wire == 5:  # 32-bit: floats
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield number, value


def _piece(buf: bytes) -> tuple[str, float, int]:
    """SentencePiece message: 1 piece (string), 2 score (float), 3 type (enum, default NORMAL)."""
    piece, score, kind = "", 0.0, NORMAL
    for number, value in _fields(buf):
        if number == 1:
            piece = value.decode("utf-8")
        elif number == 2:
            score = struct.unpack("<f", value)[0]
        elif number == 3:
            kind = value
    return piece, score, kind


def parse_model(data: bytes) -> SpmModel:
    """Read a serialised ModelProto: 1 pieces, 2 trainer_spec, 3 normalizer_spec (others are skipped)."""
    model = SpmModel()
    for number, value in _fields(data):
        if number == 1:
            model.pieces.append(_piece(value))
        elif number == 2:  # TrainerSpec: 3 model_type, 35 byte_fallback
            for n, v in _fields(value):
                if n == 3:
                    model.model_type = v
                elif n == 35:
                    model.byte_fallback = bool(v)
        elif number == 3:  # NormalizerSpec
            for n, v in _fields(value):
                if n == 2:
                    model.precompiled_charsmap = bytes(v)
                elif n == 3:
                    model.add_dummy_prefix = bool(v)
                elif n == 4:
                    model.remove_extra_whitespaces = bool(v)
                elif n == 5:
                    model.escape_whitespaces = bool(v)
    if not model.pieces:
        raise ValueError("no pieces: not a sentencepiece model")
    return model


# ---- the tokenizers.Tokenizer, as transformers' XLMRobertaConverter builds it


def _normalizer(model: SpmModel):
    """Precompiled (e.g. nmt_nfkc) then the converter's own steps: strip the right end, runs of spaces -> '▁'.

    sentencepiece removes extra whitespace inside its normaliser; the converter emulates that after the
    charsmap (which has already turned tabs, newlines and ideographic spaces into ' '). A run of 2+ spaces
    becomes one '▁' directly, which Metaspace then treats like a space.
    """
    from tokenizers import Regex, normalizers

    steps = [normalizers.Precompiled(model.precompiled_charsmap)] if model.precompiled_charsmap else []
    if model.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
    return normalizers.Sequence(steps)


def build_tokenizer(model: SpmModel):
    """A `tokenizers.Tokenizer` with fairseq ids: <s>=0 <pad>=1 </s>=2 <unk>=3, spm id i>=3 -> i+1, <mask> last."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    if model.model_type != UNIGRAM:
        raise ValueError(f"sentencepiece model type {model.model_type} is not Unigram (1)")
    # spm's first three pieces are its own <unk> <s> </s>; fairseq replaces them with its four
    vocab = [(name, 0.0) for name in FAIRSEQ_SPECIALS]
    vocab += [(piece, score) for piece, score, _ in model.pieces[3:]]
    vocab.append((MASK, 0.0))
    if model.byte_fallback:
        log.warning("the sentencepiece model uses byte fallback, which XLM-R's fast tokenizer does not: "
                    "characters outside its vocabulary become <unk>, as in transformers")
    # byte_fallback=False whatever the model says: transformers' XLMRobertaConverter does the same
    # (handle_byte_fallback = False), and its fast tokenizer is the reference we match id for id.
    tok = Tokenizer(Unigram(vocab, unk_id=FAIRSEQ_SPECIALS.index("<unk>"), byte_fallback=False))

    tok.normalizer = _normalizer(model)
    scheme = "always" if model.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=scheme)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    # Specials typed in the text map to their ids, as in transformers' fast tokenizer (sentencepiece itself
    # would spell them out); spm control pieces are special, user-defined ones are matched whole.
    extra = [(p, kind == CONTROL) for p, _, kind in model.pieces[3:] if kind in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*FAIRSEQ_SPECIALS, MASK)])
    tok.add_tokens([AddedToken(p, special=special, normalized=False) for p, special in extra])
    return tok


def convert_spm_model(path: Path):
    """Read `sentencepiece.bpe.model` at `path` and return the equivalent XLM-R `tokenizers.Tokenizer`."""
    return build_tokenizer(parse_model(Path(path).read_bytes()))
