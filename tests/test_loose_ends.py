"""Loose ends: --revision on classify, --batch-size for the labels too, ALTCLIP_DEBUG's off values,
a byte-fallback sentencepiece model converted as transformers converts it, exit code 143."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import altclip_cli
from altclip_cli.cli import ExitStatus, cli
from altclip_cli.inputs.spm import convert_spm_model, parse_model
from altclip_cli.inputs.tokenizer import TextTokenizer
from oracle import require

SAFE_ENV = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NO_COLOR": "1",
            "ALTCLIP_DEVICE": "cpu", "ALTCLIP_PRECISION": "fp32"}


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env={**SAFE_ENV, **(env or {})}, catch_exceptions=False)


@pytest.fixture
def image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    return "a.png"


# --- --revision --------------------------------------------------------------------------------------


def test_revision_is_accepted_and_ignored_for_a_local_folder(image, tiny_model_dir):
    result = invoke("classify", image, "-l", "cat", "-f", "jsonl", "-m", tiny_model_dir, "--revision", "v1.0")
    assert result.exit_code == 0
    assert [r["image"] for r in map(json.loads, result.stdout.splitlines())] == ["a.png"]
    assert result.stderr == f"warning: --revision v1.0 is ignored: {tiny_model_dir} is a local folder, not a hub id\n"


def test_revision_reaches_the_hub_lookup(image):
    result = invoke("classify", image, "-l", "cat", "-m", "someone/altclip-test", "--revision", "v2")
    assert result.exit_code == 1
    error, hint = result.stderr.splitlines()
    assert error.startswith("error: someone/altclip-test (revision v2) is not in the cache (")
    assert error.endswith(") and offline mode is on (HF_HUB_OFFLINE)")
    assert hint == "hint: run: altclip download someone/altclip-test --revision v2"


# --- --batch-size for labels ---------------------------------------------------------------------------


@pytest.fixture
def padded_batches(monkeypatch):
    """The size of every batch the tokenizer pads (one per text-tower call)."""
    sizes = []
    real_pad = TextTokenizer.pad

    def pad(self, seqs):
        sizes.append(len(seqs))
        return real_pad(self, seqs)

    monkeypatch.setattr(TextTokenizer, "pad", pad)
    return sizes


def test_label_embeddings_take_a_batch_size(tiny_model_dir, padded_batches, monkeypatch):
    monkeypatch.setenv("ALTCLIP_NO_CACHE", "1")
    model = altclip_cli.load(str(tiny_model_dir), device="cpu", precision="fp32")
    labels = ["cat", "dog", "bird", "car", "tree"]
    batched = model.label_embeddings(labels, ["a photo of {}.", "{}"], batch_size=3)
    assert padded_batches == [3, 3, 3, 1]  # 5 labels x 2 templates
    padded_batches.clear()
    assert np.allclose(batched, model.label_embeddings(labels, ["a photo of {}.", "{}"]), atol=1e-6)
    assert padded_batches == [10]  # the device's default text batch holds them all


def test_classify_batch_size_applies_to_the_labels(image, tiny_model_dir, padded_batches):
    labels = [arg for label in ("cat", "dog", "bird", "car", "tree") for arg in ("-l", label)]
    result = invoke("classify", image, *labels, "-f", "jsonl", "-m", tiny_model_dir, "-b", "2")
    assert result.exit_code == 0
    assert padded_batches == [2, 2, 1]


# --- ALTCLIP_DEBUG -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("YES", True), ("on", True),
                                       ("0", False), ("", False), ("false", False), ("No", False),
                                       ("off", False), (" 0 ", False)])
def test_altclip_debug_values(image, tmp_path, value, on):
    (tmp_path / "empty-model").mkdir()
    result = invoke("classify", image, "-l", "x", "-m", tmp_path / "empty-model", env={"ALTCLIP_DEBUG": value})
    assert result.exit_code == 1
    assert ("Traceback (most recent call last)" in result.stderr) is on
    assert result.stderr.splitlines()[-2].startswith("error: ")


@pytest.mark.parametrize("value, cached", [("1", False), ("yes", False), ("0", True), ("false", True), ("off", True),
                                           ("", True)])
def test_altclip_no_cache_is_a_flag_like_the_others(monkeypatch, value, cached):
    from altclip_cli.cache.identity import enabled

    monkeypatch.setenv("ALTCLIP_NO_CACHE", value)
    assert enabled() is cached


# --- a byte-fallback sentencepiece model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_fallback_model(tmp_path_factory):
    """A small Unigram model trained with byte_fallback (256 <0xNN> pieces); AltCLIP-m9's has it off."""
    spm = require("sentencepiece")
    from tokenizer_fixture import _corpus

    folder = tmp_path_factory.mktemp("spm-bytes")
    (folder / "corpus.txt").write_text("\n".join(_corpus(1000)) + "\n", encoding="utf-8")
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "bytes"),
                                   model_type="unigram", vocab_size=600, byte_fallback=True,
                                   normalization_rule_name="nmt_nfkc", character_coverage=1.0, num_threads=1,
                                   shuffle_input_sentence=False, minloglevel=2)
    return folder / "bytes.model"


@pytest.fixture
def altclip_warnings():
    """Messages of the records logged on the "altclip" logger (whatever its propagation)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("altclip")
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def test_a_byte_fallback_model_converts_as_transformers_does(byte_fallback_model, altclip_warnings):
    """transformers' XLMRobertaConverter builds its Unigram with byte_fallback=False whatever the
    model says (and warns): an unknown character is <unk>, not its UTF-8 bytes. So do we, saying so."""
    conv = require("transformers.convert_slow_tokenizer")
    assert parse_model(byte_fallback_model.read_bytes()).byte_fallback
    stub = SimpleNamespace(vocab_file=str(byte_fallback_model), convert_tokens_to_ids={"<s>": 0, "</s>": 2}.get)
    with pytest.warns(UserWarning, match="byte fallback"):
        theirs = conv.XLMRobertaConverter(stub).converted()
    ours = convert_spm_model(byte_fallback_model)
    text = "a photo of 🦄 and ☃"  # neither character is in the training corpus
    assert ours.encode(text).ids == theirs.encode(text).ids
    assert ours.encode(text).ids.count(3) == 2  # <unk>, not <0xF0> <0x9F> ...
    as_json = [json.loads(t.to_str()) for t in (theirs, ours)]
    assert [k for k in as_json[0] if as_json[0][k] != as_json[1][k]] == ["added_tokens"]
    assert [r.getMessage() for r in altclip_warnings] == [
        "the sentencepiece model uses byte fallback, which XLM-R's fast tokenizer does not: "
        "characters outside its vocabulary become <unk>, as in transformers"]


# --- exit codes ----------------------------------------------------------------------------------------


def test_exit_status_has_sigterm():
    assert ExitStatus.TERMINATED == 143 and ExitStatus.INTERRUPTED == 130
    assert [s.value for s in ExitStatus] == [0, 1, 2, 3, 130, 143]
    assert "130 interrupted, 143 terminated (SIGTERM)" in " ".join(cli.help.split())
