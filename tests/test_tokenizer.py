"""TextTokenizer against the references: transformers' XLM-R tokenizer and sentencepiece itself.

The model is the small Unigram sentencepiece model of `tokenizer_fixture`; both of our paths are checked
(tokenizer.json, and a folder holding only sentencepiece.bpe.model, as BAAI/AltCLIP-m9 ships).
"""

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
from oracle import require
from tokenizer_fixture import SPM_VOCAB, _train, make_tokenizer_files

from altclip_cli.errors import ModelError
from altclip_cli.inputs.spm import CONTROL, UNKNOWN, convert_spm_model, parse_model
from altclip_cli.inputs.tokenizer import SPM_MODEL, TOKENIZER_JSON, TextTokenizer

TEXTS = [
    "",
    " ",
    "a photo of a cat",
    "A Photo Of Two Cats, running!",
    "photographs catdog unseenword",  # words split into sub-word pieces
    "一张猫的照片",
    "猫の写真です",
    "고양이 사진",
    "صورة قطة جميل",
    "фотография кошки",
    "φωτογραφία γάτα",
    "एक बिल्ली की तस्वीर",
    "ＡＢＣ１２３ ｶﾀｶﾅ",  # full-width and half-width forms (NFKC)
    "ﬁne ﬂower ½ № …",  # ligatures and compatibility characters
    "a   b",
    "  leading and trailing   ",
    "tab\there\t\tx",
    "new\nline\r\nand\u2028more",
    "a \n b",
    "x\u3000y a\u00a0b zero\u200bwidth",
    "😀🐱👍🏽 ❤️",
    "mixed 猫 cat кошка قطة 😀 Straße naïve café",
    "e\u0301 and é",
    "\x00ctrl\x07",
    "▁a a ▁ b",
    "\n",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(folder with tokenizer.json and the spm model, folder with only the spm model)."""
    both = tmp_path_factory.mktemp("tok-json")
    assert make_tokenizer_files(both) == SPM_VOCAB + 2
    spm_only = tmp_path_factory.mktemp("tok-spm")
    shutil.copyfile(both / SPM_MODEL, spm_only / SPM_MODEL)
    return both, spm_only


@pytest.fixture(scope="module")
def reference(dirs):
    """transformers 5.x's XLM-R tokenizer, built by transformers from the sentencepiece model."""
    transformers = require("transformers")
    return transformers.XLMRobertaTokenizerFast.from_pretrained(str(dirs[1]))


@pytest.fixture(scope="module")
def spm_ids(dirs):
    """sentencepiece's own encoding, renumbered to fairseq ids (<unk> 0 -> 3, piece i -> i+1) inside <s> </s>."""
    sentencepiece = require("sentencepiece")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(dirs[1] / SPM_MODEL))
    return lambda text: [0] + [3 if i == 0 else i + 1 for i in sp.encode(text)] + [2]


@pytest.fixture(scope="module", params=["json", "spm"])
def tok(request, dirs):
    return TextTokenizer.from_dir(dirs[0] if request.param == "json" else dirs[1])


def test_sizes_and_specials(tok):
    assert (tok.pad_id, tok.max_length, tok.vocab_size) == (1, 512, SPM_VOCAB + 2)
    assert [tok._tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [0, 1, 2, 3, SPM_VOCAB + 1]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(tok, reference, text):
    assert tok.encode([text]) == [reference(text)["input_ids"]]


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_sentencepiece(dirs, spm_ids, text):
    # U+0085 and doubled combining marks are where `tokenizers` and sentencepiece disagree; not tested here
    assert TextTokenizer.from_dir(dirs[1]).encode([text]) == [spm_ids(text)]


def test_typed_special_tokens_match_transformers(tok, reference):
    # sentencepiece would spell "<s>" out; transformers (and the hub's tokenizer.json) map it to its id
    text = "<s> a <mask> b </s><pad>"
    assert tok.encode([text])[0] == reference(text)["input_ids"]


def test_empty_string(tok):
    assert tok.encode(["", " "]) == [[0, 2], [0, 2]]


def test_conversion_is_the_transformers_converter(dirs):
    """Our tokenizer.json equals XLMRobertaConverter's, apart from the specials it leaves to the fast tokenizer."""
    conv = require("transformers.convert_slow_tokenizer")
    stub = SimpleNamespace(vocab_file=str(dirs[1] / SPM_MODEL), convert_tokens_to_ids={"<s>": 0, "</s>": 2}.get)
    theirs = json.loads(conv.XLMRobertaConverter(stub).converted().to_str())
    ours = json.loads(convert_spm_model(dirs[1] / SPM_MODEL).to_str())
    assert [k for k in theirs if theirs[k] != ours[k]] == ["added_tokens"]
    assert [t["content"] for t in ours["added_tokens"]] == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def test_protobuf_reader_matches_protobuf(dirs):
    pb2 = require("sentencepiece.sentencepiece_model_pb2")
    data = (dirs[1] / SPM_MODEL).read_bytes()
    proto = pb2.ModelProto.FromString(data)
    ours = parse_model(data)
    assert ours.pieces == [(p.piece, pytest.approx(p.score), p.type) for p in proto.pieces]
    assert ours.pieces[0][2] == UNKNOWN and ours.pieces[1][2] == ours.pieces[2][2] == CONTROL
    spec = proto.normalizer_spec
    assert ours.precompiled_charsmap == spec.precompiled_charsmap != b""
    assert (ours.add_dummy_prefix, ours.remove_extra_whitespaces, ours.escape_whitespaces) == (True, True, True)
    assert (ours.model_type, ours.byte_fallback) == (proto.trainer_spec.model_type, False)


def test_fixture_training_is_deterministic(tmp_path, dirs):
    (tmp_path / "again").mkdir()
    _train(tmp_path / "again")
    # compare pieces, not bytes: the trainer spec records the input and output paths
    again = parse_model((tmp_path / "again" / SPM_MODEL).read_bytes())
    assert again == parse_model((dirs[0] / SPM_MODEL).read_bytes())


def _full(tok, text):
    """What truncation must give: the whole text tokenised, cut to max_length with its final </s> kept."""
    ids = tok._tok.encode(text).ids
    return ids if len(ids) <= tok.max_length else ids[: tok.max_length - 1] + ids[-1:]


def test_long_text_truncated_with_warning(tok, caplog):
    text = "A photo of a cat and a dog by the river " * 100
    n_tokens = len(tok._tok.encode(text).ids)
    assert n_tokens > 512
    with caplog.at_level(logging.WARNING, logger="altclip"):
        (ids,) = tok.encode([text])
    assert len(ids) == 512 and ids[0] == 0 and ids[-1] == 2
    assert ids == _full(tok, text)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "A photo of a cat and a dog by the river" in message and str(n_tokens) in message


def test_truncation_boundary(dirs, caplog):
    text = "a photo of a cat by the river"
    n = len(TextTokenizer.from_dir(dirs[0]).encode([text])[0])
    with caplog.at_level(logging.WARNING, logger="altclip"):
        assert len(TextTokenizer.from_dir(dirs[0], max_length=n).encode([text])[0]) == n
        assert not caplog.records  # exactly max_length: nothing cut
        (ids,) = TextTokenizer.from_dir(dirs[0], max_length=n - 1).encode([text])
    assert len(ids) == n - 1 and ids[-1] == 2 and len(caplog.records) == 1


@pytest.mark.parametrize(
    "unit",
    ["a photo of a cat by the river ", "一张猫的照片在城市街道", "фотография кошки 😀 ", "x", " ", "ﬁ\t"],
)
def test_huge_text_is_read_by_prefix_and_equals_full(dirs, unit, caplog):
    # max_length 16 puts the prefix path at 1 KiB, so tests stay fast; the logic is the same as at 512
    tok = TextTokenizer.from_dir(dirs[0], max_length=16)
    text = "Ünïcode start " + unit * (20_000 // len(unit))
    with caplog.at_level(logging.WARNING, logger="altclip"):
        (ids,) = tok.encode([text])
    assert ids == _full(tok, text)
    assert len(caplog.records) == (len(tok._tok.encode(text).ids) > 16)


class _Recording:
    """A `tokenizers.Tokenizer` stand-in that records the length of every text it is given."""

    def __init__(self, tok):
        self._tok, self.lengths = tok, []

    def encode(self, text, *args, **kwargs):
        self.lengths.append(len(text))
        return self._tok.encode(text, *args, **kwargs)

    def encode_batch(self, texts, *args, **kwargs):
        self.lengths.extend(map(len, texts))
        return self._tok.encode_batch(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_ten_megabytes_are_tokenised_by_prefix(dirs):
    # How fast this is belongs in bench/; here: only a bounded prefix of the 10 MB is tokenised, and the
    # ids are those of the whole text (equal to any long prefix's: the text repeats).
    tok = TextTokenizer.from_dir(dirs[0])
    tok._tok = recording = _Recording(tok._tok)
    text = "猫的照片 a photo " * 700_000
    (ids,) = tok.encode([text])
    assert len(text.encode()) > 10_000_000 and recording.lengths
    assert max(recording.lengths) <= 200_000  # 2% of the text
    assert len(ids) == 512 and ids[-1] == 2
    assert ids == _full(TextTokenizer.from_dir(dirs[0]), text[:200_000])


def test_batch_pads_right(tok):
    texts = ["a photo of a cat", "", "一张猫的照片 and more words here"]
    ids, mask = tok.batch(texts)
    seqs = tok.encode(texts)
    width = max(map(len, seqs))
    assert ids.shape == mask.shape == (3, width)
    assert str(ids.dtype) == str(mask.dtype) == "torch.int64"
    for row, seq in enumerate(seqs):
        assert ids[row].tolist() == seq + [1] * (width - len(seq))
        assert mask[row].tolist() == [1] * len(seq) + [0] * (width - len(seq))
    assert tok.batch(["", ""])[0].tolist() == [[0, 2], [0, 2]]


def test_file_padding_and_truncation_are_ignored(dirs, tmp_path):
    config = json.loads((dirs[0] / TOKENIZER_JSON).read_text(encoding="utf-8"))
    config["truncation"] = {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}
    config["padding"] = {
        "strategy": {"Fixed": 40},
        "direction": "Left",
        "pad_to_multiple_of": None,
        "pad_id": 1,
        "pad_type_id": 0,
        "pad_token": "<pad>",
    }
    (tmp_path / TOKENIZER_JSON).write_text(json.dumps(config), encoding="utf-8")
    ours = TextTokenizer.from_dir(tmp_path).encode(["a photo of a cat"])
    assert ours == TextTokenizer.from_dir(dirs[0]).encode(["a photo of a cat"])
    assert len(ours[0]) == 7


def test_lone_surrogates_do_not_fail_the_batch(tok):
    assert tok.encode(["a \udcff cat", "cat"])[1] == tok.encode(["cat"])[0]


def test_one_string_is_refused(tok):
    with pytest.raises(TypeError):
        tok.encode("a photo")


def test_missing_files(tmp_path):
    with pytest.raises(ModelError) as info:
        TextTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in info.value.message and info.value.hint


@pytest.mark.parametrize("name", [TOKENIZER_JSON, SPM_MODEL])
def test_malformed_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"\xff\x00 not a tokenizer")
    with pytest.raises(ModelError) as info:
        TextTokenizer.from_dir(tmp_path)
    assert name in info.value.message
